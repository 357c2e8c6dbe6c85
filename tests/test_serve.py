"""`selfforcing serve` without a browser: the WebSocket protocol, every bad input, busy, disconnects."""

import asyncio
import base64
import io
import json

import pytest
import torch
from PIL import Image

pytest.importorskip("aiohttp")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from selfforcing.serve.protocol import BadRequest, decode_image, encode_frames, parse_message  # noqa: E402
from selfforcing.serve.server import StreamServer, toy_source  # noqa: E402

A, B = "a large red circle moving right", "a large blue square moving left"


@pytest.fixture(scope="module")
def source():
    return toy_source("sf_dmd_frame_toy")


def png(width: int, height: int, colour=(0, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(server: StreamServer, scenario) -> None:
    async def main():
        async with TestClient(TestServer(server.app())) as client:
            await asyncio.wait_for(scenario(client), timeout=120)

    asyncio.run(main())


async def receive(ws, kind: str, limit: int = 200) -> dict:
    """The next message of type ``kind`` (chunks before it are skipped; an unexpected error or busy fails)."""
    for _ in range(limit):
        msg = await ws.receive_json()
        if msg["type"] == kind:
            return msg
        if msg["type"] in ("error", "busy") and kind not in ("error", "busy"):
            raise AssertionError(msg)
    raise AssertionError(f"no {kind!r} message")


def test_parse_message_names_every_problem():
    assert parse_message(json.dumps({"type": "start", "prompt": "  a  red circle "})) == {
        "type": "start",
        "prompt": "a red circle",
        "seed": 0,
        "camera": False,
        "strength": 0.7,
    }
    assert parse_message('{"type": "switch", "prompt": "x"}')["mode"] is None  # the model's own rule
    for text, message in [
        ("not json", "not a JSON message"),
        (b"\x00", "binary"),
        ("[1]", 'a JSON object with a "type"'),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ('{"type": "start", "prompt": "x", "speed": 2}', "unknown field(s) ['speed']"),
        ('{"type": "start"}', "must be a string"),
        ('{"type": "start", "prompt": "   "}', "the prompt is empty"),
        (json.dumps({"type": "start", "prompt": "a " * 400}), "at most 500"),
        ('{"type": "start", "prompt": "x", "seed": -1}', "non-negative integer"),
        ('{"type": "switch", "prompt": "x", "mode": "fade"}', "switch mode"),
        ('{"type": "start", "prompt": "x", "camera": 1}', "camera must be true or false"),
        ('{"type": "start", "prompt": "x", "camera": true, "strength": 0}', "strength must be a number in"),
        ('{"type": "start", "prompt": "x", "camera": true, "image": "data:,"}', "takes no first image"),
        ('{"type": "frame"}', "data URL string"),
    ]:
        with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            parse_message(text)


def test_images_round_trip_and_bad_images_are_refused():
    frames = torch.rand(2, 3, 24, 24) * 2 - 1
    urls = encode_frames(frames)
    assert len(urls) == 2 and urls[0].startswith("data:image/png;base64,")
    back = decode_image(urls[0])
    assert back.shape == (1, 3, 24, 24) and (back - frames[:1]).abs().max() <= 1 / 127.5 + 1e-6
    assert encode_frames(torch.zeros(1, 3, 256, 256))[0].startswith("data:image/jpeg")
    with pytest.raises(BadRequest, match="not an image file"):
        decode_image("data:image/png;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(BadRequest, match="not valid base64"):
        decode_image("data:image/png;base64,@@@")
    with pytest.raises(BadRequest, match="data URL string"):
        decode_image(42)


def test_a_stream_starts_switches_and_stops(source):
    server = StreamServer(source, max_streams=1)

    async def scenario(client):
        page = await client.get("/")
        assert page.status == 200 and "Switch prompt" in await page.text()
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "start", "prompt": A, "image": png(24, 24)})
        started = await receive(ws, "started")
        assert (started["height"], started["width"], started["frames_per_chunk"]) == (24, 24, 1)
        first = await receive(ws, "chunk")
        assert first["index"] == 0 and first["prompt"] == A and first["first_chunk_ms"] > 0
        assert decode_image(first["frames"][0]).max() == -1  # frame 0 is the black first image
        await ws.send_json({"type": "switch", "prompt": B, "mode": "keep"})
        switched = await receive(ws, "switched")
        assert switched["prompt"] == B and switched["mode"] == "keep" and switched["frame"] >= 1
        after = await receive(ws, "chunk")
        assert after["prompt"] == B and after["frames_per_second"] > 0
        health = await (await client.get("/health")).json()
        assert health["active"] == 1 and health["max_streams"] == 1
        await ws.send_json({"type": "stop"})
        assert (await receive(ws, "stopped"))["reason"] == "stopped by the client"
        assert server.active == 0
        await ws.close()

    run(server, scenario)


def test_bad_requests_get_an_error_and_the_server_keeps_serving(source):
    server = StreamServer(source, max_streams=1)

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        for msg, message in [
            ("{not json", "not a JSON message"),
            ({"type": "switch", "prompt": B}, "no stream is running"),
            ({"type": "start", "prompt": "a purple hexagon"}, "outside the vocabulary"),
            ({"type": "start", "prompt": ""}, "the prompt is empty"),
            ({"type": "start", "prompt": "a " * 300}, "at most 500"),
            ({"type": "start", "prompt": A, "image": png(32, 24)}, "the first image is 32x24"),
            ({"type": "start", "prompt": A, "image": "data:image/png;base64,aGVsbG8="}, "not an image file"),
        ]:
            await (ws.send_str(msg) if isinstance(msg, str) else ws.send_json(msg))
            error = await receive(ws, "error")
            assert message in error["message"], (msg, error)
        assert server.active == 0
        await ws.send_bytes(b"\x01\x02")
        assert "binary" in (await receive(ws, "error"))["message"]
        # after all that, the same connection streams, and a bad switch keeps the stream going
        await ws.send_json({"type": "start", "prompt": A})
        await receive(ws, "chunk")
        await ws.send_json({"type": "start", "prompt": A})
        assert "already running" in (await receive(ws, "error"))["message"]
        await ws.send_json({"type": "switch", "prompt": "a purple hexagon"})
        assert "outside the vocabulary" in (await receive(ws, "error"))["message"]
        assert (await receive(ws, "chunk"))["prompt"] == A
        await ws.close()

    run(server, scenario)


def test_busy_beyond_the_limit_and_a_disconnect_frees_the_slot(source):
    """A client that disconnects mid-stream: its generation stops, its stream (KV cache) is freed."""
    import dataclasses
    import gc
    import weakref

    opened = []

    def open_and_track(*args):
        stream = source.open(*args)
        opened.append(weakref.ref(stream))
        return stream

    server = StreamServer(dataclasses.replace(source, open=open_and_track), max_streams=1)

    async def scenario(client):
        first = await client.ws_connect("/ws")
        await first.send_json({"type": "start", "prompt": A})
        await receive(first, "chunk")
        second = await client.ws_connect("/ws")
        await second.send_json({"type": "start", "prompt": B})
        busy = await receive(second, "busy")
        assert "1 stream slots are in use" in busy["message"]
        await first.close()  # mid-stream: the generation stops and its slot is freed
        for _ in range(100):
            if server.active == 0:
                break
            await asyncio.sleep(0.05)
        assert server.active == 0
        for _ in range(200):  # a chunk already in the worker thread finishes first; then the stream is gone
            gc.collect()
            if opened[0]() is None:
                break
            await asyncio.sleep(0.05)
        assert opened[0]() is None
        await second.send_json({"type": "start", "prompt": B})
        assert (await receive(second, "chunk"))["prompt"] == B
        await second.close()

    run(server, scenario)


def test_a_stream_ends_at_the_servers_frame_limit(source):
    server = StreamServer(source, max_frames=3)

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "start", "prompt": A})
        stopped = await receive(ws, "stopped")
        assert stopped["frames"] == 3 and "limit of 3 frames" in stopped["reason"]
        assert server.active == 0

    run(server, scenario)


