"""A client's camera as the input of a video-to-video stream (``VideoStream(video=...)`` takes any object with
``take``). Frames arrive over the WebSocket at the camera's pace; each chunk takes the frames that came since
the chunk before, resampled to the count it needs (nearest index), as Krea Realtime's webcam mode does.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

MAX_WAITING = 64  # frames kept between two chunks (the oldest are dropped)


class CameraFrames:
    """``push`` frames ``[1, 3, h, w]`` in [-1, 1] as they arrive (resized to ``height x width``); ``take(n)``
    blocks until at least one new frame is there, then returns ``[1, n, 3, height, width]``, or None once
    ``close``d. A camera that sends nothing for ``wait`` seconds is an error the client is told about."""

    def __init__(self, height: int, width: int, wait: float = 30.0):
        self.height, self.width, self.wait = height, width, wait
        self._new: list[torch.Tensor] = []
        self._cond = threading.Condition()
        self.closed = False
        self.received = 0

    def push(self, frame: torch.Tensor) -> None:
        if frame.shape[-2:] != (self.height, self.width):
            frame = F.interpolate(frame, size=(self.height, self.width), mode="bilinear", antialias=True)
        with self._cond:
            self._new = [*self._new, frame.clamp(-1, 1)][-MAX_WAITING:]
            self.received += 1
            self._cond.notify_all()

    def take(self, n: int) -> torch.Tensor | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._new or self.closed, timeout=self.wait):
                raise ValueError(
                    f"no camera frame arrived within {self.wait:.0f} s: a camera stream needs the page to send "
                    "frames ({'type': 'frame', 'image': data URL})"
                )
            if not self._new:
                return None
            frames, self._new = self._new, []
        last = len(frames) - 1
        index = [round(i * last / (n - 1)) for i in range(n)] if n > 1 else [last]
        return torch.cat([frames[i] for i in index])[None]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
