import dataclasses
import re
from collections import defaultdict

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from omni_train.models.config import (
    DiTConfig,
    ModelConfig,
    PoseGuiderConfig,
    TextEncoderConfig,
    VAEConfig,
)
from omni_train.models.denoiser import build_denoiser
from omni_train.models.flops import (
    flop_breakdown,
    forward_flops_per_sample,
    token_counts,
    train_flops_per_sample,
)

TEXT_TOKENS = 24
BATCH, HEIGHT, FRAMES = 2, 64, 17

# Denoiser modules (qualified names) -> the flop_breakdown component they belong to. Work done
# directly in a block's forward (the joint attention) is the block's; anything left over is
# reported under its module name and must count zero FLOPs.
COMPONENT_OF_MODULE = (
    (r"pose_guider\.|pose_patch_embed$", "pose"),
    (r"patch_embed$|text_proj\.|timestep_embed\.", "embeddings"),
    (r"audio_projector\.|backbone\.blocks\.\d+\.audio_attn", "audio"),
    (r"backbone\.blocks\.\d+\.text\.", "text_stream"),
    (r"backbone\.blocks\.\d+\.video\.", "video_stream"),
    (r"backbone\.blocks\.\d+$", "joint_attention"),
    (r"backbone\.final_layer\.", "final_layer"),
)


def component_of(module_name: str) -> str:
    for pattern, component in COMPONENT_OF_MODULE:
        if re.match(pattern, module_name):
            return component
    return f"unassigned:{module_name}"


class FlopsByComponent(TorchFunctionMode):
    """Splits the running total of a FlopCounterMode by component, backward included.

    Forward: each torch call is charged to the innermost module running it, and the autograd
    nodes it creates are tagged with that component. Backward: each tagged node's pre- and
    post-hooks bracket the FLOPs it runs (the CPU engine runs nodes one at a time).
    """

    def __init__(self, model: torch.nn.Module, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.modules = [""]
        self.forward = defaultdict(int)
        self.backward = defaultdict(int)
        for name, module in model.named_modules():
            if name:
                module.register_forward_pre_hook(lambda *_, n=name: self.modules.append(n))
                module.register_forward_hook(lambda *_: self._leave())

    def _leave(self) -> None:
        self.modules.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        component = component_of(self.modules[-1])
        self.forward[component] += self.counter.get_total_flops() - before
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                self._tag(tensor.grad_fn, component)
        return out

    def _tag(self, node, component: str) -> None:
        """Tag ``node`` and the untagged nodes behind it (made inside the same call)."""
        pending = [node]
        while pending:
            node = pending.pop()
            if node is None or "component" in node.metadata:
                continue
            node.metadata["component"] = component
            started = []
            node.register_prehook(lambda _g, s=started: s.append(self.counter.get_total_flops()))
            node.register_hook(lambda _gi, _go, s=started, c=component: self._charge(c, s.pop()))
            pending.extend(following for following, _ in node.next_functions)

    def _charge(self, component: str, started: int) -> None:
        self.backward[component] += self.counter.get_total_flops() - started


def balanced_config() -> ModelConfig:
    """No component above a third of the FLOPs and none below 4 %: a wrong or missing term
    anywhere shows in the total too."""
    return ModelConfig(
        dit=DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2, rope_axes=[4, 6, 6]),
        vae=VAEConfig(latent_channels=32),
        text_encoder=TextEncoderConfig(d_model=512),
        pose_guider=PoseGuiderConfig(num_keypoints=2, hidden_channels=2, out_channels=4),
    )


def attention_heavy_config() -> ModelConfig:
    """Patch 1 and a near-empty pose guider: the transformer's attention dominates the count."""
    return ModelConfig(
        dit=DiTConfig(hidden_size=32, depth=3, num_heads=2, patch_size=1, rope_axes=[4, 6, 6]),
        pose_guider=PoseGuiderConfig(num_keypoints=2, hidden_channels=2, out_channels=2),
    )


