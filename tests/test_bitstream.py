"""The .rec container: layout, round trip, and strict rejection of bad files."""

import os
import struct
import zlib

import pytest

from codec.bitstream import (
    FORMAT_VERSION,
    MAGIC,
    RecFormatError,
    RecHeader,
    pack_rec,
    read_rec,
    unpack_rec,
    write_atomic,
    write_rec,
)
from codec.rng import RNG_VERSION

HEADER = RecHeader(
    model_name="pln-b0.01-1a2b3c4d",
    model_hash=bytes(range(8)),
    height=37,
    width=53,
    seed=7,
    coder="thesis",
    coder_params=b"P" + bytes(26),
)
SECTIONS = [b"level two", b"\x00\xff" * 10]


def recrc(data: bytes) -> bytes:
    return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))


def test_roundtrip_preserves_header_and_sections(tmp_path):
    size = write_rec(tmp_path / "a.rec", HEADER, SECTIONS)
    assert size == (tmp_path / "a.rec").stat().st_size
    assert read_rec(tmp_path / "a.rec") == (HEADER, SECTIONS)


def test_layout_matches_the_spec():
    data = pack_rec(HEADER, SECTIONS)
    assert data[:4] == MAGIC == b"\x89REC"
    assert data[4:6] == bytes([1, RNG_VERSION])  # no β: written in version 1, which older builds read
    assert data[6:14] == HEADER.model_hash
    assert struct.unpack(">IIQ", data[14:30]) == (37, 53, 7)
    name = HEADER.model_name.encode()
    assert data[30] == len(name) and data[31 : 31 + len(name)] == name
    expected = (
        30
        + 1
        + len(name)
        + 1
        + len(HEADER.coder)
        + 2
        + len(HEADER.coder_params)
        + 1
        + sum(5 + len(s) for s in SECTIONS)
        + 4
    )
    assert len(data) == expected
    assert struct.unpack(">I", data[-4:])[0] == zlib.crc32(data[:-4])


def test_sections_are_tagged_top_level_first():
    data = pack_rec(HEADER, SECTIONS)
    i = data.index(SECTIONS[0]) - 5
    assert struct.unpack(">BI", data[i : i + 5]) == (2, len(SECTIONS[0]))


@pytest.mark.parametrize("seed", [0, 1, (1 << 64) - 1])
def test_roundtrip_extreme_seeds_and_sizes(seed):
    h = RecHeader("m", b"\xff" * 8, 1, 1 << 16, seed, "x", b"")
    assert unpack_rec(pack_rec(h, [b""])) == (h, [b""])


def test_read_rejects_flipped_bit():
    data = bytearray(pack_rec(HEADER, SECTIONS))
    data[len(data) - 8] ^= 1
    with pytest.raises(RecFormatError, match="CRC mismatch|crc") as e:
        unpack_rec(bytes(data))
    assert e.value.field in ("crc", "section 1 (level 2)", "section 2 (level 1)")


@pytest.mark.parametrize("n", [0, 3, 5, 29, 40, 60])
def test_read_rejects_truncated_file(n):
    data = pack_rec(HEADER, SECTIONS)
    with pytest.raises(RecFormatError, match="truncated"):
        unpack_rec(data[:n])


def test_truncation_names_the_section():
    data = pack_rec(HEADER, SECTIONS)
    with pytest.raises(RecFormatError, match=r"^section 2 \(level 1\): truncated.*CRC mismatch"):
        unpack_rec(data[:-10])


def test_read_rejects_other_format_version():
    data = bytearray(pack_rec(HEADER, SECTIONS))
    data[4] = FORMAT_VERSION + 1
    with pytest.raises(
        RecFormatError,
        match=rf"^format_version: .rec format version {FORMAT_VERSION + 1} is not "
        r"supported \(this build reads versions 1, 2, 3, 4\)$",
    ):
        unpack_rec(recrc(bytes(data)))


def test_read_rejects_other_rng_version():
    data = bytearray(pack_rec(HEADER, SECTIONS))
    data[5] = RNG_VERSION + 1
    with pytest.raises(RecFormatError, match=r"^rng_version: "):
        unpack_rec(recrc(bytes(data)))


def test_read_rejects_other_file_types():
    with pytest.raises(RecFormatError, match="^magic: not a .rec file"):
        unpack_rec(b"\x89PNG\r\n\x1a\n" + bytes(100))


@pytest.mark.parametrize(
    "offset,value,field",
    [
        (14, b"\x00\x00\x00\x00", "height"),  # height 0
        (18, b"\x00\x02\x00\x01", "width"),  # width above the limit
        (31, b"\x01", "model_name"),  # a control character
    ],
)
def test_read_validates_fields_even_with_a_valid_crc(offset, value, field):
    data = bytearray(pack_rec(HEADER, SECTIONS))
    data[offset : offset + len(value)] = value
    with pytest.raises(RecFormatError) as e:
        unpack_rec(recrc(bytes(data)))
    assert e.value.field == field


def test_read_rejects_sections_out_of_order():
    data = bytearray(pack_rec(HEADER, SECTIONS))
    i = data.index(SECTIONS[0]) - 5
    data[i] = 1
    with pytest.raises(RecFormatError, match=r"^section 1: level 1, expected 2"):
        unpack_rec(recrc(bytes(data)))


def test_read_rejects_bytes_after_the_last_section():
    data = pack_rec(HEADER, SECTIONS)
    with pytest.raises(RecFormatError, match="unexpected bytes"):
        unpack_rec(recrc(data[:-4] + b"xx" + data[-4:]))


def test_pack_rejects_invalid_headers():
    with pytest.raises(RecFormatError, match="^model_name"):
        pack_rec(RecHeader("bad name", bytes(8), 1, 1, 0), [b""])
    with pytest.raises(RecFormatError, match="^model_hash"):
        pack_rec(RecHeader("m", bytes(7), 1, 1, 0), [b""])
    with pytest.raises(RecFormatError, match="^n_sections"):
        pack_rec(HEADER, [])


def test_header_to_dict_is_json_ready():
    d = HEADER.to_dict()
    assert d["model_hash"] == "0001020304050607" and (d["format_version"], d["beta"]) == (1, None)


def test_write_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "a.rec"
    target.write_bytes(b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rec"]
