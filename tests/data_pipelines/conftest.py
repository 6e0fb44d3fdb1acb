"""Shared fixtures: the sample corpus sharded once per session, and the real media folder."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from data_pipelines.testing import build_sample_shards

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> SimpleNamespace:
    """A 4-clip sample corpus (+ broken.mp4) in ROOT/corpus and its shards in ROOT/data."""
    root = tmp_path_factory.mktemp("sample")
    data = build_sample_shards(root, num_clips=4, seed=0)
    return SimpleNamespace(root=root, corpus=root / "corpus", data=data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real media folder {SHARED_DATA} is absent (it sits beside the repo in CI)")
    return SHARED_DATA.resolve()
