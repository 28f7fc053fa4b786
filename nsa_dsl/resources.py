"""Where the grammar and the templates live.

In a source checkout they sit at the top level (grammar/, templates/); in an
installed wheel they are shipped inside the package (nsa_dsl/grammar,
nsa_dsl/templates; see pyproject.toml). Both layouts are found here and
nowhere else.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def resource_dir(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"nsa_dsl: cannot find its {name}/ folder next to {_PACKAGE}")


def grammar_path() -> Path:
    return resource_dir("grammar") / "nsa.lark"


def template_dir() -> Path:
    return resource_dir("templates")
