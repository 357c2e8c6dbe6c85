"""`selfforcing serve` against clients that misbehave, through a real socket: start-then-close bursts,
abrupt TCP drops, a client that stops reading, malformed messages of every kind. After each, a normal
stream still works and every slot is free. The stream here is a stand-in that records when each chunk
begins and ends, so the tests can see what the worker thread does."""

import asyncio
import base64
import dataclasses
import io
import json
import os
import struct
import threading
import time
import zlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

pytest.importorskip("aiohttp")

from selfforcing.inference.chunks import Chunk  # noqa: E402
from selfforcing.serve import server as server_module  # noqa: E402
from selfforcing.serve.server import StreamServer, StreamSource  # noqa: E402
from tests.test_serve import receive, run  # noqa: E402


class FakeStream:
    """A ``VideoStream`` stand-in: ``seconds`` per chunk of ``frames`` frames of ``size x size`` noise."""

    def __init__(self, log: list, frames: int = 2, size: int = 16, seconds: float = 0.02, nan: bool = False):
        self.settings = SimpleNamespace(frames_per_block=frames)
        self.log, self.frames, self.size, self.seconds, self.nan = log, frames, size, seconds, nan
        self.index, self.prompt = 0, "p"

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        self.log.append(("begin", time.perf_counter(), self))
        time.sleep(self.seconds)
        frames = torch.rand(1, self.frames, 3, self.size, self.size) * 2 - 1
        latents = torch.full((1, 1, 4, 2, 2), float("nan") if self.nan else 0.0)
        chunk = Chunk(self.index, self.index, latents, frames, self.seconds, [self.prompt])
        self.index += 1
        self.log.append(("end", time.perf_counter(), self))
        return chunk

    def switch_prompt(self, prompts, mode="recache") -> float:
        if prompts[0] == "unknown":
            raise ValueError("outside the vocabulary")
        self.prompt = prompts[0]
        return 0.0


def fake_source(log: list, **kw) -> StreamSource:
    def open_stream(prompt, seed, image):
        if prompt == "too big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        if image is not None and image.shape[-2:] != (16, 16):
            raise ValueError(f"the first image is {image.shape[-1]}x{image.shape[-2]}")
        return FakeStream(log, nan=prompt == "nan", **kw)

    return StreamSource(open_stream, 16, 16, 8.0, "fake")


