"""The pipeline in one place: Pattern -> checked Plan -> source -> cached,
imported module -> CompiledPattern. `check` is its first step."""
from __future__ import annotations

import hashlib
import os
from typing import Optional

from . import cache
from .check import raise_if_invalid
from .interpreter import prepare
from .ir import Pattern
from .ops import CompiledPattern
from .plan import Plan, apply_overrides, make_plan
from .records import TunedPattern
from .render import render, template_sources
from .resources import grammar_path
from .version import __version__


def device_kind() -> str:
    """What the generated code will run on: part of the cache key, since
    tile choices and Triton's lowering depend on it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton-interpreter"
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"cuda-sm{major}{minor}"
    except Exception:  # pragma: no cover - torch is a dependency
        pass
    return "no-device"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # pragma: no cover
        return "none"


def cache_key(plan: Plan, device: Optional[str] = None) -> str:
    """sha256 over everything that decides the generated text or how it runs:
    the canonical pattern, the plan's decisions, the templates, the grammar,
    the package and Triton versions and the device kind."""
    h = hashlib.sha256()

    def feed(label: str, text: str) -> None:
        # surrogateescape: a file name that is not valid UTF-8 arrives from
        # os.fsdecode with lone surrogates; hash its original bytes.
        h.update(label.encode() + b"\0" + text.encode("utf-8", "surrogateescape") + b"\0")

    feed("pattern", plan.pattern.canonical())
    feed("source", plan.pattern.source)
    feed("kernels", repr([(k.name, k.template, k.constants, k.num_warps, k.num_stages) for k in plan.kernels]))
    feed("shared", repr(plan.shared_constants))
    for name, text in template_sources():
        feed("template:" + name, text)
    feed("grammar", grammar_path().read_text())
    feed("version", __version__)
    feed("triton", _triton_version())
    feed("device", device or device_kind())
    return h.hexdigest()


def check(pattern: Pattern) -> Plan:
    """The compiler's checking step: validate, then plan. Returns the Plan
    (carrying the warnings) or raises SpecError with every error."""
    return make_plan(pattern, raise_if_invalid(pattern))


def emit(pattern: Pattern) -> tuple:
    """(cache key, generated source) without touching the cache."""
    plan = check(pattern)
    key = cache_key(plan)
    return key, render(plan, key)


def compile(pattern: Pattern, *, deterministic: bool = False, slc_dkdv: Optional[str] = None,  # noqa: A001
            slc_fwd: Optional[str] = None, overrides: Optional[dict] = None, tuned: bool = False):
    """Check, plan, render, cache and load the kernels of a pattern.

    deterministic=True guarantees bit-identical gradients run to run (the
    selection branch's key/value gradients then use the block-centric
    inverted index, never float32 atomics). slc_dkdv overrides the plan's
    choice: "inverted-index" or "atomic". slc_fwd overrides the plan's selection
    forward loop order: "group-centric" or "block-centric" (both deterministic).
    overrides replaces tunable plan
    constants (tile sizes, work splits, <kernel>.num_warps/num_stages; see
    plan.TUNABLE): what is computed stays the same. tuned=True returns a
    TunedPattern that runs each call with the configuration `nsa-dsl tune`
    recorded for its length bucket on this device (a tuned bucket within two
    doublings where its own is not, the defaults where none is)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"nsa_dsl.compile expects a Pattern (from nsa_dsl.parse or nsa_dsl.load), got {type(pattern).__name__}")
    prepare()  # before the cache key (it names the device) and the import (triton.jit reads the variable)
    if tuned:
        if overrides:
            raise ValueError("compile: pass either tuned=True or overrides, not both")
        return TunedPattern(pattern, device_kind(), compile, deterministic=deterministic, slc_dkdv=slc_dkdv,
                            slc_fwd=slc_fwd)
    plan = check(pattern)
    if overrides:
        plan = apply_overrides(plan, overrides)
    key = cache_key(plan)
    path, _built = cache.get_or_build(key, lambda: render(plan, key))
    module = cache.load_module(key, path)
    return CompiledPattern(plan, module, path, key, deterministic=deterministic, slc_dkdv=slc_dkdv, slc_fwd=slc_fwd)
