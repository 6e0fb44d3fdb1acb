"""stats.json from the manifest and rejects rows, and the summary table printed at the end."""

from __future__ import annotations

from collections import Counter

from omni_train.contracts import CONDITIONS, TIERS


def build_stats(
    inputs: list[str] | int,
    manifest: list[dict],
    rejects: list[dict],
    num_shards: int,
    shard_bytes: int,
) -> dict:
    """Counts of inputs, clips, sharded samples, rejects by reason and samples per tier.

    A reject row with "start" is one clip of an input; without it, the whole input.
    ``inputs``: the input paths, or their number.
    """
    input_rejects = [row for row in rejects if "start" not in row]
    clip_rejects = [row for row in rejects if "start" in row]
    return {
        "inputs": inputs if isinstance(inputs, int) else len(inputs),
        "inputs_sharded": len({row["source"] for row in manifest}),
        "inputs_rejected": len(input_rejects),
        "clips": len(manifest) + len(clip_rejects),
        "sharded": len(manifest),
        "shards": num_shards,
        "shard_bytes": shard_bytes,
        "rejected": {
            "inputs": len(input_rejects),
            "clips": len(clip_rejects),
            "by_reason": dict(sorted(Counter(row["reason"] for row in rejects).items())),
        },
        "quality": {
            condition: {
                tier: sum(row["quality"][condition] == tier for row in manifest) for tier in TIERS
            }
            for condition in CONDITIONS
        },
    }


def format_summary(stats: dict) -> str:
    lines = [
        f"inputs {stats['inputs']}: {stats['inputs_sharded']} sharded, "
        f"{stats['inputs_rejected']} rejected",
        f"clips {stats['clips']}: {stats['sharded']} sharded into {stats['shards']} shards "
        f"({stats['shard_bytes'] / 1e6:.2f} MB), {stats['rejected']['clips']} rejected",
    ]
    if stats["rejected"]["by_reason"]:
        reasons = ", ".join(f"{r} {n}" for r, n in stats["rejected"]["by_reason"].items())
        lines.append(f"rejected by reason: {reasons}")
    lines.append(f"{'condition':<10}" + "".join(f"{tier:>8}" for tier in TIERS))
    for condition, counts in stats["quality"].items():
        lines.append(f"{condition:<10}" + "".join(f"{counts[tier]:>8}" for tier in TIERS))
    return "\n".join(lines)
