"""Fuzzing real .rec files: corrupted bytes only ever raise RecFormatError, never hang.

The longer run is `python -m scripts.fuzz_rec --cases 20000`.
"""

import numpy as np
import pytest

from codec.api import decompress
from codec.bitstream import RecFormatError, unpack_rec
from scripts.fuzz_rec import fix_crc, fuzz, make_corpus, mutate

CASES = 5000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("fuzz"))


def test_corpus_files_are_valid(corpus):
    files, store = corpus
    for data in files:
        image, header = decompress(data, store)
        assert image.shape == (header.height, header.width, 3)


def test_flipped_and_truncated_rec_files_raise_only_rec_format_error(corpus):
    files, store = corpus
    report = fuzz(files, store, CASES, seed=0, recrc_share=0.0, timeout_s=10.0)
    assert sum(report["outcomes"].values()) >= CASES - 40  # a few mutations can be no-ops
    assert all(k.startswith("raw RecFormatError") for k in report["outcomes"])
    assert report["max_seconds"] < 10.0


def test_corruptions_with_a_recomputed_crc_are_caught_by_validation_or_the_coder(corpus):
    """With the file CRC fixed, only header checks and the coder's checks stand in the way."""
    files, store = corpus
    report = fuzz(files, store, 500, seed=1, recrc_share=1.0, timeout_s=10.0)
    allowed = ("recrc RecFormatError", "recrc ModelNotFoundError", "recrc ok")
    assert all(k.startswith(allowed) for k in report["outcomes"]), report["outcomes"]
    assert report["outcomes"].get("recrc ok", 0) < 100


def test_every_truncation_of_a_file_is_rejected(corpus):
    files, _ = corpus
    data = files[0]
    for n in range(len(data)):
        with pytest.raises(RecFormatError):
            unpack_rec(data[:n])


def test_every_single_bit_flip_in_the_header_is_rejected(corpus):
    files, _ = corpus
    data = files[0]
    for i in range(64):
        for b in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << b
            with pytest.raises(RecFormatError):
                unpack_rec(bytes(bad))


def test_mutations_are_deterministic():
    data = bytes(range(200))
    a = [mutate(data, np.random.default_rng(3)) for _ in range(5)]
    b = [mutate(data, np.random.default_rng(3)) for _ in range(5)]
    assert a == b and fix_crc(data)[:-4] == data[:-4]
