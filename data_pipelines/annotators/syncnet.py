"""A SyncNet scorer (Chung & Zisserman, "Out of time", 2016) over weights from a local path.

No SyncNet weights ship in any package, so nothing here downloads: ``weights`` names a
state dict (``.safetensors``, or a ``.pt`` / ``.pth`` / ``.model`` file loaded with
``weights_only=True``) whose keys match ``SyncNet`` below (the public model's layer layout:
``netcnnaud``, ``netfcaud``, ``netcnnlip``, ``netfclip``; SyncNetModel.py:24-94 of
joonson/syncnet_python at 6efbb1c).

Every step follows that reference implementation (file:line at 6efbb1c):
- video at 25 fps, audio 16 kHz mono PCM16 (run_pipeline.py:283-290): audio given as floats
  in [-1, 1] is scaled by 32768 and rounded to int16 before the MFCC, as ``wavfile.read``
  hands the reference int16 samples (SyncNetInstance.py:83);
- MFCC: python_speech_features.mfcc defaults (SyncNetInstance.py:84): 25 ms frames every
  10 ms, no window, pre-emphasis 0.97, 512-point FFT, 26 mel bands 0-8 kHz, orthonormal DCT-II,
  13 coefficients, lifter 22, c0 replaced by the log frame energy; ``mfcc`` below reproduces
  it (tested against the package when installed);
- face crops (run_pipeline.py:119-147): box half-size s = max(w, h) / 2 and centre, each
  median-filtered over the track with kernel 13 (scipy's medfilt, zero-padded ends); the frame
  padded by int(s (1 + 2 c)) with the constant 110; rows cy - s .. cy + s (1 + 2 c), columns
  cx - s (1 + c) .. cx + s (1 + c), c = crop_scale 0.4; resized to 224 x 224 bilinearly;
  interior frames without a detection are linearly interpolated (run_pipeline.py:94-100);
- pixels: BGR (cv2.imread, SyncNetInstance.py:71), 0-255 floats, no normalisation (:77);
- windows: min_length = min(frames, floor(samples / 640)), embeddings for the
  min_length - 5 windows of 5 frames / 20 MFCC frames starting at frame i / MFCC 4 i
  (SyncNetInstance.py:97-118);
- offset search (calc_pdist, SyncNetInstance.py:19-31, 129-135): audio embeddings zero-padded
  by vshift on both ends, pairwise_distance (eps 1e-6) of video window i to audio windows
  i - vshift .. i + vshift, averaged over all windows (padding included); Sync-D = the minimum
  of that mean curve, Sync-C = its median minus the minimum, AV offset = vshift - argmin.
Not reproduced: the S3FD face detector and scene cuts (boxes come from the caller), and the
lossy re-encoding of crops to video and JPEG.

``sync_scores`` returns (Sync-C, Sync-D, k) with k = -AV offset (+ = audio after the lips),
the sign the annotations have always stored.
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
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
SMOOTH_KERNEL = 13  # median filter over the face track
PAD_VALUE = 110  # grey the reference pads frames with before cropping
MAX_GAP = 25  # frames without a detection bridged by interpolation (--num_failed_det)
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance's default


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


def load_syncnet(weights: str, option: str = "annotators.lip_sync.syncnet_weights") -> SyncNet:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{option}={weights} is not a file: give a local SyncNet "
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
            f"{option}={weights} does not fit SyncNet's layers "
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
    """(13, frames) MFCC at 100 Hz, python_speech_features.mfcc(audio, rate) transposed: 25 ms
    frames without a window, pre-emphasis 0.97, 26 mel bands, orthonormal DCT-II, lifter 22,
    first coefficient replaced by the log frame energy. Scale matters (c0 and the energy):
    the reference feeds int16 sample values."""
    signal = np.append(audio[:1], audio[1:] - 0.97 * audio[:-1]).astype(np.float64)
    length, hop, nfft = round(0.025 * rate), round(0.01 * rate), 512
    count = 1 + max(0, int(np.ceil((len(signal) - length) / hop)))
    signal = np.pad(signal, (0, (count - 1) * hop + length - len(signal)))
    frames = np.stack([signal[i * hop : i * hop + length] for i in range(count)])
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    eps = np.finfo(float).eps
    energy = power.sum(axis=1)
    energy = np.where(energy == 0, eps, energy)
    bands = power @ _mel_filters(rate, nfft, 26).T
    bands = np.log(np.where(bands == 0, eps, bands))
    n = np.arange(26)
    dct = np.cos(np.pi / 26 * (n[None, :] + 0.5) * np.arange(13)[:, None]) * np.sqrt(2 / 26)
    dct[0] /= np.sqrt(2)
    coefficients = bands @ dct.T
    coefficients *= 1 + 11 * np.sin(np.pi * np.arange(13) / 22)
    coefficients[:, 0] = np.log(energy)
    return coefficients.T.astype(np.float32)


def median_filter(values: np.ndarray, kernel: int = SMOOTH_KERNEL) -> np.ndarray:
    """scipy.signal.medfilt(values, kernel): sliding median over a zero-padded signal."""
    half = kernel // 2
    padded = np.pad(np.asarray(values, dtype=np.float64), half)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel)
    return np.median(windows, axis=1)


def _track(boxes: list, width: int, height: int) -> np.ndarray | None:
    """(T, 3) pixel centre x, centre y and half-size s of the largest face per frame; interior
    gaps up to MAX_GAP frames interpolated, None when the first / last frame has no face."""
    known, values = [], []
    for t, faces in enumerate(boxes):
        if faces:
            x, y, w, h, _ = max(faces, key=lambda b: b[2] * b[3])
            known.append(t)
            values.append(((x + w / 2) * width, (y + h / 2) * height,
                           max(w * width, h * height) / 2))  # fmt: skip
    if not known or known[0] != 0 or known[-1] != len(boxes) - 1:
        return None
    if len(known) > 1 and np.diff(known).max() > MAX_GAP + 1:
        return None
    frames, values = np.arange(len(boxes)), np.array(values)
    return np.stack([np.interp(frames, known, values[:, k]) for k in range(3)], axis=1)


def face_crops(frames: np.ndarray, boxes: list, scale: float) -> np.ndarray | None:
    """(T, 224, 224, 3) RGB crops of the largest face per frame as the reference cuts them
    (run_pipeline.py:119-147); ``boxes`` per frame: [[x, y, w, h, score], ...] normalised to
    the frame. None when the face track does not cover the clip."""
    import cv2

    height, width = frames.shape[1:3]
    track = _track(boxes, width, height)
    if track is None:
        return None
    # The reference's tracks are >= 100 frames; a shorter clip gets the largest odd kernel
    # that fits it, or the zero padding would outvote the detections.
    kernel = min(SMOOTH_KERNEL, len(track) - (1 - len(track) % 2))
    cx, cy, size = (median_filter(track[:, k], kernel) for k in range(3))
    crops = []
    for t, frame in enumerate(frames):
        s = size[t]
        pad = int(s * (1 + 2 * scale))
        padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=PAD_VALUE)
        my, mx = cy[t] + pad, cx[t] + pad
        face = padded[int(my - s) : int(my + s * (1 + 2 * scale)),
                      int(mx - s * (1 + scale)) : int(mx + s * (1 + scale))]  # fmt: skip
        if face.size == 0:
            return None
        crops.append(cv2.resize(face, (CROP_SIDE, CROP_SIDE), interpolation=cv2.INTER_LINEAR))
    return np.stack(crops)


def pcm16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] as the int16 sample values the reference reads from its wav."""
    return np.clip(np.round(np.asarray(audio, np.float64) * 32768), -32768, 32767).astype(np.int16)


