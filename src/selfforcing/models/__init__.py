"""Networks: the video DiT, text encoders and pixel<->latent codecs."""

from .codec import Codec, IdentityCodec
from .dit import DIT_PRESETS, DiTConfig, VideoDiT, dit_config
from .text_encoder import ShapesTextEncoder, TextEncoder

__all__ = [
    "DIT_PRESETS",
    "Codec",
    "DiTConfig",
    "IdentityCodec",
    "ShapesTextEncoder",
    "TextEncoder",
    "VideoDiT",
    "dit_config",
]
