"""Damaged and unusual real-world media through the shard pipeline (data_pipelines.decoding):
every case is sharded with its damage recorded, or rejected with a reason; nothing crashes,
the timeline stays aligned, phone video comes out upright, and a damaged audio packet leaves
the audio track in place. The files are damaged at packet level by
data_pipelines/damaged_media.py, which proves each file's damage with plain PyAV."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from data_pipelines import damaged_media as dm
from data_pipelines.config import ShardConfig
from data_pipelines.samples import SourceResult, process_source

FPS = 25.0
IMAGE_ONLY = {"image_quality": {"_target_": "data_pipelines.annotators.image.ImageQuality"}}


def _config(**overrides) -> ShardConfig:
    base = dict(
        input_dir="in",
        output_dir="out",
        fps=FPS,
        clip_seconds=1.0,
        min_clip_seconds=0.5,
        max_side=160,
        crf=0,
        annotators=IMAGE_ONLY,
    )
    return ShardConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dm.MediaCase]:
    return dm.make_all(tmp_path_factory.mktemp("damaged"))


@pytest.fixture(scope="module")
def results(cases) -> dict[str, SourceResult]:
    return {name: process_source(case.path, name, _config()) for name, case in cases.items()}


def _frames(sample) -> np.ndarray:
    with av.open(io.BytesIO(sample.mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _audio(sample) -> np.ndarray:
    with av.open(io.BytesIO(sample.mp4)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        pieces = [
            f.to_ndarray().reshape(-1)
            for frame in container.decode(audio=0)
            for f in resampler.resample(frame)
        ]
    return np.concatenate(pieces)


def _damage_total(result: SourceResult, key: str) -> float:
    return sum(sample.meta["damage"][key] for sample in result.samples)


def test_every_case_is_sharded_or_rejected_with_a_reason(cases, results):
    for name, result in results.items():
        rows = result.rejects
        assert result.samples or rows, name
        assert all(row["reason"] for row in rows), (name, rows)
        for sample in result.samples:
            damage = sample.meta["damage"]
            assert set(damage) == {
                "video_packets_dropped",
                "video_seconds_dropped",
                "audio_packets_dropped",
                "audio_seconds_dropped",
                "timestamp_jumps",
            }
    # Only a file whose index is gone is unreadable; everything else gives clips.
    unreadable = {name for name, r in results.items() if not r.samples}
    assert unreadable == {"truncated_moov_at_end"}
    assert results["truncated_moov_at_end"].rejects[0]["reason"] == "unreadable"


@pytest.mark.parametrize("codec", ["aac", "ac3", "mp3"])
def test_a_damaged_audio_packet_keeps_the_track_and_is_counted(cases, results, codec):
    case, result = cases[f"corrupt_audio_{codec}"], results[f"corrupt_audio_{codec}"]
    assert result.rejects == []
    assert all(sample.meta["has_audio"] for sample in result.samples)
    dropped = _damage_total(result, "audio_packets_dropped")
    if codec == "mp3":
        # MP3 frames carry no checksum: two of the three damaged frames decode to noise that
        # no decoder can tell from sound; the one that fails to decode is counted.
        assert dropped >= 1
    else:
        assert dropped >= case.audio.damage.packets
    lost = _damage_total(result, "audio_seconds_dropped")
    span = sum(end - start for start, end in case.audio.damage.spans)
    assert 0 < lost <= 2 * span + 0.05
    for sample in result.samples:  # the damage is reported by the clip it falls in
        meta = sample.meta
        inside = any(meta["start"] <= s < meta["end"] for s, _ in case.audio.damage.spans)
        if not inside:
            assert meta["damage"]["audio_packets_dropped"] == 0, meta


@pytest.mark.parametrize("which", ["frames", "keyframe"])
def test_damaged_video_packets_are_counted_and_their_clip_rejected(cases, results, which):
    case, result = cases[f"corrupt_video_{which}"], results[f"corrupt_video_{which}"]
    damaged = [row for row in result.rejects if row["reason"] == "damaged"]
    assert len(damaged) == 1 and "video_packets_dropped" in damaged[0]["detail"]
    first_damage = case.video.damage.spans[0][0] - case.video.start
    assert damaged[0]["start"] <= first_damage < damaged[0]["end"]
    # The clips before and after are kept, undamaged; frames hold their place in time.
    assert len(result.samples) == 2
    for sample in result.samples:
        assert sample.meta["damage"]["video_packets_dropped"] == 0
        frames = _frames(sample)
        start = round(sample.meta["start"] * FPS)
        assert [dm.read_frame_index(f) for f in frames] == list(range(start, start + len(frames)))


def test_a_lenient_threshold_keeps_the_damaged_clip_with_its_damage(cases):
    case = cases["corrupt_video_keyframe"]
    result = process_source(case.path, "k", _config(max_damaged_fraction=1.0))
    assert result.rejects == []
    damage = [s.meta["damage"] for s in result.samples if s.meta["damage"]["video_packets_dropped"]]
    assert len(damage) == 1
    # The damaged keyframe fails; the frames that depend on it never come out either.
    assert damage[0]["video_packets_dropped"] >= 2
    frames = [_frames(s) for s in result.samples]
    indices = [dm.read_frame_index(f) for clip in frames for f in clip]
    assert len(indices) == sum(s.meta["num_frames"] for s in result.samples)
    held = [a for a, b in zip(indices, indices[1:], strict=False) if a == b]
    assert held, "the last good frame is held over the lost ones"


def _marker_corner(rgb: np.ndarray) -> str:
    red = (rgb[..., 0] > 160) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    ys, xs = np.nonzero(red)
    height, width = red.shape
    return ("top" if ys.mean() < height / 2 else "bottom") + (
        "-left" if xs.mean() < width / 2 else "-right"
    )


def test_rotation_metadata_turns_frames_as_a_player_shows_them(cases, results):
    # The files store a landscape picture with a marker top-left; the phone's "rotate" tag
    # tells a player to turn it clockwise by 90 (or 270) degrees for display.
    expected = {"rotated_90": "top-right", "rotated_270": "bottom-left"}
    for name, corner in expected.items():
        width, height = cases[name].video.display_size
        assert height > width  # portrait phone video
        for sample in results[name].samples:
            assert (sample.meta["width"], sample.meta["height"]) == (96, 160)
            frames = _frames(sample)
            assert {_marker_corner(f) for f in frames} == {corner}, name


@pytest.mark.parametrize(
    "name",
    [
        "pixel_10bit",
        "pixel_yuv444",
        "pixel_odd_size",
        "container_avi",
        "container_mkv",
        "container_mov",
        "container_webm",
        "variable_frame_rate",
    ],
)
def test_formats_and_containers_give_the_frame_shown_at_each_time(cases, results, name):
    case, result = cases[name], results[name]
    assert result.rejects == [] and result.samples
    if name == "pixel_odd_size":  # 175 x 97: kept at full size (sides made even) to read it
        result = process_source(case.path, name, _config(max_side=256))
        assert {(s.meta["width"], s.meta["height"]) for s in result.samples} == {(174, 96)}
    times = np.array(case.video.frame_times) - case.video.start
    for sample in result.samples:
        meta = sample.meta
        frames = _frames(sample)
        for k, frame in enumerate(frames):
            distance = np.abs(times - (meta["start"] + k / FPS))
            nearest = set(np.flatnonzero(distance <= distance.min() + 1e-6))  # ties: either
            assert dm.read_frame_index(frame) in nearest, (name, meta["start"] + k / FPS)


@pytest.mark.parametrize("name", ["timestamp_jump_forward", "timestamp_jump_backward"])
def test_a_timestamp_jump_is_closed_up_counted_and_starts_a_clip(cases, results, name):
    result = results[name]
    assert result.rejects == []
    assert _damage_total(result, "timestamp_jumps") == 1
    frames = [dm.read_frame_index(f) for s in result.samples for f in _frames(s)]
    # No seconds of a held frame where the jump was: the content runs on, frame by frame.
    assert max(np.diff(frames)) <= 2
    span = sum(s.meta["end"] - s.meta["start"] for s in result.samples)
    assert span < 4.0


def test_surround_audio_is_downmixed_with_the_centre_channel(cases, results):
    for name in ("surround_ac3", "surround_aac"):
        for sample in results[name].samples:
            assert sample.meta["has_audio"]
            rms = float(np.sqrt(np.mean(_audio(sample) ** 2)))
            assert rms > 0.02, name


@pytest.mark.parametrize("name", ["audio_late", "audio_early", "audio_longer", "audio_shorter"])
def test_audio_stays_aligned_with_the_video(cases, results, name):
    case, result = cases[name], results[name]
    offset = case.audio_offset
    for sample in result.samples:
        audio = _audio(sample)
        start = sample.meta["start"]
        # Pitch of the second half of the clip's first 0.5 s on the source timeline.
        t = start + 0.3
        if not offset <= t - case.audio.start < offset + case.audio.duration - 0.5:
            continue  # no tone there
        piece = audio[round(0.3 * 16000) : round(0.5 * 16000)]
        spectrum = np.abs(np.fft.rfft(piece * np.hanning(len(piece))))
        found = np.argmax(spectrum) * 16000 / len(piece)
        assert abs(found - dm.tone_frequency(t - offset + case.audio.start)) < 15, (name, start)
    if name == "audio_shorter":  # silence after the track ends, not a stretched track
        last = _audio(result.samples[-1])
        assert np.abs(last[round(0.2 * 16000) :]).max() < 0.01
    if name == "audio_late":
        first = _audio(result.samples[0])
        assert np.abs(first[: round(0.4 * 16000)]).max() < 0.01  # silence before it starts
        assert np.abs(first[round(0.55 * 16000) : round(0.9 * 16000)]).max() > 0.05
