"""The diffusers VAEs (model.vae=wan|hunyuan_video|cogvideox) behind the project's interface.

Tiny random-init configs stand in for the released weights. The references are computed here
from the diffusers VAE's own outputs and config values, written as the pipelines write them,
and, where a pipeline has the step as a method, by calling that method.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip(
    "diffusers",
    reason="diffusers is not installed (the foundation extra: pip install -e '.[foundation]')",
)

from omni_train.models.config import VAEConfig  # noqa: E402
from omni_train.models.encoders import build_frozen_encoders  # noqa: E402
from omni_train.models.foundation_vae import FAMILIES, WanVAE  # noqa: E402
from omni_train.testing import compose_train_config  # noqa: E402

TINY = {
    "wan": {"base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1},
    "hunyuan_video": {
        "block_out_channels": [8, 8, 8, 8],
        "layers_per_block": 1,
        "norm_num_groups": 4,
    },
    "cogvideox": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4},
}
FAMILY_NAMES = sorted(TINY)
# The tiny Wan VAE as Hydra overrides (diffusers_config is a dict: "+" adds its keys).
TINY_OVERRIDES = [
    "+model.vae.diffusers_config.base_dim=8",
    "+model.vae.diffusers_config.dim_mult=[1,1,1,1]",
    "+model.vae.diffusers_config.num_res_blocks=1",
]


def tiny_vae(family: str, seed: int = 0, **fields):
    torch.manual_seed(seed)
    fields.setdefault("diffusers_config", TINY[family])
    return FAMILIES[family].build(VAEConfig(latent_channels=16, **fields)).eval()


def clip(frames: int, batch: int = 2, height: int = 16, width: int = 24, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=generator) * 2 - 1


def latents_like(frames: int, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, frames, 2, 3, generator=generator)


def split_lengths(total: int, first: int, rest: int) -> list[int]:
    lengths = [min(first, total)]
    while sum(lengths) < total:
        lengths.append(min(rest, total - sum(lengths)))
    return lengths


# Shapes: 4x time (causal), 8x space, 16 channels.


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize(("frames", "latent_frames"), [(1, 1), (9, 3)])
@torch.no_grad()
def test_encode_decode_shapes(family, frames, latent_frames):
    vae = tiny_vae(family)
    latents = vae.encode(clip(frames))
    assert latents.shape == (2, 16, latent_frames, 2, 3)
    assert vae.decode(latents).shape == (2, 3, frames, 16, 24)


# Normalisation: the pipeline formulas on diffusers' own posterior mean and config values.


def reference_normalised(family, diffusers_vae, video):
    mean = diffusers_vae.encode(video).latent_dist.mode()
    config = diffusers_vae.config
    if family == "wan":  # pipeline_wan_i2v.py, WanImageToVideoPipeline.prepare_latents
        latents_mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        return (mean - latents_mean) * latents_std
    if family == "hunyuan_video":  # pipeline_hunyuan_video_image2video.py, prepare_latents
        return mean * config.scaling_factor
    # pipeline_cogvideox_video2video.py, prepare_latents (frames-first there; same values)
    return config.scaling_factor * mean.permute(0, 2, 1, 3, 4)


def reference_decoded(family, diffusers_vae, latents):
    config = diffusers_vae.config
    if family == "wan":  # pipeline_wan.py, WanPipeline.__call__
        latents_mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        z = latents / latents_std + latents_mean
    elif family == "hunyuan_video":  # pipeline_hunyuan_video.py, HunyuanVideoPipeline.__call__
        z = latents / config.scaling_factor
    else:  # pipeline_cogvideox.py, CogVideoXPipeline.decode_latents
        z = 1 / config.scaling_factor * latents
    return diffusers_vae.decode(z, return_dict=False)[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_encode_normalises_as_the_pipeline(family):
    vae = tiny_vae(family)
    video = clip(9)
    expected = reference_normalised(family, vae.vae, video)
    if family == "cogvideox":
        expected = expected.permute(0, 2, 1, 3, 4)  # back to this project's (B, C, F, H, W)
    torch.testing.assert_close(vae.encode(video), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_decode_denormalises_as_the_pipeline(family):
    vae = tiny_vae(family)
    latents = latents_like(3)
    torch.testing.assert_close(
        vae.decode(latents), reference_decoded(family, vae.vae, latents), rtol=0, atol=0
    )


def test_wan_statistics_are_per_channel_and_not_trivial():
    # The released Wan 2.1 statistics are the class defaults: a mean/std swap or a missing std
    # division moves every channel.
    config = tiny_vae("wan").vae.config
    assert len(config.latents_mean) == len(config.latents_std) == 16
    assert config.latents_std[0] == 2.8184 and config.latents_mean[0] == -0.7571


@torch.no_grad()
def test_wan_encode_equals_the_i2v_pipeline_condition():
    from diffusers import WanImageToVideoPipeline

    vae = tiny_vae("wan")
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae.vae, scheduler=None)
    image = clip(1, batch=1)[:, :, 0]  # the pipeline encodes one image for the whole batch
    _, condition = pipe.prepare_latents(
        image, 1, 16, 16, 24, num_frames=9, dtype=torch.float32, device=torch.device("cpu")
    )
    video_condition = torch.cat([image[:, :, None], image.new_zeros(1, 3, 8, 16, 24)], dim=2)
    # The condition is 4 mask channels, then the normalised latents.
    torch.testing.assert_close(condition[:, 4:], vae.encode(video_condition), rtol=0, atol=0)


@torch.no_grad()
def test_hunyuan_video_encode_equals_the_i2v_pipeline_image_latents():
    from diffusers import HunyuanVideoImageToVideoPipeline

    vae = tiny_vae("hunyuan_video")
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=None, vae=vae.vae, scheduler=None,
        text_encoder_2=None, tokenizer_2=None, image_processor=None,
    )  # fmt: skip
    image = clip(1, batch=1)[:, :, 0]  # the pipeline encodes image by image
    _, image_latents = pipe.prepare_latents(
        image, 1, 16, 16, 24, num_frames=9, dtype=torch.float32, device=torch.device("cpu")
    )
    torch.testing.assert_close(
        image_latents[:, :, :1], vae.encode(image[:, :, None]), rtol=0, atol=0
    )


@torch.no_grad()
def test_cogvideox_decode_equals_the_pipeline_decode_latents():
    from diffusers import CogVideoXPipeline

    vae = tiny_vae("cogvideox")
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae.vae, transformer=None, scheduler=None
    )
    latents = latents_like(3)
    frames_first = latents.permute(0, 2, 1, 3, 4)  # the pipeline's layout
    torch.testing.assert_close(
        vae.decode(latents), pipe.decode_latents(frames_first), rtol=0, atol=0
    )


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_denormalise_inverts_normalise(family):
    vae = tiny_vae(family)
    latents = latents_like(3)
    torch.testing.assert_close(vae.denormalize(vae.normalize(latents)), latents)


# Chunked encoding.


@pytest.mark.parametrize(
    ("family", "frames", "chunk_frames"),
    [
        ("wan", 17, 5),
        ("wan", 17, 9),
        ("wan", 13, 9),
        ("wan", 9, 17),
        ("cogvideox", 25, 9),
        ("cogvideox", 25, 17),
        ("cogvideox", 9, 17),
    ],
)
@torch.no_grad()
def test_chunked_encode_and_decode_equal_the_whole_clip(family, frames, chunk_frames):
    whole = tiny_vae(family)
    chunked = tiny_vae(family, chunk_frames=chunk_frames)
    video = clip(frames, batch=1)
    latents = whole.encode(video)
    pieces = list(chunked.encode_chunks(video))
    latent_chunk = (chunk_frames - 1) // 4
    lengths = split_lengths(latents.shape[2], latent_chunk + 1, latent_chunk)
    assert [piece.shape[2] for piece in pieces] == lengths
    torch.testing.assert_close(torch.cat(pieces, dim=2), latents, rtol=0, atol=0)
    torch.testing.assert_close(chunked.encode(video), latents, rtol=0, atol=0)

    frame_pieces = list(chunked.decode_chunks(latents))
    assert [piece.shape[2] for piece in frame_pieces] == split_lengths(
        frames, chunk_frames, chunk_frames - 1
    )
    decoded = whole.decode(latents)
    torch.testing.assert_close(torch.cat(frame_pieces, dim=2), decoded, rtol=0, atol=0)
    torch.testing.assert_close(chunked.decode(latents), decoded, rtol=0, atol=0)


@torch.no_grad()
def test_hunyuan_video_latents_depend_on_later_frames_but_wan_and_cogvideox_do_not():
    # Why HunyuanVideo takes no chunk_frames: its group norms pool over every frame encoded at
    # once. Wan is causal frame by frame, CogVideoX batch by batch (frames [0, 9) first).
    video = clip(17, batch=1)
    for family in FAMILY_NAMES:
        vae = tiny_vae(family)
        gap = (vae.encode(video[:, :, :9]) - vae.encode(video)[:, :, :3]).abs().max().item()
        if family == "hunyuan_video":
            assert gap > 1e-3, family
        else:
            assert gap == 0.0, family


def test_hunyuan_video_refuses_chunk_frames():
    with pytest.raises(ValueError, match="model.vae.chunk_frames=0"):
        tiny_vae("hunyuan_video", chunk_frames=9)


@pytest.mark.parametrize(("family", "chunk_frames"), [("wan", 6), ("wan", 1), ("cogvideox", 13)])
def test_chunk_frames_off_the_batch_grid_are_refused(family, chunk_frames):
    with pytest.raises(ValueError, match="chunk_frames must be 0 or 1 \\+"):
        tiny_vae(family, chunk_frames=chunk_frames)


def test_cogvideox_needs_one_plus_eight_k_frames():
    vae = tiny_vae("cogvideox")
    with pytest.raises(ValueError, match=r"1 \+ 8k frames.*use 9 or 17"):
        vae.encode(clip(13))
    with pytest.raises(ValueError, match=r"1 \+ 8k frames"):
        vae.decode(latents_like(4))


# Loading a diffusers directory.


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", ["vae_dir", "pipeline_dir"])
@torch.no_grad()
def test_save_pretrained_round_trip_gives_identical_outputs(family, layout, tmp_path):
    built = tiny_vae(family)
    vae_dir = tmp_path / "vae"
    built.vae.save_pretrained(vae_dir)
    pretrained = tmp_path if layout == "pipeline_dir" else vae_dir
    loaded = tiny_vae(family, seed=1, pretrained=str(pretrained), diffusers_config={})
    video = clip(9)
    latents = built.encode(video)
    torch.testing.assert_close(loaded.encode(video), latents, rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(latents), built.decode(latents), rtol=0, atol=0)


def test_loading_names_the_family_and_the_fix(tmp_path):
    tiny_vae("wan").vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="of AutoencoderKLWan, not of the AutoencoderKLCogVideoX"):
        tiny_vae("cogvideox", pretrained=str(tmp_path), diffusers_config={})
    with pytest.raises(ValueError, match="drop one of them"):
        tiny_vae("wan", pretrained=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.vae.pretrained=.*config.json"):
        tiny_vae("wan", pretrained=str(tmp_path / "missing"), diffusers_config={})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"diffusers_config": {"base_dims": 8}}, r"\['base_dims'\], which AutoencoderKLWan"),
        ({"latent_channels": 4}, "set model.vae.latent_channels=16"),
        ({"scaling_factor": 0.5}, "leave them at 1.0 and 0.0"),
        (
            {
                "diffusers_config": {
                    **TINY["wan"],
                    "dim_mult": [1] * 5,
                    "temperal_downsample": [0, 1, 1, 0],
                }
            },
            "16x in space",
        ),
    ],
)
def test_bad_wan_configs_fail_naming_the_fix(fields, message):
    cfg = VAEConfig(latent_channels=16, diffusers_config=TINY["wan"])
    for key, value in fields.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError, match=message):
        WanVAE.build(cfg)


# The project's build path.


def test_model_vae_wan_builds_the_frozen_encoders_and_encodes_a_batch(tmp_path):
    cfg, _ = compose_train_config(["model.vae=wan", *TINY_OVERRIDES, f"run_dir={tmp_path}"])
    assert cfg.model.vae.latent_channels == 16
    torch.manual_seed(0)
    encoders = build_frozen_encoders(cfg.model)
    assert isinstance(encoders.vae, WanVAE)
    assert not any(p.requires_grad for p in encoders.parameters())
    latents = encoders.encode_video(clip(9))
    assert latents.shape == (2, 16, 3, 2, 3)
    torch.testing.assert_close(latents, tiny_vae("wan").encode(clip(9)), rtol=0, atol=0)
    assert encoders.decode_video(latents).shape == (2, 3, 9, 16, 24)


@pytest.mark.parametrize(
    ("preset", "builder", "chunk_frames"),
    [
        # 7b's chunk_frames=17 stays where chunks equal the whole clip.
        ("wan", "build_wan_vae", 17),
        ("hunyuan_video", "build_hunyuan_video_vae", 0),
        ("cogvideox", "build_cogvideox_vae", 17),
    ],
)
def test_presets_compose_over_a_model_preset(preset, builder, chunk_frames, tmp_path):
    cfg, _ = compose_train_config(["model=7b", f"model.vae={preset}", f"run_dir={tmp_path}"])
    vae = cfg.model.vae
    assert vae._target_ == f"omni_train.models.foundation_vae.{builder}"
    assert (vae.latent_channels, vae.chunk_frames) == (16, chunk_frames)


@pytest.mark.slow
def test_encode_stage_writes_wan_latents_and_chunking_changes_no_byte(tmp_path):
    from data_pipelines.encode import EncodeConfig, run_encode
    from data_pipelines.testing import build_sample_shards, shard_members

    data = build_sample_shards(tmp_path, num_clips=2, seed=0)
    wan = ["model.vae=wan", *TINY_OVERRIDES]
    members = {}
    for chunk_frames in (0, 9):
        out = tmp_path / f"encoded_{chunk_frames}"
        overrides = ["experiment=smoke", *wan, f"model.vae.chunk_frames={chunk_frames}"]
        stats = run_encode(EncodeConfig(input_dir=str(data), output_dir=str(out)), overrides)
        assert stats["encoded"] > 0 and stats["rejected"] == 0
        members[chunk_frames] = shard_members(out)
    assert members[0].keys() == members[9].keys()
    for key, raw in members[0].items():
        latents = np.load(io.BytesIO(raw["latents.npy"]))
        assert latents.shape == (16, 5, 8, 8)  # smoke: 17 frames at 64x64
        assert np.load(io.BytesIO(raw["ref_latents.npy"])).shape == (16, 1, 8, 8)
        assert raw["latents.npy"] == members[9][key]["latents.npy"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_weights_check_script_finds_no_difference(family, tmp_path, capsys):
    from omni_train.models.check_foundation_vae import check, parse_args

    tiny_vae(family).vae.save_pretrained(tmp_path / "vae")
    args = ["--family", family, "--pretrained", str(tmp_path), "--frames", "9"]
    lines = check(parse_args([*args, "--height", "32", "--width", "48", "--device", "cpu"]))
    assert "latents (1, 16, 3, 4, 6)" in lines[0]
    gaps = [line for line in lines if "max |diff|" in line]
    assert len(gaps) == 3 and all(line.endswith("max |diff| 0") for line in gaps)
    assert "reconstruction PSNR" in capsys.readouterr().out
