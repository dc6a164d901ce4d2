"""stabilize.doctor: the plan, the judgement of a trial, the doctor's loop, and two real runs (healthy, cured)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from stabilize.doctor import DoctorResult, Findings, Remedy, Trial, doctor, plan, repaired
from stabilize.doctor import remedies as remedies_module
from stabilize.doctor import repair as doctor_module
from stabilize.doctor.remedies import clipping, learning_rate, optimizer_swap, reinitialisation
from stabilize.errors import ConfigurationError
from stabilize.health.traits import ModelTraits
from stabilize.models.variants import Variant
from tests.helpers.doctor_models import TeacherNet, teacher

RELU = ModelTraits(relu_like=True)


def names(families: list[list[Remedy]]) -> list[list[str]]:
    return [[remedy.name for remedy in family] for family in families]


def test_plan_explosion_from_the_start_tries_the_initialisation_first() -> None:
    families = names(plan(Findings("exploding", explosion_step=0), RELU, {}, 200))
    assert families[:3] == [["re-init auto"], ["clip norm 1"], ["LR /10", "LR /100"]]
    later = names(plan(Findings("exploding", explosion_step=150), RELU, {}, 200))
    assert later[:2] == [["clip norm 1"], ["LR /10", "LR /100"]] and later[-1] == ["re-init auto"]


def test_plan_offers_adamw_to_sgd_runs_after_the_cheaper_changes() -> None:
    swap = names(plan(Findings("exploding", explosion_step=0, sgd=True), RELU, {}, 200))
    assert swap[3:5] == [["warm-up 40 steps"], ["adamw instead of sgd"]]
    assert ["adamw instead of sgd"] not in names(plan(Findings("exploding", explosion_step=0), RELU, {}, 200))
    declared = {"adamw": Variant("AdamW at 1e-3", {"optimizer": "adamw", "lr": 1e-3})}
    own = names(plan(Findings("unstable", sgd=True), RELU, declared, 200))
    assert own[-1] == ["adamw"]  # the model's own variant (it knows its rate) before the generic swap


def test_plan_unstable_lowers_the_lr_and_never_reinitialises_a_transformer() -> None:
    declared = {"qk_norm": Variant("QK-norm", {"qk_norm": True})}
    families = names(plan(Findings("unstable"), ModelTraits(attention=True), declared, 200))
    assert families == [["LR /10", "LR /100"], ["warm-up 40 steps"], ["clip norm 1"], ["qk norm"]]
    vanishing = names(plan(Findings("vanishing"), ModelTraits(attention=True, normalization=True), {}, 200))
    assert all("re-init" not in name for family in vanishing for name in family)
    assert vanishing[0] == ["warm-up 40 steps"]


def test_plan_for_saturating_vanishing_dead_units_through_time_and_stalls() -> None:
    saturating = names(plan(Findings("vanishing"), ModelTraits(saturating=True), {}, 100))
    assert saturating[:3] == [["relu + he init"], ["selu + lecun init"], ["re-init auto"]]
    dead = names(plan(Findings("vanishing", dead_units=True), RELU, {}, 100))
    assert dead[:2] == [["re-init auto"], ["LR /10", "LR /100"]]
    gated = {"gated_cell": Variant("LSTM", {"cell": "lstm"})}
    assert names(plan(Findings("vanishing", through_time=True), ModelTraits(), gated, 100))[0] == ["gated cell"]
    assert names(plan(Findings("stalled"), RELU, {}, 100))[0] == ["LR x10", "LR x100", "LR x1000", "LR x10000"]
    # A vanishing run whose loss stalled too: the range test after the changes aimed at the gradient.
    stalled_rnn = names(plan(Findings("vanishing", through_time=True, stalled_loss=True), ModelTraits(), {}, 100))
    assert stalled_rnn == [["re-init auto"], ["clip norm 1"], ["LR x10", "LR x100", "LR x1000", "LR x10000"]]
    assert ["LR x10", "LR x100", "LR x1000", "LR x10000"] not in names(
        plan(Findings("vanishing", through_time=True), ModelTraits(), {}, 100)
    )
    assert plan(Findings("healthy"), RELU, {}, 100) == []
    half = names(plan(Findings("exploding", explosion_step=50), RELU, {}, 200, fp16=True))
    assert half[0] == ["bf16 instead of fp16"]


def trial(name: str | None, verdict: str, final: float | None, start: float | None = 1.4, **kw: Any) -> Trial:
    remedy = None if name is None else (clipping() if name == "clip" else Remedy(name, "training"))
    return Trial(remedy, verdict, verdict, start, final, 1.0, **kw)


def test_repaired_needs_a_healthy_verdict_and_a_loss_that_learned() -> None:
    probe = trial(None, "vanishing", 1.35)
    assert repaired(trial("a", "healthy", 0.9), probe, None, [probe])
    assert not repaired(trial("a", "healthy", 1.30), probe, None, [probe])  # above 0.9 x the start (1.26)
    assert not repaired(trial("a", "vanishing", 0.5), probe, None, [probe])
    assert not repaired(trial("a", "healthy", 0.5, error="ValueError: x"), probe, None, [probe])
    assert repaired(trial("a", "healthy", 1.30), probe, 2.0, [probe])  # the given baseline: 0.9 x 2.0
    # Clipping bounds the step, not the raw gradient the callback measures: exploding is tolerated there only.
    exploded = trial(None, "exploding", math.inf, start=1e5)
    assert repaired(trial("clip", "exploding", 0.5), exploded, None, [exploded])
    assert not repaired(trial("a", "exploding", 0.5), exploded, None, [exploded])
    # A probe that learned to 0.5 before it blew up: a repair keeps half that progress (bar 0.5 + 0.9 / 2).
    learned_first = trial(None, "unstable", 3.0, best_loss=0.5)
    assert repaired(trial("a", "healthy", 0.9), learned_first, None, [learned_first])
    assert not repaired(trial("a", "healthy", 1.0), learned_first, None, [learned_first])
    # Two optimizers (a GAN): no single loss, the verdict is the outcome.
    assert repaired(trial("a", "healthy", None, None), trial(None, "collapse", None, None), None, [])


def scripted(monkeypatch: pytest.MonkeyPatch, outcomes: dict[str | None, tuple[str, float]]) -> list[str]:
    """Replace the training of a trial by ``outcomes`` (remedy name -> verdict class, final loss); the names tried."""
    tried: list[str] = []

    def fake(model: Any, data: Any, remedy: Remedy | None, *args: Any) -> Trial:
        name = None if remedy is None else remedy.name
        tried.append(str(name))
        verdict, final = outcomes.get(name, ("vanishing", 1.35))
        summaries = {"optimizer": {"explosions": [], "nonfinite": [], "dead_units": {}}}
        return Trial(remedy, verdict, verdict, 1.4, final, 1.0, summaries=summaries)  # type: ignore[arg-type]

    monkeypatch.setattr(doctor_module, "run_trial", fake)
    return tried


def test_doctor_stops_at_the_first_repair_and_climbs_a_family_until_a_step_repairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10x lower still too high reads stalled (stuck after its blow-up): the family goes on to 100x.
    tried = scripted(monkeypatch, {None: ("unstable", 3.0), "LR /10": ("stalled", 2.5), "LR /100": ("healthy", 1.0)})
    result = doctor(TeacherNet, None, steps=50)
    assert tried == ["None", "LR /10", "LR /100", "warm-up 10 steps"]  # and a second opinion, which fails here
    assert result.best is not None and result.best.name == "LR /100"
    assert "Repaired by LR /100" in result.conclusion and result.cost == pytest.approx(4.0)


def test_doctor_goes_one_step_further_while_the_family_keeps_lowering_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = {None: ("stalled", 1.38), "LR x100": ("healthy", 1.0), "LR x1000": ("healthy", 0.5)}
    tried = scripted(monkeypatch, outcomes)
    result = doctor(TeacherNet, None, steps=50, max_trials=3)
    assert tried == ["None", "LR x10", "LR x100", "LR x1000"]
    assert result.best is not None and result.best.name == "LR x1000"
    worse = scripted(monkeypatch, {**outcomes, "LR x10": ("healthy", 0.9), "LR x100": ("healthy", 1.0)})
    assert doctor(TeacherNet, None, steps=50, max_trials=2).best.name == "LR x10"  # type: ignore[union-attr]
    assert worse == ["None", "LR x10", "LR x100"]


def test_doctor_follows_an_overshoot_with_a_lower_lr_and_combines_when_nothing_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried = scripted(
        monkeypatch, {None: ("vanishing", 1.35), "re-init auto": ("exploding", math.inf), "LR /10": ("vanishing", 1.3)}
    )
    result = doctor(TeacherNet, None, steps=50, max_trials=8)
    # dead-unit-free ReLU vanishing: re-init, which overshoots -> re-init at LR /10; then the variant; then a pair.
    assert tried[:3] == ["None", "re-init auto", "re-init auto + LR /10"]
    assert tried[3] == "normalization" and len(tried) == 5 and " + " in tried[4]
    assert result.best is None and result.conclusion.startswith("Nothing tried repaired the run")
    capped = scripted(monkeypatch, {None: ("vanishing", 1.35)})
    doctor(TeacherNet, None, steps=50, max_trials=1)
    assert capped == ["None", "re-init auto"]


def test_combinations_pair_the_remedy_that_cured_the_verdict_with_the_ones_that_learned() -> None:
    # The IRNN of the repair bench: re-init leaves it at chance (vanishing), clipping tames the explosion without
    # learning, AdamW learns while still exploding; AdamW + clipping is what reaches its bar.
    tried = [
        Trial(reinitialisation(), "vanishing", "vanishing", 1.4, 1.39, 1.0),
        Trial(clipping(), "exploding", "exploding", 1.4, 56.8, 1.0),
        Trial(learning_rate(0.1), "exploding", "exploding", 1.4, math.inf, 1.0),
        Trial(optimizer_swap(), "exploding", "exploding", 1.4, 25.7, 1.0),
    ]
    pairs = [remedy.name for remedy in doctor_module._combinations(tried)]
    assert pairs == ["re-init auto + clip norm 1", "adamw instead of sgd + clip norm 1"]
    assert len(pairs) == doctor_module.COMBINATIONS


def test_a_healthy_run_costs_one_probe_and_is_left_alone() -> None:
    result = doctor(TeacherNet, None, steps=100)
    assert result.healthy and result.trials == [] and result.best is None
    assert "nothing to repair" in result.conclusion and result.cost == pytest.approx(1.0)


def test_the_doctor_cures_dead_relus_and_ranks_two_cures(tmp_path: Path) -> None:
    lines: list[str] = []
    result = doctor(lambda: TeacherNet(bias=-10.0), None, steps=100, log=lines.append)
    assert result.probe.verdict_class == "vanishing"
    # The plan for a ReLU net's vanishing: re-initialise; then a second opinion, the LayerNorm the model declares.
    assert [t.name for t in result.trials] == ["re-init auto", "normalization"]
    assert all(t.works and t.verdict_class == "healthy" for t in result.trials)
    best = result.best
    assert best is not None and best.final_loss == min(t.final_loss for t in result.trials)  # type: ignore[type-var]
    assert result.probe.final_loss is not None and best.final_loss is not None
    assert best.final_loss < 0.9 * math.log(4) < result.probe.final_loss  # learned; the probe sat near the prior
    assert len(lines) == 3 and all("-> repaired" in line for line in lines[1:])
    table = result.table().splitlines()
    assert table[2].startswith(f"| {best.name} | healthy") and table[-1].startswith("| probe (as configured)")
    figure = result.plot()
    assert len(figure.axes[0].lines) == 3
    figure.savefig(tmp_path / "doctor.png")


def test_doctor_result_ranks_repairs_first_then_by_loss() -> None:
    probe = trial(None, "exploding", math.inf)
    a, b, c = trial("a", "healthy", 0.9), trial("b", "healthy", 0.5), trial("c", "exploding", 0.1)
    a.works = b.works = True
    result = DoctorResult(probe, [a, c, b], 10)
    assert [t.name for t in result.ranked()] == ["b", "a", "c"] and result.best is b


def test_declared_variants_of_the_collection_build() -> None:
    from stabilize.models import DCGAN, BatchNormCNN, DeepPlainCNN, RecurrentNet, ResNet, TransformerLM

    plain = DeepPlainCNN(depth=20, activation="sigmoid", init="small_normal", init_scale=1.0)
    variants = plain.stabilize_variants()
    assert isinstance(variants["normalization"].build(plain), BatchNormCNN)
    residual = variants["residual"].build(plain)
    assert isinstance(residual, ResNet) and residual.hparams["activation"] == "sigmoid"
    assert variants["adamw"].build(plain).hparams["optimizer"] == "adamw"
    post = TransformerLM(vocab_size=16, context=8, depth=1, width=16, heads=2, norm_position="post")
    assert post.stabilize_variants()["pre_ln"].build(post).hparams["norm_position"] == "pre"
    rnn = RecurrentNet(cell="rnn_relu", init="identity", hidden_size=8)
    assert rnn.stabilize_variants()["gated_cell"].build(rnn).hparams["cell"] == "lstm"
    gan = DCGAN(loss="minimax", latent_dim=8, ngf=8, ndf=8)
    assert gan.stabilize_variants()["non_saturating_loss"].build(gan).hparams["loss"] == "non_saturating"
    assert "adamw" not in RecurrentNet().stabilize_variants()  # already Adam


def test_remedies_combine_and_say_themselves_in_python() -> None:
    both = reinitialisation() + learning_rate(0.1)
    assert both.name == "re-init auto + LR /10" and len(both.make_callbacks()) == 2
    assert both.python() == "Trainer(callbacks=[..., Reinitialize(scheme='auto'), LearningRateScale(factor=0.1)])"
    variant = Remedy("normalization", "structure", variant=Variant("LayerNorm", {"norm": True}))
    with pytest.raises(ValueError, match="two model variants"):
        variant + variant


def test_cures_without_a_loss_to_rank_them_keep_the_plan_s_order_not_their_speed() -> None:
    # A GAN's trials have no single loss: the first cure the plan tried wins, whichever trial ran faster.
    first = Trial(Remedy("non saturating loss", "structure"), "healthy", "healthy", None, None, 30.0, works=True)
    second = Trial(learning_rate(0.01), "healthy", "healthy", None, None, 5.0, works=True)
    result = DoctorResult(Trial(None, "collapse", "collapse", None, None, 10.0), [first, second], 100)
    assert result.best is first and result.ranked() == [first, second]


def test_plan_for_a_collapse_speeds_up_the_network_that_collapsed_after_the_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    declared = {"non_saturating_loss": Variant("non-saturating loss", {"loss": "non-saturating"})}
    monkeypatch.setattr(remedies_module, "class_of", lambda summary: summary["class"])
    quiet = {"explosions": [], "nonfinite": []}
    two = {"generator": {"class": "collapse", **quiet}, "discriminator": {"class": "healthy", **quiet}}
    findings = Findings.of("collapse", two, ("Adam", "Adam"))  # type: ignore[arg-type]
    assert findings.collapsed == ((0, "generator"),)
    families = names(plan(findings, RELU, declared, 3000))
    assert families[:3] == [
        ["non saturating loss"],
        ["LR x10 (generator)", "LR x100 (generator)"],
        ["LR /10", "LR /100"],
    ]
    faster = plan(findings, RELU, declared, 3000)[1][0].make_callbacks()[0]
    assert faster.optimizers == [0] and faster.factor == 10.0  # type: ignore[attr-defined]
    # One optimizer, or one that never stepped (no summary of its own): no network to speed up alone.
    assert Findings.of("collapse", {"generator": two["generator"]}, ("Adam",)).collapsed == ()  # type: ignore[arg-type]
    assert Findings.of("collapse", two, ("Adam", "Adam", "SGD")).collapsed == ()  # type: ignore[arg-type]


def test_repaired_by_a_monitored_metric_better_than_the_probe_s_and_its_own_start() -> None:
    probe = trial(None, "collapse", None, None, start_metric=8.5, final_metric=8.4)
    better = trial("a", "healthy", None, None, start_metric=8.5, final_metric=4.4)
    assert repaired(better, probe, None, [probe], "gap")
    assert not repaired(trial("a", "collapse", None, None, final_metric=0.1), probe, None, [probe], "gap")
    assert not repaired(trial("a", "healthy", None, None, start_metric=8.5, final_metric=8.6), probe, None, [], "gap")
    assert not repaired(trial("a", "healthy", None, None, final_metric=math.nan), probe, None, [probe], "gap")
    # "max": higher is better (an accuracy), judged against a validation value without a start.
    chance = trial(None, "vanishing", 1.38, start_metric=0.25, final_metric=0.26)
    assert repaired(trial("a", "healthy", 1.38, final_metric=0.9), chance, None, [chance], "acc", "max")
    assert not repaired(trial("a", "healthy", 0.1, final_metric=0.2), chance, None, [chance], "acc", "max")


def test_the_doctor_ranks_gan_cures_by_the_monitored_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repair bench's minimax GAN: the non-saturating loss cures the verdict but moves the generator halfway;
    its LR x10 reaches the data. Without a monitor the plan's order would pick the first cure."""
    metrics = {None: ("collapse", 8.4), "non saturating loss": ("healthy", 4.4)}
    metrics |= {"LR x10 (generator)": ("healthy", 0.1), "LR x100 (generator)": ("healthy", 0.6)}
    tried: list[str] = []

    def fake(model: Any, data: Any, remedy: Remedy | None, *args: Any) -> Trial:
        tried.append(str(None if remedy is None else remedy.name))
        verdict, gap = metrics.get(None if remedy is None else remedy.name, ("collapse", 8.5))
        quiet = {"explosions": [], "nonfinite": []}
        summaries = {"generator": {"class": verdict, **quiet}, "discriminator": {"class": "healthy", **quiet}}
        return Trial(
            remedy,
            verdict,
            verdict,
            None,
            None,
            1.0,
            summaries=summaries,
            optimizers=("Adam", "Adam"),  # type: ignore[arg-type]
            start_metric=8.5,
            final_metric=gap,
        )

    monkeypatch.setattr(doctor_module, "run_trial", fake)
    monkeypatch.setattr(remedies_module, "class_of", lambda summary: summary["class"])
    result = doctor(MinimaxStub, None, steps=100, monitor="gan/mean_gap")
    # The first cure, then a second opinion (the next family, one step further while it helps: x100 does not).
    assert tried == ["None", "non saturating loss", "LR x10 (generator)", "LR x100 (generator)"]
    assert result.best is not None and result.best.name == "LR x10 (generator)"
    assert "gan/mean_gap" in result.table().splitlines()[0]
    assert "gan/mean_gap 0.1 (the probe's 8.4)" in result.conclusion


