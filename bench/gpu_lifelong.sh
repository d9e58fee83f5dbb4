#!/usr/bin/env bash
# The lifelong-summary GPU check (issue #19): a few minutes on one H100/H200 machine with no network whose python3
# already has a CUDA torch. Prepare the wheels first where pip works (bash bench/gpu_wheels.sh), carry .whl/, then:
#   bash bench/gpu_lifelong.sh [--steps 32]
# Step time and its compute part of context 256, context 2,048, context 256 + 64 summary tokens in-line and a model
# reading cached summaries (both read as memory) on a GPU in bf16, at d_model 1,024 (4 layers: the per-layer costs
# of a wide model, small checkpoints): the ratios docs/lifelong.md gives for `nano` on CPU. Expect context 2,048 to
# cost relatively less here than at `nano`: attention's share of a layer's FLOPs is about T / (12 d_model), 73% at
# nano's width and 17% at 1,024 for T = 2,048. Check the flow on CPU first:
#   bash bench/gpu_lifelong.sh --steps 8 --users 40 --batch 8 --set model.d_model=64 --set model.n_heads=2 \
#       --set model.d_ff=256 --set train.device=cpu --set deepspeed.precision=fp32
# JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh || exit 2
python3 bench/lifelong.py --timing --seeds 0 --steps 32 --users 800 --favourites 0.3 --batch 64 \
    --arms "context 256,context 2048,context 256 + 64 summary (memory),cached summary (memory; warm start)" \
    --set model.preset=custom --set model.d_model=1024 --set model.n_layers=4 --set model.n_heads=16 \
    --set model.d_ff=4096 --set deepspeed.precision=bf16 --set embeddings.item_dim=256 \
    --set embeddings.backend=torch --set data.num_workers=4 --set train.device=cuda --json "$@" \
    > "${OUT:-/tmp}/gpu_lifelong.json"
rc=$?
cat "${OUT:-/tmp}/gpu_lifelong.json"
exit $rc
