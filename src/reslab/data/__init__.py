"""Datasets in their official formats, the paper's pipelines, and fast loaders."""
from .normalize import Normalizer
from .resident import ResidentLoader

__all__ = ["Normalizer", "ResidentLoader"]
