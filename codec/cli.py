"""The `rec-codec` command: encode images to .rec files, decode them to PNG, show a .rec header, list models.

    rec-codec encode photo.png                 # -> photo.rec
    rec-codec encode photo.png --quality 6     # variable-rate model: quality 1 (small) … 8
    rec-codec encode photo.png --bpp 0.3       # ... or the β whose file is nearest 0.3 bpp
    rec-codec encode photo.png --lossless      # the exact pixels (a model file with a lossless head)
    rec-codec encode photos/ a.png -o out/     # folders and several inputs
    rec-codec decode photo.rec                 # -> photo.rec.png
    rec-codec info photo.rec                   # the header as JSON
    rec-codec models                           # the model files found

In a checkout, `python compress.py ...` runs the same command. Models resolve offline: --model PATH,
NAME or SHA-256 prefix, looked up in $REC_MODEL_DIR and, in a checkout, weights/; without --model,
encode uses the file named by the first DEFAULT file there. Decoding finds the model by the hash in
the .rec header (or takes --model PATH) and refuses a different model.
Each input prints one line (bpp from the file size, header included); --json prints one JSON
object per line instead. Errors print one line each on stderr. Outputs are written to a
temporary file and renamed; existing outputs need --force; an input is never overwritten.
Exit status: 0 all inputs done, 1 some input failed, 2 usage error, 130 interrupted.
The argument parser and the four subcommands stay in this one file (past ~300 lines) so that the
command reads top to bottom; the per-input loop shared by encode and decode is codec/cli_jobs.py.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from codec.params import PRESETS
from codec.cli_jobs import UsageError, describe_error, plan, run_jobs, say
from codec.image import IMAGE_EXTS, image_pixels
from codec.metrics import psnr


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + message
        raise UsageError(message)


def _seed(text: str) -> int:
    n = int(text, 0)
    if not 0 <= n < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 2^64)")
    return n


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return n


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return n


def _positive_float(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return x


def _quality(text: str) -> int:
    from codec.rate import QUALITY_LEVELS

    n = int(text)
    if not 1 <= n <= QUALITY_LEVELS:
        raise argparse.ArgumentTypeError(f"{text} is outside 1 to {QUALITY_LEVELS}")
    return n


def build_parser(prog: str = "rec-codec") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    enc = sub.add_parser("encode", help="images -> .rec")
    enc.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders")
    enc.add_argument("-o", "--output", metavar="OUT", help="output file (one input) or folder")
    enc.add_argument("--model", metavar="NAME|PATH", help="model file, name or hash (default: named by DEFAULT)")
    enc.add_argument(
        "--coder",
        choices=PRESETS,
        help="coder preset (default: sp-orc-predicted for a model with a rate head, else thesis)",
    )
    enc.add_argument("--seed", type=_seed, default=0, help="seed of the shared randomness (default: 0)")
    enc.add_argument("--max-pixels", type=_positive, default=None, help="refuse larger images (default 120e6)")
    enc.add_argument(
        "--tile",
        type=_non_negative,
        default=None,
        metavar="N",
        help="code images above N×N pixels in N-pixel tiles, bounding memory (default 1024; 0: whole)",
    )
    enc.add_argument(
        "--lossless",
        action="store_true",
        help="code the exact pixels: the latents, then the image given their decode (default quality 7)",
    )
    rate = enc.add_mutually_exclusive_group()
    rate.add_argument(
        "--quality",
        type=_quality,
        metavar="N",
        help="variable-rate models: quality 1 (smallest files) to 8 (default 4)",
    )
    rate.add_argument(
        "--beta",
        type=_positive_float,
        metavar="B",
        help="variable-rate models: the rate-distortion β (larger = smaller files)",
    )
    rate.add_argument(
        "--bpp",
        type=_positive_float,
        metavar="X",
        help="variable-rate models: the β whose file is nearest X bits per pixel (within 3 %%)",
    )
    dec = sub.add_parser("decode", help=".rec -> PNG")
    dec.add_argument("inputs", nargs="+", metavar="IN.rec", help=".rec files or folders")
    dec.add_argument("-o", "--output", metavar="OUT", help="output file (one input) or folder")
    dec.add_argument("--model", metavar="PATH", help="model file to use (its hash must match the header)")
    for s in (enc, dec):
        s.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        s.add_argument(
            "--threads",
            type=_positive,
            default=None,
            help="CPU threads (default: torch's); 1 is often faster on a busy machine",
        )
        s.add_argument("--force", action="store_true", help="overwrite existing outputs")
        s.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    models = sub.add_parser("models", help="list the model files found ($REC_MODEL_DIR, a checkout's weights/)")
    models.add_argument("--json", action="store_true", help="one JSON object per model")
    info = sub.add_parser("info", help="print .rec headers as JSON")
    info.add_argument("inputs", nargs="+", metavar="IN.rec")
    info.add_argument("--json", action="store_true", help="compact, one object per line")
    return p


def cmd_encode(args) -> int:
    from codec import api, tiling
    from codec.bitstream import write_atomic
    from codec.image import load_image
    from codec.rate import BPP_TOLERANCE, compress_to_bpp
    from codec.store import ModelNotFoundError, ModelStore, find_model

    jobs = plan(args.inputs, args.output, IMAGE_EXTS, lambda n: str(Path(n).with_suffix(".rec")))
    store = ModelStore(args.device)
    try:
        model, ref = store.load(find_model(args.model))
    except ModelNotFoundError as e:
        say(f"error: {e}", err=True)
        return 1
    max_pixels = args.max_pixels or api.MAX_PIXELS
    if args.lossless:
        if args.bpp is not None:
            raise UsageError("--bpp cannot be combined with --lossless (a lossless file's size is the image's)")
        if model.lossless_head is None:
            raise UsageError(f"--lossless: model {ref.name} has no lossless head; choose a model that has one")
    if args.coder == "sp-orc-predicted" and model.rate_head is None:
        raise UsageError(f"--coder sp-orc-predicted: model {ref.name} has no rate head; choose a model that has one")
    coder = args.coder or api.default_coder(model)
    beta = _rate_setting(args, model, ref.name)
    tile = tiling.DEFAULT_TILE if args.tile is None else args.tile
    if tile:
        try:
            tiling.check_tile(model, tile)
        except ValueError as e:
            raise UsageError(f"--tile {tile}: {e}") from None

    def work(src: Path, dst: Path) -> dict:
        x, notes = load_image(src, max_pixels=max_pixels)
        for note in notes:
            say(f"note: {src}: {note}", err=True)

        def compress(b):
            return api.compress_image(
                model,
                x,
                model_ref=ref,
                seed=args.seed,
                params=coder,
                device=args.device,
                max_pixels=max_pixels,
                beta=b,
                tile=tile,
                lossless=args.lossless,
            )

        if args.bpp is None:
            data, x_hat, stats = compress(beta)
        else:
            image = image_pixels(x).to(args.device)
            data, x_hat, stats = compress_to_bpp(
                compress, model.to(args.device), image, args.bpp, tile=tile, coder=coder
            )
            miss = stats["bpp"] / args.bpp - 1
            if abs(miss) > BPP_TOLERANCE:
                say(
                    f"note: {src}: {stats['bpp']:.4f} bpp is {100 * miss:+.1f} % from the target {args.bpp:g} "
                    f"(the closest of {stats['attempts']} tries, at β = {stats['beta']:.4g}; this model's range "
                    f"is β = {model.beta_range[0]:g} to {model.beta_range[1]:g})",
                    err=True,
                )
        write_atomic(dst, data)
        rec = {
            "height": stats["height"],
            "width": stats["width"],
            "bytes": len(data),
            "bpp": stats["bpp"],
            "kl_bpp": stats["kl_bpp"],
            "model": ref.name,
            "coder": stats["coder"],
            "seed": args.seed,
            "notes": notes,
        }
        if args.lossless:
            rec.update(lossless=True, bits_per_subpixel=stats["bpp"] / 3, pixel_bytes=stats["pixel_bytes"])
        else:
            rec["psnr"] = psnr(x, x_hat)
        if stats["beta"] is not None:
            rec.update(beta=stats["beta"], quality=args.quality, target_bpp=args.bpp)
        return rec

    return run_jobs(jobs, args, work)


def _rate_setting(args, model, name: str) -> float | None:
    """The β to code at from --quality/--beta (None for --bpp, searched per image, and for fixed-β
    models); a UsageError for a setting the model cannot take."""
    from codec.api import coding_beta
    from codec.lossless import DEFAULT_QUALITY as LOSSLESS_QUALITY
    from codec.rate import DEFAULT_QUALITY

    asked = next(
        (f"--{k} {getattr(args, k):g}" for k in ("quality", "beta", "bpp") if getattr(args, k) is not None), None
    )
    if not model.variable_rate:
        if asked:
            raise UsageError(
                f"{asked}: model {name} was trained at a single β; choose a variable-rate model "
                f"({args.prog} models lists each model's rate range)"
            )
        return None
    if args.bpp is not None:
        return None
    if args.beta is None:
        args.quality = args.quality or (LOSSLESS_QUALITY if args.lossless else DEFAULT_QUALITY)  # reported
    try:
        return coding_beta(model, args.beta, args.quality)[0]
    except ValueError as e:
        raise UsageError(f"--beta {args.beta:g}: {e}") from None


def cmd_decode(args) -> int:
    from codec import api
    from codec.bitstream import MAX_FILE_BYTES, RecFormatError
    from codec.image import save_png
    from codec.store import ModelStore

    jobs = plan(args.inputs, args.output, (".rec",), lambda n: n + ".png")
    if args.model is not None and not Path(args.model).is_file():
        raise UsageError(f"--model {args.model}: no such file")
    store = ModelStore(args.device, model_path=args.model)

    def work(src: Path, dst: Path) -> dict:
        size = src.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RecFormatError("file", f"{size} bytes is above the limit of {MAX_FILE_BYTES}")
        x_hat, header = api.decompress(src.read_bytes(), store, device=args.device)
        save_png(x_hat, dst)
        return {
            "height": header.height,
            "width": header.width,
            "bytes": size,
            "bpp": 8 * size / (header.height * header.width),
            "model": header.model_name,
        }

    return run_jobs(jobs, args, work)


def cmd_info(args) -> int:
    from codec.header_params import describe_params
    from codec.bitstream import RecFormatError, read_rec

    failed = 0
    for arg in args.inputs:
        try:
            header, sections = read_rec(arg)
        except (RecFormatError, OSError) as e:
            failed += 1
            say(f"error: {arg}: {describe_error(e)}", err=True)
            continue
        size = os.path.getsize(arg)
        tiles = header.n_tiles
        latents = sections[: len(sections) - header.lossless]
        levels = len(latents) // tiles
        d = {
            "file": arg,
            "bytes": size,
            "bpp": 8 * size / (header.height * header.width),
            **header.to_dict(),
            "coder_params": describe_params(header, levels),
            "sections": [
                {"level": levels - i // tiles, **({"tile": i % tiles} if tiles > 1 else {}), "bytes": len(s)}
                for i, s in enumerate(latents)
            ],
        }
        if header.lossless:
            d["sections"].append({"level": 0, "pixel_layer": True, "bytes": len(sections[-1])})
        print(json.dumps(d) if args.json else json.dumps(d, indent=2))
    return 1 if failed else 0


def cmd_models(args) -> int:
    from codec import store
    from codec.rate import QUALITY_LEVELS

    files, default = store.list_models()
    if not files:
        where = store.where_searched(store.model_dirs())
        raise UsageError(f"no model files {where}; set $REC_MODEL_DIR to a folder of model files")
    failed = 0
    for path in files:
        try:
            d = {**store.describe_model(path), "default": path == default}
        except Exception as e:  # a broken file is named, the others still listed
            failed += 1
            say(f"error: {path}: not a readable model file ({type(e).__name__})", err=True)
            continue
        if args.json:
            print(json.dumps(d))
            continue
        beta = f", β={d['beta']:g}" if d["beta"] is not None else ""  # older exports lack it
        if d["beta_range"]:
            lo, hi = d["beta_range"]
            beta = f", variable rate: β={lo:g}…{hi:g} (quality 1 = β {hi:g} … {QUALITY_LEVELS} = β {lo:g})"
            val = d["validation"] or {}
            ends = [val.get(f"val_kl_bpp@{b:g}") for b in (hi, lo)]
            if None not in ends:
                beta += f", about {ends[0]:.2f}–{ends[1]:.2f} bpp (KL on its validation images)"
        trained = "no training record"
        if d["steps"]:
            trained = (
                f"{d['steps']} steps{' from ' + d['init_from'] if d['init_from'] else ''}, "
                f"{d['minutes']} min on {d['hardware'] or 'unrecorded hardware'}"
            )
            if d["train_kl_bpp"] is not None and d["train_psnr"] is not None:
                trained += f"; on training crops {d['train_kl_bpp']:.3f} bpp, {d['train_psnr']:.1f} dB"
        heads = (", lossless head" if d["lossless"] else "") + (", rate head" if d["rate_head"] else "")
        print(
            f"{d['name']}{' (default)' if d['default'] else ''}: {d['arch']} N={d['channels']}, "
            f"{d['parameters'] / 1e6:.2f} M parameters, {d['megabytes']:g} MB{beta}{heads}; {trained}"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None, prog: str = "rec-codec") -> int:
    """Run one command; returns the exit status. `prog` names the command in messages."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        args.prog = prog
        if getattr(args, "device", "cpu") == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--device cuda: CUDA is not available")
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        commands = {"encode": cmd_encode, "decode": cmd_decode, "info": cmd_info, "models": cmd_models}
        return commands[args.command](args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `rec-codec info a.rec | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # never a traceback for the user; REC_DEBUG=1 shows it
        if os.environ.get("REC_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(rerun with REC_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
