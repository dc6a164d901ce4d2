"""Write docs/getting-started.md, the site's first page, from README.md's first ten minutes and install section
(links rewritten for the site), so the two never drift apart: ``python docs/getting_started.py``; a test checks."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "getting-started.md"
NEXT = """
## What to read next

- [Results](guide/results.md): the article's claims, scored and measured.
- [GradientHealthCallback](guide/callback.md): every key it logs, its verdicts and the evidence behind them, on your
  own models.
- [When it fails: doctor](guide/doctor.md): `stabilize doctor` tries the remedies on your run and says which works.
- [Command line](guide/command-line.md) and the [API reference](reference/index.md).
"""


def page() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## The first ten minutes")
    end = readme.index("\n## ", readme.index("## Install") + 3)
    text = readme[start:end].replace("## The first ten minutes", "# Getting started", 1)
    # README's links are relative to the repository's root, the site's to docs/.
    for old, new in (("](docs/", "]("), ("(notebooks/vanishing_gradients.ipynb)", "(guide/notebook.md)")):
        text = text.replace(old, new)
    note = "<!-- Written by docs/getting_started.py from README.md: edit README.md and rerun it. -->\n"
    return note + text.rstrip() + "\n" + NEXT


if __name__ == "__main__":
    PAGE.write_text(page())
