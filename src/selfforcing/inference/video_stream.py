"""An interactive, open-ended stream: chunk by chunk, with prompt switches and an optional first image.

``VideoStream`` owns one video's KV cache and random generator, and nothing changes them but its own
methods: ``next(stream)`` commits the previous chunk and denoises and decodes the next one (the loop of
``stream.causal_chunks``, which the Self Forcing rollout runs, so an unswitched stream is the rollout's
video), and ``switch_prompt`` changes the text between chunks, in one of the modes of
``inference.recache``: ``keep`` (the cache as it is), ``recache`` (every held frame recomputed, causally),
``one-pass`` (LongLive's re-cache), ``blend`` (Krea's: the text embeddings move over a few chunks) or
``reset`` (a hard cut to a new scene). ``settings.scheme`` says how a chunk is made: ``chunk`` (its steps
against the cache, then a commit pass), ``rolling`` (Rolling Forcing's window, ``inference.rolling``) or
``rebuild`` (Krea's: the cache rebuilt from a few context latents before every chunk, ``inference.rebuild``).

A first image (``image``) is encoded by the codec and committed to the cache clean (at t = 0, whatever
the context timestep) as a one-frame chunk at position 0, as CausVid's and Self Forcing's image-to-video
do (an independent first frame); it is also the stream's first chunk, so a causal VAE's decoder sees it
first. Generated chunks then follow at
positions 1, 1 + f, ... With a rolling cache (``settings.window``) the stream has no end.
"""

from __future__ import annotations

import time

import torch

from ..config import CausalConfig
from ..data.video_io import uint8_on_device
from ..device import to_device
from ..diffusion.flow_matching import add_noise
from ..models.codec import Codec
from ..models.kv_cache import KVCache
from ..models.t2v import TextToVideo
from .chunks import Chunk, commit_chunk, commit_input, denoise_chunk
from .rebuild import Rebuild
from .recache import SWITCH_MODES, blend_weights, held_runs, one_pass_start, recache_causal, recache_one_pass
from .rolling import RollingWindow

__all__ = ["SWITCH_MODES", "VideoStream", "held_runs"]


