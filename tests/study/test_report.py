from __future__ import annotations

from pathlib import Path
from typing import Any

from stabilize.study.plots import lr_groups, lr_sensitivity
from stabilize.study.report import columns, table


def result(name: str, lr: float | None = None, **values: Any) -> dict[str, Any]:
    args = {"norm_position": values.pop("norm", "pre"), **({"lr": lr} if lr is not None else {})}
    return {
        "name": name,
        "model": "stabilize.models.transformer.TransformerLM",
        "model_args": args,
        "test_acc": None,
        "val_acc": None,
        "val_loss": None,
        "test_loss": None,
        "final_train_loss": 2.0,
        "wall_time_s": 10.0,
        "worst_depth_ratio": 0.5,
        "vanishing_layers_end": 0,
        "exploding_steps": 0,
        "verdict": "healthy",
        **values,
    }


def test_runs_that_differ_only_in_lr_are_one_line_labelled_by_what_differs(tmp_path: Path) -> None:
    results = [
        result("pre-3", 3e-3, val_loss=2.0),
        result("pre-1", 1e-3, val_loss=2.1),
        result("post-1", 1e-3, norm="post", val_loss=2.3),
        result("post-3", 3e-3, norm="post", val_loss=float("nan")),
        result("alone", 1e-2, norm="deep", val_loss=2.5),  # one LR: no line
        result("no-lr", val_loss=2.0),
    ]
    groups = lr_groups(results)  # type: ignore[arg-type]
    assert list(groups) == ["norm_position=pre", "norm_position=post"]
    assert [lr for lr, _ in groups["norm_position=pre"]] == [1e-3, 3e-3]
    assert lr_sensitivity(results, tmp_path / "lr.png") and (tmp_path / "lr.png").stat().st_size > 0  # type: ignore[arg-type]
    assert not lr_sensitivity(results[4:], tmp_path / "none.png") and not (tmp_path / "none.png").exists()  # type: ignore[arg-type]


def test_a_language_model_grid_shows_its_losses_not_empty_accuracy_columns() -> None:
    results = [result("a", 1e-3, val_loss=1.923), result("b", 3e-3, val_loss=2.01)]
    headers = [header for _, header, _ in columns(results)]  # type: ignore[arg-type]
    assert headers[:3] == ["run", "val loss", "train loss"]
    assert "test acc" not in headers and "test loss" not in headers
    assert "| a | 1.923 |" in table(results)  # type: ignore[arg-type]


def test_a_classifier_grid_keeps_readme_columns() -> None:
    results = [result("c", 0.05, test_acc=0.5, val_acc=0.49, val_loss=1.4, test_loss=1.5)]
    headers = [header for _, header, _ in columns(results)]  # type: ignore[arg-type]
    assert headers == [
        "run",
        "test acc",
        "val acc",
        "train loss",
        "time",
        "worst depth ratio",
        "vanishing at end",
        "exploding steps",
        "verdict",
    ]
