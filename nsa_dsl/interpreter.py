"""Running the generated kernels on a machine without a GPU.

Triton runs kernels on CPU tensors through its interpreter when
TRITON_INTERPRET=1 is in the environment at the moment a kernel is defined
(triton.jit reads it then, not when triton is imported). The generated module
is imported by `compile`, so `prepare()` there can still choose the
interpreter for a user who never heard of the variable: on a machine with no
CUDA device there is nothing else the kernels could run on.

It also mends one interpreter bug of older Tritons that the project's
supported range includes, so that range works with the newest numpy:

* Triton <= 3.6 turns a loop bound into a Python int with int() of a
  one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can
  be converted to Python scalars"); newer Tritons squeeze the array first,
  and so does the patch below. Every kernel with a runtime loop bound needs it.
"""
from __future__ import annotations

import os
import warnings

_warned = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def prepare() -> None:
    """Choose the interpreter where no GPU exists, and mend it. Idempotent."""
    global _warned
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
            if not _warned:
                _warned = True
                warnings.warn("nsa_dsl: no CUDA device, so the kernels run on CPU tensors through Triton's"
                              " interpreter (TRITON_INTERPRET=1): correct but slow, for tests and small"
                              " inputs. Set TRITON_INTERPRET=0 to turn this off.", stacklevel=3)
    if interpreting():
        _mend_loop_bounds()


def _mend_loop_bounds() -> None:
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_nsa_dsl_mended", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._nsa_dsl_mended = True
    interpreter._patch_lang_tensor = patch_lang_tensor
