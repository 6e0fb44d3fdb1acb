"""Streaming data loader: tar shards -> decoded, batched, exactly-resumable training samples."""

from omni_train.data.config import BucketConfig, DataConfig, SourceConfig
from omni_train.data.decode import CorruptSample, decode_sample
from omni_train.data.elastic import elastic_loader_state
from omni_train.data.latents import decode_latent_sample
from omni_train.data.pose import keypoint_heatmaps
from omni_train.data.state import LoaderState
from omni_train.data.stream import ResumableLoader, build_loader, shard_list

__all__ = [
    "BucketConfig",
    "CorruptSample",
    "DataConfig",
    "LoaderState",
    "ResumableLoader",
    "SourceConfig",
    "build_loader",
    "decode_latent_sample",
    "decode_sample",
    "elastic_loader_state",
    "keypoint_heatmaps",
    "shard_list",
]
