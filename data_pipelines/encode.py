"""Optional encode stage: precomputed VAE latents, text and audio in shards with the same keys.

    python -m data_pipelines.encode input_dir=DATA output_dir=ENC [seed=0 audio_features=true \
        text_embeddings=false] \
        [training overrides: experiment=NAME model.vae.pretrained=... data.resolution=...]

Every argument that is not one of EncodeConfig's fields is a training override: the training
config (conf/train.yaml) is composed with them, so the latents come from exactly the VAE,
resolution, window length and frame rate the training run will use (with
``data.precomputed=true``). Per input sample, one window is chosen (seeded by the key), decoded
as training would (omni_train.data.decode) and encoded with the project's own frozen encoders:

  json                the input's metadata, describing the encoded window: num_frames, fps,
                      width, height and keypoints (normalised to the output frame) are the
                      window's; ``encoded`` records the source shard, window start and model
  latents.npy         (C, T', h, w) float32 VAE latents of the window
  ref_latents.npy     (C, 1, h, w) of the reference frame (outside the window when possible)
  text_embeddings.npy (Ltok, D) float32 text-encoder output for the caption, its valid
                      (unpadded) tokens only; skipped with ``text_embeddings=false``
  audio.npy           (S,) float32 16 kHz waveform of the window, when the clip has audio
  audio_features.npy  (T, D) audio-encoder features, with ``audio_features=true``

Arrays are plain .npy (saved with allow_pickle=False). ENC/shards/NAME.tar mirrors
DATA/shards/NAME.tar; each is written atomically and recorded in ENC/progress/, so a re-run
skips finished shards. Samples that cannot be decoded go to ENC/rejects.jsonl.
On a cluster, GPUs run this once instead of decoding and encoding every epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import tarfile
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines.writer import TarShard, write_atomic, write_if_changed
from omni_train.contracts import CONDITIONS

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class EncodeConfig:
    input_dir: str = ""  # a shard job's output_dir (its shards/*.tar are read)
    output_dir: str = ""
    seed: int = 0  # window choice per key and the init of randomly initialised encoders
    audio_features: bool = False
    text_embeddings: bool = True  # store the caption's text-encoder output per sample
    device: str = "cpu"


def training_config(overrides: list[str]):
    """The composed, typed training config (omni_train.config.TrainConfig)."""
    from omni_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=overrides))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _read_shard(path: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


class Encoder:
    def __init__(self, cfg: EncodeConfig, train_cfg) -> None:
        from omni_train.models.encoders import build_frozen_encoders

        self.cfg, self.data = cfg, train_cfg.data
        torch.manual_seed(cfg.seed)  # random-init encoders: the same weights on every run
        self.encoders = build_frozen_encoders(train_cfg.model).to(cfg.device).eval()
        self.model_name = str(getattr(train_cfg.model, "name", "model"))

    def sample(self, raw: dict, shard: str) -> dict[str, bytes]:
        from omni_train.data.decode import decode_sample

        key = raw["__key__"]
        rng = np.random.default_rng([self.cfg.seed, zlib.crc32(key.encode("utf-8"))])
        decoded = decode_sample(raw, self.data, rng)
        device = self.cfg.device
        with torch.no_grad():
            latents = self.encoders.encode_video(decoded["video"][None].to(device))[0]
            ref = self.encoders.encode_video(decoded["ref"][None, :, None].to(device))[0]
        meta = json.loads(raw["json"])
        height, width = self.data.resolution
        meta.update(
            num_frames=int(decoded["video"].shape[1]), fps=float(self.data.fps),
            width=int(width), height=int(height),
            keypoints=np.round(decoded["keypoints"].numpy().astype(np.float64), 4).tolist(),
            keypoints_format="coco17",
            encoded={"source_shard": shard, "model": self.model_name, "seed": self.cfg.seed},
        )  # fmt: skip
        members = {
            "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
            "latents.npy": _npy(latents.cpu().numpy()),
            "ref_latents.npy": _npy(ref.cpu().numpy()),
        }
        if self.cfg.text_embeddings:
            members["text_embeddings.npy"] = _npy(self.text(str(decoded["caption"])))
        if decoded["has_audio"]:
            members["audio.npy"] = _npy(decoded["audio"].numpy())
            if self.cfg.audio_features:
                with torch.no_grad():
                    features = self.encoders.encode_audio(
                        decoded["audio"][None].to(device), int(decoded["video"].shape[1])
                    )[0]
                members["audio_features.npy"] = _npy(features.cpu().numpy())
        return members

    def text(self, caption: str) -> np.ndarray:
        """(Ltok, D): the caption's valid tokens; the loader pads a batch and rebuilds the mask."""
        with torch.no_grad():
            embeddings, mask = self.encoders.encode_text([caption])
        return embeddings[0][mask[0].to(embeddings.device)].float().cpu().numpy()


