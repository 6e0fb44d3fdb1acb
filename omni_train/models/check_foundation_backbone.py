"""Check that this project runs a released foundation checkpoint as its diffusers pipeline does.

    python -m omni_train.models.check_foundation_backbone family=wan pipeline=DIR \
        [prompt="a woman talks to the camera"] [height=256] [width=256] [num_frames=9] \
        [steps=4] [seed=0] [guidance=6.0] [crop_start=95] [device=cpu] [dtype=float32] \
        [tolerance=1e-4]

DIR is a local diffusers pipeline directory (Wan2.1-T2V-1.3B-Diffusers for family=wan,
HunyuanVideo in diffusers format for family=hunyuan_video). The reference is the pipeline
loaded from DIR; this project's stack is built from the same DIR as a run would build it
(model.backbone.family=FAMILY model.backbone.pretrained=DIR, model.vae=FAMILY
model.vae.pretrained=DIR, model.text_encoder.pretrained=DIR, which reads text_encoder/ and
tokenizer/). Four comparisons, each printed as max |difference| and that relative to the
pipeline's largest value:

a) text embeddings: the pipeline's encode_prompt vs the text encoder's output as the denoiser
   takes it (Wan: zero-padded to the pipeline's max_sequence_length; HunyuanVideo: the tokens
   under the mask, and the mask itself);
b) one transformer forward on the run's latents at a mid-run step: the pipeline's transformer
   at t * 1000 vs build_denoiser's wrapper at t with the reference off, no audio or pose and
   no motion frames;
c) a run without classifier-free guidance (Wan: guidance_scale=1; HunyuanVideo: its embedded
   guidance, true_cfg_scale=1) from the same noise, output_type latents: the pipeline vs this
   project's Euler loop; when the pipeline's sigmas are this project's sampler schedule
   (HunyuanVideo) the loop is the sampler's euler_sample, otherwise (Wan: the scheduler's
   linspace ends at its shifted sigma_min) the same Euler update on the pipeline's sigmas;
d) decoding the pipeline's final latents: the pipeline's own decode vs model.vae's.

A pipeline whose scheduler is not FlowMatchEulerDiscreteScheduler (released Wan 2.1 ships
UniPCMultistepScheduler) runs with a FlowMatchEulerDiscreteScheduler of its flow shift, so
both sides integrate with Euler. HunyuanVideo's pipeline feeds CLIP-L's pooled caption vector
to the transformer, where this project's wrapper has a learned vector (zeros at init): for the
check the wrapper's vector is set to the pipeline's. Exits with 1, naming the failing lines,
when a relative difference exceeds ``tolerance``.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from omni_train.config import CONF_DIR
from omni_train.contracts import CONDITIONS, latent_frames
from omni_train.diffusion.sampler import (
    Guidance,
    denoiser_model_fn,
    euler_sample,
    guided_velocity,
    inference_timesteps,
)
from omni_train.models.adapters import build_part
from omni_train.models.config import ModelConfig, TextEncoderConfig, VAEConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.encoders import build_vae
from omni_train.models.text_encoder import TextEncoder

# Sigmas closer than this are the same schedule (float32 against this project's float64).
SAME_SCHEDULE = 1e-6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Family:
    pipeline_class: str
    text_architecture: str


FAMILIES = {
    "wan": Family("WanPipeline", "umt5"),
    "hunyuan_video": Family("HunyuanVideoPipeline", "llama"),
}


@dataclass
class CheckConfig:
    family: str = ""
    pipeline: str = ""
    prompt: str = "a woman talks to the camera in a bright room"
    height: int = 256
    width: int = 256
    num_frames: int = 9
    steps: int = 4
    seed: int = 0
    # Text tokens: the pipeline pads to this, this project's encoder truncates at it (Wan: the
    # wrapper's text length). 0 = the pipeline's default (Wan 512, HunyuanVideo 256).
    max_sequence_length: int = 0
    # HunyuanVideo: the embedded guidance of both sides (model.backbone.embedded_guidance).
    guidance: float = 6.0
    # HunyuanVideo: template tokens cropped on both sides (the pipeline's default is 95, the
    # count with Llama-3's tokenizer).
    crop_start: int = 95
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"
    # Largest max |ours - pipeline| / max |pipeline| accepted.
    tolerance: float = 1e-4


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    relative: float

    def line(self, tolerance: float) -> str:
        verdict = "ok" if self.relative <= tolerance else "FAILED"
        return (
            f"{self.name}: max |diff| {self.max_abs:.3g}, relative {self.relative:.3g}  {verdict}"
        )


def compare(name: str, ours: Tensor, theirs: Tensor) -> Comparison:
    if ours.shape != theirs.shape:
        shapes = f"{name} (shape {tuple(ours.shape)}, the pipeline's {tuple(theirs.shape)})"
        return Comparison(shapes, float("inf"), float("inf"))
    max_abs = (ours.float() - theirs.float()).abs().max().item()
    scale = theirs.float().abs().max().item()
    return Comparison(name, max_abs, max_abs / scale if scale > 0 else max_abs)


def parse_config(argv: Sequence[str]) -> CheckConfig:
    schema = OmegaConf.structured(CheckConfig)
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(list(argv))))
    except OmegaConfBaseException as err:
        keys = ", ".join(field.name for field in fields(CheckConfig))
        raise SystemExit(f"{err}\ngive key=value arguments; the keys are {keys}") from None
    if cfg.family not in FAMILIES:
        raise SystemExit(f"family={cfg.family!r}: give one of {sorted(FAMILIES)}")
    if not cfg.pipeline:
        raise SystemExit("pipeline=DIR is required: a local diffusers pipeline directory")
    if cfg.dtype not in DTYPES:
        raise SystemExit(f"dtype={cfg.dtype!r}: give one of {sorted(DTYPES)}")
    if cfg.steps < 1:
        raise SystemExit(f"steps={cfg.steps} must be >= 1")
    if (cfg.num_frames - 1) % 4:
        raise SystemExit(f"num_frames={cfg.num_frames} must be 1 + 4k (e.g. 9)")
    if cfg.height % 16 or cfg.width % 16:
        raise SystemExit(f"height={cfg.height} and width={cfg.width} must divide by 16")
    return cfg


def load_pipeline(cfg: CheckConfig) -> tuple[nn.Module, str]:
    """The pipeline of DIR, with an Euler scheduler of its flow shift; and what was swapped."""
    import diffusers

    directory = Path(cfg.pipeline)
    if not (directory / "model_index.json").is_file():
        raise SystemExit(
            f"pipeline={cfg.pipeline}: no model_index.json there; give a diffusers pipeline "
            "directory (as save_pretrained writes it)"
        )
    expected = FAMILIES[cfg.family].pipeline_class
    saved = json.loads((directory / "model_index.json").read_text()).get("_class_name")
    if saved != expected:
        fitting = [name for name, family in FAMILIES.items() if family.pipeline_class == saved]
        fix = f"family={fitting[0]}" if fitting else f"a {expected} directory"
        raise SystemExit(f"pipeline={cfg.pipeline} holds a {saved}, not a {expected}; use {fix}")
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        directory, local_files_only=True, dtype=DTYPES[cfg.dtype]
    )
    pipe.set_progress_bar_config(disable=True)
    if cfg.family == "wan" and (
        pipe.config.boundary_ratio is not None or pipe.config.expand_timesteps
    ):
        raise SystemExit(
            f"pipeline={cfg.pipeline} is a Wan 2.2 pipeline (two experts or per-token timesteps); "
            "model.backbone.family=wan runs one Wan 2.1-style transformer"
        )
    scheduler = pipe.scheduler
    note = f"scheduler {type(scheduler).__name__}"
    if not isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        shift = scheduler.config.get("flow_shift")
        if not scheduler.config.get("use_flow_sigmas") or shift is None:
            raise SystemExit(
                f"pipeline={cfg.pipeline}: its {type(scheduler).__name__} is not a flow-matching "
                "scheduler (no use_flow_sigmas / flow_shift); this check compares flow-matching "
                "Euler runs"
            )
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=scheduler.config.num_train_timesteps, shift=shift
        )
        note += f", replaced by FlowMatchEulerDiscreteScheduler(shift={shift}) for an Euler run"
    return pipe.to(cfg.device), note


def text_length(cfg: CheckConfig, pipe: nn.Module) -> int:
    if cfg.max_sequence_length > 0:
        return cfg.max_sequence_length
    return inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default


def model_config(cfg: CheckConfig, pipe: nn.Module) -> ModelConfig:
    """This project's model config for DIR: the family's backbone and VAE preset, and the
    text encoder the pipeline uses, each loading from DIR."""
    model = ModelConfig()
    model.backbone.family = cfg.family
    model.backbone.pretrained = cfg.pipeline
    model.backbone.embedded_guidance = cfg.guidance
    preset = OmegaConf.load(CONF_DIR / "model.vae" / f"{cfg.family}.yaml")
    model.vae = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(VAEConfig), preset))
    model.vae.pretrained = cfg.pipeline
    text_config = pipe.text_encoder.config
    architecture = FAMILIES[cfg.family].text_architecture
    model.text_encoder = TextEncoderConfig(
        architecture=architecture,
        pretrained=cfg.pipeline,
        d_model=text_config.hidden_size if architecture == "llama" else text_config.d_model,
        max_length=text_length(cfg, pipe),
        crop_start=cfg.crop_start,
    )
    if cfg.family == "hunyuan_video":
        model.dit.patch_size = pipe.transformer.config.patch_size
    return model


def pipeline_template(cfg: CheckConfig) -> dict:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return {"template": DEFAULT_PROMPT_TEMPLATE["template"], "crop_start": cfg.crop_start}


def pipeline_text(cfg: CheckConfig, pipe: nn.Module) -> dict[str, Tensor]:
    """The pipeline's prompt embeddings (its call's keyword arguments)."""
    dtype = DTYPES[cfg.dtype]
    length = text_length(cfg, pipe)
    if cfg.family == "wan":
        embeds, _ = pipe.encode_prompt(
            cfg.prompt, do_classifier_free_guidance=False, max_sequence_length=length,
            device=cfg.device, dtype=dtype,
        )  # fmt: skip
        return {"prompt_embeds": embeds}
    embeds, pooled, mask = pipe.encode_prompt(
        cfg.prompt, prompt_template=pipeline_template(cfg), device=cfg.device, dtype=dtype,
        max_sequence_length=length,
    )  # fmt: skip
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}


def text_comparisons(
    family: str, denoiser: nn.Module, text: Tensor, mask: Tensor, theirs: dict[str, Tensor]
) -> list[Comparison]:
    """(a): the text as the wrapper feeds its base against the pipeline's."""
    on = torch.ones(text.shape[0], dtype=torch.bool, device=text.device)
    reference = theirs["prompt_embeds"]
    if family == "wan":
        ours = denoiser._text(text, mask, on, reference.dtype)
        name = f"a) text embeddings, zero-padded to {ours.shape[1]} as the wrapper pads"
        return [compare(name, ours, reference)]
    tokens, keys = denoiser._text(text, mask, on, reference.dtype)
    length = reference.shape[1]
    padded_tokens = tokens.new_zeros(reference.shape)
    padded_tokens[:, : tokens.shape[1]] = tokens * keys[..., None]
    padded_keys = keys.new_zeros(reference.shape[:2])
    padded_keys[:, : keys.shape[1]] = keys
    their_keys = theirs["prompt_attention_mask"].bool()
    return [
        compare(
            f"a) text embeddings under the mask (pipeline padded to {length})",
            padded_tokens,
            reference * their_keys[..., None],
        ),
        compare("a) text mask", padded_keys.float(), their_keys.float()),
    ]


