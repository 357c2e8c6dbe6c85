"""Data: the built-in shapes world and a loader for the user's own videos."""

from .shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesBatch,
    ShapesWorld,
    ShapesWorldConfig,
    describe,
    parse_prompt,
)
from .video_folder import VideoFolder

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "SIZES",
    "ShapeObject",
    "ShapesBatch",
    "ShapesWorld",
    "ShapesWorldConfig",
    "VideoFolder",
    "describe",
    "parse_prompt",
]
