"""Stack a consumer's decoded samples into the Batch the trainer reads."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass
class Batch:
    """One batch of clips: the raw-pixel path (video, ref) or, with data.precomputed, the
    precomputed path (latents, ref_latents, and text_embeddings / text_mask and
    audio_features when stored); the fields of the other path are None."""

    keys: list[str]
    captions: list[str]
    quality: list[dict[str, Any]]
    has_audio: torch.Tensor  # (B,) bool
    audio: torch.Tensor  # (B, S) at 16 kHz, zeros without a track
    keypoints: torch.Tensor  # (B, T, 17, 3)
    video: torch.Tensor | None = None  # (B, 3, T, H, W) in [-1, 1]
    ref: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor | None = None  # (B, C, T', h, w)
    ref_latents: torch.Tensor | None = None  # (B, C, 1, h, w)
    text_embeddings: torch.Tensor | None = None  # (B, Lt, D), zero-padded
    text_mask: torch.Tensor | None = None  # (B, Lt) bool
    audio_features: torch.Tensor | None = None  # (B, T, D)

    def __post_init__(self) -> None:
        if (self.latents is None) == (self.video is None):
            raise ValueError(
                f"a batch of {self.keys} needs either video and ref (raw pixels) or latents "
                "and ref_latents (data.precomputed=true), not both or neither"
            )
        if (self.text_embeddings is None) != (self.text_mask is None):
            raise ValueError(f"a batch of {self.keys} needs text_embeddings with text_mask")

    @property
    def precomputed(self) -> bool:
        """Whether the batch holds VAE latents (data.precomputed) rather than pixels."""
        return self.latents is not None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


# Per-sample tensors stacked into the Batch field of the same name when the samples hold them.
TENSORS = ("video", "ref", "latents", "ref_latents", "audio", "audio_features", "keypoints")


def collate(samples: list[dict]) -> Batch:
    """Stack tensors (video/ref, or latents/ref_latents in precomputed mode) into a batch.

    Precomputed text embeddings are padded to the batch's longest caption, with ``text_mask``.
    """
    keys = [s["key"] for s in samples]
    stacked = {
        name: torch.stack([s[name] for s in samples]) for name in TENSORS if name in samples[0]
    }
    if all("text_embeddings" in s for s in samples):
        stacked["text_embeddings"], stacked["text_mask"] = pad_text(
            [s["text_embeddings"] for s in samples], keys
        )
    # A batch where only some samples carry text embeddings (shards encoded with and without
    # them) drops them: the trainer then encodes every caption of that batch itself.
    return Batch(
        keys=keys,
        captions=[s["caption"] for s in samples],
        quality=[s["quality"] for s in samples],
        has_audio=torch.tensor([s["has_audio"] for s in samples], dtype=torch.bool),
        **stacked,
    )


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
