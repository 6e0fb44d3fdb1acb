"""Lip-sync: does the mouth move with the voice?

With ``syncnet_weights`` (a local path) a SyncNet scores the clip (``sync_c``,
``sync_distance``, ``sync_offset``; method ``syncnet``, see syncnet.py). Without weights, or
where SyncNet cannot score a clip (a frame without a detected face, too short), this is a
labelled PROXY, never to be read as Sync-C:
- ``proxy_mouth_opening``: the inner-lip gap from the face mesh (BodyPose with MediaPipe)
  against the audio envelope, Pearson r at the best offset within +-``max_offset_seconds``
  (the lips may lead or trail the sound); ``lip_sync_confidence`` is that best r minus the
  median r over all offsets, in the spirit of SyncNet's confidence.
- ``proxy_mouth_darkness``: with sidecar keypoints only, the darkness of the region below the
  nose (an open mouth is dark) against the audio energy (measures.lip_sync).
The method is recorded in the sample's ``quality.methods.lip_sync``.

With the slow models on a stride (``annotators.pose.every_n_frames``,
``annotators.face.every_n_frames`` > 1) the mouth opening and the face boxes between measured
frames are interpolated, and both the proxy and SyncNet use them: SyncNet's reference pipeline
itself bridges missing detections by linear interpolation and median-filters the box track
over 13 frames, so boxes interpolated over a few frames cut nearly the same crops. SyncNet
needs one box list per frame (``faces`` as FaceDetector writes it at any stride); the strides
show in ``quality.methods.pose`` / ``face``.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import measures
from data_pipelines.annotators.base import AnnotatorUnavailable, ClipView, Findings, warn_once

MIN_MOUTH_CHANGE = 0.01  # std of the opening ratio below which the mouth "does not move"


class LipSync:
    """Scores ``lip_sync`` (proxy r), ``lip_sync_offset`` (seconds, + = audio after the lips),
    ``lip_sync_confidence``; needs audio and mouth evidence, else records nothing."""

    name = "lip_sync"

    def __init__(
        self,
        max_offset_seconds: float = 0.2,
        min_frames: int = 8,
        syncnet_weights: str = "",
        syncnet_max_offset_frames: int = 15,
        syncnet_crop_scale: float = 0.4,
    ) -> None:
        self.max_offset_seconds, self.min_frames = max_offset_seconds, min_frames
        self.syncnet_max_offset_frames = syncnet_max_offset_frames
        self.syncnet_crop_scale = syncnet_crop_scale
        self._syncnet = None
        self.resolved = "proxy"
        if syncnet_weights:
            from data_pipelines.annotators.syncnet import load_syncnet

            self._syncnet = load_syncnet(syncnet_weights)
            self.resolved = f"syncnet:{syncnet_weights}"

    def __call__(self, clip: ClipView, found: Findings) -> None:
        if clip.audio is None:
            return
        if self._syncnet is not None and self._score_syncnet(clip, found):
            return
        mouth = found.signals.get("mouth_opening")
        if mouth is not None:
            envelope = measures.frame_rms(clip.audio, clip.sample_rate, clip.fps, len(mouth))
            max_offset = max(0, round(self.max_offset_seconds * clip.fps))
            result = best_offset_correlation(mouth, envelope, max_offset, self.min_frames)
            if result is not None:
                r, offset, confidence = result
                found.scores["lip_sync"] = r
                found.scores["lip_sync_offset"] = offset / clip.fps
                found.scores["lip_sync_confidence"] = confidence
                found.methods["lip_sync"] = "proxy_mouth_opening"
            return
        keypoints = found.signals.get("keypoints")
        if keypoints is not None:
            r = measures.lip_sync(
                clip.frames, keypoints, clip.audio, clip.sample_rate, clip.fps, clip.grey
            )
            if r is not None:
                found.scores["lip_sync"] = r
                found.methods["lip_sync"] = "proxy_mouth_darkness"

    def _score_syncnet(self, clip: ClipView, found: Findings) -> bool:
        from data_pipelines.annotators import syncnet

        if abs(clip.fps - syncnet.SYNCNET_FPS) > 1e-6:
            raise AnnotatorUnavailable(
                f"SyncNet scores 25 fps clips, this job stores fps={clip.fps}: pass fps=25, "
                "or leave annotators.lip_sync.syncnet_weights empty for the proxy"
            )
        boxes = found.fields.get("faces")
        if boxes is None or len(boxes) != len(clip.frames):
            warn_once("SyncNet needs face boxes for every frame (annotators.face with a model "
                      "backend, before lip_sync): using the lip-sync proxy")  # fmt: skip
            return False
        crops = syncnet.face_crops(clip.frames, boxes, self.syncnet_crop_scale)
        if crops is None:
            return False
        audio = syncnet.prepare_audio(clip.audio, clip.sample_rate)
        result = syncnet.sync_scores(self._syncnet, crops, audio, self.syncnet_max_offset_frames)
        if result is None:
            return False
        confidence, distance, offset = result
        found.scores["sync_c"] = confidence
        found.scores["sync_distance"] = distance
        found.scores["sync_offset"] = offset / clip.fps
        found.methods["lip_sync"] = "syncnet"
        return True


def best_offset_correlation(
    mouth: np.ndarray, envelope: np.ndarray, max_offset: int, min_frames: int
) -> tuple[float, int, float] | None:
    """(best r, its offset in frames, best r - median r) over offsets -max..+max, where
    offset k pairs mouth[t] with envelope[t + k]; frames without a mouth (NaN) are skipped.
    None when fewer than ``min_frames`` pairs or either signal is flat."""
    values = []
    for k in range(-max_offset, max_offset + 1):
        lo, hi = max(0, -k), min(len(mouth), len(envelope) - k)
        if hi - lo < min_frames:
            continue
        m, e = mouth[lo:hi], envelope[lo + k : hi + k]
        valid = np.isfinite(m)
        if valid.sum() < min_frames:
            continue
        m, e = m[valid], e[valid]
        if np.std(m) < MIN_MOUTH_CHANGE or np.std(e) < 1e-6:
            continue
        values.append((float(np.corrcoef(m, e)[0, 1]), k))
    if not values:
        return None
    best, offset = max(values, key=lambda pair: (pair[0], -abs(pair[1])))
    return best, offset, best - float(np.median([r for r, _ in values]))
