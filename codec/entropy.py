"""Side-information coding: compressai's rANS with per-stream tables, raw bit packing, and the frame
of a level section (version, sampler, parameter check, counts, CRC32).

The ONLY module that imports compressai. Tables never depend on a model: each field's symbol
histogram is sent in the stream itself as 7-bit log-counts (a per-file, semi-static table),
so the coder is exact for any data and any model.
"""

import functools
import math
import struct
import zlib
import warnings

import numpy as np
import torch


@functools.cache
def _compressai():
    """Imported on first use: `import codec` stays light, and compressai's import-time
    torch.jit FutureWarning (torch >= 2.10) is not shown to users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from compressai._CXX import pmf_to_quantized_cdf
        from compressai.ans import RansDecoder, RansEncoder
    return pmf_to_quantized_cdf, RansEncoder, RansDecoder


def pmf_to_quantized_cdf(pmf: list[float], precision: int) -> list[int]:
    return _compressai()[0](pmf, precision)


def rans_encoder():
    """compressai's RansEncoder: encode_with_indexes(symbols, indexes, cdfs, cdf_lengths, offsets)."""
    return _compressai()[1]()


def rans_decoder():
    """compressai's RansDecoder: set_stream(bytes), then decode_stream(indexes, cdfs, ...) in order."""
    return _compressai()[2]()


PRECISION = 16  # compressai's rANS precision (fixed)
COUNT_BITS = 7  # a histogram count is sent as round(4 * log2(count)) + 1, 0 for none


class RecDecodeError(ValueError):
    """The coded bytes of a level are corrupted, truncated or were written with other params."""


# --- raw bits (LSB-first inside each value, values in order) ---------------------------------


class BitWriter:
    def __init__(self):
        self._parts: list[np.ndarray] = []

    def write(self, values, widths) -> None:
        """Append unsigned `values`, each in its own number of bits (scalar or per value)."""
        v = np.asarray(values, dtype=np.uint64).reshape(-1)
        w = np.broadcast_to(np.asarray(widths, dtype=np.int64), v.shape)
        if v.size == 0 or w.sum() == 0:
            return
        owner = np.repeat(np.arange(v.size), w)
        pos = np.arange(owner.size) - np.repeat(np.cumsum(w) - w, w)
        self._parts.append(((v[owner] >> pos.astype(np.uint64)) & np.uint64(1)).astype(np.uint8))

    @property
    def n_bits(self) -> int:
        return sum(p.size for p in self._parts)

    def getvalue(self) -> bytes:
        if not self._parts:
            return b""
        return np.packbits(np.concatenate(self._parts), bitorder="little").tobytes()


class BitReader:
    def __init__(self, data: bytes):
        self._bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        self.pos = 0

    def read(self, count: int, widths) -> np.ndarray:
        """Read `count` values written by BitWriter.write with the same widths."""
        w = np.broadcast_to(np.asarray(widths, dtype=np.int64), (count,))
        total = int(w.sum())
        if self.pos + total > self._bits.size:
            raise RecDecodeError("bit section truncated")
        bits = self._bits[self.pos : self.pos + total].astype(np.uint64)
        self.pos += total
        owner = np.repeat(np.arange(count), w)
        pos = np.arange(total) - np.repeat(np.cumsum(w) - w, w)
        out = np.zeros(count, dtype=np.uint64)
        np.bitwise_or.at(out, owner, bits << pos.astype(np.uint64))
        return out

    def finish(self) -> None:
        """Everything but the zero padding of the last byte must have been read."""
        left = self._bits.size - self.pos
        if left >= 8 or self._bits[self.pos :].any():
            raise RecDecodeError(f"{left} unexpected trailing bits")


# --- integers as (rANS-coded bucket, raw mantissa) -------------------------------------------


