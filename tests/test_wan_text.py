"""umT5 text embeddings: equal to diffusers' WanPipeline (UMT5EncoderModel, padding zeroed to 512)."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from diffusers import WanPipeline  # noqa: E402

from selfforcing.wan.dit_weights import CheckpointError  # noqa: E402
from selfforcing.wan.text_encoder import clean_prompt, load_text_encoder  # noqa: E402

from .wan_tiny import write_diffusers_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return write_diffusers_pipeline(tmp_path_factory.mktemp("wan") / "pipe")


def test_embeddings_equal_wan_pipeline_with_padding_zeroed(pipe_dir):
    ref = WanPipeline.from_pretrained(pipe_dir)
    prompts = ["a large red circle moving right", "  the cat   walks on grass at night &amp; zz ", ""]
    with torch.no_grad():
        want = ref._get_t5_prompt_embeds(prompts, max_sequence_length=512, device=torch.device("cpu"))
    enc = load_text_encoder(pipe_dir)
    got, mask = enc(prompts)
    assert mask is None  # Wan attends to every one of the 512 tokens
    assert got.shape == (3, 512, 24) and want.shape == got.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    lengths = (got.abs().sum(-1) > 0).sum(1).tolist()
    assert lengths[0] == 7 and lengths[2] == 1  # 6 words + </s>; the empty prompt is </s> alone
    assert torch.count_nonzero(got[0, 7:]) == 0


def test_each_prompt_is_encoded_once(pipe_dir):
    enc = load_text_encoder(pipe_dir)
    calls = []
    enc.encoder.register_forward_hook(lambda m, args, out: calls.append(1))
    a, _ = enc(["a cat", "a red circle"])
    b, _ = enc(["a  red circle", "a cat", "a cat"])  # same after cleaning
    assert len(calls) == 1 and len(enc.cache) == 2
    torch.testing.assert_close(b[1], a[0])
    torch.testing.assert_close(b[0], a[1])


def spy_moves(enc) -> list[tuple[str, str]]:
    """Record (module, device) for every ``.to`` of umT5's blocks, final norm and whole stack."""
    moves = []
    stack = enc.encoder.encoder
    named = {f"block{i}": b for i, b in enumerate(stack.block)} | {"norm": stack.final_layer_norm, "stack": stack}
    for name, module in named.items():
        to = module.to
        module.to = lambda device, name=name, to=to: moves.append((name, str(device))) or to(device)
    return moves


def test_offloaded_encoder_visits_the_device_a_block_at_a_time(pipe_dir):
    plain = load_text_encoder(pipe_dir)
    enc = load_text_encoder(pipe_dir, offload=True, device="cpu")
    moves = spy_moves(enc)
    emb, _ = enc(["a cat"])
    torch.testing.assert_close(emb, plain(["a cat"])[0])  # the same embeddings
    # each block (then the final norm) goes to the device (here the CPU) and back before the next arrives
    blocks = [(f"block{i}", d) for i in range(2) for d in ("cpu", "cpu")] + [("norm", "cpu"), ("norm", "cpu")]
    assert moves == [*blocks, ("stack", "cpu")]
    enc(["a cat"])
    assert len(moves) == len(blocks) + 1  # a known prompt moves nothing
    assert next(enc.encoder.parameters()).device.type == "cpu" and emb.device.type == "cpu"


def test_cleaning_and_errors(tmp_path):
    assert clean_prompt("  a &amp;amp; b\n\tc ") == "a & b c"
    with pytest.raises(FileNotFoundError, match="has no text_encoder/ folder .diffusers layout. and no models_t5"):
        load_text_encoder(tmp_path)


