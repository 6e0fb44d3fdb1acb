"""MediaPipe 0.10.21 under this environment's protobuf: the APIs it needs are provided."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import message_factory, timestamp_pb2

from data_pipelines.annotators.mediapipe_compat import provide_get_prototype

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_get_prototype_returns_the_message_class():
    provide_get_prototype()
    descriptor = timestamp_pb2.Timestamp.DESCRIPTOR
    factory = message_factory.MessageFactory()
    assert factory.GetPrototype(descriptor) is message_factory.GetMessageClass(descriptor)
    assert factory.GetPrototype(descriptor)(seconds=3) == timestamp_pb2.Timestamp(seconds=3)


def test_mediapipe_imports_without_a_protobuf_error():
    pytest.importorskip("mediapipe")
    # A fresh interpreter: the bindings look the API up once, when mediapipe is first imported.
    code = (
        "from data_pipelines.annotators.mediapipe_compat import import_mediapipe\n"
        "assert import_mediapipe('test', required=True).solutions.face_detection\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Error" not in done.stderr, done.stderr
