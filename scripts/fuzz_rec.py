"""Fuzz the .rec reader and decoder: flip and truncate bytes of real .rec files.

    python -m scripts.fuzz_rec --cases 20000 --seed 1      # tiny random models, a few minutes

Two kinds of mutations of a valid file:
  raw      byte flips, bit flips, truncations, appended bytes: decoding must raise
           RecFormatError (the CRC or a structural check catches every one);
  recrc    the same, then the CRC recomputed, so header validation and the coder's own checks
           are exercised: decoding may also succeed (e.g. another seed) or raise
           ModelNotFoundError (another model hash), but nothing else.
Every case runs under a time limit (SIGALRM); a hang fails the run. Exit status 1 on any failure.
"""

import argparse
import signal
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np


class CaseTimeout(Exception):
    pass


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


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(data: bytes, resolve, recrc: bool, timeout_s: float, max_pixels: int) -> str:
    """Decode mutated bytes; returns "ok" or an accepted error name, raises on anything else."""
    from codec.api import decompress
    from codec.store import ModelNotFoundError
    from codec.bitstream import RecFormatError

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        decompress(data, resolve, max_pixels=max_pixels)
        if not recrc:
            raise AssertionError("a corrupted file decoded without an error")
        return "ok"
    except RecFormatError as e:
        return "RecFormatError:" + e.field.split(" (")[0]
    except ModelNotFoundError:
        if not recrc:
            raise
        return "ModelNotFoundError"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def make_corpus(folder: Path) -> tuple[list[bytes], object]:
    """Real .rec files from tiny random models (PLN and VAE, odd sizes) and their resolver."""
    import torch

    from codec.api import compress_image
    from codec.store import ModelStore
    from models import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    store = ModelStore(dirs=[folder])
    files = []
    for arch, sizes in (("pln", [(37, 53), (1, 1)]), ("vae", [(17, 30)])):
        cfg = ModelConfig(
            arch=arch, channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0
        )  # small scales: some KL, so real indices get coded
        model, ref = store.load(save_model(build_model(cfg), folder, "fuzz"))
        for h, w in sizes:
            x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            files.append(compress_image(model, x, model_ref=ref, seed=int(rng.integers(1 << 62)), params="fast")[0])
    return files, store


def fuzz(
    files: list[bytes],
    resolve,
    cases: int,
    seed: int,
    recrc_share: float = 0.25,
    timeout_s: float = 10.0,
    max_pixels: int = 1 << 16,
) -> dict:
    """Run `cases` mutations; returns {"cases", "outcomes", "max_seconds"}; raises on a failure."""
    rng = np.random.default_rng(seed)
    outcomes: dict[str, int] = {}
    worst = 0.0
    for i in range(cases):
        src = files[i % len(files)]
        data, what = mutate(src, rng)
        recrc = rng.random() < recrc_share
        if recrc:
            data = fix_crc(data)
        if data == src:
            continue
        t0 = time.perf_counter()
        try:
            outcome = run_case(data, resolve, recrc, timeout_s, max_pixels)
        except BaseException as e:
            raise AssertionError(f"case {i} ({what}{', CRC fixed' if recrc else ''}): {type(e).__name__}: {e}") from e
        worst = max(worst, time.perf_counter() - t0)
        key = ("recrc " if recrc else "raw ") + outcome
        outcomes[key] = outcomes.get(key, 0) + 1
    return {"cases": cases, "outcomes": dict(sorted(outcomes.items())), "max_seconds": worst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files, store = make_corpus(Path(tmp))
        t0 = time.perf_counter()
        try:
            report = fuzz(files, store, args.cases, args.seed, timeout_s=args.timeout)
        except AssertionError as e:
            print(f"FAIL: {e}", file=sys.stderr)
            return 1
    report["seconds"] = time.perf_counter() - t0
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
