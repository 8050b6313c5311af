"""Fuzz the .rec reader and decoder with mutated real files, from raw byte damage to structure-aware forgeries.

    python -m scripts.fuzz_rec --cases 100000 --seed 1          # JSON report on stdout
    python -m scripts.fuzz_rec --seed 1 --first 4711 --cases 1  # replay case 4711 of that run

The corpus: real .rec files from tiny random models whose posterior heads are set sharp enough that
the levels carry outliers, rANS side information and index bits: a PLN and a VAE (fixed β) and a
variable-rate PLN (β codes), each coded with the presets of CODERS and a custom parameter set (carried
as b"P" fields), at a few sizes, and each model's `fast` files of an image larger than a tile (TILED:
tiles of 64 pixels, format version 3). The variable-rate model also carries a random rate head, so its
files include `sp-orc-predicted` ones (level-1 sections of codec/layout.py), and a lossless head whose
output layers are random (so that the pixels' means and scales vary as a trained head's do), and the corpus
has its `fast` lossless files (format version 4, named "vbr-fast-37x53-lossless" etc.): 37x53, 1x1,
130x90 (two 128-row strips of the pixel layer) and 150x200 in tiles of 64. A case's source file is one
of the lossless files with probability LOSSLESS_SHARE, else any corpus file.

Mutation kinds; case i has kind kinds[i % len(kinds)] and its own generator seeded by (seed, i):
  raw      byte and bit flips, truncations, appended and deleted bytes anywhere in the file; the file
           CRC stays wrong.
  recrc    the same, then the file CRC recomputed: header validation and the coder's own checks.
  section  inside one section's body: bit flips in its head (version, sampler, params check), new
           values or malformed encodings of its varint counts, flips, truncations, insertions and
           deletions in its rANS part or its raw bits; then the section's CRC recomputed and the file
           repacked with pack_rec, so every CRC is valid. In a lossless file, half the cases mutate
           the pixel layer instead (u32 image CRC, then per stage and strip u32 length | rANS chunk):
           the image CRC damaged, a chunk's length field made bigger, smaller, 0 or 2^32 - 1 over the
           same bytes, bytes edited inside a chunk (its length field kept true or not), chunks
           truncated, extended, emptied, dropped, duplicated or swapped, the layer cut short or bytes
           appended after its last chunk; then the file repacked with pack_rec.
  header   crafted headers on valid sections: extreme heights and widths (up to 2^32 - 1, forged
           100 Mpx and 65535x65535 sizes), every registered parameter id and unknown ones, malformed
           b"P" and b"J" parameter fields, β codes at and past the model's range and the format's
           ends, another model's hash or name, other seeds, RNG and format versions; any file's header
           rewritten as a tiled one (format version 3) with extreme or inconsistent tile sizes, halos
           and section counts. Version 4 headers: the lossless flag set on a file without a pixel layer
           and cleared on a file with one (its pixel layer kept or dropped), each with the source's
           level bytes or the new header's; a lossless file's format byte set to 1, 2 or 3 and a lossy
           file's to 4; tile 0 in a tiled lossless file, with crafted halos; a lossless file's tiling
           and section count crafted.
  splice   sections from other files (other models, presets, sizes, seeds): a VAE section in a PLN
           file, levels of two files combined, sections swapped, duplicated, dropped or added. Pixel
           layers: another lossless file's (another size, β, image) in place of a file's own, one added
           to a lossy file of any model made lossless (of the same size half the time), a pixel layer
           where a latent section should be and a latent section where the pixel layer should be, the
           header and latents of a lossy file of the same size under a lossless file's pixel layer, the
           pixel layer dropped or duplicated.

What counts as a failure: every case must end in a decoded (H, W, 3) uint8 image, in RecFormatError,
or in ModelNotFoundError when the header names a model hash that is not in the corpus; a raw case
must raise RecFormatError. A lossless file that decodes returns pixels that passed its pixel layer's
CRC32 (some edits leave them as they were, e.g. bytes appended to a rANS chunk past what the decoder
reads). Anything else fails the run: another exception type (MemoryError included), a case running
past --timeout (a hang), the decoding process dying (a crash). Each failure names the seed, the case
index and the mutation, which --first replays. The report counts the outcomes per kind, and again
for the cases whose source is a lossless file (lossless_outcomes), and which checks of the latent
coder (section_checks) and of the pixel layer's decoder (pixel_layer_checks) fired.

Memory: the cases run in a child process whose address space is limited (RLIMIT_AS) to its size
after loading the corpus plus --memory-mb (default 1024 MiB, well below one forged 100 Mpx image in
float32), so an allocation sized by a forged header fails as MemoryError (or torch's RuntimeError),
which is a failure, and a hang or crash of that process is reported with its case. A forged size
must fail before it allocates anything of its size: decompress rejects more than max_pixels
(codec.api.MAX_PIXELS, the default here too) before it resolves the model, and below that the
coder rejects sections that do not cover the latent before it decodes indices.
"""

import argparse
import json
import multiprocessing
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from codec.api import MAX_PIXELS, compress_image, decompress
from codec.bitstream import RecFormatError, RecHeader, beta_to_code, pack_rec, unpack_rec, write_fields
from codec.header_params import params_from_header
from codec.entropy import read_varint, varint
from codec.lossless import build_tables
from codec.params import _FORMAT, REGISTERED_FORMATS, CoderParams
from codec.store import ModelNotFoundError, ModelStore
from models import ModelConfig, build_model, save_model
from models.lossless import LosslessHead
from models.rate_head import RateHead

KINDS = ("raw", "recrc", "section", "header", "splice")
STRUCTURED_KINDS = KINDS[2:]
CODERS = ("fast", "thesis", "thesis-importance", "thesis-code", "sp-orc-predicted", "custom")
SIZES = ((37, 53), (1, 1), (70, 90), (128, 192))
TILED = ((150, 200, 64),)  # (height, width, tile): 3 x 4 tiles
_TINY = dict(channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-6.0)
MODELS = {
    "pln": dict(arch="pln", **_TINY),
    "vae": dict(arch="vae", **_TINY),
    "vbr": dict(arch="pln", beta_knots=4, beta_min=0.5, beta_max=8.0, **_TINY),
}
VBR_BETAS = (0.5, 2.0, 8.0)
LOSSLESS_MODELS = ("vbr",)  # the models given a lossless head
RATE_HEAD_MODELS = ("vbr",)  # ... and a rate head: their files include `sp-orc-predicted` ones
LOSSLESS = ((37, 53), (1, 1), (130, 90))  # `fast` lossless files; 130 rows are two strips of the pixel layer
LOSSLESS_TILED = ((150, 200, 64),)
LOSSLESS_SHARE = 0.2  # the share of cases whose source is drawn from the lossless files only


