from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from omni_train.contracts import latent_frames, pixel_frames
from omni_train.models.config import VAEConfig
from omni_train.models.vae import CausalVAE


@pytest.fixture(scope="module")
def vae() -> CausalVAE:
    torch.manual_seed(0)
    return CausalVAE(VAEConfig()).eval()


def clip(frames: int, size: int = 32, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


@pytest.mark.parametrize(("frames", "expected_latent"), [(1, 1), (5, 2), (17, 5)])
def test_encode_shape_compresses_8x_space_4x_time(vae, frames, expected_latent):
    with torch.no_grad():
        latents = vae.encode(clip(frames, size=64, batch=2))
    assert latents.shape == (2, 4, expected_latent, 8, 8)
    assert latent_frames(frames) == expected_latent
    assert pixel_frames(expected_latent) == frames


def test_decode_restores_pixel_shape(vae):
    latents = torch.randn(2, 4, 3, 4, 6)
    with torch.no_grad():
        video = vae.decode(latents)
    assert video.shape == (2, 3, 9, 32, 48)


@pytest.mark.parametrize("boundary", [0, 1, 2])
def test_latent_frames_ignore_later_pixel_frames(vae, boundary):
    video = clip(13)
    changed = video.clone()
    changed[:, :, 4 * boundary + 1 :] = clip(13, seed=1)[:, :, 4 * boundary + 1 :]
    with torch.no_grad():
        before, after = vae.encode(video), vae.encode(changed)
    torch.testing.assert_close(before[:, :, : boundary + 1], after[:, :, : boundary + 1])
    assert not torch.allclose(before[:, :, boundary + 1 :], after[:, :, boundary + 1 :])


def test_decoded_frames_ignore_later_latent_frames(vae):
    latents = torch.randn(1, 4, 3, 4, 4)
    changed = latents.clone()
    changed[:, :, 2] += 1.0
    with torch.no_grad():
        before, after = vae.decode(latents), vae.decode(changed)
    torch.testing.assert_close(before[:, :, :5], after[:, :, :5])
    assert not torch.allclose(before[:, :, 5:], after[:, :, 5:])


@pytest.mark.parametrize("frames", [2, 4, 6, 16])
def test_bad_frame_count_is_rejected_with_fix(vae, frames):
    with pytest.raises(ValueError, match=rf"got {frames}.*trim"):
        vae.encode(clip(frames))


@pytest.mark.parametrize(("height", "width"), [(36, 32), (32, 20)])
def test_bad_size_is_rejected(vae, height, width):
    with pytest.raises(ValueError, match=rf"{height}x{width}"):
        vae.encode(torch.zeros(1, 3, 5, height, width))


def test_encode_is_deterministic(vae):
    video = clip(9)
    with torch.no_grad():
        first, second = vae.encode(video), vae.encode(video)
    assert torch.equal(first, second)


def test_scaling_and_shift_are_inverted_by_decode(vae):
    scaled_cfg = dataclasses.replace(vae.cfg, scaling_factor=0.5, shift_factor=0.25)
    scaled = CausalVAE(scaled_cfg).eval()
    scaled.load_state_dict(vae.state_dict())
    video = clip(5)
    with torch.no_grad():
        plain, shifted = vae.encode(video), scaled.encode(video)
        torch.testing.assert_close(shifted, (plain - 0.25) * 0.5)
        torch.testing.assert_close(scaled.decode(shifted), vae.decode(plain))


@pytest.mark.parametrize("chunk_frames", [5, 9, 13])
def test_chunked_encoding_matches_whole_clip(vae, chunk_frames):
    chunked = CausalVAE(dataclasses.replace(vae.cfg, chunk_frames=chunk_frames)).eval()
    chunked.load_state_dict(vae.state_dict())
    video = clip(29, batch=2)
    with torch.no_grad():
        whole, pieces = vae.encode(video), chunked.encode(video)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)


def test_bad_chunk_size_is_rejected():
    with pytest.raises(ValueError, match="chunk_frames"):
        CausalVAE(VAEConfig(chunk_frames=8))