async def until(condition, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def still_serves(client, server: StreamServer) -> None:
    """Every slot is free, and a well-behaved client gets a stream and stops it."""
    await until(lambda: server.active == 0)
    ws = await client.ws_connect("/ws")
    await ws.send_json({"type": "start", "prompt": "fine"})
    assert (await receive(ws, "chunk"))["prompt"] == "p"
    await ws.send_json({"type": "stop"})
    assert (await receive(ws, "stopped"))["reason"] == "stopped by the client"
    assert server.active == 0  # given back before "stopped" was sent
    await ws.close()


class RawClient:
    """A WebSocket client on a bare TCP socket: it can stop reading, or drop the connection at any byte."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> "RawClient":
        import socket

        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer)

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (
            bytes([0x80 | n])
            if n < 126
            else bytes([0x80 | 126]) + struct.pack(">H", n)
            if n < 1 << 16
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        )
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def drop(self) -> None:
        """An abrupt TCP drop (RST), no closing handshake."""
        self.writer.transport.abort()


def test_start_then_stop_or_close_bursts_give_every_slot_back():
    log: list = []
    server = StreamServer(fake_source(log), max_streams=2)

    async def scenario(client):
        for _ in range(3):  # 12 clients on 2 slots, each gone before its stream began
            clients = [await client.ws_connect("/ws") for _ in range(4)]
            for i, ws in enumerate(clients):
                await ws.send_json({"type": "start", "prompt": "a"})
                await (ws.send_json({"type": "stop"}) if i % 2 else ws.close())
            for ws in clients:
                await ws.close()
        await still_serves(client, server)

    run(server, scenario)


def test_a_disconnect_waits_for_the_worker_and_no_chunk_starts_after_it():
    log: list = []
    server = StreamServer(fake_source(log, seconds=0.4), max_streams=1)
    freed_at = []

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "start", "prompt": "a"})
        await receive(ws, "chunk")
        await until(lambda: len(log) % 2 == 1)  # a chunk is inside the worker now
        closed_at = time.perf_counter()
        await ws.close()
        await until(lambda: server.active == 0)
        freed_at.append(time.perf_counter())
        busy = [e for e in log if e[0] == "begin"]
        ends = [e for e in log if e[0] == "end"]
        assert len(busy) == len(ends) and ends[-1][1] <= freed_at[0]  # the slot waited for the chunk to end
        await asyncio.sleep(0.6)
        assert all(t <= closed_at for kind, t, _ in log if kind == "begin")  # nothing began after the close
        await still_serves(client, server)

    run(server, scenario)


def test_never_more_live_streams_than_slots():
    """Clients come and go mid-chunk; the worker threads never run more streams at once than slots. The
    worker pool is made larger than the slots here, so that only the slot accounting bounds them."""
    from concurrent.futures import ThreadPoolExecutor

    log: list = []
    server = StreamServer(fake_source(log, seconds=0.1), max_streams=2)
    server.workers = ThreadPoolExecutor(max_workers=8)

    async def scenario(client):
        for _ in range(4):
            clients = [await client.ws_connect("/ws") for _ in range(3)]
            for ws in clients:
                await ws.send_json({"type": "start", "prompt": "a"})
            await asyncio.sleep(0.15)
            for ws in clients:
                await ws.close()
        await until(lambda: server.active == 0)
        live, most = set(), 0
        for kind, _, stream in sorted(log, key=lambda e: e[1]):
            (live.add if kind == "begin" else live.discard)(stream)
            most = max(most, len(live))
        assert most <= 2
        await still_serves(client, server)

    run(server, scenario)


def test_abrupt_tcp_drops_free_their_slots():
    log: list = []
    server = StreamServer(fake_source(log), max_streams=2)

    async def scenario(client):
        for when in ("before start", "after start", "mid stream"):
            raw = await RawClient.connect(client.port)
            if when != "before start":
                raw.send(json.dumps({"type": "start", "prompt": "a"}))
                await raw.writer.drain()
            if when == "mid stream":
                await raw.reader.read(100)  # some of the stream arrived
            raw.drop()
        await still_serves(client, server)

    run(server, scenario)


def test_a_client_that_stops_reading_is_dropped_and_its_queue_is_bounded():
    log: list = []
    server = StreamServer(fake_source(log, frames=4, size=256, seconds=0.0), max_streams=1, lead=1e9)
    server.send_timeout = 1.0

    async def scenario(client):
        raw = await RawClient.connect(client.port, rcvbuf=4096)
        raw.send(json.dumps({"type": "start", "prompt": "a"}))
        await until(lambda: server.active == 1)
        await until(lambda: server.active == 0, seconds=30)  # it never reads: dropped after send_timeout
        chunks = sum(kind == "end" for kind, _, _ in log)
        assert chunks < 100, chunks  # generation waited for the socket instead of queueing without end
        await still_serves(client, server)

    run(server, scenario)


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its header claiming another size (and a valid header checksum)."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_malformed_messages_get_an_error_reply_and_the_connection_stays():
    log: list = []
    server = StreamServer(fake_source(log), max_streams=1)
    good = png_bytes(16, 16)
    i = good.index(b"IDAT") + 6  # inside the compressed pixels
    corrupt = good[:i] + bytes(b ^ 0x5A for b in good[i : i + 6]) + good[i + 6 :]
    malformed = [
        ('{"type": "start", "prompt": "a", "seed": ' + "9" * 5000 + "}", "JSON"),
        ('{"type": "start", "prompt": ' + "[" * 100000 + "]" * 100000 + "}", "JSON"),
        ("[" * 100000, "JSON"),
        (json.dumps({"type": "start", "prompt": "a", "image": "data:image/png;base64"}), "no comma"),
        (json.dumps({"type": "start", "prompt": "a", "image": url(with_ihdr_size(good, 200000, 200000))}), "pixels"),
        (json.dumps({"type": "start", "prompt": "a", "image": url(with_ihdr_size(good, 5000, 5000))}), "pixels"),
        (json.dumps({"type": "start", "prompt": "a", "image": url(corrupt)}), "could not be decoded"),
        (json.dumps({"type": "start", "prompt": "a", "image": url(good[:60])}), "could not be decoded"),
        (json.dumps({"type": "start", "prompt": "a", "image": url(png_bytes(20, 16))}), "the first image is 20x16"),
        (json.dumps({"type": "start", "prompt": "a", "seed": 1.5}), "seed"),
        (json.dumps({"type": "start", "prompt": "nan"}), "non-finite"),
        (json.dumps({"type": "start", "prompt": "too big"}), "ran out of memory"),
        (json.dumps({"type": "stop"}), "no stream was running"),
    ]

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        for text, message in malformed:
            await ws.send_str(text)
            reply = await ws.receive_json()
            while reply["type"] in ("started", "chunk"):
                reply = await ws.receive_json()
            assert reply["type"] in ("error", "stopped") and message in reply.get("message", reply.get("reason")), (
                text[:80],
                reply,
            )
            assert server.active == 0
        await ws.send_json({"type": "start", "prompt": "a", "image": url(good)})
        await receive(ws, "chunk")
        await ws.send_json({"type": "switch", "prompt": "unknown"})
        assert "outside the vocabulary" in (await receive(ws, "error"))["message"]
        await ws.send_json({"type": "switch", "prompt": "b"})
        assert (await receive(ws, "switched"))["prompt"] == "b"
        assert (await receive(ws, "chunk"))["prompt"] == "b"
        await ws.close()
        await still_serves(client, server)

    run(server, scenario)


def test_images_are_decoded_off_the_event_loop(monkeypatch):
    log: list = []
    server = StreamServer(fake_source(log), max_streams=1)
    threads = []
    decode = server_module.decode_image
    record = lambda u: threads.append(threading.current_thread()) or decode(u)  # noqa: E731
    monkeypatch.setattr(server_module, "decode_image", record)

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "start", "prompt": "a", "image": url(png_bytes(16, 16))})
        await receive(ws, "chunk")
        assert threads and threads[0] is not threading.main_thread()
        await ws.close()

    run(server, scenario)


def test_the_next_chunk_is_computed_while_the_last_one_is_encoded(monkeypatch):
    """Encoding a chunk's frames (JPEG/PNG, in the encoder threads) overlaps the worker's next chunk
    (its commit, denoising and decoding), instead of running on the generation path between them."""
    log: list = []
    server = StreamServer(fake_source(log, seconds=0.2), max_streams=1, lead=1e9)
    encoded = []
    encode = server_module.encode_frame

    def slow_encode(frame):
        time.sleep(0.2)
        encoded.append(time.perf_counter())
        return encode(frame)

    monkeypatch.setattr(server_module, "encode_frame", slow_encode)

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "start", "prompt": "a"})
        for _ in range(3):
            await receive(ws, "chunk")
        await ws.close()

    run(server, scenario)
    begins = [t for kind, t, _ in log if kind == "begin"]
    # chunk 1 began before chunk 0's frames were encoded (they take 0.2 s, after chunk 0 ended)
    assert begins[1] < encoded[0], (begins, encoded)


def test_a_stream_the_gpu_has_no_room_for_is_refused_before_it_opens():
    log: list = []
    full = ["no GPU memory for another stream: it needs about 9.3 GiB, 2.0 GiB are free; try again later"]
    source = dataclasses.replace(fake_source(log), room=lambda: full[0] if full else None)
    server = StreamServer(source, max_streams=2)

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "start", "prompt": "a"})
        assert (await receive(ws, "error"))["message"] == full[0]
        assert server.active == 0 and log == []  # nothing was opened or computed
        full.clear()  # a stream ended elsewhere: room again
        await ws.close()
        await still_serves(client, server)

    run(server, scenario)


def test_a_streams_memory_estimate_counts_its_kv_cache_exactly():
    """``stream_bytes``: the KV cache a stream allocates, computed on the meta device (nothing allocated)."""
    from selfforcing.pipeline import load_pipeline, stream_settings
    from selfforcing.serve.server import stream_bytes

    pipe = load_pipeline("sf_dmd_frame_toy")
    d = pipe.cfg.data
    for kind in ("auto", "compact", "fp8"):
        settings = dataclasses.replace(stream_settings(pipe.cfg), kv_cache=kind)
        stream = pipe.open_stream(["a large red circle moving right"], 0, None, settings)
        exact = sum(t.numel() * t.element_size() for t in (stream.cache.k, stream.cache.v))
        exact += sum(getattr(stream.cache, s).numel() * 4 for s in ("k_scale", "v_scale") if kind == "fp8")
        assert stream_bytes(pipe.model, pipe.codec, settings, d.height, d.width) == exact > 0