def pipeline_forward(
    family: str, pipe: nn.Module, x: Tensor, timestep: Tensor, text: dict, guidance: float
) -> Tensor:
    """The pipeline's transformer call at one step (its loop's arguments)."""
    batch = x.shape[0]
    kwargs = {
        "hidden_states": x.to(pipe.transformer.dtype),
        "timestep": timestep.expand(batch),
        "encoder_hidden_states": text["prompt_embeds"],
        "return_dict": False,
    }
    if family == "hunyuan_video":
        kwargs["encoder_attention_mask"] = text["prompt_attention_mask"]
        kwargs["pooled_projections"] = text["pooled_prompt_embeds"]
        dtype = pipe.transformer.dtype
        kwargs["guidance"] = torch.full((batch,), guidance, dtype=dtype, device=x.device) * 1000.0
    return pipe.transformer(**kwargs)[0]


def run_pipeline(
    cfg: CheckConfig, pipe: nn.Module, noise: Tensor, text: dict[str, Tensor]
) -> tuple[list[Tensor], Tensor]:
    """The latents after each step of the pipeline's run, and its decoded video in [0, 1]."""
    steps: list[Tensor] = []

    def keep_latents(_pipe, _index, _timestep, outputs):
        steps.append(outputs["latents"].clone())
        return {}

    kwargs = dict(text, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames)
    kwargs["max_sequence_length"] = text_length(cfg, pipe)
    if cfg.family == "wan":
        kwargs["guidance_scale"] = 1.0
    else:
        kwargs.update(guidance_scale=cfg.guidance, true_cfg_scale=1.0)
    video = pipe(
        **kwargs, latents=noise, num_inference_steps=cfg.steps, output_type="pt",
        callback_on_step_end=keep_latents, return_dict=False,
    )[0]  # fmt: skip
    return steps, video


