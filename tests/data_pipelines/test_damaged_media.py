"""Each generated case really has the property its ground truth states, checked with PyAV."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data_pipelines import damaged_media as dm

# decoder response to each damaged packet, in packet order (seeded, so fixed)
AUDIO_DAMAGE_OUTCOMES = {
    "aac": ("raises", "raises", "raises"),
    "ac3": ("garbage", "garbage", "garbage"),
    "mp3": ("garbage", "garbage", "raises"),
}

DECODER_CODECS = {"mp3float": "mp3"}  # PyAV names the decoder, not the format


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dm.MediaCase]:
    return dm.make_all(tmp_path_factory.mktemp("cases"))


def _payloads(path: Path, kind: str) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        return [bytes(p) for p in container.demux(stream) if p.size]


def _decode_each_packet(path: Path, kind: str) -> list[np.ndarray | None]:
    """Per packet: its decoded samples/pixels, or None when the decoder raised."""
    results = []
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        for packet in container.demux(stream):
            if not packet.size:
                continue
            try:
                frames = stream.decode(packet)
            except av.InvalidDataError:
                results.append(None)
                continue
            arrays = [
                f.to_ndarray() if kind == "audio" else f.to_ndarray(format="rgb24") for f in frames
            ]
            results.append(np.concatenate(arrays, axis=-1) if arrays else np.zeros(0))
    return results


def _decoded_video(path: Path) -> list[tuple[float, int, av.VideoFrame]]:
    """(time, drawn frame index, frame) of every decoded frame; raising packets are skipped."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames += stream.decode(packet)
            except av.InvalidDataError:
                continue
    return [
        (float(f.pts * f.time_base), dm.read_frame_index(f.to_ndarray(format="rgb24")), f)
        for f in frames
    ]


