"""Real Wan2.1 models: the DiT in every checkpoint layout, the umT5 text encoder, the Wan VAE with a
streaming decoder, and the pipeline that streams them (docs/wan.md). diffusers and transformers come
with the ``[wan]`` extra and are imported only when a model is loaded."""

from .dit_weights import CheckpointError, export_dit, load_dit, read_dit
from .pipeline import RELEASED_CAUSAL, WanPipeline, load_wan
from .tae import TAEW21, load_tae
from .text_encoder import UMT5TextEncoder, load_text_encoder
from .vae import WanStreamDecoder, WanVAE, load_vae

__all__ = [
    "RELEASED_CAUSAL",
    "TAEW21",
    "CheckpointError",
    "UMT5TextEncoder",
    "WanPipeline",
    "WanStreamDecoder",
    "WanVAE",
    "export_dit",
    "load_dit",
    "load_tae",
    "load_text_encoder",
    "load_vae",
    "load_wan",
    "read_dit",
]
