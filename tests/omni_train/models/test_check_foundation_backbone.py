"""check_foundation_backbone on tiny random pipelines saved to disk: a faithful stack passes,
and each kind of mismatch a real checkpoint could reveal fails the check (exit status 1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("diffusers", reason="the foundation extra (diffusers) is not installed")

import diffusers  # noqa: E402
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (  # noqa: E402
    DEFAULT_PROMPT_TEMPLATE,
)
from transformers import (  # noqa: E402
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    UMT5Config,
    UMT5EncoderModel,
)

from omni_train.models import check_foundation_backbone as check  # noqa: E402
from omni_train.models.foundation_vae import HunyuanVideoVAE, WanVAE  # noqa: E402
from omni_train.models.hunyuan_denoiser import HunyuanOmniDenoiser  # noqa: E402
from omni_train.models.text_encoder import TextEncoder  # noqa: E402
from omni_train.models.wan_denoiser import WanOmniDenoiser  # noqa: E402

SIZE = [
    *("height=32", "width=16", "num_frames=5", "steps=3", "max_sequence_length=64"),
    *("device=cpu", "dtype=float32"),
]
# ByT5 has no special token in front, so the template's bytes before {} are cropped.
BYTE_CROP_START = len(DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0].encode())
LINE = re.compile(r"^([abcd]\).*): max \|diff\| (\S+), relative (\S+)  (ok|FAILED)$")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: more threads cost more than they save (a check takes several times
    longer with two threads on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    """A tiny WanPipeline laid out as Wan2.1-T2V-1.3B-Diffusers: umT5, UniPC with flow sigmas."""
    torch.manual_seed(0)
    pipe = diffusers.WanPipeline(
        tokenizer=ByT5Tokenizer(),
        text_encoder=UMT5EncoderModel(
            UMT5Config(
                vocab_size=384, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                feed_forward_proj="gated-gelu", dropout_rate=0.0,
            )
        ),
        vae=diffusers.AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        transformer=diffusers.WanTransformer3DModel(
            num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
        ),
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("wan_pipeline")
    pipe.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory) -> Path:
    """A tiny HunyuanVideoPipeline: Llama text encoder, CLIP pooled vector, Euler with shift 7."""
    torch.manual_seed(0)
    pipe = diffusers.HunyuanVideoPipeline(
        text_encoder=LlamaModel(
            LlamaConfig(
                vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=2, head_dim=16, pad_token_id=0,
            )
        ),
        tokenizer=ByT5Tokenizer(),
        transformer=diffusers.HunyuanVideoTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
            num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=8,
            rope_axes_dim=[4, 6, 6],
        ),
        vae=diffusers.AutoencoderKLHunyuanVideo(
            block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4
        ),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=CLIPTextModel(
            CLIPTextConfig(
                vocab_size=384, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, projection_dim=8, bos_token_id=1, eos_token_id=1,
                pad_token_id=0,
            )
        ),
        tokenizer_2=ByT5Tokenizer(),
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("hunyuan_pipeline")
    pipe.save_pretrained(directory)
    return directory


def run_check(capsys, family: str, directory: Path, *extra: str) -> tuple[int, dict, str]:
    argv = [f"family={family}", f"pipeline={directory}", *SIZE, *extra]
    if family == "hunyuan_video":
        argv.append(f"crop_start={BYTE_CROP_START}")
    status = check.main(argv)
    out = capsys.readouterr().out
    print(out)
    lines = {}
    for line in out.splitlines():
        match = LINE.match(line)
        if match:
            name, max_abs, relative, verdict = match.groups()
            lines["a mask" if name.startswith("a) text mask") else name[:1]] = (
                float(max_abs),
                float(relative),
                verdict,
            )
    return status, lines, out


def test_wan_pipeline_matches(capsys, wan_dir):
    status, lines, out = run_check(capsys, "wan", wan_dir)
    assert status == 0
    assert set(lines) == {"a", "b", "c", "d"}
    for name, (max_abs, relative, verdict) in lines.items():
        assert verdict == "ok" and relative < 1e-5, (name, max_abs, relative)
    assert "UniPCMultistepScheduler, replaced by FlowMatchEulerDiscreteScheduler(shift=3.0)" in out
    # Wan's FlowMatchEuler schedule is not the sampler's: the loop runs on the pipeline's.
    assert "the sampler's Euler update runs on the pipeline's sigmas" in out
    assert "PASSED" in out


def test_hunyuan_video_pipeline_matches(capsys, hunyuan_dir):
    status, lines, out = run_check(capsys, "hunyuan_video", hunyuan_dir)
    assert status == 0
    assert set(lines) == {"a", "a mask", "b", "c", "d"}
    for name, (max_abs, relative, verdict) in lines.items():
        assert verdict == "ok" and relative < 1e-5, (name, max_abs, relative)
    assert "is set to the pipeline's CLIP pooled caption vector for (b) and (c)" in out
    assert "euler_sample runs" in out


def failing(lines: dict) -> set[str]:
    return {name for name, (_, _, verdict) in lines.items() if verdict == "FAILED"}


def test_wan_timestep_scale_off_fails(capsys, wan_dir, monkeypatch):
    forward = WanOmniDenoiser.forward

    def off_by_a_thousandth(self, noisy, timesteps, *args, **kwargs):
        return forward(self, noisy, timesteps * 0.999, *args, **kwargs)

    monkeypatch.setattr(WanOmniDenoiser, "forward", off_by_a_thousandth)
    status, lines, out = run_check(capsys, "wan", wan_dir)
    assert status == 1
    assert failing(lines) == {"b", "c"}
    assert "FAILED: b)" in out and "FAILED: c)" in out


def test_wan_vae_normalisation_wrong_fails(capsys, wan_dir, monkeypatch):
    """Decoding with std where the pipeline divides by 1 / std."""

    def std_for_inverse(self, latents):
        mean, inverse_std = self._mean_and_inverse_std(latents)
        return latents * inverse_std + mean

    monkeypatch.setattr(WanVAE, "denormalize", std_for_inverse)
    status, lines, _ = run_check(capsys, "wan", wan_dir)
    assert status == 1
    assert failing(lines) == {"d"}


def test_wan_text_padded_at_the_end_fails(capsys, wan_dir, monkeypatch):
    """Caption states at the end of the padded text: Wan's text cross-attention has no
    positions, so only the embeddings' line (a) sees it."""
    pad = WanOmniDenoiser._text

    def padded_at_the_end(self, text, text_mask, text_on, dtype):
        return pad(self, text, text_mask, text_on, dtype).roll(8, dims=1)

    monkeypatch.setattr(WanOmniDenoiser, "_text", padded_at_the_end)
    status, lines, _ = run_check(capsys, "wan", wan_dir)
    assert status == 1
    assert failing(lines) == {"a"}


