from __future__ import annotations

import math

from stabilize.study.comparisons import one_argument_tables
from tests.study.test_report import result


def test_runs_that_differ_in_one_argument_sit_in_one_row_with_the_best_in_bold() -> None:
    results = [
        result("pre-warm", 3e-3, val_loss=1.971),
        result("pre-cold", 3e-3, val_loss=2.319),
        result("post-cold", 3e-3, norm="post", val_loss=3.356),
        result("pre-cold-1e-3", 1e-3, val_loss=2.151),
    ]
    results[0]["model_args"]["warmup_fraction"] = 0.05  # only the first run sets it: the others are at the default
    lines = one_argument_tables(results)  # type: ignore[arg-type]
    assert lines[0] == "## One argument at a time"

    def table(argument: str) -> list[str]:
        at = lines.index(f"**{argument}**") + 2
        return lines[at : lines.index("", at)]

    # The twin without a warm-up (at the default) beside the run with one, the lower loss in bold; post-LN has no
    # twin there, so no row.
    assert table("warmup_fraction") == [
        "| norm_position | lr | 0.05 | default |",
        "|---|---|---:|---:|",
        "| pre | 0.003 | **1.971** | 2.319 |",
    ]
    assert table("norm_position")[2:] == ["| 0.003 | default | **2.319** | 3.356 |"]
    assert table("lr")[0] == "| norm_position | warmup_fraction | 0.001 | 0.003 |"  # numbers ascending
    assert table("lr")[2:] == ["| pre | default | **2.151** | 2.319 |"]


def test_no_table_without_a_shared_score_or_without_twins() -> None:
    assert one_argument_tables([]) == []
    different = [result("a", 1e-3, val_loss=2.0), result("b", 3e-3, norm="post", val_loss=2.1)]
    assert one_argument_tables(different) == []  # type: ignore[arg-type]
    assert one_argument_tables([result("a", 1e-3, val_loss=2.0), result("b", 3e-3)]) == []  # type: ignore[list-item]


def test_ties_failed_runs_and_accuracy() -> None:
    losses = [result("a", 1e-3, val_loss=3.356), result("b", 3e-3, val_loss=3.356)]
    losses.append(result("c", 1e-2, val_loss=math.nan))
    assert "| **3.356** | **3.356** | n/a |" in one_argument_tables(losses)  # type: ignore[arg-type]
    assert "| 3.356 | 3.356 |" in one_argument_tables(losses[:2])  # type: ignore[arg-type]  # a tie: nothing in bold
    accuracy = [result("a", 1e-3, test_acc=0.5, val_acc=0.4), result("b", 3e-3, test_acc=0.6, val_acc=0.7)]
    lines = one_argument_tables(accuracy)  # type: ignore[arg-type]
    assert "| 50.0% | **60.0%** |" in lines and "test accuracy" in lines[2]  # higher is better; test before val
