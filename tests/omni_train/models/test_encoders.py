from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from omni_train.models.audio_encoder import AudioEncoder, resample_features
from omni_train.models.config import AudioEncoderConfig, ModelConfig, TextEncoderConfig
from omni_train.models.encoders import build_frozen_encoders, frozen_is_random
from omni_train.models.text_encoder import TextEncoder
from omni_train.models.weights import WeightsMismatch, load_strict, save_safetensors


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig()).eval()


@pytest.fixture(scope="module")
def audio_encoder() -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder(AudioEncoderConfig()).eval()


def test_text_shapes_and_mask(text_encoder):
    with torch.no_grad():
        embeddings, mask = text_encoder(["a man talks", "hi", ""])
    assert embeddings.shape == (3, mask.shape[1], text_encoder.dim) and text_encoder.dim == 32
    assert mask.dtype == torch.bool
    # Byte-level tokens plus end-of-sequence; the empty caption keeps just that one token.
    assert mask.sum(dim=1).tolist() == [12, 3, 1]
    assert embeddings.isfinite().all()
    assert torch.count_nonzero(embeddings[~mask]) == 0


def test_text_truncates_at_max_length():
    encoder = TextEncoder(TextEncoderConfig(max_length=8)).eval()
    with torch.no_grad():
        _, mask = encoder(["a caption far longer than eight bytes"])
    assert mask.shape == (1, 8) and bool(mask.all())