def _decoded_audio(path: Path) -> tuple[float, np.ndarray, str]:
    """(first frame time, (channels, samples) float, layout name)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(audio=0))
    samples = np.concatenate([f.to_ndarray() for f in frames], axis=1)
    return float(frames[0].pts * frames[0].time_base), samples, frames[0].layout.name


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------- 1. corrupt packets


@pytest.mark.parametrize("codec", ["aac", "ac3", "mp3"])
def test_corrupt_audio_damages_exactly_the_stated_packets(cases, codec, tmp_path):
    case = cases[f"corrupt_audio_{codec}"]
    clean = dm.make_corrupt_audio(tmp_path, codec, damaged_packets=0).path
    damage = case.audio.damage
    assert damage.packets == 3 and case.audio.codec == codec
    damaged, original = _payloads(case.path, "audio"), _payloads(clean, "audio")
    assert len(damaged) == len(original)
    differing = tuple(i for i, (a, b) in enumerate(zip(damaged, original, strict=True)) if a != b)
    assert differing == damage.packet_indices
    assert _payloads(case.path, "video") == _payloads(clean, "video")
    layout = [p for p in dm.packet_layout(case.path) if p.stream_type == "audio"]
    assert tuple((layout[i].start, layout[i].end) for i in differing) == damage.spans
    assert all(0.6 < start < 1.4 for start, _ in damage.spans)  # middle of the 2 s track

    decoded, reference = (
        _decode_each_packet(case.path, "audio"),
        _decode_each_packet(clean, "audio"),
    )
    first = damage.packet_indices[0]
    assert all(np.array_equal(decoded[i], reference[i]) for i in range(first))
    outcomes = []
    for i in damage.packet_indices:
        if decoded[i] is None:
            outcomes.append("raises")
        else:
            assert np.abs(decoded[i] - reference[i]).max() > 0.05
            outcomes.append("garbage")
    assert tuple(outcomes) == AUDIO_DAMAGE_OUTCOMES[codec]


def test_corrupt_video_frames_raise_and_spread_to_the_next_keyframe(cases, tmp_path):
    case = cases["corrupt_video_frames"]
    clean = dm.make_corrupt_video(tmp_path, damaged_packets=0).path
    damage = case.video.damage
    damaged, original = _payloads(case.path, "video"), _payloads(clean, "video")
    differing = tuple(i for i, (a, b) in enumerate(zip(damaged, original, strict=True)) if a != b)
    assert differing == damage.packet_indices == (30, 38, 46)
    assert damage.spans == ((1.2, 1.24), (1.52, 1.56), (1.84, 1.8800000000000001))
    assert all(end == 2.0 for _, end in damage.affected_spans)
    layout = [p for p in dm.packet_layout(case.path) if p.stream_type == "video"]
    assert not any(layout[i].keyframe for i in differing)
    decoded = _decode_each_packet(case.path, "video")
    assert [i for i, frame in enumerate(decoded) if frame is None] == list(differing)
    indices = [index for _, index, _ in _decoded_video(case.path)]
    assert indices[:30] == list(range(30))  # untouched before the first damaged packet
    assert len(indices) == 75 - 3


def test_corrupt_keyframe_loses_its_whole_group(cases, tmp_path):
    case = cases["corrupt_video_keyframe"]
    damage = case.video.damage
    assert damage.packet_indices == (25,) and damage.spans == ((1.0, 1.04),)
    assert damage.affected_spans == ((1.0, 2.0),)
    # the demuxer flags keyframes by parsing the payload, so ask the undamaged twin
    clean = dm.make_corrupt_video(tmp_path, damaged_packets=0).path
    layout = [p for p in dm.packet_layout(clean) if p.stream_type == "video"]
    assert [p.index for p in layout if p.keyframe] == [0, 25, 50]
    decoded = _decode_each_packet(case.path, "video")
    assert decoded[25] is None
    # FFmpeg drops the P-frames that follow until its reference recovery (frame 33), then
    # shows concealed frames; the stated affected span covers up to the next keyframe
    indices = [index for _, index, _ in _decoded_video(case.path)]
    assert indices == list(range(25)) + list(range(33, 75))


# ---------------------------------------------------------------- 2. truncated tails


def test_truncated_faststart_keeps_the_head(cases):
    case = cases["truncated_faststart"]
    first_lost = case.video.damage.packet_indices[0]
    assert case.video.damage.packet_indices == tuple(range(first_lost, 75))
    assert case.video.damage.spans == ((first_lost / 25, 3.0),)
    decoded = _decode_each_packet(case.path, "video")
    assert len(decoded) == first_lost + 1  # the packet cut in half is still demuxed
    assert decoded[-1] is None
    indices = [index for _, index, _ in _decoded_video(case.path)]
    assert indices == list(range(first_lost))


def test_truncated_moov_at_end_is_undecodable(cases):
    case = cases["truncated_moov_at_end"]
    assert not case.video.decodable and not case.audio.decodable
    with pytest.raises(av.InvalidDataError):
        av.open(str(case.path))


def test_truncated_matroska_drops_the_cut_packet(cases):
    case = cases["truncated_matroska"]
    first_lost = case.video.damage.packet_indices[0]
    assert case.video.damage.packet_indices == tuple(range(first_lost, 75))
    indices = [index for _, index, _ in _decoded_video(case.path)]
    assert indices == list(range(first_lost))
    audio_lost = case.audio.damage.packet_indices[0]
    assert len(_payloads(case.path, "audio")) == audio_lost


# ---------------------------------------------------------------- 3. timestamps


@pytest.mark.parametrize(
    ("name", "container", "jump_at", "after"),
    [
        ("timestamp_jump_forward", "mp4", 1.0, 6.0),
        ("timestamp_jump_backward", "matroska", 1.0, 0.4),
    ],
)
def test_timestamp_jumps(cases, name, container, jump_at, after):
    case = cases[name]
    assert case.container == container and case.audio is None
    decoded = _decoded_video(case.path)
    times = tuple(round(t, 6) for t, _, _ in decoded)
    assert times == tuple(round(t, 6) for t in case.video.frame_times)
    assert [index for _, index, _ in decoded] == list(range(50))
    assert times[24] == pytest.approx(jump_at - 0.04) and times[25] == pytest.approx(after)


def test_variable_frame_rate_alternates_durations(cases):
    case = cases["variable_frame_rate"]
    decoded = _decoded_video(case.path)
    times = np.array([t for t, _, _ in decoded])
    steps = np.round(np.diff(times), 6)
    assert list(steps) == [0.04 if i % 2 == 0 else 0.02 for i in range(len(steps))]
    assert [index for _, index, _ in decoded] == list(range(60))
    assert case.video.duration == pytest.approx(1.8) and case.video.fps == pytest.approx(100 / 3)


# ---------------------------------------------------------------- 4. rotation


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotation_side_data_and_upright_pattern(cases, rotation):
    case = cases[f"rotated_{rotation}"]
    assert case.video.rotation == rotation
    assert case.video.coded_size == (160, 96) and case.video.display_size == (96, 160)
    for _, _, frame in _decoded_video(case.path)[:3]:
        # PyAV reports counter-clockwise degrees; the phone tag is clockwise
        assert frame.rotation == {90: -90, 270: 90}[rotation]
        stored = frame.to_ndarray(format="rgb24")
        assert marker_top_left_only_when_upright(stored)
        upright = np.rot90(stored, k=frame.rotation // 90)
        assert upright.shape[1::-1] == case.video.display_size
        rotated_back = np.rot90(upright, k=-frame.rotation // 90)
        assert np.array_equal(rotated_back, stored)


def marker_top_left_only_when_upright(stored: np.ndarray) -> bool:
    """The stored (unrotated) picture is the upright pattern; any quarter turn moves it."""
    return dm.marker_is_top_left(stored) and not any(
        dm.marker_is_top_left(np.rot90(stored, k)) for k in (1, 2, 3)
    )


# ---------------------------------------------------------------- 5. pixel formats, sizes


@pytest.mark.parametrize(
    ("kind", "codec", "pix_fmt", "size"),
    [
        ("10bit", "h264", "yuv420p10le", (160, 96)),
        ("yuv444", "h264", "yuv444p", (160, 96)),
        ("odd_size", "vp9", "yuv420p", (175, 97)),
    ],
)
def test_pixel_formats_and_sizes(cases, kind, codec, pix_fmt, size):
    case = cases[f"pixel_{kind}"]
    assert (case.video.codec, case.video.pix_fmt, case.video.coded_size) == (codec, pix_fmt, size)
    with av.open(str(case.path)) as container:
        context = container.streams.video[0].codec_context
        assert (context.name, context.pix_fmt, context.width, context.height) == (
            codec,
            pix_fmt,
            *size,
        )
    decoded = _decoded_video(case.path)
    assert {f.format.name for _, _, f in decoded} == {pix_fmt}
    assert [index for _, index, _ in decoded] == list(range(50))


# ---------------------------------------------------------------- 6. containers, 5.1


@pytest.mark.parametrize(
    ("kind", "format_name", "video_codec", "audio_codec"),
    [
        ("avi", "avi", "mpeg4", "pcm_s16le"),
        ("mkv", "matroska,webm", "h264", "ac3"),
        ("mov", "mov,mp4,m4a,3gp,3g2,mj2", "h264", "aac"),
        ("webm", "matroska,webm", "vp9", "opus"),
    ],
)
def test_containers_open_with_stated_codecs(cases, kind, format_name, video_codec, audio_codec):
    case = cases[f"container_{kind}"]
    assert (case.video.codec, case.audio.codec) == (video_codec, audio_codec)
    with av.open(str(case.path)) as container:
        assert container.format.name == format_name
        assert container.streams.video[0].codec.name == video_codec
        decoder = container.streams.audio[0].codec.name
        assert DECODER_CODECS.get(decoder, decoder) == audio_codec
    decoded = _decoded_video(case.path)
    assert [index for _, index, _ in decoded] == list(range(50))
    assert [round(t, 6) for t, _, _ in decoded] == [round(i / 25, 6) for i in range(50)]
    _, samples, _ = _decoded_audio(case.path)
    window = samples[0, 4800 : 4800 + 19200]  # 0.1 .. 0.5 s: first tone step
    assert _dominant_hz(window, 48_000) == pytest.approx(dm.tone_frequency(0.2), abs=2.5)


@pytest.mark.parametrize("codec", ["ac3", "aac"])
def test_surround_tone_only_in_the_centre(cases, codec):
    case = cases[f"surround_{codec}"]
    expected = {"ac3": "5.1(side)", "aac": "5.1"}[codec]
    assert case.audio.layout == expected and case.audio.tone_channel == dm.CENTRE_CHANNEL == 2
    _, samples, layout = _decoded_audio(case.path)
    assert layout == expected and samples.shape[0] == 6
    rms = np.sqrt((samples[:, 4800:-4800] ** 2).mean(axis=1))
    assert rms[2] == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert np.delete(rms, 2).max() < 1e-3


# ---------------------------------------------------------------- 7. offsets, lengths


def _tone_onset(path: Path) -> float:
    start, samples, _ = _decoded_audio(path)
    loud = np.nonzero(np.abs(samples[0]) > 0.25)[0]
    return start + loud[0] / 48_000


@pytest.mark.parametrize(("name", "offset"), [("audio_late", 0.5), ("audio_early", -0.5)])
def test_audio_offsets(cases, name, offset):
    case = cases[name]
    assert case.audio_offset == offset
    decoded = _decoded_video(case.path)
    assert decoded[0][0] == pytest.approx(case.video.start, abs=1e-9)
    assert decoded[0][1] == 0
    # the tone begins when stated: within 2 ms (the sine needs a few samples to get loud)
    assert _tone_onset(case.path) == pytest.approx(case.audio.start, abs=0.002)


@pytest.mark.parametrize(("name", "seconds"), [("audio_longer", 3.0), ("audio_shorter", 1.0)])
def test_stream_lengths(cases, name, seconds):
    case = cases[name]
    assert case.video.duration == 2.0 and case.audio.duration == seconds
    assert len(_decoded_video(case.path)) == 50
    _, samples, _ = _decoded_audio(case.path)
    # AAC decodes whole 1024-sample frames: the padding of the last one stays
    assert samples.shape[1] == -(-int(seconds * 48_000) // 1024) * 1024


# ---------------------------------------------------------------- whole set


def _digests(cases: dict[str, dm.MediaCase]) -> dict[str, str]:
    return {name: hashlib.sha256(c.path.read_bytes()).hexdigest() for name, c in cases.items()}


def test_generation_is_deterministic_and_fast(cases, tmp_path):
    began = time.perf_counter()
    again = dm.make_all(tmp_path)
    assert time.perf_counter() - began < 10.0
    assert _digests(again) == _digests(cases)
    for name, case in again.items():
        assert case.path.stat().st_size < 250_000, name  # the PCM AVI is the largest


def test_long_source_streams_a_talk(tmp_path):
    long = dm.make_long_source(tmp_path, minutes=0.05, width=160, height=120, fps=20)
    case = long.case
    assert case.video.display_size == (160, 120) and case.video.duration == 3.0
    decoded = _decoded_video(case.path)
    assert [index for _, index, _ in decoded] == list(range(60))
    _, samples, _ = _decoded_audio(case.path)
    assert samples.shape[1] == -(-3 * 48_000 // 1024) * 1024
    assert long.write_seconds > 0


def test_frame_index_round_trips():
    for index in (0, 1, 1234, (1 << dm.INDEX_BITS) - 1):
        assert dm.read_frame_index(dm.pattern_frame(index, 175, 97)) == index


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: dm.make_corrupt_audio(d, "opus"), "codec 'opus'"),
        (lambda d: dm.make_truncated_tail(d, "zip"), "layout 'zip'"),
        (lambda d: dm.make_truncated_tail(d, fraction=1.5), "fraction 1.5"),
        (lambda d: dm.make_rotated(d, 45), "rotation 45"),
        (lambda d: dm.make_timestamp_jump(d, -2.0), "backward jump"),
        (lambda d: dm.make_rotated(d / "missing"), "create it first"),
    ],
)
def test_bad_input_names_the_fix(tmp_path, call, message):
    with pytest.raises((ValueError, NotADirectoryError), match=message):
        call(tmp_path)
