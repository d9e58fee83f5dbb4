#!/usr/bin/env bash
# Prepare, on a machine with pip access, the wheels bench/gpu_check.sh installs on a GPU machine that has a CUDA
# torch but no network (the lent machines: Python 3.12, torch 2.11 + CUDA 13). They go to .whl/ (ignored by git;
# carried to the machine, about 20 MB). Versions: fbgemm 1.6 / torchrec 1.6 pair with torch 2.11 (../shared/STACK.md);
# fbgemm-gpu-cpu because the CUDA fbgemm-gpu wheel (465 MB) cannot travel, so the item table runs with
# embeddings.backend=torch there. Usage: bash bench/gpu_wheels.sh [python-version]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
mkdir -p .whl
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
get fbgemm-gpu-cpu==1.6.0 torchrec==1.6.1 tensordict==0.10.0 torchdata==0.11.0 \
    hjson==3.1.0 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1 \
    webdataset==1.0.2 braceexpand==0.1.7 importlib-metadata==8.7.0 orjson==3.11.3
# DeepSpeed ships as a source release: build its pure-Python wheel here (no ops compiled at install).
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(python3 -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null || echo 0.19.8)" \
    || DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls -la .whl
du -sh .whl