def counted_by_torch(cfg: ModelConfig) -> tuple[dict[str, int], dict[str, int], int]:
    """FLOPs torch counts for one training forward + backward of a batch: forward and
    backward by component, and the counter's own total."""
    torch.manual_seed(0)
    model = build_denoiser(cfg)
    latent_frames, latent = 1 + (FRAMES - 1) // 4, HEIGHT // 8
    text_mask = torch.ones(BATCH, TEXT_TOKENS, dtype=torch.bool)
    text_mask[1, TEXT_TOKENS // 2 :] = False  # padded keys cost the same as real ones
    inputs = dict(
        noisy=torch.randn(BATCH, cfg.vae.latent_channels, latent_frames, latent, latent),
        timesteps=torch.rand(BATCH),
        text=torch.randn(BATCH, TEXT_TOKENS, cfg.text_encoder.d_model),
        text_mask=text_mask,
        ref_latents=torch.randn(BATCH, cfg.vae.latent_channels, 1, latent, latent),
        audio_features=torch.randn(BATCH, FRAMES, cfg.audio_encoder.feature_dim),
        pose_heatmaps=torch.rand(BATCH, cfg.pose_guider.num_keypoints, FRAMES, HEIGHT, HEIGHT),
        active={c: torch.ones(BATCH, dtype=torch.bool) for c in ("text", "ref", "audio", "pose")},
    )
    # The math kernel runs attention as matmuls, which the counter sees (the fused CPU
    # kernel is not in its table).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        split = FlopsByComponent(model, counter)
        with split:
            loss = model(**inputs).square().mean()
        loss.backward()
    return dict(split.forward), dict(split.backward), counter.get_total_flops()


@pytest.fixture(scope="module", params=[balanced_config, ModelConfig, attention_heavy_config])
def counted(request):
    cfg = request.param()
    return cfg, counted_by_torch(cfg)


def test_every_component_equals_torchs_flop_counter(counted):
    # Measured: every component's forward and backward agree with torch to the FLOP (0 %
    # error), so the comparison is exact.
    cfg, (forward, backward, total) = counted
    assert sum(forward.values()) + sum(backward.values()) == total  # nothing escaped the split
    by_torch = {
        name: (forward.get(name, 0), backward.get(name, 0))
        for name in forward | backward
        if forward.get(name) or backward.get(name)
    }
    formula = flop_breakdown(cfg, (HEIGHT, HEIGHT), FRAMES, TEXT_TOKENS)
    per_batch = {name: (BATCH * f.forward, BATCH * f.backward) for name, f in formula.items()}
    assert per_batch == by_torch


def test_totals_equal_torchs_flop_counter(counted):
    cfg, (forward, _backward, total) = counted
    resolution = (HEIGHT, HEIGHT)
    assert forward_flops_per_sample(cfg, resolution, FRAMES, TEXT_TOKENS) * BATCH == sum(
        forward.values()
    )
    assert train_flops_per_sample(cfg, resolution, FRAMES, TEXT_TOKENS) * BATCH == total


def test_balanced_config_has_no_dominant_component():
    parts = flop_breakdown(balanced_config(), (HEIGHT, HEIGHT), FRAMES, TEXT_TOKENS)
    total = sum(p.train for p in parts.values())
    shares = sorted(p.train / total for p in parts.values())
    assert shares[0] > 0.04 and shares[-1] < 1 / 3


def test_attention_heavy_case_really_exercises_attention():
    parts = flop_breakdown(attention_heavy_config(), (HEIGHT, HEIGHT), FRAMES, TEXT_TOKENS)
    total = sum(p.train for p in parts.values())
    assert parts["joint_attention"].train > 0.3 * total


def test_training_is_about_three_forward_passes():
    cfg = ModelConfig(dit=DiTConfig(hidden_size=256, depth=4, num_heads=4, rope_axes=[16, 24, 24]))
    ratio = train_flops_per_sample(cfg, (256, 256), 33) / forward_flops_per_sample(
        cfg, (256, 256), 33
    )
    assert 2.8 < ratio <= 3.0


def test_flops_grow_with_depth_tokens_and_text():
    cfg = ModelConfig()
    base = train_flops_per_sample(cfg, (64, 64), 17, 8)
    deeper = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, depth=4))
    assert train_flops_per_sample(deeper, (64, 64), 17, 8) > base
    assert train_flops_per_sample(cfg, (64, 64), 33, 8) > base
    assert train_flops_per_sample(cfg, (64, 64), 17, 16) > base
    assert train_flops_per_sample(cfg, (64, 64), 17) == train_flops_per_sample(
        cfg, (64, 64), 17, cfg.text_encoder.max_length
    )


def test_token_counts():
    counts = token_counts(ModelConfig(), (64, 128), 17, 10)
    assert (counts.latent_frames, counts.tokens_per_frame) == (5, 4 * 8)
    assert counts.video_tokens == 6 * 32 and counts.text_tokens == 10
    assert counts.audio_tokens_per_frame == 4 + 2 * 2


@pytest.mark.parametrize(
    ("resolution", "frames", "message"),
    [((64, 60), 17, "multiple of 16"), ((64, 64), 16, "1 \\+ 4k"), ((64, 64), 17, "text")],
)
def test_bad_shapes_are_named(resolution, frames, message):
    with pytest.raises(ValueError, match=message):
        token_counts(ModelConfig(), resolution, frames, 0 if message == "text" else None)
