from __future__ import annotations

import sys

import matplotlib
from torch import nn

from stabilize.health import ModelTraits, diagnosis_lines, flow_figure, model_hints, verdict, verdict_class
from stabilize.models import BatchNormCNN, DeepPlainCNN
from tests.helpers.health import health_summary as summary
from tests.helpers.health import spike

EXPLOSION = {"first_step": 3, "last_step": 9, "steps": 7, "max_norm": 5e4, "peak_ratio": 80.0, "rule": "persistent"}


def test_remedies_are_generic_and_model_hints_are_added() -> None:
    exploding = summary(explosions=[EXPLOSION])
    generic = "\n".join(diagnosis_lines(exploding, None))
    assert "EXPLODING: 7 step(s)" in generic and "steps 3-9" in generic and "gradient_clip_val" in generic
    assert "rule 'persistent'" in generic
    assert "--model." not in generic and "ResNet" not in generic
    hinted = "\n".join(diagnosis_lines(exploding, None, hints={"exploding": "use MyNet's warm-up flag"}))
    assert "use MyNet's warm-up flag" in hinted


def test_manual_optimization_is_told_to_clip_in_its_training_step() -> None:
    from stabilize.models import DCGAN

    exploding = summary(explosions=[EXPLOSION])
    lines = "\n".join(diagnosis_lines(exploding, None, ModelTraits.of(DCGAN(ngf=8, ndf=8))))
    assert "self.clip_gradients" in lines and "Trainer(gradient_clip_val" not in lines


def test_a_depth_ratio_far_above_one_is_explained() -> None:
    text = "\n".join(diagnosis_lines(summary(), None))
    assert "6.63e+02" in text and "more gradient than the output side" in text and "Healthy" in text
    assert verdict(summary()) == "healthy"


def test_models_of_the_collection_supply_their_own_hints_and_others_none() -> None:
    assert "BatchNormCNN" in model_hints(DeepPlainCNN(depth=8))["vanishing"]
    assert "vanishing" not in model_hints(BatchNormCNN(depth=8))
    assert model_hints(nn.Linear(2, 2)) == {}
    traits = ModelTraits.of(DeepPlainCNN(depth=8, activation="sigmoid"))
    assert traits.saturating and not traits.normalization


def test_flow_figure_leaves_the_matplotlib_backend_alone() -> None:
    backend = matplotlib.get_backend()
    figure = flow_figure(["a", "b"], [1e-9, 1.0], vanishing_floor=1e-8, exploding_threshold=1e3)
    assert figure.axes[0].get_yscale() == "log"
    assert matplotlib.get_backend() == backend
    assert "matplotlib.pyplot" not in sys.modules or backend == matplotlib.get_backend()


def test_the_verdict_names_every_finding_worst_first_and_transient_spikes_as_a_note() -> None:
    everything = summary(
        explosions=[EXPLOSION],
        nonfinite=[{"first_step": 12, "last_step": 12, "tensors": 2, "layers": ["fc"]}],
        vanishing_layers_now={"a": 5},
        ever_vanished={"a": 5},
        last_temporal_ratio={"ratio": 1e-6, "step": 20},
        gradient_collapse={"factor": 300.0, "from_norm": 1.0, "from_step": 0, "to_norm": 3e-3, "since_step": 90},
        transient_spikes=[spike(40), spike(70, peak_ratio=37.0)],
    )
    assert verdict(everything) == (
        "non-finite gradients (from step 12), exploding (7 steps from step 3, peak 80x the median; persistent),"
        " vanishing (1/4 layers), vanishing through time (t=0 gets 1e-06 of the last step's gradient),"
        " gradient collapsed (300x down); 2 transient spikes (peak 37x the median at step 70, each over within 1 step)"
    )
    assert verdict_class(everything) == "exploding"
    # Layers that vanished at some logged step and recovered are in the diagnosis, not in the verdict: which steps
    # are logged depends on the cadence, the verdict must not. An event without its peak's step names its span.
    calm = summary(transient_spikes=[spike(40, 41, peak_ratio=12.0)], ever_vanished={"a": 30})
    assert verdict(calm) == "healthy; 2 transient spikes (peak 12x the median at step 40-41, each over within 2 steps)"
    peaked = summary(transient_spikes=[spike(40, 45, peak_ratio=12.0, peak_step=44)])
    assert verdict(peaked) == "healthy; 6 transient spikes (peak 12x the median at step 44, each over within 6 steps)"
    assert verdict_class(calm) == "healthy"
    lines = "\n".join(diagnosis_lines(calm, None))
    assert "Transient:" in lines and "at steps 40-41" in lines and "Healthy: no action needed" in lines


def test_a_small_gradient_at_t0_is_no_finding_in_a_run_that_learned() -> None:
    # A tanh RNN that learned to recall a token 60 steps back (loss 1.38 -> 0.10) still read 1e-4 at t=0: once a
    # memory is held its gradient back to t=0 decays. Vanishing through time is a finding only while the loss did
    # not fall by half (the failing runs stay at their start: progress ~0).
    stuck = summary(last_temporal_ratio={"ratio": 1e-4, "step": 290}, loss_progress=0.01)
    learned = summary(last_temporal_ratio={"ratio": 1e-4, "step": 290}, loss_progress=0.93)
    assert verdict_class(stuck) == "vanishing" and "vanishing through time" in verdict(stuck)
    assert verdict_class(learned) == "healthy" and verdict(learned) == "healthy"
    lines = "\n".join(diagnosis_lines(learned, None))
    assert "The loss fell 93% all the same" in lines and "gated cells" not in lines
    assert verdict_class(summary(last_temporal_ratio={"ratio": 1e-4, "step": 290})) == "vanishing"  # no loss known


def test_layer_labels_drop_the_shared_prefix_but_never_read_as_numbers() -> None:
    from stabilize.health.figures import short_names

    assert short_names(["network.stages.0.conv", "network.stages.1.conv"]) == ["0.conv", "1.conv"]
    # An nn.Sequential of blocks: "0.0" ... "19.2" would read as numbers on the axis.
    assert short_names(["network.0.0", "network.19.2"]) == ["network.0.0", "network.19.2"]
    assert short_names(["model.net.0", "model.net.1"]) == ["net.0", "net.1"]
