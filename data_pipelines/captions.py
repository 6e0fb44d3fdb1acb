"""Captions manifest: path -> caption, from jsonl or csv, for a whole corpus at once.

jsonl: one object per line with the path under "path" (or "video", "file") and the text
under "caption" (or "text"). csv: a header row naming the same columns. Paths are relative to
input_dir (absolute paths inside it are accepted); a caption here wins over a NAME.txt sidecar.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

PATH_KEYS = ("path", "video", "file")
TEXT_KEYS = ("caption", "text")


def _pick(row: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    for key in keys:
        if key in row and row[key] is not None:
            return str(row[key])
    raise ValueError(f"{where}: no {what} column (expected one of {', '.join(keys)})")


def load_captions(manifest: Path, input_dir: Path) -> dict[str, str]:
    """{source (posix, relative to input_dir): caption}; raises ValueError naming the line."""
    if not manifest.is_file():
        raise ValueError(
            f"captions={manifest} is not a file: pass captions=FILE.jsonl or FILE.csv, or "
            "leave it empty to use NAME.txt sidecars"
        )
    suffix = manifest.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"captions={manifest}: expected a .jsonl or .csv file")
    text = manifest.read_text(encoding="utf-8-sig")
    rows: list[tuple[str, dict]] = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [(f"{manifest}:{n + 2}", row) for n, row in enumerate(reader)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{manifest}:{n}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{manifest}:{n}: expected an object with path and caption")
            rows.append((f"{manifest}:{n}", row))
    captions: dict[str, str] = {}
    for where, row in rows:
        path = Path(_pick(row, PATH_KEYS, where, "path"))
        if path.is_absolute():
            try:
                path = path.resolve().relative_to(input_dir)
            except ValueError as err:
                raise ValueError(f"{where}: {path} is outside input_dir={input_dir}") from err
        captions[path.as_posix()] = " ".join(_pick(row, TEXT_KEYS, where, "caption").split())
    return captions


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