def chunked_copy(vae: CausalVAE, chunk_frames: int) -> CausalVAE:
    chunked = CausalVAE(dataclasses.replace(vae.cfg, chunk_frames=chunk_frames)).eval()
    chunked.load_state_dict(vae.state_dict())
    return chunked


@pytest.mark.parametrize("chunk_frames", [5, 9, 13])
def test_chunked_decoding_matches_whole_clip(vae, chunk_frames):
    chunked = chunked_copy(vae, chunk_frames)
    latents = torch.randn(2, 4, 8, 4, 4)  # 29 pixel frames: the last chunk is shorter
    with torch.no_grad():
        whole, pieces = vae.decode(latents), chunked.decode(latents)
    assert pieces.shape == whole.shape == (2, 3, 29, 32, 32)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)


def test_chunks_are_yielded_one_at_a_time_with_chunk_sized_pieces(vae):
    chunked = chunked_copy(vae, 9)
    with torch.no_grad():
        latent_pieces = list(chunked.encode_chunks(clip(25)))
        pixel_pieces = list(chunked.decode_chunks(torch.cat(latent_pieces, dim=2)))
    assert [p.shape[2] for p in latent_pieces] == [3, 2, 2]  # 9, 8, 8 pixel frames
    assert [p.shape[2] for p in pixel_pieces] == [9, 8, 8]


def cache_bytes_per_chunk(vae: CausalVAE, frames: int) -> list[int]:
    """Bytes held in the convolution caches after each chunk of a chunked encode + decode."""
    sizes = []
    original = vae.encoder.forward

    def recording(x, cache=None):
        out = original(x, cache)
        sizes.append(sum(t.numel() * t.element_size() for t in cache.values()))
        return out

    vae.encoder.forward = recording
    try:
        with torch.no_grad():
            for _ in vae.encode_chunks(clip(frames)):
                pass
    finally:
        del vae.encoder.forward
    return sizes


def test_memory_carried_between_chunks_does_not_grow_with_length(vae):
    chunked = chunked_copy(vae, 9)
    short, long = cache_bytes_per_chunk(chunked, 17), cache_bytes_per_chunk(chunked, 49)
    assert len(long) == 6 and len(short) == 2
    assert len(set(long[1:])) == 1 and long[1] == short[1]  # constant after the first chunk
    # Decoding keeps the same kind of cache: its size after each chunk is constant too.
    latents = torch.randn(1, 4, 13, 4, 4)
    seen = []
    original = chunked.decoder.forward

    def recording(z, cache=None):
        out = original(z, cache)
        seen.append(sum(t.numel() * t.element_size() for t in cache.values()))
        return out

    chunked.decoder.forward = recording
    try:
        with torch.no_grad():
            list(chunked.decode_chunks(latents))
    finally:
        del chunked.decoder.forward
    assert len(seen) == 6 and len(set(seen)) == 1


def test_forward_decodes_the_posterior_mean_or_a_seeded_sample():
    torch.manual_seed(0)
    model = CausalVAE(VAEConfig(base_channels=4)).eval()
    video = clip(5, size=16)
    with torch.no_grad():
        recon, mean, logvar = model(video, sample=False)
        expected_mean, expected_logvar = model.posterior(video)
        assert torch.equal(mean, expected_mean) and torch.equal(logvar, expected_logvar)
        assert torch.allclose(recon, model.decode(model.encode(video)), atol=1e-6)
        first, _, _ = model(video, torch.Generator().manual_seed(3))
        again, _, _ = model(video, torch.Generator().manual_seed(3))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        by_hand = model.decoder(mean + (0.5 * logvar).exp() * noise)
    assert torch.equal(first, again)
    assert torch.allclose(first, by_hand, atol=1e-6)
    assert not torch.allclose(first, recon, atol=1e-4)


def test_vae_file_metadata_brings_its_normalisation_when_the_config_leaves_defaults():
    from omni_train.models.vae import config_for_vae_file, vae_file_metadata

    trained = VAEConfig(latent_channels=8, base_channels=8)
    header = vae_file_metadata(trained, shift_factor=0.25, scaling_factor=2.5)
    fitted = config_for_vae_file(dataclasses.replace(trained), header, "vae.safetensors")
    assert (fitted.shift_factor, fitted.scaling_factor) == (0.25, 2.5)
    mine = dataclasses.replace(trained, scaling_factor=0.5)
    assert config_for_vae_file(mine, header, "f").scaling_factor == 0.5
    assert config_for_vae_file(mine, header, "f").shift_factor == 0.0
    assert config_for_vae_file(trained, {}, "f") == trained  # a plain state dict file


