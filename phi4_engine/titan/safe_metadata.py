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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            where = getattr(self, "source", "checkpoint metadata")
            raise CheckpointError(
                f"{where}: refusing to unpickle {module}.{name} (not a DCP metadata class; "
                "the checkpoint may have been tampered with)"
            )
        return super().find_class(module, name)


def safe_load(file: io.BufferedIOBase) -> Any:
    """``pickle.load`` restricted to DCP metadata classes."""
    unpickler = _MetadataUnpickler(file)
    unpickler.source = getattr(file, "name", "checkpoint metadata")  # type: ignore[attr-defined]
    return unpickler.load()


def install() -> None:
    """Give torch's DCP filesystem module a ``pickle`` whose ``load`` is :func:`safe_load`
    (``dump``, used to write metadata, and everything else are the real module's)."""
    if isinstance(dcp_filesystem.pickle, types.SimpleNamespace):
        return
    restricted = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    restricted.load = safe_load
    dcp_filesystem.pickle = restricted
