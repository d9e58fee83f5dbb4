#!/usr/bin/env bash
# The lifelong-summary GPU check (issue #19): a few minutes on one H100/H200 machine with no network whose python3
# already has a CUDA torch. Prepare the wheels first where pip works (bash bench/gpu_wheels.sh), carry .whl/, then:
#   bash bench/gpu_lifelong.sh [--steps 30]
# Step time and its compute part of context 256, context 2,048, context 256 + 64 summary tokens in-line and a model
# reading cached summaries (both read as memory), at the `large` preset in bf16: the ratios docs/lifelong.md gives
# for `nano` on CPU, where attention over 2,048 positions is a small share of the step. JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import deepspeed, torchrec" 2>/dev/null; then
    [ -d .whl ] || { echo "no .whl/ folder: run bench/gpu_wheels.sh where pip works and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 bench/lifelong.py --timing --seeds 0 --steps 30 --users 800 --favourites 0.3 --batch 64 \
    --arms "context 256,context 2048,context 256 + 64 summary (memory),cached summary (memory; warm start)" \
    --set model.preset=large --set deepspeed.precision=bf16 --set embeddings.item_dim=256 --set embeddings.backend=torch \
    --set train.device=cuda --json "$@" > "${OUT:-/tmp}/gpu_lifelong.json"
rc=$?
cat "${OUT:-/tmp}/gpu_lifelong.json"
exit $rc
