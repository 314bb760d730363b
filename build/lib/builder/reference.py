"""The README's reference sections, generated from the declarations.

Each section sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->``
in README.md; tests/test_reference.py fails when one differs from what the
tables say.  Rewrite them with:

    python -m builder.reference README.md
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from . import generators, spec
from .element_spec import PARAM_TYPES, ElementSpec
from .recipe import RecipeSpec


def _param_types() -> str:
    input_note = " (a build-host input, relative to the recipe)"
    rows = [f"| `{t.name}` | {t.what}{input_note if t.input else ''} |"
            for t in PARAM_TYPES.values()]
    return "| type | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def _generators() -> str:
    rows = []
    for name, target in sorted(generators.REGISTRY.items()):
        module, _, cls = target.partition(":")
        __import__(module)
        doc = (getattr(sys.modules[module], cls).__doc__ or "").strip().splitlines()
        rows.append(f"| `{name}` | {doc[0] if doc else ''} |")
    return "| generator | what it writes |\n|---|---|\n" + "\n".join(rows) + "\n"


SECTIONS: dict[str, Callable[[], str]] = {
    "recipe-keys": lambda: spec.reference(RecipeSpec),
    "element-keys": lambda: spec.reference(ElementSpec),
    "param-types": _param_types,
    "generators": _generators,
}


def update(text: str) -> str:
    """`text` with every generated section replaced by its current content."""
    for name, render in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no section {name}")
        body = render()

        def fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + m.group(2)

        text = pattern.sub(fill, text)
    return text


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    path.write_text(update(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
