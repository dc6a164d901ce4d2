"""One LightningModule per architecture variant, from the deliberately fragile to the stabilized."""

from stabilize.models.base import ImageClassifier
from stabilize.models.epoch_means import DeviceLoggedModule, EpochMeans
from stabilize.models.fast import FastCNN
from stabilize.models.gan import DCGAN
from stabilize.models.plain import BatchNormCNN, DeepPlainCNN, PlainCNN
from stabilize.models.recipe import TrainingRecipe
from stabilize.models.recurrent import RecurrentNet
from stabilize.models.resnet import FixupResNet, ResNet
from stabilize.models.transformer import TransformerLM

__all__ = [
    "DCGAN",
    "BatchNormCNN",
    "DeepPlainCNN",
    "DeviceLoggedModule",
    "EpochMeans",
    "FastCNN",
    "FixupResNet",
    "ImageClassifier",
    "PlainCNN",
    "RecurrentNet",
    "ResNet",
    "TrainingRecipe",
    "TransformerLM",
]
