#!/usr/bin/env bash
# The GPU check (issue #12): at most ~5 minutes on one H100/H200 machine with no network whose python3 already
# has a CUDA torch. Prepare the wheels first where pip works (bash bench/gpu_wheels.sh), carry .whl/ along, then:
#   bash bench/gpu_check.sh [--only large-2048] [--steps 10]
# Prints tokens/s, TFLOP/s, MFU, padding share and peak memory of medium and large at context 2,048 (bf16,
# packed batches, sampled softmax, item lookups) and large at 8,192 with activation checkpointing, each beside
# `argus plan`'s predicted memory and step time; then the host-device syncs of a training step. JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh || exit 2
exec python3 bench/gpu_check.py --out "${OUT:-/tmp}/gpu_check.json" "$@"
