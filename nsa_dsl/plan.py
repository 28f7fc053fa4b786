"""Pattern -> Plan: every decision about the generated kernels lives here.

The Plan says which kernels exist for a pattern (a window-only pattern needs
one attention kernel; a static selection, top == initial + local, needs no
scoring), their tile sizes, loop order, head-dim padding and launch settings.
Templates only turn these decisions into code; ops.py only launches what the
plan lists. Planning is a pure function of the (already validated) pattern.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from math import gcd
from typing import Optional

from .check import MAX_SCORED_GROUP
from .geometry import visible_compressed
from .ir import Branch, Pattern
from .loop_order import LOOP_ORDER_LENGTHS, block_centric_from, selection_loop_bytes


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# The smallest M, N and K a tensor-core dot accepts in Triton.
MMA_MIN = 16
# The block-centric selection forward's per-slot partial outputs take about
# this many bytes at most: longer sequences run in slices of positions.
BC_PARTIAL_BYTES = 2 << 30


@dataclass(frozen=True)
class KernelPlan:
    """One generated kernel: its function name, its template, the constants
    baked into it (rendered as `NAME: tl.constexpr` lines) and how it is
    launched."""

    name: str
    template: str
    role: str
    grid: str  # human-readable launch grid, for --explain
    constants: tuple = ()  # ((NAME, int | bool | str), ...)
    num_warps: int = 4
    num_stages: int = 2
    direction: str = "forward"  # "backward", or "decode" (the inference step: no training pass runs it)

    def const(self, name: str):
        for key, value in self.constants:
            if key == name:
                return value
        raise KeyError(f"kernel {self.name} has no constant {name}")

    def has_const(self, name: str) -> bool:
        return any(key == name for key, _ in self.constants)

    def warps_for(self, entry: str) -> int:
        """Warps of one of the kernel's entry points: the flash-style dK/dV
        kernels carry their own (*_BWD_DKDV_WARPS), and so do the
        block-centric merge (BC_MERGE_WARPS), the selection's dq
        (SLC_BWD_DQ_WARPS) and two of the decode step's launches
        (DEC_TOPK_WARPS, DEC_REDUCE_WARPS); the rest launch with num_warps."""
        if entry == "slc_fwd_bc_merge_window" and self.has_const("BC_MERGE_WARPS"):
            return self.const("BC_MERGE_WARPS")
        if entry in ("dec_topk", "dec_reduce") or (entry == "slc_bwd_dq" and self.has_const("SLC_BWD_DQ_WARPS")):
            return self.const(f"{entry.upper()}_WARPS")
        if entry.endswith("_bwd_dkdv"):
            name = f"{entry[:-len('_bwd_dkdv')].upper()}_BWD_DKDV_WARPS"
            if self.has_const(name):
                return self.const(name)
        return self.num_warps


@dataclass(frozen=True)
class Plan:
    pattern: Pattern
    kernels: tuple  # of KernelPlan, in launch order
    shared_constants: tuple  # ((NAME, value), ...) used by several kernels
    qk_pad: int
    v_pad: int
    group_rows: int  # G padded to an MMA tile, for the group-centric selection
    # Selection forward loop order by length: block-centric from this T on
    # (the cost model's choice), group-centric below it; None: group-centric
    # at every length, or no selection branch (see loop_order_at).
    block_centric_from: Optional[int]
    static_selection: bool
    # How the selection branch's key/value gradients are accumulated across
    # the queries that chose a block: "inverted-index" (block-centric,
    # deterministic) or "atomic" (float32 atomics from the query side).
    slc_dkdv: Optional[str] = None
    warnings: tuple = ()
    notes: tuple = field(default=())

    @property
    def kernel_names(self) -> tuple:
        return tuple(k.name for k in self.kernels)

    def kernel(self, name: str) -> KernelPlan:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"plan for {self.pattern.name!r} has no kernel {name!r}; it has {self.kernel_names}")

    def has(self, name: str) -> bool:
        return name in self.kernel_names

    @property
    def dq_with_compressed(self) -> bool:
        """Whether one kernel computes the compressed branch's and the
        window's dQ (cmp_swa_bwd_dq in place of cmp_bwd_dq and swa_bwd_dq):
        wherever both branches are combined and their dq kernels have the
        same rows a tile, warps and stages (a record may have tuned them
        apart), at head dims up to 128. One kernel stores and reads the
        float32 dQ sum once less and reads q once less: paper128's training
        pass 126.99 -> 126.31 ms at 64k and 20.91 -> 20.65 at 16k on an H100
        (NOTES v28). Wider heads stay apart, untimed: at deepseek_nsa's 192
        the one kernel spills 320 B a thread on sm_90 against 136 and 32
        for the two."""
        if not (self.has("swa_bwd") and self.has("cmp_bwd")):
            return False
        if max(self.pattern.dims.qk, self.pattern.dims.v) > 128:
            return False
        cmp, swa = self.kernel("cmp_bwd"), self.kernel("swa_bwd")
        return (cmp.const("CMP_BWD_BLOCK_M") == swa.const("SWA_BWD_BLOCK_M") and cmp.num_warps == swa.num_warps
                and cmp.const("CMP_BWD_DQ_STAGES") == swa.const("SWA_BWD_DQ_STAGES"))

    @property
    def window_in_block_centric(self) -> bool:
        """Whether the block-centric selection forward's slot reduction also
        computes the window branch (BC_FOLD_WINDOW=1): swa_fwd then runs
        only for the group-centric order, unless that folds it too."""
        if not self.has("slc_fwd_bc"):
            return False
        bc = self.kernel("slc_fwd_bc")
        return bc.has_const("BC_FOLD_WINDOW") and bool(bc.const("BC_FOLD_WINDOW"))

    @property
    def forced_in_merge(self) -> bool:
        """Whether the block-centric merge attends the forced blocks itself
        (BC_MERGE_FORCED=1 with the window folded in, and forced blocks to
        attend): slc_fwd_bc then skips them, for indices from the plan's own
        scoring (given indices need not hold them; ops decides per call)."""
        if not self.window_in_block_centric:
            return False
        bc = self.kernel("slc_fwd_bc")
        return bool(bc.const("BC_MERGE_FORCED")) and bc.const("INITIAL") + bc.const("LOCAL") > 0

    @property
    def local_in_window(self) -> bool:
        """Whether the merge scores the local blocks' keys once for the
        window and the forced blocks (BC_LOCAL_IN_WINDOW=1, forced blocks
        in the merge): for calls whose window reads the selection's own k
        and v (ops decides per call)."""
        return self.forced_in_merge and bool(self.kernel("slc_fwd_bc").const("BC_LOCAL_IN_WINDOW"))

    @property
    def window_in_selection(self) -> bool:
        """Whether the group-centric selection forward also computes the
        window branch (SLC_FWD_WINDOW=1): swa_fwd then runs only for the
        block-centric order."""
        if not self.has("slc_fwd"):
            return False
        slc = self.kernel("slc_fwd")
        return slc.has_const("SLC_FWD_WINDOW") and bool(slc.const("SLC_FWD_WINDOW"))

    def loop_order_at(self, T: int) -> Optional[str]:
        """The selection forward loop order the plan runs at length T (None
        without a selection branch): SLC_FWD_ORDER where set, else the cost
        model's."""
        if not self.has("slc_fwd"):
            return None
        forced = self.kernel("slc_fwd").const("SLC_FWD_ORDER")
        if forced >= 0:
            return ("group-centric", "block-centric")[forced]
        if self.block_centric_from is not None and T >= self.block_centric_from:
            return "block-centric"
        return "group-centric"

    def loop_order_summary(self) -> Optional[str]:
        if not self.has("slc_fwd"):
            return None
        forced = self.kernel("slc_fwd").const("SLC_FWD_ORDER")
        if forced >= 0:
            return f"{('group-centric', 'block-centric')[forced]} at every length (SLC_FWD_ORDER={forced})"
        if self.block_centric_from is None:
            return "group-centric at every length"
        return f"group-centric below T={self.block_centric_from}, block-centric from it"

    def explain(self, verbose: bool = False) -> str:
        """The plan in words, for `nsa-dsl check --explain`: one line per
        kernel (what it does, when it runs) and one with its tiles and
        launch; the constants that restate the pattern and the switches
        that are off are left out (verbose=True prints every constant,
        grid and the plan's notes word for word)."""
        if verbose:
            return self._explain_all()
        p = self.pattern
        combined = p.combined_branches
        lines = [f"pattern {p.name}: heads q={p.heads.q} kv={p.heads.kv} (G={p.group} per KV head),"
                 f" head dims qk={p.dims.qk} v={p.dims.v}, branches {', '.join(b.value for b in p.declared_branches)}"
                 + (" (all combined)" if len(combined) == len(p.declared_branches)
                    else f" (combined: {', '.join(b.value for b in combined)})")]
        pad = [f"{name} {dim} -> {padded}" for name, dim, padded in (("qk", p.dims.qk, self.qk_pad),
                                                                    ("v", p.dims.v, self.v_pad)) if padded != dim]
        if pad:
            lines.append(f"  head dims padded to powers of two in registers ({', '.join(pad)}); memory traffic stays"
                         " at the declared size")
        if self.has("slc_fwd"):
            lines.append(f"  selection loop order: {self.loop_order_summary()}"
                         f" (G={p.group} query heads as rows of a {self.group_rows}-row MMA tile)")
            why = self._loop_order_reason()
            if why:
                lines.append(f"    {why}")
        off = sum(_shown_constants(k)[1] for k in self.kernels)
        lines.append("kernels in launch order (backward: training only"
                     + (f"; {off} switches that are off not shown, see explain(verbose=True)" if off else "")
                     + "):")
        for k in self.kernels:
            shown, _ = _shown_constants(k)
            what = f"  - {k.name} ({k.direction}): {_summary(self, k)}{_when_launched(self, k)}"
            launch = f"{k.num_warps} warps, {k.num_stages} stage{'s' if k.num_stages > 1 else ''}"
            settings = f"{' '.join(f'{n}={v}' for n, v in shown)}{'; ' if shown else ''}{launch}"
            # one line where it fits a terminal, else the settings below
            if len(what) + len(settings) + 4 <= EXPLAIN_WIDTH:
                lines.append(f"{what}  [{settings}]")
            else:
                lines += [what, f"      [{settings}]"]
        # notes the lines above do not already say (none today: kept so a
        # new note is never silently dropped)
        lines += [f"  note: {note}" for note in self.notes if not note.startswith(_NOTES_SHOWN)]
        return "\n".join(lines)

    def _loop_order_reason(self) -> str:
        """Why the cost model chose the selection loop order, from the
        plan's own note ("... by the cost model (WHY); compile(...)
        overrides"), unless SLC_FWD_ORDER forces an order."""
        if self.kernel("slc_fwd").const("SLC_FWD_ORDER") >= 0:
            return ""
        for note in self.notes:
            found = re.match(r"selection forward loop order: .* by the cost model \((.*)\); compile", note)
            if found:
                return f"why: {found.group(1)}; compile(..., slc_fwd=...) overrides"
        return ""

    def _explain_all(self) -> str:
        """Every constant of every kernel, its grid, and the plan's notes."""
        p = self.pattern
        lines = [f"pattern {p.name}: {len(self.kernels)} kernel(s), branches {', '.join(b.value for b in p.declared_branches)}"
                 f" (combined: {', '.join(b.value for b in p.combined_branches)})"]
        lines.append(f"  heads q={p.heads.q} kv={p.heads.kv} (G={p.group}); head dims qk={p.dims.qk}"
                     f"{' padded to ' + str(self.qk_pad) if self.qk_pad != p.dims.qk else ''},"
                     f" v={p.dims.v}{' padded to ' + str(self.v_pad) if self.v_pad != p.dims.v else ''}")
        if self.has("slc_fwd"):
            lines.append(f"  selection loop order: {self.loop_order_summary()}"
                         f" (G={p.group} query heads as rows of a {self.group_rows}-row MMA tile)")
        if self.slc_dkdv is not None:
            lines.append(f"  selection key/value gradients: {self.slc_dkdv}")
        for k in self.kernels:
            consts = " ".join(f"{n}={v}" for n, v in k.constants)
            lines.append(f"  - {k.name} ({k.direction}): {k.role}")
            lines.append(f"      grid {k.grid}; num_warps={k.num_warps} num_stages={k.num_stages}")
            if consts:
                lines.append(f"      {consts}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


# --- explain's helpers (printing only: no decision is made here) -----------

# Columns explain aims for: a kernel's summary and its settings share a line
# where they fit.
EXPLAIN_WIDTH = 120

# The beginnings of make_plan's notes that explain's lines already say:
# the loop order (and its why), the selection dK/dV in slc_bwd's line, the
# padding in the header, a static selection in slc_topk's line.
_NOTES_SHOWN = ("selection forward loop order:", "selection dK/dV:", "head dims are padded",
                "top == initial + local")

# Plan.slc_dkdv in words (compile(..., slc_dkdv=) picks the other)
_SLC_DKDV = {"inverted-index": "per block over an inverted index (deterministic)",
             "atomic": "by float32 atomics from the query side (not deterministic)"}

# Constants that restate the pattern (block sizes, top-n, window, which
# branches are combined) or a decision printed on its own line: explain's
# one-line summary leaves them out, verbose prints them.
_RESTATED = {"CMP_BLOCK", "CMP_STRIDE", "SLC_BLOCK", "TOP", "TOP_PAD", "INITIAL", "LOCAL", "WINDOW",
             "STATIC_SELECTION", "GROUP_ROWS", "COMBINE_CMP", "COMBINE_SLC", "COMBINE_SWA", "SLC_FWD_ORDER"}


def _shown_constants(kernel: KernelPlan) -> tuple:
    """(the constants worth a line: tiles, work splits, switches that are
    on; how many tunable switches are off and left out)."""
    shown, off = [], 0
    for name, value in kernel.constants:
        if name in _RESTATED:
            continue
        if value is False or (value == 0 and TUNABLE.get(name) is _flag):
            off += name in TUNABLE
            continue
        shown.append((name, value))
    return tuple(shown), off


def _gated_sum(branches) -> str:
    return " + ".join(f"g_{b.value}*o_{b.value}" for b in branches)


def _summary(plan: Plan, k: KernelPlan) -> str:
    """What a kernel does, in a few words (KernelPlan.role has the long form)."""
    c = dict(k.constants)
    summaries = {
        "cmp_pool": lambda: f"mean-pools k, v into k_cmp, v_cmp (blocks of {c['CMP_BLOCK']} every {c['CMP_STRIDE']})",
        "cmp_fwd": lambda: "attention over the compressed tokens in the query's past"
                           + ("" if c["CMP_WRITE_O"] else ": log-sum-exp only, to rank blocks"),
        "slc_topk": lambda: (f"the forced blocks ({c['INITIAL']} initial, {c['LOCAL']} local) by formula, no scoring"
                             if c["STATIC_SELECTION"] else
                             f"scores blocks from the compressed probabilities, keeps the top {c['TOP']}"
                             f" ({c['INITIAL']} initial + {c['LOCAL']} local forced)"),
        "slc_fwd": lambda: f"attention over the {c['TOP']} selected blocks, group-centric: {c['SLC_TOKENS']}"
                           f" position(s) x {c['GROUP_ROWS']} head rows a tile",
        "slc_fwd_bc": lambda: f"the same, block-centric: the positions that chose each block, then a"
                              f" {c['TOP']}-slot reduction",
        "swa_fwd": lambda: f"attention over the last {c['WINDOW']} positions",
        "combine": lambda: "o = " + _gated_sum(plan.pattern.combined_branches),
        "bwd_prep": lambda: "gate gradients and each branch's softmax-backward term",
        "cmp_bwd": lambda: "dq, dk_cmp, dv_cmp of cmp_fwd",
        "cmp_pool_bwd": lambda: "dk, dv of the mean pooling",
        "slc_bwd": lambda: f"dq, dk, dv of the selection; dK/dV {_SLC_DKDV[plan.slc_dkdv]}",
        "swa_bwd": lambda: "dq, dk, dv of the window",
    }
    if k.name in summaries:
        return summaries[k.name]()
    return k.role.split(";")[0]  # a kernel without a summary yet: its role's first clause


def _when_launched(plan: Plan, k: KernelPlan) -> str:
    """When a default call runs the kernel, for the kernels that do not
    always run: the two selection loop orders, and the window where a
    selection kernel computes it."""
    if k.name == "slc_fwd_bc":
        if plan.loop_order_at(1 << 30) != "block-centric":
            return " [not launched by default]"
        if plan.loop_order_at(1) == "block-centric":
            return ""
        return f" [from T={plan.block_centric_from}]"
    if k.name == "slc_fwd":
        if plan.loop_order_at(1) == "block-centric":
            return " [not launched by default]"
        if plan.loop_order_at(1 << 30) == "block-centric":
            return f" [below T={plan.block_centric_from}]"
        return ""
    if k.name == "swa_fwd":
        if plan.window_in_selection and plan.window_in_block_centric:
            return " [not launched: both selection orders compute the window]"
        if plan.window_in_selection:
            return " [runs with block-centric only: slc_fwd computes the window]"
        if plan.window_in_block_centric:
            return " [runs with group-centric only: the block-centric merge computes the window]"
    return ""


# Shared memory one block may use on sm_90 (Hopper), bytes.
SM90_SHARED_PER_BLOCK = 232448


def flash_fwd_shared_bytes(block_m: int, block_n: int, stages: int, qk_pad: int, v_pad: int) -> int:
    """Shared memory of a flash-style forward loop with 16-bit inputs: the q
    tile plus one K and one V tile per pipeline stage (what the sm_90
    compile reports for cmp_fwd and swa_fwd: deepseek_nsa's 128 x 64 on 3
    stages 212992 bytes, qk = v = 256 262144)."""
    return 2 * (block_m * qk_pad + stages * block_n * (qk_pad + v_pad))


def _attention_tiles(qk_pad: int, v_pad: int) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a flash-style loop.

    Wider heads get a narrower key tile so the K and V tiles of a pipeline
    stage stay well inside Hopper's 228 KB of shared memory. (Float32
    inputs take more; ops.py lowers the stages of a launch that does not
    fit.)
    """
    d_pad = max(qk_pad, v_pad)
    if d_pad <= 64:
        return 64, 64, 4, 3
    if d_pad <= 128:
        # 4 warps: 8 were slower for both forwards, cmp_fwd and swa_fwd
        # (NOTES v2). With the launch's specialization (contiguous strides)
        # 4 warps do not spill and the K/V loads are pipelined
        # (results/sm90_report.txt).
        return 64, 64, 4, 2
    # Wider (deepseek_nsa's 192, padded to 256): 128 query rows on two
    # warpgroups, 64 keys, 3 stages. The tuner took it for both cmp_fwd and
    # swa_fwd at 64k, well ahead of the old default 64 x 32 on 8 warps
    # (NOTES v10). Where it does not fit (qk = v = 256: 256 KB), the old
    # default.
    if flash_fwd_shared_bytes(128, 64, 3, qk_pad, v_pad) <= SM90_SHARED_PER_BLOCK:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def _topk_chunking(cmp_block: int, cmp_stride: int, slc_block: int) -> tuple:
    """(blocks per chunk, the same padded for the dot, compressed tokens per chunk)
    for the streamed scoring.

    The chunk's compressed tokens are those starting inside its blocks; a token
    can reach past the chunk's end by cmp_block - cmp_stride positions, so a
    chunk must span at least that many positions for the overlap to come only
    from this chunk's and the previous chunk's tokens. About 64 tokens per
    chunk keeps the [rows, tokens] probability tile small in registers; the
    block dimension is padded to the 16 a dot needs.
    """
    need = max(_topk_min_chunk_blocks(cmp_block, cmp_stride, slc_block), -(-64 // (slc_block // cmp_stride)))
    return _topk_chunk_shape(next_pow2(need), cmp_stride, slc_block)


def _topk_min_chunk_blocks(cmp_block: int, cmp_stride: int, slc_block: int) -> int:
    """The fewest blocks a scoring chunk may hold: a compressed token reaches
    cmp_block - cmp_stride positions past the chunk it starts in, and only
    the next chunk may receive it."""
    return max(1, -(-(cmp_block - cmp_stride) // slc_block))


# The block scoring tiles TOPK_TOKENS positions x GROUP_ROWS heads: one
# product of 16 to 256 rows per chunk (so the checker refuses groups of
# more than 256 heads where blocks are scored: heads.group.range).
TOPK_ROWS_MIN, TOPK_ROWS_MAX = MMA_MIN, MAX_SCORED_GROUP


def _topk_tokens(group_rows: int) -> int:
    """The scoring tile's positions: 16 for groups of 16 heads (256 rows), 64
    rows of positions x heads for smaller groups (the shipped records'
    choice, NOTES v7 to v13)."""
    return max(1, 256 // group_rows) if group_rows >= 16 else max(1, 64 // group_rows)


def _scoring_path(cmp_block: int, cmp_stride: int, slc_block: int, group_rows: int, tokens: int,
                  chunk_blocks: int, chunk_pad: int) -> dict:
    """The block scoring's decisions, each on wherever it is legal for the
    tile and the chunk (apply_overrides derives them again when
    TOPK_TOKENS or TOPK_CHUNK_BLOCKS change)."""
    return {
        # pairs of heads and groups of 4 positions (_topk_row_order)
        "TOPK_HEADS_IN_THREAD": int(tokens % 4 == 0 and group_rows >= 2),
        "TOPK_STRIDED_OVERLAP": int(_strided_overlap_fits(cmp_block, cmp_stride, slc_block, chunk_blocks,
                                                          chunk_pad)),
    }


def _strided_overlap_fits(cmp_block: int, cmp_stride: int, slc_block: int, chunk_blocks: int,
                          chunk_pad: int) -> bool:
    """Whether TOPK_STRIDED_OVERLAP can score this pattern: it splits each
    compressed token's weight into its own block's share and the next
    block's, reshaping a chunk's tokens as [blocks, tokens per block] with
    nothing padded: a token may reach at most one block past its own, and
    the chunk must not be padded. (The tokens per block are a power of two:
    the checker's select.block is one and a multiple of the stride.)"""
    return cmp_block <= slc_block + cmp_stride and chunk_pad == chunk_blocks


def _causal_edge_forced(cmp_block: int, cmp_stride: int, slc_block: int, local: int) -> bool:
    """True when the forced local blocks hide every compressed token a
    position cannot see yet: with TOPK_STRIDED_OVERLAP a token adds to its
    own block and the next only, so if the first token past a position's
    causal edge starts in a block the position forces (its own or one of
    the LOCAL - 1 before it), scoring may leave such tokens unmasked: what
    they add (even inf or NaN) lands only on blocks whose score is then
    overwritten (+inf forced, -inf not yet visible). The property repeats
    with the period of the stride and the block, so one period past the
    start is checked exactly."""
    if local < 1:
        return False
    period = cmp_stride * slc_block // gcd(cmp_stride, slc_block)
    for pos in range(cmp_block + slc_block * (local + 1) + period):
        # the first token whose last position (token*stride + block - 1) is past pos: the
        # number of tokens pos sees
        first_hidden = visible_compressed(pos, cmp_block, cmp_stride)
        if first_hidden * cmp_stride // slc_block < pos // slc_block - local + 1:
            return False
    return True


def _topk_chunk_shape(blocks: int, cmp_stride: int, slc_block: int) -> tuple:
    """(blocks, blocks padded for the dot, compressed tokens) of a chunk."""
    return blocks, max(MMA_MIN, blocks), blocks * (slc_block // cmp_stride)


def make_plan(pattern: Pattern, warnings: tuple = ()) -> Plan:
    """Decide the kernels for a pattern the checker accepted."""
    p = pattern
    qk_pad, v_pad = next_pow2(p.dims.qk), next_pow2(p.dims.v)
    g = p.group
    group_rows = next_pow2(g)
    combined = p.combined_branches
    shared = (
        ("HQ", p.heads.q),
        ("HKV", p.heads.kv),
        ("G", g),
        ("D_QK", p.dims.qk),
        ("D_V", p.dims.v),
        ("D_QK_PAD", qk_pad),
        ("D_V_PAD", v_pad),
        # fp32 operands multiply in full precision (tf32 would cost ~1e-3 of
        # relative accuracy); bf16/fp16 operands use the tensor cores anyway.
        ("DOT_PRECISION", "ieee"),
    )
    kernels = []
    notes = []
    static = False
    bc_from = None
    d_max = max(qk_pad, v_pad)
    bm, bn, warps, stages = _attention_tiles(qk_pad, v_pad)

    if p.compress is not None:
        c = p.compress
        if c.pool.value == "mean":
            kernels.append(KernelPlan(
                "cmp_pool", "cmp_pool.py.jinja",
                f"mean-pool k and v over blocks of {c.block} tokens every {c.stride} into k_cmp, v_cmp",
                "(cdiv(Tc, POOL_BLOCK_C), B*HKV)",
                (("CMP_BLOCK", c.block), ("CMP_STRIDE", c.stride), ("POOL_BLOCK_C", 16)),
                num_warps=4, num_stages=1))
        need_cmp_out = Branch.CMP in combined
        kernels.append(KernelPlan(
            "cmp_fwd", "cmp_fwd.py.jinja",
            "attention over the compressed tokens whose whole block lies in the query's past"
            + ("" if need_cmp_out else " (statistics only: cmp is not combined, its lse ranks blocks)"),
            "(cdiv(T, CMP_BLOCK_M), B*HQ)",
            (("CMP_BLOCK", c.block), ("CMP_STRIDE", c.stride), ("CMP_BLOCK_M", bm), ("CMP_BLOCK_N", bn),
             ("CMP_WRITE_O", need_cmp_out),
             # CMP_TMA: k and v through tensor descriptors (TMA copies on
             # Hopper) instead of per-thread addressed loads where the
             # tensors allow it (launch._tma_fits), else pointers (NOTES v12).
             ("CMP_TMA", 1)),
            num_warps=warps, num_stages=stages))

    if p.select is not None:
        s = p.select
        static = s.is_static
        npad = next_pow2(s.top)
        if static:
            kernels.append(KernelPlan(
                "slc_topk", "slc_topk.py.jinja",
                f"static selection: the forced blocks ({s.initial} initial, {s.local} local) by formula, no scoring",
                "(cdiv(T, TOPK_BLOCK_M), B*HKV)",
                (("SLC_BLOCK", s.block), ("TOP", s.top), ("TOP_PAD", npad), ("INITIAL", s.initial),
                 ("LOCAL", s.local), ("STATIC_SELECTION", True), ("TOPK_BLOCK_M", 16),
                 ("TOPK_CHUNK_BLOCKS", 16), ("TOPK_CHUNK_BLOCKS_PAD", 16)),
                num_warps=4, num_stages=1))
            notes.append("top == initial + local: the selected blocks are fixed, no block scoring is generated")
        else:
            c = p.compress
            chunk_blocks, chunk_pad, chunk_tokens = _topk_chunking(c.block, c.stride, s.block)
            tokens = _topk_tokens(group_rows)
            scoring = _scoring_path(c.block, c.stride, s.block, group_rows, tokens, chunk_blocks, chunk_pad)
            kernels.append(KernelPlan(
                "slc_topk", "slc_topk.py.jinja",
                f"block importance from the compressed probabilities (overlap-weighted, summed over the G={g}"
                f" heads of a group) and top-{s.top} with forced blocks, streamed in chunks of {chunk_blocks} blocks;"
                f" a tile is {tokens} position(s) x the group's heads padded to {group_rows}",
                "(cdiv(T, TOPK_TOKENS), B*HKV)",
                (("SLC_BLOCK", s.block), ("TOP", s.top), ("TOP_PAD", npad), ("INITIAL", s.initial),
                 ("LOCAL", s.local), ("STATIC_SELECTION", False), ("TOPK_BLOCK_M", 16),
                 ("CMP_BLOCK", c.block), ("CMP_STRIDE", c.stride), ("TOPK_CHUNK_BLOCKS", chunk_blocks),
                 ("TOPK_CHUNK_BLOCKS_PAD", chunk_pad), ("TOPK_CHUNK_TOKENS", chunk_tokens),
                 # The group's heads as rows (TOPK_TOKENS positions x
                 # GROUP_ROWS), scored keys-major: [tokens, rows] = K_chunk @
                 # q^T, q loaded once (NOTES v7, v8).
                 ("TOPK_TOKENS", tokens), ("GROUP_ROWS", group_rows),
                 # The decisions below are _scoring_path's, from legality.
                 # TOPK_HEADS_IN_THREAD: rows ordered so that a thread holds
                 # whole groups of heads (_topk_row_order), the head sum
                 # without shuffles; needs TOPK_TOKENS % 4 == 0 and 2+ heads
                 # (NOTES v13).
                 ("TOPK_HEADS_IN_THREAD", scoring["TOPK_HEADS_IN_THREAD"]),
                 # TOPK_TMA: the compressed keys through a tensor descriptor
                 # where they allow it (launch._tma_fits), else pointers (NOTES v12).
                 ("TOPK_TMA", 1),
                 # TOPK_STRIDED_OVERLAP: the overlap weights as the per-block
                 # pattern they are (in-thread sums, one shift), not two
                 # float32 products a chunk; where _strided_overlap_fits (NOTES v8).
                 ("TOPK_STRIDED_OVERLAP", scoring["TOPK_STRIDED_OVERLAP"]),
                 # With TOPK_STRIDED_OVERLAP, skip the per-element causal
                 # mask of the scores where the forced local blocks hide the
                 # causal edge (_causal_edge_forced). Derived from the pattern.
                 ("TOPK_EDGE_FORCED", _causal_edge_forced(c.block, c.stride, s.block, s.local))),
                # The running top set is sorted keys merged by a bitonic
                # network (no data-dependent loop), so the chunk loop
                # pipelines: 3 stages (NOTES v9). The keys are int32 for
                # 16-bit inputs up to 2^launch.KEY32_MAX_BLOCK_BITS blocks,
                # else int64, chosen at run time (NOTES v13). Wide chunks
                # (64 blocks for moba_like) spilled with 4 warps.
                num_warps=8 if chunk_pad >= 64 else 4, num_stages=3))
        # Several neighbouring positions per program fill the MMA tile when
        # the group is small (they share most of their selected blocks).
        slc_tokens = max(1, 64 // group_rows)
        kernels.append(KernelPlan(
            "slc_fwd", "slc_fwd.py.jinja",
            f"attention over the {s.top} selected blocks of {s.block} tokens; group-centric: one program per"
            f" {slc_tokens} position(s) and KV head, rows = (position, query head) with the G={g} heads padded"
            f" to {group_rows}, each block of the tile's union loaded once",
            "(cdiv(T, SLC_TOKENS), B*HKV)",
            (("SLC_BLOCK", s.block), ("TOP", s.top), ("TOP_PAD", npad), ("GROUP_ROWS", group_rows),
             ("SLC_TOKENS", slc_tokens),
             # 1: build the union as a list and loop over it with a counted
             # loop Triton can software-pipeline, instead of the while-walk
             # (same blocks, same order). Off, tunable where SLC_TOKENS *
             # TOP_PAD <= SLC_LIST_MAX: the list's [pool, pool] comparisons
             # against a loop that pipelines; with 3 stages it wins for
             # paper128 at 8k and 64k (NOTES v6), loses for deepseek_nsa at
             # 64k (NOTES v10).
             ("SLC_FWD_LIST", 0),
             # The selection forward's loop order: -1 the cost model's choice
             # by length (block_centric_from), 0 group-centric, 1
             # block-centric at every length. Tunable, so the tuner can
             # settle a length bucket by measuring both orders (NOTES v9,
             # v10).
             ("SLC_FWD_ORDER", -1),
             # 1: the selected blocks through tensor descriptors, one
             # constant for both orders. Group-centric it wins (paper128 at
             # 8k, deepseek_nsa at 64k: NOTES v13; those records take it),
             # block-centric it loses (slc_fwd_bc's comment)
             ("SLC_TMA", 0))
            # 1: the same program also computes the window branch for its
            # rows (o_swa, lse_swa) and swa_fwd is not launched: q is read
            # once and each window key tile serves the group's heads
            # together. Only with a window. It trades more window K/V bytes
            # through L2 (the selection's smaller tiles) for one launch and
            # one q read: faster for paper128 at 8k and 64k (NOTES v8);
            # paper128's records set it.
            + ((("SLC_FWD_WINDOW", 0),) if p.window is not None else ()),
            # 4 warps: at d <= 128 8 doubled the time (NOTES v2); at
            # deepseek_nsa's 192 the tuner took 4 too (NOTES v7).
            num_warps=4, num_stages=2))
        # The block-centric alternative (always generated, so compile(slc_fwd=)
        # can pick either; only the launched one is compiled by Triton).
        bc_tokens = max(1, 64 // group_rows)
        bc_chunk = 16 * bc_tokens
        # per position: 16-bit partial outputs (float32 inputs take twice that)
        part_bytes = p.heads.q * s.top * (p.dims.v * 2 + 4)
        bc_slice = max(s.block, (BC_PARTIAL_BYTES // part_bytes) // s.block * s.block)
        kernels.append(KernelPlan(
            "slc_fwd_bc", "slc_fwd_bc.py.jinja",
            f"attention over the selected blocks, block-centric: one program per chunk of up to {bc_chunk}"
            f" positions that chose a (KV head, block), {bc_tokens} position(s) x {group_rows} rows per tile;"
            " each (position, slot) row's result stored normalised with its log-sum-exp, then a reduction over"
            f" the {s.top} slots (no atomics); slices of {bc_slice} positions bound the partials' memory",
            "(chunks of the inverted index,), then (cdiv(B*TS*HQ, BC_REDUCE_ROWS),), per slice",
            (("SLC_BLOCK", s.block), ("TOP", s.top), ("TOP_PAD", npad), ("GROUP_ROWS", group_rows),
             ("BC_TOKENS", bc_tokens), ("BC_CHUNK", bc_chunk),
             # slc_fwd_bc_reduce: rows a program, and the stages of its slot
             # loop (32 rows on 2 stages measured best of 32 / 64, NOTES v9)
             ("BC_REDUCE_ROWS", 32), ("BC_REDUCE_STAGES", 2),
             # (batch element, position) pairs per slice: the per-slot
             # partials of a slice take about BC_PARTIAL_BYTES
             ("BC_SLICE", bc_slice),
             # slc_index_keys (the inverted index's sort keys, forward and
             # backward): index rows a program; the forced blocks' rule
             ("INDEX_ROWS", 64), ("INITIAL", s.initial), ("LOCAL", s.local),
             # 1: slc_fwd_bc reads its block's k and v through tensor
             # descriptors where they allow it (launch._tma_fits), as CMP_TMA.
             # Slower here: the descriptors cost registers, so 2 programs an
             # SM instead of 3 (sm_90: NOTES v12; timed: NOTES v13), and the
             # block-centric records leave it off (slc_fwd's comment: where
             # it wins).
             ("SLC_TMA", 0))
            # 1: the window branch is computed by the slot reduction's
            # programs (slc_fwd_bc_merge_window: BC_WINDOW_TOKENS positions x
            # the group's heads a tile, as the group-centric fold) and
            # swa_fwd is not launched: q read once for both, no o_swa round
            # trip for the gated output. Timed (NOTES v10): a tie with
            # swa_fwd apart for paper128 at 64k (the two kinds of work did
            # not overlap), so off unless a tuned record sets it (paper128's
            # 64k record does).
            + ((("BC_FOLD_WINDOW", 0), ("BC_WINDOW_TOKENS", max(1, 64 // group_rows)),
                # 1 (with BC_FOLD_WINDOW, indices from the plan's own
                # scoring, which always holds every visible forced block):
                # the forced blocks (initial, local) are attended by the
                # merge's programs, whose consecutive positions share them,
                # instead of one partial per position and forced block in
                # slc_fwd_bc: (initial + local) / top of the partials'
                # traffic moves to one tile loop a program. It trades
                # slc_fwd_bc's time (faster) for the merge's (slower): a small
                # net win for paper128 at 64k (NOTES v11). Off in the plan;
                # paper128's 64k record sets it.
                ("BC_MERGE_FORCED", 0),
                # 1: the merge reads the forced blocks' k and v through
                # tensor descriptors (as SLC_TMA): fewer registers, no spill
                # (sm_90: NOTES v12) and a faster merge for paper128 at 64k
                # (NOTES v13); its 64k record takes it.
                ("BC_FORCED_TMA", 0),
                # 1 (with BC_MERGE_FORCED, the window reading the selection's
                # own k and v): the local blocks lie inside the window, so
                # the merge scores their key tiles once for both branches
                # (_bc_window_forced): LOCAL of the forced blocks' QK^T and
                # k/v loads gone. Needs the window at least LOCAL blocks
                # long, BC_WINDOW_TOKENS and SWA_BLOCK_N dividing the block
                # (checked where it is set). A faster merge and forward for
                # paper128 at 64k (NOTES v14); its 64k record takes it.
                ("BC_LOCAL_IN_WINDOW", 0),
                # warps of slc_fwd_bc_merge_window (the slot loop and the
                # window's tiles), apart from slc_fwd_bc's
                ("BC_MERGE_WARPS", 4 if d_max <= 128 else 8))
               if p.window is not None else ()),
            num_warps=4 if d_max <= 128 else 8, num_stages=1))
        # Both orders were measured on the H200 (NOTES v9); the
        # cost model, calibrated there, picks by length (SLC_FWD_ORDER or
        # compile(slc_fwd=...) overrides it).
        orders = {T: selection_loop_bytes(p, group_rows, slc_tokens, bc_chunk, T) for T in LOOP_ORDER_LENGTHS}
        bc_from = block_centric_from(orders)
        if bc_from is None:
            notes.append(f"selection forward loop order: group-centric at every length, by the cost model"
                         f" ({orders[max(orders)].why})")
        else:
            notes.append(f"selection forward loop order: group-centric below T={bc_from}, block-centric from"
                         f" it, by the cost model ({orders[bc_from].why})")
        notes[-1] += "; compile(..., slc_fwd='group-centric' | 'block-centric') overrides"

    if p.window is not None:
        kernels.append(KernelPlan(
            "swa_fwd", "swa_fwd.py.jinja",
            f"sliding-window attention over the last {p.window.size} positions",
            "(cdiv(T, SWA_BLOCK_M), B*HQ)",
            # SWA_TMA: k and v through tensor descriptors where they allow
            # it, else pointers, as CMP_TMA (NOTES v12).
            (("WINDOW", p.window.size), ("SWA_BLOCK_M", bm), ("SWA_BLOCK_N", bn), ("SWA_TMA", 1)),
            num_warps=warps, num_stages=stages))

    kernels.append(KernelPlan(
        "combine", "combine.py.jinja",
        "gated sum of the branch outputs: " + " + ".join(f"g_{b.value}*o_{b.value}" for b in combined),
        "(cdiv(B*T*HQ, COMBINE_ROWS),)",
        (("COMBINE_ROWS", 64), ("COMBINE_CMP", Branch.CMP in combined), ("COMBINE_SLC", Branch.SLC in combined),
         ("COMBINE_SWA", Branch.SWA in combined)),
        # 8 warps: 4 spilled in an sm_90 report compiled without the launch's
        # stride specialization (NOTES v2); with it they do not. 4 against 8
        # warps was not timed.
        num_warps=8, num_stages=1))

    kernels.extend(_backward_kernels(p, d_max, group_rows))
    kernels.extend(_decode_kernels(p))
    slc_dkdv = "inverted-index" if Branch.SLC in combined else None
    if slc_dkdv:
        notes.append("selection dK/dV: block-centric over an inverted block -> positions index (deterministic);"
                     " float32 atomics from the query side are the alternative (compile(..., deterministic=False,"
                     " slc_dkdv='atomic'))")
    if qk_pad != p.dims.qk or v_pad != p.dims.v:
        notes.append(f"head dims are padded to powers of two in registers (qk {p.dims.qk}->{qk_pad},"
                     f" v {p.dims.v}->{v_pad}); memory traffic stays at the declared size")
    return Plan(p, tuple(kernels), shared, qk_pad, v_pad, group_rows, bc_from, static,
                slc_dkdv, tuple(warnings), tuple(notes))


def _decode_kernels(p: Pattern) -> list:
    """The decode step's kernels, one new query per sequence against a
    cache, in launch order: dec_append (the new key and value, the
    compressed token it completes, the length), dec_cmp (the compressed
    attention over splits of the compressed tokens, keeping raw scores or,
    DEC_BLOCK_SUMS, block sums),
    dec_topk (block scores and each chunk's own top-n), dec_attend (each
    selected block and window tile into a softmax partial) and dec_reduce
    (the branches merged and gated). Only where the pattern has a selection
    or a window."""
    if p.select is None and p.window is None:
        return []
    keys = p.select.block if p.select is not None else max(16, min(64, next_pow2(p.window.size)))
    slc_items = p.select.top if p.select is not None else 0
    ranked = p.select is not None and p.compress is not None
    # a ranked selection's block scores: R compressed tokens start in each
    # selection block, each overlapping the blocks after its own by BACK
    # tokens, so a token weighs in SUM_PLANES blocks. DEC_BLOCK_SUMS:
    # dec_cmp leaves block sums, not raw scores, wherever its tile holds
    # whole blocks (DEC_CMP_N >= R, checked with the overrides); raw scores
    # where it cannot. Block sums: all kernels 183.7 -> 171.6 us at 64k x
    # 29, 179.9 -> 159.1 at 128k x 14, 26.1 -> 25.5 at 32k x 1 (H100,
    # NOTES v24)
    r = p.select.block // p.compress.stride if ranked else 1
    back = p.compress.block // p.compress.stride - 1 if ranked else 0
    sums = ((("R", r), ("BACK", back), ("SUM_PLANES", 1 + -(-back // r))) if ranked else ())
    win_items = -(-p.window.size // keys) if p.window is not None else 0
    combined = p.combined_branches
    return [KernelPlan(
        "dec_attend", "decode.py.jinja",
        "decode step: the new key appended (and the compressed token it completes), the compressed attention"
        " over splits, each chunk of blocks scored and its top-n, each selected block and window tile of the"
        " new query's KV head (its G heads as rows) into a softmax partial, merged and gated",
        "append (B,); cmp (B*HKV, splits); topk (B*HKV, chunks); attend (B*HKV, items / SPAN);"
        " reduce (B*HKV,)",
        (("DEC_ROWS", max(16, next_pow2(p.group))), ("DEC_KEYS", keys), ("DEC_SLC_ITEMS", slc_items),
         ("DEC_WIN_ITEMS", win_items),
         ("DEC_WINDOW", p.window.size if p.window else 0), ("DEC_HKV_PAD", next_pow2(p.heads.kv)),
         # dec_reduce: every partial of a branch in one tile, DEC_RED_D value
         # columns per program (a [partials, rows, columns] tile in registers)
         # (its tiles' partial counts come with each launch: launch_decode.decode_step)
         ("DEC_RED_D", min(16, next_pow2(p.dims.v))), ("DEC_MAX_SPLITS", 16),
         # dec_reduce on one warp and 16 value columns a program (NOTES v22:
         # 4 warps on 32 left a batch of one 16 programs; 2.8 us less at 32k)
         ("DEC_REDUCE_WARPS", 1),
         # dec_topk: its warps, and about how many chunks of blocks a cache's
         # length makes per KV head (launch_decode.topk_chunks): 32 against
         # 16, dec_topk 42.8 -> 41.9 us at 64k x 29, 57.9 -> 51.8 at 128k x
         # 14, 9.9 -> 8.0 at 32k x 1 (H100, NOTES v23)
         ("DEC_TOPK_WARPS", 4), ("DEC_TOPK_CHUNKS", 32),
         # programs per processor that dec_cmp's splits and dec_attend's
         # items per program aim for (launch_decode.cmp_splits, attend_span)
         ("DEC_CMP_PROGRAMS_PER_SM", 1), ("DEC_ATTEND_PROGRAMS_PER_SM", 2),
         # programmatic dependent launch of the step's kernels on sm_90 for
         # steps of at most this many sequences (launch_decode.pdl_launch):
         # batch 1, 3-7% faster at 32k-128k; the 4 GB batches (14-59
         # sequences) 4-6% slower with it (H100, NOTES v25)
         ("DEC_PDL_MAX_BATCH", 1),
         ("DEC_HAS_SLC", Branch.SLC in combined), ("DEC_HAS_SWA", Branch.SWA in combined),
         ("DEC_CMP", Branch.CMP in combined),
         # dec_cmp: tiles of DEC_CMP_N compressed tokens (DEC_CMP_STAGES deep),
         # at most DEC_MAX_SPLITS splits of a multiple of it chosen per launch
         # (launch_decode.cmp_splits); dec_topk: chunks
         # of blocks sized per cache (launch_decode.topk_chunks; DEC_SCORES: a
         # ranked selection); NB_NONE: the block id after every real one
         ("DEC_HAS_CMP_KERNELS", p.compress is not None), ("DEC_SCORES", ranked),
         ("DEC_CMP_N", 64), ("DEC_CMP_STAGES", 3), ("DEC_BLOCK_SUMS", int(ranked and r <= 64)),
         ("NB_NONE", 1 << 30))
        + sums
        + ((("CMP_BLOCK", p.compress.block), ("CMP_STRIDE", p.compress.stride)) if p.compress is not None else ())
        + ((("SLC_BLOCK", p.select.block), ("TOP", p.select.top), ("TOP_PAD", next_pow2(p.select.top)),
            ("INITIAL", p.select.initial), ("LOCAL", p.select.local)) if p.select is not None else ()),
        num_warps=4, num_stages=1, direction="decode")]


def _backward_tiles(d_pad: int) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps) of the flash-style backward kernels: the
    key-side kernel keeps dK and dV of BLOCK_N keys in registers.

    At d <= 128: 64x64 tiles on 4 warps, measured by `nsa-dsl tune`
    (paper128, NOTES v4): 4 warps alone beat 8 for cmp_bwd, slc_bwd and
    swa_bwd, and 64x64 beat every other tile at 4 warps at 8k and 64k. The
    earlier 32x64 on 8 warps was chosen to avoid register spills and was the
    slower one: 64 rows on one warpgroup let Triton use Hopper's wgmma
    (results/sm90_report.txt: HGMMA 20-24 per kernel, ~300 B of spills in
    dK/dV, against HMMA only and none).

    Wider heads (deepseek_nsa, qk=192 padded to 256): 64x32 on 4 warps,
    measured by the tuner at 64k only (NOTES v7): both 4 warps and then
    64x32 tiles beat the earlier 32x32 on 8 warps for cmp_bwd and swa_bwd.
    Not measured at 8k-32k."""
    if d_pad <= 128:
        return 64, 64, 4
    return 64, 32, 4


def _backward_kernels(p: Pattern, d_max: int, group_rows: int) -> list:
    """Backward kernels, only for the branches whose output is combined (a
    compress branch kept only for ranking gets no gradient: none flows
    through the block scores)."""
    combined = p.combined_branches
    bm, bn, warps = _backward_tiles(d_max)
    kernels = [KernelPlan(
        "bwd_prep", "bwd_prep.py.jinja",
        "gate gradients rowsum(dO * o_x) and each branch's softmax-backward term delta_x = g_x * rowsum(dO * o_x)",
        "(cdiv(B*T*HQ, COMBINE_ROWS),)",
        (("COMBINE_ROWS", 64), ("COMBINE_CMP", Branch.CMP in combined), ("COMBINE_SLC", Branch.SLC in combined),
         ("COMBINE_SWA", Branch.SWA in combined)),
        num_warps=8, num_stages=1, direction="backward")]
    if Branch.CMP in combined:
        c = p.compress
        kernels.append(KernelPlan(
            "cmp_bwd", "cmp_bwd.py.jinja",
            "compressed attention backward: cmp_bwd_dq per query tile and head; cmp_bwd_dkdv per tile of"
            " compressed tokens and query head (partials summed over the group)",
            "dq (cdiv(T, CMP_BWD_BLOCK_M), B*HQ); dkdv (cdiv(Tc, CMP_BWD_DKDV_BLOCK_N), B*HQ)",
            (("CMP_BLOCK", c.block), ("CMP_STRIDE", c.stride), ("CMP_BWD_BLOCK_M", bm), ("CMP_BWD_BLOCK_N", bn),
             # the dK/dV kernel's own key tile and warps (its dK, dV
             # accumulators want other shapes than dq's tiles): 128 keys
             # (64 at d > 128) on 8 warps, as every shipped 64k record took
             # (NOTES v7, v17)
             ("CMP_BWD_DKDV_BLOCK_N", 128 if d_max <= 128 else 64), ("CMP_BWD_DKDV_WARPS", 8),
             # Few compressed keys, each seen by every later row: one program
             # per query head (not per KV head) keeps the GPU busy.
             ("CMP_BWD_SPLIT_HEADS", p.group > 1),
             # The dq kernel's own pipeline stages; the launch's num_stages
             # stays the dK/dV kernel's, whose 128-key tiles lost on 2
             # (NOTES v25). 2 for dq: paper128's training pass at 64k on an
             # H100 133.2 -> 130.3 ms (cmp_bwd_dq 16.73 -> 12.50, swa_bwd_dq
             # 6.39 -> 5.64; 3 stages gained nothing; NOTES v26), and the
             # deepseek_nsa and small_group records took 2 for the whole
             # kernel. Float32 inputs drop to fewer where 2 do not fit
             # (launch._launch_fitting).
             ("CMP_BWD_DQ_STAGES", 2)),
            num_warps=warps, num_stages=1, direction="backward"))
        if c.pool.value == "mean":
            kernels.append(KernelPlan(
                "cmp_pool_bwd", "cmp_pool_bwd.py.jinja",
                "mean-pooling backward: each position gathers dk_cmp, dv_cmp of the blocks holding it",
                "(cdiv(T, POOL_BWD_BLOCK_P), B*HKV)",
                (("CMP_BLOCK", c.block), ("CMP_STRIDE", c.stride), ("POOL_BWD_BLOCK_P", 32)),
                num_warps=4, num_stages=1, direction="backward"))
    if Branch.SLC in combined:
        s = p.select
        kernels.append(KernelPlan(
            "slc_bwd", "slc_bwd.py.jinja",
            "selection backward: slc_bwd_dq laid out like the forward; slc_bwd_dkdv per selection block and KV"
            " head over the positions that chose it",
            "dq (cdiv(T, SLC_BWD_DQ_TOKENS), B*HKV); dkdv (chunks of SLC_BWD_CHUNK positions,); reduce (B*HKV*blocks,)",
            (("SLC_BLOCK", s.block), ("TOP", s.top), ("TOP_PAD", next_pow2(s.top)), ("GROUP_ROWS", group_rows),
             # slc_bwd_dq: a group of 16+ heads at d <= 128 runs one position
             # a program (its own blocks, no union to mask: 16 rows, one MMA
             # tile) on 2 warps, its list loop prefetched 3 deep, k and v
             # through descriptors: 28.10 -> 17.15 ms at 64k on the H100
             # against 4 positions x 16 heads on 4 warps (NOTES v25).
             # Otherwise 64 query rows a tile at d <= 128, 16 for wider
             # heads, walking the union on 4 warps (each block load serves
             # that many rows; the records of small_group took 64, NOTES v17).
             # (The list where its [pool, pool] comparisons fit: TOP_PAD <=
             # SLC_LIST_MAX; the walk past that.)
             *((("SLC_BWD_DQ_TOKENS", 1), ("SLC_BWD_DQ_LIST", int(next_pow2(s.top) <= SLC_LIST_MAX)),
                ("SLC_BWD_DQ_WARPS", 2),
                ("SLC_BWD_DQ_STAGES", 3), ("SLC_BWD_DQ_TMA", 1))
               if group_rows >= 16 and d_max <= 128 else
               (("SLC_BWD_DQ_TOKENS", max(1, (64 if d_max <= 128 else 16) // group_rows)),
                # 1: the union as a list (SLC_FWD_LIST's pipelinable loop)
                ("SLC_BWD_DQ_LIST", 0),
                # slc_bwd_dq's own warps, the stages its list loop prefetches,
                # and (1) k and v through tensor descriptors (TMA on Hopper;
                # fixed-length calls, where k and v allow it)
                ("SLC_BWD_DQ_WARPS", 4), ("SLC_BWD_DQ_STAGES", 1), ("SLC_BWD_DQ_TMA", 0))),
             # Positions per dK/dV tile: 32 rows, and at least 4 positions
             # (64 rows at most) where the group is large, as the G=16
             # records took (NOTES v17): a block's positions share its loads.
             ("SLC_BWD_TOKENS", max(1, 32 // group_rows, min(4, 64 // group_rows))),
             # 1: slc_bwd_dkdv computes S^T = K Q^T ([keys, rows]), so P^T and
             # dS^T need no register transpose (the flash-style dK/dV kernels'
             # change, NOTES v7): fewer barriers and spills. For the
             # selection: faster for paper128 at 64k, within the noise at 8k
             # (NOTES v8, v17).
             ("SLC_BWD_KEYS_MAJOR", 1),
             # Positions per dK/dV chunk: a block chosen by every position is
             # split over T / SLC_BWD_CHUNK programs, reduced in order after.
             ("SLC_BWD_CHUNK", 1024)),
            # 4 warps: measured at d <= 128, as _backward_tiles says, and at
            # deepseek_nsa's 192 (the tuner took 4 over 8 at 64k, NOTES v7)
            num_warps=4, num_stages=1, direction="backward"))
    if Branch.SWA in combined:
        kernels.append(KernelPlan(
            "swa_bwd", "swa_bwd.py.jinja",
            "sliding-window backward: swa_bwd_dq per query tile and head; swa_bwd_dkdv per key tile and KV head",
            "dq (cdiv(T, SWA_BWD_BLOCK_M), B*HQ); dkdv (cdiv(T, SWA_BWD_DKDV_BLOCK_N), B*HKV)",
            (("WINDOW", p.window.size), ("SWA_BWD_BLOCK_M", bm), ("SWA_BWD_BLOCK_N", bn),
             ("SWA_BWD_DKDV_BLOCK_N", bn), ("SWA_BWD_DKDV_WARPS", warps),
             ("SWA_BWD_SPLIT_HEADS", False), ("SWA_BWD_DQ_STAGES", 2),  # as CMP_BWD_DQ_STAGES
             # (derived) the compressed branch is combined too: its dq and
             # the window's may run as one kernel (cmp_swa_bwd_dq, rendered
             # here; Plan.dq_with_compressed says where it runs)
             *((("SWA_BWD_HAS_CMP", 1),) if Branch.CMP in combined else ())),
            num_warps=warps, num_stages=1, direction="backward"))
    return kernels


def _pow2_at_least(lo: int):
    def ok(value: int) -> bool:
        return value >= lo and value & (value - 1) == 0
    ok.__doc__ = f"a power of two >= {lo}"
    return ok


def _positive(value: int) -> bool:
    return value >= 1


_positive.__doc__ = "a positive integer"


def _nonnegative(value: int) -> bool:
    return value >= 0


_nonnegative.__doc__ = "an integer >= 0"


# SLC_FWD_LIST builds its list with [pool, pool] comparisons in registers.
SLC_LIST_MAX = 256


def _warps(value: int) -> bool:
    return value in (4, 8)


_warps.__doc__ = "4 or 8 (warps of a kernel that is not the KernelPlan's own launch)"


def _any_warps(value: int) -> bool:
    return value in (1, 2, 4, 8)


_any_warps.__doc__ = "1, 2, 4 or 8 (warps of a launch with its own: decode's, slc_bwd_dq)"


def _flag(value: int) -> bool:
    return value in (0, 1)


_flag.__doc__ = "0 or 1"


def _order(value: int) -> bool:
    return value in (-1, 0, 1)


_order.__doc__ = "-1 (by the cost model), 0 (group-centric) or 1 (block-centric)"


def _stages(value: int) -> bool:
    return 1 <= value <= 8


_stages.__doc__ = "in 1..8 (stages of a kernel that is not the KernelPlan's own launch)"

# Constants a user (or the autotuner) may change without changing what is
# computed: tile shapes, work splits and the code-path switches. Anything
# else is the pattern's own or the plan's: the block scoring's paths and
# cmp_fwd's / swa_fwd's descriptor reads are decided from legality alone
# (_scoring_path; CMP_TMA, SWA_TMA, TOPK_TMA fall back at run time).
TUNABLE = {
    "SWA_BLOCK_M": _pow2_at_least(16), "SWA_BLOCK_N": _pow2_at_least(16),
    "CMP_BLOCK_M": _pow2_at_least(16), "CMP_BLOCK_N": _pow2_at_least(16),
    "SWA_BWD_BLOCK_M": _pow2_at_least(16), "SWA_BWD_BLOCK_N": _pow2_at_least(16),
    "CMP_BWD_BLOCK_M": _pow2_at_least(16), "CMP_BWD_BLOCK_N": _pow2_at_least(16),
    "SWA_BWD_DKDV_BLOCK_N": _pow2_at_least(16), "CMP_BWD_DKDV_BLOCK_N": _pow2_at_least(16),
    "SWA_BWD_DKDV_WARPS": _warps, "CMP_BWD_DKDV_WARPS": _warps,
    "SWA_BWD_DQ_STAGES": _stages, "CMP_BWD_DQ_STAGES": _stages,
    "TOPK_BLOCK_M": _pow2_at_least(16), "SLC_TOKENS": _pow2_at_least(1), "SLC_BWD_TOKENS": _pow2_at_least(1),
    "SLC_BWD_DQ_TOKENS": _pow2_at_least(1), "BC_REDUCE_ROWS": _pow2_at_least(1), "BC_REDUCE_STAGES": _stages,
    "SLC_FWD_LIST": _flag, "SLC_FWD_WINDOW": _flag, "BC_FOLD_WINDOW": _flag,
    "BC_MERGE_FORCED": _flag, "SLC_TMA": _flag, "BC_FORCED_TMA": _flag, "BC_LOCAL_IN_WINDOW": _flag,
    "SLC_FWD_ORDER": _order, "SLC_BWD_DQ_LIST": _flag, "SLC_BWD_KEYS_MAJOR": _flag,
    "SLC_BWD_DQ_WARPS": _any_warps, "SLC_BWD_DQ_STAGES": _stages, "SLC_BWD_DQ_TMA": _flag,
    "TOPK_TOKENS": _pow2_at_least(1),
    "SLC_BWD_CHUNK": _positive,
    "DEC_REDUCE_WARPS": _any_warps, "DEC_TOPK_WARPS": _any_warps, "DEC_TOPK_CHUNKS": _pow2_at_least(1),
    "DEC_CMP_PROGRAMS_PER_SM": _positive, "DEC_ATTEND_PROGRAMS_PER_SM": _positive,
    "DEC_RED_D": _pow2_at_least(8), "DEC_PDL_MAX_BATCH": _nonnegative, "DEC_BLOCK_SUMS": _flag, "DEC_CMP_N": _pow2_at_least(16),
    "DEC_CMP_STAGES": _stages,
}

# The plan's own sizes that no tuned record sets are not tunable (NOTES
# v15): BC_TOKENS, BC_CHUNK, BC_SLICE, BC_WINDOW_TOKENS, BC_MERGE_WARPS,
# INDEX_ROWS, POOL_BLOCK_C, COMBINE_ROWS, TOPK_CHUNK_BLOCKS. Tests run
# kernels at values the plan derives for other shapes through the ones
# below (tests/strategies.py: derived_overrides lets apply_overrides take
# them, under the same checks).
DERIVED = {
    "BC_SLICE": _positive, "BC_WINDOW_TOKENS": _pow2_at_least(1),
    # blocks scored per chunk by slc_topk (the chunk's padding and token
    # count follow, and _scoring_path decides again)
    "TOPK_CHUNK_BLOCKS": _pow2_at_least(1),
}


def apply_overrides(plan: Plan, overrides: dict) -> Plan:
    """A copy of the plan with tunable constants replaced, e.g.
    {"SLC_TOKENS": 8, "slc_fwd.num_warps": 8}. Unknown names and invalid
    values are errors, never ignored."""
    consts, launch = {}, {}
    for name, value in overrides.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"override {name}: expected an int, got {value!r}")
        if "." in name:
            kernel, setting = name.split(".", 1)
            if setting not in ("num_warps", "num_stages") or kernel not in plan.kernel_names:
                raise ValueError(f"override {name}: expected <kernel>.num_warps or <kernel>.num_stages with a kernel"
                                 f" among {', '.join(plan.kernel_names)}")
            if setting == "num_warps" and value not in (1, 2, 4, 8, 16):
                raise ValueError(f"override {name}: num_warps must be 1, 2, 4, 8 or 16, got {value}")
            if setting == "num_stages" and not 1 <= value <= 8:
                raise ValueError(f"override {name}: num_stages must be in 1..8, got {value}")
            launch[(kernel, setting)] = value
            continue
        if name not in TUNABLE:
            raise ValueError(f"override {name}: not a tunable constant; tunable: {', '.join(sorted(TUNABLE))}")
        if not TUNABLE[name](value):
            raise ValueError(f"override {name}: must be {TUNABLE[name].__doc__}, got {value}")
        if not any(name == key for k in plan.kernels for key, _ in k.constants):
            raise ValueError(f"override {name}: no kernel of pattern {plan.pattern.name!r} uses it")
        consts[name] = value
    for flag, kernel, tokens in (("SLC_FWD_LIST", "slc_fwd", "SLC_TOKENS"),
                                 ("SLC_BWD_DQ_LIST", "slc_bwd", "SLC_BWD_DQ_TOKENS")):
        if consts.get(flag):
            k = plan.kernel(kernel)
            pool = consts.get(tokens, k.const(tokens)) * k.const("TOP_PAD")
            if pool > SLC_LIST_MAX:
                raise ValueError(f"override {flag}: the union list compares {tokens} * TOP_PAD = {pool} entries"
                                 f" pairwise; at most {SLC_LIST_MAX} (lower {tokens})")
    if "SLC_BWD_TOKENS" in consts:
        # slc_bwd_dkdv's rows are the inner (K) dimension of dV += P^T dO and
        # the N of dP^T = V dO^T: Triton's dot needs 16 there (small_group's
        # 4 tokens x 2 rows failed to compile for sm_90 in the H200 tuner)
        rows = consts["SLC_BWD_TOKENS"] * plan.kernel("slc_bwd").const("GROUP_ROWS")
        if rows < MMA_MIN:
            raise ValueError(f"override SLC_BWD_TOKENS: SLC_BWD_TOKENS x GROUP_ROWS = {rows} rows per dK/dV tile;"
                             f" the products need at least {MMA_MIN}")
    if "BC_WINDOW_TOKENS" in consts:
        rows = consts["BC_WINDOW_TOKENS"] * plan.kernel("slc_fwd_bc").const("GROUP_ROWS")
        if rows < MMA_MIN:
            raise ValueError(f"override BC_WINDOW_TOKENS: BC_WINDOW_TOKENS x GROUP_ROWS = {rows} rows per tile;"
                             f" the products need at least {MMA_MIN}")
    if "TOPK_CHUNK_BLOCKS" in consts:
        k = plan.kernel("slc_topk")
        blocks = consts["TOPK_CHUNK_BLOCKS"]
        if k.const("STATIC_SELECTION"):  # no compressed tokens: only the padding follows
            consts["TOPK_CHUNK_BLOCKS_PAD"] = max(MMA_MIN, blocks)
        else:
            cmp_block, cmp_stride, slc_block = k.const("CMP_BLOCK"), k.const("CMP_STRIDE"), k.const("SLC_BLOCK")
            least = _topk_min_chunk_blocks(cmp_block, cmp_stride, slc_block)
            if blocks < least:
                raise ValueError(f"override TOPK_CHUNK_BLOCKS: a chunk of {blocks} blocks spans"
                                 f" {blocks * slc_block} positions, fewer than a compressed token's reach past it"
                                 f" ({cmp_block - cmp_stride}): at least {least}")
            _, consts["TOPK_CHUNK_BLOCKS_PAD"], consts["TOPK_CHUNK_TOKENS"] = _topk_chunk_shape(blocks, cmp_stride,
                                                                                                 slc_block)
    if plan.has("slc_topk") and not plan.kernel("slc_topk").const("STATIC_SELECTION"):
        k = plan.kernel("slc_topk")
        tokens = consts.get("TOPK_TOKENS", k.const("TOPK_TOKENS"))
        rows = tokens * k.const("GROUP_ROWS")
        if not TOPK_ROWS_MIN <= rows <= TOPK_ROWS_MAX:
            raise ValueError(f"override TOPK_TOKENS: TOPK_TOKENS x GROUP_ROWS = {rows} rows per tile; the product"
                             f" needs {TOPK_ROWS_MIN} to {TOPK_ROWS_MAX}")
        # the scoring's decisions follow the tile and the chunk
        consts.update(_scoring_path(k.const("CMP_BLOCK"), k.const("CMP_STRIDE"), k.const("SLC_BLOCK"),
                                    k.const("GROUP_ROWS"), tokens,
                                    consts.get("TOPK_CHUNK_BLOCKS", k.const("TOPK_CHUNK_BLOCKS")),
                                    consts.get("TOPK_CHUNK_BLOCKS_PAD", k.const("TOPK_CHUNK_BLOCKS_PAD"))))
    bc_consts = dict(plan.kernel("slc_fwd_bc").constants) if plan.has("slc_fwd_bc") else {}
    if consts.get("BC_LOCAL_IN_WINDOW", bc_consts.get("BC_LOCAL_IN_WINDOW")):
        bc, swa = plan.kernel("slc_fwd_bc"), plan.kernel("swa_fwd")
        block, local = bc.const("SLC_BLOCK"), bc.const("LOCAL")
        tokens = consts.get("BC_WINDOW_TOKENS", bc.const("BC_WINDOW_TOKENS"))
        swa_n = consts.get("SWA_BLOCK_N", swa.const("SWA_BLOCK_N"))
        # the local blocks' key tiles must be the same keys for the window
        # and the forced blocks (_bc_window_forced)
        if local < 1:
            raise ValueError("override BC_LOCAL_IN_WINDOW: the pattern forces no local blocks (local=0)")
        if swa.const("WINDOW") < local * block or block % tokens or block % swa_n:
            raise ValueError(f"override BC_LOCAL_IN_WINDOW: needs the window ({swa.const('WINDOW')}) at least LOCAL x"
                             f" the selection block ({local} x {block}), and BC_WINDOW_TOKENS ({tokens}) and"
                             f" SWA_BLOCK_N ({swa_n}) dividing the block")
    if consts.get("DEC_BLOCK_SUMS") or "DEC_CMP_N" in consts:
        dec = dict(plan.kernel("dec_attend").constants) if plan.has("dec_attend") else {}
        tile, r = consts.get("DEC_CMP_N", dec.get("DEC_CMP_N")), dec.get("R", 1)
        if consts.get("DEC_BLOCK_SUMS", dec.get("DEC_BLOCK_SUMS")) and tile is not None and tile < r:
            raise ValueError(f"override DEC_BLOCK_SUMS: dec_cmp's tile (DEC_CMP_N {tile}) must hold a whole"
                             f" selection block's {r} compressed tokens; override DEC_CMP_N to {r} too")
    if "DEC_RED_D" in consts and consts["DEC_RED_D"] > plan.v_pad:
        raise ValueError(f"override DEC_RED_D: {consts['DEC_RED_D']} value columns per dec_reduce program,"
                         f" more than the padded value width {plan.v_pad}")
    kernels = []
    for k in plan.kernels:
        constants = tuple((key, consts.get(key, value)) for key, value in k.constants)
        kernels.append(replace(k, constants=constants,
                               num_warps=launch.get((k.name, "num_warps"), k.num_warps),
                               num_stages=launch.get((k.name, "num_stages"), k.num_stages)))
    return replace(plan, kernels=tuple(kernels))
