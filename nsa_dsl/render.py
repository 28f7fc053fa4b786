"""Plan -> Triton source text.

Jinja2 with StrictUndefined: a template that names something the renderer did
not provide fails loudly instead of rendering an empty string. Only validated
ints, bools, a closed set of enum words and grammar identifiers ever reach the
text of the generated module (the `literal` filter enforces it); the one piece
of user text that is not an identifier, the source file name, is rendered in a
comment after being made printable and single-line.
"""
from __future__ import annotations

import re
from functools import lru_cache

import jinja2

from .plan import Plan
from .resources import template_dir
from .version import __version__

# The only strings a constant may take; anything else is a bug upstream.
_ENUM_WORDS = frozenset({"ieee", "tf32", "tf32x3"})
# Used with fullmatch: `$` alone would also accept a trailing newline.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _literal(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value in _ENUM_WORDS:
        return f'"{value}"'
    raise ValueError(f"nsa_dsl.render: refusing to render {value!r} into kernel source")


def _comment_safe(text: str) -> str:
    """One printable line: a file name cannot end the comment it sits in."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


@lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["literal"] = _literal
    return env


def template_sources() -> tuple:
    """(name, text) of every template, sorted: part of the cache key."""
    folder = template_dir()
    return tuple((path.name, path.read_text()) for path in sorted(folder.glob("*.jinja")))


def _constants_by_kernel(plan: Plan) -> list:
    """[(kernel, constants first defined by it)]: a constant that several
    kernels use (the compression block, say) is defined once; two kernels
    giving one name different values would silently break the first, so
    that is refused."""
    seen = dict(plan.shared_constants)
    grouped = []
    for kernel in plan.kernels:
        fresh = []
        for name, value in kernel.constants:
            if name in seen:
                if seen[name] != value or type(seen[name]) is not type(value):
                    raise ValueError(f"nsa_dsl.render: constant {name} is {seen[name]!r} elsewhere but"
                                     f" {value!r} in kernel {kernel.name}")
                continue
            seen[name] = value
            fresh.append((name, value))
        grouped.append((kernel, tuple(fresh)))
    return grouped


def render(plan: Plan, cache_key: str = "(not cached)") -> str:
    pattern = plan.pattern
    if not _IDENTIFIER.fullmatch(pattern.name):
        raise ValueError(f"nsa_dsl.render: pattern name {pattern.name!r} is not an identifier")
    template = _environment().get_template("module.py.jinja")
    return template.render(
        version=__version__,
        pattern_name=pattern.name,
        source_file=_comment_safe(pattern.source),
        cache_key=cache_key,
        kernel_names=plan.kernel_names,
        canonical_lines=pattern.canonical().splitlines(),
        shared_constants=plan.shared_constants,
        kernels=_constants_by_kernel(plan),
    )
