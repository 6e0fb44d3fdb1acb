"""Condition-quality tiers from measured scores (the paper's data split, §3.3 and §4.1).

A tier says how well a clip can serve each conditioning task: "strong" (use it for that
task), "weak" (usable, but only where the condition is dropped or down-weighted) or "none".
The tiers are a pure function of the scores stored in the sample's json, so anyone can
re-derive them with other thresholds. A score that could not be measured is absent:
no audio track -> no ``speech_fraction``; no keypoints -> no ``pose_visibility``.

Rules:
- text: strong with a caption, weak without. A clip with no caption still trains the text
  task as an empty-prompt (unconditional) sample, so it is never "none".
- ref: strong when sharp enough, not frozen (frame difference, joint displacement or optical
  flow) and, where a face detector or pose model looked, showing a person; weak when only
  sharp enough, none when blurry.
- audio: none without a track or when it is silent / near-silent. Strong needs enough
  speech AND a visible face (face detector, else head keypoints) AND a mouth that follows the
  sound; without that evidence at most weak. The mouth follows the sound when SyncNet's
  sync_c is high enough, or, with the lip-sync proxy, when its r (lip_sync) is high enough AND
  unlikely by chance (lip_sync_p <= audio_strong_lip_sync_max_p): on a short clip the best r
  of a mouth against unrelated speech is often high, so r alone is no evidence.
- pose: none without keypoints; strong when most joints are visible and stable; weak when
  enough are visible and the jitter is tolerable.
"""

from __future__ import annotations

from collections.abc import Mapping

from data_pipelines.config import TagThresholds


def text_tier(caption: str, t: TagThresholds) -> str:
    return "strong" if len(caption.strip()) >= max(1, t.text_strong_min_chars) else "weak"


def ref_tier(scores: Mapping[str, float], t: TagThresholds) -> str:
    sharp = scores.get("sharpness", 0.0)
    moves = (
        scores.get("motion", 0.0) >= t.ref_strong_motion
        or scores.get("keypoint_motion", 0.0) >= t.ref_strong_keypoint_motion
        or scores.get("flow_motion", 0.0) >= t.ref_strong_flow_motion
    )
    looked = [
        scores[k] for k in ("face_fraction", "head_visibility", "pose_visibility") if k in scores
    ]
    person = not looked or max(looked) >= t.ref_strong_person
    if sharp >= t.ref_strong_sharpness and moves and person:
        return "strong"
    return "weak" if sharp >= t.ref_weak_sharpness else "none"


def audio_tier(scores: Mapping[str, float], t: TagThresholds) -> str:
    if "speech_fraction" not in scores:
        return "none"
    speech = scores["speech_fraction"]
    if scores.get("loudness_dbfs", -120.0) < t.audio_min_loudness_dbfs:
        return "none"
    if speech < t.audio_weak_speech_fraction:
        return "none"
    if "face_fraction" in scores:
        face_seen = scores["face_fraction"] >= t.audio_strong_face_fraction
    else:
        face_seen = scores.get("head_visibility", 0.0) >= t.audio_strong_head_visibility
    if "sync_c" in scores:
        lips_follow = scores["sync_c"] >= t.audio_strong_sync_c
    else:
        lips_follow = (
            scores.get("lip_sync", -1.0) >= t.audio_strong_lip_sync
            and scores.get("lip_sync_p", 1.0) <= t.audio_strong_lip_sync_max_p
        )
    face_speaks = face_seen and lips_follow
    return "strong" if speech >= t.audio_strong_speech_fraction and face_speaks else "weak"


def pose_tier(scores: Mapping[str, float], t: TagThresholds) -> str:
    if "pose_visibility" not in scores:
        return "none"
    visible, jitter = scores["pose_visibility"], scores.get("pose_jitter", 0.0)
    if visible >= t.pose_strong_visibility and jitter <= t.pose_strong_max_jitter:
        return "strong"
    if visible >= t.pose_weak_visibility and jitter <= t.pose_weak_max_jitter:
        return "weak"
    return "none"


def condition_tiers(scores: Mapping[str, float], caption: str, t: TagThresholds) -> dict:
    """{"text": tier, "ref": tier, "audio": tier, "pose": tier}."""
    return {
        "text": text_tier(caption, t),
        "ref": ref_tier(scores, t),
        "audio": audio_tier(scores, t),
        "pose": pose_tier(scores, t),
    }
