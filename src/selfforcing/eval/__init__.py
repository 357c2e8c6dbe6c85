"""Measuring generated videos: the shapes-world analyser."""

from .analyser import FrameScores, analyse_batch, analyse_video

__all__ = ["FrameScores", "analyse_batch", "analyse_video"]