def test_text_is_deterministic_and_independent_of_batch(text_encoder):
    with torch.no_grad():
        alone, alone_mask = text_encoder(["a woman sings"])
        again, _ = text_encoder(["a woman sings"])
        batched, _ = text_encoder(["a woman sings", "and a much longer second caption"])
    assert torch.equal(alone, again)
    length = alone_mask.shape[1]
    torch.testing.assert_close(batched[:1, :length], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_frames", [1, 5, 17, 33])
def test_audio_feature_shape(audio_encoder, num_frames):
    waveform = torch.randn(2, 16_000)
    with torch.no_grad():
        features = audio_encoder(waveform, num_frames)
    assert features.shape == (2, num_frames, AudioEncoderConfig().feature_dim)
    assert features.isfinite().all()


@pytest.mark.parametrize("samples", [1, 160, 8_000])
def test_audio_silence_and_short_clips_are_finite(audio_encoder, samples):
    with torch.no_grad():
        silent = audio_encoder(torch.zeros(1, samples), 5)
    assert silent.shape == (1, 5, 64) and silent.isfinite().all()


def test_audio_normalisation_ignores_gain(audio_encoder):
    waveform = torch.randn(1, 8_000)
    with torch.no_grad():
        quiet, loud = audio_encoder(waveform * 0.01, 9), audio_encoder(waveform * 3.0, 9)
    torch.testing.assert_close(quiet, loud, rtol=1e-4, atol=1e-4)


def test_resampling_maps_frame_centres_to_feature_times():
    # One second of 50 Hz features that count their own index, resampled to 25 fps: frame j is
    # centred at (j + 0.5) / 25 s, which is feature position 2j + 0.5.
    features = torch.arange(50.0).reshape(1, 50, 1)
    frames = resample_features(features, 25)
    expected = (2 * torch.arange(25.0) + 0.5).clamp(max=49.0).reshape(1, 25, 1)
    torch.testing.assert_close(frames, expected)


def test_pretrained_text_dir_gives_identical_outputs(text_encoder, tmp_path):
    text_encoder.model.save_pretrained(tmp_path)
    text_encoder.tokenizer.save_pretrained(tmp_path)
    loaded = TextEncoder(TextEncoderConfig(pretrained=str(tmp_path))).eval()
    captions = ["same words", ""]
    with torch.no_grad():
        expected, expected_mask = text_encoder(captions)
        got, got_mask = loaded(captions)
    assert torch.equal(got_mask, expected_mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_pretrained_audio_dir_gives_identical_outputs(audio_encoder, tmp_path):
    audio_encoder.model.save_pretrained(tmp_path)
    loaded = AudioEncoder(AudioEncoderConfig(pretrained=str(tmp_path))).eval()
    waveform = torch.randn(2, 6_400)
    with torch.no_grad():
        torch.testing.assert_close(loaded(waveform, 7), audio_encoder(waveform, 7))


def test_pretrained_size_mismatch_names_the_field(audio_encoder, tmp_path):
    audio_encoder.model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="audio_encoder.hidden_size"):
        AudioEncoder(AudioEncoderConfig(pretrained=str(tmp_path), hidden_size=48))


def test_frozen_encoders_stay_frozen_inside_a_training_parent():
    frozen = build_frozen_encoders(ModelConfig())
    parent = nn.ModuleDict({"frozen": frozen, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(module.training for module in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    video = torch.rand(1, 3, 5, 16, 16, requires_grad=True)
    latents = frozen.encode_video(video)
    assert latents.shape == (1, 4, 2, 2, 2) and not latents.requires_grad
    assert frozen.decode_video(latents).shape == (1, 3, 5, 16, 16)
    embeddings, mask = frozen.encode_text(["hello"])
    assert embeddings.shape[:2] == mask.shape
    assert frozen.encode_audio(torch.randn(1, 3_200), 5).shape == (1, 5, 64)


def test_vae_safetensors_round_trip_through_build(tmp_path):
    torch.manual_seed(1)
    source = build_frozen_encoders(ModelConfig())
    path = tmp_path / "vae.safetensors"
    save_safetensors(source.vae.state_dict(), path)
    cfg = ModelConfig()
    cfg.vae.pretrained = str(path)
    torch.manual_seed(2)
    rebuilt = build_frozen_encoders(cfg)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert torch.equal(rebuilt.encode_video(video), source.encode_video(video))


def test_vae_weights_of_another_size_are_refused(tmp_path):
    small = build_frozen_encoders(ModelConfig())
    path = tmp_path / "vae.safetensors"
    save_safetensors(small.vae.state_dict(), path)
    cfg = ModelConfig()
    cfg.vae = dataclasses.replace(cfg.vae, base_channels=8, pretrained=str(path))
    with pytest.raises(WeightsMismatch, match="VAE"):
        build_frozen_encoders(cfg)


def test_whole_frozen_state_round_trips(tmp_path):
    torch.manual_seed(3)
    source = build_frozen_encoders(ModelConfig())
    path = tmp_path / "frozen.safetensors"
    save_safetensors(source.state_dict(), path)
    torch.manual_seed(4)
    rebuilt = build_frozen_encoders(ModelConfig())
    load_strict(rebuilt, path, "frozen encoders")
    embeddings, _ = source.encode_text(["x"])
    assert torch.equal(rebuilt.encode_text(["x"])[0], embeddings)
    waveform = torch.randn(1, 1_600)
    assert torch.equal(rebuilt.encode_audio(waveform, 3), source.encode_audio(waveform, 3))


def test_frozen_is_random_until_all_three_are_pretrained():
    cfg = ModelConfig()
    assert frozen_is_random(cfg)
    cfg.vae.pretrained = "vae.safetensors"
    cfg.text_encoder.pretrained = "t5"
    assert frozen_is_random(cfg)
    cfg.audio_encoder.pretrained = "wav2vec2"
    assert not frozen_is_random(cfg)


def test_encoders_kept_in_bf16_take_and_give_float32():
    torch.manual_seed(0)
    encoders = build_frozen_encoders(ModelConfig())
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    wave = torch.randn(1, 3200)
    want_latents = encoders.encode_video(video)
    want_text, _ = encoders.encode_text(["a person talks"])
    encoders.to(torch.bfloat16)
    latents = encoders.encode_video(video)
    text, mask = encoders.encode_text(["a person talks"])
    audio = encoders.encode_audio(wave, 5)
    decoded = encoders.decode_video(latents)
    assert {latents.dtype, text.dtype, audio.dtype, decoded.dtype} == {torch.float32}
    assert next(encoders.parameters()).dtype == torch.bfloat16
    # bf16 storage and compute: close to the fp32 result, not equal to it.
    torch.testing.assert_close(latents, want_latents, rtol=0.05, atol=0.05)
    assert not torch.equal(latents, want_latents)
    torch.testing.assert_close(text, want_text, rtol=0.05, atol=0.05)
    assert mask.dtype == torch.bool
