"""A SyncNet scorer (Chung & Zisserman, "Out of time", 2016) over weights from a local path.

No SyncNet weights ship in any package, so nothing here downloads: ``weights`` names a
state dict (``.safetensors``, or a ``.pt`` / ``.pth`` / ``.model`` file loaded with
``weights_only=True``) whose keys match ``SyncNet`` below (the public model's layer layout:
``netcnnaud``, ``netfcaud``, ``netcnnlip``, ``netfclip``). Inputs follow the original
recipe: clips at 25 fps, face crops resized to 224 x 224 RGB, windows of 5 frames against 20
MFCC frames (13 coefficients at 100 Hz). Scores: ``sync_c`` (median minus minimum of the mean
audio-video distance over offsets +-``max_offset`` frames, SyncNet's confidence),
``sync_distance`` (that minimum) and ``sync_offset`` (seconds, + = audio after the lips).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipelines.media import resample_audio

SYNCNET_FPS = 25.0
SYNCNET_RATE = 16000
CROP_SIDE = 224
WINDOW = 5  # video frames per embedding (0.2 s)
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps


def _conv2d(cin: int, cout: int, kernel, padding=1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU(True)]


def _conv3d(cin: int, cout: int, kernel, stride=1, padding=0) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, kernel, stride, padding), nn.BatchNorm3d(cout), nn.ReLU(True)]


def _head() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(True), nn.Linear(512, 1024)
    )


class SyncNet(nn.Module):
    """Audio (1 x 13 x 20 MFCC) and lip (3 x 5 x 224 x 224) streams -> 1024-d embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv2d(1, 64, 3), nn.MaxPool2d(1, 1),
            *_conv2d(64, 192, 3), nn.MaxPool2d(3, (1, 2)),
            *_conv2d(192, 384, 3), *_conv2d(384, 256, 3), *_conv2d(256, 256, 3),
            nn.MaxPool2d(3, 2),
            *_conv2d(256, 512, (5, 4), padding=0),
        )  # fmt: skip
        self.netfcaud = _head()
        self.netcnnlip = nn.Sequential(
            *_conv3d(3, 96, (5, 7, 7), (1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *_conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *_conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *_conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv3d(256, 512, (1, 6, 6)),
        )  # fmt: skip
        self.netfclip = _head()

    def audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def lips(self, frames: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def load_syncnet(weights: str) -> SyncNet:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"annotators.lip_sync.syncnet_weights={weights} is not a file: give a local SyncNet "
            "state dict (.safetensors or .pt), or leave it empty for the labelled proxy"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    model = SyncNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"annotators.lip_sync.syncnet_weights={weights} does not fit SyncNet's layers "
            f"(netcnnaud/netfcaud/netcnnlip/netfclip): {str(err).splitlines()[0]}"
        ) from err
    return model.eval()


def _mel_filters(rate: int, nfft: int, count: int) -> np.ndarray:
    def mel(hz):
        return 2595 * np.log10(1 + hz / 700.0)

    def hz(m):
        return 700 * (10 ** (m / 2595.0) - 1)

    points = np.floor((nfft + 1) * hz(np.linspace(mel(0), mel(rate / 2), count + 2)) / rate)
    bank = np.zeros((count, nfft // 2 + 1))
    for j in range(count):
        lo, mid, hi = int(points[j]), int(points[j + 1]), int(points[j + 2])
        bank[j, lo:mid] = (np.arange(lo, mid) - lo) / max(1, mid - lo)
        bank[j, mid:hi] = (hi - np.arange(mid, hi)) / max(1, hi - mid)
    return bank


def mfcc(audio: np.ndarray, rate: int = SYNCNET_RATE) -> np.ndarray:
    """(13, frames) MFCC at 100 Hz: 25 ms Hamming-free frames, pre-emphasis 0.97, 26 mel
    bands, DCT-II, lifter 22, first coefficient replaced by the log frame energy."""
    signal = np.append(audio[:1], audio[1:] - 0.97 * audio[:-1]).astype(np.float64)
    length, hop, nfft = round(0.025 * rate), round(0.01 * rate), 512
    count = 1 + max(0, int(np.ceil((len(signal) - length) / hop)))
    signal = np.pad(signal, (0, (count - 1) * hop + length - len(signal)))
    frames = np.stack([signal[i * hop : i * hop + length] for i in range(count)])
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    energy = np.maximum(power.sum(axis=1), np.finfo(float).eps)
    bands = np.log(np.maximum(power @ _mel_filters(rate, nfft, 26).T, np.finfo(float).eps))
    n = np.arange(26)
    dct = np.cos(np.pi / 26 * (n[None, :] + 0.5) * np.arange(13)[:, None]) * np.sqrt(2 / 26)
    dct[0] /= np.sqrt(2)
    coefficients = bands @ dct.T
    coefficients *= 1 + 11 * np.sin(np.pi * np.arange(13) / 22)
    coefficients[:, 0] = np.log(energy)
    return coefficients.T.astype(np.float32)


def face_crops(frames: np.ndarray, boxes: list, scale: float) -> np.ndarray | None:
    """(T, 224, 224, 3) crops of the largest face per frame (box grown by ``scale`` on each
    side, square), or None when a frame has no face."""
    import cv2

    height, width = frames.shape[1:3]
    crops = []
    for frame, faces in zip(frames, boxes, strict=True):
        if not faces:
            return None
        x, y, w, h, _ = max(faces, key=lambda b: b[2] * b[3])
        cx, cy = (x + w / 2) * width, (y + h / 2) * height
        half = max(w * width, h * height) * (0.5 + scale)
        padded = np.pad(frame, ((int(half) + 1,) * 2, (int(half) + 1,) * 2, (0, 0)), mode="edge")
        top, left = int(cy - half) + int(half) + 1, int(cx - half) + int(half) + 1
        side = max(2, int(2 * half))
        crop = padded[top : top + side, left : left + side]
        crops.append(cv2.resize(crop, (CROP_SIDE, CROP_SIDE), interpolation=cv2.INTER_AREA))
    return np.stack(crops)


@torch.inference_mode()
def sync_scores(
    model: SyncNet, crops: np.ndarray, audio: np.ndarray, max_offset: int, batch: int = 16
) -> tuple[float, float, int] | None:
    """(sync_c, min mean distance, offset in frames) or None when the clip is too short."""
    features = mfcc(audio)
    windows = min(len(crops) - WINDOW + 1, features.shape[1] // MFCC_PER_FRAME - WINDOW + 1)
    if windows < 2 * max_offset + 1:
        return None
    video = torch.from_numpy(crops).float().permute(3, 0, 1, 2)  # (3, T, H, W)
    lips, voice = [], []
    for start in range(0, windows, batch):
        stop = min(windows, start + batch)
        lips.append(model.lips(torch.stack([video[:, t : t + WINDOW] for t in range(start, stop)])))
        mel = [
            features[:, t * MFCC_PER_FRAME : (t + WINDOW) * MFCC_PER_FRAME]
            for t in range(start, stop)
        ]
        voice.append(model.audio(torch.from_numpy(np.stack(mel))[:, None]))
    v, a = torch.cat(lips), torch.cat(voice)
    offsets = range(-max_offset, max_offset + 1)
    distances = []
    for k in offsets:
        lo, hi = max(0, -k), min(windows, windows - k)
        distances.append(float((v[lo:hi] - a[lo + k : hi + k]).norm(dim=1).mean()))
    distances_np = np.array(distances)
    best = int(distances_np.argmin())
    return (
        float(np.median(distances_np) - distances_np[best]),
        float(distances_np[best]),
        offsets[best],
    )


def prepare_audio(audio: np.ndarray, rate: int) -> np.ndarray:
    return resample_audio(audio, rate, SYNCNET_RATE)
