"""The README's reference sections are the declarations, not a copy kept by hand."""

from __future__ import annotations

from conftest import REPO

from builder import reference


def test_readme_reference_matches_the_declarations() -> None:
    text = (REPO / "README.md").read_text()
    assert reference.update(text) == text, (
        "README.md's generated sections are stale: run "
        "'.venv/bin/python -m builder.reference README.md'")


def test_every_section_is_rendered_from_a_table() -> None:
    # a key added to a table shows up in the README's section
    recipe = reference.SECTIONS["recipe-keys"]()
    element = reference.SECTIONS["element-keys"]()
    for key in ("`base.image`", "`output.formats[]`", "`overlays[].modes.NAME`"):
        assert key in recipe
    for key in ("`params.NAME.vermagic`", "`files[].when[].is`", "`generate[]`"):
        assert key in element
    assert "`offload-deployment`" in reference.SECTIONS["generators"]()
