"""Stack a consumer's decoded samples into the batch dict the trainer reads."""

from __future__ import annotations

from typing import Any

import torch

TENSORS = ("video", "ref", "latents", "ref_latents", "audio", "audio_features", "keypoints")


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack tensors (video/ref, or latents/ref_latents in precomputed mode) into a batch.

    Precomputed text embeddings are padded to the batch's longest caption, with ``text_mask``.
    """
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "quality": [s["quality"] for s in samples],
        "has_audio": torch.tensor([s["has_audio"] for s in samples], dtype=torch.bool),
    }
    for name in TENSORS:
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    if all("text_embeddings" in s for s in samples):
        batch["text_embeddings"], batch["text_mask"] = pad_text(
            [s["text_embeddings"] for s in samples], batch["keys"]
        )
    # A batch where only some samples carry text embeddings (shards encoded with and without
    # them) drops them: the trainer then encodes every caption of that batch itself.
    return batch


def pad_text(embeddings: list[torch.Tensor], keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ltok_i, D) per sample -> zero-padded (B, Lt, D) and a bool mask (B, Lt), Lt >= 1.

    The same layout the text encoder returns for a batch of captions (padding to the longest,
    padded positions zero), so the model sees precomputed and on-the-fly text alike.
    """
    dims = {int(e.shape[1]) for e in embeddings}
    if len(dims) != 1:
        raise ValueError(
            f"text_embeddings.npy of samples {keys} have different widths {sorted(dims)}: "
            "the shards were encoded with different text encoders; re-run data_pipelines.encode"
        )
    length = max(1, *(int(e.shape[0]) for e in embeddings))
    text = torch.zeros(len(embeddings), length, dims.pop(), dtype=torch.float32)
    mask = torch.zeros(len(embeddings), length, dtype=torch.bool)
    for i, tokens in enumerate(embeddings):
        text[i, : len(tokens)] = tokens
        mask[i, : len(tokens)] = True
    return text, mask