class CaseTimeout(Exception):
    pass


# ---- the corpus -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusFile:
    name: str  # e.g. "pln-fast-37x53"
    model: str  # a key of MODELS
    coder: str  # a preset name or "custom"
    data: bytes

    @property
    def parts(self):
        return unpack_rec(self.data)


@dataclass
class Corpus:
    files: list[CorpusFile]
    store: object  # codec.store.ModelStore over the corpus folder
    model_hashes: dict[str, bytes]  # MODELS key -> SHA-256 prefix

    def __post_init__(self):
        self.parsed = [f.parts for f in self.files]
        self.lossless = [i for i, (header, _) in enumerate(self.parsed) if header.lossless]


def custom_params():
    """Fast with 16-dim zero runs and fixed-length level-1 indices: a header carries it as b"P" fields."""
    fast = CoderParams.preset("fast")
    return fast.with_level(1, zero_run=16, adaptive=False).with_level(2, zero_run=16)


def _sharpen(model, generator):
    """Sharp posteriors for half the latent channels (KL, outliers, groups) and near-prior ones for the
    others (zero runs): what a trained model has and a random one lacks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("scale_head.conv.bias", "scale2_head.conv.bias"):
                p.copy_(torch.empty_like(p).uniform_(-6.0, 0.5, generator=generator))
                p[::2] = 0.0
            if name in ("loc_head.conv.bias", "loc2_head.conv.bias"):
                p.copy_(2.0 * torch.randn(p.shape, generator=generator))
                p[::2] = 0.0
    return model


def lossless_head(generator) -> LosslessHead:
    """A small lossless head whose output layers are random (a fresh head predicts μ = x̂ everywhere), so
    that means and scales vary from subpixel to subpixel, with the coder's tables."""
    head = LosslessHead(8)
    with torch.no_grad():
        for net in head.stages:
            for p in (net[-1].weight, net[-1].bias):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    head.cdfs = build_tables()
    return head


def make_corpus(
    folder: Path,
    coders: tuple[str, ...] = CODERS,
    sizes: tuple[tuple[int, int], ...] = SIZES,
    models=tuple(MODELS),
    tiled: tuple[tuple[int, int, int], ...] = TILED,
    lossless: tuple[tuple[int, int], ...] = LOSSLESS,
    lossless_tiled: tuple[tuple[int, int, int], ...] = LOSSLESS_TILED,
) -> Corpus:
    """Code random images with tiny models into `folder` (model files, .rec files, corpus.json); the
    models of LOSSLESS_MODELS get a lossless head and `fast` lossless files of the `lossless` sizes and
    the `lossless_tiled` (height, width, tile) images."""
    folder = Path(folder)
    store = ModelStore(dirs=[folder])
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    index, model_files = [], {}
    for key in models:
        torch.manual_seed(len(index))
        model = _sharpen(build_model(ModelConfig(**MODELS[key])), generator)
        if key in LOSSLESS_MODELS:
            model.lossless_head = lossless_head(generator)
        if key in RATE_HEAD_MODELS:
            model.rate_head = RateHead(model.cfg.level2_channels, model.cfg.latents, 8)
        path = save_model(model, folder, f"fuzz-{key}")
        model, ref = store.load(path)
        model_files[key] = path.name
        usable = [c for c in coders if c != "sp-orc-predicted" or key in RATE_HEAD_MODELS]
        jobs = [(coder, h, w, 0, False) for coder in usable for h, w in sizes] + [("fast", *t, False) for t in tiled]
        if key in LOSSLESS_MODELS:
            jobs += [("fast", h, w, 0, True) for h, w in lossless] + [("fast", *t, True) for t in lossless_tiled]
        for coder, h, w, tile, exact in jobs:
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            params = custom_params() if coder == "custom" else coder
            beta = pick(rng, VBR_BETAS) if model.variable_rate else None
            seed = int(rng.integers(1 << 62))
            data = compress_image(
                model, image, model_ref=ref, seed=seed, params=params, beta=beta, tile=tile, lossless=exact
            )[0]
            name = f"{key}-{coder}-{h}x{w}" + (f"-tile{tile}" if tile else "") + ("-lossless" if exact else "")
            (folder / f"{name}.rec").write_bytes(data)
            index.append({"name": name, "model": key, "coder": coder})
    (folder / "corpus.json").write_text(json.dumps({"models": model_files, "files": index}, indent=1))
    return load_corpus(folder)


def load_corpus(folder: Path) -> Corpus:
    folder = Path(folder)
    store = ModelStore(dirs=[folder])
    index = json.loads((folder / "corpus.json").read_text())
    files = [
        CorpusFile(e["name"], e["model"], e["coder"], (folder / f"{e['name']}.rec").read_bytes())
        for e in index["files"]
    ]
    return Corpus(files, store, {key: store.ref(folder / name).sha256 for key, name in index["models"].items()})


# ---- raw mutations ----------------------------------------------------------------------------------


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random corruption of `data` and a short description of it."""
    data = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # truncate
        n = int(rng.integers(len(data)))
        return bytes(data[:n]), f"truncate to {n}"
    if kind == 1:  # one bit
        i, b = int(rng.integers(len(data))), int(rng.integers(8))
        data[i] ^= 1 << b
        return bytes(data), f"flip bit {b} of byte {i}"
    if kind == 2:  # a few bytes, biased to the header
        n = int(rng.integers(1, 4))
        where = rng.integers(min(len(data), 96) if rng.random() < 0.6 else len(data), size=n)
        for i in where:
            data[int(i)] ^= int(rng.integers(1, 256))
        return bytes(data), f"xor bytes {sorted(int(i) for i in where)}"
    if kind == 3:  # append
        n = int(rng.integers(1, 16))
        return bytes(data) + rng.integers(0, 256, n, dtype=np.uint8).tobytes(), f"append {n}"
    i, n = int(rng.integers(len(data))), int(rng.integers(1, 8))  # delete a run
    return bytes(data[:i] + data[i + n :]), f"delete {n} at {i}"


def fix_crc(data: bytes) -> bytes:
    if len(data) < 8:
        return data
    return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))


# ---- section mutations ------------------------------------------------------------------------------

COUNT_NAMES = ("n_segments", "n_zero_runs", "n_outliers", "len(rans)")


@dataclass
class SectionParts:
    """A level section split by codec/level.py's layout (its CRC dropped)."""

    head: bytes  # u8 version | u8 sampler | u16 params check
    counts: list[int]  # the varints COUNT_NAMES
    rans: bytes
    raw_bits: bytes
    count_bytes: bytes | None = None  # set: written instead of the varints of `counts`

    @classmethod
    def split(cls, section: bytes) -> "SectionParts":
        body, counts, pos = section[:-4], [], 4
        for _ in COUNT_NAMES:
            n, pos = read_varint(body, pos)
            counts.append(n)
        return cls(body[:4], counts, body[pos : pos + counts[3]], body[pos + counts[3] :])

    def join(self) -> bytes:
        """The section bytes with a valid CRC."""
        count_bytes = b"".join(map(varint, self.counts)) if self.count_bytes is None else self.count_bytes
        body = self.head + count_bytes + self.rans + self.raw_bits
        return body + struct.pack(">I", zlib.crc32(body))


