"""Fuzzing real .rec files: damaged and forged files end in a decoded image or RecFormatError, never hang.

The longer run is `python -m scripts.fuzz_rec --cases 100000` (scripts/fuzz_rec.py says what each kind does).
"""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from codec.api import decompress
from codec.bitstream import RecFormatError, pack_rec, unpack_rec
from codec.header_params import params_from_header
from scripts.fuzz_rec import (
    LOSSLESS_CRAFTS,
    LOSSLESS_SPLICES,
    LOSSY_CRAFTS,
    LOSSY_SPLICES,
    PIXEL_OPS,
    STRUCTURED_KINDS,
    PixelLayer,
    SectionParts,
    craft_header,
    craft_lossless,
    fix_crc,
    fuzz,
    fuzz_supervised,
    make_case,
    make_corpus,
    mutate,
    mutate_pixel_layer,
    pack_unchecked,
    splice,
    splice_pixel_layer,
)

REPO = Path(__file__).resolve().parent.parent
TEST_CODERS = ("fast", "custom", "thesis-code", "sp-orc-predicted")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend with each other on a busy machine
    folder = tmp_path_factory.mktemp("fuzz")
    yield folder, make_corpus(folder, coders=TEST_CODERS, sizes=((1, 1), (70, 90)))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return corpus_dir[1]


def file_of(corpus, name: str) -> int:
    return next(i for i, f in enumerate(corpus.files) if f.name == name)


def test_corpus_files_are_valid_and_cover_models_coders_and_side_information(corpus):
    assert {f.model for f in corpus.files} == {"pln", "vae", "vbr"}
    assert {f.coder for f in corpus.files} == set(TEST_CODERS)
    rans_parts = 0
    for f, (header, sections) in zip(corpus.files, corpus.parsed):
        image, _ = decompress(f.data, corpus.store)
        assert image.shape == (header.height, header.width, 3)
        assert (header.beta_code is not None) == (f.model == "vbr")
        rans_parts += sum(bool(SectionParts.split(s).rans) for s in sections[: len(sections) - header.lossless])
    assert rans_parts >= 2  # the sharpened models code rANS side information, not only raw bits


def test_flipped_and_truncated_rec_files_raise_only_rec_format_error(corpus):
    report = fuzz(corpus, 2000, seed=0, kinds=("raw",)).to_dict()
    assert report["n_failures"] == 0, report["failures"][:3]
    assert all(k.startswith("RecFormatError") for k in report["outcomes"]["raw"])
    assert report["slowest"]["seconds"] < 10.0


def test_corruptions_with_a_recomputed_crc_are_caught_by_validation_or_the_coder(corpus):
    """With the file CRC fixed, only header checks and the coder's checks stand in the way."""
    report = fuzz(corpus, 300, seed=1, kinds=("recrc",)).to_dict()
    assert report["n_failures"] == 0, report["failures"][:3]
    assert report["outcomes"]["recrc"].get("ok", 0) < 60


def test_structure_aware_cases_end_in_a_decoded_image_or_the_specific_error(corpus):
    report = fuzz(corpus, 300, seed=2, kinds=STRUCTURED_KINDS).to_dict()
    assert report["n_failures"] == 0, report["failures"][:3]
    for kind in STRUCTURED_KINDS:
        outcomes = report["outcomes"][kind]
        assert set(outcomes) <= {"ok", "ModelNotFoundError"} | {k for k in outcomes if k.startswith("RecFormatError:")}
        assert outcomes.get("ok") and any(k.startswith("RecFormatError:section") for k in outcomes)
    assert len(report["section_checks"]) >= 8  # the mutations reach many of the coder's checks


def test_section_mutations_with_recomputed_crcs_raise_only_a_section_error(corpus):
    report = fuzz(corpus, 200, seed=3, kinds=("section",)).to_dict()
    assert all(k == "ok" or re.fullmatch(r"RecFormatError:section \d+", k) for k in report["outcomes"]["section"])
    assert report["outcomes"]["section"].get("RecFormatError:section 1", 0) > 50
    assert len(report["pixel_layer_checks"]) >= 3  # lossless sources: their pixel layers are mutated too

    i = file_of(corpus, "pln-fast-70x90")
    header, sections = corpus.parsed[i]
    parts = SectionParts.split(sections[0])
    parts.counts[2] += 1000  # more outliers than the level has dims
    data = pack_rec(header, [parts.join(), sections[1]])
    assert unpack_rec(data)[1][0] == parts.join()  # every CRC valid
    with pytest.raises(RecFormatError, match=r"segments / \d+ outliers for \d+ dims") as e:
        decompress(data, corpus.store)
    assert e.value.field == "section 1 (level 2)"


