"""phi4-engine: train a Phi-4-style model through the whole published recipe.

Import-light on purpose: ``import phi4_engine`` does not import torch or torchtitan, so the CLI's
``validate``, ``plugins`` and ``schema`` answer fast.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("phi4_engine")
"""Marker for hook implementations in plugins: ``@hookimpl def phi4_register_...``."""

__all__ = ["hookimpl", "__version__", "Engine"]


def __getattr__(name: str):
    if name == "Engine":
        from phi4_engine.engine import Engine

        return Engine
    raise AttributeError(name)
