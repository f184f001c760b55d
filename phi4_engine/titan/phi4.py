"""Phi-4 as a torchtitan ModelSpec: a Llama-style GQA decoder, untied, no bias, plain RoPE.

Shapes for the ``14b`` flavor are the paper's (FACTS.md §1): hidden 5120, 40 layers, 40 heads,
10 KV heads, FFN 17920, vocab 100352, RMSNorm eps 1e-5. Unlike torchtitan's llama3 flavors, RoPE
has no Llama-3.1 scaling (``scaling="none"``) and its base comes from the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch.nn as nn
from torchtitan.models.common import (
    ComplexRoPE,
    Embedding,
    Linear,
    RMSNorm,
    compute_ffn_hidden_dim,
)
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
from torchtitan.models.common.param_init import depth_scaled_std
from torchtitan.models.llama3 import Llama3Model, parallelize_llama
from torchtitan.models.llama3.model import Llama3TransformerBlock
from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.model_spec import ModelSpec

from phi4_engine.titan import compat
from phi4_engine.titan.attention import DocumentSDPA


@dataclass(frozen=True)
class Phi4Shape:
    """The numbers that define a Phi-4-style decoder."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim_multiplier: float = 1.3
    multiple_of: int = 256
    norm_eps: float = 1e-5

    @property
    def hidden_dim(self) -> int:
        return compute_ffn_hidden_dim(
            self.dim, multiple_of=self.multiple_of, ffn_dim_multiplier=self.ffn_dim_multiplier
        )


FLAVORS: dict[str, Phi4Shape] = {
    # The paper's 14B (FACTS.md §1): 14,659,507,200 parameters with vocab 100352.
    "14b": Phi4Shape(dim=5120, n_layers=40, n_heads=40, n_kv_heads=10),
    # CPU-sized flavors keep the GQA ratio (4 query heads per KV head) and the FFN rule.
    "tiny": Phi4Shape(dim=192, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=64),
    "debug": Phi4Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=32),
}

_LINEAR_INIT = {"weight": partial(nn.init.trunc_normal_, std=0.02)}
_NORM_INIT = {"weight": nn.init.ones_}
_EMBEDDING_INIT = {"weight": partial(nn.init.normal_, std=1.0)}


def _depth_init(layer_id: int) -> dict[str, Callable]:
    return {"weight": partial(nn.init.trunc_normal_, std=depth_scaled_std(0.02, layer_id))}


def _output_init(dim: int) -> dict[str, Callable]:
    s = dim**-0.5
    return {"weight": partial(nn.init.trunc_normal_, std=s, a=-3 * s, b=3 * s)}


def inner_attention_config(backend: str):
    """The attention kernel. Both mask packed documents (block-causal) given ``positions``.

    ``sdpa`` (default, CPU): ``DocumentSDPA``, an explicit boolean mask; FlexAttention has no
    backward on CPU (FACTS.md §5 fix 7) and torchtitan's own SDPA module is causal only.
    ``flex`` (CUDA): torchtitan's FlexAttention; its Trainer builds the block mask from
    ``positions`` (``Decoder.get_attention_masks``).
    """
    if backend == "flex":
        return FlexAttention.Config()
    if backend == "sdpa":
        return DocumentSDPA.Config()
    raise ValueError(f"unknown attention backend {backend!r} (expected 'sdpa' or 'flex')")


def build_model_config(
    shape: Phi4Shape,
    *,
    vocab_size: int,
    rope_theta: float,
    max_seq_len: int,
    attention: str = "sdpa",
) -> Llama3Model.Config:
    head_dim = shape.dim // shape.n_heads
    rope = ComplexRoPE.Config(
        dim=head_dim, max_seq_len=max_seq_len, theta=rope_theta, scaling="none"
    )
    layers = []
    for layer_id in range(shape.n_layers):
        norm = RMSNorm.Config(normalized_shape=shape.dim, eps=shape.norm_eps, param_init=_NORM_INIT)
        layers.append(
            Llama3TransformerBlock.Config(
                attention_norm=norm,
                ffn_norm=RMSNorm.Config(
                    normalized_shape=shape.dim, eps=shape.norm_eps, param_init=_NORM_INIT
                ),
                attention=make_gqa_config(
                    dim=shape.dim,
                    n_heads=shape.n_heads,
                    n_kv_heads=shape.n_kv_heads,
                    wqkv_param_init=_LINEAR_INIT,
                    wo_param_init=_depth_init(layer_id),
                    inner_attention=inner_attention_config(attention),
                    fuse_qkv=False,
                    rope=rope,
                ),
                feed_forward=make_ffn_config(
                    dim=shape.dim,
                    hidden_dim=shape.hidden_dim,
                    w1_param_init=_LINEAR_INIT,
                    w2w3_param_init=_depth_init(layer_id),
                ),
            )
        )
    return Llama3Model.Config(
        dim=shape.dim,
        vocab_size=vocab_size,
        enable_weight_tying=False,
        tok_embeddings=Embedding.Config(
            num_embeddings=vocab_size, embedding_dim=shape.dim, param_init=_EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=shape.dim, eps=shape.norm_eps, param_init=_NORM_INIT),
        lm_head=Linear.Config(
            in_features=shape.dim, out_features=vocab_size, param_init=_output_init(shape.dim)
        ),
        layers=layers,
    )


def _parallelize_phi4(model, **kwargs):
    model = parallelize_llama(model, **kwargs)
    compat.force_sum_reduction(model)
    return model


def model_spec(
    flavor: str,
    *,
    vocab_size: int,
    rope_theta: float,
    max_seq_len: int,
    attention: str = "sdpa",
    shape: Phi4Shape | None = None,
    converters: list | None = None,
) -> ModelSpec:
    """A torchtitan ModelSpec for a Phi-4 flavor (or an explicit ``shape``); ``converters``
    (torchtitan ``ModelConfigConverter.Config``, e.g. float8) rewrite the model config."""
    if shape is None:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown Phi-4 flavor {flavor!r}; known: {', '.join(FLAVORS)}")
        shape = FLAVORS[flavor]
    config = build_model_config(
        shape,
        vocab_size=vocab_size,
        rope_theta=rope_theta,
        max_seq_len=max_seq_len,
        attention=attention,
    )
    for converter in converters or []:
        config = converter.build().convert(config)
    return ModelSpec(
        name="phi4",
        flavor=flavor,
        model=config,
        parallelize_fn=_parallelize_phi4,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=Llama3StateDictAdapter,
    )
