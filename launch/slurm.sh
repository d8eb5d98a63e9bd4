#!/usr/bin/env bash
# Multi-node training under SLURM: srun starts one torchrun agent per node; the agents meet
# at a c10d rendezvous on the first node and start NPROC_PER_NODE ranks each.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh configs/lm_tiny.py parallel.cp=8 model.hyena.num_heads=8
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh configs/lm_tiny.py parallel.tp=4 parallel.cp=2 model.hyena.num_heads=8
#   DRY_RUN=1 launch/slurm.sh configs/digits_hyena_tiny.py train.steps=10   # print, run nothing
#
# Arguments are those of launch/train.py: a config file and key=value overrides.
# Rank order is megatron's (hyena_cp/distributed/mesh.py): tp innermost, then cp, then dp, so with
# parallel.tp * parallel.cp dividing NPROC_PER_NODE every TP and CP group stays inside one node.
#
# Environment read here:
#   SLURM_JOB_NUM_NODES  number of nodes (set by SLURM; default 1)
#   SLURM_JOB_NODELIST   the allocation's hosts; the first one hosts the rendezvous
#   SLURM_JOB_ID         rendezvous id, shared by the agents (default: "local")
#   SLURM_GPUS_ON_NODE   default for NPROC_PER_NODE
#   NPROC_PER_NODE       ranks per node (default: SLURM_GPUS_ON_NODE, else 1)
#   HEAD_NODE            rendezvous host (default: first host of SLURM_JOB_NODELIST)
#   RDZV_PORT            rendezvous port on HEAD_NODE (default 29500)
#   MAX_RESTARTS         torchrun --max-restarts (default 3); a restarted job resumes from the
#                        newest checkpoint in train.output_dir (which must be on a shared file system)
#   SLURM_SUBMIT_DIR     repository root when sbatch runs a spooled copy of this script
#   PYTHON               interpreter of the venv with hyena_cp installed (default: python)
#   DRY_RUN=1            print the command instead of running it
#
#SBATCH --job-name=hyena_cp
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: [DRY_RUN=1] $0 CONFIG.py [key=value ...]" >&2
    exit 2
fi

# sbatch runs a copy of this script from a spool folder: then the repo is the submit folder.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -f $repo/launch/train.py ]] || repo=${SLURM_SUBMIT_DIR:?run from the repository root}
nnodes=${SLURM_JOB_NUM_NODES:-1}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
port=${RDZV_PORT:-29500}
python=${PYTHON:-python}

head_node=${HEAD_NODE:-}
if [[ -z $head_node ]]; then
    if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null; then
        head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    elif [[ -n ${SLURM_JOB_NODELIST:-} && $SLURM_JOB_NODELIST != *"["* ]]; then
        head_node=${SLURM_JOB_NODELIST%%,*}   # a plain host list needs no scontrol
    else
        head_node=$(hostname)
    fi
fi

# the config, its overrides and the layout (dp x cp x tp == nodes x ranks per node) are checked here,
# before any node starts a process: a mistake costs seconds, not a queued allocation
(cd "$repo" && "$python" -m hyena_cp.train.cli "$((nnodes * nproc))" "$@") || exit 2

cmd=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1
     "$python" -m torch.distributed.run
     --nnodes="$nnodes" --nproc-per-node="$nproc"
     --rdzv-backend=c10d --rdzv-endpoint="$head_node:$port" --rdzv-id="${SLURM_JOB_ID:-local}"
     --max-restarts="${MAX_RESTARTS:-3}"
     "$repo/launch/train.py" "$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
else
    exec "${cmd[@]}"
fi
