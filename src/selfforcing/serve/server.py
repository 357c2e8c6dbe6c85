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
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources

import torch

from ..inference.chunks import Chunk
from ..inference.video_stream import VideoStream
from .camera import CameraFrames
from .protocol import MAX_MESSAGE_BYTES, BadRequest, decode_image, encode_frame, parse_message

log = logging.getLogger(__name__)


@dataclass
class StreamSource:
    """What the server streams: ``open(prompt, seed, image, video=None, strength=1.0) -> VideoStream`` (image
    ``[1, 3, H, W]`` or None; video: a live input such as a ``CameraFrames``)
    and the video's size, playback rate and a name for the page. ``room()``: why a new stream cannot be
    opened now (not enough free GPU memory), or None."""

    open: Callable[..., VideoStream]  # (prompt, seed, image, video=None, strength=1.0)
    height: int
    width: int
    fps: float
    name: str
    room: Callable[[], str | None] = lambda: None
    switch_mode: str = "recache"  # a switch that names no mode: the model's family's rule


# GPU bytes a stream's decoder holds and works in, per video pixel, besides the KV cache: the Wan VAE's causal
# state and its working memory for one latent frame (1.76 + 2.0 GiB at 832x480), TAEW2.1's (0.74 GiB);
# measured by benchmarks/memory.py (docs/streaming.md#memory)
DECODER_BYTES_PER_PIXEL = {"WanVAE": 3.76 * 2**30 / (480 * 832), "TAEW21": 0.74 * 2**30 / (480 * 832)}


def gpu_room(needed: int, device: torch.device) -> str | None:
    """A refusal if ``device`` (CUDA) has less than ``needed`` bytes free, counting what PyTorch's cache holds."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if needed <= free:
        return None
    return (
        f"no GPU memory for another stream: it needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are "
        "free; try again when a stream ends (or start the server with --low-memory)"
    )


def stream_bytes(model, codec, settings, height: int, width: int) -> int:
    """About the GPU bytes one more stream takes: its KV cache (exactly: built on the meta device, which
    allocates nothing) and its decoder's state and working memory (``DECODER_BYTES_PER_PIXEL``)."""
    from ..models.kv_cache import KVCache

    _, _, h, w = codec.latent_shape(1, height, width)
    _, gh, gw = model.dit.token_grid(settings.frames_per_block, h, w)
    layout = (1, gh * gw, settings.frames_per_block, settings.window, settings.sink)
    cache = KVCache.for_model(model.dit, *layout, device="meta", **settings.cache_options())
    return cache.nbytes + int(DECODER_BYTES_PER_PIXEL.get(type(codec).__name__, 0.0) * height * width)


def toy_source(
    checkpoint: str, device: str = "cpu", compile: bool = False, kv_cache: str | None = None, family: str | None = None
) -> StreamSource:
    """A shapes-world causal student (a run, a checkpoint or a shipped name such as ``sf_dmd_chunk_toy``);
    ``kv_cache``: ``causal.kv_cache`` for its streams (None: the model's); ``family``: stream it by that
    released model's rules (``families.Family.rules_for``)."""
    from ..families import family as family_named
    from ..pipeline import load_pipeline, stream_settings

    pipe = load_pipeline(checkpoint, device=device)
    if pipe.cfg.causal is None:
        raise ValueError(f"{checkpoint} is a bidirectional model: serve a causal student (e.g. sf_dmd_chunk_toy)")
    if compile:
        pipe.model.dit.compile_blocks()
    settings = stream_settings(pipe.cfg)
    fam = family_named(family) if family else None
    if fam:
        settings = fam.rules_for(settings)
    settings = replace(settings, kv_cache=kv_cache or settings.kv_cache)
    d = pipe.cfg.data
    return StreamSource(
        lambda p, s, im, **kw: pipe.open_stream([p], s, im, settings, overlap_decode=True, **kw),
        d.height,
        d.width,
        8.0,
        f"{checkpoint} ({fam.title}'s rules)" if fam else str(checkpoint),
        switch_mode=fam.switch if fam else "recache",
    )


