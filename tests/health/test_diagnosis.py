from __future__ import annotations

import sys

import matplotlib
from torch import nn

from stabilize.health import ModelTraits, diagnosis_lines, flow_figure, model_hints, verdict
from stabilize.models import BatchNormCNN, DeepPlainCNN
from tests.helpers.health import health_summary as summary


def test_remedies_are_generic_and_model_hints_are_added() -> None:
    exploding = summary(explosions=[{"first_step": 3, "last_step": 3, "steps": 1, "max_norm": 5e4}])
    generic = "\n".join(diagnosis_lines(exploding, None))
    assert "EXPLODING: 1 step(s)" in generic and "gradient_clip_val" in generic
    assert "--model." not in generic and "ResNet" not in generic
    hinted = "\n".join(diagnosis_lines(exploding, None, hints={"exploding": "use MyNet's warm-up flag"}))
    assert "use MyNet's warm-up flag" in hinted


def test_manual_optimization_is_told_to_clip_in_its_training_step() -> None:
    from stabilize.models import DCGAN

    exploding = summary(explosions=[{"first_step": 3, "last_step": 3, "steps": 1, "max_norm": 5e4}])
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
