"""``selfforcing serve``: one page and a WebSocket that streams a causal student chunk by chunk.

Each connection runs at most one generation (a ``VideoStream``), in a worker thread so that the server
keeps answering while a chunk is computed. Prompt switches queue up and apply between chunks. The
stream is paced to stay at most ``lead`` seconds ahead of playback, so a switch shows within about a
chunk. A connection beyond ``max_streams`` gets a ``busy`` answer. A bad request gets an ``error``
message, and the server keeps serving. When a client goes away, its generation stops and its stream
(KV cache and all) is dropped. The messages are listed in ``protocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources

import torch

from ..inference.video_stream import VideoStream
from .protocol import MAX_MESSAGE_BYTES, BadRequest, decode_image, encode_frames, parse_message


@dataclass
class StreamSource:
    """What the server streams: ``open(prompt, seed, image) -> VideoStream`` (image ``[1, 3, H, W]`` or None)
    and the video's size, playback rate and a name for the page."""

    open: Callable[[str, int, torch.Tensor | None], VideoStream]
    height: int
    width: int
    fps: float
    name: str


def toy_source(checkpoint: str, device: str = "cpu") -> StreamSource:
    """A shapes-world causal student (a run, a checkpoint or a shipped name such as ``sf_dmd_chunk_toy``)."""
    from ..inference.pipeline import load_pipeline

    pipe = load_pipeline(checkpoint, device=device)
    if pipe.cfg.causal is None:
        raise ValueError(f"{checkpoint} is a bidirectional model: serve a causal student (e.g. sf_dmd_chunk_toy)")
    d = pipe.cfg.data
    return StreamSource(lambda p, s, im: pipe.open_stream([p], s, im), d.height, d.width, 8.0, str(checkpoint))


def wan_source(folder: str, checkpoint: str, device: str = "auto", height: int = 480, width: int = 832) -> StreamSource:
    """A Wan2.1 folder with a Self Forcing checkpoint, at ``height x width`` (16 frames/s)."""
    from ..wan.pipeline import load_wan

    pipe = load_wan(folder, checkpoint, device=device)
    pipe.check_size(1, height, width)
    return StreamSource(
        lambda p, s, im: pipe.open_stream([p], height, width, s, image=im), height, width, 16.0, str(checkpoint)
    )


@dataclass
class Session:
    """One connection's generation: its task, the switches waiting for the next chunk boundary."""

    task: asyncio.Task | None = None
    switches: list[tuple[str, str]] = field(default_factory=list)


