"""Precomputed-latent samples: VAE latents (and optional audio) stored in the shards.

An encode stage writes, per sample, one training window already encoded:
  json                  the sample's metadata (quality, caption, keypoints), as in raw mode
  latents.npy           (C, T', h, w) VAE latents of the window's frames
  ref_latents.npy       (C, 1, h, w) or (C, h, w) latents of the reference frame
  audio.npy             optional (S,) float32 waveform of the window at 16 kHz
  audio_features.npy    optional (T, D) audio-encoder features of the window
  text_embeddings.npy   optional (Ltok, D) text-encoder output for the caption, valid tokens
                        only (the collate pads a batch and adds ``text_mask``)
Arrays are read with numpy's allow_pickle=False: an object array (a pickle) is refused as a
corrupt sample, never unpickled. No video is decoded.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from omni_train.data.config import DataConfig
from omni_train.data.decode import NUM_JOINTS, CorruptSample, _parse_meta

TEXT_MEMBER = "text_embeddings.npy"


def _array(key: str, raw: dict[str, Any], member: str, ndim: tuple[int, ...]) -> np.ndarray:
    payload = raw.get(member)
    if not isinstance(payload, bytes | bytearray):
        raise CorruptSample(key, f"has no {member} member (data.precomputed=true needs it)")
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptSample(key, f"{member} is not a plain numpy array: {err}") from err
    if array.dtype.kind not in "fiu" or array.ndim not in ndim:
        raise CorruptSample(key, f"{member} has dtype {array.dtype}, shape {array.shape}")
    return array


def decode_latent_sample(raw: dict[str, Any], cfg: DataConfig, rng=None) -> dict:
    """A training sample from precomputed arrays; same keys as raw mode except video/ref.

    Returns latents (C, T', h, w) and ref_latents (C, 1, h, w) float32, keypoints (T, 17, 3)
    of the window's first ``cfg.num_frames`` frames, audio (S,) (zeros when absent),
    audio_features and text_embeddings (Ltok, D) when stored, key, caption, quality and has_audio.
    """
    key = str(raw.get("__key__", "?"))
    if not isinstance(raw.get("json"), bytes | bytearray):
        raise CorruptSample(key, "has no json member")
    meta = _parse_meta(key, raw["json"])
    latents = _array(key, raw, "latents.npy", (4,)).astype(np.float32)
    ref = _array(key, raw, "ref_latents.npy", (3, 4)).astype(np.float32)
    ref = ref[:, None] if ref.ndim == 3 else ref
    if ref.shape[0] != latents.shape[0] or ref.shape[2:] != latents.shape[2:] or ref.shape[1] != 1:
        raise CorruptSample(
            key, f"ref_latents shape {ref.shape} does not match latents {latents.shape}"
        )
    sample = {
        "latents": torch.from_numpy(latents),
        "ref_latents": torch.from_numpy(np.ascontiguousarray(ref)),
        "key": key,
        "caption": meta["caption"],
        "quality": meta["quality"],
    }
    audio = np.zeros(cfg.audio_samples, np.float32)
    has_audio = "audio.npy" in raw
    if has_audio:
        stored = _array(key, raw, "audio.npy", (1,)).astype(np.float32)
        audio[: min(len(stored), len(audio))] = stored[: len(audio)]
    sample.update(audio=torch.from_numpy(audio), has_audio=has_audio)
    if "audio_features.npy" in raw:
        features = _array(key, raw, "audio_features.npy", (2,)).astype(np.float32)
        sample["audio_features"] = torch.from_numpy(features)
    if TEXT_MEMBER in raw:
        text = _array(key, raw, TEXT_MEMBER, (2,)).astype(np.float32)
        sample["text_embeddings"] = torch.from_numpy(text)
    keypoints = np.zeros((cfg.num_frames, NUM_JOINTS, 3), np.float32)
    if meta["keypoints"] is not None:
        stored = np.asarray(meta["keypoints"], dtype=np.float32)
        if stored.ndim == 3 and stored.shape[1:] == (NUM_JOINTS, 3):
            count = min(len(stored), cfg.num_frames)
            keypoints[:count] = stored[:count]
    sample["keypoints"] = torch.from_numpy(keypoints)
    return sample