def run_encode(cfg: EncodeConfig, overrides: list[str]) -> dict:
    """Encode every shard of cfg.input_dir; returns counts (also in ENC/stats.json)."""
    from omni_train.data.decode import CorruptSample

    input_dir, output_dir = Path(cfg.input_dir).resolve(), Path(cfg.output_dir).resolve()
    shards = sorted((input_dir / "shards").glob("*.tar"))
    if not shards:
        raise ValueError(
            f"input_dir={cfg.input_dir} has no shards/*.tar: pass a data_pipelines.shard "
            "output_dir as input_dir"
        )
    if output_dir == input_dir:
        raise ValueError("output_dir must differ from input_dir (the raw shards stay as they are)")
    # The training config needs a run_dir; nothing is written there.
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = [] if "run_dir" in given else [f"run_dir={output_dir}"]
    train_cfg = training_config(overrides + extra)
    settings = {"encode": asdict(cfg) | {"input_dir": "", "output_dir": ""},
                "overrides": sorted(overrides)}  # fmt: skip
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    encoder = None
    manifest, rejects = [], []
    for shard in shards:
        record_path = output_dir / "progress" / f"{shard.stem}.json"
        out = output_dir / "shards" / shard.name
        expected = {"input_bytes": shard.stat().st_size, "settings": digest}
        if record_path.is_file() and out.is_file():
            record = json.loads(record_path.read_text())
            if {k: record.get(k) for k in expected} == expected and record.get(
                "output_bytes"
            ) == out.stat().st_size:
                manifest += record["manifest"]
                rejects += record["rejects"]
                continue
        encoder = encoder or Encoder(cfg, train_cfg)
        writer, rows, bad = TarShard(out), [], []
        try:
            for raw in _read_shard(shard):
                try:
                    members = encoder.sample(raw, f"shards/{shard.name}")
                except CorruptSample as err:
                    bad.append({"key": raw["__key__"], "shard": f"shards/{shard.name}",
                                "reason": "undecodable", "detail": str(err)})  # fmt: skip
                    continue
                writer.add(raw["__key__"], members)
                meta = json.loads(members["json"])
                rows.append({"key": raw["__key__"], "shard": f"shards/{shard.name}",
                             "source": meta.get("source"), "quality": {
                                 c: meta["quality"][c] for c in CONDITIONS}})  # fmt: skip
        except BaseException:
            writer.abort()
            raise
        size = writer.finish()
        write_atomic(record_path, json.dumps({**expected, "output_bytes": size,
                                              "manifest": rows, "rejects": bad}).encode())  # fmt: skip
        manifest += rows
        rejects += bad
    stats = {"shards": len(shards), "encoded": len(manifest), "rejected": len(rejects)}
    for name, rows in (("manifest.jsonl", manifest), ("rejects.jsonl", rejects)):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_if_changed(output_dir / name, text.encode("utf-8"))
    write_if_changed(output_dir / "stats.json", (json.dumps(stats, indent=2) + "\n").encode())
    return stats


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    own = {f.name for f in fields(EncodeConfig)}
    mine, overrides = {}, []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name in own:
            mine[name] = value
        else:
            overrides.append(arg)
    for key in ("input_dir", "output_dir"):
        if not mine.get(key):
            log.error("%s is required: python -m data_pipelines.encode input_dir=DATA "
                      "output_dir=ENC [training overrides]", key)  # fmt: skip
            return 2
    cfg = EncodeConfig(
        input_dir=mine["input_dir"], output_dir=mine["output_dir"],
        seed=int(mine.get("seed", 0)),
        audio_features=_flag(mine.get("audio_features", "false")),
        text_embeddings=_flag(mine.get("text_embeddings", "true")),
        device=mine.get("device", "cpu"),
    )  # fmt: skip
    try:
        stats = run_encode(cfg, overrides)
    except ValueError as err:
        log.error("%s", err)
        return 2
    log.info("encoded %d samples into %d shards (%d rejected): %s/shards/*.tar; train with "
             "data.precomputed=true", stats["encoded"], stats["shards"], stats["rejected"],
             Path(cfg.output_dir).resolve())  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
