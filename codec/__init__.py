"""rec-codec: learned image compression without quantization, by relative entropy coding.

The user API: compress_image / decompress (codec/api.py) turn images into .rec bytes and back with a
model from a ModelStore (codec/store.py); encode_level / decode_level (codec/level.py) code one
latent level with the REC samplers, whose parameters are CoderParams (codec/params.py).
"""

from codec.api import ImageTooLargeError, coding_beta, compress_image, decompress, default_coder
from codec.bitstream import RecFormatError, RecHeader
from codec.entropy import RecDecodeError
from codec.level import decode_level, encode_level
from codec.params import PRESETS, CoderParams, LevelParams
from codec.rng import RNG_VERSION
from codec.store import ModelNotFoundError, ModelRef, ModelStore, find_model, list_models

__all__ = [
    "CoderParams",
    "ImageTooLargeError",
    "LevelParams",
    "ModelNotFoundError",
    "ModelRef",
    "ModelStore",
    "PRESETS",
    "RNG_VERSION",
    "RecDecodeError",
    "RecFormatError",
    "RecHeader",
    "coding_beta",
    "compress_image",
    "decode_level",
    "decompress",
    "default_coder",
    "encode_level",
    "find_model",
    "list_models",
]
