"""Evaluation entry point: self-reenactment of held-out clips, with two baselines.

    python -m omni_train.evaluate checkpoint=RUN_DIR_OR_STEP_DIR shards=GLOB [out=DIR] \
        [num_clips=N] [task=text|audio|pose] [seconds=S] [metrics.enabled=[fidelity,...]] \
        [trust_checkpoint_code=true]

Writes OUT/eval.json (metric means with 95 % intervals, per-clip rows, how each metric was
measured, for the generated clips and the `real` and `static_reference` baselines),
OUT/timings.json, OUT/grid/*.mp4 (real | static reference | generated, with the audio) and
an offline W&B run in OUT/wandb. OUT defaults to RUN_DIR/eval, where `omni_train.report`
reads it. Bad input exits with status 2 and a message naming the key. As in
omni_train.sample, a checkpoint's config.yaml may name only this project's code as a
``_target_`` unless trust_checkpoint_code=true.

Under ``torchrun --standalone --nproc_per_node 3 -m omni_train.evaluate ...`` (or 2) each
denoising step's guidance passes run on different ranks (omni_train/diffusion/cfg_parallel.py);
rank 0 scores the clips and writes OUT. ``sequence_parallel=N`` (N, 2N or 3N ranks) makes groups
of N ranks that also split each denoiser call's latent frames.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from omni_train.evaluation.config import EvaluateConfig

log = logging.getLogger("omni_train.evaluate")
ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(raw: DictConfig) -> None:
    from omni_train.evaluation.harness import evaluate

    cfg: EvaluateConfig = OmegaConf.to_object(raw)
    try:
        path = evaluate(cfg)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        sys.exit(2)
    if path is not None:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