def test_a_switch_without_a_mode_takes_the_family_s_rule():
    """``serve --family longlive``: the shapes-world model under LongLive's rules; a switch that names no mode is
    LongLive's one-pass re-cache."""
    source = toy_source("sf_dmd_frame_toy", family="longlive")
    assert source.switch_mode == "one-pass" and "LongLive" in source.name
    server = StreamServer(source, max_streams=1)

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "start", "prompt": A})
        await receive(ws, "chunk")
        await ws.send_json({"type": "switch", "prompt": B})
        assert (await receive(ws, "switched"))["mode"] == "one-pass"
        await ws.send_json({"type": "stop"})
        await receive(ws, "stopped")
        await ws.close()

    run(server, scenario)


def test_a_camera_stream_runs_on_the_frames_the_client_sends():
    """``start`` with ``camera: true``: each chunk waits for the client's frames and starts from them
    (video-to-video); frames after the stream ends or without a camera stream are refused."""
    server = StreamServer(toy_source("sf_dmd_chunk_toy"), max_streams=1)

    async def scenario(client):
        ws = await client.ws_connect("/ws")
        await ws.send_json({"type": "frame", "image": png(24, 24)})
        assert "no camera stream" in (await receive(ws, "error"))["message"]
        await ws.send_json({"type": "start", "prompt": A, "camera": True, "strength": 0.5})
        assert (await receive(ws, "started"))["camera"] is True
        for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]:
            await ws.send_json({"type": "frame", "image": png(48, 48, colour)})  # resized to 24x24
        chunk = await receive(ws, "chunk")
        assert chunk["index"] == 0 and len(chunk["frames"]) == 3
        await ws.send_json({"type": "frame", "image": "data:image/png;base64,@@"})
        assert "a camera frame is not valid base64" in (await receive(ws, "error"))["message"]
        await ws.send_json({"type": "stop"})
        await receive(ws, "stopped")
        await ws.close()

    run(server, scenario)


def test_camera_frames_are_resampled_to_what_a_chunk_needs():
    from selfforcing.serve.camera import CameraFrames

    cam = CameraFrames(4, 4, wait=0.1)
    for i in range(5):
        cam.push(torch.full((1, 3, 8, 8), i / 10))
    got = cam.take(3)
    assert got.shape == (1, 3, 3, 4, 4) and [round(float(x), 2) for x in got[0, :, 0, 0, 0]] == [0.0, 0.2, 0.4]
    with pytest.raises(ValueError, match="no camera frame arrived"):
        cam.take(3)
    cam.close()
    assert cam.take(3) is None