@torch.inference_mode()
def embeddings(
    model: SyncNet, crops: np.ndarray, audio: np.ndarray, batch: int = 20
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Lip and audio embeddings of the min_length - 5 windows (SyncNetInstance.py:97-121):
    ``crops`` (T, 224, 224, 3) RGB uint8 at 25 fps, ``audio`` int16 samples at 16 kHz. None
    when too short."""
    features = mfcc(audio)
    min_length = min(len(crops), len(audio) // SAMPLES_PER_FRAME)
    windows = min_length - WINDOW
    if windows < 1:
        return None
    # BGR, 0-255 floats: the reference reads its crops with cv2.imread.
    video = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).float().permute(3, 0, 1, 2)
    lips, voice = [], []
    for start in range(0, windows, batch):
        stop = min(windows, start + batch)
        lips.append(model.lips(torch.stack([video[:, t : t + WINDOW] for t in range(start, stop)])))
        mel = [
            features[:, t * MFCC_PER_FRAME : t * MFCC_PER_FRAME + WINDOW * MFCC_PER_FRAME]
            for t in range(start, stop)
        ]
        voice.append(model.audio(torch.from_numpy(np.stack(mel)).float()[:, None]))
    return torch.cat(lips), torch.cat(voice)


def distance_curve(lips: torch.Tensor, voice: torch.Tensor, vshift: int) -> np.ndarray:
    """(2 vshift + 1,) mean distance per shift j, pairing video window i with audio window
    i + j - vshift, zero embeddings beyond the ends (calc_pdist, SyncNetInstance.py:19-31)."""
    padded = torch.nn.functional.pad(voice, (0, 0, vshift, vshift))
    span = 2 * vshift + 1
    rows = [
        torch.nn.functional.pairwise_distance(
            lips[[i]].repeat(span, 1), padded[i : i + span], eps=PAIRWISE_EPS
        )
        for i in range(len(lips))
    ]
    return torch.stack(rows, 1).mean(1).double().numpy()


def scores_from_curve(curve: np.ndarray, vshift: int) -> tuple[float, float, int]:
    """(Sync-C, Sync-D, AV offset) as SyncNetInstance.py:132-135 reads them: torch.median
    (the lower middle value for an even count), min, vshift - argmin."""
    best = int(np.argmin(curve))
    median = float(torch.median(torch.from_numpy(curve)))
    return median - float(curve[best]), float(curve[best]), vshift - best


@torch.inference_mode()
def sync_scores(
    model: SyncNet, crops: np.ndarray, audio: np.ndarray, max_offset: int, batch: int = 20
) -> tuple[float, float, int] | None:
    """(Sync-C, Sync-D, offset k in frames, + = audio after the lips, = -AV offset) for RGB
    crops at 25 fps and 16 kHz float audio in [-1, 1]; None when the clip is too short."""
    found = embeddings(model, crops, pcm16(audio), batch)
    if found is None:
        return None
    confidence, distance, av_offset = scores_from_curve(distance_curve(*found, max_offset),
                                                        max_offset)  # fmt: skip
    return confidence, distance, -av_offset


def prepare_audio(audio: np.ndarray, rate: int) -> np.ndarray:
    return resample_audio(audio, rate, SYNCNET_RATE)