def wan_source(
    folder: str,
    checkpoint: str,
    height: int = 480,
    width: int = 832,
    compile: bool = False,
    kv_cache: str | None = None,
    **load_options,
) -> StreamSource:
    """A Wan2.1 folder with a Self Forcing checkpoint, at ``height x width`` (16 frames/s). ``load_options``
    go to ``load_wan`` (``device``, ``offload_text_encoder``, ``preview_decoder``, ...); ``kv_cache``:
    ``causal.kv_cache`` for its streams (None: the checkpoint's)."""
    from ..wan.pipeline import RELEASED_CAUSAL, load_wan

    pipe = load_wan(folder, checkpoint, **load_options)
    pipe.check_size(1, height, width)
    if compile:
        pipe.model.dit.compile_blocks()
    settings = replace(pipe.causal, kv_cache=kv_cache or pipe.causal.kv_cache)
    settings = replace(settings, window=settings.window or RELEASED_CAUSAL.window)
    needed = stream_bytes(pipe.model, pipe.codec, settings, height, width)
    device = next(pipe.model.dit.parameters()).device
    return StreamSource(
        lambda p, s, im, **kw: pipe.open_stream([p], height, width, s, settings, image=im, overlap_decode=True, **kw),
        height,
        width,
        16.0,
        f"{checkpoint} ({pipe.family.title})" if pipe.family else str(checkpoint),
        room=lambda: gpu_room(needed, device),
        switch_mode=pipe.switch_mode,
    )


class Slots:
    """The server's stream slots, counted in one place: ``take`` when a stream is started, ``give_back``
    when its generation (worker thread included) has ended, whatever way it ended."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"max_streams must be >= 1, got {limit}")
        self.limit, self.taken = limit, 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give_back(self) -> None:
        assert self.taken > 0, "a slot given back twice"
        self.taken -= 1


@dataclass
class Session:
    """One connection's generation: its task, the switches waiting for the next chunk boundary, and the
    flag its worker thread reads before it starts a chunk."""

    task: asyncio.Task | None = None
    switches: deque[tuple[str, str]] = field(default_factory=deque)
    stop: threading.Event = field(default_factory=threading.Event)
    drop: Callable[[], None] = lambda: None  # cuts the connection (a client that stopped reading)
    holds_slot: bool = False
    camera: CameraFrames | None = None  # a video-to-video stream's input, fed by the client's frames


async def settle(future: asyncio.Future | None) -> None:
    """Wait until a worker thread's ``future`` is done, through any cancellation of the caller."""
    while future is not None and not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])


