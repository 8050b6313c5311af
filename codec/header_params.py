"""The header's coder parameters: CoderParams <-> the bytes a .rec header carries for its decoder."""

import json
import struct
import zlib

from codec.bitstream import RecFormatError, RecHeader
from codec.params import PRESETS, REGISTERED_FORMATS, CoderParams, registered_id

# Coder parameters in the header: the `coder` field names the preset ("thesis", "fast"; "custom"
# for any other params). A shipped preset's decoder fields are a registered parameter set, sent as
# b"R" + its one-byte id (REGISTERED_FORMATS); any other params as b"P" + CoderParams.format_bytes
# of each level (the fields a decoder depends on, 24 bytes a level). Either way the decoder rebuilds
# its params from those fields, so files stay decodable if a preset is retuned or a newer build adds
# one. Files of earlier builds may carry custom params in full: b"J" + zlib(JSON), still read.
_MAX_JSON = 1 << 16


def params_to_bytes(params: CoderParams, num_levels: int) -> bytes:
    fields = params.levels_format_bytes(num_levels)
    known = registered_id(fields)
    return b"P" + fields if known is None else b"R" + bytes([known])


def params_from_header(header: RecHeader, num_levels: int) -> CoderParams:
    """The CoderParams to decode a file with (the full preset when this build's preset of that name
    matches the file); RecFormatError if missing or invalid."""
    data, tag = header.coder_params[1:], header.coder_params[:1]
    if tag == b"R":
        if len(data) != 1 or data[0] not in REGISTERED_FORMATS:
            raise RecFormatError(
                "coder_params", f"unknown registered parameter set {data.hex() or '(none)'} (written by a newer build?)"
            )
        data, tag = REGISTERED_FORMATS[data[0]], b"P"
    if tag == b"P":
        try:  # the decoder fields travel in the file: a preset may change without orphaning files
            decodable = CoderParams.from_format_bytes(data, num_levels)
        except ValueError as e:
            raise RecFormatError("coder_params", f"invalid coder parameters ({e})") from None
        preset = CoderParams.preset(header.coder) if header.coder in PRESETS else None
        if preset is not None and preset.levels_format_bytes(num_levels) == data:
            return preset
        return decodable
    if tag == b"J":
        try:
            d = zlib.decompressobj()
            text = d.decompress(data, _MAX_JSON)
            if d.unconsumed_tail or not d.eof:
                raise ValueError("bad zlib stream")
            params = CoderParams.from_dict(json.loads(text.decode("utf-8")))
            # the decoder fields must be what b"P" could carry (ints where ints go, a finite outlier range)
            CoderParams.from_format_bytes(params.levels_format_bytes(num_levels), num_levels)
            return params
        except (zlib.error, ValueError, TypeError, KeyError, AttributeError, RecursionError, struct.error) as e:
            raise RecFormatError("coder_params", f"invalid coder parameters ({e})") from None
    raise RecFormatError("coder_params", f"unknown encoding {tag!r}")


def describe_params(header: RecHeader, num_levels: int) -> dict:
    """JSON view of a header's coder parameters for `rec-codec info` (never raises)."""
    try:
        params = params_from_header(header, num_levels)
    except RecFormatError as e:
        return {"error": str(e)}
    return params.to_dict()
