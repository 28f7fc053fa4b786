"""Tuned records: the configurations `nsa-dsl tune` measured, per pattern,
per device and per sequence-length bucket, kept on disk beside the kernels
(and shipped with the package), and the compiled pattern that runs each call
with its bucket's record. The search that produces them is tune.py's.

A bucket is the power of two at or above T (clamped to 1k..128k), so a new
length reuses its bucket's configuration and never re-tunes.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Optional

from . import cache
from .ir import Pattern
from .plan import TUNABLE
from .varlen import max_length

MIN_BUCKET, MAX_BUCKET = 1024, 131072


def bucket_of(length: int) -> int:
    b = MIN_BUCKET
    while b < length and b < MAX_BUCKET:
        b *= 2
    return b


# Configurations tuned on real devices and committed with the package (the
# results of `nsa-dsl tune --export nsa_dsl/tuned`): used where this
# machine's cache has none, so a fresh install starts from measured tiles.
SHIPPED_DIR = Path(__file__).resolve().parent / "tuned"


def config_name(pattern: Pattern, device: str) -> str:
    digest = hashlib.sha256((pattern.canonical() + "\0" + device).encode()).hexdigest()[:24]
    return f"{pattern.name}-{digest}.json"


def config_path(pattern: Pattern, device: str) -> Path:
    return cache.cache_dir() / "tuned" / config_name(pattern, device)


def _read_configs(path: Path, pattern: Pattern, device: str) -> Optional[dict]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if raw.get("canonical") != pattern.canonical() or raw.get("device") != device:
        return None  # a hash collision or a stale file: never trust it
    return {int(b): dict(entry) for b, entry in raw.get("buckets", {}).items()}


def load_records(pattern: Pattern, device: str) -> dict:
    """{bucket: record} ("overrides", and where known "ms", "objective",
    "note") for this pattern and device: this machine's cache, else the
    configurations shipped with the package, else {}."""
    for path in (config_path(pattern, device), SHIPPED_DIR / config_name(pattern, device)):
        found = _read_configs(path, pattern, device)
        if found is not None:
            return found
    return {}


def load_configs(pattern: Pattern, device: str) -> dict:
    """{bucket: overrides} recorded for this pattern and device (see load_records)."""
    return {b: dict(record["overrides"]) for b, record in load_records(pattern, device).items()}


def save_configs(pattern: Pattern, device: str, configs: dict, timings: dict, *, objective: Optional[str] = None,
                 earlier: Optional[dict] = None) -> Path:
    """Record {bucket: overrides}; a bucket timed in this run gets its ms
    and the objective they measure, one not re-tuned keeps the record it
    had in `earlier` (load_records), its time and note included."""
    path = config_path(pattern, device)
    buckets = {}
    for b in sorted(configs):
        if b in timings:
            record = {"overrides": configs[b], "ms": timings[b]}
            if objective is not None:
                record["objective"] = objective
        else:
            record = {**(earlier or {}).get(b, {"ms": None}), "overrides": configs[b]}
        buckets[str(b)] = record
    payload = {"pattern": pattern.name, "canonical": pattern.canonical(), "device": device, "buckets": buckets}
    cache._atomic_write(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())
    return path


# How far (in doublings of the length) a bucket never tuned borrows the
# configuration of the nearest tuned one: the tiles that won at 8k and 64k
# are a better start for 16k and 32k than the plan's defaults (every
# recorded configuration computes the same values; only speed can differ).
NEAREST_BUCKET_OCTAVES = 2


def tuned_bucket(configs: dict, length: int) -> Optional[int]:
    """The bucket whose configuration runs a call of this length: its own
    when tuned, else the nearest tuned one within NEAREST_BUCKET_OCTAVES
    (the shorter on a tie), else None (the plan's defaults)."""
    bucket = bucket_of(length)
    if bucket in configs:
        return bucket
    distance = {b: abs(math.log2(b) - math.log2(bucket)) for b in configs}
    near = [b for b, d in distance.items() if d <= NEAREST_BUCKET_OCTAVES]
    return min(near, key=lambda b: (distance[b], b)) if near else None


# Switches whose other branch is deleted (issue 20), with the value every
# kernel now runs: a record from before names them, and that value changes
# nothing.
RETIRED_SWITCHES = {"TOPK_HEAD_ROWS": 1, "TOPK_KEYS_MAJOR": 1, "TOPK_SORT_MERGE": 1, "TOPK_KEY32": 1}


def without_plan_decisions(plan, overrides: dict) -> dict:
    """overrides less each name that is no longer tunable but that the plan
    now decides, to the recorded value, or a retired switch at the value the
    kernels now always run (a record from before: nothing is lost by
    dropping it). Any other stale name stays, for apply_overrides to
    refuse."""
    def decided(name: str, value) -> bool:
        if "." in name or name in TUNABLE:
            return False
        if name in RETIRED_SWITCHES:
            return value == RETIRED_SWITCHES[name]
        planned = [v for k in plan.kernels for key, v in k.constants if key == name]
        return bool(planned) and all(v == value for v in planned)

    return {name: value for name, value in overrides.items() if not decided(name, value)}


class TunedPattern:
    """A compiled pattern that runs each call with its length bucket's tuned
    configuration (see tuned_bucket: a nearby bucket's for one never tuned,
    the plan's defaults with none near)."""

    def __init__(self, pattern: Pattern, device: str, compile_fn, **compile_kwargs):
        self.pattern = pattern
        self.device = device
        self.configs = load_configs(pattern, device)
        self._compile = compile_fn
        self._kwargs = compile_kwargs
        self._variants = {}
        self.plan = self.variant(None).plan
        self.configs = {b: without_plan_decisions(self.plan, o) for b, o in self.configs.items()}

    def overrides_for(self, length: int) -> dict:
        bucket = tuned_bucket(self.configs, length)
        return {} if bucket is None else self.configs[bucket]

    def variant(self, length: Optional[int]):
        overrides = {} if length is None else self.overrides_for(length)
        key = tuple(sorted(overrides.items()))
        if key not in self._variants:
            try:
                self._variants[key] = self._compile(self.pattern, overrides=overrides or None, **self._kwargs)
            except ValueError as exc:
                # A record from an older plan (a constant since renamed or
                # removed): run the defaults rather than fail the call.
                warnings.warn(f"tuned configuration for {self.pattern.name!r} at T={length} no longer applies"
                              f" ({exc}); using the plan's defaults", RuntimeWarning, stacklevel=3)
                self.configs.pop(tuned_bucket(self.configs, length), None)
                self._variants[key] = self.variant(None)
        return self._variants[key]

    def slc_fwd_at(self, T: int) -> Optional[str]:
        return self.variant(T).slc_fwd_at(T)

    def __call__(self, q, *args, **kwargs):
        return self.variant(call_length(q, kwargs))(q, *args, **kwargs)


def call_length(q, kwargs: dict) -> Optional[int]:
    """The length whose bucket runs a call: T of a [B, T, ...] q; for
    packed sequences (cu_seqlens) the longest sequence (max_seqlen, else
    read from cu_seqlens: the one host sync a call without max_seqlen
    makes anyway), not q's total or its head count. None where q has no
    length (the call then reports its own error)."""
    cu_seqlens = kwargs.get("cu_seqlens")
    if cu_seqlens is not None:
        try:
            return max_length(cu_seqlens, kwargs.get("max_seqlen"))
        except (ValueError, TypeError, AttributeError):
            return None  # a malformed cu_seqlens or max_seqlen: the call's own checks name it
    return q.shape[1] if hasattr(q, "shape") and len(q.shape) >= 2 else None
