"""Sampling models: the chunk loop, streams (rolling, rebuilt, switched), and many-step sampling.

Building a model from a config or a checkpoint is ``selfforcing.pipeline``'s."""

from .generate import generate_videos

__all__ = ["generate_videos"]
