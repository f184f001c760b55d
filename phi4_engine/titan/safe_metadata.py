"""Load DCP checkpoint metadata without unpickling arbitrary objects.

A DCP checkpoint's ``.metadata`` file is a pickle (``torch/distributed/checkpoint/filesystem.py``
``FileSystemReader.read_metadata`` calls ``pickle.load``): a checkpoint from someone else could
run code the moment it is opened, before the sha256 manifest could help (whoever wrote the
pickle can write the manifest too). Tensors and the other saved objects are already read with
``torch.load(weights_only=True)``; this closes the metadata hole by giving that module a
``pickle`` whose ``load`` only rebuilds the metadata classes DCP itself writes (listed below,
found by recording what real engine checkpoints reference). Anything else is refused with a
one-line :class:`~phi4_engine.errors.CheckpointError` naming the global and the file.
"""

from __future__ import annotations

import io
import os
import pickle
import types
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata

from phi4_engine.errors import CheckpointError

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # rebuilds a torch.layout from its name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module == dcp_metadata.__name__:  # its dataclasses and enums (not functions)
        value = getattr(dcp_metadata, name, None)
        return isinstance(value, type) and value.__module__ == module
    return False


class ForeignPickle(BaseException):
    """Raised by the restricted unpickler. A BaseException on purpose: DCP's loader catches
    ``Exception`` from ``read_metadata`` and falls back to other metadata files, which would
    hide the refusal; callers turn it into :class:`CheckpointError` (:func:`as_checkpoint_error`)."""


def as_checkpoint_error(exc: ForeignPickle) -> CheckpointError:
    return CheckpointError(str(exc))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            where = getattr(self, "source", "checkpoint metadata")
            raise ForeignPickle(
                f"{where}: refusing to unpickle {module}.{name} (not a DCP metadata class; "
                "the checkpoint may have been tampered with)"
            )
        return super().find_class(module, name)


def safe_load(file: io.BufferedIOBase) -> Any:
    """``pickle.load`` restricted to DCP metadata classes."""
    unpickler = _MetadataUnpickler(file)
    unpickler.source = getattr(file, "name", "checkpoint metadata")  # type: ignore[attr-defined]
    return unpickler.load()


def read_metadata(folder: str | os.PathLike[str]) -> Any:
    """The DCP metadata of the checkpoint in ``folder`` (restricted unpickling; a refusal is a
    :class:`CheckpointError`)."""
    try:
        return dcp_filesystem.FileSystemReader(str(folder)).read_metadata()
    except ForeignPickle as exc:
        raise as_checkpoint_error(exc) from None


def install() -> None:
    """Give torch's DCP filesystem module a ``pickle`` whose ``load`` is :func:`safe_load`
    (``dump``, used to write metadata, and everything else are the real module's)."""
    if isinstance(dcp_filesystem.pickle, types.SimpleNamespace):
        return
    restricted = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    restricted.load = safe_load
    dcp_filesystem.pickle = restricted
