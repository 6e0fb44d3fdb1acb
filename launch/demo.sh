#!/usr/bin/env bash
# The main job on its embedded default: make a sample corpus, shard it, train the three
# curriculum stages on 2 CPU ranks, and sample a clip. Re-running resumes every step.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-demo_out}
PY=${PY:-python}
NPROC=${NPROC:-2}
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$DEMO_DIR"
DEMO_DIR=$(cd "$DEMO_DIR" && pwd)
started=$(date +%s)

echo "== 1/4 sample corpus -> $DEMO_DIR/corpus"
"$PY" -m data_pipelines.sample_corpus out_dir="$DEMO_DIR/corpus"

echo "== 2/4 shard -> $DEMO_DIR/data"
"$PY" -m data_pipelines.shard input_dir="$DEMO_DIR/corpus" output_dir="$DEMO_DIR/data"

echo "== 3/4 train (experiment=smoke, $NPROC ranks) -> $DEMO_DIR/run"
bash "$(dirname "$0")/torchrun.sh" "$NPROC" experiment=smoke run_dir="$DEMO_DIR/run" \
  "data.shards=$DEMO_DIR/data/shards/*.tar" "$@"

echo "== 4/4 sample -> $DEMO_DIR/sample.mp4"
ref=$(ls "$DEMO_DIR"/corpus/*.mp4 | grep -v broken | head -n 1)
"$PY" -m omni_train.sample checkpoint="$DEMO_DIR/run" ref_image="$ref" audio="$ref" \
  out="$DEMO_DIR/sample.mp4" caption="a person waves while speaking"

"$PY" -m omni_train.report run_dir="$DEMO_DIR/run" data_dir="$DEMO_DIR/data" \
  sample="$DEMO_DIR/sample.mp4" seconds=$(( $(date +%s) - started ))
