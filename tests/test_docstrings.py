"""The docs: docstrings in Markdown (mkdocstrings renders them; no reStructuredText), the site's first page in step
with README.md."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stabilize"
#: Sphinx roles, an RST literal-block marker ("Example::") and the rules of an RST simple table.
RST = {
    "role": re.compile(r":(?:class|func|meth|data|mod|attr|obj|exc):`"),
    "literal block": re.compile(r"\w::\s*$", re.MULTILINE),
    "simple table": re.compile(r"^\s*={3,}\s+={3,}\s*$", re.MULTILINE),
}


def docstrings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    found = []
    for node in nodes:
        text = ast.get_docstring(node, clean=False)
        if text:
            found.append((getattr(node, "lineno", 1), text))
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_docstrings_have_no_restructuredtext(path: Path) -> None:
    raw = [
        f"line {line}: {kind}"
        for line, text in docstrings(path)
        for kind, pattern in RST.items()
        if pattern.search(text)
    ]
    assert not raw, f"{path.name}: reStructuredText markup the API reference would show raw: {raw}"


def test_the_getting_started_page_is_the_readme_s_first_ten_minutes() -> None:
    import importlib.util

    script = PACKAGE.parent / "docs" / "getting_started.py"
    spec = importlib.util.spec_from_file_location("getting_started", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PAGE.read_text() == module.page(), "README.md changed: run python docs/getting_started.py"


def crossrefs_hook() -> Any:
    path = Path(__file__).parents[1] / "docs" / "hooks" / "crossrefs.py"
    spec = importlib.util.spec_from_file_location("crossrefs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_hook_links_code_spans_that_name_public_objects_and_nothing_else() -> None:
    hook = crossrefs_hook()
    linked = hook.link_code_spans("<p>Use <code>GradientHealthCallback</code> or <code>DoctorResult.plot()</code>.</p>")
    assert linked == (
        '<p>Use <autoref identifier="stabilize.callbacks.GradientHealthCallback" optional>'
        "<code>GradientHealthCallback</code></autoref> or "
        '<autoref identifier="stabilize.doctor.DoctorResult.plot" optional>'
        "<code>DoctorResult.plot()</code></autoref>.</p>"
    )
    for name, target in [
        ("stabilize.health.HealthCriteria", "stabilize.health.HealthCriteria"),
        ("ConfigurationError", "stabilize.errors.ConfigurationError"),  # a module without __all__
    ]:
        assert f'identifier="{target}"' in hook.link_code_spans(f"<code>{name}</code>")
    untouched = [
        '<a href="x"><code>GradientHealthCallback</code></a>',  # a link already
        "<pre><code>GradientHealthCallback(verbose=False)</code></pre>",  # a code block
        "<h2><code>GradientHealthCallback</code></h2>",  # a heading, its own anchor
        "<code>max_steps</code> <code>stabilize.cli</code>",  # not a public object of a documented subpackage
    ]
    for html in untouched:
        assert hook.link_code_spans(html) == html


SITE = PACKAGE.parent / "site"


@pytest.mark.skipif(not (SITE / "reference").is_dir(), reason="the site is not built (CI runs mkdocs build first)")
def test_the_built_site_shows_no_raw_restructuredtext() -> None:
    """What a reader sees: every page of the built site (CI builds it before the tests), not only the docstrings."""
    role = re.compile(r":(?:class|func|meth|data|mod|attr|obj|exc):(?:`|<code>)")
    table = re.compile(r"={3,}\s+={3,}")
    literal = re.compile(r"\w::\s*</p>")
    found = [
        f"{page.relative_to(SITE)}: {pattern.pattern}"
        for page in SITE.rglob("*.html")
        for pattern in (role, table, literal)
        if pattern.search(page.read_text(errors="replace"))
    ]
    assert not found, found
