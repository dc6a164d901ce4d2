"""Metrics that need no download: image quality measured with a classifier this project trains."""

from stabilize.metrics.classifier_features import (
    SHIPPED_CLASSIFIER,
    ClassifierFeatures,
    classifier_quality_metrics,
    quality_metrics,
    shipped_classifier,
)

__all__ = [
    "SHIPPED_CLASSIFIER",
    "ClassifierFeatures",
    "classifier_quality_metrics",
    "quality_metrics",
    "shipped_classifier",
]
