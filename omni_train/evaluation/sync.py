"""Lip-sync: Sync-C / Sync-D with SyncNet weights from a local path, else a labelled proxy.

Sync-C / Sync-D follow joonson/syncnet_python step by step (data_pipelines/annotators/
syncnet.py cites each file and line): the candidate is brought to 25 fps by taking, for each
25 fps tick, the latest frame at or before it (as ``ffmpeg -r 25`` drops / repeats frames),
the audio to 16 kHz int16; faces are found by dlib's detector (the reference uses S3FD) on
every ``SYNC_DETECT_STRIDE``-th frame and the last one, the track in between interpolated (as
the reference interpolates missed detections), then smoothed and cropped as there. Keys:
``sync_c`` (higher is better), ``sync_d`` (lower is better), ``sync_offset`` (frames, the
reference's AV offset: vshift - argmin).

``lipsync_proxy`` is NOT Sync-C: the Pearson r between MediaPipe Face Mesh's inner-lip gap
and the audio's RMS envelope per frame, at the best offset within +-0.2 s (the data
pipeline's lip-sync proxy, data_pipelines/annotators/lipsync.py). It is reported always, and
is the only lip-sync number when no SyncNet weights are configured.
"""

from __future__ import annotations

import numpy as np

from omni_train.evaluation.faces import FaceToolsMissing, detect_faces, unavailable
from omni_train.evaluation.measurement import ClipInputs, MetricValue
from omni_train.evaluation.suite import MetricsConfig

SYNC_DETECT_STRIDE = 5
PROXY_MAX_OFFSET_SECONDS = 0.2
PROXY_MIN_FRAMES = 8
CROP_SCALE = 0.4  # run_pipeline.py --crop_scale


def resample_frames(video: np.ndarray, fps: float, target: float) -> np.ndarray:
    """Frames at ``target`` fps: for tick t / target, the latest frame at or before it."""
    count = int(np.floor(len(video) / fps * target + 1e-9))
    picks = np.minimum(np.floor(np.arange(count) / target * fps + 1e-9).astype(int),
                       len(video) - 1)  # fmt: skip
    return video[picks]


def face_boxes(video: np.ndarray, stride: int = SYNC_DETECT_STRIDE) -> list:
    """Per frame [[x, y, w, h, 1.0]] (normalised, largest face) on the detected frames, []
    elsewhere; syncnet.face_crops interpolates between them."""
    height, width = video.shape[1:3]
    picks = sorted(set(range(0, len(video), stride)) | {len(video) - 1})
    boxes: list = [[] for _ in video]
    for t in picks:
        found = detect_faces(video[t])
        if found:
            b = found[0]
            boxes[t] = [[b.left / width, b.top / height, (b.right - b.left) / width,
                         (b.bottom - b.top) / height, 1.0]]  # fmt: skip
    return boxes


