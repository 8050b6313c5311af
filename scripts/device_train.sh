#!/usr/bin/env bash
# One training round of the variable-rate model on a lent GPU (the device tool: one command of at most
# 10 minutes, a working tree of at most 64 MiB, files back through $OUT of at most 16 MiB each).
#
# Here, once (both folders are git-ignored; the device call carries them):
#   python -m scripts.extract_patches --src ../shared/data/photos:../shared/data/photos-extra \
#       --out .gpu/crops --crop 256 --per-image 2 --format jpg          # ~530 crops, ~15 MB
#   pip download compressai==1.2.8 for Python 3.12 into .whl/   (the device tool's README says how)
# There:  device run `bash scripts/device_train.sh` with carry [".gpu", ".whl"]; MINUTES=8 by default
# Back:   $OUT holds the new model file (fp16; its training record names the file it started from)
#         and the run's log.jsonl; ship it, or go on here with train.py --init_from=<that file>.
#
# Optimiser state does not travel (it is 4x the fp16 weights, beyond what a call carries): Adam starts
# afresh from the model file each round. Extra arguments go to train.py (e.g. --steps=2 for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-8}
CONFIG=${CONFIG:-configs/pln_vbr.toml}
INIT=${INIT:-weights/$(cat weights/DEFAULT)}
DATA=${DATA:-.gpu/crops}
DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-out/device}
RUN=${RUN:-/tmp/device-run}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import compressai" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$RESULTS"
rm -rf "$RUN"
"$PYTHON" train.py "$CONFIG" --device="$DEVICE" --data_dir="$DATA" --crop=256 --init_from="$INIT" \
    --out_dir="$RUN" --max_minutes="$MINUTES" --export_dir="$RESULTS" --export_dtype=float16 --tag=vbr "$@"
ls "$RESULTS"/*.pt >/dev/null 2>&1 || "$PYTHON" train.py --out_dir="$RUN" --export
cp "$RUN/log.jsonl" "$RESULTS/"
ls -l "$RESULTS"
