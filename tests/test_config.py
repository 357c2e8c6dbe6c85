from pathlib import Path

import pytest
import torch

from selfforcing.config import ConfigError, config_from_yaml, config_to_yaml, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.steps > 0


def test_recipes_exist():
    assert {p.name for p in CONFIGS} >= {"teacher_toy.yaml", "teacher_demo.yaml"}


def test_overrides_and_yaml_roundtrip():
    cfg = load_config(
        None, ["optim.lr=0.01", "data.colours=[red,blue]", "data.max_objects=2", "model.patch_size=[1,2,2]"]
    )
    assert cfg.optim.lr == 0.01 and cfg.data.colours == ["red", "blue"] and cfg.model.patch_size == (1, 2, 2)
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"optim\.lrr.*not in 'OptimConfig'"),
        ("bogus=1", r"'bogus'.*not in 'TrainConfig'"),
        ("optim.lr=fast", r"optim\.lr.*could not be converted"),
        ("steps=-1", "steps must be >= 1"),
        ("precision=fp8", "precision must be"),
        ("data.height=30", "not divisible by model patch_size"),
        ("model.preset=huge", "unknown preset 'huge'"),
        ("data.source=folder", "needs data.folder"),
        ("data.colours=[red,purple]", "purple"),
        ("steps", "key=value"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 10\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*bad\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def official_attended(local_attn_size: int, sink_size: int, fpb: int, num_frames: int) -> list[list[int]]:
    """The frames each chunk attends to in the official code (guandeh17/Self-Forcing and NVlabs/LongLive,
    wan/modules/causal_model.py, CausalWanSelfAttention with a KV cache): the cache holds
    ``local_attn_size`` frames (``kv_cache_size = local_attn_size * frame_seq_length``); a chunk is written
    at its end, the oldest frames after the first ``sink_size`` rolled out to make room, and the chunk
    attends to the whole cache: the sink, the recent frames and itself."""
    cache, attended = [], []
    for start in range(0, num_frames, fpb):
        evicted = len(cache) + fpb - local_attn_size
        if evicted > 0:
            cache = cache[:sink_size] + cache[sink_size + evicted :]
        cache = cache + list(range(start, start + fpb))
        assert len(cache) <= local_attn_size
        attended.append(cache)
    return attended


def test_the_official_local_attn_size_counts_the_sink_and_the_chunk():
    """LongLive's local_attn_size 12 with sink_size 3 (and Self Forcing's names) is window 9, sink 3 here: the
    same 12-frame KV cache (9 past frames + the chunk) and the same frames attended by every chunk."""
    from selfforcing.models.causal import frame_visibility
    from selfforcing.models.kv_cache import KVCache

    official = ["causal.local_attn_size=12", "causal.sink_size=3", "causal.frames_per_block=3"]
    base = ["stage=ode_init", "ode.pairs=pairs", "data.frames=6"]
    causal = load_config(None, [*base, *official]).causal
    assert (causal.window, causal.sink) == (9, 3)
    assert causal.local_attn_size is None and causal.sink_size is None  # resolved into window / sink
    cache = KVCache(1, 1, 1, 1, 1, 3, causal.window, causal.sink)
    assert cache.capacity + causal.frames_per_block == 12  # the official kv_cache_size, in frames
    frames = 30
    visible = frame_visibility(frames, 3, causal.window, causal.sink)
    for chunk, attended in enumerate(official_attended(12, 3, 3, frames)):
        start = 3 * chunk
        assert cache.frames + list(range(start, start + 3)) == attended  # the rolling cache, then the chunk
        for i in range(start, start + 3):  # the full-sequence mask of training
            assert visible[i].nonzero().flatten().tolist() == attended
        cache.commit(start, [(torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 3, 1))])
    # the same written both ways, and without a sink; -1 is unlimited; the yaml round trip keeps it
    assert load_config(None, [*base, *official, "causal.window=9", "causal.sink=3"]).causal == causal
    assert load_config(None, [*base, "causal.local_attn_size=12"]).causal.window == 12
    assert load_config(None, [*base, "causal.local_attn_size=-1", "causal.sink_size=3"]).causal.window == 0
    cfg = load_config(None, [*base, *official])
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["causal.local_attn_size=12", "causal.sink_size=3", "causal.window=12"],
            r"causal.window=12 and causal.local_attn_size=12 disagree: .*counts the sink frames and the current "
            r"chunk.* window = local_attn_size - sink_size = 12 - 3 = 9",
        ),
        (["causal.local_attn_size=12", "causal.window=0"], r"causal.window=0 and causal.local_attn_size=12 disagree"),
        (["causal.local_attn_size=-1", "causal.window=6"], r"causal.window=6 and causal.local_attn_size=-1 disagree"),
        (["causal.sink=2", "causal.sink_size=3"], r"causal.sink=2 and causal.sink_size=3 disagree"),
        (["causal.local_attn_size=0"], r"local_attn_size must be -1 \(unlimited\) or >= 1"),
        (
            ["causal.local_attn_size=5", "causal.sink_size=3"],
            r"local_attn_size=5 with sink_size=3 leaves window = local_attn_size - sink_size = 2 frames, less than "
            r"a chunk \(frames_per_block=3\).*local_attn_size >= sink_size \+ frames_per_block = 6",
        ),
    ],
)
def test_contradicting_official_and_own_window_names_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["stage=ode_init", "ode.pairs=pairs", "data.frames=6", *overrides])
