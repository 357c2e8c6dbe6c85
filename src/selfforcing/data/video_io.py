"""Reading and writing videos (mp4 through imageio-ffmpeg, gif through Pillow) and captioned grids."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def uint8_on_device(video: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [-1, 1] -> [..., H, W, 3] uint8, where ``video`` is."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> [F, H, W, 3] uint8 on the host."""
    return uint8_on_device(video).cpu().numpy()


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [F, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1


def read_video(path: str | Path) -> np.ndarray:
    """All frames of an mp4/gif/... as ``[F, H, W, 3]`` uint8; a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        frames = iio.imread(path, index=None)
    except Exception as e:  # imageio raises many types for bad files
        raise ValueError(f"could not read video {path}: {e}") from e
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single image or greyscale frames
        frames = frames[None] if frames.shape[-1] in (3, 4) else frames[..., None]
    if frames.ndim != 4:
        raise ValueError(f"video {path} decoded to an array of shape {frames.shape}, expected [F, H, W, C]")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames[..., :3].astype(np.uint8)


def read_image(path: str | Path) -> torch.Tensor:
    """An image file (png, jpg, ...; a video's first frame) as ``[1, 3, H, W]`` in [-1, 1]."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        frames = read_video(path)
    except ValueError as e:
        raise ValueError(f"could not read {path} as an image: {e}") from e
    return from_uint8(frames[:1])


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write ``[F, H, W, 3]`` uint8 frames. ``.mp4`` needs imageio-ffmpeg; on failure a ``.gif`` is written
    beside it instead. Returns the path actually written.

    GIFs play back exactly, but Pillow stores identical consecutive frames once (with a longer
    duration), so reading a GIF of a static scene gives fewer frames: use mp4 for datasets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4":
        try:
            even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # yuv420p needs even sizes
            iio.imwrite(
                path,
                even,
                fps=fps,
                codec="libx264",
                macro_block_size=1,
                quality=None,
                output_params=["-crf", "12"],
                plugin="FFMPEG",
            )
            return path
        except Exception as e:  # no ffmpeg binary, codec missing, ...
            print(f"mp4 writing failed ({e}); writing a gif instead")
            path = path.with_suffix(".gif")
    if path.suffix != ".gif":
        raise ValueError(f"unsupported video extension {path.suffix!r}: use .mp4 or .gif")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


class VideoWriter:
    """Write a video progressively: ``with VideoWriter("out.mp4") as w: w.append(frames)`` for each chunk.

    mp4 frames go to ffmpeg as they arrive (readable as soon as the writer closes, frames flushed as
    encoded); gif frames are collected and written on close. Falls back to a gif if ffmpeg fails.
    """

    def __init__(self, path: str | Path, fps: float = 8.0):
        self.path = Path(path)
        self.fps = fps
        if self.path.suffix not in (".mp4", ".gif"):
            raise ValueError(f"unsupported video extension {self.path.suffix!r}: use .mp4 or .gif")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._frames: list[np.ndarray] = []  # everything so far (for the gif path and the mp4 fallback)
        self._ffmpeg = None

    def append(self, frames: np.ndarray) -> None:
        """frames: [F, H, W, 3] uint8."""
        self._frames.extend(frames)
        if self.path.suffix != ".mp4":
            return
        even = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        try:
            if self._ffmpeg is None:
                import imageio_ffmpeg

                size = (even.shape[2], even.shape[1])
                self._ffmpeg = imageio_ffmpeg.write_frames(
                    str(self.path),
                    size,
                    fps=self.fps,
                    codec="libx264",
                    macro_block_size=1,
                    output_params=["-crf", "12"],
                )
                self._ffmpeg.send(None)  # start the encoder
            for frame in even:
                self._ffmpeg.send(np.ascontiguousarray(frame))
        except Exception as e:  # no ffmpeg binary, codec missing, ...
            print(f"mp4 writing failed ({e}); writing a gif instead")
            self.path = self.path.with_suffix(".gif")
            self._ffmpeg = None

    def close(self) -> Path:
        """Finish the file; returns the path actually written."""
        if self._ffmpeg is not None:
            self._ffmpeg.close()
        elif self._frames:
            write_video(self.path, np.stack(self._frames), self.fps)
        return self.path

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def video_grid(
    videos: torch.Tensor, captions: list[str] | None = None, scale: int = 4, columns: int | None = None
) -> np.ndarray:
    """Tile videos ``[N, F, 3, H, W]`` (in [-1, 1]) into one ``[F, H', W', 3]`` uint8 video, each tile
    upscaled ``scale`` times (nearest) with its caption printed underneath."""
    n, f, _, h, w = videos.shape
    cols = columns or min(n, 4)
    rows = math.ceil(n / cols)
    th, tw = h * scale, w * scale
    font = ImageFont.load_default()
    chars = max(8, tw // 6)
    lines = [textwrap.wrap(c, chars) for c in (captions or [""] * n)]
    cap_h = 11 * max((len(ls) for ls in lines), default=0) + (4 if captions else 0)
    pad = 2
    grid = np.full((f, rows * (th + cap_h + pad), cols * (tw + pad), 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = r * (th + cap_h + pad), c * (tw + pad)
        tile = to_uint8(videos[i]).repeat(scale, axis=1).repeat(scale, axis=2)
        grid[:, y0 : y0 + th, x0 : x0 + tw] = tile
        if captions:
            strip = Image.new("RGB", (tw, cap_h), (255, 255, 255))
            ImageDraw.Draw(strip).multiline_text((2, 2), "\n".join(lines[i]), fill=(0, 0, 0), font=font, spacing=1)
            grid[:, y0 + th : y0 + th + cap_h, x0 : x0 + tw] = np.asarray(strip)[None]
    return grid
