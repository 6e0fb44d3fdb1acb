"""Streaming data loader: tar shards -> decoded, batched, exactly-resumable training samples."""

from omni_train.data.config import DataConfig
from omni_train.data.decode import CorruptSample, decode_sample
from omni_train.data.pose import keypoint_heatmaps
from omni_train.data.stream import LoaderState, ResumableLoader, build_loader, shard_list

__all__ = [
    "CorruptSample",
    "DataConfig",
    "LoaderState",
    "ResumableLoader",
    "build_loader",
    "decode_sample",
    "keypoint_heatmaps",
    "shard_list",
]