def test_original_wan_t5_layout_equals_transformers(pipe_dir, tmp_path):
    """Wan's own T5 names (models_t5_umt5-xxl-enc-bf16.pth, bf16) + google/umt5-xxl/ give the same embeddings."""
    from transformers import UMT5EncoderModel

    from .wan_tiny import original_t5_state_dict, tiny_tokenizer

    ref = UMT5EncoderModel.from_pretrained(pipe_dir / "text_encoder")
    with torch.no_grad():
        for p in ref.parameters():  # the released file is bf16: compare on bf16-representable weights
            p.copy_(p.to(torch.bfloat16).float())
    state = {k: v.to(torch.bfloat16) for k, v in original_t5_state_dict(ref).items()}
    torch.save(state, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    tiny_tokenizer().save_pretrained(tmp_path / "google" / "umt5-xxl")
    enc = load_text_encoder(tmp_path)
    assert enc.encoder.encoder.embed_tokens.weight is enc.encoder.shared.weight
    ids = torch.tensor([[3, 4, 5, 1, 0, 0]])
    mask = (ids > 0) | (torch.arange(6) == 3)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = enc.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    del state["blocks.1.ffn.fc2.weight"]
    torch.save(state, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): encoder.block.1.layer.1.DenseReluDense.wo.weight"):
        load_text_encoder(tmp_path)


def test_embeddings_cached_on_disk_are_computed_once(pipe_dir, tmp_path, capsys):
    from selfforcing.cli import main

    prompts = ["a large red circle moving right", "the cat walks on grass", "a large  red circle moving right"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    cache = tmp_path / "umt5"
    main(["encode-prompts", "--model", str(pipe_dir), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(cache)])
    # the third is the first, cleaned; and Wan's negative prompt, which the Wan recipes' real score reads
    assert "3 prompts, 3 encoded now" in capsys.readouterr().out
    assert len(list(cache.glob("*.safetensors"))) == 3
    from selfforcing.wan.pipeline import WAN_NEGATIVE_PROMPT

    assert load_text_encoder(pipe_dir, cache_dir=cache).cache_file(clean_prompt(WAN_NEGATIVE_PROMPT)).is_file()
    args = ["--prompts", str(tmp_path / "prompts.txt"), "--out", str(cache), "--negative-prompt", "none"]
    main(["encode-prompts", "--model", str(pipe_dir), *args])
    assert "2 prompts, 0 encoded now, 2 already" in capsys.readouterr().out
    cached = load_text_encoder(pipe_dir, cache_dir=cache)
    calls = []
    cached.encoder.register_forward_hook(lambda *_: calls.append(1))
    got, _ = cached(prompts[:2])
    assert not calls  # read from disk, umT5 not run
    torch.testing.assert_close(got, load_text_encoder(pipe_dir)(prompts[:2])[0])
    # a cache file that holds another prompt's embedding is refused, not used
    other = load_text_encoder(pipe_dir, cache_dir=cache)
    other.cache_file("a large red circle moving right").replace(other.cache_file("a red square"))
    with pytest.raises(ValueError, match="holds another prompt's embedding"):
        other(["a red square"])


def test_a_prompt_of_special_tokens_is_refused(pipe_dir):
    enc = load_text_encoder(pipe_dir)
    for prompt in ["<pad>", "<pad> <pad></s>", "<unk>"]:
        with pytest.raises(ValueError, match="only the text encoder's special tokens"):
            enc([prompt])
    assert enc(["", "a cat <pad>"])[0].isfinite().all()  # the empty (negative) prompt and words are fine


def test_offload_goes_back_to_the_cpu_on_error_and_encodes_one_at_a_time(pipe_dir):
    import threading
    import time

    enc = load_text_encoder(pipe_dir, offload=True, device="cpu")
    moves = spy_moves(enc)
    forward = enc.encoder.forward

    def failing(*args, **kw):
        raise RuntimeError("out of memory")

    block_forward = enc.encoder.encoder.block[1].forward
    enc.encoder.encoder.block[1].forward = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        enc(["a cat"])
    assert moves[-1] == ("stack", "cpu")  # block 1 went to the device and failed there: all back to the CPU
    enc.encoder.encoder.block[1].forward = block_forward
    inside, most = [0], [0]

    def slow(*args, **kw):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        inside[0] -= 1
        return forward(*args, **kw)

    enc.encoder.forward = slow
    threads = [threading.Thread(target=enc, args=([f"a cat {w}"],)) for w in ("red", "blue", "green")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(enc.cache) == 3  # two streams never run umT5 (or move it) at once
