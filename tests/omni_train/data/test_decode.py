from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_train.data import CorruptSample, DataConfig, decode_sample, keypoint_heatmaps

CFG = DataConfig(shards="unused", resolution=[16, 16], num_frames=9, fps=8.0)


def _levels(frames: torch.Tensor) -> np.ndarray:
    """Gray level (0-255) of each frame of a (3, T, H, W) or (3, H, W) tensor in [-1, 1]."""
    dims = (0, 2, 3) if frames.dim() == 4 else (0, 1, 2)
    return ((frames.mean(dim=dims) + 1) * 127.5).numpy()


def _raw(media, frames, fps=8.0, audio=None, keypoints=None, **meta):
    key = media.clip_key("clip.mp4")
    num_frames, height, width = frames.shape[:3]
    return {
        "__key__": key,
        "mp4": media.encode_mp4(frames, fps, audio),
        "json": media.meta_json(
            key, num_frames, fps, height, width, audio is not None, keypoints, **meta
        ),
    }


def test_shapes_ranges_and_metadata(media):
    raw = media.make_sample("a.mp4", num_frames=16, with_audio=True)
    out = decode_sample(raw, CFG, np.random.default_rng(0))
    assert out["video"].shape == (3, 9, 16, 16) and out["video"].dtype == torch.float32
    assert out["ref"].shape == (3, 16, 16)
    assert out["audio"].shape == (round(9 / 8.0 * 16_000),) and out["audio"].dtype == torch.float32
    assert out["keypoints"].shape == (9, 17, 3)
    for name in ("video", "ref"):
        assert out[name].min() >= -1 and out[name].max() <= 1
    assert out["video"].max() > 0  # frames brighten over the clip: not all black
    assert out["has_audio"] is True and out["audio"].abs().max() > 0.1
    assert out["key"] == raw["__key__"] and out["caption"] == "clip a.mp4"
    assert set(out["quality"]) >= {"text", "ref", "audio", "pose"}


def test_no_audio_and_no_keypoints_give_zeros(media):
    raw = media.make_sample("b.mp4", with_audio=False, with_keypoints=False)
    out = decode_sample(raw, CFG, np.random.default_rng(0))
    assert out["has_audio"] is False
    assert out["audio"].shape == (18_000,) and not out["audio"].any()
    assert out["keypoints"].shape == (9, 17, 3) and not out["keypoints"].any()


def test_window_is_consecutive_and_reference_lies_outside_it(media):
    raw = _raw(media, media.gray_frames(24, 24, 32))
    starts = set()
    for seed in range(8):
        out = decode_sample(raw, CFG, np.random.default_rng(seed))
        window = np.round(_levels(out["video"]) / 10).astype(int)
        assert np.array_equal(np.diff(window), np.ones(8, dtype=int))
        ref = round(float(_levels(out["ref"])) / 10)
        assert 0 <= ref < 24 and not window[0] <= ref <= window[-1]
        starts.add(int(window[0]))
    assert len(starts) > 1  # the start is drawn, not fixed


def test_reference_is_first_window_frame_when_clip_equals_window(media):
    raw = _raw(media, media.gray_frames(9, 24, 32))
    out = decode_sample(raw, CFG, np.random.default_rng(3))
    assert torch.allclose(out["ref"], out["video"][:, 0])


def test_other_clip_fps_is_resampled_by_nearest_frame(media):
    raw = _raw(media, media.gray_frames(32, 24, 32, step=7), fps=16.0)
    out = decode_sample(raw, CFG, np.random.default_rng(1))
    window = np.round(_levels(out["video"]) / 7).astype(int)
    assert np.array_equal(np.diff(window), np.full(8, 2))


def test_audio_covers_exactly_the_window(media):
    # A 440 Hz burst during source frame 12 (1.5 s to 1.625 s) of a silent 3 s track.
    t = np.arange(3 * 16_000) / 16_000
    audio = np.where((t >= 1.5) & (t < 1.625), 0.5 * np.sin(2 * np.pi * 440 * t), 0.0)
    raw = _raw(media, media.gray_frames(24, 24, 32), audio=audio)
    checked_inside = checked_outside = 0
    for seed in range(16):
        out = decode_sample(raw, CFG, np.random.default_rng(seed))
        start = round(float(_levels(out["video"])[0]) / 10)
        loud = np.flatnonzero(out["audio"].abs().numpy() > 0.1)
        if 4 <= start <= 11:  # burst fully inside the window
            onset = (12 - start) / 8.0
            assert abs(loud[0] / 16_000 - onset) < 0.005
            assert abs(loud[-1] / 16_000 - (onset + 0.125)) < 0.005
            checked_inside += 1
        elif start <= 2 or start >= 14:  # burst well outside
            assert loud.size == 0
            checked_outside += 1
    assert checked_inside and checked_outside


