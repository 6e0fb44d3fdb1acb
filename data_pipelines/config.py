"""Structured configs of the data pipeline entry points (defaults live here once)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TagThresholds:
    """Every threshold that turns measured scores into condition tiers (see tags.py)."""

    # text: a caption with at least this many characters is "strong"; shorter or none is
    # "weak" (the clip still trains the text task as an unconditional / empty-prompt sample).
    text_strong_min_chars: int = 1
    # ref: variance of the Laplacian of the grey frames (0-255 scale).
    ref_strong_sharpness: float = 60.0
    ref_weak_sharpness: float = 20.0
    # ref "strong" needs motion: mean absolute frame difference (0-1 scale) or, with
    # keypoints, mean joint displacement per frame (normalised units). A nearly frozen clip
    # teaches little beyond copying the reference (the paper's motion-amplitude filter).
    ref_strong_motion: float = 0.004
    ref_strong_keypoint_motion: float = 0.002
    # audio: fraction of the clip's 10 ms hops that the energy detector marks as voice.
    audio_weak_speech_fraction: float = 0.1
    audio_strong_speech_fraction: float = 0.35
    # audio: clips quieter than this (RMS over the clip, dBFS) are "none".
    audio_min_loudness_dbfs: float = -50.0
    # ref "strong" with optical flow: mean flow magnitude per frame, fraction of the diagonal.
    ref_strong_flow_motion: float = 0.002
    # ref "strong" needs a person where one was looked for: the best of face_fraction,
    # head_visibility (fractions of frames) and pose_visibility (mean fraction of joints).
    ref_strong_person: float = 0.15
    # audio strong: a face seen in this fraction of the sampled frames (face detector), or,
    # when no detector ran, head keypoints (nose and both eyes) visible in it.
    audio_strong_face_fraction: float = 0.9
    audio_strong_head_visibility: float = 0.9
    # audio strong: lip-sync proxy (mouth opening or mouth darkness vs. the audio envelope,
    # Pearson r at the best offset; see annotators/lipsync.py) ...
    audio_strong_lip_sync: float = 0.3
    # ... and its chance p (``lip_sync_p``: how often lips that do not follow the audio reach
    # that r, given the clip's length, how smooth both signals are and the offsets searched)
    # at most this. r alone passes half of all unrelated voices on 3 s clips at 8 fps; with
    # p <= 0.01 as well, 0-4 % of them, while every own-voice clip of the sample corpus stays
    # strong (p <= 0.005). 1.0 drops the check (and passes scores stored without a p).
    audio_strong_lip_sync_max_p: float = 0.01
    # audio strong with SyncNet weights configured: SyncNet confidence (Sync-C) instead.
    audio_strong_sync_c: float = 3.0
    # pose: mean fraction of the 17 joints visible per frame.
    pose_strong_visibility: float = 0.85
    pose_weak_visibility: float = 0.4
    # pose: median joint acceleration (normalised units per frame^2); larger means jitter.
    pose_strong_max_jitter: float = 0.02
    pose_weak_max_jitter: float = 0.06

    def __post_init__(self) -> None:
        if not 0.0 < self.audio_strong_lip_sync_max_p <= 1.0:
            raise ValueError(
                f"thresholds.audio_strong_lip_sync_max_p={self.audio_strong_lip_sync_max_p} is "
                "not a probability: pass one in (0, 1]; 1.0 drops the lip-sync chance check"
            )


@dataclass
class VoiceActivityConfig:
    """Energy-based voice activity detection over 16 kHz mono audio."""

    frame_seconds: float = 0.03
    hop_seconds: float = 0.01
    # A hop is voiced when its energy is above this absolute level ...
    min_dbfs: float = -50.0
    # ... and this many dB above the source track's noise floor (10th percentile of hops).
    margin_over_floor_db: float = 15.0


def default_annotators() -> dict[str, Any]:
    """The annotators run on every clip, in this order (lip_sync reads what pose and speech
    found). Each is a Hydra ``_target_`` node; its parameters and their defaults live in its
    class. ``annotators.NAME=null`` disables one; ``annotators.NAME._target_=my.Class`` swaps
    it. "auto" backends use the real models when their packages are installed."""
    package = "data_pipelines.annotators"
    return {
        "image_quality": {"_target_": f"{package}.image.ImageQuality"},
        "motion": {"_target_": f"{package}.image.Motion", "backend": "auto"},
        "speech": {"_target_": f"{package}.audio.SpeechActivity", "backend": "auto"},
        "loudness": {"_target_": f"{package}.audio.Loudness"},
        # every_n_frames: run the model on every Nth frame, interpolate between (1 = all).
        "pose": {"_target_": f"{package}.body.BodyPose", "backend": "auto", "every_n_frames": 1},
        "face": {
            "_target_": f"{package}.face.FaceDetector",
            "backend": "auto",
            "every_n_frames": 1,
        },
        "lip_sync": {"_target_": f"{package}.lipsync.LipSync"},
    }


@dataclass
class ShardConfig:
    input_dir: str = MISSING
    output_dir: str = MISSING
    # Clips are decoded at this frame rate (nearest source frame) and stored at it.
    fps: float = 8.0
    clip_seconds: float = 3.0
    # A shot's tail shorter than this is dropped; 2.25 s at 8 fps = 18 frames, enough for a
    # 17-frame training window plus a reference frame outside it.
    min_clip_seconds: float = 2.25
    # Longest side of the stored clip in pixels (downscale only; sides made even).
    max_side: int = 160
    max_samples_per_shard: int = 4
    max_shard_bytes: int = 1_000_000_000
    # Shot boundary when the frame-change score (0-1) exceeds this and stands out from its
    # neighbourhood (see clips.py).
    shot_threshold: float = 0.3
    # Clips whose grey frames have a mean standard deviation below this (0-255) are blank.
    min_frame_contrast: float = 3.0
    audio_sample_rate: int = 16000
    # x264 constant rate factor of the stored clips (lower is better quality, larger files).
    crf: int = 20
    # Damaged media (data_pipelines/decoding.py): an undecodable packet is skipped (the video
    # holds its last frame, the audio is silent over the gap) and counted in the clip's
    # "damage"; a clip whose lost video or audio exceeds this share of its length is rejected.
    max_damaged_fraction: float = 0.1
    # A timestamp gap longer than this with nothing lost (or any step back) is a jump: closed
    # up, with a clip boundary there; shorter gaps are still stretches (variable frame rate).
    max_gap_seconds: float = 2.0
    # Where a source's decoded audio waits for its clips ("" = the system's temp folder).
    spill_dir: str = ""
    # Sources processed in parallel (1 = in this process).
    workers: int = 1
    # Video decoder threads per source (0 = FFmpeg's choice). 1 costs the least CPU per frame
    # (frame threads spend about a third more on decoding), right when workers fill the
    # cores; more only shortens the wait for one long source on otherwise idle cores.
    decode_threads: int = 1
    # Optional captions manifest (jsonl rows {"path": ..., "caption": ...} or a csv with a
    # path,caption header); paths relative to input_dir. It wins over NAME.txt sidecars.
    captions: str = ""
    # Cluster runs: this job shards partition ``partition`` (e.g. $SLURM_ARRAY_TASK_ID) of a
    # duration-balanced plan (output_dir/parts/plan-of-NNNN.json) into
    # output_dir/parts/part_PPPP-of-NNNN; then
    # ``python -m data_pipelines.merge output_dir=DIR`` writes the combined files.
    num_partitions: int = 1
    partition: int = 0
    # Show the progress bar (clips/s) even when stderr is not a terminal.
    progress: bool = True
    # Energy voice detector: the source track's noise floor, and speech backend=energy.
    vad: VoiceActivityConfig = field(default_factory=VoiceActivityConfig)
    annotators: dict[str, Any] = field(default_factory=default_annotators)
    thresholds: TagThresholds = field(default_factory=TagThresholds)


def output_fingerprint(cfg: ShardConfig) -> dict:
    """The settings that shape the outputs, flat ("thresholds.pose_weak_visibility": 0.4);
    a resumed run must use the same ones."""
    flat: dict = {}

    def visit(prefix: str, node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                visit(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    visit("", asdict(cfg))
    for key in ("input_dir", "output_dir", "workers", "decode_threads", "captions", "progress"):
        flat.pop(key)
    return flat


@dataclass
class SampleCorpusConfig:
    out_dir: str = MISSING
    seed: int = 0
    num_clips: int = 6
    fps: int = 25
    audio_sample_rate: int = 16000
    # "auto": espeak-ng speech when it is on PATH, else a synthetic voice; or force one.
    voice: str = "auto"
    # Write the deliberately corrupt broken.mp4 next to the clips.
    write_broken: bool = True


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="shard_schema", node=ShardConfig)
    store.store(name="sample_corpus_schema", node=SampleCorpusConfig)