def test_wan_text_padded_short_fails(capsys, wan_dir, monkeypatch):
    """Fewer zero rows than the pipeline pads: each is a key of the text cross-attention."""
    pad = WanOmniDenoiser._text

    def padded_short(self, text, text_mask, text_on, dtype):
        return pad(self, text, text_mask, text_on, dtype)[:, :-8]

    monkeypatch.setattr(WanOmniDenoiser, "_text", padded_short)
    status, lines, out = run_check(capsys, "wan", wan_dir)
    assert status == 1
    assert failing(lines) == {"a", "b", "c"}
    assert "a) text embeddings, zero-padded to 56 as the wrapper pads (shape (1, 56, 32)" in out


def test_wan_caption_without_end_token_fails(capsys, wan_dir, monkeypatch):
    tokenize = TextEncoder.tokenize

    def without_end_token(self, captions):
        ids, mask = tokenize(self, captions)
        return ids[:, :-1], mask[:, :-1]

    monkeypatch.setattr(TextEncoder, "tokenize", without_end_token)
    status, lines, _ = run_check(capsys, "wan", wan_dir)
    assert status == 1
    assert failing(lines) == {"a", "b", "c"}


def test_hunyuan_text_crop_off_by_one_fails(capsys, hunyuan_dir, monkeypatch):
    """Our encoder keeps the template's last token, the pipeline crops it."""
    init_template = TextEncoder._init_template

    def crop_one_less(self, cfg):
        init_template(self, cfg)
        self.crop_start -= 1

    monkeypatch.setattr(TextEncoder, "_init_template", crop_one_less)
    status, lines, _ = run_check(capsys, "hunyuan_video", hunyuan_dir)
    assert status == 1
    assert {"a", "a mask"} <= failing(lines)


def test_hunyuan_pooled_vector_ignored_fails(capsys, hunyuan_dir, monkeypatch):
    """A wrapper whose pooled vector does not reach the base (zeros instead)."""
    forward = HunyuanOmniDenoiser.forward

    def zero_pooled(self, *args, **kwargs):
        kept = self.pooled_text.detach().clone()
        self.pooled_text.data.zero_()
        try:
            return forward(self, *args, **kwargs)
        finally:
            self.pooled_text.data.copy_(kept)

    monkeypatch.setattr(HunyuanOmniDenoiser, "forward", zero_pooled)
    status, lines, _ = run_check(capsys, "hunyuan_video", hunyuan_dir)
    assert status == 1
    assert failing(lines) == {"b", "c"}


def test_hunyuan_vae_scaling_wrong_fails(capsys, hunyuan_dir, monkeypatch):
    monkeypatch.setattr(HunyuanVideoVAE, "denormalize", lambda self, latents: latents)
    status, lines, _ = run_check(capsys, "hunyuan_video", hunyuan_dir)
    assert status == 1
    assert failing(lines) == {"d"}


def test_wrong_family_and_missing_directory_are_named(wan_dir, tmp_path):
    with pytest.raises(SystemExit, match="holds a WanPipeline.*use family=wan"):
        check.main(["family=hunyuan_video", f"pipeline={wan_dir}"])
    with pytest.raises(SystemExit, match="no model_index.json"):
        check.main(["family=wan", f"pipeline={tmp_path}"])
    with pytest.raises(SystemExit, match="family='sd3'"):
        check.main(["family=sd3", f"pipeline={wan_dir}"])
    with pytest.raises(SystemExit, match="(?s)'step' not in.*the keys are family, pipeline"):
        check.main(["family=wan", f"pipeline={wan_dir}", "step=3"])
