from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from data_pipelines import voice
from data_pipelines.config import SampleCorpusConfig, VoiceActivityConfig
from data_pipelines.measures import loudness_dbfs, speech_fraction
from data_pipelines.sample_corpus import make_sample_corpus
from data_pipelines.scenes import plan_clip, render_frame
from data_pipelines.testing import decode_mp4

REPO_ROOT = Path(__file__).resolve().parents[2]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path):
    for name in ("a", "b"):
        make_sample_corpus(SampleCorpusConfig(out_dir=str(tmp_path / name), num_clips=3, seed=7))
    make_sample_corpus(SampleCorpusConfig(out_dir=str(tmp_path / "c"), num_clips=3, seed=8))
    first, second, other = (_files(tmp_path / n) for n in "abc")
    assert first == second
    assert first.keys() == other.keys()
    assert first["clip00_wave.mp4"] != other["clip00_wave.mp4"]


def test_clips_have_video_audio_and_sidecars(sample):
    videos = sorted(p for p in sample.corpus.glob("clip*.mp4"))
    assert len(videos) == 4
    sizes = set()
    for video in videos:
        frames, audio, rate = decode_mp4(video.read_bytes())
        with av.open(str(video)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
            assert float(container.streams.video[0].average_rate) == 25.0
        assert rate == 16000 and audio is not None
        assert 2.5 <= len(frames) / 25 <= 5.0
        sizes.add(frames.shape[1:3])
        pose = json.loads(video.with_name(video.stem + ".pose.json").read_text())
        keypoints = np.asarray(pose["frames"])
        assert pose["format"] == "coco17" and pose["fps"] == 25.0
        assert keypoints.shape == (len(frames), 17, 3)
        assert keypoints[..., :2].min() >= 0 and keypoints[..., :2].max() <= 1
        caption = video.with_suffix(".txt")
        if "closeup" in video.name:
            assert not caption.exists()  # the clip kind that tests the "no caption" path
        else:
            assert caption.read_text().startswith("a person in a")
    assert len(sizes) == 4


def test_silent_clip_is_silent_and_speaking_clips_speak(sample):
    for video in sorted(sample.corpus.glob("clip*.mp4")):
        _, audio, rate = decode_mp4(video.read_bytes())
        if "walk" in video.name:
            assert loudness_dbfs(audio) < -55
            assert speech_fraction(audio, rate, VoiceActivityConfig()) < 0.05
        else:
            assert loudness_dbfs(audio) > -35
            assert speech_fraction(audio, rate, VoiceActivityConfig()) > 0.3


def test_keypoints_are_where_the_figure_is_drawn():
    plan = plan_clip(0, seed=0)
    frame, keypoints = render_frame(plan, 0.5, mouth_open=0.0)
    height, width = frame.shape[:2]
    x, y, visible = keypoints[0]  # nose: on the face, so skin coloured
    assert visible == 1.0
    pixel = frame[int(y * height), int(x * width)].astype(float)
    assert np.abs(pixel - np.asarray(plan.style.skin)).max() < 25


def test_broken_file_is_not_a_video(sample):
    with pytest.raises(av.error.FFmpegError):
        av.open(str(sample.corpus / "broken.mp4"))


def test_espeak_is_used_when_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "espeak-ng"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import sys, wave, numpy as np\n"
        "path = sys.argv[sys.argv.index('-w') + 1]\n"
        "t = np.arange(22050) / 22050\n"
        "pcm = (8000 * np.sin(2 * np.pi * 150 * t)).astype(np.int16)\n"
        "w = wave.open(path, 'wb'); w.setnchannels(1); w.setsampwidth(2)\n"
        "w.setframerate(22050); w.writeframes(pcm.tobytes()); w.close()\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    audio = voice.speech(np.random.default_rng(0), 2.0, 16000, "auto")
    assert audio.shape == (32000,)
    assert np.abs(audio[:3000]).max() == 0  # the 0.2 s lead-in
    assert loudness_dbfs(audio[4000:18000]) > -15  # 1 s of the fake 150 Hz "speech"
    assert loudness_dbfs(audio[20000:]) < -60


def test_forcing_a_missing_espeak_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(FileNotFoundError, match="voice=synthetic"):
        voice.speech(np.random.default_rng(0), 1.0, 16000, "espeak")


def test_cli_prints_what_it_wrote(tmp_path):
    out = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.sample_corpus", f"out_dir={out}", "num_clips=1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"{out / 'clip00_wave.mp4'}" in result.stdout
    assert "broken.mp4" in result.stdout
    assert (out / "clip00_wave.pose.json").is_file()
