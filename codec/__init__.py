"""rec-codec: relative entropy coding of Gaussian latents (see codec/level.py for the coder API)."""

from codec.entropy import RecDecodeError
from codec.level import decode_level, encode_level
from codec.params import CoderParams, LevelParams
from codec.rng import RNG_VERSION

__all__ = ["CoderParams", "LevelParams", "RNG_VERSION", "RecDecodeError", "decode_level",
           "encode_level"]
