"""Sampling trained models."""

from .generate import generate_videos
from .pipeline import Pipeline, build_model, load_pipeline

__all__ = ["Pipeline", "build_model", "generate_videos", "load_pipeline"]
