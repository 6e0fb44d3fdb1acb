"""The capacity planner against measurements: model-state bytes per rank of real DeepSpeed
engines on 2 forked CPU ranks (ZeRO 1-3, each fine-tuning mode) and the activation bytes a
real forward saves for backward; with sequence parallelism, a rank's whole plan (model states
and activations) and the bytes it exchanges."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omni_train.capacity import memory_per_gpu, model_state_bytes, persistent_params
from omni_train.describe import model_preset
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.finetune import apply_finetune_mode
from omni_train.models.training_cost import (
    build_on_meta,
    denoiser_inputs,
    parameter_counts,
    training_cost,
)
from omni_train.testing import run_ranks

RANKS = 2
LORA_RANK = 4
CLIP = ((32, 32), 5, 4)  # resolution, pixel frames, text tokens
SP_CLIP = ((32, 32), 9, 4)  # 3 latent frames: an uneven split over 2 ranks


def storage_bytes(tensors, exclude: set[int] = frozenset()) -> dict[int, int]:
    """Bytes per storage (keyed by address) of real tensors, each storage once."""
    found = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude and storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _engine_model_states(
    cfg: ModelConfig, mode: str, stage: int, sequence_parallel: bool = False, clip=CLIP
) -> dict[str, int]:
    """Bytes per category of the model states one rank holds after the backward of a second
    step (its gradients reduced, the optimizer state made by the first step's update). With
    ``sequence_parallel`` the ranks form one SP group, and the second step's forward also
    reports what it saved for backward ("activations") and what the rank sent to the other
    ("sent", with the size of its largest exchange "largest_exchange")."""
    from omni_train.models.sequence_parallel import SequenceParallel, counting_exchanges
    from omni_train.trainer.config import FinetuneConfig, TrainerConfig
    from omni_train.trainer.deepspeed_internals import model_state_tensors
    from omni_train.trainer.ds_config import deepspeed_config
    from omni_train.trainer.finetune import param_groups
    from omni_train.trainer.run_setup import build_engine

    torch.manual_seed(0)
    model = apply_finetune_mode(build_denoiser(cfg), mode, LORA_RANK)
    trainer_cfg = TrainerConfig(
        zero_stage=stage, precision="fp32", finetune=FinetuneConfig(mode=mode, lora_rank=LORA_RANK)
    )
    groups = param_groups(model, trainer_cfg.optimizer, mode)
    ds_cfg = deepspeed_config(trainer_cfg, 1, RANKS)
    engine, _ = build_engine(model, groups, trainer_cfg, ds_cfg)
    inputs = denoiser_inputs(cfg, *clip, device="cpu")
    if sequence_parallel:
        inputs["sequence_parallel"] = SequenceParallel.of_group()
    measured = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for step in range(2):
        saved: dict[int, int] = {}

        def pack(tensor, saved=saved):
            saved.update(storage_bytes([tensor], parameters))
            return tensor

        with counting_exchanges() as exchanges:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = engine(**inputs).square().mean()
            engine.backward(loss)
        if step == 1:
            seen: set[int] = set()
            for kind, tensors in model_state_tensors(engine).items():
                found = storage_bytes(tensors, seen)
                seen |= set(found)
                measured[kind] = sum(found.values())
            if sequence_parallel:
                measured["activations"] = sum(saved.values())
                measured["sent"] = exchanges.sent_bytes
                measured["largest_exchange"] = exchanges.largest_bytes
        engine.step()
    engine.destroy()
    return measured


def _rank(
    cfg: ModelConfig, mode: str, stage: int, sequence_parallel: bool = False, clip=CLIP
) -> dict[str, int]:
    import torch.distributed as dist

    from omni_train.trainer.distributed import init_distributed

    init_distributed("gloo", timeout_minutes=5, cpu_shm_comm=False)
    try:
        return _engine_model_states(cfg, mode, stage, sequence_parallel, clip)
    finally:
        dist.destroy_process_group()


def planned_model_states(cfg: ModelConfig, mode: str, stage: int) -> dict[str, float]:
    params = parameter_counts(build_on_meta(cfg), LORA_RANK)
    planned = model_state_bytes(
        params.trainable(mode),
        stage,
        RANKS,
        "fp32",
        frozen=params.frozen(mode),
        persistent=persistent_params(params, mode),
    )
    planned.pop("host")
    return planned


SETUPS = [
    ("tiny", "full", 1),
    ("tiny", "full", 2),
    ("tiny", "full", 3),
    ("wan_tiny", "lora", 2),
    ("wan_tiny", "new_modules", 3),
    ("hunyuan_video_tiny", "lora", 3),
]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "mode", "stage"), SETUPS)
def test_planned_model_states_match_a_deepspeed_engine(preset, mode, stage):
    cfg = model_preset(preset)
    measured = run_ranks(_rank, RANKS, cfg, mode, stage)
    planned = planned_model_states(cfg, mode, stage)
    for rank_measured in measured:
        ratio = sum(rank_measured.values()) / sum(planned.values())
        assert ratio == pytest.approx(1.0, abs=0.10), (rank_measured, planned)


def without_checkpointing(cfg: ModelConfig) -> ModelConfig:
    dit = dataclasses.replace(cfg.dit, gradient_checkpointing=False)
    return dataclasses.replace(cfg, dit=dit)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "mode", "stage"), [("tiny", "full", 2), ("wan_tiny", "lora", 2)]
)
def test_planned_sequence_parallel_memory_matches_a_measured_rank(preset, mode, stage):
    # 2 ranks, one SP group of 2, a real DeepSpeed engine. 9 pixel frames are 3 latent
    # frames: rank 0 holds 2 of them, and it is the rank the planner counts.
    # Measured (planned / measured): tiny full 0.997 in all, activations 0.998; wan_tiny lora
    # 0.985, activations 0.998. Exchanged bytes are equal, not close.
    cfg = without_checkpointing(model_preset(preset))
    measured = run_ranks(_rank, RANKS, cfg, mode, stage, True, SP_CLIP)[0]
    cost = training_cost(cfg, *SP_CLIP, mode, LORA_RANK, "fp32", sequence_parallel=2)
    assert cost.sent_bytes == measured["sent"] > 0
    assert cost.largest_exchange_bytes == measured["largest_exchange"]
    planned = memory_per_gpu(cost, 0, stage, RANKS, "fp32", 1)
    assert planned["activations"] / measured["activations"] == pytest.approx(1.0, abs=0.02)
    parts = ("weights", "gradients", "optimizer", "activations")
    states = {k: v for k, v in measured.items() if k in parts}
    ratio = sum(planned[k] for k in parts) / sum(states.values())
    assert ratio == pytest.approx(1.0, abs=0.10), (planned, measured)
    # The unsharded plan keeps more activations than the sharded rank measured.
    unsharded = training_cost(cfg, *SP_CLIP, mode, LORA_RANK, "fp32")
    assert unsharded.activation_bytes > measured["activations"]


def _sent_with_checkpointing(cfg: ModelConfig) -> int:
    import torch.distributed as dist

    from omni_train.models.sequence_parallel import SequenceParallel, counting_exchanges

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = build_denoiser(cfg).train()
        inputs = denoiser_inputs(cfg, *SP_CLIP, device="cpu")
        with counting_exchanges() as exchanges:
            model(
                **inputs, sequence_parallel=SequenceParallel.of_group()
            ).square().mean().backward()
        return exchanges.sent_bytes
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "every"), [("tiny", 2), ("hunyuan_video_tiny", 1)])
def test_planned_exchanges_include_the_recomputed_blocks(preset, every):
    # A checkpointed block's forward exchanges run again in backward (the own MMDiT: every
    # other block here; a family: every block).
    overrides = ["model.dit.gradient_checkpointing=true"]
    cfg = model_preset(preset, [*overrides, f"model.dit.checkpoint_every_n_blocks={every}"])
    measured = run_ranks(_sent_with_checkpointing, RANKS, cfg)[0]
    planned = training_cost(cfg, *SP_CLIP, "full", LORA_RANK, "fp32", sequence_parallel=2)
    plain = training_cost(
        without_checkpointing(cfg), *SP_CLIP, "full", LORA_RANK, "fp32", sequence_parallel=2
    )
    assert planned.sent_bytes == measured > plain.sent_bytes