def bucketize(values: np.ndarray, direct_alphabet: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split integers into (symbol, mantissa, mantissa width).

    For alphabets up to `direct_alphabet` the symbol is the value itself; otherwise values
    v >= 1 are split Exp-Golomb style into the bit length and the bits below the leading 1.
    """
    values = np.asarray(values, dtype=np.int64)
    if direct_alphabet > 0:
        return values, np.zeros_like(values), np.zeros_like(values)
    if values.size and values.min() < 1:
        raise ValueError("bucketed values must be >= 1")
    exp = np.floor(np.log2(np.maximum(values, 1))).astype(np.int64)
    exp += values >= (np.int64(1) << (exp + 1))  # guard float rounding near powers of two
    exp -= values < (np.int64(1) << exp)
    return exp, values - (np.int64(1) << exp), exp


def unbucketize(symbols: np.ndarray, reader: BitReader, direct: bool) -> np.ndarray:
    if direct:
        return symbols
    mant = reader.read(symbols.size, symbols).astype(np.int64)
    return (np.int64(1) << symbols) + mant


def _cdf_from_codes(codes: np.ndarray) -> list[int]:
    counts = np.where(codes > 0, np.exp2((codes - 1) / 4.0), 0.0)
    # An explicit tail bin: compressai treats the LAST bin as its escape symbol.
    pmf = np.append(counts + 1e-3, 1e-3)
    return pmf_to_quantized_cdf((pmf / pmf.sum()).tolist(), PRECISION)


def histogram_codes(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    counts = np.bincount(symbols, minlength=alphabet)[:alphabet].astype(np.float64)
    codes = np.where(counts > 0, np.round(4 * np.log2(np.maximum(counts, 1))) + 1, 0)
    return np.minimum(codes, (1 << COUNT_BITS) - 1).astype(np.int64)


def _pad_single(symbols: list, indexes: list, cdfs: list) -> None:
    """compressai 1.2.8's RansEncoder corrupts the heap when given exactly one symbol."""
    if len(indexes) == 1:
        cdfs.append(pmf_to_quantized_cdf([0.999, 0.001], PRECISION))
        symbols.append(0)
        indexes.append(len(cdfs) - 1)


def _write_table(codes: np.ndarray, alphabet: int, bits: BitWriter) -> None:
    """Sparse histogram: top - 1, a presence bit per symbol below top, 7-bit codes of those."""
    top = int(np.flatnonzero(codes).max()) + 1
    bits.write(top - 1, bit_length(alphabet - 1))
    bits.write(codes[:top] > 0, 1)
    bits.write(codes[:top][codes[:top] > 0], COUNT_BITS)


def _read_table(alphabet: int, bits: BitReader) -> np.ndarray:
    top = int(bits.read(1, bit_length(alphabet - 1))[0]) + 1
    if top > alphabet:
        raise RecDecodeError("side-information table out of range")
    present = bits.read(top, 1).astype(bool)
    codes = np.zeros(alphabet, np.int64)
    codes[:top][present] = bits.read(int(present.sum()), COUNT_BITS).astype(np.int64)
    return codes


def _table_cost(sym: np.ndarray, codes: np.ndarray, alphabet: int) -> float:
    counts = np.bincount(sym, minlength=alphabet)
    p = counts[counts > 0] / sym.size
    top = int(np.flatnonzero(codes).max()) + 1
    return (
        bit_length(alphabet - 1)
        + top
        + COUNT_BITS * int((codes > 0).sum())
        - float((counts[counts > 0] * np.log2(p)).sum())
        + 16
    )


def encode_fields(fields: list[tuple[np.ndarray, int]], bits: BitWriter) -> bytes:
    """rANS-code several symbol arrays, each with its own alphabet and sent histogram table.

    Per non-empty field one mode bit: 1 = the symbols go raw into `bits` (cheaper for a few
    symbols than a table), 0 = a sparse table is sent and the symbols are rANS-coded.
    """
    symbols, indexes, cdfs = [], [], []
    for i, (sym, alphabet) in enumerate(fields):
        codes = histogram_codes(sym, alphabet) if sym.size else np.zeros(alphabet, np.int64)
        if sym.size:  # an empty field needs nothing: the decoder knows its count
            raw = sym.size * bit_length(alphabet - 1) <= _table_cost(sym, codes, alphabet)
            bits.write(int(raw), 1)
            if raw:
                bits.write(sym, bit_length(alphabet - 1))
                cdfs.append(_cdf_from_codes(codes))
                continue
            _write_table(codes, alphabet, bits)
        cdfs.append(_cdf_from_codes(codes))
        symbols += sym.tolist()
        indexes += [i] * sym.size
    if not symbols:
        return b""
    _pad_single(symbols, indexes, cdfs)
    return _compressai()[1]().encode_with_indexes(symbols, indexes, cdfs, [len(c) for c in cdfs], [0] * len(cdfs))


def decode_fields(data: bytes, sizes: list[tuple[int, int]], bits: BitReader) -> list[np.ndarray]:
    """Inverse of encode_fields; `sizes` holds (count, alphabet) per field."""
    indexes, cdfs, raws = [], [], {}
    for i, (count, alphabet) in enumerate(sizes):
        codes = np.zeros(alphabet, np.int64)
        if count:
            if bits.read(1, 1)[0]:
                raws[i] = bits.read(count, bit_length(alphabet - 1)).astype(np.int64)
                cdfs.append(_cdf_from_codes(codes))
                continue
            codes = _read_table(alphabet, bits)
        cdfs.append(_cdf_from_codes(codes))
        indexes += [i] * count
    out = np.zeros(0, dtype=np.int64)
    if indexes:
        _pad_single([0] * len(indexes), indexes, cdfs)
        # Zero padding: a corrupted stream must not make the C++ decoder read past the buffer.
        padded = data + bytes(64 + 8 * len(indexes))
        out = np.asarray(
            _compressai()[2]().decode_with_indexes(padded, indexes, cdfs, [len(c) for c in cdfs], [0] * len(cdfs)),
            dtype=np.int64,
        )
    elif data:
        raise RecDecodeError("unexpected rANS data")
    result, start = [], 0
    for i, (count, alphabet) in enumerate(sizes):
        if i in raws:
            field = raws[i]
        else:
            field = out[start : start + count]
            start += count
        if field.size and (field.min() < 0 or field.max() >= alphabet):
            raise RecDecodeError("side-information symbol out of range")
        result.append(field)
    return result


def bit_length(n: int) -> int:
    return max(1, math.ceil(math.log2(n + 1)))


def position_gaps(positions) -> np.ndarray:
    """Sorted distinct positions (a torch tensor) as gaps >= 1 (the first from -1), for bucketize."""
    return torch.diff(positions, prepend=positions.new_tensor([-1])).cpu().numpy()


def varint(n: int) -> bytes:
    """n >= 0 in LEB128: 7 bits a byte, low first, the high bit set on all but the last."""
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; RecDecodeError if truncated or malformed."""
    n, shift = 0, 0
    while shift < 64:
        if pos >= len(data):
            raise RecDecodeError("header truncated")
        byte = data[pos]
        n |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return n, pos
        shift += 7
    raise RecDecodeError("malformed varint in header")


def frame_section(version: int, sampler_id: int, check: int, counts: list[int], rans: bytes, raw: bytes) -> bytes:
    """A level section: u8 version | u8 sampler | u16 params check | varint counts | varint len(rans) | rans
    | raw | u32 CRC32 of everything before."""
    head = struct.pack(">BBH", version, sampler_id, check) + b"".join(varint(c) for c in [*counts, len(rans)])
    body = head + rans + raw
    return body + struct.pack(">I", zlib.crc32(body))


def open_section(
    data: bytes, *, level: int, version: int, sampler_id: int, check: int, n_counts: int
) -> tuple[list[int], bytes, BitReader]:
    """(counts, rans bytes, a reader of the raw bits) of a frame_section; RecDecodeError if the data are
    too short, corrupted, of another version or sampler, or coded with other parameters (`check`)."""
    data = bytes(data)
    if len(data) < 4 + n_counts + 1 + 4:
        raise RecDecodeError(f"level {level}: {len(data)} bytes is too short")
    body, (crc,) = data[:-4], struct.unpack(">I", data[-4:])
    if zlib.crc32(body) != crc:
        raise RecDecodeError(f"level {level}: CRC mismatch (corrupted or truncated data)")
    got_version, got_sampler, got_check = struct.unpack(">BBH", body[:4])
    if got_version != version or got_sampler != sampler_id:
        raise RecDecodeError(f"level {level}: format {got_version}/{got_sampler} is not supported")
    if got_check != check:
        raise RecDecodeError(f"level {level}: coded with different CoderParams")
    pos, counts = 4, []
    for _ in range(n_counts + 1):
        value, pos = read_varint(body, pos)
        counts.append(value)
    n_rans = counts.pop()
    if pos + n_rans > len(body):
        raise RecDecodeError(f"level {level}: side information truncated")
    return counts, body[pos : pos + n_rans], BitReader(body[pos + n_rans :])