class VideoStream:
    """One open-ended causal stream of ``len(prompts)`` videos; iterate it for ``Chunk``s.

    prompts: one per video; image: ``[B or 1, 3, height, width]`` in [-1, 1] (the first frame), or None;
    guidance_scale != 1: classifier-free guidance against ``negative_prompt`` (many-step causal models).
    """

    def __init__(
        self,
        model: TextToVideo,
        codec: Codec,
        prompts: list[str],
        height: int,
        width: int,
        settings: CausalConfig | None = None,
        seed: int = 0,
        guidance_scale: float = 1.0,
        image: torch.Tensor | None = None,
        negative_prompt: str = "",
        overlap_decode: bool = False,
        length: int | None = None,
        video: torch.Tensor | None = None,
        strength: float = 1.0,
    ):
        if not prompts:
            raise ValueError("a stream needs at least one prompt")
        self.settings = settings = settings or CausalConfig()
        settings.validate()
        if not settings.window:
            raise ValueError(
                "an open-ended stream needs a finite attention window (settings.window, in latent frames) for "
                "its cache to roll past; selfforcing.pipeline.stream_settings fills in the training length"
            )
        self.model, self.codec, self.guidance = model, codec, guidance_scale
        self.negative_prompt = negative_prompt
        self.batch = b = len(prompts)
        first = 1 if codec.keeps_first_frame else codec.temporal_compression  # pixel frames of one latent frame
        _, c, h, w = codec.latent_shape(first, height, width)  # raises on a size the codec cannot take
        self.latent_size = (c, h, w)
        self.height, self.width = height, width
        p = next(model.dit.parameters())
        _, gh, gw = model.dit.token_grid(settings.frames_per_block, h, w)
        rows = b if guidance_scale == 1.0 else 2 * b
        fpb, window = settings.frames_per_block, settings.window
        layout = (rows, gh * gw, fpb, window, settings.sink)
        self.cache = KVCache.for_model(model.dit, *layout, **settings.cache_options())
        self.generator = torch.Generator().manual_seed(seed)
        # every generated chunk's levels but the first's (video-to-video: starting lower, ``CausalConfig.sigmas``)
        self.sigmas = settings.sigmas(None, strength).to(p.device)
        self.first_sigmas = settings.sigmas(0, strength).to(p.device)  # ``first_chunk_steps`` (Causal Forcing++)
        self.denoised = 0  # chunks generated since the stream began (or a reset cut to a new scene)
        self.context_sigma = settings.context_timestep / 1000.0
        self.embedding = self._embed(prompts)  # (text embeddings, mask) of every row, for a blend
        self.text_kv = self.model.dit.text_kv(*self.embedding)
        self._blend: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # a blend's texts for the next chunks
        self.prompts = list(prompts)
        self.decode = codec.stream_decoder()  # a causal VAE keeps its cache from chunk to chunk
        self.overlap_decode = overlap_decode  # on CUDA: decode on a stream of its own (see Chunk)
        self._decode_stream: torch.cuda.Stream | None = None
        self.position = 0  # the model's frame position of the next chunk (back to 0 after a reset)
        self.latent_frames = 0  # latent frames handed out so far (the output video's length)
        self.chunks = 0
        self.switches: list[tuple[int, list[str], str]] = []  # (latent frame, prompts, mode), in order
        # the last chunk's (position, commit input, its noise level), and the same for the chunks with frames
        # in the cache (a recache recomputes them)
        self._pending: tuple[int, torch.Tensor, float] | None = None
        self._held: list[tuple[int, torch.Tensor, float]] = []
        self._recent: list[tuple[int, torch.Tensor]] = []  # (position, clean latents) of the last sink + window frames
        self._image = None if image is None else self._encode_image(image)
        self.length = length  # latent frames of a video with an end (a rolling window drains there), or None
        self._input = None if video is None else self._check_video(video)  # video-to-video: the input's frames
        self._input_used = 0  # its pixel frames read so far
        self._read_input = codec.stream_encoder() if video is not None else None
        self._rolling = self._rolling_window() if settings.scheme == "rolling" else None
        self._rebuild = Rebuild(model, self.cache, codec) if settings.scheme == "rebuild" else None
        self._chunk_text = self.text_kv  # the text the last chunk was denoised under (a rebuild's context reads it)

    # -- the stream -------------------------------------------------------------------------------
    def __iter__(self) -> VideoStream:
        return self

    @torch.no_grad()
    def __next__(self) -> Chunk:
        """Commit the previous chunk, then denoise and decode the next: ``Chunk`` with ``frames_per_block``
        latent frames (the image chunk first, if there is one)."""
        t0 = time.perf_counter()
        self.commit()
        if self._blend:  # a blend switch: this chunk's text
            self.embedding = self._blend.pop(0)
            self.text_kv = self.model.dit.text_kv(*self.embedding)
        if self._image is not None:  # the given first frame: committed as it is, clean
            x0, self._image = self._image, None
            self._pending = None if self._rebuild else (self.position, x0, 0.0)
        elif self._rolling is not None:  # Rolling Forcing: the window commits its own chunks
            end = None if self.length is None else self.position + self.length - self.latent_frames
            enter = None if self._input is None else self._from_input
            x0 = self._rolling.next_chunk(self.text_kv, end, enter)
        else:
            x0 = self._denoise()
        self._keep_recent(x0)
        frames, ready, host = self._decode(x0)
        if self._rebuild is not None:
            self._rebuild.keep(x0, frames, ready)
        if x0.device.type == "cuda" and ready is None:
            torch.cuda.synchronize(x0.device)
        seconds = time.perf_counter() - t0
        chunk = Chunk(self.chunks, self.latent_frames, x0, frames, seconds, list(self.prompts), ready, host)
        self.position += x0.shape[1]
        self.latent_frames += x0.shape[1]
        self.chunks += 1
        return chunk

    @torch.no_grad()
    def switch_prompt(self, prompts: list[str] | str, mode: str = "recache") -> float:
        """Use ``prompts`` (one per video, or one for all) from the next chunk on; returns the seconds the
        switch took (a ``recache`` recomputes the cache). See the module docstring for the modes."""
        if mode not in SWITCH_MODES:
            raise ValueError(f"switch mode must be one of {SWITCH_MODES}, got {mode!r}")
        prompts = [prompts] * self.batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != self.batch:
            raise ValueError(f"the stream has {self.batch} videos, got {len(prompts)} prompts")
        if self._rolling is not None and mode in ("recache", "one-pass"):
            raise ValueError(
                f"switch mode {mode!r} recomputes committed chunks, but a rolling window also holds partly denoised "
                "ones under the old prompt: switch a rolling-window stream with 'keep' or 'reset'"
            )
        t0 = time.perf_counter()
        embedding = self._embed(prompts)  # raises (unknown words, ...) before anything changes
        if mode == "reset":
            self.cache.reset()
            self._pending, self._held, self._recent, self.position, self.denoised = None, [], [], 0, 0
            self._rolling = self._rolling_window() if self._rolling is not None else None
            self._rebuild = Rebuild(self.model, self.cache, self.codec) if self._rebuild is not None else None
        else:
            self.commit()  # under the text it was generated with
        self.prompts, self._blend = prompts, []
        if mode == "blend":  # from the old embeddings to the new, over the next chunks
            (old, old_mask), (new, new_mask) = self.embedding, embedding
            mask = None if old_mask is None or new_mask is None else old_mask | new_mask
            self._blend = [(torch.lerp(old, new, w), mask) for w in blend_weights()]
        else:
            self.embedding, self.text_kv = embedding, self.model.dit.text_kv(*embedding)
        if mode == "recache":
            held = [(start, self._rows(x), sigma) for start, x, sigma in self._held]
            recache_causal(self.model, self.cache, held, self.text_kv)
        elif mode == "one-pass" and self.position:
            recache_one_pass(
                self.model, self.cache, self._rows(self._recent_latents()), self.context_sigma, self.text_kv
            )
        self.switches.append((self.latent_frames, prompts, mode))
        return time.perf_counter() - t0

    @torch.no_grad()
    def commit(self) -> None:
        """Commit the last chunk now (``next`` does it otherwise): its keys/values go to the cache, and its
        commit input is kept while the cache holds its frames. A server can call it while the client draws."""
        if self._pending is None:
            return
        start, x_ctx, sigma = self._pending
        self._pending = None
        commit_chunk(self.model, self._rows(x_ctx), sigma, self.text_kv, self.cache, start)
        held = self.cache.frames
        self._held = [h for h in [*self._held, (start, x_ctx, sigma)] if held_runs(held, h[0], h[1].shape[1])]

    # -- internals ----------------------------------------------------------------------------------
    def _decode(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None, torch.Tensor | None]:
        """``(frames, ready, uint8 on the host)``: decoded here, or with ``overlap_decode`` on CUDA queued on
        the decoder's own CUDA stream, where it runs beside the next chunk's commit and denoising; the
        uint8 copy for the host is queued there too, and ``ready`` marks both done."""
        if not (self.overlap_decode and x0.device.type == "cuda"):
            return self.decode(x0), None, None
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(x0.device)
        side = self._decode_stream
        side.wait_stream(torch.cuda.current_stream(x0.device))  # x0 is written on the main stream
        with torch.cuda.stream(side):
            frames = self.decode(x0)
            pixels = uint8_on_device(frames)
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
        x0.record_stream(side)  # its memory is not reused before the decoder has read it
        return frames, side.record_event(), host

    def _denoise(self) -> torch.Tensor:
        """The next chunk's few steps against the cache (rebuilt first, for ``rebuild``); its x0."""
        b, (c, h, w), fpb = self.batch, self.latent_size, self.settings.frames_per_block
        offset = self.position
        if self._rebuild is not None:  # Krea: the context under the text of the chunk before
            offset = self._rebuild.prepare(self._chunk_text, self.position)
        noise = to_device(torch.randn(b, fpb, c, h, w, generator=self.generator), self.sigmas.device)
        levels = self.first_sigmas if self.denoised == 0 else self.sigmas
        if self._input is not None:  # video-to-video: the input chunk, noised to the first level
            noise = self._from_input(noise, levels[0])
        x0 = denoise_chunk(
            self.model,
            noise,
            levels,
            self.text_kv,
            self.cache,
            offset,
            self.generator,
            guidance=self.guidance,
            zero_sigma=self.settings.zero_sigma,
        )
        if self._rebuild is None:
            self._pending = (self.position, commit_input(x0, self.context_sigma, self.generator), self.context_sigma)
        self._chunk_text = self.text_kv
        self.denoised += 1
        return x0

    def _from_input(self, noise: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Video-to-video: the input's next chunk, encoded (the codec's streaming encoder) and noised with
        ``noise`` to ``sigma`` (default the first level): ``(1 - sigma) x + sigma noise``."""
        f, c = noise.shape[1], self.codec.temporal_compression
        first = self._input_used == 0 and self.codec.keeps_first_frame
        n = 1 + c * (f - 1) if first else c * f
        if not torch.is_tensor(self._input):  # a live source (a camera)
            frames = self._input.take(n)
            if frames is None:
                raise StopIteration  # the source has closed: so has the stream
            frames = frames.expand(self.batch, -1, -1, -1, -1)
        elif self._input_used + n > self._input.shape[1]:
            raise StopIteration  # the input video has ended: so has the stream
        else:
            frames = self._input[:, self._input_used : self._input_used + n]
        self._input_used += n
        latents = self._read_input(frames.to(noise.device)).to(noise.dtype)
        return add_noise(latents, noise, self.sigmas[0] if sigma is None else sigma)

    def _check_video(self, video):
        """The input video ``[B or 1, F, 3, H, W]`` in [-1, 1] at the stream's size, one per video; or a live
        source with ``take(n) -> [B or 1, n, 3, H, W]`` (None when it has ended), e.g. ``serve.camera``."""
        if not torch.is_tensor(video) and hasattr(video, "take"):  # (a tensor has a take method of its own)
            if self._image is not None:
                raise ValueError("a stream takes a first image or an input video, not both")
            return video
        self._check_pixels(video, "the input video", "[B, F, 3, H, W]", 5)
        if self._image is not None:
            raise ValueError("a stream takes a first image or an input video, not both")
        f_in = self.codec.latent_shape(video.shape[1], self.height, self.width)[0]  # raises on a bad frame count
        self.length = min(self.length or f_in, f_in)
        return video.expand(self.batch, -1, -1, -1, -1).clamp(-1, 1)

    def _embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text embeddings and mask of every row: the prompts, then (with guidance) the negative prompt."""
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be strings, got {prompts!r}")
        rows = prompts if self.guidance == 1.0 else prompts + [self.negative_prompt] * len(prompts)
        return self.model.encode_text(rows)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.guidance == 1.0 else torch.cat([x, x])

    def _rolling_window(self) -> RollingWindow:
        if self.guidance != 1.0 or self._image is not None:
            raise ValueError("a rolling-window stream (Rolling Forcing) takes no guidance and no first image")
        return RollingWindow(self.model, self.cache, self.sigmas, self.latent_size, self.generator, self.context_sigma)

    def _keep_recent(self, x0: torch.Tensor) -> None:
        """Keep the clean latents of the last ``sink + window`` frames (a one-pass re-cache reads them)."""
        self._recent.append((self.position, x0))
        keep_from = self.position + x0.shape[1] - (self.settings.sink + self.settings.window)
        self._recent = [(p, x) for p, x in self._recent if p + x.shape[1] > keep_from]

    def _recent_latents(self) -> torch.Tensor:
        """The clean latents ``[B, f, C, h, w]`` from ``one_pass_start`` up to the next chunk."""
        first = one_pass_start(self.position, self.settings.window, self.settings.sink)
        x = torch.cat([x for _, x in self._recent], dim=1)
        return x[:, first - self._recent[0][0] :]

    def _check_pixels(self, x, what: str, layout: str, dims: int) -> None:
        """Raise unless ``x`` is ``dims``-D pixels ``layout`` (3 channels before H, W) at the stream's size, one
        or one per video."""
        if not torch.is_tensor(x) or x.dim() != dims or x.shape[-3] != 3:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{what} must be a tensor {layout} in [-1, 1], got {shape}")
        if x.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"{what} is {x.shape[-1]}x{x.shape[-2]} (WxH), the stream is {self.width}x{self.height}: resize it "
                "or stream at its size"
            )
        if x.shape[0] not in (1, self.batch):
            raise ValueError(f"pass one {what.removeprefix('the ')} or one per video ({self.batch}), got {x.shape[0]}")

    def _encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """The first frame's latent ``[B, 1, C, h, w]`` from ``image [B or 1, 3, H, W]`` in [-1, 1]."""
        if self.codec.temporal_compression != 1 and not self.codec.keeps_first_frame:
            raise ValueError("this codec cannot encode a single frame: image-to-video needs a causal VAE")
        self._check_pixels(image, "the first image", "[B, 3, H, W]", 4)
        p = next(self.model.dit.parameters())
        video = image.expand(self.batch, -1, -1, -1)[:, None].to(p.device, torch.float32)
        try:
            return self.codec.encode(video.clamp(-1, 1)).float()
        except NotImplementedError as e:  # a decode-only codec (the TAEW2.1 preview decoder)
            raise ValueError(f"{type(self.codec).__name__} cannot encode the first image: {e}") from e
