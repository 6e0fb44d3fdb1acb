"""Plug in another VAE, text encoder or audio encoder with ``_target_``.

Set ``model.vae._target_=my_pkg.vaes.build_my_vae`` (likewise ``model.text_encoder._target_``,
``model.audio_encoder._target_``): the dotted path names a class or function that is called
with that part's config dataclass (VAEConfig, TextEncoderConfig, AudioEncoderConfig; its
``pretrained`` path included) and returns an ``nn.Module`` with the interface below. The
rest of the model only ever uses that interface, so the adapter wraps any implementation.

- VAE: ``encode(video (B, 3, T, H, W) in [-1, 1]) -> latents (B, latent_channels, L, H/8, W/8)``
  and ``decode(latents) -> video``, causal in time with T = 1 + 4 (L - 1), i.e. the shapes of
  this project's CausalVAE; set ``model.vae.latent_channels`` to its channel count.
- text encoder: ``forward(captions: list[str]) -> (embeddings (B, tokens, dim), bool mask
  (B, tokens))`` and a ``dim`` attribute equal to ``model.text_encoder.d_model``.
- audio encoder: ``forward(waveform (B, samples) at 16 kHz, num_frames) -> (B, num_frames,
  dim)`` and a ``dim`` attribute equal to ``model.audio_encoder.feature_dim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    "vae": ("encode", "decode"),
    "text_encoder": ("forward", "dim"),
    "audio_encoder": ("forward", "dim"),
}


class AdapterError(ValueError):
    """A ``_target_`` that cannot be imported or does not build a fitting module."""


def resolve_target(target: str, key: str) -> Callable[..., Any]:
    from hydra.utils import get_object

    try:
        factory = get_object(target)
    except Exception as err:  # noqa: BLE001 - hydra wraps import errors in several types
        raise AdapterError(
            f"model.{key}._target_={target!r} cannot be imported ({err}); give the dotted "
            "path of a class or function, e.g. my_pkg.vaes.build_vae"
        ) from err
    if not callable(factory):
        raise AdapterError(f"model.{key}._target_={target!r} is not callable")
    return factory


def build_part(key: str, cfg: Any, default: Callable[[Any], nn.Module]) -> nn.Module:
    """``default(cfg)``, or the module ``cfg._target_`` builds from ``cfg`` (checked)."""
    target = getattr(cfg, "_target_", "")
    if not target:
        return default(cfg)
    part = resolve_target(target, key)(cfg)
    if not isinstance(part, nn.Module):
        raise AdapterError(
            f"model.{key}._target_={target!r} returned {type(part).__name__}, not an "
            "nn.Module; wrap it in one (see omni_train/models/adapters.py)"
        )
    missing = [name for name in REQUIRED_METHODS[key] if not hasattr(part, name)]
    if missing:
        raise AdapterError(
            f"model.{key}._target_={target!r} built {type(part).__name__} without "
            f"{missing}; the {key} interface is {list(REQUIRED_METHODS[key])} "
            "(see omni_train/models/adapters.py)"
        )
    check_dim(key, part, cfg, target)
    return part


def check_dim(key: str, part: nn.Module, cfg: Any, target: str) -> None:
    expected = {
        "text_encoder": ("d_model", lambda c: c.d_model),
        "audio_encoder": ("feature_dim", lambda c: c.feature_dim),
    }.get(key)
    if expected is None:
        return
    field, value = expected
    if int(part.dim) != value(cfg):
        raise AdapterError(
            f"model.{key}._target_={target!r} gives features of dim {int(part.dim)} but "
            f"model.{key}.{field} is {value(cfg)}; make them equal"
        )
