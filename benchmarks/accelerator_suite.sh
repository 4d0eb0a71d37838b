#!/usr/bin/env bash
# The accelerator suite (issue 17, item 4): ViT-B/16 HarmoCLIP train step (bf16, batch 256, 20 boxes) with MFU and
# peak memory, the largest batch with and without remat, the same step in PyTorch, encode, RoIAlign vs torchvision,
# and the input pipeline at all cores; one JSON line per case on stdout (benchmarks/accelerator_suite.py says what
# each case measures). Each case runs in its own process under a time bound; the whole under --budget_s (450 s).
#
# On the lent H200 (the `run` tool of /work/.library/device), from the repository root. Once, here:
#     benchmarks/accelerator_suite.sh --download-wheels      # ml_collections, ftfy, wcwidth into .whl/ (ignored)
# then one call, expected to take about 8 minutes (the suite stops itself by 450 s plus process start-up):
#     run(command="PYTHONUNBUFFERED=1 benchmarks/accelerator_suite.sh --wheels .whl 2>&1 | tee $OUT/suite.log",
#         carry=[".whl"], timeout_s=540)
# The JSON lines are in the reply's output_tail and in suite.log; paste them into benchmarks/RESULTS.md.
#
# The H200 image has jax, torch, transformers, flax, optax, orbax, PIL, but not ml_collections, ftfy or wcwidth
# (pure Python, imported by harmoclip_jax at import time): --wheels DIR installs DIR/*.whl, with no index and no
# dependencies, into a temporary folder put on PYTHONPATH. grain, TFDS and TensorFlow are not needed: the suite
# stands an inert stub in for grain (imported, never called, on the train step's path) and measures the pipeline
# with a process pool where grain is absent.
#
# Here (CPU, tests/test_accelerator_suite.py): benchmarks/accelerator_suite.sh --tiny    (about a minute)
# Any other option is passed to benchmarks/accelerator_suite.py (e.g. --cases train_step,encode --batch 128).
# Exit status: 0 when every case ran or was skipped for a stated reason (e.g. "no CUDA"), 1 when one failed.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=""
PASS=()
while (($#)); do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --download-wheels)
            # ftfy's and wcwidth's newest releases at the time of writing; ml_collections as in requirements.txt.
            python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 ftfy wcwidth
            exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done

if [[ -n "$WHEELS" ]]; then
    SITE="$(mktemp -d /tmp/accelerator_suite_site.XXXXXX)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import ml_collections, ftfy" 2>/dev/null; then
    echo "accelerator_suite.sh: ml_collections / ftfy are not importable; pass --wheels DIR (see this file's" \
         "header)" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2 || true
exec "$PYTHON" benchmarks/accelerator_suite.py "${PASS[@]+"${PASS[@]}"}"
