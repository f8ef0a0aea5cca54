#!/usr/bin/env bash
# The GPU kit (issue 13): one command that proves vitkit on a GPU in under 9 minutes.
#
#   OUT=dir bash benchmarks/gpu/run.sh            # on the GPU machine (the repository and gpu_data/ travel there)
#   OUT=dir bash benchmarks/gpu/run.sh --dry-run  # on any CPU: every stage at tiny sizes, to know the kit works
#
# It installs vitkit without dependencies (the device image has no package registry), unpacks the CIFAR-10 JPEG
# tarball copied beforehand into gpu_data/ (an ignored folder; `cp ../shared/data/cifar10-jpg.tar.gz gpu_data/`),
# then runs benchmarks/gpu/kit.py: stages A-D, each in its own process under its own time limit. The report
# ($OUT/report.md, $OUT/results.json) is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; fi
OUT="${OUT:-runs/gpu_kit}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

if [ -z "$DRY" ]; then
    # no registry there: the image's torch, torchvision, timm, safetensors, ... serve as dependencies
    if ! "$PY" -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.log" 2>&1; then
        echo "note: pip install -e . failed (see $OUT/install.log); running vitkit from the source tree"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DATA="${DATA:-}"
TARBALL=gpu_data/cifar10-jpg.tar.gz
if [ -z "$DATA" ] && [ -z "$DRY" ] && [ -f "$TARBALL" ]; then
    DEST="${TMPDIR:-/tmp}/vitkit_gpu_data"
    mkdir -p "$DEST"
    if [ ! -d "$DEST/cifar10/train" ]; then
        tar -xzf "$TARBALL" -C "$DEST" || echo "note: could not unpack $TARBALL"
    fi
    DATA="$DEST/cifar10"
fi
if [ -z "$DATA" ]; then
    DATA=data/cifar10_sample  # 4,000 + 1,000 CIFAR-10 JPEGs in the repository: the dry run, or a missing tarball
    [ -z "$DRY" ] && echo "note: $TARBALL not found; stages C and D use the 5,000-image sample in $DATA"
fi

exec "$PY" benchmarks/gpu/kit.py --out "$OUT" --data "$DATA" $DRY
