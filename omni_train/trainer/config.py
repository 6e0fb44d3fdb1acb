"""Trainer, optimizer and logging configuration (defaults live here once)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_train.contracts import TASK_CONDITIONS
from omni_train.models.finetune import FINETUNE_MODES


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    # Modules new to a pretrained text-to-video backbone (audio projector, pose guider) often
    # want a larger learning rate than the backbone: lr * new_module_lr_scale.
    new_module_lr_scale: float = 1.0
    # trainer.finetune.mode=lora: the adapters' learning rate is lr * lora_lr_scale.
    lora_lr_scale: float = 1.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    # After warmup: "constant", "cosine" or "linear" decay to lr * min_lr_ratio at
    # decay_steps (0 = at trainer.max_steps).
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    decay_steps: int = 0


@dataclass
class FinetuneConfig:
    # Which denoiser parameters train (omni_train/models/finetune.py):
    #   full         all of them (groups backbone and new_modules)
    #   new_modules  only the modules a text-to-video base lacks (the denoiser's
    #                new_module_prefixes: audio, pose, ...); the base is frozen
    #   lora         LoRA adapters on the base's attention and MLP linears (the denoiser's
    #                lora_target_modules) and the new modules; the base is frozen
    # Frozen modes checkpoint only what trains, and model.safetensors names the base:
    # model.backbone.pretrained, or RUN_DIR/base_model.safetensors for a random-init base.
    mode: str = "full"
    lora_rank: int = 16
    # The adapters' output is scaled by lora_alpha / lora_rank.
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0


@dataclass
class EMAConfig:
    # Exponential moving average of the denoiser's weights, kept sharded over the ranks
    # (each rank averages its own slice; ZeRO-3 partitions included) and gathered only when
    # a checkpoint is saved (ema.safetensors, loadable like model.safetensors).
    enabled: bool = False
    decay: float = 0.9999
    update_every: int = 1
    # Steps before the first update (the average starts from the weights at that step).
    start_step: int = 0


@dataclass
class PreemptionConfig:
    # Signals that mean "the job is about to be stopped": finish the current step, save a
    # checkpoint, exit with exit_code. Slurm sends SIGTERM on preemption and time limit and
    # SIGUSR1 ahead of it with `--signal=USR1@SECONDS` (launch/slurm/train.sbatch); submitit
    # (hydra/launcher=slurm_gpu sweeps) asks for SIGUSR2 and its requeue handler runs after
    # the checkpoint (omni_train/trainer/preemption.py).
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    # launch/slurm/train.sbatch requeues the job when the training exits with this code
    # (128 + SIGTERM, as for a process ended by the signal; slurm.conf RequeueExit can list it).
    exit_code: int = 143


@dataclass
class NonFiniteConfig:
    # A step whose loss is NaN or Inf on any rank applies no update and is counted
    # (metrics: nonfinite_skipped); this many in a row stop the run with the last good state.
    max_consecutive: int = 5


@dataclass
class ProfilerConfig:
    # torch.profiler over steps [start_step, start_step + num_steps); 0 steps = off.
    # The Chrome trace goes to run_dir/profile/ (open in Perfetto or chrome://tracing).
    start_step: int = 0
    num_steps: int = 0
    with_memory: bool = False


@dataclass
class ValidationConfig:
    # Every N steps (0 = never) sample short clips from fixed inputs and log them.
    every: int = 0
    # Inputs: none given = the first num_clips held-out clips of the validation loss (with
    # their windows) when data.val_shards or data.val_holdout gives some, else the first
    # num_clips clips of the training shards (fixed by the seed).
    ref_images: list[str] = field(default_factory=list)
    audio: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    num_clips: int = 1
    sampling_steps: int = 4
    # Use the EMA weights when EMA is enabled.
    use_ema: bool = True


# Validation-loss tasks, weakest first.
VAL_TASKS: tuple[str, ...] = tuple(TASK_CONDITIONS)


@dataclass
class ValLossConfig:
    # The validation loss of trainer.val_every (omni_train/trainer/val_loss.py): the
    # flow-matching loss of the first num_clips held-out clips (data.val_shards, else the
    # data.val_holdout share), each at `timesteps` fixed timesteps (quantiles of the training
    # draw) with fixed noise, per task and quality tier. Cost: an evaluation is about
    # num_clips x tasks per clip x timesteps sample-forwards, spread over the ranks, against a
    # step's 3 x data.batch_size per rank (forward + backward). These defaults with
    # trainer.val_every=1000 cost 4.0 % of training time at the default model and data
    # settings on one CPU rank (one evaluation = 40 steps; benchmarks/bench_validation.py);
    # more ranks or a larger batch make the share smaller.
    num_clips: int = 16
    timesteps: int = 8
    # Seeds the noise (per clip key and timestep) and each clip's window; independent of the
    # run's seed, so runs with different seeds are measured on the same draws.
    noise_seed: int = 0
    # Evaluate the EMA weights (trainer.ema.enabled) instead of the trained ones.
    use_ema: bool = False
    # Any of text (text + ref), audio (+ audio), pose (+ audio + pose).
    tasks: list[str] = field(default_factory=lambda: ["text", "audio", "pose"])


@dataclass
class TrainerConfig:
    max_steps: int = 100_000
    save_every: int = 1_000
    log_every: int = 1
    keep_last: int = 3
    # On a fresh start (no checkpoint to resume), save the untrained weights as step 0 before
    # the first update: a complete checkpoint like any other (resumable, sampleable), never
    # pruned by keep_last and not saved again by a resumed run.
    save_at_start: bool = False
    zero_stage: int = 2
    # ZeRO offload: "none" or "cpu" ("nvme" needs offload_nvme_path). Optimizer offload works
    # with ZeRO 1-3, parameter offload with ZeRO-3 only.
    offload_optimizer: str = "none"
    offload_param: str = "none"
    offload_nvme_path: str = ""
    grad_clip: float = 1.0
    grad_accum: int = 1
    # Ulysses sequence parallelism: groups of this many consecutive ranks share each sample
    # and split its latent frames (world size = data-parallel size x sequence_parallel).
    sequence_parallel: int = 1
    # "fp32" or "bf16"; "auto" = bf16 on CUDA, fp32 on CPU (bf16 matmul is far slower there).
    precision: str = "fp32"
    # Storage dtype of the frozen VAE, text and audio encoders on each device: "auto" = the
    # run's precision (bf16 halves their memory: 9 GiB instead of 18 for umT5-XXL + Wan's VAE),
    # "fp32" or "bf16". They compute in it; their outputs reach the denoiser as float32.
    frozen_dtype: str = "auto"
    # "auto" picks nccl on CUDA and gloo on CPU.
    dist_backend: str = "auto"
    dist_timeout_minutes: int = 30
    # DeepSpeed's CPU shared-memory all-reduce needs a ~70 s C++ build on first use; gloo is
    # enough for CPU runs, so it is off unless asked for.
    cpu_shm_comm: bool = False
    # Peak dense TFLOP/s per device for MFU: 0 = detect (known CUDA GPUs, the peak of the
    # run's precision: bf16 tensor cores, or fp32 / TF32), else the value given (e.g. a
    # measured CPU matmul peak).
    peak_tflops: float = 0.0
    # Console progress bar on the main rank (a one-line bar on a terminal, log lines else).
    progress_bar: bool = True
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    # Sampled validation clips (mp4s), every trainer.validation.every steps.
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # Validation loss every N steps (0 = off), logged as val/... keys in that step's
    # metrics.jsonl row (written at such a step whatever log_every says) and in W&B; needs
    # data.val_shards or data.val_holdout. 1000 with the val_loss defaults: ~4 % of training.
    val_every: int = 0
    # Also evaluate before the first update, logged as a row of its own with step 0 (it has
    # step, stage and the val/ keys only; no training loss).
    val_at_start: bool = False
    val_loss: ValLossConfig = field(default_factory=ValLossConfig)
    # A resume on another world size continues the interrupted epoch's data order (no sample
    # skipped or read twice). When the saved loader position cannot be carried over (e.g.
    # data.sources changed), the run stops before training; true starts a new, reproducible
    # data order instead (samples of the interrupted epoch may then be skipped or repeated).
    # The VAE trainer always starts a new order on another world size.
    allow_new_data_order: bool = False

    def validate(self) -> None:
        """Checks of this config's own fields (ValueError naming the key and the fix)."""
        if self.save_every <= 0 or self.max_steps <= 0:
            raise ValueError("trainer.max_steps and trainer.save_every must be positive")
        if self.sequence_parallel < 1:
            raise ValueError(
                f"trainer.sequence_parallel={self.sequence_parallel}: use 1 (off) or the ranks "
                "that share one sample"
            )
        self._validate_finetune()
        if self.frozen_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(
                f"trainer.frozen_dtype={self.frozen_dtype!r}: use 'auto', 'fp32' or 'bf16'"
            )
        if self.ema.enabled and not 0.0 < self.ema.decay < 1.0:
            raise ValueError(f"trainer.ema.decay={self.ema.decay}: use a value in (0, 1)")
        if not 1 <= self.preemption.exit_code <= 255:
            raise ValueError(
                f"trainer.preemption.exit_code={self.preemption.exit_code}: use 1-255 (143 default)"
            )
        if self.nonfinite.max_consecutive < 1:
            raise ValueError("trainer.nonfinite.max_consecutive must be >= 1")
        if self.validation.every < 0 or (self.validation.ref_images and not self.validation.audio):
            raise ValueError(
                "trainer.validation: every must be >= 0, and ref_images needs one audio file "
                "each (trainer.validation.audio=[a.wav,...])"
            )
        if self.val_every < 0:
            raise ValueError(f"trainer.val_every={self.val_every}: use 0 (off) or a step count")
        val = self.val_loss
        if val.num_clips < 1:
            raise ValueError(f"trainer.val_loss.num_clips={val.num_clips} must be at least 1")
        if not 1 <= val.timesteps <= 256:
            raise ValueError(f"trainer.val_loss.timesteps={val.timesteps}: use 1-256 (8 default)")
        unknown = [task for task in val.tasks if task not in VAL_TASKS]
        if unknown or not val.tasks:
            raise ValueError(
                f"trainer.val_loss.tasks={list(val.tasks)}: use a non-empty subset of {VAL_TASKS}"
            )
        if val.use_ema and not self.ema.enabled:
            raise ValueError(
                "trainer.val_loss.use_ema=true needs trainer.ema.enabled=true (or use_ema=false)"
            )

    def _validate_finetune(self) -> None:
        finetune, opt = self.finetune, self.optimizer
        if finetune.mode not in FINETUNE_MODES:
            raise ValueError(
                f"trainer.finetune.mode={finetune.mode!r}: use one of {', '.join(FINETUNE_MODES)}"
            )
        if finetune.mode == "lora":
            if finetune.lora_rank < 1:
                raise ValueError(
                    f"trainer.finetune.lora_rank={finetune.lora_rank}: use 1 or more (e.g. 16)"
                )
            if finetune.lora_alpha <= 0:
                raise ValueError(
                    f"trainer.finetune.lora_alpha={finetune.lora_alpha}: use a positive value "
                    "(the adapters' output is scaled by lora_alpha / lora_rank)"
                )
            if not 0.0 <= finetune.lora_dropout < 1.0:
                raise ValueError(
                    f"trainer.finetune.lora_dropout={finetune.lora_dropout}: use a value in [0, 1)"
                )
        for key in ("new_module_lr_scale", "lora_lr_scale"):
            if getattr(opt, key) < 0:
                raise ValueError(
                    f"trainer.optimizer.{key}={getattr(opt, key)}: use a factor >= 0 of "
                    "trainer.optimizer.lr"
                )


@dataclass
class WandbConfig:
    enabled: bool = True
    # "offline" writes a local run that `wandb sync` uploads later; "online" needs a network.
    mode: str = "offline"
    project: str = "omni-train"
    entity: str | None = None
    # Empty group means the experiment name.
    group: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    console_every: int = 10