class SyncMetric:
    name = "sync"

    def __init__(self, cfg: MetricsConfig | None = None) -> None:
        self.cfg = cfg or MetricsConfig()
        self.model, self.reason = None, None
        weights = self.cfg.syncnet_weights
        self.sync_method = (f"SyncNet {weights or '(no weights)'}, joonson/syncnet_python "
                            f"preprocessing (25 fps, 16 kHz PCM16 MFCC, crop scale {CROP_SCALE}, "
                            f"vshift {self.cfg.sync_max_offset}); dlib face boxes")  # fmt: skip
        if not weights:
            self.reason = ("no SyncNet weights: set metrics.syncnet_weights to a local state "
                           "dict; see lipsync_proxy (a proxy, not Sync-C)")  # fmt: skip
        else:
            from data_pipelines.annotators.syncnet import load_syncnet

            try:
                self.model = load_syncnet(weights, option="metrics.syncnet_weights")
            except (ValueError, RuntimeError) as err:
                self.reason = str(err).splitlines()[0]
        self._mp = None
        self._proxy_reason = None
        try:
            from data_pipelines.annotators.mediapipe_compat import import_mediapipe

            self._mp = import_mediapipe("lip-sync proxy (face mesh)", required=False)
        except Exception as err:  # a broken install must not stop the other metrics
            self._proxy_reason = f"mediapipe failed to import: {err}"
        if self._mp is None and self._proxy_reason is None:
            self._proxy_reason = "mediapipe is not installed"

    def _sync_keys(self) -> dict[str, tuple[str, bool]]:
        return {
            "sync_c": (f"Sync-C (median - min of the mean distance curve); {self.sync_method}",
                       True),
            "sync_d": (f"Sync-D (min of the mean distance curve); {self.sync_method}", False),
            "sync_offset": (f"AV offset in 25 fps frames (vshift - argmin, + = audio leads); "
                            f"{self.sync_method}", False),
        }  # fmt: skip

    def __call__(self, video: np.ndarray, clip: ClipInputs) -> dict[str, MetricValue]:
        if clip.audio is None:
            out = unavailable(self._sync_keys(), "the clip has no audio")
            out["lipsync_proxy"] = MetricValue.missing(PROXY_METHOD, "the clip has no audio")
            return out
        out = self._syncnet(video, clip)
        out["lipsync_proxy"] = self._proxy(video, clip)
        return out

    def _syncnet(self, video: np.ndarray, clip: ClipInputs) -> dict[str, MetricValue]:
        keys = self._sync_keys()
        if self.model is None:
            return unavailable(keys, self.reason)
        from data_pipelines.annotators import syncnet
        from data_pipelines.media import resample_audio

        frames = resample_frames(video, clip.fps, syncnet.SYNCNET_FPS)
        try:
            boxes = face_boxes(frames)
        except FaceToolsMissing as err:
            return unavailable(keys, f"face boxes for the crops: {err}")
        crops = syncnet.face_crops(frames, boxes, CROP_SCALE)
        if crops is None:
            return unavailable(
                keys,
                "no face track over the whole clip (first / last frame "
                f"without a face, or a gap over {syncnet.MAX_GAP} frames)",
            )
        audio = resample_audio(clip.audio, clip.audio_rate, syncnet.SYNCNET_RATE)
        found = syncnet.embeddings(self.model, crops, syncnet.pcm16(audio), self.cfg.sync_batch)
        if found is None:
            return unavailable(keys, f"clip too short: {len(frames)} frames at 25 fps")
        vshift = self.cfg.sync_max_offset
        curve = syncnet.distance_curve(*found, vshift)
        confidence, distance, offset = syncnet.scores_from_curve(curve, vshift)
        (c_method, _), (d_method, _), (o_method, _) = keys.values()
        return {
            "sync_c": MetricValue(confidence, c_method),
            "sync_d": MetricValue(distance, d_method, higher_is_better=False,
                                  series=curve.tolist()),
            "sync_offset": MetricValue(float(offset), o_method, higher_is_better=False),
        }  # fmt: skip

    def _proxy(self, video: np.ndarray, clip: ClipInputs) -> MetricValue:
        if self._mp is None:
            return MetricValue.missing(PROXY_METHOD, self._proxy_reason)
        from data_pipelines.measures import frame_rms

        mouth = mouth_openings(self._mp, video)
        envelope = frame_rms(clip.audio, clip.audio_rate, clip.fps, len(video))
        max_offset = max(0, round(PROXY_MAX_OFFSET_SECONDS * clip.fps))
        from data_pipelines.annotators.lipsync import best_offset_correlation

        result = best_offset_correlation(mouth, envelope, max_offset, PROXY_MIN_FRAMES)
        if result is None:
            reason = (
                f"mouth found in {int(np.isfinite(mouth).sum())} of {len(video)} frames; "
                f"needs {PROXY_MIN_FRAMES} with a moving mouth and a non-silent track"
            )
            return MetricValue.missing(PROXY_METHOD, reason)  # fmt: skip
        return MetricValue(result[0], PROXY_METHOD)


PROXY_METHOD = (
    "PROXY, not Sync-C: Pearson r of MediaPipe Face Mesh inner-lip gap / mouth width against "
    f"the audio RMS envelope per frame, best offset within +-{PROXY_MAX_OFFSET_SECONDS} s"
)


def mouth_openings(mp, video: np.ndarray) -> np.ndarray:
    """(T,) inner-lip gap over mouth width per frame (NaN without a face mesh)."""
    from data_pipelines.annotators.body import mouth_opening

    out = np.full(len(video), np.nan)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1) as mesh:
        for t, frame in enumerate(video):
            result = mesh.process(np.ascontiguousarray(frame))
            if result.multi_face_landmarks:
                out[t] = mouth_opening(result.multi_face_landmarks[0].landmark)
    return out
