"""One argument at a time: for each model argument a grid varies, its runs side by side with everything else equal.

A grid is a set of ablations; a run that trained but worse than its twin (the same model without a warm-up, say)
looks healthy on its own, since nothing in its gradients is out of range, and shows only beside the twin. These
tables put every such pair (or sweep) in one row: the row holds the other arguments fixed, the columns are the values
of the one argument, the cells the grid's headline score, the best of each row in bold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from stabilize.study.results import RunResult, cell

#: The headline scores, in order of preference: (result key, header, higher is better, format).
SCORES = (
    ("test_acc", "test accuracy", True, "{:.1%}"),
    ("val_acc", "validation accuracy", True, "{:.1%}"),
    ("val_loss", "validation loss", False, "{:.3f}"),
)
#: How an argument a run leaves at its class's default is shown.
DEFAULT = "default"


def _arguments(result: RunResult) -> dict[str, Any]:
    return {"model": result["model"].rsplit(".", 1)[-1], **result.get("model_args", {})}


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _ordered(values: list[Any]) -> list[str]:
    """The distinct values as shown: numbers ascending (a sweep reads left to right), others as they first come."""
    distinct = list(dict.fromkeys(_shown(value) for value in values))
    numbers = {_shown(v): v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(numbers) == len(distinct):
        return sorted(distinct, key=numbers.__getitem__)
    return distinct


def one_argument_tables(results: Sequence[RunResult]) -> list[str]:
    """Markdown lines: a heading and, for each argument with two or more values among the runs, a table whose rows
    fix every other argument and whose columns are that argument's values (rows with one run left out). Empty when
    the runs share no headline score (every run needs it) or no two runs differ in one argument only."""
    score = next((s for s in SCORES if results and all(r.get(s[0]) is not None for r in results)), None)
    if score is None:
        return []
    key, header, higher, form = score
    arguments = [_arguments(result) for result in results]
    names = list(dict.fromkeys(name for args in arguments for name in args))
    values = {name: _ordered([args.get(name, DEFAULT) for args in arguments]) for name in names}
    varied = [name for name in names if len(values[name]) > 1]
    lines: list[str] = []
    for name in varied:
        others = [other for other in varied if other != name]
        # A row per setting of every other argument; labelled by the other arguments the grid varies.
        rows: dict[str, tuple[list[str], dict[str, RunResult]]] = {}
        for args, result in zip(arguments, results):
            fixed = json.dumps({k: v for k, v in args.items() if k != name}, sort_keys=True, default=str)
            label = [_shown(args.get(other, DEFAULT)) for other in others]
            rows.setdefault(fixed, (label, {}))[1][_shown(args.get(name, DEFAULT))] = result
        shown_rows = [(label, cells) for label, cells in rows.values() if len(cells) > 1]
        if not shown_rows:
            continue
        lines += [f"**{name}**", "", "| " + " | ".join([*others, *values[name]]) + " |"]
        lines.append("|" + "---|" * len(others) + "---:|" * len(values[name]))
        for label, cells in shown_rows:
            finite = [run[key] for run in cells.values() if math.isfinite(run[key])]  # type: ignore[literal-required]
            printed = {value: cell(run, key, form) for value, run in cells.items()}  # "n/a" where not finite
            # Ties as printed are all bold (none when the whole row ties: there is nothing to choose).
            best = form.format((max if higher else min)(finite)) if finite else None
            ties = len(set(printed.values())) == 1
            row = [
                "" if value not in printed else f"**{best}**" if printed[value] == best and not ties else printed[value]
                for value in values[name]
            ]
            lines.append("| " + " | ".join([*label, *row]) + " |")
        lines.append("")
    if not lines:
        return []
    return [
        "## One argument at a time",
        "",
        f"For each model argument the grid varies: the runs that differ in it alone, side by side ({header}, the best"
        " of each row in bold). A run that trained, but worse than its twin, shows here and not in its own verdict.",
        "",
        *lines,
    ]
