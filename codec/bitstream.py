"""The `.rec` container: RecHeader, pack/unpack, CRC32, versions and strict validation.

Layout (big-endian; the full spec with examples is docs/rec-format.md):

    magic "\\x89REC" | u8 format_version | u8 rng_version | 8s model_sha256[:8]
    | u32 height | u32 width | u64 seed
    | u8 len + model_name (ASCII) | u8 len + coder (ASCII) | u16 len + coder_params (bytes)
    | u16 beta_code                                                  # version 2 only
    | u8 n_sections | n_sections x (u8 level | u32 len | bytes)     # top level first
    | u32 CRC32 of everything before

    version 3 (tiled): ... coder_params | u16 beta_code (0: none) | u16 tile | u16 prior_context
    | u16 synthesis_context | u16 n_sections | sections: level L of every tile, then level L-1, ...
    version 4 (lossless): the version 3 layout (tile 0: not tiled), then one more section, level 0:
    the pixel layer (codec/lossless.py)

Version 2 adds the β a variable-rate model coded the image at (`beta_code`, 1/256-octave steps; see
beta_to_code); version 3 the tiling of an image larger than a tile (codec/tiling.py); version 4 the
pixel layer of a lossless file. A file is written in the oldest version that holds it: version 1 for
fixed-β models, so builds that predate version 2 still read those files, version 3 only for tiled
images and version 4 only for lossless ones.

Reading checks the magic and the format version first (a future version may change the
layout), then the CRC, then every field against the limits below. Any failure raises
RecFormatError naming the field at fault. Bump FORMAT_VERSION on ANY change of the layout.
"""

import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from codec.rng import RNG_VERSION

MAGIC = b"\x89REC"
FORMAT_VERSION = 4  # the newest layout this build writes and reads
READABLE_VERSIONS = (1, 2, 3, 4)
SUPPORTED_RNG_VERSIONS = (RNG_VERSION,)

MAX_SIDE = 1 << 16  # pixels per side: no image a codec can hold in memory is larger
MAX_NAME = 64  # model name / coder id characters
MAX_PARAMS = 4096  # bytes of coder parameters (parsed and checked by codec.header_params)
MAX_LEVELS = 8  # latent levels: sections of an untiled file
MAX_TILED_SECTIONS = 0xFFFF  # levels x tiles
MIN_TILE = 64  # pixels a side (a model may need a multiple of its downsampling factor)
MAX_CONTEXT = 1024  # pixels of tile halo
MAX_FILE_BYTES = 1 << 30
BETA_STEPS_PER_OCTAVE = 256  # beta_code = 32768 + 256·log2(β): β from 2^-128 to 2^128 in 0.27 % steps
NAME_RE = re.compile(rf"[A-Za-z0-9._+-]{{1,{MAX_NAME}}}")

_FIXED = struct.Struct(">4sBB8sIIQ")  # magic .. seed: 30 bytes
_MIN_SIZE = _FIXED.size + 2 + 2 + 2 + 1 + 5 + 4  # 1-char names, no params, one empty section


