#!/usr/bin/env bash
# Train on one node:  launch/torchrun.sh NPROC [hydra overrides...]
# Multi-node with a c10d rendezvous: set NNODES, NODE_RANK and MASTER_ADDR (and MASTER_PORT)
# on every node. The config is validated once before any rank starts, so a bad override
# fails here in a second instead of on every rank.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC [hydra overrides...]}
shift
PY=${PY:-python}
NNODES=${NNODES:-1}

"$PY" -m omni_train.train check_only=true "$@" > /dev/null

if [ "$NNODES" -gt 1 ]; then
  exec "$PY" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-omni-train}" \
    -m omni_train.train "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m omni_train.train "$@"
