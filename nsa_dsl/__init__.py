"""nsa_dsl: a compiler for Native Sparse Attention patterns.

    pattern = nsa_dsl.load("examples/deepseek_nsa.nsa")
    compiled = nsa_dsl.compile(pattern)
    o = compiled(q, k, v, g_cmp, g_slc, g_swa)

The names below are bound eagerly: some share their name with a submodule
(the function nsa_dsl.reference with the module reference.py, nsa_dsl.check,
defined in pipeline.py, with the checker check.py), and a lazily bound
function would be shadowed once that submodule is imported.
"""
from .version import __version__
from .errors import Diagnostic, SpecError
from .ir import Branch, DType, Pattern, Pool
from .parse import load, load_all, parse, parse_all
from .reference import reference
from .pipeline import check, compile, emit  # noqa: A004
from .module import NSAttention
from .varlen import compressed_seqlens

__all__ = [
    "Branch", "DType", "Diagnostic", "NSAttention", "Pattern", "Pool", "SpecError",
    "check", "compile", "compressed_seqlens", "emit", "load", "load_all", "parse", "parse_all", "reference",
]
