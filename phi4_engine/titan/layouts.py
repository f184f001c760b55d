"""A :class:`~phi4_engine.choices.Layout` (what the spec's parallelism section chose) as
torchtitan configuration, plus the checks that must fail before any training starts.

* :func:`resolve` fixes ``auto`` and ``-1`` degrees for the actual world size and model size;
* :func:`check` refuses what this machine cannot do (float8 without torchao, or on a CPU or a
  GPU older than SM89 without ``emulate``), in one line;
* :func:`apply` writes parallelism degrees, activation checkpointing, compile and mixed
  precision into a ``Trainer.Config``, and :func:`converters` gives the float8 model converter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
from torchtitan.components.quantization.float8 import Float8LinearConverter
from torchtitan.config import CompileConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from phi4_engine.choices import Layout
from phi4_engine.errors import EngineError

# auto: tensor parallelism once a model this large is trained on more GPUs than one node has.
AUTO_TP_MIN_PARAMS = 10e9
AUTO_TP_DEGREE = 8


def resolve(layout: Layout, world_size: int, n_params: int) -> Layout:
    """``layout`` with concrete degrees whose product is ``world_size`` (ValueError if none)."""
    if layout.auto:
        tp = AUTO_TP_DEGREE if n_params >= AUTO_TP_MIN_PARAMS and world_size > AUTO_TP_DEGREE and world_size % AUTO_TP_DEGREE == 0 else 1
        layout = dataclasses.replace(layout, auto=False, dp_shard=-1, tp=tp, dp_replicate=1)
    fixed = layout.dp_replicate * layout.tp
    if world_size % fixed:
        raise ValueError(
            f"replicate degree {layout.dp_replicate} × tensor-parallel degree {layout.tp} does not divide "
            f"the world size {world_size}"
        )
    shard = world_size // fixed if layout.dp_shard == -1 else layout.dp_shard
    if layout.dp_replicate * shard * layout.tp != world_size:
        raise ValueError(
            f"replicate {layout.dp_replicate} × shard {shard} × tensor-parallel {layout.tp} = "
            f"{layout.dp_replicate * shard * layout.tp}, but the world size is {world_size}"
        )
    return dataclasses.replace(layout, dp_shard=shard)


def check_tensor_parallel(layout: Layout, n_heads: int, n_kv_heads: int, flavor: str) -> None:
    """Tensor parallelism splits attention heads: the degree must divide both head counts."""
    for count, what in ((n_kv_heads, "key/value heads"), (n_heads, "attention heads")):
        if count % layout.tp:
            raise ValueError(f"tensor-parallel degree {layout.tp} does not divide the {flavor} model's {count} {what}")


def check(layout: Layout) -> None:
    """Raise EngineError (one line) when this machine cannot run ``layout`` as asked."""
    if layout.float8 is None:
        return
    if importlib.util.find_spec("torchao") is None:
        raise EngineError("parallelism.float8 needs torchao: pip install 'phi4-engine[float8]'")
    if layout.float8_emulate:
        if layout.compile:
            raise EngineError("parallelism.float8.emulate works in eager mode only: set parallelism.compile to false")
        return
    if torch.version.hip:
        return  # torchtitan checks ROCm's gfx942+ itself
    if not torch.cuda.is_available():
        raise EngineError(
            "parallelism.float8 needs an NVIDIA GPU with compute capability 8.9 or newer (H100, H200, L40S…); "
            "this machine has none. To test the float8 path on CPU set parallelism.float8.emulate: true"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise EngineError(
            f"parallelism.float8 needs compute capability 8.9 or newer; {torch.cuda.get_device_name()} has "
            f"{major}.{minor}. Use parallelism.float8.emulate: true to test, or drop float8"
        )


def converters(layout: Layout) -> list[Any]:
    """Model converters (torchtitan ``ModelConfigConverter.Config``) for ``layout``."""
    if layout.float8 is None:
        return []
    return [
        Float8LinearConverter.Config(
            recipe_name=layout.float8,
            emulate=layout.float8_emulate,
            model_compile_enabled=layout.compile,
            # The LM head keeps full precision: its vocabulary dimension is rarely a multiple of
            # 16 and it dominates the logits' accuracy (torchtitan's default filter too).
            filter_fqns=["lm_head"],
        )
    ]


def apply(config: Any, layout: Layout) -> None:
    """Write ``layout`` into the torchtitan ``Trainer.Config`` ``config`` (in place)."""
    config.parallelism.data_parallel_replicate_degree = layout.dp_replicate
    config.parallelism.data_parallel_shard_degree = layout.dp_shard
    config.parallelism.tensor_parallel_degree = layout.tp
    config.activation_checkpoint = {"none": None, "selective": SelectiveAC.Config(), "full": FullAC.Config()}[
        layout.activation_checkpointing
    ]
    config.compile = CompileConfig(enable=layout.compile, components=["model", "loss"])
    precision = layout.mixed_precision
    if precision == "auto":
        precision = "bfloat16" if torch.cuda.is_available() else "float32"
    config.training.mixed_precision_param = precision
