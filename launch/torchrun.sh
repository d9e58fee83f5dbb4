#!/usr/bin/env bash
# Run `argus train` with torchrun on every node of a SLURM allocation (start it once per node: srun
# --ntasks-per-node=1), or on one machine outside SLURM:
#   launch/torchrun.sh CONFIG [key=value ...]
# Environment: GPUS_PER_NODE (default: nvidia-smi's count, else 1), MASTER_PORT (29500), PYTHON (python3).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [key=value ...]" >&2
    exit 2
fi

# Rendezvous on the allocation's first node; every node computes the same name.
master=""
if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
    # `|| true`: head exits after one line, and scontrol's SIGPIPE would fail the pipe under pipefail.
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) || true
fi
MASTER_ADDR=${master:-$(hostname)}
NNODES=${SLURM_NNODES:-1}
gpus=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
GPUS=$(( gpus > 0 ? gpus : 1 ))

# torchrun only forces OMP_NUM_THREADS=1 (with a warning); give each rank its share of the task's cores.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    threads=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / GPUS ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

# `-m launch.cli` must resolve on every node, whatever the working directory (relative paths in the
# arguments stay relative to it).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if command -v torchrun >/dev/null 2>&1; then
    run=(torchrun)
else
    run=("${PYTHON:-python3}" -m torch.distributed.run)
fi
exec "${run[@]}" --nnodes "$NNODES" --nproc_per_node "$GPUS" --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${SLURM_JOB_ID:-argus}" \
    -m launch.cli train "$@"