@pytest.mark.parametrize("variant", ["index_bits", "steps", "pool_windows"])
def test_json_coder_params_with_a_float_for_an_integer_field_are_a_format_error(corpus, variant):
    """Found by the fuzzer: such params passed CoderParams' checks and failed in the coder with struct.error."""
    i = file_of(corpus, "pln-fast-70x90")
    header, sections = corpus.parsed[i]
    d = params_from_header(header, 2).to_dict()
    if variant == "pool_windows":
        d["pool_windows"] += 0.5
    else:
        d["level1"][variant] += 0.5
    forged = dataclasses.replace(header, coder_params=b"J" + zlib.compress(json.dumps(d).encode()))
    with pytest.raises(RecFormatError, match="^coder_params: invalid coder parameters") as e:
        decompress(pack_rec(forged, sections), corpus.store)
    assert e.value.field == "coder_params"


def test_forged_huge_headers_fail_before_allocating_their_size(corpus_dir):
    """Under an address-space limit 256 MiB above the process's size: 65535x65535 fails on the pixel limit
    before the model is resolved; 100 and 12 Mpx forgeries, whole or in tiles of 1024, reach the model and
    fail in the coder, which finds the sections do not cover the latent."""
    folder, corpus = corpus_dir
    i = file_of(corpus, "pln-fast-70x90")
    header, sections = corpus.parsed[i]
    forged = {
        f"{h}x{w}": pack_unchecked(dataclasses.replace(header, height=h, width=w), sections).hex()
        for h, w in ((65535, 65535), (10000, 10000), (3000, 4000))
    }
    tiled = dataclasses.replace(header, height=10000, width=10000, tile=1024, prior_context=128, synthesis_context=32)
    forged["10000x10000 tiled"] = pack_unchecked(tiled, sections[:1] * 100 + sections[1:] * 100).hex()
    script = textwrap.dedent(f"""
        import json, resource, torch
        from pathlib import Path
        from codec.api import decompress
        from codec.bitstream import RecFormatError
        from scripts.fuzz_rec import _address_space, load_corpus
        torch.set_num_threads(1)
        corpus = load_corpus(Path({str(folder)!r}))
        decompress(corpus.files[{i}].data, corpus.store)  # models loaded, libraries imported
        resolved = []
        def resolve(header):
            resolved.append(header)
            return corpus.store(header)
        limit = _address_space() + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = {{}}
        for size, data in {forged!r}.items():
            resolved.clear()
            try:
                decompress(bytes.fromhex(data), resolve)
                out[size] = "decoded"
            except RecFormatError as e:
                out[size] = [e.field, len(resolved)]
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["65535x65535"] == ["height", 0]
    assert out["10000x10000"] == out["3000x4000"] == ["section 1 (level 2)", 1]
    assert out["10000x10000 tiled"] == ["section 56 (level 2)", 1]  # the centre tile is decoded first


def test_every_truncation_of_a_file_is_rejected(corpus):
    data = corpus.files[0].data
    for n in range(len(data)):
        with pytest.raises(RecFormatError):
            unpack_rec(data[:n])


def test_every_single_bit_flip_in_the_header_is_rejected(corpus):
    data = corpus.files[0].data
    for i in range(64):
        for b in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << b
            with pytest.raises(RecFormatError):
                unpack_rec(bytes(bad))


def test_cases_are_deterministic_in_seed_and_index(corpus):
    import numpy as np

    data = bytes(range(200))
    a = [mutate(data, np.random.default_rng(3)) for _ in range(5)]
    b = [mutate(data, np.random.default_rng(3)) for _ in range(5)]
    assert a == b and fix_crc(data)[:-4] == data[:-4]
    kinds = ("raw", "recrc") + STRUCTURED_KINDS
    for index in range(10):
        assert make_case(corpus, 7, index, kinds) == make_case(corpus, 7, index, kinds)


def test_every_corpus_file_tiled_ones_included_can_be_forged_and_spliced(corpus):
    import numpy as np

    assert any(header.tile for header, _ in corpus.parsed)
    for index in range(len(corpus.files)):
        for case in range(40):  # every crafted field, many times: building a case never fails
            rng = np.random.default_rng([index, case])
            assert craft_header(corpus, index, rng)[0][:4] == b"\x89REC"
            assert splice(corpus, index, rng)[0][:4] == b"\x89REC"


@pytest.mark.slow
def test_supervised_run_limits_memory_and_reports_every_case(corpus_dir):
    folder, corpus = corpus_dir
    report = fuzz_supervised(folder, corpus, 60, seed=4, first=100).to_dict()
    assert report["cases"] == 60 and report["n_failures"] == 0
    assert report["memory_limit_bytes"] > 0


# ---- lossless files -------------------------------------------------------------------------------


def decode(corpus, data: bytes):
    """("ok", image) or (the RecFormatError's field, its message); any other exception fails the test."""
    try:
        image, header = decompress(data, corpus.store)
    except RecFormatError as e:
        return e.field, str(e)
    assert image.dtype == np.uint8 and image.shape == (header.height, header.width, 3)
    return "ok", image


def test_corpus_has_lossless_files_of_the_variable_rate_model_whose_pixel_layers_split_into_chunks(corpus):
    names = {corpus.files[i].name for i in corpus.lossless}
    assert names == {f"vbr-fast-{s}-lossless" for s in ("37x53", "1x1", "130x90", "150x200-tile64")}
    for i in corpus.lossless:
        header, sections = corpus.parsed[i]
        assert header.format_version == 4 and corpus.files[i].model == "vbr"
        layer = PixelLayer.split(sections[-1])
        assert layer.join() == sections[-1] and not layer.tail
        assert len(layer.chunks) == 6 * -(-header.height // 128)  # 130 rows: two strips
        image = decode(corpus, corpus.files[i].data)[1]
        assert zlib.crc32(image.tobytes()).to_bytes(4, "big") == layer.crc
    assert corpus.parsed[file_of(corpus, "vbr-fast-150x200-tile64-lossless")][0].tile == 64
    assert not any(header.lossless for i, (header, _) in enumerate(corpus.parsed) if i not in corpus.lossless)


@pytest.mark.parametrize("name", ["vbr-fast-130x90-lossless", "vbr-fast-1x1-lossless"])
def test_every_pixel_layer_mutation_ends_in_a_pixel_layer_error_or_the_encoders_pixels(corpus, name):
    """Damaged CRCs, lying length fields, edited, cut, extended, dropped, duplicated and swapped chunks: the
    decoder names the pixel layer, or (bytes it never reads) returns the pixels that pass the CRC."""
    i = file_of(corpus, name)
    header, sections = corpus.parsed[i]
    original = decode(corpus, corpus.files[i].data)[1]
    errors = set()
    for op in dict.fromkeys(PIXEL_OPS):
        for case in range(2):
            layer, what = mutate_pixel_layer(sections[-1], np.random.default_rng([i, case]), op)
            field, result = decode(corpus, pack_rec(header, sections[:-1] + [layer]))
            if field == "ok":
                assert np.array_equal(result, original), what
            else:
                assert field == f"section {len(sections)} (pixel layer)", (what, result)
                errors.add(re.sub(r"\d+", "N", result.split(": ", 1)[1])[:40])
    assert {"the decoded image fails the pixel layer'", "N unexpected bytes after the last stage"} <= errors
    assert any(e.startswith("truncated") for e in errors)


def test_crafted_version_4_headers_are_format_errors_unless_they_describe_a_valid_file(corpus):
    """The lossless flag set without a pixel layer or cleared with one, format bytes 1-3 on a lossless file
    and 4 on a lossy one, tile 0, crafted tilings and counts; a lossless file whose flag is cleared and
    pixel layer dropped is its lossy file and decodes."""
    outcomes = {}
    for name in ("vbr-fast-130x90-lossless", "vbr-fast-150x200-tile64-lossless", "pln-fast-70x90", "vbr-fast-1x1"):
        i = file_of(corpus, name)
        header, sections = corpus.parsed[i]
        for op in dict.fromkeys(LOSSLESS_CRAFTS if header.lossless else LOSSY_CRAFTS):
            for case in range(3):
                data, _ = craft_lossless(header, sections, np.random.default_rng([i, case]), op)
                field, _ = decode(corpus, data)
                outcomes.setdefault(op, set()).add(field if field == "ok" else "error")
    assert outcomes["flag on"] == outcomes["flag off"] == outcomes["format byte"] == {"error"}
    assert outcomes["count"] == {"error"}
    assert "ok" in outcomes["flag off, layer dropped"]


def test_spliced_pixel_layers_end_in_a_format_error_or_pixels_that_pass_the_crc(corpus):
    """Pixel layers of other sizes and images, added to lossy files of other models, in place of latent
    sections and the reverse, under a same-size lossy file's latents, dropped and duplicated."""
    fields = {}
    for name in ("vbr-fast-37x53-lossless", "vbr-fast-150x200-tile64-lossless", "pln-fast-70x90", "vbr-fast-1x1"):
        i = file_of(corpus, name)
        for op in dict.fromkeys(LOSSLESS_SPLICES if corpus.parsed[i][0].lossless else LOSSY_SPLICES):
            for case in range(2):
                data, what = splice_pixel_layer(corpus, i, np.random.default_rng([i, case]), op)
                field, result = decode(corpus, data)
                if field == "ok":
                    layer = unpack_rec(data)[1][-1]
                    assert zlib.crc32(result.tobytes()).to_bytes(4, "big") == layer[:4], what
                fields.setdefault(op, set()).add(re.sub(r"\d+", "N", field))
    assert fields["layer dropped"] == fields["layer duplicated"] == {"n_sections"}
    assert fields["latent for layer"] == {"section N (pixel layer)"}
    assert "pixel layer" in fields["layer added"]  # a PLN without a lossless head
    assert fields["layer for latent"] <= {"section N (level N)"}
