"""The candidates every clip is scored with: the generated clip and two baselines.

``real`` is the held-out clip itself (the upper bound: what a perfect model would give) and
``static_reference`` is the reference frame repeated (what a model that never moves would
give). A reader sees where the generated clip stands between them.
"""

from __future__ import annotations

import numpy as np

GENERATED, REAL, STATIC = "generated", "real", "static_reference"
CANDIDATES: tuple[str, ...] = (GENERATED, REAL, STATIC)
DESCRIPTIONS: dict[str, str] = {
    GENERATED: "the model's output from the clip's reference frame and its own conditions",
    REAL: "the held-out clip itself (upper bound)",
    STATIC: "the reference frame repeated for the whole generation (a model that never moves)",
}


def static_reference(reference: np.ndarray, frames: int) -> np.ndarray:
    """(frames, H, W, 3): the (H, W, 3) reference frame repeated."""
    return np.repeat(reference[None], frames, axis=0)


def candidate_videos(
    generated: np.ndarray, real: np.ndarray, reference: np.ndarray
) -> dict[str, np.ndarray]:
    """The three candidates of a clip; the static one is as long as the generation."""
    return {
        GENERATED: generated,
        REAL: real,
        STATIC: static_reference(reference, len(generated)),
    }
