"""Face detection and identity embeddings for the metrics (dlib, or ArcFace ONNX from a path).

dlib (``dlib-bin``) with the model files of ``face-recognition-models`` runs offline: the
frontal (HOG) face detector with one upsampling step, the 5-point shape predictor and the
ResNet face descriptor (128-d; two faces of one person lie within Euclidean distance 0.6,
dlib's threshold). The model files are found without importing ``face_recognition_models``
(its ``__init__`` needs ``pkg_resources``, which recent environments lack).

Small frames: the HOG detector's window is 80 px, so with one upsampling step it finds faces
of about 40 px and up; frames whose shorter side is below ``MIN_DETECT_SIDE`` (QCIF, the 64 x 64 demo clips) are first enlarged
by an integer factor with bilinear filtering (boxes are mapped back). Measured on
carphone.mp4 shrunk to 64 x 64 (faces ~20 px): a face in 9 of 16 sampled frames, mean
distance to the equally small reference frame 0.33 (0.24 at 176 x 144). A frame without a detection
counts as "no face", never as a distance.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from omni_train.evaluation.measurement import MetricValue

DLIB_UPSAMPLE = 1
MIN_DETECT_SIDE = 256
DLIB_THRESHOLD = 0.6
DLIB_METHOD = (
    "dlib 20 ResNet face descriptor (face-recognition-models 0.3.0), HOG detector (upsample 1), "
    f"5-point alignment, 150 px chip; frames below {MIN_DETECT_SIDE} px enlarged (bilinear) "
    "before detection; Euclidean distance of 128-d descriptors (same person < 0.6)"
)
ARCFACE_SIDE = 112


class FaceToolsMissing(RuntimeError):
    """The embedder's package or weights are missing; the message says which and the fix."""


@dataclass(frozen=True)
class FaceBox:
    # Pixel box of the original frame: left, top, right, bottom (exclusive).
    left: int
    top: int
    right: int
    bottom: int

    @property
    def area(self) -> int:
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)


def _dlib():
    try:
        import dlib
    except ImportError as err:
        raise FaceToolsMissing(
            "dlib is not installed: pip install -e '.[eval]' (dlib-bin, face-recognition-models)"
        ) from err
    return dlib


def dlib_model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceToolsMissing(
            "face-recognition-models is not installed (it ships dlib's model files): "
            "pip install -e '.[eval]'"
        )
    path = Path(spec.submodule_search_locations[0]) / "models" / name
    if not path.is_file():
        raise FaceToolsMissing(f"{path} is missing from the face-recognition-models package")
    return path


@cache
def _dlib_models():
    dlib = _dlib()
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat"))),
        dlib.face_recognition_model_v1(
            str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat"))
        ),
    )


def _enlarged(frame: np.ndarray) -> tuple[np.ndarray, int]:
    factor = max(1, int(np.ceil(MIN_DETECT_SIDE / min(frame.shape[:2]))))
    if factor == 1:
        return np.ascontiguousarray(frame), 1
    import cv2

    size = (frame.shape[1] * factor, frame.shape[0] * factor)
    return cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR), factor


def detect_faces(frame: np.ndarray) -> list[FaceBox]:
    """Boxes of the faces in one (H, W, 3) uint8 RGB frame, largest first."""
    detector, _, _ = _dlib_models()
    image, factor = _enlarged(frame)
    boxes = [
        FaceBox(r.left() // factor, r.top() // factor, r.right() // factor, r.bottom() // factor)
        for r in detector(image, DLIB_UPSAMPLE)
    ]
    return sorted(boxes, key=lambda b: -b.area)


class DlibEmbedder:
    method = DLIB_METHOD

    def __init__(self) -> None:
        _dlib_models()  # fail early, with the install hint

    def embed(self, frame: np.ndarray) -> np.ndarray | None:
        """(128,) descriptor of the largest face, or None when no face is found."""
        import dlib

        detector, predictor, encoder = _dlib_models()
        image, _ = _enlarged(frame)
        faces = sorted(detector(image, DLIB_UPSAMPLE), key=lambda r: -r.area())
        if not faces:
            return None
        shape = predictor(image, faces[0])
        chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
        return np.asarray(encoder.compute_face_descriptor(chip), dtype=np.float64)

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b))


class ArcFaceOnnxEmbedder:
    """An ArcFace-style ONNX model (input 1 x 3 x 112 x 112 RGB, (x - 127.5) / 127.5) from a
    local path, on the dlib-detected face box made square and resized to 112 px (a box crop,
    not the 5-point similarity alignment of the ArcFace training data). Distance: 1 - cosine."""

    def __init__(self, weights: str) -> None:
        path = Path(weights).expanduser()
        if not weights or not path.is_file():
            raise FaceToolsMissing(
                f"metrics.identity_weights={weights!r} is not a file: give a local ArcFace "
                "ONNX model, or use metrics.identity=dlib"
            )
        try:
            import onnxruntime
        except ImportError as err:
            raise FaceToolsMissing(
                "metrics.identity=arcface_onnx needs onnxruntime (pip install onnxruntime)"
            ) from err
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.method = f"ArcFace ONNX {path.name}: dlib box crop at 112 px, 1 - cosine similarity"

    def embed(self, frame: np.ndarray) -> np.ndarray | None:
        import cv2

        faces = detect_faces(frame)
        if not faces:
            return None
        box = faces[0]
        side = max(box.right - box.left, box.bottom - box.top)
        cx, cy = (box.left + box.right) // 2, (box.top + box.bottom) // 2
        padded = np.pad(frame, ((side, side), (side, side), (0, 0)), mode="edge")
        crop = padded[cy - side // 2 + side : cy + side // 2 + side,
                      cx - side // 2 + side : cx + side // 2 + side]  # fmt: skip
        crop = cv2.resize(crop, (ARCFACE_SIDE, ARCFACE_SIDE), interpolation=cv2.INTER_LINEAR)
        x = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        name = self.session.get_inputs()[0].name
        return np.asarray(self.session.run(None, {name: x})[0][0], dtype=np.float64)

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def build_embedder(kind: str, weights: str):
    """The configured embedder; raises FaceToolsMissing (a reason to report) when unusable."""
    if kind == "dlib":
        return DlibEmbedder()
    if kind == "arcface_onnx":
        return ArcFaceOnnxEmbedder(weights)
    raise ValueError(f"metrics.identity={kind!r}: use 'dlib' or 'arcface_onnx'")


def sample_indices(count: int, limit: int) -> np.ndarray:
    """Up to ``limit`` frame indices spread evenly over ``count`` frames (first and last kept)."""
    if limit <= 0 or count <= limit:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, limit)).astype(int))


class ReferenceEmbeddings:
    """The reference face's embedding, computed once per clip (three candidates share it)."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder
        self._cache: dict[tuple[str, int], np.ndarray | None] = {}

    def __call__(self, key: str, reference: np.ndarray) -> np.ndarray | None:
        tag = (key, hash(reference.tobytes()))
        if tag not in self._cache:
            self._cache[tag] = self.embedder.embed(reference)
        return self._cache[tag]


def unavailable(keys: dict[str, tuple[str, bool]], reason: str) -> dict[str, MetricValue]:
    """``{key: None with reason}`` for keys mapping to (method, higher_is_better)."""
    return {k: MetricValue.missing(method, reason, better) for k, (method, better) in keys.items()}
