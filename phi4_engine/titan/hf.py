"""Hugging Face ``Phi3ForCausalLM`` export and import of our Phi-4 checkpoints.

Layouts (FACTS.md §1): HF fuses ``self_attn.qkv_proj`` = [q; k; v] rows and
``mlp.gate_up_proj`` = [gate (w1); up (w3)] rows; torchtitan keeps ``qkv_linear.{wq,wk,wv}`` and
``feed_forward.{w1,w3}`` apart. RoPE differs in layout only: HF rotates halves (dim ``j`` pairs
with ``j + head_dim/2``), torchtitan's ``ComplexRoPE`` rotates adjacent pairs ``(2j, 2j+1)``; so
q and k rows are permuted within each head (never v). Every step is a pure re-indexing, so
``to_hf(from_hf(sd))`` is bit-exact.

* :func:`export_hf` reads a DCP checkpoint (model keys only, as ``load_model_weights`` does,
  without building the model) and writes ``config.json``, ``generation_config.json``,
  safetensors (``model.safetensors`` or shards + ``model.safetensors.index.json``) and the
  tokenizer files of :mod:`phi4_engine.hf_tokenizer`.
* :func:`import_hf` reads such a folder (ours or microsoft/phi-4's), refuses what our model
  cannot express (a one-line ValueError naming the field or tensor), and writes a DCP checkpoint
  that ``load_model_weights`` and ``checkpoint.initial_load_path`` read.

Both write into a temporary sibling folder and rename it into place, so a crash never leaves a
half-written output under the final name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp

from phi4_engine import checkpoints
from phi4_engine.titan import safe_metadata
from phi4_engine.titan.generate import resolve_checkpoint, save_weights
from phi4_engine.titan.phi4 import FLAVORS, Phi4Shape

if TYPE_CHECKING:
    from phi4_engine.tokenizer import Phi4Tokenizer

__all__ = [
    "export_hf",
    "from_hf",
    "hf_config",
    "hf_shapes",
    "import_hf",
    "match_flavor",
    "titan_shapes",
    "to_hf",
]

ARCHITECTURE = "Phi3ForCausalLM"
MODEL_TYPE = "phi3"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)
"""Buffers some old HF checkpoints carry; recomputed from the config, so skipped on import."""


# -- names and shapes ------------------------------------------------------------------------


def _head_dim(shape: Phi4Shape) -> int:
    return shape.dim // shape.n_heads


def titan_shapes(shape: Phi4Shape, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict keys (plain FQNs, as in DCP checkpoints) and their shapes."""
    d, h, hd = shape.dim, shape.hidden_dim, _head_dim(shape)
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab_size, d)}
    for i in range(shape.n_layers):
        p = f"layers.{i}."
        out[p + "attention.qkv_linear.wq.weight"] = (shape.n_heads * hd, d)
        out[p + "attention.qkv_linear.wk.weight"] = (shape.n_kv_heads * hd, d)
        out[p + "attention.qkv_linear.wv.weight"] = (shape.n_kv_heads * hd, d)
        out[p + "attention.wo.weight"] = (d, shape.n_heads * hd)
        out[p + "feed_forward.w1.weight"] = (h, d)
        out[p + "feed_forward.w2.weight"] = (d, h)
        out[p + "feed_forward.w3.weight"] = (h, d)
        out[p + "attention_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
    out["norm.weight"] = (d,)
    out["lm_head.weight"] = (vocab_size, d)
    return out


def _hf_plan(shape: Phi4Shape) -> list[tuple[str, list[str]]]:
    """Each HF tensor name (in file order) with the titan keys it is built from."""
    plan: list[tuple[str, list[str]]] = [("model.embed_tokens.weight", ["tok_embeddings.weight"])]
    for i in range(shape.n_layers):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        qkv = [t + f"attention.qkv_linear.{w}.weight" for w in ("wq", "wk", "wv")]
        plan += [
            (p + "self_attn.qkv_proj.weight", qkv),
            (p + "self_attn.o_proj.weight", [t + "attention.wo.weight"]),
            (p + "mlp.gate_up_proj.weight", [t + "feed_forward.w1.weight", t + "feed_forward.w3.weight"]),
            (p + "mlp.down_proj.weight", [t + "feed_forward.w2.weight"]),
            (p + "input_layernorm.weight", [t + "attention_norm.weight"]),
            (p + "post_attention_layernorm.weight", [t + "ffn_norm.weight"]),
        ]
    plan += [("model.norm.weight", ["norm.weight"]), ("lm_head.weight", ["lm_head.weight"])]
    return plan


def hf_shapes(shape: Phi4Shape, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The ``Phi3ForCausalLM`` tensor names and shapes for a flavor."""
    titan = titan_shapes(shape, vocab_size)
    return {
        name: (sum(titan[k][0] for k in keys), *titan[keys[0]][1:]) for name, keys in _hf_plan(shape)
    }


# -- RoPE row permutation and (un)fusing -----------------------------------------------------


def _to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """torchtitan adjacent-pair rows → HF rotate-half rows, per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_adjacent_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows → torchtitan adjacent-pair rows, per head (inverse of the above)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _build_hf_tensor(
    name: str, keys: list[str], state: Mapping[str, torch.Tensor], shape: Phi4Shape
) -> torch.Tensor:
    if name.endswith("self_attn.qkv_proj.weight"):
        q, k, v = (state[key] for key in keys)
        q = _to_rotate_half(q, shape.n_heads)
        k = _to_rotate_half(k, shape.n_kv_heads)
        return torch.cat([q, k, v], dim=0)
    if len(keys) == 2:  # gate_up_proj = [w1 (gate); w3 (up)]
        return torch.cat([state[keys[0]], state[keys[1]]], dim=0)
    return state[keys[0]]


def to_hf(state: Mapping[str, torch.Tensor], shape: Phi4Shape) -> dict[str, torch.Tensor]:
    """Our state dict → ``Phi3ForCausalLM`` names, fused and RoPE-permuted (contiguous)."""
    return {
        name: _build_hf_tensor(name, keys, state, shape).contiguous() for name, keys in _hf_plan(shape)
    }


def from_hf(hf_state: Mapping[str, torch.Tensor], shape: Phi4Shape) -> dict[str, torch.Tensor]:
    """``Phi3ForCausalLM`` tensors → our state dict: un-fused, inverse-permuted (contiguous)."""
    hd = _head_dim(shape)
    q_rows, kv_rows = shape.n_heads * hd, shape.n_kv_heads * hd
    out: dict[str, torch.Tensor] = {}
    for name, keys in _hf_plan(shape):
        w = hf_state[name]
        if name.endswith("self_attn.qkv_proj.weight"):
            q, k, v = torch.split(w, [q_rows, kv_rows, kv_rows], dim=0)
            parts = [_to_adjacent_pairs(q, shape.n_heads), _to_adjacent_pairs(k, shape.n_kv_heads), v]
        elif len(keys) == 2:
            parts = list(torch.split(w, [shape.hidden_dim, shape.hidden_dim], dim=0))
        else:
            parts = [w]
        for key, part in zip(keys, parts):
            out[key] = part.contiguous()
    return out


# -- config ----------------------------------------------------------------------------------


def hf_config(
    shape: Phi4Shape,
    *,
    vocab_size: int,
    rope_theta: float,
    max_position_embeddings: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    dtype: str = "float32",
) -> dict:
    """``config.json`` of a ``Phi3ForCausalLM`` with our shape (full attention, no RoPE scaling)."""
    return {
        "architectures": [ARCHITECTURE],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "embd_pdrop": 0.0,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "hidden_size": shape.dim,
        "initializer_range": 0.02,
        "intermediate_size": shape.hidden_dim,
        "max_position_embeddings": max_position_embeddings,
        "model_type": MODEL_TYPE,
        "num_attention_heads": shape.n_heads,
        "num_hidden_layers": shape.n_layers,
        "num_key_value_heads": shape.n_kv_heads,
        "original_max_position_embeddings": max_position_embeddings,
        "pad_token_id": pad_token_id,
        "resid_pdrop": 0.0,
        "rms_norm_eps": shape.norm_eps,
        "rope_scaling": None,
        "rope_theta": float(rope_theta),
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def match_flavor(config: Mapping) -> str:
    """The FLAVORS entry an HF ``config.json`` describes; ValueError naming the field otherwise.

    Refuses what our model cannot express: another architecture, tied embeddings, RoPE scaling
    or partial rotary, a sliding window shorter than the context, biases, another activation.
    """

    def refuse(message: str):
        raise ValueError(f"import_hf: {message}")

    if config.get("model_type") != MODEL_TYPE:
        refuse(f"config.json model_type is {config.get('model_type')!r}; "
               f"only {MODEL_TYPE!r} ({ARCHITECTURE}) is supported")
    if config.get("tie_word_embeddings", False):
        refuse("config.json tie_word_embeddings is true; Phi-4 has an untied lm_head")
    if config.get("rope_scaling") is not None:
        scaling = json.dumps(config["rope_scaling"])
        refuse(f"config.json rope_scaling is {scaling}; only plain RoPE (null) is supported")
    rope_parameters = config.get("rope_parameters") or {}
    extra = sorted(set(rope_parameters) - {"rope_type", "rope_theta", "partial_rotary_factor"})
    if rope_parameters.get("rope_type", "default") != "default" or extra:
        refuse(f"config.json rope_parameters is {json.dumps(rope_parameters)}; only plain RoPE is supported")
    for source in (config, rope_parameters):
        if float(source.get("partial_rotary_factor", 1.0)) != 1.0:
            factor = source["partial_rotary_factor"]
            refuse(f"config.json partial_rotary_factor is {factor}; only 1.0 is supported")
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"config.json hidden_act is {config['hidden_act']!r}; only 'silu' is supported")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            refuse(f"config.json {field} is true; Phi-4 has no biases")
    max_pos = int(config.get("max_position_embeddings", 4096))
    window = config.get("sliding_window")
    if window is not None and int(window) < max_pos:
        refuse(f"config.json sliding_window is {window} < max_position_embeddings {max_pos}; "
               "only full attention is supported")
    heads = config.get("num_attention_heads")
    found = {
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "intermediate_size": config.get("intermediate_size"),
    }
    if config.get("head_dim") is not None and heads and config["head_dim"] * heads != found["hidden_size"]:
        refuse(f"config.json head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    for name, shape in FLAVORS.items():
        want = {
            "hidden_size": shape.dim, "num_hidden_layers": shape.n_layers,
            "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_kv_heads,
            "intermediate_size": shape.hidden_dim,
        }  # fmt: skip
        if want == found:
            eps = float(config.get("rms_norm_eps", 1e-5))  # Phi3Config default
            if not math.isclose(eps, shape.norm_eps, rel_tol=1e-6):
                refuse(f"config.json rms_norm_eps is {eps}; flavor {name!r} uses {shape.norm_eps}")
            return name
    got = ", ".join(f"{k}={v}" for k, v in found.items())
    refuse(f"no Phi-4 flavor has {got} (known: {', '.join(FLAVORS)})")
    raise AssertionError  # unreachable


def _rope_theta(config: Mapping) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


# -- files -----------------------------------------------------------------------------------


def _fresh_folder(out: Path) -> Path:
    """A temporary sibling of ``out`` to write into; ``out`` must be absent or empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"hf: output {out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit_folder(tmp: Path, out: Path) -> Path:
    if out.is_dir():
        out.rmdir()  # empty (checked by _fresh_folder)
    os.replace(tmp, out)
    return out


def _dump(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_dcp(folder: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    checkpoints.verify(folder)
    reader = dcp.FileSystemReader(str(folder))
    stored = safe_metadata.read_metadata(folder).state_dict_metadata
    state = {k: torch.empty(tuple(stored[k].size), dtype=stored[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def export_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    flavor: str,
    vocab_size: int,
    rope_theta: float,
    max_position_embeddings: int,
    tokenizer: Phi4Tokenizer,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a ``Phi3ForCausalLM`` folder from a DCP checkpoint of our model; returns ``out_dir``.

    ``checkpoint_dir`` is a DCP folder or a folder of ``step-N`` children (newest committed one
    is used). ``tokenizer`` is the run's :class:`~phi4_engine.tokenizer.Phi4Tokenizer`; its
    vocab must fit ``vocab_size``. Tensors are written as ``dtype``; more than
    ``max_shard_bytes`` of them are split into ``model-0000i-of-0000n.safetensors`` shards with
    an index, read from the checkpoint one shard at a time. ``out_dir`` must be absent or empty.
    Same inputs give the same bytes.
    """
    from safetensors.torch import save_file

    from phi4_engine.hf_tokenizer import special_token_ids, write_hf_tokenizer

    if flavor not in FLAVORS:
        raise ValueError(f"export_hf: unknown flavor {flavor!r}; known: {', '.join(FLAVORS)}")
    if dtype not in DTYPES:
        raise ValueError(f"export_hf: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"export_hf: tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size}"
        )
    shape = FLAVORS[flavor]
    folder = resolve_checkpoint(checkpoint_dir)
    stored = safe_metadata.read_metadata(folder).state_dict_metadata
    for key, want in titan_shapes(shape, vocab_size).items():
        if key not in stored:
            raise ValueError(
                f"export_hf: checkpoint {folder} lacks {key} (wrong flavor or not a Phi-4 checkpoint?)"
            )
        got = tuple(getattr(stored[key], "size", ()))
        if got != want:
            raise ValueError(
                f"export_hf: {key} is {got} in {folder}, "
                f"flavor {flavor!r} with vocab {vocab_size} needs {want}"
            )

    # Group HF tensors into shards (file order), each read from DCP on its own.
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    shard_plans: list[list[tuple[str, list[str]]]] = [[]]
    used = 0
    for name, keys in _hf_plan(shape):
        size = sum(math.prod(stored[k].size) for k in keys) * itemsize
        if shard_plans[-1] and used + size > max_shard_bytes:
            shard_plans.append([])
            used = 0
        shard_plans[-1].append((name, keys))
        used += size

    out = Path(out_dir)
    tmp = _fresh_folder(out)
    try:
        n = len(shard_plans)
        weight_map: dict[str, str] = {}
        total = 0
        for i, plan in enumerate(shard_plans, start=1):
            file = SAFETENSORS if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            state = _read_dcp(folder, [k for _, keys in plan for k in keys])
            tensors = {
                name: _build_hf_tensor(name, keys, state, shape).to(DTYPES[dtype]).contiguous()
                for name, keys in plan
            }
            del state
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            for name, t in tensors.items():
                weight_map[name] = file
                total += t.numel() * t.element_size()
            del tensors
        if n > 1:
            _dump(tmp / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        ids = special_token_ids(tokenizer)
        _dump(tmp / "config.json", hf_config(
            shape, vocab_size=vocab_size, rope_theta=rope_theta,
            max_position_embeddings=max_position_embeddings, dtype=dtype, **ids,
        ))  # fmt: skip
        # generate() stops at <|im_end|> (chat) and at <|endoftext|> (document end).
        _dump(tmp / "generation_config.json", {
            "bos_token_id": ids["bos_token_id"],
            "eos_token_id": [ids["eos_token_id"], ids["bos_token_id"]],
            "pad_token_id": ids["pad_token_id"],
        })  # fmt: skip
        write_hf_tokenizer(tokenizer, tmp, model_max_length=max_position_embeddings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit_folder(tmp, out)


def _hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name → safetensors file (single file or sharded index)."""
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: hf_dir / file for name, file in weight_map.items()}
    single = hf_dir / SAFETENSORS
    if not single.is_file():
        raise ValueError(f"import_hf: {hf_dir} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX}")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def import_hf(hf_dir: str | Path, out_checkpoint_dir: str | Path) -> dict:
    """Write a DCP checkpoint of our model (fp32) from a ``Phi3ForCausalLM`` folder.

    Returns the model facts the run needs: ``flavor`` (matched from FLAVORS by shape),
    ``vocab_size``, ``rope_theta``, ``max_position_embeddings``. Any config or tensor our
    model cannot hold exactly raises a one-line ValueError naming it; nothing is written then.
    ``out_checkpoint_dir`` must be absent or empty; it receives the DCP files directly (a folder
    ``load_model_weights`` and ``checkpoint.initial_load_path`` accept).
    """
    from safetensors import safe_open

    hf = Path(hf_dir)
    config_path = hf / "config.json"
    if not config_path.is_file():
        raise ValueError(f"import_hf: {config_path} not found")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    flavor = match_flavor(config)
    shape = FLAVORS[flavor]
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"import_hf: config.json vocab_size is {vocab_size!r}")
    facts = {
        "flavor": flavor,
        "vocab_size": vocab_size,
        "rope_theta": _rope_theta(config),
        "max_position_embeddings": int(config.get("max_position_embeddings", 4096)),
    }

    files = _hf_tensor_files(hf)
    expected = hf_shapes(shape, vocab_size)
    if "lm_head.weight" not in files:
        raise ValueError(
            "import_hf: lm_head.weight is missing (tied embeddings?); Phi-4 has an untied lm_head"
        )
    missing = [name for name in expected if name not in files]
    if missing:
        raise ValueError(f"import_hf: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    unexpected = sorted(n for n in files if n not in expected and not n.endswith(_IGNORED_HF_SUFFIXES))
    if unexpected:
        raise ValueError(
            f"import_hf: unexpected tensor {unexpected[0]} ({len(unexpected)} in all); "
            "not a plain Phi-3/Phi-4 checkpoint"
        )

    hf_state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                got = tuple(f.get_slice(name).get_shape())
                if got != expected[name]:
                    raise ValueError(
                        f"import_hf: tensor {name} has shape {got}, "
                        f"flavor {flavor!r} with vocab {vocab_size} needs {expected[name]}"
                    )
                t = f.get_tensor(name)
                if not t.is_floating_point():
                    raise ValueError(f"import_hf: tensor {name} has dtype {t.dtype}, expected a float")
                hf_state[name] = t.to(torch.float32)
    state = from_hf(hf_state, shape)
    del hf_state

    out = Path(out_checkpoint_dir)
    tmp = _fresh_folder(out)
    try:
        save_weights(state, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit_folder(tmp, out)
    return facts