def _edit_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Flip, xor, truncate, insert into, delete from or replace a byte string."""
    data = bytearray(data)
    op = int(rng.integers(7 if data else 2))
    if op == 0:
        n = int(rng.integers(1, 9))
        at = int(rng.integers(len(data) + 1))
        return bytes(data[:at]) + rng.bytes(n) + bytes(data[at:]), f"insert {n} bytes at {at}"
    if op == 1:
        n = int(rng.integers(1, 5))
        return bytes(data) + bytes(n), f"append {n} zero bytes"
    if op == 2:
        i, b = int(rng.integers(len(data))), int(rng.integers(8))
        data[i] ^= 1 << b
        return bytes(data), f"flip bit {b} of byte {i}"
    if op == 3:
        i = int(rng.integers(len(data)))
        data[i] ^= int(rng.integers(1, 256))
        return bytes(data), f"xor byte {i}"
    if op == 4:
        n = int(rng.integers(len(data)))
        return bytes(data[:n]), f"truncate to {n} bytes"
    if op == 5:
        at, n = int(rng.integers(len(data))), int(rng.integers(1, 9))
        return bytes(data[:at] + data[at + n :]), f"delete {n} bytes at {at}"
    return rng.bytes(len(data)), "replace with random bytes"


def _count_value(old: int, rng: np.random.Generator) -> int:
    choices = [0, 1, old - 1, old + 1, 2 * old, 127, 128, 1 << 14, 1 << 28, 1 << 32, (1 << 63) - 1, (1 << 70) - 1]
    return max(0, pick(rng, choices)) if rng.random() < 0.8 else int(rng.integers(1 << 16))


def mutate_section(sections: list[bytes], rng: np.random.Generator, lossless: bool = False) -> tuple[list[bytes], str]:
    """One mutation inside one section's body, its CRC recomputed; in a lossless file's sections, half the
    time one of the pixel layer's (mutate_pixel_layer)."""
    out = list(sections)
    if lossless and rng.random() < 0.5:
        out[-1], what = mutate_pixel_layer(sections[-1], rng)
        return out, f"section {len(sections)} pixel layer: {what}"
    i = int(rng.integers(len(sections) - lossless))
    parts = SectionParts.split(sections[i])
    where = pick(rng, ("head", "count", "count bytes", "rans", "raw bits", "raw bits", "rans"))
    if where == "head":
        at, b = int(rng.integers(4)), int(rng.integers(8))
        head = bytearray(parts.head)
        head[at] ^= 1 << b
        parts.head, what = bytes(head), f"flip bit {b} of head byte {at}"
    elif where == "count":
        k = int(rng.integers(len(COUNT_NAMES)))
        new = _count_value(parts.counts[k], rng)
        what = f"{COUNT_NAMES[k]} {parts.counts[k]} -> {new}"
        parts.counts[k] = new
    elif where == "count bytes":
        good = b"".join(map(varint, parts.counts))
        bad = [b"\xff" * 10 + b"\x01", b"\x80" * 9, good[:-1], good + b"\x00", b"\x80\x00" + good[1:]]
        parts.count_bytes = pick(rng, bad)
        what = f"varint bytes {good.hex()} -> {parts.count_bytes.hex()}"
    else:
        old = parts.rans if where == "rans" else parts.raw_bits
        new, what = _edit_bytes(old, rng)
        if where == "rans":
            parts.rans = new
            if rng.random() < 0.7:  # keep the length field true, so the rANS decoder sees the edit
                parts.counts[3] = len(new)
            else:
                what += f" (len(rans) kept at {parts.counts[3]})"
        else:
            parts.raw_bits = new
    out[i] = parts.join()
    return out, f"section {i + 1} {where}: {what}"


# ---- pixel layer mutations --------------------------------------------------------------------------


@dataclass
class PixelLayer:
    """A lossless file's pixel layer split by codec/lossless.py's layout: u32 CRC32 of the image, then
    per stage and strip `u32 length | rANS chunk`; any bytes that do not parse as a chunk are the tail."""

    crc: bytes
    chunks: list[bytes]
    lengths: list[int]  # the length fields as written: a lie where one differs from len(chunk)
    tail: bytes = b""

    @classmethod
    def split(cls, layer: bytes) -> "PixelLayer":
        chunks, pos = [], 4
        while pos + 4 <= len(layer):
            n = int.from_bytes(layer[pos : pos + 4], "big")
            if pos + 4 + n > len(layer):
                break
            chunks.append(layer[pos + 4 : pos + 4 + n])
            pos += 4 + n
        return cls(layer[:4], chunks, [len(c) for c in chunks], layer[pos:] if len(layer) >= 4 else b"")

    def join(self) -> bytes:
        return self.crc + b"".join(n.to_bytes(4, "big") + c for n, c in zip(self.lengths, self.chunks)) + self.tail


PIXEL_OPS = ("crc", "length", "length", "chunk bytes", "chunk bytes", "truncate chunk", "extend chunk")
PIXEL_OPS += ("drop chunk", "duplicate chunk", "swap chunks", "empty chunk", "cut layer", "tail")


