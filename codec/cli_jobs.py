"""The command line's per-input work: where each input's output goes, running each input, and one
line (result or error) per input."""

import json
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A bad command line; reported as one line, exit status 2."""


class CliError(Exception):
    """A per-input failure whose message is already user-facing."""


def plan(inputs: list[str], output: str | None, exts: tuple[str, ...], out_name) -> list[tuple[Path, Path | None, str]]:
    """(source, destination, error) per input file; folders are searched recursively."""
    found: list[tuple[Path, Path]] = []  # (file, path relative to the folder it came from)
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not files:
                raise UsageError(f"{arg}: no {'/'.join(exts)} files in this folder")
            found += [(f, f.relative_to(path)) for f in files]
        else:
            found.append((path, Path(path.name)))
    several = len(found) > 1 or any(Path(a).is_dir() for a in inputs)
    out = Path(output) if output else None
    if output and output.endswith(("/", os.sep)):
        several = True  # "-o out/" names a folder even for one input
    if out is not None and several and out.exists() and not out.is_dir():
        raise UsageError(f"-o {output}: must be a folder when there are several inputs")
    sources = {f.resolve() for f, _ in found}
    jobs, taken = [], {}
    for src, rel in found:
        if out is None:
            dst = src.with_name(out_name(src.name))
        elif several or out.is_dir():
            dst = out / rel.with_name(out_name(rel.name))
        else:
            dst = out
        err = ""
        if dst.resolve() in sources:
            err = f"output {dst} would overwrite an input"
        elif dst.resolve() in taken:
            err = f"output {dst} is also the output of {taken[dst.resolve()]}"
        taken.setdefault(dst.resolve(), src)
        jobs.append((src, dst, err))
    return jobs


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if x != float("inf") else "inf"


def _progress(jobs, show: bool):
    from tqdm import tqdm

    return tqdm(jobs, file=sys.stderr, unit="file", disable=None if show and len(jobs) > 1 else True)


def say(text: str, err: bool = False) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr if err else sys.stdout)


def describe_error(e: Exception) -> str:
    """One line for a failed input: our own errors as they are, anything else as an internal error."""
    from codec.bitstream import RecFormatError

    if isinstance(e, RecFormatError):
        return f"not a valid .rec file: {e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower() + (f": {e.filename}" if e.filename else "")
    if isinstance(e, (CliError, ValueError, LookupError, OSError)):  # our errors are ValueError/LookupError
        return str(e) or type(e).__name__
    if os.environ.get("REC_DEBUG"):
        raise e
    first = str(e).splitlines()[0] if str(e) else ""
    return f"internal error: {type(e).__name__}: {first} (rerun with REC_DEBUG=1 for details)"


def run_jobs(jobs, args, work) -> int:
    """Apply work(src, dst) -> result dict to each job; one line per input; 1 if any failed."""
    failed = 0
    for src, dst, err in _progress(jobs, not args.json):
        try:
            if err:
                raise CliError(err)
            if not src.is_file():
                raise CliError("no such file" if not src.exists() else "not a file")
            if dst.exists() and not args.force:
                raise CliError(f"{dst} exists (use --force to overwrite)")
            if dst.is_dir():
                raise CliError(f"{dst} is a folder")
            dst.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            rec = {"input": str(src), "output": str(dst), **work(src, dst)}
            rec["seconds"] = time.perf_counter() - t0
        except Exception as e:
            failed += 1
            say(f"error: {src}: {describe_error(e)}", err=True)
            continue
        say(json.dumps(rec) if args.json else result_line(rec))
    return 1 if failed else 0


def result_line(rec: dict) -> str:
    """The human-readable line of one encoded or decoded file."""
    text = f"{rec['input']} -> {rec['output']}: {rec['width']}x{rec['height']}, {rec['bytes']} B, {rec['bpp']:.4f} bpp"
    if rec.get("beta") is not None:
        text += f" at β={rec['beta']:.4g}" + (f" (quality {rec['quality']})" if rec.get("quality") else "")
    if "psnr" in rec:
        text += f" (KL {rec['kl_bpp']:.4f}), PSNR {_fmt(rec['psnr'], 2)} dB"
    if rec.get("lossless"):
        text += f", lossless: {rec['bits_per_subpixel']:.4f} bits per subpixel (pixel layer {rec['pixel_bytes']} B)"
    if "coder" in rec:
        text += f", coder {rec['coder']}"
    return text + f", {rec['seconds']:.2f} s"
