"""Checkpoint integrity: a sha256 manifest per checkpoint, checked before anything loads it.

A DCP checkpoint folder ``step-N/`` counts as *committed* only once ``manifest.json`` sits in it:
written (atomically, last) after every rank's files and DCP's ``.metadata`` are on disk, listing
each file's size and sha256. So:

* a run killed while writing a checkpoint leaves a folder without a manifest: at the next start
  it is moved to ``<stage>/checkpoints-quarantine/`` (never deleted) and the newest committed
  checkpoint is used;
* a flipped byte, a truncated or a missing file is found by :func:`verify` and named by file
  before torch reads a byte of it; the run refuses (``checkpoint.on_corrupt: "fail"``, the
  default) or quarantines it and falls back to the previous committed one (``"previous"``);
* retention (``keep_latest_k``) counts committed checkpoints only, so the newest complete one is
  never deleted in favour of one being written.

Hashing is split across ranks by the caller (``titan/trainer.py``): :func:`hash_files` takes any
subset of the files, and the manifest is the union. This module does not import torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

import orjson

from phi4_engine.errors import CheckpointError
from phi4_engine.rundir import atomic_write

MANIFEST = "manifest.json"
FORMAT = "phi4-engine-checkpoint"
QUARANTINE = "checkpoints-quarantine"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dirs(folder: str | os.PathLike[str]) -> dict[int, Path]:
    """``{step: path}`` of the ``step-N`` folders in ``folder`` (committed or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for entry in folder.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def checkpoint_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file of a checkpoint folder except the manifest, relative and sorted."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(path: str | os.PathLike[str], files: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """``{file: {"size", "sha256"}}`` for ``files`` of the checkpoint at ``path``."""
    entries: dict[str, dict[str, int | str]] = {}
    for name in files:
        with open(Path(path) / name, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            entries[name] = {"size": f.tell(), "sha256": digest}
    return entries


def write_manifest(path: str | os.PathLike[str], step: int, entries: dict[str, dict[str, int | str]]) -> None:
    """Commit the checkpoint at ``path``: its manifest, written atomically and last."""
    manifest = {"format": FORMAT, "version": 1, "step": step, "files": dict(sorted(entries.items()))}
    atomic_write(Path(path) / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


def read_manifest(path: str | os.PathLike[str]) -> dict | None:
    """The manifest of a checkpoint, or None when it has none (not committed)."""
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = orjson.loads(file.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{file}: not a {FORMAT} manifest")
    return manifest


def is_committed(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def problems(path: str | os.PathLike[str], files: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the committed checkpoint at ``path`` (empty: intact), checking
    ``files`` of its manifest (default: all of them, and that no file is unlisted). Cheap checks
    (missing file, size) come first, so a truncated file is named without hashing it."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return [f"{path}: no {MANIFEST} (the checkpoint was never committed)"]
    listed: dict[str, dict] = manifest["files"]
    found = []
    for name in sorted(listed) if files is None else files:
        expected, file = listed[name], path / name
        if not file.is_file():
            found.append(f"{file}: missing (listed in {MANIFEST})")
        elif file.stat().st_size != expected["size"]:
            found.append(f"{file}: {file.stat().st_size} bytes, {MANIFEST} says {expected['size']}")
        else:
            actual = hash_files(path, [name])[name]["sha256"]
            if actual != expected["sha256"]:
                found.append(f"{file}: sha256 {actual[:12]}… differs from {MANIFEST}'s {str(expected['sha256'])[:12]}…")
    return found + (unlisted(path, manifest) if files is None else [])


def unlisted(path: str | os.PathLike[str], manifest: dict) -> list[str]:
    """Files in the checkpoint folder that its manifest does not list (added after the commit)."""
    return [f"{Path(path) / name}: not listed in {MANIFEST}" for name in checkpoint_files(path) if name not in manifest["files"]]


def verify(path: str | os.PathLike[str]) -> None:
    """Raise CheckpointError naming the first bad file of the checkpoint at ``path``."""
    found = problems(path)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CheckpointError(f"corrupt checkpoint: {found[0]}{more}; refusing to load it")


def quarantine(path: str | os.PathLike[str], reason: str) -> Path:
    """Move a checkpoint folder out of ``checkpoints/`` into ``<stage>/checkpoints-quarantine/``
    (nothing is deleted: a person may want to look at it)."""
    path = Path(path)
    target_dir = path.parent.parent / QUARANTINE
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{path.name}.{reason}-{int(time.time() * 1000)}"
    shutil.move(str(path), str(target))
    return target


def purge(folder: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest committed checkpoints (0: keep all); uncommitted
    folders are left alone (the newest may be one being written). Returns what was deleted."""
    if keep <= 0:
        return []
    committed = [p for p in step_dirs(folder).values() if is_committed(p)]
    doomed = committed[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
