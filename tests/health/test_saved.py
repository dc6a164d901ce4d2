from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import seed_everything

from stabilize.callbacks import GradientHealthCallback
from stabilize.health import judge_saved, verdict
from tests.callbacks.helpers import TinyMLP
from tests.helpers.trainer import quiet_trainer


def test_a_saved_run_judged_again_gets_the_verdicts_it_was_given(tmp_path: Path) -> None:
    seed_everything(0)
    health = GradientHealthCallback(log_every_n_steps=2, warmup_steps=3, verbose=False)
    # A loss scaled by 1e6 at step 12 plants a spike that training shrugs off (transient), at LR 1e-9 the loss
    # cannot fall (a stall over 20 records).
    quiet_trainer(tmp_path, max_steps=40, callbacks=[health]).fit(TinyMLP(lr=1e-9, loss_scale_at={12: 1e6}))
    health.save_json(tmp_path / "health.json")
    saved = json.loads((tmp_path / "health.json").read_text())
    judged = judge_saved(saved)
    assert {name: verdict(summary) for name, summary in judged.items()} == {
        name: verdict(summary) for name, summary in health.summary().items()
    }
    (summary,) = judged.values()
    assert summary["loss_stall"] is not None and [e["first_step"] for e in summary["transient_spikes"]] == [12]
    # Judgements made by older rules are replaced: the saved ones are not read, the records and raw events are.
    (name,) = saved["summary"]
    saved["summary"][name] |= {"transient_spikes": [], "loss_stall": None, "explosions": [{"steps": 99}]}
    assert verdict(judge_saved(saved)[name]) == verdict(summary)


def test_a_file_without_the_raw_spike_events_keeps_its_saved_split(tmp_path: Path) -> None:
    health = GradientHealthCallback(log_every_n_steps=2, warmup_steps=3, verbose=False)
    quiet_trainer(tmp_path, max_steps=40, callbacks=[health]).fit(TinyMLP(lr=1e-9, loss_scale_at={12: 1e6}))
    health.save_json(tmp_path / "health.json")
    saved = json.loads((tmp_path / "health.json").read_text())
    del saved["spikes"]  # as save_json wrote it before it kept them
    (summary,) = judge_saved(saved).values()
    (name,) = saved["summary"]
    assert summary["transient_spikes"] == saved["summary"][name]["transient_spikes"]
    assert summary["loss_stall"] is not None  # what the records alone decide is judged again
