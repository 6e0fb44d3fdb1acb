import pytest
import torch

from omni_train.data.pose import keypoint_heatmaps
from omni_train.diffusion.config import DiffusionConfig
from omni_train.diffusion.sampler import (
    Guidance,
    denoiser_model_fn,
    euler_sample,
    generate_long_video,
    guidance_schedule,
    guided_velocity,
    inference_timesteps,
    segment_heatmaps,
    segment_starts,
    task_flags,
)
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.encoders import build_frozen_encoders


def noise(seed=0, frames=3):
    return torch.randn(2, 4, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_guidance_anneals_linearly_from_start_to_end():
    schedule = guidance_schedule(Guidance(4.0, 2.0, 3.0, 1.0), steps=5)
    assert schedule == [(4.0, 3.0), (3.5, 2.5), (3.0, 2.0), (2.5, 1.5), (2.0, 1.0)]
    assert guidance_schedule(Guidance(4.0, 2.0, 3.0, 1.0), steps=1) == [(4.0, 3.0)]
    cfg = DiffusionConfig(cfg_text=5.0, cfg_text_end=2.0, cfg_audio=6.0, cfg_audio_end=3.0)
    assert Guidance.from_config(cfg) == Guidance(5.0, 2.0, 6.0, 3.0)


def test_inference_times_run_from_noise_to_data_on_the_shifted_schedule():
    times = inference_timesteps(4, shift=1.0)
    assert times.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = inference_timesteps(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted.diff() < 0).all()
    assert shifted[2] == pytest.approx(0.75)


def test_exact_velocity_field_lands_on_the_data():
    target = noise(seed=1)

    def straight_line(x, t, text_on, audio_on):  # v of the path through target
        return (x - target) / t.view(-1, 1, 1, 1, 1)

    out = euler_sample(straight_line, noise(), steps=3, shift=2.0, guidance=Guidance())
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)


def affine_model(x, t, text_on, audio_on):
    """A velocity that depends on x, t and both flags, to tell guided combinations apart."""
    shape = (-1, 1, 1, 1, 1)
    text = text_on.to(x.dtype).view(shape)
    audio = audio_on.to(x.dtype).view(shape)
    return 0.3 * x * t.view(shape) + 1.0 + 2.0 * text + 5.0 * audio * (1 + x)


def test_unit_guidance_is_plain_conditional_euler():
    x = noise()
    times = inference_timesteps(4, 2.0)
    expected = x
    on = torch.ones(2, dtype=torch.bool)
    for i in range(4):
        t = torch.full((2,), float(times[i]))
        expected = expected + float(times[i + 1] - times[i]) * affine_model(expected, t, on, on)
    out = euler_sample(affine_model, x, steps=4, shift=2.0, guidance=Guidance())
    torch.testing.assert_close(out, expected)


def test_guided_velocity_combines_the_three_passes():
    x, t = noise(), torch.full((2,), 0.6)
    on, off = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    v_u, v_t, v_ta = (affine_model(x, t, a, b) for a, b in [(off, off), (on, off), (on, on)])
    expected = v_u + 3.0 * (v_t - v_u) + 2.5 * (v_ta - v_t)
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return affine_model(*args)

    torch.testing.assert_close(guided_velocity(counted, x, t, 3.0, 2.5), expected)
    assert calls == [6]  # one batched call
    torch.testing.assert_close(guided_velocity(counted, x, t, 3.0, 2.5, batched=False), expected)
    assert calls == [6, 2, 2, 2]


