"""Speed-ups of Triton's interpreter for the CPU suite (the tests'
conftest and test_distributed's spawned ranks install them; nothing in
nsa_dsl depends on them). They change no result: only how often the same
work is redone.

* A @triton.jit helper called inside a kernel does not re-patch
  triton.language: Triton's interpreter re-patches the whole language on
  every such call (an inspect.getmembers of tl, tl.tensor, tl.math per
  call), though the kernel's launch already patched it and restores it
  when the launch ends. That was a quarter of an interpreted test's time.
  Its dtype map (a table rebuilt on each of its many calls) is memoised.
* Each launch starts on a fresh CPython frame chunk (_from_a_fresh_frame_chunk).

CPU suite on 2 workers: 28:27 before, 19:07 with the first (and one
BLAS thread a process, conftest), 11:49 with the second (NOTES v27).
"""
from __future__ import annotations

import os


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


def install() -> bool:
    """Both speed-ups where kernels run through the interpreter
    (TRITON_INTERPRET=1, read before triton is imported); False elsewhere."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _patch_device_calls_once()
