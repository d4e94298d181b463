#!/usr/bin/env bash
# One short, prepared run on an accelerator machine (GPU/TPU with jax, flax, optax, orbax and
# chex already installed): the exactness tests that matter on a new backend, then the three
# benchmarks, with every JSON line written under $OUT (default benchmarks/results/accelerator).
# About 10 minutes on one H200; each part has its own time limit so one slow part cannot eat
# the rest. Usage: OUT=/some/dir bash benchmarks/accelerator.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/accelerator}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax; print('backend', jax.default_backend(), jax.devices())" | tee "$OUT/devices.txt"

# Exactness on this backend: dual form vs the numpy primal form, decode vs the full forward.
timeout 240 python -m pytest -x -q -p no:cacheprovider tests/test_ttt_correctness.py \
    tests/test_decode.py 2>&1 | tail -5 | tee "$OUT/tests.txt"

# The layer (no per-token baseline past 2048: it only measures the CPU story), decode latency
# by context, and one train step per mesh shape that fits one device.
timeout 240 python benchmarks/bench_layer.py --lengths 2048 8192 32768 --impls dual \
    --out "$OUT/bench_layer.jsonl" > /dev/null
timeout 120 python benchmarks/bench_decode.py --contexts 1024,8192,65536 \
    --out "$OUT/bench_decode.jsonl" > /dev/null
timeout 120 python benchmarks/bench_scaling.py --config configs/ttt_linear_125m.yaml \
    --meshes single --batch 8 --seq-len 2048 --out "$OUT/bench_scaling.jsonl" > /dev/null
ls -l "$OUT"