def mutate_pixel_layer(layer: bytes, rng: np.random.Generator, op: str | None = None) -> tuple[bytes, str]:
    """One mutation of a pixel layer (`op` of PIXEL_OPS, default a random one) and its description: the
    image CRC damaged, a chunk's length field set to a lie, bytes edited inside a chunk (its length kept
    true, or not), chunks truncated, extended, emptied, dropped, duplicated or swapped, the layer cut or
    bytes appended after its last chunk."""
    px = PixelLayer.split(layer)
    op = op or pick(rng, PIXEL_OPS)
    n = len(px.chunks)
    strips = max(1, n // 6)
    nonempty = [k for k, c in enumerate(px.chunks) if c]
    k = pick(rng, nonempty) if nonempty and op in ("chunk bytes", "truncate chunk", "empty chunk") else None
    k = int(rng.integers(max(1, n))) if k is None else k
    where = f"chunk {k + 1} of {n} (stage {k // strips}, strip {k % strips})"
    if op == "crc" or not n and op not in ("cut layer", "tail"):
        crc = bytearray(px.crc)
        variant = int(rng.integers(4))
        if variant == 0 and crc:
            b = int(rng.integers(8 * len(crc)))
            crc[b // 8] ^= 1 << (b % 8)
            what = f"image CRC bit {b} flipped"
        elif variant == 1:
            crc = bytearray(rng.bytes(4))
            what = "image CRC random"
        else:
            crc = bytearray(bytes(4) if variant == 2 else b"\xff" * 4)
            what = f"image CRC {crc.hex()}"
        px.crc = bytes(crc)
        return px.join(), what
    if op == "length":
        old = px.lengths[k]
        choices = (old + 1, old + int(rng.integers(2, 65)), old - 1, old // 2, 0, (1 << 32) - 1, 1 << 31, len(layer))
        new = pick(rng, [c for c in choices if c != old and c >= 0])
        px.lengths[k] = new
        return px.join(), f"{where} length field {old} -> {new}"
    if op == "chunk bytes":
        px.chunks[k], what = _edit_bytes(px.chunks[k], rng)
        if rng.random() < 0.7:
            px.lengths[k] = len(px.chunks[k])
        else:
            what += f" (length field kept at {px.lengths[k]})"
        return px.join(), f"{where}: {what}"
    if op == "truncate chunk":
        m = int(rng.integers(len(px.chunks[k]) or 1))
        px.chunks[k], px.lengths[k] = px.chunks[k][:m], m
        return px.join(), f"{where} truncated to {m} bytes"
    if op == "extend chunk":
        m = int(rng.integers(1, 17))
        extra = bytes(m) if rng.random() < 0.5 else rng.bytes(m)
        px.chunks[k] += extra
        px.lengths[k] = len(px.chunks[k])
        return px.join(), f"{where} extended by {m} {'zero' if not any(extra) else 'random'} bytes"
    if op == "empty chunk":
        px.chunks[k], px.lengths[k] = b"", 0
        return px.join(), f"{where} emptied"
    if op == "drop chunk":
        del px.chunks[k], px.lengths[k]
        return px.join(), f"{where} dropped"
    if op == "duplicate chunk":
        px.chunks.insert(k, px.chunks[k])
        px.lengths.insert(k, px.lengths[k])
        return px.join(), f"{where} duplicated"
    if op == "swap chunks":
        m = (k + 1 + int(rng.integers(n - 1))) % n if n > 1 else k
        px.chunks[k], px.chunks[m] = px.chunks[m], px.chunks[k]
        px.lengths[k], px.lengths[m] = px.lengths[m], px.lengths[k]
        return px.join(), f"{where} swapped with chunk {m + 1}"
    if op == "cut layer":
        m = int(rng.integers(len(layer)))
        return layer[:m], f"layer cut to {m} of {len(layer)} bytes"
    m = int(rng.integers(1, 9))
    return layer + (bytes(m) if rng.random() < 0.5 else rng.bytes(m)), f"{m} bytes after the last chunk"


# ---- crafted headers --------------------------------------------------------------------------------


def file_levels(header: RecHeader, n_sections: int) -> list[int]:
    """The level byte of each section in a valid file of this header (top level first, each level's tiles
    together, a lossless header's last section level 0); any header gives some list."""
    tiles = max(1, header.n_tiles) if header.tile and header.height > 0 and header.width > 0 else 1
    n = n_sections - (header.lossless and n_sections > 0)
    return [(max(1, n // tiles) - i // tiles) & 0xFF for i in range(n)] + [0] * (n_sections - n)


def pack_unchecked(
    header: RecHeader, sections: list[bytes], levels: list[int] | None = None, count: int | None = None
) -> bytes:
    """pack_rec's layout without its checks: any field values (struct ranges still hold), `levels` as the
    sections' level bytes (default file_levels) and `count` as n_sections (default their number)."""
    return write_fields(header, sections, file_levels(header, len(sections)) if levels is None else levels, count)


def pick(rng: np.random.Generator, options):
    """One of `options` as the Python object it is (rng.choice would make numpy scalars of them)."""
    return options[int(rng.integers(len(options)))]


SIDES = (0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 4095, 65535, 65536, 65537, (1 << 31), (1 << 32) - 1)
FORGED_SIZES = ((10000, 10000), (65535, 65535), (3000, 4000), (3464, 3464), (4000, 3001), (65536, 1), (1, 65536))
_FORMAT_FIELDS = ("level", "sampler", "index_bits", "steps", "max_group_size", "outlier_range", "pool_width")
_FORMAT_FIELDS += ("pool_windows", "adaptive", "shard_decay")
_EXTREMES = {
    "B": (0, 1, 2, 3, 255),
    "H": (0, 1, 2, 3, 64, 65, 255, 256, 4096, 65535),
    "f": (0.0, -1.0, 1e-30, 1e30, float("inf"), float("nan")),
    "d": (0.0, -1.0, 1e-300, 1.0, 1.0000001, float("inf"), float("nan")),
}


def _malformed_fields(level_fields: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One decoder field of one level set to an extreme value, or the fields cut or extended."""
    size = struct.calcsize(_FORMAT)
    if rng.random() < 0.15:
        n = int(rng.integers(len(level_fields) + size + 1))
        return (level_fields + rng.bytes(size))[:n], f"fields cut or extended to {n} bytes"
    level = int(rng.integers(len(level_fields) // size))
    values = list(struct.unpack(_FORMAT, level_fields[level * size : (level + 1) * size]))
    k = int(rng.integers(len(values)))
    values[k] = pick(rng, _EXTREMES[_FORMAT.lstrip(">")[k]])
    packed = struct.pack(_FORMAT, *values)
    what = f"level block {level}: {_FORMAT_FIELDS[k]} = {values[k]}"
    return level_fields[: level * size] + packed + level_fields[(level + 1) * size :], what


def _json_params(file_params: CoderParams, rng: np.random.Generator) -> tuple[bytes, str]:
    """b"J" payloads: the file's own params (or a preset's) with one field of a wrong type or value."""
    base = file_params if rng.random() < 0.7 else CoderParams.preset(pick(rng, CODERS[:-1]))
    d = base.to_dict()
    variants = {
        "as they are": lambda: d,
        "a list": lambda: [1, 2],
        "unknown key": lambda: {**d, "bogus": 1},
        "deep nesting": lambda: "[" * 100000 + "]" * 100000,
        "index_bits as float": lambda: {**d, "level1": {**d["level1"], "index_bits": 14.5}},
        "steps as float": lambda: {**d, "level1": {**d["level1"], "steps": float(d["level1"]["steps"])}},
        "pool_windows as float": lambda: {**d, "pool_windows": d["pool_windows"] + 0.5},
        "index_bits as string": lambda: {**d, "level1": {**d["level1"], "index_bits": "14"}},
        "steps as bool": lambda: {**d, "level2": {**d["level2"], "steps": True}},
        "outlier_range NaN": lambda: {**d, "outlier_range": float("nan")},
        "outlier_range negative": lambda: {**d, "outlier_range": -3.0},
        "pool_width as float": lambda: {**d, "pool_width": 128.0},
        "pool_windows huge": lambda: {**d, "pool_windows": 1 << 40},
        "max_group_size huge": lambda: {**d, "level1": {**d["level1"], "max_group_size": 1 << 40}},
        "level1 not a dict": lambda: {**d, "level1": 5},
        "decay_choices string": lambda: {**d, "level1": {**d["level1"], "decay_choices": "abc"}},
    }
    names = list(variants)
    name = pick(rng, names)
    text = variants[name]()
    payload = zlib.compress((text if isinstance(text, str) else json.dumps(text)).encode())
    if rng.random() < 0.1:
        return zlib.compress(b" " * (1 << 20)), "JSON of 1 MiB (a zlib bomb)"
    if rng.random() < 0.1:
        n = int(rng.integers(len(payload)))
        return payload[:n], f"JSON {name}, zlib stream cut to {n} bytes"
    return payload, f"JSON {name}"


def _params_field(src_header, num_levels: int, rng: np.random.Generator) -> tuple[bytes, str]:
    tag = pick(rng, ("R", "R", "P", "P", "J", "other"))
    if tag == "R":
        if rng.random() < 0.1:
            extra = rng.bytes(pick(rng, (0, 2)))
            return b"R" + extra, f"R with {len(extra)} bytes"
        known = pick(rng, list(REGISTERED_FORMATS))
        pid = known if rng.random() < 0.6 else int(rng.integers(256))
        return b"R" + bytes([pid]), f"registered id {pid}"
    if tag == "P":
        if rng.random() < 0.3:
            level_fields = REGISTERED_FORMATS[pick(rng, list(REGISTERED_FORMATS))]
            where = "a registered set's fields"
        else:
            level_fields = params_from_header(src_header, num_levels).levels_format_bytes(num_levels)
            where = "the file's fields"
        if rng.random() < 0.3:
            return b"P" + level_fields, f"P with {where}"
        level_fields, what = _malformed_fields(level_fields, rng)
        return b"P" + level_fields, f"P with {where}, {what}"
    if tag == "J":
        payload, what = _json_params(params_from_header(src_header, num_levels), rng)
        return b"J" + payload, what
    other = rng.bytes(int(rng.integers(0, 6)))
    return other, f"params {other.hex() or '(empty)'}"


TILES = (0, 1, 16, 32, 48, 63, 64, 65, 96, 128, 1024, 65535)
CONTEXTS = (0, 16, 32, 48, 64, 128, 1024, 1025, 65535)


def craft_tiling(header: RecHeader, sections: list[bytes], rng: np.random.Generator) -> tuple[bytes, str]:
    """The file as format version 3 with its tiling fields and section count crafted (each section keeps
    its level byte)."""
    tile = header.tile or pick(rng, (64, 128))
    prior, synthesis = header.prior_context or 128, header.synthesis_context or 32
    k = int(rng.integers(4))
    if k in (0, 3):
        tile = pick(rng, TILES)
    if k in (1, 3):
        prior = pick(rng, CONTEXTS)
    if k in (2, 3):
        synthesis = pick(rng, CONTEXTS)
    n = len(sections)
    count = n if rng.random() < 0.7 else pick(rng, (0, 1, n - 1, n + 1, 65535))
    crafted = replace(header, tile=tile, prior_context=prior, synthesis_context=synthesis)
    data = pack_unchecked(crafted, sections, file_levels(header, n), count)
    return data, f"tiling: tile {tile}, contexts {prior}/{synthesis}, n_sections {count} of {n}"


LOSSLESS_CRAFTS = ("flag off", "flag off", "flag off, layer dropped", "format byte", "tile 0", "tiling", "count")
LOSSY_CRAFTS = ("flag on", "flag on", "format byte")


def craft_lossless(
    header: RecHeader, sections: list[bytes], rng: np.random.Generator, op: str | None = None
) -> tuple[bytes, str]:
    """The file as a format version 4 header would have it, or a lossless file's header as an older
    version's: `op` of LOSSLESS_CRAFTS for a lossless file (the flag cleared, with or without its pixel
    layer; the format byte set to 1, 2 or 3; tile 0, with the contexts crafted; the tiling crafted; the
    section count), of LOSSY_CRAFTS for a lossy one (the flag set on a file without a pixel layer; the
    format byte set to 4). The sections keep the level bytes of the source or get those of the new header."""
    n = len(sections)
    op = op or pick(rng, LOSSLESS_CRAFTS if header.lossless else LOSSY_CRAFTS)
    if op == "tiling":
        data, note = craft_tiling(header, sections, rng)
        return data, f"lossless {note}"
    if op == "format byte":
        version = pick(rng, (1, 2, 3)) if header.lossless else 4
        data = bytearray(pack_unchecked(header, sections))
        data[4] = version
        return fix_crc(bytes(data)), f"format_version byte {data[4]} of a version {header.format_version} file"
    if op == "count":
        count = pick(rng, (0, 1, n - 1, n + 1, 2 * n, 65535))
        return pack_unchecked(header, sections, count=count), f"lossless n_sections {count} of {n}"
    if op == "tile 0":
        prior, synthesis = pick(rng, CONTEXTS), pick(rng, CONTEXTS)
        crafted = replace(header, tile=None, prior_context=prior, synthesis_context=synthesis)
        note = f"lossless tile {header.tile} -> 0, contexts {prior}/{synthesis}"
    elif op == "flag on":
        crafted, note = replace(header, lossless=True), "lossless flag on a file without a pixel layer"
    else:
        crafted, note = replace(header, lossless=False), "lossless flag off"
        if op == "flag off, layer dropped":
            sections, note = sections[:-1], note + ", pixel layer dropped"
    own = rng.random() < 0.6
    levels = file_levels(crafted if own else header, len(sections))
    note += f" (version {crafted.format_version}, {'its' if own else 'the source'} level bytes)"
    return pack_unchecked(crafted, sections, levels), note


def craft_header(corpus: Corpus, index: int, rng: np.random.Generator) -> tuple[bytes, str]:
    """The file `index`'s sections under a header with one field crafted."""
    header, sections = corpus.parsed[index]
    src = corpus.files[index]
    fields = ("size", "size", "forged size", "params", "params", "params", "beta", "model", "name", "misc", "tiling")
    what = pick(rng, fields + ("lossless", "lossless"))
    levels = file_levels(header, len(sections))  # as the source file has them, whatever is crafted below
    if what == "tiling":
        data, note = craft_tiling(header, sections, rng)
        return data, f"header {note}"
    if what == "lossless":
        data, note = craft_lossless(header, sections, rng)
        return data, f"header {note}"
    if what == "size":
        sides = [header.height, header.width]
        k = int(rng.integers(2))
        sides[k] = pick(rng, SIDES) if rng.random() < 0.7 else max(0, sides[k] + pick(rng, (-1, 1)))
        if rng.random() < 0.3:
            sides = [pick(rng, SIDES), pick(rng, SIDES)]
        header, note = replace(header, height=sides[0], width=sides[1]), f"size {sides[0]}x{sides[1]}"
    elif what == "forged size":
        h, w = pick(rng, FORGED_SIZES)
        header, note = replace(header, height=h, width=w), f"forged size {h}x{w}"
    elif what == "params":
        params, note = _params_field(header, (len(sections) - header.lossless) // header.n_tiles, rng)
        header = replace(header, coder_params=params)
    elif what == "beta":
        codes = [None, 0, 1, 32768, 65535, int(rng.integers(1, 1 << 16))]
        codes += [beta_to_code(b) + d for b in (0.5, 8.0) for d in (-1, 0, 1)]
        code = pick(rng, codes)
        header, note = replace(header, beta_code=code), f"beta_code {code}"
    elif what == "model":
        other = pick(rng, sorted(corpus.model_hashes))
        if rng.random() < 0.3:
            header, note = replace(header, model_hash=rng.bytes(8)), "a random model hash"
        else:
            header = replace(header, model_hash=corpus.model_hashes[other], model_name=f"fuzz-{other}")
            note = f"model {src.model} -> {other}"
    elif what == "name":
        names = ["", "a", "x" * 64, "x" * 65, "x" * 255, "a b", "../up", "fuzz-vae", "\x00"]
        field_name = pick(rng, ("model_name", "coder"))
        value = pick(rng, names) if rng.random() < 0.7 else pick(rng, CODERS + ("nope",))
        header, note = replace(header, **{field_name: value}), f"{field_name} {value[:12]!r} ({len(value)} chars)"
    else:
        choice = int(rng.integers(3))
        if choice == 0:
            seed = pick(rng, (0, (1 << 64) - 1, int(rng.integers(1 << 63))))
            header, note = replace(header, seed=seed), f"seed {seed}"
        elif choice == 1:
            version = int(rng.integers(256))
            header, note = replace(header, rng_version=version), f"rng_version {version}"
        else:
            version = pick(rng, (0, 1, 2, 3, 4, 255))
            data = bytearray(pack_unchecked(header, sections, levels))
            data[4] = version
            return fix_crc(bytes(data)), f"header format_version byte {version}"
    return pack_unchecked(header, sections, levels), f"header {note}"


# ---- splicing ---------------------------------------------------------------------------------------


def splice(corpus: Corpus, index: int, rng: np.random.Generator) -> tuple[bytes, str]:
    """The file `index`'s header over sections combined from other files."""
    header, sections = corpus.parsed[index]
    other = int(rng.integers(len(corpus.files)))
    foreign = corpus.parsed[other][1]
    name = corpus.files[other].name
    ops = ("replace", "replace", "replace", "all", "reverse", "duplicate", "drop", "insert")
    op = pick(rng, ops + ("pixel layer",) * 3 if corpus.lossless else ops)
    if op == "pixel layer":
        return splice_pixel_layer(corpus, index, rng)
    if op == "replace":
        i, j = int(rng.integers(len(sections))), int(rng.integers(len(foreign)))
        out = list(sections)
        out[i] = foreign[j]
        what = f"section {i + 1} <- section {j + 1} of {name}"
    elif op == "all":
        out, what = list(foreign), f"all sections of {name}"
    elif op == "reverse":
        out, what = sections[::-1], "sections reversed"
    elif op == "duplicate":
        i = int(rng.integers(len(sections)))
        out, what = sections[:i] + sections[i:][:1] + sections[i:], f"section {i + 1} duplicated"
    elif op == "drop":
        i = int(rng.integers(len(sections)))
        out, what = sections[:i] + sections[i + 1 :], f"section {i + 1} dropped"
    else:
        i, j = int(rng.integers(len(sections) + 1)), int(rng.integers(len(foreign)))
        out = sections[:i] + [foreign[j]] + sections[i:]
        what = f"section {j + 1} of {name} inserted at {i + 1}"
    try:
        return pack_rec(header, out), f"splice: {what}"
    except RecFormatError:  # a section count no header of this kind can hold
        return pack_rec(header, sections), "splice: no change (section count out of range)"


LOSSLESS_SPLICES = ("layer swap", "latent for layer", "layer for latent", "same-size latents", "layer dropped")
LOSSLESS_SPLICES += ("layer duplicated",)
LOSSY_SPLICES = ("layer added", "layer added", "layer for latent")


def _latent(corpus: Corpus, rng: np.random.Generator) -> tuple[bytes, str]:
    """A latent section of any corpus file."""
    j = int(rng.integers(len(corpus.files)))
    header, sections = corpus.parsed[j]
    k = int(rng.integers(len(sections) - header.lossless))
    return sections[k], f"section {k + 1} of {corpus.files[j].name}"


def splice_pixel_layer(
    corpus: Corpus, index: int, rng: np.random.Generator, op: str | None = None
) -> tuple[bytes, str]:
    """The file `index` with pixel layers moved (`op` of LOSSLESS_SPLICES for a lossless file, of
    LOSSY_SPLICES for a lossy one): another file's pixel layer (another size, β or image) in place of its
    own or added to a lossy file under its header made lossless (of the same size half the time), a pixel
    layer where a latent section should be and a latent section where the pixel layer should be, the
    latents and header of a lossy file of the same size with this file's pixel layer, the layer dropped
    or duplicated. A section count no header of this kind can hold is written unchecked."""
    header, sections = corpus.parsed[index]
    op = op or pick(rng, LOSSLESS_SPLICES if header.lossless else LOSSY_SPLICES)
    same_size = [
        j
        for j in corpus.lossless
        if corpus.parsed[j][0].height == header.height and corpus.parsed[j][0].width == header.width
    ]
    others = [j for j in corpus.lossless if j != index] or corpus.lossless
    j = pick(rng, same_size) if same_size and op == "layer added" and rng.random() < 0.5 else pick(rng, others)
    layer, name = corpus.parsed[j][1][-1], corpus.files[j].name
    out = list(sections)
    if op == "layer swap":
        out[-1], what = layer, f"pixel layer <- that of {name}"
    elif op == "layer added":
        header, what = replace(header, lossless=True), f"lossless, pixel layer of {name} added"
        out.append(layer)
    elif op == "layer for latent":
        i = int(rng.integers(len(sections) - header.lossless))
        out[i], what = layer, f"section {i + 1} <- pixel layer of {name}"
    elif op == "latent for layer":
        out[-1], what = _latent(corpus, rng)
        what = f"pixel layer <- {what}"
    elif op == "same-size latents":
        lossy = [
            j
            for j, (h, _) in enumerate(corpus.parsed)
            if not h.lossless and (h.height, h.width, h.tile) == (header.height, header.width, header.tile)
        ]
        if not lossy:
            out[-1], what = layer, f"pixel layer <- that of {name} (no lossy file of its size)"
        else:
            j = pick(rng, lossy)
            other, latents = corpus.parsed[j]
            what = f"latents of {corpus.files[j].name}"
            if rng.random() < 0.5:
                header, what = replace(other, lossless=True), f"header and {what}"
            out, what = latents + [sections[-1]], f"{what} under this pixel layer"
    elif op == "layer dropped":
        out, what = sections[:-1], "pixel layer dropped, lossless kept"
    else:
        out, what = sections + [sections[-1]], "pixel layer duplicated"
    try:
        return pack_rec(header, out), f"splice: {what}"
    except RecFormatError:
        return pack_unchecked(header, out), f"splice: {what} (unchecked)"


# ---- running cases ----------------------------------------------------------------------------------


@dataclass
class CaseResult:
    index: int
    kind: str
    source: str  # the corpus file mutated
    mutation: str
    outcome: str  # "ok", "RecFormatError:<field>", "ModelNotFoundError", or what failed
    seconds: float = 0.0
    failed: bool = False
    detail: str = ""  # the error message
    lossless: bool = False  # the source is a lossless file


def make_case(corpus: Corpus, seed: int, index: int, kinds: tuple[str, ...]) -> tuple[str, int, bytes, str]:
    """(kind, source file, mutated bytes, description) of case `index`: deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    kind = kinds[index % len(kinds)]
    if corpus.lossless and rng.random() < LOSSLESS_SHARE:
        src = pick(rng, corpus.lossless)
    else:
        src = int(rng.integers(len(corpus.files)))
    header, sections = corpus.parsed[src]
    if kind in ("raw", "recrc"):
        data, what = mutate(corpus.files[src].data, rng)
        if kind == "recrc":
            data = fix_crc(data)
    elif kind == "section":
        out, what = mutate_section(sections, rng, header.lossless)
        data = pack_rec(header, out)
    elif kind == "header":
        data, what = craft_header(corpus, src, rng)
    elif kind == "splice":
        data, what = splice(corpus, src, rng)
    else:
        raise ValueError(f"unknown kind {kind!r} ({', '.join(KINDS)})")
    return kind, src, data, what


def _alarm(signum, frame):
    raise CaseTimeout()


def _decode_outcome(data: bytes, corpus: Corpus, kind: str, timeout_s: float, max_pixels: int) -> tuple[str, str]:
    """Decode `data`; (outcome, message) for an accepted outcome, raises anything else."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        image, header = decompress(data, corpus.store, max_pixels=max_pixels)
    except RecFormatError as e:
        return "RecFormatError:" + e.field.split(" (")[0], str(e)
    except ModelNotFoundError as e:
        if kind == "raw" or unpack_rec(data)[0].model_hash in corpus.model_hashes.values():
            raise
        return "ModelNotFoundError", str(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if kind == "raw":
        raise AssertionError("a file with a wrong CRC decoded")
    if image.dtype != np.uint8 or image.shape != (header.height, header.width, 3):
        raise AssertionError(f"decoded a {image.dtype} {image.shape} image for a {header.width}x{header.height} file")
    return "ok", ""


def run_case(
    corpus: Corpus,
    seed: int,
    index: int,
    kinds: tuple[str, ...],
    timeout_s: float = 10.0,
    max_pixels: int | None = None,
) -> CaseResult:
    kind, src, data, what = make_case(corpus, seed, index, kinds)
    result = CaseResult(index, kind, corpus.files[src].name, what, "", lossless=corpus.parsed[src][0].lossless)
    t0 = time.perf_counter()
    try:
        result.outcome, result.detail = _decode_outcome(data, corpus, kind, timeout_s, max_pixels or MAX_PIXELS)
    except CaseTimeout:
        result.outcome, result.failed = "hang", True
    except BaseException as e:  # every other exception is a finding
        if isinstance(e, KeyboardInterrupt):
            raise
        module = type(e).__module__
        name = type(e).__name__ if module == "builtins" else f"{module}.{type(e).__name__}"
        result.outcome, result.failed, result.detail = name, True, str(e)[:300]
    result.seconds = time.perf_counter() - t0
    return result


def _section_reason(message: str) -> str:
    """A section error's message without its numbers: which of the coder's checks fired."""
    return re.sub(r"\d+", "N", message.split(": ", 1)[-1])[:80]


@dataclass
class Report:
    seed: int
    kinds: tuple[str, ...]
    cases: int = 0
    cases_per_kind: Counter = field(default_factory=Counter)
    outcomes: dict = field(default_factory=dict)  # kind -> Counter of outcomes
    section_checks: Counter = field(default_factory=Counter)  # the coder's checks that fired, by message
    pixel_layer_checks: Counter = field(default_factory=Counter)  # the pixel layer decoder's, by message
    lossless_outcomes: dict = field(default_factory=dict)  # kind -> Counter of outcomes of lossless sources
    failures: list = field(default_factory=list)
    crashes: int = 0
    hangs: int = 0
    slowest: dict | None = None
    seconds: float = 0.0
    memory_limit_bytes: int | None = None

    def add(self, r: CaseResult) -> None:
        self.cases += 1
        self.cases_per_kind[r.kind] += 1
        self.outcomes.setdefault(r.kind, Counter())[r.outcome] += 1
        if r.lossless:
            self.lossless_outcomes.setdefault(r.kind, Counter())[r.outcome] += 1
        if "(pixel layer)" in r.detail.split(": ", 1)[0]:
            self.pixel_layer_checks[_section_reason(r.detail)] += 1
        elif r.outcome.startswith("RecFormatError:section"):
            self.section_checks[_section_reason(r.detail)] += 1
        if r.failed:
            self.crashes += r.outcome.startswith("crash")
            self.hangs += r.outcome == "hang"
            self.failures.append({"seed": self.seed, **asdict(r)})
        if self.slowest is None or r.seconds > self.slowest["seconds"]:
            self.slowest = {"seed": self.seed, **asdict(r)}

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "kinds": list(self.kinds),
            "cases": self.cases,
            "cases_per_kind": dict(self.cases_per_kind),
            "outcomes": {k: dict(sorted(c.items())) for k, c in self.outcomes.items()},
            "section_checks": dict(self.section_checks.most_common()),
            "lossless_outcomes": {k: dict(sorted(c.items())) for k, c in self.lossless_outcomes.items()},
            "pixel_layer_checks": dict(self.pixel_layer_checks.most_common()),
            "failures": self.failures[:50],
            "n_failures": len(self.failures),
            "crashes": self.crashes,
            "hangs": self.hangs,
            "slowest": self.slowest,
            "seconds": round(self.seconds, 2),
            "seconds_per_case": round(self.seconds / max(1, self.cases), 5),
            "memory_limit_bytes": self.memory_limit_bytes,
        }


def fuzz(
    corpus: Corpus,
    cases: int,
    seed: int,
    kinds: tuple[str, ...] = KINDS,
    first: int = 0,
    timeout_s: float = 10.0,
    max_pixels: int | None = None,
) -> Report:
    """Run cases first..first+cases-1 in this process (no memory limit, no crash isolation)."""
    report = Report(seed, kinds)
    t0 = time.perf_counter()
    for i in range(first, first + cases):
        report.add(run_case(corpus, seed, i, kinds, timeout_s, max_pixels))
    report.seconds = time.perf_counter() - t0
    return report


# ---- the supervised run: a child process under a memory limit -----------------------------------------


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _worker(conn, folder: str, seed: int, kinds, first: int, last: int, timeout_s, max_pixels, memory_mb) -> None:
    torch.set_num_threads(1)
    corpus = load_corpus(Path(folder))
    run_case(corpus, seed, first, kinds, timeout_s, max_pixels)  # warm up: lazy imports, model loads
    limit = _address_space() + (memory_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send(("limit", limit))
    for i in range(first, last):
        conn.send(("case", asdict(run_case(corpus, seed, i, kinds, timeout_s, max_pixels))))
    conn.send(("done", None))


def fuzz_supervised(
    folder: Path, corpus: Corpus, cases: int, seed: int, kinds=KINDS, first=0, memory_mb=1024, progress=False, **options
) -> Report:
    """fuzz() in a child process under RLIMIT_AS (`options`: timeout_s, max_pixels); a case that kills the
    child (a crash) or outlives timeout_s by far (a hang in native code) is recorded, and a new child
    goes on after it."""
    timeout_s, max_pixels = options.get("timeout_s", 10.0), options.get("max_pixels")
    report = Report(seed, kinds)
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    i, last = first, first + cases
    while i < last:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker, args=(child, str(folder), seed, kinds, i, last, timeout_s, max_pixels, memory_mb)
        )
        proc.start()
        child.close()
        started = False
        while i < last:
            if not parent.poll(120.0 if not started else 2 * timeout_s + 10):
                kind, src, _, what = make_case(corpus, seed, i, kinds)
                lossless = corpus.parsed[src][0].lossless
                report.add(
                    CaseResult(
                        i, kind, corpus.files[src].name, what, "hang (process killed)", failed=True, lossless=lossless
                    )
                )
                proc.kill()
                i += 1
                break
            try:
                tag, payload = parent.recv()
            except EOFError:
                proc.join()
                kind, src, _, what = make_case(corpus, seed, i, kinds)
                outcome = f"crash (exit code {proc.exitcode})"
                lossless = corpus.parsed[src][0].lossless
                report.add(CaseResult(i, kind, corpus.files[src].name, what, outcome, failed=True, lossless=lossless))
                i += 1
                break
            if tag == "limit":
                started, report.memory_limit_bytes = True, payload
            elif tag == "case":
                report.add(CaseResult(**payload))
                i += 1
                if progress and i % 1000 == 0:
                    print(f"{i - first} cases, {len(report.failures)} failures", file=sys.stderr, flush=True)
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        parent.close()
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--first", type=int, default=0, help="index of the first case (replay one with --cases 1)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    p.add_argument("--max-pixels", type=int, default=None, help="decompress's limit (default codec.api.MAX_PIXELS)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space a case may add (RLIMIT_AS)")
    p.add_argument("--corpus", type=Path, default=None, help="a corpus folder to reuse (built there if empty)")
    p.add_argument("--in-process", action="store_true", help="no child process: no memory limit, for debugging")
    args = p.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds must name some of {', '.join(KINDS)}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.corpus or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        corpus = load_corpus(folder) if (folder / "corpus.json").is_file() else make_corpus(folder)
        common = dict(first=args.first, timeout_s=args.timeout, max_pixels=args.max_pixels)
        if args.in_process:
            report = fuzz(corpus, args.cases, args.seed, kinds, **common)
        else:
            report = fuzz_supervised(
                folder, corpus, args.cases, args.seed, kinds, memory_mb=args.memory_mb, progress=True, **common
            )
    print(json.dumps(report.to_dict(), indent=1))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
