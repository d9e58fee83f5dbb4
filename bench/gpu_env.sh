# Sourced by the GPU checks (bench/gpu_check.sh, bench/gpu_lifelong.sh): from the repository root, install the wheels
# carried in .whl/ (bench/gpu_wheels.sh) when deepspeed or torchrec is missing, put them and the repository on
# PYTHONPATH, and print the GPU. Returns 2 when the wheels are needed and absent or fail to install.
if ! python3 -c "import deepspeed, torchrec" 2>/dev/null; then
    [ -d .whl ] || { echo "no .whl/ folder: run bench/gpu_wheels.sh where pip works and carry .whl" >&2; return 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || return 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
