#!/usr/bin/env bash
# The accelerator suite (issue 17, item 4): ViT-B/16 HarmoCLIP train step (bf16, batch 256, 20 boxes) with MFU and
# peak memory, the largest batch with and without remat, the same step in PyTorch, encode, RoIAlign vs torchvision,
# and the input pipeline at all cores; one JSON line per case on stdout (benchmarks/accelerator_suite.py says what
# each case measures). Each case runs in its own process under a time bound; the whole under --budget_s (450 s).
#
# On the lent H200 (the `run` tool of /work/.library/device), from the repository root. Once, here:
#     benchmarks/accelerator_suite.sh --download-wheels      # ml_collections, ftfy, wcwidth into .whl/ (ignored)
# then one call, expected to take about 8 minutes (the suite stops itself by 450 s plus process start-up):
#     run(command="benchmarks/accelerator_suite.sh --wheels .whl >$OUT/suite.jsonl 2>$OUT/suite.err; rc=$?;
#                  tail -c 2500 $OUT/suite.err; cat $OUT/suite.jsonl; exit $rc",
#         carry=[".whl"], timeout_s=540)
# (one line in the call). The JSON lines end the reply's output_tail and come back in suite.jsonl (suite.err: each
# case's stderr, nvidia-smi's line) even if the call is cut off; paste them into benchmarks/RESULTS.md. The device
# tool sends the session's own checkout: merge this branch there first. 540 s leaves 90 s over the suite's budget;
# the machine's start (a minute or two) comes on top, so one call uses about 10 of the task's 15 device minutes.
#
# The H200 image has jax, torch, transformers, flax, optax, orbax, PIL, but not ml_collections, ftfy or wcwidth
# (pure Python, imported by harmoclip_jax at import time): --wheels DIR installs DIR/*.whl, with no index and no
# dependencies, into a temporary folder put on PYTHONPATH. grain, TFDS and TensorFlow are not needed: the suite
# stands an inert stub in for grain (imported, never called, on the train step's path) and measures the pipeline
# with a process pool where grain is absent.
#
# Here (CPU, tests/test_accelerator_suite.py): benchmarks/accelerator_suite.sh --tiny  (1.5-3 min on 2 cores shared
# with other work, 2.3 min of CPU time; the test adds JAX_DISABLE_MOST_OPTIMIZATIONS)
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
            # Pure-Python wheels (any platform); wcwidth 0.2.13, the last pure-Python release (0.9 ships binaries).
            python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 ftfy==6.3.1 \
                wcwidth==0.2.13
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
