"""Metrics that need no download: image quality measured with a classifier this project trains."""

from stabilize.metrics.classifier_features import ClassifierFeatures, classifier_quality_metrics, quality_metrics

__all__ = ["ClassifierFeatures", "classifier_quality_metrics", "quality_metrics"]