def test_vae_file_of_another_architecture_names_the_overrides():
    from omni_train.models.vae import config_for_vae_file, vae_file_metadata

    header = vae_file_metadata(
        VAEConfig(latent_channels=8, channel_mult=[1, 2, 4, 4]),
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    with pytest.raises(ValueError) as caught:
        config_for_vae_file(VAEConfig(), header, "run/vae.safetensors")
    message = str(caught.value)
    assert "run/vae.safetensors" in message
    assert "set: model.vae.latent_channels=8 model.vae.channel_mult=[1,2,4,4]" in message
    assert "base_channels" not in message


# --------------------------------------------------------------------------- patch shortcut
def test_patch_shortcut_is_off_by_default_and_adds_nothing():
    torch.manual_seed(0)
    plain = CausalVAE(VAEConfig(base_channels=4))
    assert plain.encoder.shortcut is None and plain.decoder.shortcut is None
    assert not any("shortcut" in name for name in plain.state_dict())
    # The networks alone: a shortcut model with zeroed shortcut weights reconstructs the same.
    with_shortcut = CausalVAE(VAEConfig(base_channels=4, patch_shortcut=True)).eval()
    missing, unexpected = with_shortcut.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("shortcut" in name for name in missing)
    for module in (with_shortcut.encoder.shortcut, with_shortcut.decoder.shortcut):
        torch.nn.init.zeros_(module.proj.weight)
        torch.nn.init.zeros_(module.proj.bias)
    video = clip(9, size=16)
    with torch.no_grad():
        assert torch.equal(
            with_shortcut(video, sample=False)[0], plain.eval()(video, sample=False)[0]
        )


def shortcut_only_vae(latent_channels: int = 2) -> CausalVAE:
    """A new shortcut VAE: its networks start as zero residuals, so encode and decode are the
    linear codec."""
    torch.manual_seed(0)
    return CausalVAE(
        VAEConfig(base_channels=4, latent_channels=latent_channels, patch_shortcut=True)
    ).eval()


def test_patch_shortcut_encodes_each_latents_pixel_block_linearly():
    model = shortcut_only_vae()
    proj = model.encoder.shortcut.proj
    weight, bias = proj.weight[:, :, 0, 0, 0], proj.bias  # (latent, 3 * 4 * 8 * 8)
    video = clip(9, size=16)
    with torch.no_grad():
        mean, _ = model.posterior(video)

    def block(frames: list[int], row: int, col: int) -> torch.Tensor:
        # Channel-major, then frame, then row and column within the 8x8 patch.
        pixels = video[0][:, frames, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8]
        return pixels.reshape(-1)

    for latent, frames in enumerate([[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]):
        for row, col in [(0, 0), (1, 0), (0, 1)]:
            expected = weight @ block(frames, row, col) / 256 + bias
            torch.testing.assert_close(mean[0, :, latent, row, col], expected)


def test_patch_shortcut_decodes_each_latent_to_its_pixel_block():
    model = shortcut_only_vae()
    proj = model.decoder.shortcut.proj
    with torch.no_grad():  # frame slots that differ (they start equal)
        proj.weight.normal_(generator=torch.Generator().manual_seed(1))
        proj.bias.normal_(generator=torch.Generator().manual_seed(2))
    weight, bias = proj.weight[:, :, 0, 0, 0], proj.bias  # (3 * 4 * 8 * 8, latent)
    latents = torch.randn(1, 2, 3, 2, 2)
    with torch.no_grad():
        video = model.decode(latents)
    assert video.shape == (1, 3, 9, 16, 16)
    row, col = 1, 0
    for latent in range(3):
        block = (weight @ latents[0, :, latent, row, col] + bias).reshape(3, 4, 8, 8)
        if latent == 0:  # the clip's first frame: the block's frames averaged
            frames, block = [0], block.mean(dim=1, keepdim=True)
        else:
            frames = [4 * latent - 3 + k for k in range(4)]
        got = video[0][:, frames, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8]
        torch.testing.assert_close(got, block)


def test_patch_shortcut_starts_with_the_same_map_for_every_frame_of_a_block():
    model = shortcut_only_vae(latent_channels=5)  # channels 3 and 4 start random
    encode = model.encoder.shortcut.proj.weight.view(5, 3, 4, 64)
    decode = model.decoder.shortcut.proj.weight.view(3, 4, 64, 5)
    decode_bias = model.decoder.shortcut.proj.bias.view(3, 4, 64)
    for k in range(1, 4):
        assert torch.equal(encode[:, :, k], encode[:, :, 0])
        assert torch.equal(decode[:, k], decode[:, 0])
        assert torch.equal(decode_bias[:, k], decode_bias[:, 0])
    # So a still clip codes like its single first frame: single-frame steps train it all.
    still = clip(1, size=16).expand(-1, -1, 5, -1, -1)
    with torch.no_grad():
        latents = model.encode(still)
        torch.testing.assert_close(latents[:, :, 1], latents[:, :, 0])
        video = model.decode(latents)
    torch.testing.assert_close(video[:, :, 1:5], video[:, :, :1].expand(-1, -1, 4, -1, -1))


def test_patch_shortcut_starts_as_block_averaging():
    model = shortcut_only_vae(latent_channels=4)
    video = clip(9, size=16)
    padded = torch.cat([video[:, :, :1].expand(-1, -1, 3, -1, -1), video], dim=2)
    block_means = torch.nn.functional.avg_pool3d(padded, (4, 8, 8))  # (1, 3, 3, 2, 2)
    with torch.no_grad():
        mean, _ = model.posterior(video)
        torch.testing.assert_close(mean[:, :3], block_means)
        decoded = model.decode(mean)
    spread = block_means.repeat_interleave(4, dim=2).repeat_interleave(8, dim=3)
    spread = spread.repeat_interleave(8, dim=4)[:, :, 3:]
    torch.testing.assert_close(decoded, spread)


@pytest.mark.parametrize("chunk_frames", [5, 9])
def test_patch_shortcut_chunked_coding_matches_whole_clip(chunk_frames):
    torch.manual_seed(0)
    whole = CausalVAE(VAEConfig(base_channels=4, patch_shortcut=True)).eval()
    chunked = chunked_copy(whole, chunk_frames)
    video = clip(21, size=16)
    with torch.no_grad():
        latents = whole.encode(video)
        torch.testing.assert_close(chunked.encode(video), latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            chunked.decode(latents), whole.decode(latents), rtol=0, atol=1e-5
        )


def test_patch_shortcut_keeps_latents_causal():
    torch.manual_seed(0)
    model = CausalVAE(VAEConfig(base_channels=4, patch_shortcut=True)).eval()
    video = clip(9, size=16)
    changed = video.clone()
    changed[:, :, 5:] = clip(9, size=16, seed=1)[:, :, 5:]
    with torch.no_grad():
        before, after = model.encode(video), model.encode(changed)
    torch.testing.assert_close(before[:, :, :2], after[:, :, :2])
    assert not torch.allclose(before[:, :, 2], after[:, :, 2])


def test_vae_file_header_carries_the_patch_shortcut():
    from omni_train.models.vae import META_ARCH, config_for_vae_file, vae_file_metadata

    header = vae_file_metadata(VAEConfig(patch_shortcut=True), 0.0, 1.0)
    assert json.loads(header[META_ARCH])["patch_shortcut"] is True
    with pytest.raises(ValueError, match="set: model.vae.patch_shortcut=True"):
        config_for_vae_file(VAEConfig(), header, "f")
    # A header written before the knob existed describes a VAE without the shortcut.
    old = {META_ARCH: json.dumps({"latent_channels": 4})}
    assert config_for_vae_file(VAEConfig(), old, "f") == VAEConfig()
    with pytest.raises(ValueError, match="patch_shortcut: file False, config True"):
        config_for_vae_file(VAEConfig(patch_shortcut=True), old, "f")
