#!/usr/bin/env bash
# The main job on its embedded default, end to end on 2 CPU ranks, with proof that it learns:
# make a sample corpus and a held-out one (other figures), shard both, fit the VAE (stage 0),
# train the denoiser through the three curriculum stages on its latents (keeping the untrained
# step-0 checkpoint), sample a clip, evaluate the untrained and the trained model on the
# held-out clips, and print one table. Re-running resumes training and skips the finished VAE
# fit; the corpora, shards and evaluations are checked or redone.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-demo_out}
PY=${PY:-python}
NPROC=${NPROC:-2}
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$DEMO_DIR"
DEMO_DIR=$(cd "$DEMO_DIR" && pwd)
HERE=$(dirname "$0")
started=$(date +%s)
heldout_shards="$DEMO_DIR/heldout/shards/*.tar"

echo "== 1/7 sample corpora -> $DEMO_DIR/corpus (training), $DEMO_DIR/heldout_corpus (other figures)"
"$PY" -m data_pipelines.sample_corpus out_dir="$DEMO_DIR/corpus" num_clips=24
"$PY" -m data_pipelines.sample_corpus out_dir="$DEMO_DIR/heldout_corpus" seed=1 num_clips=4 \
  write_broken=false

echo "== 2/7 shard -> $DEMO_DIR/data, $DEMO_DIR/heldout"
"$PY" -m data_pipelines.shard input_dir="$DEMO_DIR/corpus" output_dir="$DEMO_DIR/data"
"$PY" -m data_pipelines.shard input_dir="$DEMO_DIR/heldout_corpus" output_dir="$DEMO_DIR/heldout"

echo "== 3/7 stage 0: fit the VAE (experiment=vae_demo) -> $DEMO_DIR/vae"
if [ ! -f "$DEMO_DIR/vae/vae.safetensors" ]; then
  "$PY" -m omni_train.train_vae experiment=vae_demo run_dir="$DEMO_DIR/vae" \
    "data.shards=$DEMO_DIR/data/shards/*.tar" "data.val_shards=$heldout_shards"
fi

echo "== 4/7 stages 1-3: train the denoiser (experiment=demo, $NPROC ranks) -> $DEMO_DIR/run"
bash "$HERE/torchrun.sh" "$NPROC" experiment=demo run_dir="$DEMO_DIR/run" \
  "data.shards=$DEMO_DIR/data/shards/*.tar" "data.val_shards=$heldout_shards" \
  model.vae.pretrained="$DEMO_DIR/vae/vae.safetensors" "$@"

echo "== 5/7 sample a held-out figure -> $DEMO_DIR/sample.mp4"
ref=$(ls "$DEMO_DIR"/heldout_corpus/*.mp4 | head -n 1)
"$PY" -m omni_train.sample checkpoint="$DEMO_DIR/run" ref_image="$ref" audio="$ref" \
  out="$DEMO_DIR/sample.mp4" caption="$(cat "${ref%.mp4}.txt" 2>/dev/null || true)"

echo "== 6/7 evaluate the untrained (step 0) and the trained model on the held-out clips"
for which in untrained trained; do
  checkpoint="$DEMO_DIR/run"
  [ "$which" = untrained ] && checkpoint="$DEMO_DIR/run/checkpoints/step_00000000"
  "$PY" -m omni_train.evaluate checkpoint="$checkpoint" "shards=$heldout_shards" \
    out="$DEMO_DIR/eval/$which" num_clips=4 task=audio 'metrics.enabled=[fidelity,identity,drift]'
done

echo "== 7/7 summary"
"$PY" -m omni_train.report run_dir="$DEMO_DIR/run" data_dir="$DEMO_DIR/data"
echo
"$PY" -m omni_train.evaluation.compare "$DEMO_DIR/eval/untrained" "$DEMO_DIR/eval/trained" \
  labels=untrained,trained run_dir="$DEMO_DIR/run" out="$DEMO_DIR/compare.mp4"
echo
echo "sample        $DEMO_DIR/sample.mp4"
echo "evaluations   $DEMO_DIR/eval/{untrained,trained}/eval.json (+ grid/*.mp4)"
echo "VAE           $DEMO_DIR/vae/vae.safetensors (metrics: $DEMO_DIR/vae/metrics.jsonl)"
echo "done in $(( $(date +%s) - started )) s"