def beta_to_code(beta: float) -> int:
    """The nearest representable β's code; a variable-rate encoder codes at beta_from_code(code), so that
    encoder and decoder condition their networks on the same float."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"β must be a positive number, got {beta}")
    code = 32768 + round(BETA_STEPS_PER_OCTAVE * math.log2(beta))
    if not 1 <= code <= 0xFFFF:
        raise ValueError(f"β = {beta} is outside what a .rec file can hold (2^-128 .. 2^128)")
    return code


def beta_from_code(code: int) -> float:
    return 2.0 ** ((code - 32768) / BETA_STEPS_PER_OCTAVE)


class RecFormatError(ValueError):
    """A .rec file is corrupted, truncated, of another version or otherwise invalid.

    `field` names the part of the file at fault (e.g. "crc", "format_version", "section 1").
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class RecHeader:
    model_name: str  # the model file's stem, e.g. "pln-mse-1a2b3c4d"
    model_hash: bytes  # the first 8 bytes of the model file's SHA-256
    height: int
    width: int
    seed: int
    coder: str = "thesis"  # the coder preset the file was written with (informational)
    coder_params: bytes = b""  # what the decoder depends on (codec.header_params.params_to_bytes)
    rng_version: int = RNG_VERSION
    beta_code: int | None = None  # the β of a variable-rate model (format version 2), else None
    tile: int | None = None  # tiled files (format version 3): tile size, padded pixels a side
    prior_context: int = 0  # tiled files: halos of the prior and the synthesis, pixels (codec/tiling.py)
    synthesis_context: int = 0
    lossless: bool = False  # format version 4: the last section is the pixel layer (level 0)

    @property
    def format_version(self) -> int:
        if self.lossless:
            return 4
        if self.tile is not None:
            return 3
        return 1 if self.beta_code is None else 2

    @property
    def n_tiles(self) -> int:
        """Tiles in the file: ceil(H / tile) x ceil(W / tile) (the padding never adds a tile), else 1."""
        if self.tile is None:
            return 1
        return -(-self.height // self.tile) * -(-self.width // self.tile)

    @property
    def beta(self) -> float | None:
        return None if self.beta_code is None else beta_from_code(self.beta_code)

    def validate(self) -> None:
        """Raise RecFormatError unless every field is within the format's limits."""
        if self.rng_version not in SUPPORTED_RNG_VERSIONS:
            raise RecFormatError(
                "rng_version",
                f"RNG version {self.rng_version} is not supported "
                f"(this build has {', '.join(map(str, SUPPORTED_RNG_VERSIONS))})",
            )
        if not isinstance(self.model_hash, bytes) or len(self.model_hash) != 8:
            raise RecFormatError("model_hash", "must be 8 bytes (SHA-256 prefix)")
        for name, side in (("height", self.height), ("width", self.width)):
            if not 1 <= side <= MAX_SIDE:
                raise RecFormatError(name, f"{side} is outside [1, {MAX_SIDE}]")
        if not 0 <= self.seed < 1 << 64:
            raise RecFormatError("seed", f"{self.seed} is outside [0, 2^64)")
        for name, value in (("model_name", self.model_name), ("coder", self.coder)):
            if not isinstance(value, str) or not NAME_RE.fullmatch(value):
                raise RecFormatError(name, f"{value!r} is not 1-{MAX_NAME} characters of [A-Za-z0-9._+-]")
        if not isinstance(self.coder_params, bytes) or len(self.coder_params) > MAX_PARAMS:
            raise RecFormatError("coder_params", f"must be at most {MAX_PARAMS} bytes")
        if self.beta_code is not None and not 1 <= self.beta_code <= 0xFFFF:
            raise RecFormatError("beta_code", f"{self.beta_code} is outside [1, 65535]")
        self.validate_tiling()

    def validate_tiling(self) -> None:
        """The fields the layout of the sections depends on (checked while parsing)."""
        if self.tile is not None:
            if not MIN_TILE <= self.tile <= 0xFFFF:
                raise RecFormatError("tile", f"{self.tile} is outside [{MIN_TILE}, 65535]")
            if self.n_tiles < 2:
                raise RecFormatError(
                    "tile", f"a {self.width}x{self.height} image is not two or more tiles of {self.tile}"
                )
        for name in ("prior_context", "synthesis_context"):
            if not 0 <= getattr(self, name) <= MAX_CONTEXT:
                raise RecFormatError(name, f"{getattr(self, name)} is outside [0, {MAX_CONTEXT}]")

    def to_dict(self) -> dict:
        """Plain-JSON view for `rec-codec info`."""
        return {
            "format_version": self.format_version,
            "rng_version": self.rng_version,
            "model_name": self.model_name,
            "model_hash": self.model_hash.hex(),
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
            "coder": self.coder,
            "coder_params": self.coder_params.hex(),
            "beta": self.beta,
            "tile": self.tile,
            "tiles": self.n_tiles,
            "lossless": self.lossless,
        }


def _check_sections(header: RecHeader, n_sections: int) -> int:
    """The number of levels that n_sections sections make for this header's tiles (and pixel layer)."""
    limit = MAX_TILED_SECTIONS if header.format_version >= 3 else MAX_LEVELS
    levels, rest = divmod(n_sections - header.lossless, header.n_tiles)
    if not 1 + header.lossless <= n_sections <= limit or rest or not 1 <= levels <= MAX_LEVELS:
        tiles = f" for {header.n_tiles} tiles" if header.tile is not None else ""
        pixels = " and the pixel layer" if header.lossless else ""
        raise RecFormatError("n_sections", f"{n_sections} is not 1 to {MAX_LEVELS} levels{tiles}{pixels}")
    return levels


def section_level(header: RecHeader, levels: int, index: int) -> int:
    """The level byte of section `index`: top level first, each level's tiles in raster order, and a
    lossless file's pixel layer last, as level 0."""
    return max(0, levels - index // header.n_tiles)


def pack_rec(header: RecHeader, sections: list[bytes]) -> bytes:
    """Serialise a header and its sections (top level first; in a tiled file each level's tiles in
    raster order; a lossless file's pixel layer last) into .rec bytes."""
    header.validate()
    levels = _check_sections(header, len(sections))
    data = write_fields(header, sections, [section_level(header, levels, i) for i in range(len(sections))])
    if len(data) > MAX_FILE_BYTES:
        raise RecFormatError("file", f"{len(data)} bytes is above the limit of {MAX_FILE_BYTES}")
    return data


def write_fields(header: RecHeader, sections: list[bytes], levels: list[int], count: int | None = None) -> bytes:
    """The layout with whatever values it is given, unchecked (pack_rec checks them first; a fuzzer
    forges with it): `levels` are the sections' level bytes, `count` the n_sections field (default
    their number). The CRC is computed."""
    count = len(sections) if count is None else count
    out = bytearray(
        _FIXED.pack(
            MAGIC,
            header.format_version,
            header.rng_version,
            header.model_hash,
            header.height,
            header.width,
            header.seed,
        )
    )
    for text in (header.model_name, header.coder):
        out += struct.pack(">B", len(text)) + text.encode("ascii")
    out += struct.pack(">H", len(header.coder_params)) + header.coder_params
    if header.format_version >= 3:
        tiling = (header.tile or 0, header.prior_context, header.synthesis_context)
        out += struct.pack(">HHHHH", header.beta_code or 0, *tiling, count)
    else:
        if header.beta_code is not None:
            out += struct.pack(">H", header.beta_code)
        out += struct.pack(">B", count)
    for level, data in zip(levels, sections):
        out += struct.pack(">BI", level, len(data)) + data
    out += struct.pack(">I", zlib.crc32(out))
    return bytes(out)


class _Reader:
    """Bounds-checked cursor: running out of bytes names the field being read."""

    def __init__(self, data: bytes, end: int):
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > self.end:
            raise RecFormatError(field, f"truncated: needs {n} bytes, {self.end - self.pos} left")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def unpack(self, fmt: str, field: str):
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, field))


