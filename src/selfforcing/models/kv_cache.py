"""KV caches for chunk-by-chunk generation.

``KVCache`` holds, for every DiT layer, the self-attention keys (already RoPE-rotated at their absolute
frame positions) and values of the frames committed so far. It holds
``capacity = sink + window - frames_per_block`` frames: exactly the past frames a chunk may see under
the block-causal mask of ``selfforcing.models.causal``. When it is full, committing a new frame evicts
the oldest non-sink frame (rolling mode); the first ``sink`` frames are never evicted.

The cache changes only when its owner calls ``commit`` or ``reset``: the DiT reads it, and returns the
new chunk's keys/values for the caller to commit. Slots are filled in order and reused in place, so
the valid entries are always the first ``num_frames`` slots; their order does not matter, because
every cached frame is visible to every token of the current chunk and RoPE is already applied.

The buffers have ``frames_per_block`` slots more than ``capacity``, as the reference's cache of
``local_attn_size`` frames does: without gradient, a forward writes its chunk's keys/values into the
free slots just after the held ones and attends over one view of the buffer (``CacheLayer.extend``),
so no layer copies the whole context, and a commit of that chunk moves at most the frames that evict
an old one. With gradient (a Self Forcing rollout's exit step) the context is concatenated instead, so
autograd never sees a buffer that a later step overwrites.

``FP8KVCache`` (opt-in: ``dtype=torch.float8_e4m3fn``) stores the same in fp8 with one scale per frame
and head: half of bf16's memory; every layer dequantises its context when it reads it.

A ``CachePolicy`` (``models.cache_policy``) says how keys meet RoPE: stored rotated at their absolute
positions (Self Forcing), or stored before RoPE and rotated by slot at every read (Reward Forcing,
LongLive's infinite mode), and whether an eviction blends the evicted frames into the sink.

``TextKV`` is the cross-attention cache: the text keys/values of every layer, computed once per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache_policy import CachePolicy, slot_positions, updated_sink
from .causal import check_layout
from .rope import Rope, apply_rope

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each [B, heads, tokens, head_dim]
ABSOLUTE = CachePolicy()  # keys rotated at their absolute positions, the sink fixed: Self Forcing


@dataclass
class Placement:
    """Where a commit puts a chunk: ``slots``, ``(slot, i)`` for each stored frame i of the chunk, and
    ``evicted``, the slots whose older frames it replaces (oldest frame first)."""

    slots: list[tuple[int, int]]
    evicted: list[int]


@dataclass
class TextKV:
    """Per-layer text keys/values ``[B, heads, L_text, head_dim]`` and the text mask ``[B, L_text]``."""

    layers: list[KV]
    mask: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]


class KVCache:
    """Self-attention keys/values of committed frames: ``k, v: [layers, B, heads, slots * N, head_dim]``.

    N = tokens per frame. ``frame_of_slot[i]`` is the absolute frame index held in slot i (-1 = empty).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        frames_per_block: int,
        window: int,
        sink: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        in_place: bool = True,
        policy: CachePolicy = ABSOLUTE,
    ):
        check_layout(frames_per_block, window, sink)
        if window == 0:
            raise ValueError("a KV cache needs a finite window (frames); pass the video length for no eviction")
        self.tokens_per_frame = tokens_per_frame
        self.frames_per_block = frames_per_block
        self.window = window
        self.sink = sink
        self.capacity = sink + window - frames_per_block  # past frames a chunk can see
        self.policy = policy
        # slots after the held frames for a forward's chunk (``CacheLayer.extend``); a cache that rotates its keys
        # by slot copies them at every read anyway
        self.in_place = in_place and not policy.by_slot
        slots = self.capacity + (frames_per_block if self.in_place else 0)
        shape = (num_layers, batch_size, num_heads, slots * tokens_per_frame, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.frame_of_slot = [-1] * self.capacity
        self.next_frame = 0  # the absolute index of the next frame to be generated
        # set by an owner whose frames all fit (a training rollout): a held frame is never overwritten (an
        # eviction, a recommit or a reset raises), so a checkpointed forward may keep views of the context
        self.append_only = False

    @classmethod
    def for_model(
        cls,
        dit,
        batch_size: int,
        tokens_per_frame: int,
        frames_per_block: int,
        window: int,
        sink: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        in_place: bool = True,
        policy: CachePolicy = ABSOLUTE,
    ) -> KVCache:
        """An empty cache shaped for ``dit`` (a ``VideoDiT``) on its device, in the dtype its attention computes
        in (``compute_dtype``: the autocast dtype under autocast, FSDP's ``param_dtype`` under mixed precision,
        else the parameters' dtype), or in ``dtype``: ``torch.float8_e4m3fn`` gives an ``FP8KVCache``.
        ``in_place=False``: no slots for the current chunk (``frames_per_block`` frames less memory).
        ``policy``: RoPE by absolute position or by slot, and the sink's update (``CachePolicy``)."""
        c, device = dit.cfg, device or next(dit.parameters()).device
        shape = (c.num_layers, batch_size, c.num_heads, c.head_dim, tokens_per_frame, frames_per_block, window, sink)
        if dtype == FP8:
            return FP8KVCache(*shape, device=device, compute_dtype=compute_dtype(dit), policy=policy)
        return cls(*shape, dtype or compute_dtype(dit), device, in_place, policy)

    # -- reading -------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        """Frames currently held (the first ``num_frames`` slots)."""
        return sum(f >= 0 for f in self.frame_of_slot)

    @property
    def nbytes(self) -> int:
        """The bytes the cache's tensors hold (keys, values and any scales)."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if torch.is_tensor(t))

    @property
    def frames(self) -> list[int]:
        """Absolute indices of the held frames, ascending."""
        return sorted(f for f in self.frame_of_slot if f >= 0)

    def layer(self, layer: int, commit: Placement | None = None, context_rope: Rope | None = None) -> CacheLayer:
        """What one layer's attention reads and writes: see ``CacheLayer``; ``commit``: where (``slots_for``)
        that layer stores its chunk once its attention is done; ``context_rope``: with ``rope="slot"``, the
        rotation of the held frames (``context_positions``), computed once per forward."""
        return CacheLayer(self, layer, commit, context_rope)

    def chunk_positions(self, frame_offset: int, num: int) -> torch.Tensor | None:
        """RoPE frame positions ``[num]`` of the next chunk: None for ``rope="absolute"`` (its absolute
        frames), else right after the held frames' slots."""
        if not self.policy.by_slot:
            return None
        return torch.arange(self.num_frames, self.num_frames + num)

    def context_positions(self) -> torch.Tensor:
        """``rope="slot"``: the RoPE frame position of every held slot, ``[num_frames]`` (its frame's rank)."""
        return slot_positions(self.frame_of_slot)

    def context(self, layer: int) -> KV | None:
        """Keys/values of the held frames for one layer, ``[B, heads, num_frames * N, head_dim]``: views of the
        buffers, valid until the next ``commit`` (which may overwrite them in place)."""
        n = self.num_frames * self.tokens_per_frame
        if n == 0:
            return None
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def check_next(self, frame_offset: int) -> None:
        """Raise unless ``frame_offset`` is the next frame for this cache."""
        if frame_offset != self.next_frame:
            raise ValueError(
                f"the cache holds frames up to {self.next_frame - 1} but the input starts at frame {frame_offset}: "
                "commit every chunk in order (or reset the cache)"
            )

    # -- writing -------------------------------------------------------------------------------
    def commit(self, frame_offset: int, kv: list[KV]) -> None:
        """Store frames from ``frame_offset`` on: ``kv[layer] = (k, v)``, each ``[B, heads, F * N, D]``.

        Usually one chunk; several at once rebuild a cache from a full-sequence pass. Evicts the oldest
        non-sink frames when full. Recommitting the latest chunk overwrites it.
        """
        num = kv[0][0].shape[2] // self.tokens_per_frame
        placement = self.slots_for(frame_offset, num)
        for layer, (k, v) in enumerate(kv):
            self.store(layer, placement, k, v)
        self.take_slots(frame_offset, num)

    def take_slots(self, frame_offset: int, num: int) -> Placement:
        """Give frames ``frame_offset .. + num`` their slots (evicting the oldest non-sink frames when full):
        the bookkeeping of a commit, done after every layer has ``store``d its keys/values there."""
        if frame_offset < self.next_frame == frame_offset + num:  # recommit: overwrite the latest chunk
            self._check_append_only(f"recommitting frames {frame_offset}..{frame_offset + num - 1}")
            self._forget(range(frame_offset, frame_offset + num))
            self.next_frame = frame_offset
        self.check_next(frame_offset)
        slots, evicted = [], []
        for i in range(num):
            slot = self._slot_for(frame_offset + i)
            if slot is not None:
                if 0 <= self.frame_of_slot[slot] < frame_offset and slot >= self.sink:
                    evicted.append((self.frame_of_slot[slot], slot))
                self.frame_of_slot[slot] = frame_offset + i
                slots.append((slot, i))
        self.next_frame = frame_offset + num
        return Placement(slots, [slot for _, slot in sorted(evicted)])

    def slots_for(self, frame_offset: int, num: int) -> Placement:
        """The slots ``take_slots`` would give, the cache left as it is."""
        state = list(self.frame_of_slot), self.next_frame
        try:
            return self.take_slots(frame_offset, num)
        finally:
            self.frame_of_slot, self.next_frame = state

    @torch.no_grad()  # the cache holds no autograd history
    def store(self, layer: int, placement: Placement, k: torch.Tensor, v: torch.Tensor) -> None:
        """One layer's keys/values of a chunk, ``[B, heads, F * N, D]``, where ``placement`` (``slots_for``) says;
        first, with ``policy.sink_ema``, the frames it evicts update the sink (``cache_policy``)."""
        n = self.tokens_per_frame
        if self.policy.sink_ema is not None and placement.evicted and self.sink:
            sink = [self.read_frame(layer, s) for s in range(self.sink)]
            old = [self.read_frame(layer, s) for s in placement.evicted]
            keys = updated_sink([s[0] for s in sink], [e[0] for e in old], self.policy.sink_ema)
            values = updated_sink([s[1] for s in sink], [e[1] for e in old], self.policy.sink_ema)
            for (j, sk), (_, sv) in zip(keys, values, strict=True):
                self._store(layer, j, sk, sv)
        for slot, i in placement.slots:
            self._store(layer, slot, k[:, :, i * n : (i + 1) * n], v[:, :, i * n : (i + 1) * n])

    def read_frame(self, layer: int, slot: int) -> KV:
        """One held frame's keys/values ``[B, heads, N, D]`` (copies, in the dtype attention reads)."""
        n = self.tokens_per_frame
        frame = slice(slot * n, (slot + 1) * n)
        return self.k[layer, :, :, frame].clone(), self.v[layer, :, :, frame].clone()

    def _store(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One frame's keys/values ``[B, heads, N, D]`` into ``slot``."""
        n = self.tokens_per_frame
        for buf, new in ((self.k, k), (self.v, v)):
            dst = buf[layer, :, :, slot * n : (slot + 1) * n]
            if not dst.is_set_to(new):  # keys written in place by ``extend`` (the same view) stay put
                dst.copy_(new)

    def keep_sink(self, next_frame: int) -> None:
        """Forget every frame but the sink's and continue at ``next_frame`` (a re-cache recomputes the rest)."""
        self._check_append_only("a re-cache")
        self._forget(range(self.sink, self.next_frame))
        self.next_frame = next_frame

    def reset(self) -> None:
        """Forget every frame (the buffers are kept)."""
        self._check_append_only("a reset")
        self.frame_of_slot = [-1] * self.capacity
        self.next_frame = 0

    def skip_to(self, frame: int) -> None:
        """Continue at a later ``frame``: the frames before it that were not committed stay absent (a
        rebuild recommits only the frames a rolled cache still held)."""
        if frame < self.next_frame:
            raise ValueError(f"cannot skip back to frame {frame}: the cache is at frame {self.next_frame}")
        self.next_frame = frame

    def _forget(self, frames: range) -> None:
        """Mark slots of ``frames`` empty, keeping the filled slots a prefix (they are the newest ones)."""
        self.frame_of_slot = [-1 if f in frames else f for f in self.frame_of_slot]

    def _slot_for(self, frame: int) -> int | None:
        """The slot a new frame goes to: its sink slot, a free slot, or the oldest non-sink frame's slot."""
        if frame < self.sink:
            return frame
        ring = range(self.sink, self.capacity)
        if not ring:
            return None
        free = [s for s in ring if self.frame_of_slot[s] < 0]
        if free:
            return free[0]
        self._check_append_only(f"frame {frame} evicting the oldest frame")
        return min(ring, key=lambda s: self.frame_of_slot[s])

    def _check_append_only(self, what: str) -> None:
        if self.append_only:
            raise RuntimeError(
                f"{what} would overwrite a held frame of an append-only KV cache, whose views a checkpointed "
                "forward may still read in backward: make the window hold the whole video, or leave append_only off"
            )


class CacheLayer:
    """One layer's view of a ``KVCache`` for a forward of the cache's next chunk."""

    def __init__(self, cache: KVCache, layer: int, commit: Placement | None = None, context_rope: Rope | None = None):
        self.cache, self.index, self.commit_slots, self.context_rope = cache, layer, commit, context_rope

    def attended(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Called by the attention once it has read the cache: in a commit pass, store the chunk's keys/values
        ``[B, heads, F * N, D]`` in their slots now (the next layers read other layers' slots), so no layer's
        keys/values wait for the whole pass."""
        if self.commit_slots is not None:
            self.cache.store(self.index, self.commit_slots, k, v)

    def extend(self, k: torch.Tensor, v: torch.Tensor, k_raw: torch.Tensor | None = None) -> tuple[KV, KV]:
        """Keys/values to attend to, the held frames' then the chunk's ``k, v: [B, heads, F * N, D]`` (``k``
        rotated, ``k_raw`` before RoPE), and the chunk's own keys/values as stored: ``((k_all, v_all), (k, v))``.

        Without gradient the chunk goes into the free slots after the held frames and both are views of the
        buffers (valid until the next forward or commit on this cache; the cache's state does not change).
        With gradient, in a dtype the buffers cannot take without autocast, or for a pass longer than the
        free slots, the context is concatenated. With ``rope="slot"`` the cache stores ``k_raw``, and the held
        keys are rotated by slot (``context_rope``) at every read."""
        c, layer = self.cache, self.index
        a = c.num_frames * c.tokens_per_frame
        b = a + k.shape[2]
        same_dtype = k.dtype == c.k.dtype or torch.is_autocast_enabled(k.device.type)
        stored = (k_raw, v) if c.policy.by_slot else (k, v)
        if torch.is_grad_enabled() or not (c.in_place and same_dtype) or b > c.k.shape[3]:
            context = c.context(layer)
            if context is None:
                return (k, v), stored
            ks, vs = context[0].to(k.dtype), context[1].to(v.dtype)
            if c.policy.by_slot:
                ks = apply_rope(ks, self.context_rope)
            return (torch.cat([ks, k], dim=2), torch.cat([vs, v], dim=2)), stored
        c.k[layer, :, :, a:b] = k
        c.v[layer, :, :, a:b] = v
        k_all, v_all = c.k[layer, :, :, :b], c.v[layer, :, :, :b]
        return (k_all, v_all), (k_all[:, :, a:], v_all[:, :, a:])


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module's activations are computed in: the autocast dtype when autocast is on,
    ``module.compute_dtype`` when set (FSDP mixed precision keeps fp32 master weights), else the
    dtype of its parameters."""
    p = next(module.parameters())
    if torch.is_autocast_enabled(p.device.type):
        return torch.get_autocast_dtype(p.device.type)
    return getattr(module, "compute_dtype", None) or p.dtype


FP8 = torch.float8_e4m3fn


class FP8KVCache(KVCache):
    """A ``KVCache`` in fp8 (e4m3): keys and values scaled per frame and head into [-448, 448], stored in
    one byte, and dequantised to ``compute_dtype`` per layer when a forward reads them. Half of bf16's
    memory (and no in-place slots for the current chunk: it is concatenated to the dequantised context).
    Scales: ``k_scale, v_scale: [layers, B, heads, capacity]`` (fp32)."""

    def __init__(self, *args, compute_dtype: torch.dtype = torch.bfloat16, **kwargs):
        kwargs["dtype"], kwargs["in_place"] = FP8, False
        super().__init__(*args, **kwargs)
        self.compute_dtype = compute_dtype
        layers, b, heads = self.k.shape[:3]
        self.k_scale = torch.ones(layers, b, heads, self.capacity, device=self.k.device)
        self.v_scale = torch.ones_like(self.k_scale)

    def context(self, layer: int) -> KV | None:
        """The held frames' keys/values, dequantised: new tensors ``[B, heads, num_frames * N, D]``."""
        return self._dequantised(layer, 0, self.num_frames) if self.num_frames else None

    def read_frame(self, layer: int, slot: int) -> KV:
        return self._dequantised(layer, slot, slot + 1)

    def _dequantised(self, layer: int, a: int, b: int) -> KV:
        """Slots ``a .. b-1`` of one layer in ``compute_dtype``: ``[B, heads, (b - a) * N, D]`` each."""
        n = self.tokens_per_frame
        k, v = (
            (
                buf[layer, :, :, a * n : b * n].unflatten(2, (b - a, n)).to(self.compute_dtype)
                * scale[layer, :, :, a:b, None, None].to(self.compute_dtype)
            ).flatten(2, 3)
            for buf, scale in ((self.k, self.k_scale), (self.v, self.v_scale))
        )
        return k, v

    def _store(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self.tokens_per_frame
        for buf, scale, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            s = new.float().abs().amax(dim=(-2, -1)).clamp(min=1e-12) / torch.finfo(FP8).max  # [B, heads]
            scale[layer, :, :, slot] = s
            buf[layer, :, :, slot * n : (slot + 1) * n] = (new.float() / s[..., None, None]).to(FP8)
