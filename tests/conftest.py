"""Test configuration shared by every test file.

* TRITON_INTERPRET=1 is set before anything imports triton when no CUDA GPU
  is present, so kernels run on CPU tensors through Triton's interpreter.
* Hypothesis profiles: `ci` (derandomized, bounded, no deadline: a red CI is
  reproducible) is the default; `dev` draws more, randomly. Choose with
  NSA_DSL_HYPOTHESIS_PROFILE=dev.
* Tests marked `gpu` are skipped when no CUDA device is present.
* OPENBLAS_CORETYPE=Sandybridge (numpy's OpenBLAS, read when numpy first
  loads: set before anything imports it) where not set: the interpreter's
  tl.dot is numpy's matmul, and OpenBLAS's FMA kernels (Haswell, Zen) round
  a product's edge columns apart from its others (no FMA there), so equal
  block scores came out an ulp apart and "the same arithmetic" tests saw
  1-ulp differences on an AMD EPYC (NOTES v23). Sandybridge's kernels (AVX,
  no FMA) round every column alike, as the GPU's MMA does.
* One BLAS/OpenMP thread a process where not set: the interpreter's work is
  many small numpy products, which extra threads slow down (and `-n auto`
  already runs a process a core). One test, alone on 2 cores: 57 s -> 42 s.
* Under the interpreter, a @triton.jit helper called inside a kernel does
  not re-patch triton.language (_patch_device_calls_once): Triton's
  interpreter re-patches the whole language on every such call (an
  inspect.getmembers of tl, tl.tensor, tl.math per call), though the
  kernel's launch already patched it and restores it when the launch ends.
  That was a quarter of an interpreted test's time.
"""
import os
import sys

if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_CORETYPE", "Sandybridge")
for _threads in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


HAS_CUDA = _has_cuda()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _frame_padding(slots: int):
    """f(fn, *args, **kwargs) = fn(*args, **kwargs), from a frame of about
    `slots` local variables (_from_a_fresh_frame_chunk)."""
    names = [f"_{i}" for i in range(slots)]
    source = (f"def padded(fn, *args, **kwargs):\n    {' = '.join(names)} = None\n"
              "    return fn(*args, **kwargs)\n")
    scope = {}
    exec(compile(source, "<frame padding>", "exec"), scope)
    return scope["padded"]


# CPython 3.11+ keeps Python frames in 16 KiB chunks (2048 slots) and frees
# a chunk as soon as the frame at its start returns, so a call path that
# goes up and down across a chunk's edge maps and unmaps 16 KiB each time
# (a million mmap/munmap pairs in one interpreted test; where the edge falls
# depends on how deep pytest and xdist call the test: one test took 10 s
# alone and 63 s in an xdist worker). A frame of ~2040 slots before the
# launch leaves its own chunk (nearly) full, so the launch's frames start at
# the beginning of a fresh chunk and the interpreter's calls, far shallower
# than 2048 slots, go up and down inside it.
_from_a_fresh_frame_chunk = _frame_padding(2040)


def _patch_device_calls_once() -> bool:
    """Make the interpreter's device-function calls skip re-patching the
    language modules that the running kernel launch has patched already
    (module docstring). Only inside a launch (GridExecutor.__call__), and
    only where every language module the helper sees is one the launch
    patched; anywhere else, Triton's own _patch_lang. Returns whether the
    interpreter had the shape this relies on (else nothing is changed)."""
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - triton is a hard dependency
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or executor is None or scope_type is None:
        return False
    if getattr(patch_lang, "nsa_dsl_once", False):
        return True
    langs = (interpreter.tl, interpreter.tl.core)
    launches = []  # one set a kernel launch in progress: the language modules it patched
    langs_of = {}  # jit function -> the language modules its globals hold

    def patch_lang_once(fn):
        seen = langs_of.get(fn)
        if seen is None:
            seen = langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values() if any(v is x for x in langs))
        if launches and seen and seen <= launches[-1]:
            return scope_type()  # nothing to undo: the launch's own scope restores the language
        scope = patch_lang(fn)
        if launches:
            launches[-1].update(seen)
        return scope

    launch = executor.__call__

    def launch_tracked(self, *args, **kwargs):
        launches.append(set())
        try:
            return _from_a_fresh_frame_chunk(launch, self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang_once.nsa_dsl_once = True
    interpreter._patch_lang = patch_lang_once
    executor.__call__ = launch_tracked
    np_dtype = getattr(interpreter, "_get_np_dtype", None)
    block_type = getattr(interpreter.tl, "block_type", None)
    if np_dtype is not None and block_type is not None:
        # a pure map from a Triton type (a block's: its element's), its table rebuilt on each of its many calls
        np_dtypes = {}

        def np_dtype_memo(tt_dtype):
            key = tt_dtype.element_ty if isinstance(tt_dtype, block_type) else tt_dtype
            try:
                got = np_dtypes.get(key)
            except TypeError:  # pointer types have no hash
                return np_dtype(tt_dtype)
            if got is None:
                got = np_dtypes[key] = np_dtype(key)
            return got
        interpreter._get_np_dtype = np_dtype_memo
    return True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_device_calls_once()

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# No explain phase: on a failure it re-runs the (slow, interpreted) case many
# times only to annotate the report.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

_COMMON = dict(deadline=None, print_blob=True, phases=_PHASES,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=25, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
# Compiled on a GPU every drawn pattern costs a real compile: fewer draws.
settings.register_profile("gpu", derandomize=True, max_examples=6, **_COMMON)
settings.load_profile(os.environ.get("NSA_DSL_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton kernels)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