def euler_on_sigmas(model_fn, noise: Tensor, sigmas: Tensor) -> Tensor:
    """euler_sample's update, on the given sigmas (steps + 1, ending at 0) instead of its own."""
    x = noise
    for i in range(len(sigmas) - 1):
        t = sigmas[i].to(x.dtype).expand(x.shape[0])
        v = guided_velocity(model_fn, x, t, 1.0, 1.0)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return x


def free_memory() -> None:
    """Give the memory of deleted modules back to the device (CPU memory is freed on del)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def show(cfg: CheckConfig, comparisons: list[Comparison]) -> list[Comparison]:
    for comparison in comparisons:
        print(comparison.line(cfg.tolerance))
    return comparisons


def our_text(cfg: CheckConfig, model: ModelConfig) -> tuple[Tensor, Tensor]:
    """The caption through this project's text encoder (built from DIR, then let go)."""
    encoder = build_part("text_encoder", model.text_encoder, TextEncoder)
    text, mask = encoder.to(cfg.device, DTYPES[cfg.dtype]).eval()([cfg.prompt])
    del encoder
    free_memory()
    return text, mask


def denoising_comparisons(
    cfg: CheckConfig, pipe: nn.Module, denoiser: nn.Module, text: Tensor, mask: Tensor,
    theirs: dict[str, Tensor], noise: Tensor,
) -> tuple[list[Comparison], Tensor, Tensor]:  # fmt: skip
    """(b) and (c); also the pipeline's final latents and decoded video."""
    pipeline_steps, video = run_pipeline(cfg, pipe, noise, theirs)
    sigmas, timesteps = pipe.scheduler.sigmas.to(cfg.device), pipe.scheduler.timesteps
    active = {name: torch.tensor([name == "text"], device=cfg.device) for name in CONDITIONS}
    ref = noise.new_zeros(*noise.shape[:2], 1, *noise.shape[3:])
    model_fn = denoiser_model_fn(denoiser, text, mask, ref, None, None, active)

    # The input of a mid-run step: the pipeline's latents after the step before.
    step = (cfg.steps - 1) // 2
    x = noise if step == 0 else pipeline_steps[step - 1]
    theirs_v = pipeline_forward(cfg.family, pipe, x, timesteps[step], theirs, cfg.guidance)
    on = torch.ones(1, dtype=torch.bool, device=cfg.device)
    ours_v = model_fn(x, sigmas[step].to(x.dtype).expand(1), on, on)
    name = f"b) transformer forward at step {step} (t={sigmas[step].item():.4f})"
    comparisons = show(cfg, [compare(name, ours_v, theirs_v)])

    shift = float(pipe.scheduler.config.shift)
    schedule_gap = (inference_timesteps(cfg.steps, shift).to(sigmas) - sigmas).abs().max().item()
    if schedule_gap <= SAME_SCHEDULE:
        print(f"the pipeline's sigmas are the sampler's (shift {shift}): euler_sample runs")
        latents = euler_sample(model_fn, noise, cfg.steps, shift, Guidance())
    else:
        print(
            f"the pipeline's sigmas differ from the sampler's inference_timesteps(steps, "
            f"shift={shift}) by up to {schedule_gap:.3g}: the sampler's Euler update runs on "
            "the pipeline's sigmas"
        )
        latents = euler_on_sigmas(model_fn, noise, sigmas)
    name = f"c) {cfg.steps} Euler steps, final latents"
    comparisons += show(cfg, [compare(name, latents, pipeline_steps[-1])])
    return comparisons, pipeline_steps[-1], video


