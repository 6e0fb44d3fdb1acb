"""Weights on disk: safetensors only (never pickle), atomic writes, strict loads with a diff."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

SHOWN_PER_KIND = 10


class WeightsMismatch(ValueError):
    """A state dict does not fit a module: names what was loaded, from where, and the diff."""


def save_safetensors(
    tensors: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` atomically: readers see the old file or the whole new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Own contiguous CPU copies: safetensors refuses views and tensors that share storage.
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        save_file(owned, tmp_name, metadata=dict(metadata) if metadata else None)
        with open(tmp_name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a safetensors file to CPU tensors; a clear error if it is missing or not safetensors."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"weights file not found: {source}")
    try:
        return load_file(str(source), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{source} is not a readable safetensors file ({err}); only safetensors weights "
            "are loaded, never pickled checkpoints"
        ) from err


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"    {item}" for item in items[:SHOWN_PER_KIND]]
    more = len(items) - SHOWN_PER_KIND
    tail = [f"    ... and {more} more"] if more > 0 else []
    return [f"  {title} ({len(items)}):", *shown, *tail]


def state_dict_diff(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """Human-readable lines for missing keys, unexpected keys and shape mismatches (empty = fits)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{name}: expected {tuple(expected[name].shape)}, got {tuple(given[name].shape)}"
        for name in sorted(set(expected) & set(given))
        if tuple(expected[name].shape) != tuple(given[name].shape)
    ]
    return [
        *_listing("missing keys", missing),
        *_listing("unexpected keys", unexpected),
        *_listing("shape mismatches", mismatched),
    ]


def load_strict(
    module: nn.Module,
    path_or_dict: str | os.PathLike[str] | Mapping[str, Tensor],
    what: str,
) -> nn.Module:
    """Load weights into ``module`` only if keys and shapes match exactly; returns the module."""
    if isinstance(path_or_dict, Mapping):
        state, source = dict(path_or_dict), "<in-memory state dict>"
    else:
        state, source = load_state_dict_file(path_or_dict), str(path_or_dict)
    diff = state_dict_diff(module.state_dict(), state)
    if diff:
        raise WeightsMismatch(
            "\n".join([f"{what} weights from {source} do not match the model:", *diff])
        )
    module.load_state_dict(state, strict=True)
    return module


INFERENCE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def export_for_inference(
    weights: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    dtype: str = "bfloat16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a module's (or state dict's) weights as one safetensors file for inference.

    Floating-point tensors are cast to ``dtype`` (integer buffers are kept); ``metadata`` (e.g.
    the run's resolved model config as YAML) goes into the file header. ``load_strict`` loads
    the file back into a freshly built module of any dtype.
    """
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"export dtype={dtype!r} not in {sorted(INFERENCE_DTYPES)}")
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    target_dtype = INFERENCE_DTYPES[dtype]
    cast = {name: t.to(target_dtype) if t.is_floating_point() else t for name, t in state.items()}
    header = {"format": "pt", "dtype": dtype, **(dict(metadata) if metadata else {})}
    save_safetensors(cast, path, metadata=header)
    return Path(path)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