class StreamServer:
    """The aiohttp application around a ``StreamSource`` (``app()``), with a limit on concurrent streams.

    ``max_frames``: a stream ends after that many frames (0: never, until the client stops it);
    ``lead``: seconds of video the stream may run ahead of real-time playback."""

    def __init__(self, source: StreamSource, max_streams: int = 2, max_frames: int = 0, lead: float = 1.0):
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.source, self.max_streams, self.max_frames, self.lead = source, max_streams, max_frames, lead
        self.active = 0  # streams generating now
        self.executor = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="stream")

    def app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/health", self.health)
        app.on_shutdown.append(lambda _: self._shutdown())
        return app

    async def _shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def page(self, request):
        from aiohttp import web

        html = resources.files(__package__).joinpath("page.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def health(self, request):
        from aiohttp import web

        s = self.source
        return web.json_response(
            {"model": s.name, "active": self.active, "max_streams": self.max_streams, "size": [s.height, s.width]}
        )

    async def websocket(self, request):
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=30)
        await ws.prepare(request)
        session = Session()
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                try:
                    await self._handle(ws, session, parse_message(msg.data))
                except BadRequest as e:
                    await ws.send_json({"type": "error", "message": str(e)})
        finally:  # the client went away (or stopped): stop its generation, free its stream
            if session.task is not None:
                session.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await session.task
        return ws

    async def _handle(self, ws, session: Session, msg: dict) -> None:
        running = session.task is not None and not session.task.done()
        if msg["type"] == "start":
            if running:
                raise BadRequest("a stream is already running on this connection: stop it first")
            if self.active >= self.max_streams:
                await ws.send_json(
                    {"type": "busy", "message": f"all {self.max_streams} stream slots are in use; try again shortly"}
                )
                return
            image = decode_image(msg["image"]) if msg.get("image") is not None else None
            self.active += 1
            session.switches.clear()
            session.task = asyncio.create_task(self._generate(ws, session, msg["prompt"], msg["seed"], image))
        elif msg["type"] == "switch":
            if not running:
                raise BadRequest("no stream is running: start one first")
            session.switches.append((msg["prompt"], msg["mode"]))
        elif running:  # stop
            session.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.task
            await ws.send_json({"type": "stopped", "reason": "stopped by the client"})

    async def _generate(self, ws, session: Session, prompt: str, seed: int, image: torch.Tensor | None) -> None:
        """Open the stream, then chunk after chunk until stopped, ``max_frames`` or an error."""
        loop, src = asyncio.get_running_loop(), self.source
        t0 = time.perf_counter()
        stream, frames, compute, first_ms, reason = None, 0, 0.0, None, "ended"
        try:
            try:
                stream = await loop.run_in_executor(self.executor, src.open, prompt, seed, image)
            except ValueError as e:  # unknown words, an image of the wrong size, ...
                await ws.send_json({"type": "error", "message": str(e)})
                return
            fpb = stream.settings.frames_per_block
            await ws.send_json(
                {"type": "started", "prompt": prompt, "height": src.height, "width": src.width, "fps": src.fps}
                | {"frames_per_chunk": fpb}
            )
            while not self.max_frames or frames < self.max_frames:
                while session.switches:
                    new, mode = session.switches.pop(0)
                    try:
                        secs = await loop.run_in_executor(self.executor, stream.switch_prompt, [new], mode)
                    except ValueError as e:  # the stream goes on with the prompt it had
                        await ws.send_json({"type": "error", "message": str(e)})
                        continue
                    await ws.send_json(
                        {"type": "switched", "prompt": new, "mode": mode, "frame": frames} | {"seconds": secs}
                    )
                chunk = await loop.run_in_executor(self.executor, next, stream)
                compute += chunk.seconds
                images = await loop.run_in_executor(self.executor, encode_frames, chunk.frames[0].float().cpu())
                frames += len(images)
                if first_ms is None:
                    first_ms = (time.perf_counter() - t0) * 1000
                    t_play = time.perf_counter()  # playback of frame 0 starts when it arrives
                await ws.send_json(
                    {"type": "chunk", "index": chunk.index, "start": frames - len(images), "frames": images}
                    | {"prompt": chunk.prompts[0], "seconds": chunk.seconds, "first_chunk_ms": first_ms}
                    | {"frames_per_second": frames / compute if compute > 0 else 0.0}
                )
                ahead = frames / src.fps - (time.perf_counter() - t_play)
                if ahead > self.lead:
                    await asyncio.sleep(ahead - self.lead)
            reason = f"reached the server's limit of {self.max_frames} frames"
        except ConnectionResetError:  # the client is gone: nothing to tell it
            reason = "client gone"
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        except Exception as e:  # a failure inside the model: tell the client, keep serving
            with contextlib.suppress(Exception):
                await ws.send_json({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
        finally:
            self.active -= 1  # the stream (its KV cache) goes with this coroutine's frame
            if reason.startswith("reached") and not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.send_json({"type": "stopped", "frames": frames, "reason": reason})


def serve(source: StreamSource, host: str = "127.0.0.1", port: int = 7860, **kw) -> None:
    """Run the server until interrupted (``kw``: ``StreamServer``'s limits)."""
    from aiohttp import web

    print(f"serving {source.name} ({source.width}x{source.height}) on http://{host}:{port}/")
    web.run_app(StreamServer(source, **kw).app(), host=host, port=port, print=None)