def check(cfg: CheckConfig) -> list[Comparison]:
    """Runs (a) to (d), printing each line as it comes; returns the comparisons."""
    dtype = DTYPES[cfg.dtype]
    pipe, scheduler_note = load_pipeline(cfg)
    model = model_config(cfg, pipe)
    frames, height, width = latent_frames(cfg.num_frames), cfg.height // 8, cfg.width // 8
    shape = (1, model.vae.latent_channels, frames, height, width)
    print(f"{type(pipe).__name__} from {cfg.pipeline}; {scheduler_note}")
    print(
        f"prompt {cfg.prompt!r}; {cfg.height}x{cfg.width}, {cfg.num_frames} frames -> latents "
        f"{shape}; {cfg.steps} steps, seed {cfg.seed}, {cfg.dtype} on {cfg.device}"
    )
    with torch.no_grad():
        theirs = pipeline_text(cfg, pipe)
        # From here on the pipeline takes these embeddings; its text encoders can go.
        pipe.text_encoder = None
        if cfg.family == "hunyuan_video":
            pipe.text_encoder_2 = None
        free_memory()
        denoiser = build_denoiser(model).to(cfg.device, dtype).eval()
        text, mask = our_text(cfg, model)
        comparisons = show(cfg, text_comparisons(cfg.family, denoiser, text, mask, theirs))
        if cfg.family == "hunyuan_video":
            denoiser.pooled_text.copy_(theirs["pooled_prompt_embeds"][0])
            print(
                "HunyuanVideo: the wrapper's learned pooled vector (this project has no CLIP) "
                "is set to the pipeline's CLIP pooled caption vector for (b) and (c)"
            )
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
        found, final, video = denoising_comparisons(
            cfg, pipe, denoiser, text, mask, theirs, noise.to(cfg.device)
        )
        comparisons += found

        pipe.transformer = None
        del denoiser
        free_memory()
        vae = build_part("vae", model.vae, build_vae).to(cfg.device, dtype).eval()
        ours = pipe.video_processor.postprocess_video(vae.decode(final.to(dtype)), output_type="pt")
        name = f"d) decode of the final latents (model.vae={cfg.family} vs the pipeline's)"
        comparisons += show(cfg, [compare(name, ours, video)])
    return comparisons


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    comparisons = check(cfg)
    print(f"tolerance: relative {cfg.tolerance:g} (max |ours - pipeline| / max |pipeline|)")
    failed = [c for c in comparisons if c.relative > cfg.tolerance]
    for comparison in failed:
        print(f"FAILED: {comparison.line(cfg.tolerance)}")
    if not failed:
        print("PASSED: this project runs the checkpoint as its pipeline does")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
