#!/usr/bin/env bash
# Train on one node:  launch/torchrun.sh NPROC [hydra overrides...]
# Several nodes (c10d rendezvous): set NNODES, NODE_RANK and MASTER_ADDR (and MASTER_PORT,
# RDZV_ID) on every node; launch/slurm/train.sbatch does this under slurm.
# The config is validated once before any rank starts, so a bad override fails here in
# seconds instead of on every rank (SKIP_CHECK=1 skips it when a caller already checked).
# DRY_RUN=1 prints the resolved config and the command, and runs nothing.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}
shift
PY=${PY:-python}
NNODES=${NNODES:-1}
# After a SIGTERM, torchrun waits this long for the workers to save and exit before it kills
# them (its default is 30 s); under slurm, KillWait ends the job step anyway.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}

if [ "$NNODES" -gt 1 ]; then
  cmd=("$PY" -m torch.distributed.run
    --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NPROC"
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
    --rdzv_id "${RDZV_ID:-omni-train}" --max_restarts 0 --shutdown-timeout "$SHUTDOWN_TIMEOUT"
    -m omni_train.train "$@")
else
  cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" --max_restarts 0
    --shutdown-timeout "$SHUTDOWN_TIMEOUT" -m omni_train.train "$@")
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  WORLD_SIZE=$((NNODES * NPROC)) "$PY" -m omni_train.train check_only=true "$@"
  printf 'would run:'; printf ' %q' "${cmd[@]}"; printf '\n'
  exit 0
fi
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  WORLD_SIZE=$((NNODES * NPROC)) "$PY" -m omni_train.train check_only=true "$@" > /dev/null
fi

# torchrun itself must survive the SIGUSR1/SIGUSR2 that slurm and submitit send ahead of a
# time limit (to every process of the job step): an ignored signal stays ignored across exec,
# and the training processes install their own handler (trainer.preemption.signals) to save a
# checkpoint and exit.
trap '' USR1 USR2
exec "${cmd[@]}"
