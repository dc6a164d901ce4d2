"""MkDocs hook: every code span that names a public object of the package links to its reference entry.

Docstrings and guides write names as code spans (`` `GradientHealthCallback` ``, `` `DoctorResult.plot` ``,
`` `stabilize.health.HealthCriteria` ``), which read well in ``help()`` and on GitHub; on the site each becomes a link.
The hook marks the spans as optional cross-references for mkdocs-autorefs, which resolves them after every page is
rendered (an identifier the reference does not document stays plain text, silently), so a link is never broken.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from typing import Any

#: The subpackages the API reference documents, one page each (docs/reference/<name>.md: ``::: stabilize.<name>``).
DOCUMENTED = ("callbacks", "health", "doctor", "models", "datamodules", "study", "metrics", "errors")

_CODE = re.compile(r"<code>(?P<name>[A-Za-z_][\w.]*?)(?P<call>\(\))?</code>")
#: Spans that must not get a link inside them: links already, code blocks, headings (their own anchors).
_PROTECTED = re.compile(r"<a\b.*?</a>|<pre\b.*?</pre>|<h[1-6]\b.*?</h[1-6]>", re.DOTALL)


@cache
def public_names() -> dict[str, str]:
    """Short name -> identifier (``"GradientHealthCallback"`` -> ``"stabilize.callbacks.GradientHealthCallback"``) of
    every name the documented subpackages export; a name two of them export keeps the first."""
    names: dict[str, str] = {}
    for package in DOCUMENTED:
        module = importlib.import_module(f"stabilize.{package}")
        # Without __all__, mkdocstrings documents what the module defines and does not prefix with "_".
        defined = [n for n, v in vars(module).items() if getattr(v, "__module__", None) == module.__name__]
        for name in getattr(module, "__all__", [n for n in defined if not n.startswith("_")]):
            names.setdefault(name, f"stabilize.{package}.{name}")
    return names


def identifier(name: str) -> str | None:
    """The reference identifier a code span's text names, or None: a public name, ``Name.member``, or a dotted path
    into a documented subpackage (``stabilize.health.HealthCriteria``)."""
    names = public_names()
    if name.startswith("stabilize."):
        return name if name.split(".")[1] in DOCUMENTED else None
    head, _, rest = name.partition(".")
    if head not in names:
        return None
    return f"{names[head]}.{rest}" if rest else names[head]


def link_code_spans(html: str) -> str:
    """``html`` with every code span that names a public object wrapped in an optional autoref."""

    def mark(match: re.Match[str]) -> str:
        target = identifier(match["name"])
        if target is None:
            return match[0]
        return f'<autoref identifier="{target}" optional>{match[0]}</autoref>'

    pieces, last = [], 0
    for protected in _PROTECTED.finditer(html):
        pieces += [_CODE.sub(mark, html[last : protected.start()]), protected[0]]
        last = protected.end()
    pieces.append(_CODE.sub(mark, html[last:]))
    return "".join(pieces)


def on_page_content(html: str, **kwargs: Any) -> str:
    return link_code_spans(html)