def test_motion_latents_stay_clean_at_every_step():
    x, motion = noise(), noise(seed=7, frames=2)[:, :, :1]
    seen = []

    def model_fn(x, t, text_on, audio_on):
        seen.append(x[:, :, :1].clone())
        return torch.ones_like(x)

    out = euler_sample(model_fn, x, 3, 1.0, Guidance(2.0, 1.0, 2.0, 1.0), motion_latents=motion)
    assert [frame.shape[0] for frame in seen] == [6, 6, 2]  # the last step has unit scales
    for frame in seen:
        torch.testing.assert_close(frame, motion.repeat(frame.shape[0] // 2, 1, 1, 1, 1))
    torch.testing.assert_close(out[:, :, :1], motion)
    torch.testing.assert_close(out[:, :, 1:], x[:, :, 1:] - 1.0)


def test_denoiser_model_fn_switches_only_text_and_audio():
    calls = []

    def fake_denoiser(x, t, text, text_mask, ref, audio, pose, active, num_motion_latents):
        calls.append((x.shape[0], text.shape[0], ref.shape[0], audio.shape[0], active))
        return torch.zeros_like(x)

    active = {n: torch.tensor([True]) for n in ("text", "ref", "audio", "pose")}
    model_fn = denoiser_model_fn(
        fake_denoiser,
        torch.zeros(1, 3, 8),
        torch.ones(1, 3, dtype=torch.bool),
        torch.zeros(1, 4, 1, 4, 4),
        torch.zeros(1, 9, 6),
        None,
        active,
        num_motion_latents=1,
    )
    x = torch.zeros(3, 4, 3, 4, 4)
    model_fn(
        x, torch.ones(3), torch.tensor([False, True, True]), torch.tensor([False, False, True])
    )
    batch, text_batch, ref_batch, audio_batch, flags = calls[0]
    assert batch == text_batch == ref_batch == audio_batch == 3
    assert flags["text"].tolist() == [False, True, True]
    assert flags["audio"].tolist() == [False, False, True]
    assert flags["ref"].tolist() == [True] * 3 and flags["pose"].tolist() == [True] * 3


def test_segment_plan_overlaps_by_the_motion_frames():
    assert segment_starts(17, 17, 5) == [0]
    assert segment_starts(29, 17, 5) == [0, 12]
    assert segment_starts(30, 17, 5) == [0, 12, 24]
    with pytest.raises(ValueError):
        segment_starts(30, 5, 5)


class RecordingEncoders:
    """The real frozen encoders, with every video encode/decode call recorded."""

    def __init__(self, encoders):
        self.inner = encoders
        self.encoded, self.decoded, self.audio_frames = [], [], []

    def encode_video(self, video):
        latents = self.inner.encode_video(video)
        self.encoded.append((video.clone(), latents.clone()))
        return latents

    def decode_video(self, latents):
        video = self.inner.decode_video(latents)
        self.decoded.append(video.clone())
        return video

    def encode_text(self, captions):
        return self.inner.encode_text(captions)

    def encode_audio(self, waveform, num_frames):
        self.audio_frames.append((waveform.shape[-1], num_frames))
        return self.inner.encode_audio(waveform, num_frames)


def test_long_video_joins_segments_through_motion_frames():
    torch.manual_seed(0)
    cfg = ModelConfig()
    encoders = RecordingEncoders(build_frozen_encoders(cfg))
    denoiser = build_denoiser(cfg).eval()
    with torch.no_grad():
        denoiser.backbone.final_layer.linear.weight.normal_(std=0.05)
    motion_inputs = []
    forward = denoiser.forward

    def recording_forward(noisy, *args, num_motion_latents=0, **kwargs):
        motion_inputs.append((num_motion_latents, noisy[:, :, :num_motion_latents].clone()))
        return forward(noisy, *args, num_motion_latents=num_motion_latents, **kwargs)

    denoiser.forward = recording_forward
    diffusion = DiffusionConfig(sampling_steps=2, cfg_text=2.0, cfg_audio=2.0)
    fps, total, segment = 25.0, 13, 9
    video = generate_long_video(
        denoiser,
        encoders,
        torch.rand(1, 3, 32, 32) * 2 - 1,
        torch.randn(16_000),
        "a person",
        fps,
        total,
        segment,
        diffusion,
        torch.Generator().manual_seed(0),
    )
    assert video.shape == (1, 3, total, 32, 32)
    assert len(encoders.decoded) == 2  # segments start at frames 0 and 4
    first, second = encoders.decoded
    # segment 2's motion latents: the VAE re-encoding of segment 1's last 5 frames ...
    reencoded_frames, motion = encoders.encoded[-1]
    torch.testing.assert_close(reencoded_frames, first[:, :, -5:].clamp(-1, 1))
    assert motion.shape[2] == 2
    # ... given clean to the denoiser at every step of segment 2 (3 guided passes batched)
    second_calls = [m for m in motion_inputs if m[0] > 0]
    assert len(second_calls) == diffusion.sampling_steps
    for count, seen in second_calls:
        assert count == 2
        torch.testing.assert_close(seen, motion.repeat(3, 1, 1, 1, 1))
    # the join drops segment 2's first 5 (duplicate) frames
    torch.testing.assert_close(video[:, :, :9], first.clamp(-1, 1))
    torch.testing.assert_close(video[:, :, 9:], second[:, :, 5:].clamp(-1, 1))
    # each segment's audio covers its own 9 frames at 25 fps
    assert encoders.audio_frames == [(5760, 9), (5760, 9)]


def test_task_flags_turn_on_every_weaker_condition():
    def on(task, caption=True):
        return {n for n, f in task_flags(task, caption, "cpu").items() if bool(f)}

    assert on("text") == {"text", "ref"}
    assert on("audio") == {"text", "ref", "audio"}
    assert on("pose") == {"text", "ref", "audio", "pose"}
    assert on("pose", caption=False) == {"ref", "audio", "pose"}
    with pytest.raises(ValueError, match="task="):
        task_flags("video", True, "cpu")


def test_segment_heatmaps_render_the_segment_frames_and_blank_past_the_end():
    keypoints = torch.rand(6, 17, 3)
    keypoints[..., 2] = 1.0
    maps = segment_heatmaps(keypoints, 4, 5, 16, 12, 2.0)
    assert maps.shape == (1, 17, 5, 16, 12)
    expected = keypoint_heatmaps(keypoints[4:6], 16, 12, 2.0).permute(1, 0, 2, 3)
    torch.testing.assert_close(maps[0, :, :2], expected)
    assert maps[0, :, 2:].abs().sum() == 0


def run_task(task, keypoints=None, audio=None):
    """generate_long_video of a tiny model with the denoiser's inputs recorded per call."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    encoders = RecordingEncoders(build_frozen_encoders(cfg))
    denoiser = build_denoiser(cfg).eval()
    calls = []
    forward = denoiser.forward

    def recording_forward(noisy, t, text, mask, ref, audio_f, pose, active, **kwargs):
        calls.append({"audio": audio_f, "pose": pose, "active": active})
        return forward(noisy, t, text, mask, ref, audio_f, pose, active, **kwargs)

    denoiser.forward = recording_forward
    diffusion = DiffusionConfig(sampling_steps=1, cfg_text=1.0, cfg_audio=1.0)
    generate_long_video(
        denoiser,
        encoders,
        torch.zeros(1, 3, 32, 32),
        audio,
        "a person",
        25.0,
        13,
        9,
        diffusion,
        torch.Generator().manual_seed(0),
        task=task,
        keypoints=keypoints,
        pose_sigma=2.0,
    )
    return calls, encoders


def test_text_task_encodes_no_audio_and_turns_audio_and_pose_off():
    calls, encoders = run_task("text")
    assert len(calls) == 2 and encoders.audio_frames == []
    for call in calls:
        assert call["audio"] is None and call["pose"] is None
        assert [bool(call["active"][c]) for c in ("text", "ref", "audio", "pose")] == [
            True,
            True,
            False,
            False,
        ]


def test_pose_task_gives_each_segment_its_own_heatmaps():
    keypoints = torch.rand(13, 17, 3)
    keypoints[..., 2] = 1.0
    calls, encoders = run_task("pose", keypoints=keypoints, audio=torch.randn(16_000))
    assert encoders.audio_frames == [(5760, 9), (5760, 9)]
    for call, start in zip(calls, (0, 4), strict=True):
        assert all(bool(flag) for flag in call["active"].values())
        expected = keypoint_heatmaps(keypoints[start : start + 9], 32, 32, 2.0)
        torch.testing.assert_close(call["pose"], expected.permute(1, 0, 2, 3)[None])
    with pytest.raises(ValueError, match="keypoints"):
        run_task("pose", audio=torch.randn(16_000))