async def until_done(future: asyncio.Future):
    """Await a worker thread's ``future``. A cancellation first waits for the thread to finish (a thread
    cannot be interrupted inside a chunk, and its stream must not outlive its slot), then propagates."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await settle(future)
        raise


class ClientTooSlow(Exception):
    """A chunk could not be sent within ``send_timeout``: the client stopped reading."""


class StreamServer:
    """The aiohttp application around a ``StreamSource`` (``app()``), with a limit on concurrent streams.

    ``max_frames``: a stream ends after that many frames (0: never, until the client stops it);
    ``lead``: seconds of video the stream may run ahead of real-time playback; ``send_timeout``: seconds a
    chunk may wait for a client that stopped reading before the server drops it; ``encoders``: threads that
    encode frames to JPEG/PNG (next to, not in, the generation path).

    Each stream's chunks are computed in one worker thread (``next(stream)``: the previous chunk's
    commit, denoising, decoding). While a chunk is encoded and sent, the worker already computes the next
    one, unless the stream is more than ``lead`` ahead of playback. A stream's slot is given back only
    when its worker thread has stopped, so no more than ``max_streams`` KV caches are ever alive."""

    def __init__(
        self,
        source: StreamSource,
        max_streams: int = 2,
        max_frames: int = 0,
        lead: float = 1.0,
        send_timeout: float = 30.0,
        encoders: int = 4,
    ):
        self.slots = Slots(max_streams)
        self.source, self.max_frames, self.lead, self.send_timeout = source, max_frames, lead, send_timeout
        self.workers = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="stream")
        self.encoders = ThreadPoolExecutor(max_workers=encoders, thread_name_prefix="encode")

    @property
    def max_streams(self) -> int:
        return self.slots.limit

    @property
    def active(self) -> int:
        """Streams holding a slot now (generating, or a worker finishing its chunk)."""
        return self.slots.taken

    def app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/health", self.health)
        app.on_shutdown.append(lambda _: self._shutdown())
        return app

    async def _shutdown(self) -> None:
        for pool in (self.workers, self.encoders):
            pool.shutdown(wait=False, cancel_futures=True)

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
        session = Session(drop=lambda: request.transport and request.transport.abort())
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                try:
                    await self._handle(ws, session, parse_message(msg.data))
                except BadRequest as e:
                    await ws.send_json({"type": "error", "message": str(e)})
                except (ConnectionResetError, ClientTooSlow):
                    break
                except Exception as e:  # a bug of ours: say so, log it, keep the connection and the server
                    log.exception("while handling a client message")
                    await ws.send_json({"type": "error", "message": f"server error: {type(e).__name__}: {e}"})
        finally:  # the client went away: stop its generation; the slot comes back when the worker has stopped
            await self._stop(session)
        return ws

    async def _handle(self, ws, session: Session, msg: dict) -> None:
        running = session.task is not None and not session.task.done()
        if msg["type"] == "start":
            if running:
                raise BadRequest("a stream is already running on this connection: stop it first")
            if not self.slots.take():
                await ws.send_json(
                    {"type": "busy", "message": f"all {self.max_streams} stream slots are in use; try again shortly"}
                )
                return
            session.switches.clear()
            session.stop, session.holds_slot = threading.Event(), True
            src = self.source
            session.camera = CameraFrames(src.height, src.width) if msg["camera"] else None
            generation = self._generate(ws, session, msg["prompt"], msg["seed"], msg.get("image"), msg["strength"])
            session.task = asyncio.create_task(generation)
            session.task.add_done_callback(lambda _: self._give_back(session))  # even if cancelled before it ran
        elif msg["type"] == "frame":
            if not running or session.camera is None:
                raise BadRequest("no camera stream is running: start one with camera: true first")
            loop = asyncio.get_running_loop()
            frame = await until_done(loop.run_in_executor(self.encoders, decode_image, msg["image"], "a camera frame"))
            session.camera.push(frame)
        elif msg["type"] == "switch":
            if not running:
                raise BadRequest("no stream is running: start one first")
            session.switches.append((msg["prompt"], msg["mode"] or self.source.switch_mode))
        elif running:  # stop
            await self._stop(session)
            await ws.send_json({"type": "stopped", "reason": "stopped by the client"})
        else:
            await ws.send_json({"type": "stopped", "frames": 0, "reason": "no stream was running"})

    def _give_back(self, session: Session) -> None:
        if session.holds_slot:
            session.holds_slot = False
            self.slots.give_back()

    async def _stop(self, session: Session) -> None:
        """Stop a session's generation and wait until its worker thread has finished its chunk."""
        session.stop.set()
        if session.camera is not None:  # a worker waiting for camera frames wakes up
            session.camera.close()
        if session.task is not None and not session.task.done():
            session.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.task

    def _step(self, stream: VideoStream, session: Session) -> tuple[list[dict], Chunk] | None:
        """In the worker thread: apply the switches that arrived, then the next chunk (``None`` if the stream
        was stopped before the chunk began). On CUDA its decoding may still run (``Chunk.ready``): the
        encoder threads wait for it while this thread goes on to the next chunk."""
        if session.stop.is_set():
            return None
        events = []
        while session.switches:
            new, mode = session.switches.popleft()
            try:
                secs = stream.switch_prompt([new], mode)
            except ValueError as e:  # the stream goes on with the prompt it had
                events.append({"type": "error", "message": str(e)})
                continue
            events.append({"type": "switched", "prompt": new, "mode": mode, "seconds": secs})
        chunk = next(stream, None)  # None: its input (a camera) has closed (StopIteration cannot cross a Future)
        if chunk is None:
            return None
        if not torch.isfinite(chunk.latents).all():
            raise FloatingPointError("the model produced non-finite values (NaN or inf) for this prompt")
        return events, chunk

    async def _send(self, ws, message: dict) -> None:
        try:
            await asyncio.wait_for(ws.send_json(message), self.send_timeout)
        except asyncio.TimeoutError:
            raise ClientTooSlow(f"a message waited {self.send_timeout:.0f} s for the client to read") from None

    async def _generate(
        self, ws, session: Session, prompt: str, seed: int, image_url: str | None, strength: float = 0.7
    ) -> None:
        """Open the stream, then chunk after chunk until stopped, ``max_frames`` or an error."""
        loop, src = asyncio.get_running_loop(), self.source
        t0 = time.perf_counter()
        sent, compute, first_ms, t_play, step, final = 0, 0.0, None, t0, None, None
        try:
            image = None
            if image_url is not None:  # decoded off the event loop: a large image stalls no other client
                image = await until_done(loop.run_in_executor(self.encoders, decode_image, image_url))
            refusal = src.room()
            if refusal:
                raise torch.OutOfMemoryError(refusal)
            camera = {"video": session.camera, "strength": strength} if session.camera is not None else {}
            opened = functools.partial(src.open, prompt, seed, image, **camera)
            stream = await until_done(loop.run_in_executor(self.workers, opened))
            await self._send(
                ws,
                {"type": "started", "prompt": prompt, "height": src.height, "width": src.width, "fps": src.fps}
                | {"frames_per_chunk": stream.settings.frames_per_block, "camera": session.camera is not None},
            )
            made = 0  # frames computed (sent, or being encoded)
            step = loop.run_in_executor(self.workers, self._step, stream, session)
            while step is not None:
                result = await until_done(step)
                if result is None:
                    return
                events, chunk = result
                for event in events:
                    await self._send(ws, event | ({"frame": made} if event["type"] == "switched" else {}))
                made += chunk.frames.shape[1]
                compute += chunk.seconds
                more = not self.max_frames or made < self.max_frames
                ahead = made / src.fps - (time.perf_counter() - t_play) if first_ms is not None else 0.0
                step = None  # the next chunk starts now, beside the encoding, unless far enough ahead
                if more and ahead <= self.lead:
                    step = loop.run_in_executor(self.workers, self._step, stream, session)
                # uint8 on the device, then only bytes cross to the CPU (waiting for an overlapped decode)
                frames = await until_done(loop.run_in_executor(self.encoders, chunk.uint8_frames, 0))
                urls = await asyncio.gather(*[loop.run_in_executor(self.encoders, encode_frame, f) for f in frames])
                if first_ms is None:
                    first_ms = (time.perf_counter() - t0) * 1000
                    t_play = time.perf_counter()  # playback of frame 0 starts when it arrives
                await self._send(
                    ws,
                    {"type": "chunk", "index": chunk.index, "start": sent, "frames": urls, "prompt": chunk.prompts[0]}
                    | {"seconds": chunk.seconds, "first_chunk_ms": first_ms}
                    | {"frames_per_second": made / max(compute, 1e-9)},
                )
                sent += len(urls)
                if more and step is None:
                    ahead = sent / src.fps - (time.perf_counter() - t_play)
                    await asyncio.sleep(max(0.0, ahead - self.lead))
                    step = loop.run_in_executor(self.workers, self._step, stream, session)
            limit = f"reached the server's limit of {self.max_frames} frames"
            final = {"type": "stopped", "frames": sent, "reason": limit}
        except (ConnectionResetError, ClientTooSlow) as e:  # the client is gone or stopped reading: drop it
            log.info("dropping a client: %s", e)
            session.drop()
        except ValueError as e:  # a bad first image, or refused by the model: unknown words, a wrong size, ...
            final = {"type": "error", "message": str(e)}
        except torch.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            refused = str(e).startswith("no GPU memory")  # by ``room``, before anything was allocated
            message = str(e) if refused else "the GPU ran out of memory for this stream; try again when a stream ends"
            final = {"type": "error", "message": message}
        except Exception as e:  # a failure inside the model: tell the client, keep serving
            log.exception("generation failed")
            final = {"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"}
        finally:  # no chunk starts after this; the one in the worker (if any) ends first, then the slot is free
            session.stop.set()
            await settle(step)
            self._give_back(session)
        if final is not None:  # after the slot is free: a client told "stopped" may start again at once
            await self._try_send(ws, final)

    async def _try_send(self, ws, message: dict) -> None:
        with contextlib.suppress(Exception):
            await self._send(ws, message)


def serve(source: StreamSource, host: str = "127.0.0.1", port: int = 7860, **kw) -> None:
    """Run the server until interrupted (``kw``: ``StreamServer``'s limits)."""
    from aiohttp import web

    print(f"serving {source.name} ({source.width}x{source.height}) on http://{host}:{port}/")
    web.run_app(StreamServer(source, **kw).app(), host=host, port=port, print=None)
