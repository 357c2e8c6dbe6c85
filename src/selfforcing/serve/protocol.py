"""The WebSocket protocol of ``selfforcing serve``: JSON messages, checked here, and frames as images.

Client -> server (one JSON object per message):
    {"type": "start", "prompt": str, "seed": int (optional), "image": data URL (optional, the first frame),
     "camera": bool (optional: video-to-video from frames the client sends), "strength": float in (0, 1]
     (optional, default 0.7: how far from the camera's frames)}
    {"type": "frame", "image": data URL}  (a camera frame, while a camera stream runs)
    {"type": "switch", "prompt": str, "mode": "recache" | "one-pass" | "keep" | "blend" | "reset" (optional,
     default the model's rule: its family's, else recache; inference/recache.py)}
    {"type": "stop"}
Server -> client:
    {"type": "started", "prompt", "height", "width", "fps", "frames_per_chunk", "camera"}
    {"type": "chunk", "index", "start", "frames": [data URL, ...], "prompt", "seconds",
     "first_chunk_ms", "frames_per_second"}  (the last two: since "start", and generation throughput)
    {"type": "switched", "prompt", "mode", "frame", "seconds"}
    {"type": "stopped", "frames", "reason"}  (also the answer to a stop with nothing running)
    {"type": "busy", "message"}   (every stream slot is taken; try again later)
    {"type": "error", "message"}  (a bad request; the connection stays open and the server keeps serving)
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.video_io import from_uint8, to_uint8
from ..inference.video_stream import SWITCH_MODES

MAX_PROMPT_CHARS = 500
MAX_MESSAGE_BYTES = 8 << 20  # a first image as a data URL fits easily
MAX_IMAGE_PIXELS = 4096 * 4096


class BadRequest(ValueError):
    """A message the server refuses; its text goes to the client as an ``error`` message."""


def parse_message(text: str | bytes) -> dict:
    """A client message as a checked dict (see the module docstring); raises ``BadRequest`` naming the problem."""
    if isinstance(text, bytes):
        raise BadRequest("send JSON text messages, not binary ones")
    if len(text) > MAX_MESSAGE_BYTES:
        raise BadRequest(f"message of {len(text)} bytes is too large (at most {MAX_MESSAGE_BYTES})")
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"not a JSON message ({e.msg} at character {e.pos})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BadRequest(f"not a JSON message the server can read ({e})") from None
    except RecursionError:
        raise BadRequest("not a JSON message the server can read (nested too deeply)") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadRequest('a message is a JSON object with a "type": "start", "frame", "switch" or "stop"')
    kind = msg["type"]
    known = {
        "start": {"type", "prompt", "seed", "image", "camera", "strength"},
        "frame": {"type", "image"},
        "switch": {"type", "prompt", "mode"},
        "stop": {"type"},
    }
    if kind not in known:
        raise BadRequest(f"unknown message type {kind!r}: expected one of {list(known)}")
    extra = set(msg) - known[kind]
    if extra:
        raise BadRequest(f"unknown field(s) {sorted(extra)} in a {kind!r} message: expected {sorted(known[kind])}")
    if kind == "frame" and not isinstance(msg.get("image"), str):
        raise BadRequest("a frame message carries its image as a data URL string")
    if kind in ("start", "switch"):
        msg["prompt"] = check_prompt(msg.get("prompt"))
    if kind == "start":
        seed = msg.setdefault("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise BadRequest(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(msg.setdefault("camera", False), bool):
            raise BadRequest(f"camera must be true or false, got {msg['camera']!r}")
        strength = msg.setdefault("strength", 0.7)
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise BadRequest(f"strength must be a number in (0, 1], got {strength!r}")
        if msg["camera"] and "image" in msg:
            raise BadRequest("a camera stream takes no first image")
    if kind == "switch":
        mode = msg.setdefault("mode", None)  # None: the model's own rule (its family's, else recache)
        if mode is not None and mode not in SWITCH_MODES:
            raise BadRequest(f"switch mode must be one of {list(SWITCH_MODES)}, got {mode!r}")
    return msg


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise BadRequest(f"the prompt must be a string, got {type(prompt).__name__}")
    prompt = " ".join(prompt.split())
    if not prompt:
        raise BadRequest("the prompt is empty: type what the video should show")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return prompt


def decode_image(data_url: str, what: str = "the first image") -> torch.Tensor:
    """A ``data:image/...;base64,...`` URL (or bare base64) -> ``[1, 3, H, W]`` in [-1, 1].

    Any failure (bad base64, not an image, a truncated or corrupt file, a header claiming more than
    ``MAX_IMAGE_PIXELS``) raises ``BadRequest``. The size is checked from the header, before decoding."""
    if not isinstance(data_url, str):
        raise BadRequest(f"{what} must be a data URL string (data:image/png;base64,...)")
    if data_url.startswith("data:"):
        _, comma, payload = data_url.partition(",")
        if not comma:
            raise BadRequest(f"{what}'s data URL has no comma: expected data:image/png;base64,<data>")
    else:
        payload = data_url
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{what} is not valid base64 ({e})") from None
    try:  # opening reads the header only: the size is refused before any pixel is decoded
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadRequest(f"{what} is {im.width}x{im.height}: at most {MAX_IMAGE_PIXELS} pixels")
            rgb = np.array(im.convert("RGB"))
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest(f"{what} is not an image file (png, jpeg, ...)") from None
    except Image.DecompressionBombError:  # Pillow's own guard, from the header, for the most absurd sizes
        raise BadRequest(f"{what} claims more than {MAX_IMAGE_PIXELS} pixels") from None
    except Exception as e:  # a truncated or corrupt file: Pillow raises OSError, SyntaxError, zlib.error, ...
        raise BadRequest(f"{what} could not be decoded ({type(e).__name__}: {e})") from None
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or 0 in rgb.shape:
        raise BadRequest(f"{what} decoded to an array of shape {rgb.shape}, not an RGB picture")
    return from_uint8(rgb[None])


def encode_frame(frame: np.ndarray) -> str:
    """One frame ``[H, W, 3]`` uint8 -> a data URL (PNG for small frames, JPEG for large ones)."""
    small = frame.shape[0] * frame.shape[1] <= 128 * 128
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG" if small else "JPEG", quality=90)
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buf.getvalue()).decode()


def encode_frames(frames: torch.Tensor) -> list[str]:
    """Frames ``[F, 3, H, W]`` in [-1, 1] -> one data URL each (see ``encode_frame``)."""
    return [encode_frame(frame) for frame in to_uint8(frames)]
