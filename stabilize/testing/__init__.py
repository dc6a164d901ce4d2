"""Helpers for tests, benchmarks and demos: synthetic data in the formats the library reads."""

from stabilize.testing.cifar10 import random_cifar10_folder, write_batch_file, write_cifar10_folder

__all__ = ["random_cifar10_folder", "write_batch_file", "write_cifar10_folder"]