def _parse(data: bytes) -> tuple[RecHeader, list[bytes]]:
    r = _Reader(data, len(data) - 4)  # the last 4 bytes are the CRC
    _, version, rng_version, model_hash, height, width, seed = r.unpack(_FIXED.format, "header")
    texts = []
    for field in ("model_name", "coder"):
        (n,) = r.unpack(">B", field)
        raw = r.take(n, field)
        try:
            texts.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise RecFormatError(field, "not ASCII") from None
    (n,) = r.unpack(">H", "coder_params")
    params = r.take(n, "coder_params")
    tiling = {}
    if version >= 3:
        beta_code, tile, prior_context, synthesis_context = r.unpack(">HHHH", "tiling")
        beta_code = beta_code or None
        if version == 4 and tile == 0:
            tile = None
        tiling = dict(tile=tile, prior_context=prior_context, synthesis_context=synthesis_context)
        tiling["lossless"] = version == 4
        (n_sections,) = r.unpack(">H", "n_sections")
    else:
        beta_code = r.unpack(">H", "beta_code")[0] if version == 2 else None
        (n_sections,) = r.unpack(">B", "n_sections")
    header = RecHeader(texts[0], model_hash, height, width, seed, texts[1], params, rng_version, beta_code, **tiling)
    header.validate_tiling()
    levels = _check_sections(header, n_sections)
    sections = []
    for i in range(n_sections):
        level, length = r.unpack(">BI", f"section {i + 1} header")
        if level != section_level(header, levels, i):
            raise RecFormatError(f"section {i + 1}", f"level {level}, expected {section_level(header, levels, i)}")
        sections.append(r.take(length, f"section {i + 1} (level {level})"))
    if r.pos != r.end:
        raise RecFormatError("file", f"{r.end - r.pos} unexpected bytes before the CRC")
    return header, sections


def unpack_rec(data: bytes) -> tuple[RecHeader, list[bytes]]:
    """Validate and parse .rec bytes; raises RecFormatError naming the field at fault."""
    data = bytes(data)
    if len(data) > MAX_FILE_BYTES:
        raise RecFormatError("file", f"{len(data)} bytes is above the limit of {MAX_FILE_BYTES}")
    if data[:4] != MAGIC:
        raise RecFormatError("magic", f"truncated: {len(data)} bytes" if MAGIC.startswith(data) else "not a .rec file")
    if len(data) >= 5 and data[4] not in READABLE_VERSIONS:
        raise RecFormatError(
            "format_version",
            f".rec format version {data[4]} is not supported "
            f"(this build reads versions {', '.join(map(str, READABLE_VERSIONS))})",
        )
    if len(data) < _MIN_SIZE:
        raise RecFormatError("file", f"truncated: {len(data)} bytes, a .rec file has at least {_MIN_SIZE}")
    (crc,) = struct.unpack(">I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        try:  # a structural error (usually truncation) says more than a bare CRC mismatch
            _parse(data)
        except RecFormatError as e:
            raise RecFormatError(
                e.field, f"{e.args[0].split(': ', 1)[1]} (CRC mismatch: corrupted or truncated file)"
            ) from None
        raise RecFormatError("crc", "checksum mismatch: the file is corrupted")
    header, sections = _parse(data)
    header.validate()
    return header, sections


def read_rec(path: str | os.PathLike) -> tuple[RecHeader, list[bytes]]:
    """Read and validate a .rec file (size-checked before reading)."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise RecFormatError("file", f"{size} bytes is above the limit of {MAX_FILE_BYTES}")
    return unpack_rec(Path(path).read_bytes())


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file next to `path`, then rename: never a partial file at `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_rec(path: str | os.PathLike, header: RecHeader, sections: list[bytes]) -> int:
    """Write a .rec file atomically; returns its size (bpp = 8 * size / (H * W))."""
    data = pack_rec(header, sections)
    write_atomic(path, data)
    return len(data)