class MinimaxStub(TeacherNet):
    """A module that declares the non-saturating loss (the doctor's plan reads only the declaration here)."""

    def stabilize_variants(self) -> dict[str, Variant]:
        return {"non_saturating_loss": Variant("the non-saturating loss", {"loss": "non-saturating"})}


def test_the_doctor_judges_a_real_run_by_a_logged_metric_and_refuses_one_never_logged() -> None:
    result = doctor(lambda: TeacherNet(bias=-10.0), None, steps=100, monitor="train/accuracy", mode="max")
    probe, best = result.probe, result.best
    assert probe.final_metric is not None and probe.final_metric < 0.55  # dead ReLUs: 0.45 (the best trial 0.81)
    assert best is not None and best.final_metric is not None and best.final_metric > probe.final_metric + 0.3
    assert best.final_metric == max(t.final_metric or 0.0 for t in result.trials)
    with pytest.raises(ConfigurationError, match=r"never logs 'train/acc'.*did you mean 'train/accuracy'"):
        doctor(TeacherNet, None, steps=5, monitor="train/acc")
    with pytest.raises(ConfigurationError, match="mode"):
        doctor(TeacherNet, None, steps=5, monitor="train/accuracy", mode="up")


class ValidatedTeacher(TeacherNet):
    """TeacherNet that logs its accuracy in validation only (a held-out metric)."""

    def validation_step(self, batch: tuple[Any, Any], batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(1) == y).float().mean())


class TeacherData(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(teacher(), batch_size=64, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(teacher(512, seed=1), batch_size=256)


def test_a_metric_logged_in_validation_only_is_measured_by_one_validation_pass_after_training() -> None:
    result = doctor(ValidatedTeacher, TeacherData(), steps=100, monitor="val/accuracy", mode="max")
    probe = result.probe
    assert result.healthy and probe.start_metric is None  # no training value: nothing to start from
    assert probe.final_metric is not None and 0.6 < probe.final_metric <= 1.0  # 100 Adam steps learn the teacher
