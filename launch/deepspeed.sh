#!/usr/bin/env bash
# Run `argus train` on the hosts of a deepspeed hostfile:
#   launch/deepspeed.sh HOSTFILE CONFIG [key=value ...] [argus launch deepspeed options]
# Needs passwordless ssh (pdsh) from this machine to every host and the repository/venv at the same path on all of
# them. Make a hostfile with `argus cluster hostfile --nodes-file nodes.txt` or from a Ray cluster.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 HOSTFILE CONFIG [key=value ...] [--num-nodes N] [--num-gpus G] [--dry-run]" >&2
    exit 2
fi
hostfile=$1 config=$2
shift 2

# The deepspeed launcher leaves OMP_NUM_THREADS unset, and every rank then spins up one thread per core
# (measured on CPU: 15.1 s instead of 0.4 s for 6 steps). Default: cores / slots of the largest host, at least 1.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    slots=$(awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { n = substr($i, 7) + 0; if (n > m) m = n } }
                 END { print (m > 0 ? m : 1) }' "$hostfile")
    threads=$(( $(nproc) / slots ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

if command -v argus >/dev/null 2>&1; then
    exec argus launch deepspeed "$config" "$@" --hostfile "$hostfile"
fi
# No console script on PATH (a source checkout): run the package from its repository root on PYTHONPATH.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m launch.cli launch deepspeed "$config" "$@" --hostfile "$hostfile"
