"""nsa_dsl: a compiler for Native Sparse Attention patterns.

    pattern = nsa_dsl.load("examples/deepseek_nsa.nsa")
    compiled = nsa_dsl.compile(pattern)
    o = compiled(q, k, v, g_cmp, g_slc, g_swa)
"""
__version__ = "0.1.0"

from .errors import Diagnostic, SpecError  # noqa: E402
from .ir import Branch, DType, Pattern, Pool  # noqa: E402


def __getattr__(name):
    # Heavy pieces (torch, triton, lark) load on first use so that
    # `import nsa_dsl` stays cheap for the CLI's check command.
    if name in ("parse", "parse_all", "load", "load_all"):
        from . import parse as _parse

        return getattr(_parse, name)
    if name == "check":
        from .check import check as _check

        return _check
    if name == "compile":
        from .compile import compile as _compile

        return _compile
    if name == "reference":
        from .reference import reference as _reference

        return _reference
    if name == "NSAttention":
        from .module import NSAttention as _cls

        return _cls
    raise AttributeError(f"module 'nsa_dsl' has no attribute {name!r}")


__all__ = [
    "Branch", "DType", "Diagnostic", "NSAttention", "Pattern", "Pool", "SpecError",
    "check", "compile", "load", "load_all", "parse", "parse_all", "reference",
]
