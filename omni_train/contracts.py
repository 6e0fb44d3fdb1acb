"""What the data pipelines (which write shards) and the trainer (which reads them) must agree
on, defined once: the conditions and their quality tiers, the causal VAE's strides and its
"1 + 4k frames" rule, the members of a shard sample, and the hash that turns a sample key
into numbers. Both packages import these from here; this module imports neither, nor torch.
"""

from __future__ import annotations

import hashlib

# The conditions, weakest to strongest (paper §3.3), and how well a clip serves each.
CONDITIONS: tuple[str, ...] = ("text", "ref", "audio", "pose")
TIERS: tuple[str, ...] = ("strong", "weak", "none")
# Tiers that can ever train a condition; "none" never does.
TRAINABLE_TIERS: tuple[str, ...] = ("strong", "weak")
# The conditions on per task; each task adds one condition to the one before.
TASK_CONDITIONS: dict[str, tuple[str, ...]] = {
    "text": CONDITIONS[:2],
    "audio": CONDITIONS[:3],
    "pose": CONDITIONS,
}

# The causal 3D VAE: 8x8 pixels a latent cell; latent frame 0 is pixel frame 0 alone and
# latent frame j >= 1 covers pixel frames 4j-3 .. 4j, so a clip has 1 + 4k pixel frames.
SPATIAL_STRIDE = 8
TEMPORAL_STRIDE = 4

# A raw shard sample: its metadata and the clip (webdataset member names, i.e. extensions),
# in the order they are written.
SHARD_MEMBERS: tuple[str, ...] = ("json", "mp4")


def is_causal_frame_count(num_frames: int) -> bool:
    """True for 1 + 4k frames (k >= 0), the lengths the causal VAE encodes."""
    return num_frames >= 1 and (num_frames - 1) % TEMPORAL_STRIDE == 0


def check_pixel_frames(num_frames: int) -> None:
    if not is_causal_frame_count(num_frames):
        below = max(1, num_frames - (num_frames - 1) % TEMPORAL_STRIDE)
        raise ValueError(
            f"the causal VAE needs 1 + {TEMPORAL_STRIDE}k frames, got {num_frames}; "
            f"trim the clip to {below} frames or pad it to {below + TEMPORAL_STRIDE}"
        )


def latent_frames(num_pixel_frames: int) -> int:
    """Latent frames for a clip of ``num_pixel_frames`` (which must be 1 + 4k)."""
    check_pixel_frames(num_pixel_frames)
    return 1 + (num_pixel_frames - 1) // TEMPORAL_STRIDE


def pixel_frames(num_latent_frames: int) -> int:
    """Pixel frames decoded from ``num_latent_frames`` latent frames."""
    if num_latent_frames < 1:
        raise ValueError(f"need at least one latent frame, got {num_latent_frames}")
    return 1 + (num_latent_frames - 1) * TEMPORAL_STRIDE


def key_hash(key: str) -> int:
    """A sample key as a 64-bit number: the first 8 bytes of its sha1, little-endian. Seeds
    and orders that must not depend on where or when a sample is read start from it."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "little")