def test_keypoints_follow_resize_and_center_crop(media):
    # 48x24 clip -> resized to 32x16 -> 16x16 center crop drops 8 columns each side.
    frames = np.zeros((12, 24, 48, 3), np.uint8)
    frames[:, 10:14, 17:21] = 255  # a white square centred at x=19, y=12 (pixel-edge coords)
    keypoints = np.zeros((12, 17, 3), np.float32)
    keypoints[:, 0] = [19 / 48, 12 / 24, 1.0]
    keypoints[:, 1] = [2 / 48, 12 / 24, 1.0]  # cropped away
    raw = _raw(media, frames, keypoints=keypoints)
    out = decode_sample(raw, CFG, np.random.default_rng(0))

    joint = out["keypoints"][:, 0]
    assert torch.allclose(joint[:, :2], torch.tensor([(19 / 48 * 32 - 8) / 16, 0.5]), atol=1e-5)
    assert torch.all(joint[:, 2] == 1) and torch.all(out["keypoints"][:, 1, 2] == 0)
    weights = (out["video"][:, 0].mean(0) + 1).clamp(min=0) ** 4
    rows, cols = torch.meshgrid(torch.arange(16.0) + 0.5, torch.arange(16.0) + 0.5, indexing="ij")
    centroid = torch.stack([(weights * cols).sum(), (weights * rows).sum()]) / weights.sum()
    assert torch.allclose(centroid / 16, joint[0, :2], atol=0.5 / 16)


def test_heatmap_peaks_at_the_keypoint_and_hides_invisible_joints():
    keypoints = torch.tensor([[0.25, 0.75, 1.0], [0.5, 0.5, 0.0]])
    maps = keypoint_heatmaps(keypoints, 16, 16, sigma=1.5)
    assert maps.shape == (2, 16, 16)
    peak = divmod(int(maps[0].argmax()), 16)
    assert peak == (11, 3)  # row 0.75 * 16 - 0.5 -> 11.5 rounds to 11; column 3.5 -> 3
    assert not maps[1].any()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda raw: raw.update(mp4=b"definitely not an mp4"), "mp4"),
        (lambda raw: raw.pop("json"), "json"),
        (lambda raw: raw.update(json=b"{not json"), "JSON"),
        (lambda raw: raw.update(json=_with(raw, quality={"text": "great"})), "quality"),
        (lambda raw: raw.update(json=_with(raw, num_frames=4)), "shorter than a window"),
        (lambda raw: raw.update(json=_with(raw, keypoints=[[[0.5, 0.5, 1]]])), "keypoints"),
    ],
)
def test_bad_samples_raise_corrupt_sample_naming_key_and_reason(media, change, reason):
    raw = media.make_sample("c.mp4")
    change(raw)
    with pytest.raises(CorruptSample) as caught:
        decode_sample(raw, CFG, np.random.default_rng(0))
    assert caught.value.key == raw["__key__"] and reason in caught.value.reason


def test_json_claiming_more_frames_than_the_mp4_is_corrupt(media):
    raw = media.make_sample("d.mp4", num_frames=12)
    raw["json"] = _with(raw, num_frames=40, keypoints=None)
    with pytest.raises(CorruptSample, match="ends before frame"):
        for seed in range(4):  # some window must reach past the real 12 frames
            decode_sample(raw, CFG, np.random.default_rng(seed))


def _with(raw: dict, **fields) -> bytes:
    meta = json.loads(raw["json"])
    meta.update(fields)
    return json.dumps(meta).encode()


def test_real_clip_at_another_frame_rate_decodes(media):
    data = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "carphone.mp4"
    if not data.is_file():
        pytest.skip(f"real media folder absent ({data})")
    # carphone.mp4: 176x144, 29.97 fps, 120 frames, H.264, no audio.
    key = media.clip_key("carphone.mp4")
    raw = {
        "__key__": key,
        "mp4": data.read_bytes(),
        "json": media.meta_json(key, 120, 30000 / 1001, 144, 176, False),
    }
    cfg = DataConfig(shards="unused", resolution=[64, 64], num_frames=17, fps=8.0)
    out = decode_sample(raw, cfg, np.random.default_rng(0))
    assert out["video"].shape == (3, 17, 64, 64) and out["ref"].shape == (3, 64, 64)
    assert out["has_audio"] is False and out["audio"].shape == (34_000,)
    motion = (out["video"][:, 1:] - out["video"][:, :-1]).abs().mean()
    assert motion > 0.005  # distinct frames, a talking man, not one frame repeated
    assert out["video"].std() > 0.1
