"""HF parity (FACTS.md §7.9): export to ``Phi3ForCausalLM`` gives the engine's logits in
transformers, export → import → export is bit-exact, the exported tokenizer encodes like ours,
and import refuses what our model cannot hold with a one-line ValueError."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from phi4_engine.hf_tokenizer import CHAT_TEMPLATE, derive_merges, write_hf_tokenizer
from phi4_engine.tokenizer import build_phi4, build_phi4_mini, load_cl100k_ranks
from phi4_engine.titan import hf, phi4
from phi4_engine.titan.generate import load_model, load_model_weights, save_weights

THETA = 250000.0
MAX_POS = 64
VOCAB_RANKS = 2048

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\n\tpass\r\n",
    "1234567890 12 3.14159 1,000,000 -42e-7",
    "naïve café, Straße, Ωμέγα, Москва, हिन्दी, 日本語のテキスト, 😀🎉👩‍👩‍👧",
    "a  \t\n  b\u00a0c\u3000d\u2003e   \n\n\n   ",
    "I'm sure you'RE right; they'll say WE'VE done it's job",
    "   leading spaces and trailing ones   ",
    "<|im_end|> special <|endoftext|>tokens in<|im_start|>user<|im_sep|> text",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?\nAnswer briefly."},
    {"role": "tool", "content": "dropped by the template"},
    {"role": "assistant", "content": "4 — naïve 😀"},
    {"role": "user", "content": "  and <|im_end|> in content?  "},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_phi4_mini(VOCAB_RANKS)


def _save_random_model(folder, flavor: str, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DCP checkpoint of a random model; norm weights randomized too so their mapping shows."""
    spec = phi4.model_spec(flavor, vocab_size=vocab_size, rope_theta=THETA, max_seq_len=MAX_POS)
    torch.manual_seed(seed)
    model = spec.model.build()
    with torch.no_grad():
        model.init_states()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif ".wq." in name or ".wk." in name:
                p.mul_(8.0)  # sharp attention, so a RoPE layout error moves the logits a lot
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_weights(model.state_dict(), str(folder))
    return state


def _export(checkpoint, out, flavor, tokenizer, **kwargs):
    return hf.export_hf(
        checkpoint, out, flavor=flavor, vocab_size=tokenizer.vocab_size, rope_theta=THETA,
        max_position_embeddings=MAX_POS, tokenizer=tokenizer, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["debug", "tiny"])
def exported(request, tmp_path_factory, tokenizer):
    """(flavor, original state dict, checkpoint folder, export folder)."""
    flavor = request.param
    root = tmp_path_factory.mktemp(f"hf-{flavor}")
    state = _save_random_model(root / "ckpt" / "step-5", flavor, tokenizer.vocab_size)
    out = _export(root / "ckpt", root / "hf", flavor, tokenizer)  # resolves the newest step-N
    return flavor, state, root / "ckpt" / "step-5", out


# -- names and shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["debug", "tiny"])
def test_titan_shapes_match_the_model(flavor):
    spec = phi4.model_spec(flavor, vocab_size=300, rope_theta=THETA, max_seq_len=MAX_POS)
    with torch.device("meta"):
        model = spec.model.build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == hf.titan_shapes(phi4.FLAVORS[flavor], 300)


def test_14b_hf_shapes_are_phi4s():
    shapes = hf.hf_shapes(phi4.FLAVORS["14b"], 100352)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (7680, 5120)
    assert shapes["model.layers.39.mlp.gate_up_proj.weight"] == (35840, 5120)
    assert shapes["model.layers.39.mlp.down_proj.weight"] == (5120, 17920)
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (100352, 5120)
    assert len(shapes) == 40 * 6 + 3
    config = hf.hf_config(phi4.FLAVORS["14b"], vocab_size=100352, rope_theta=THETA,
                          max_position_embeddings=16384, bos_token_id=100257,
                          eos_token_id=100265, pad_token_id=100349)  # fmt: skip
    assert hf.match_flavor(config) == "14b"


def test_rope_permutation_is_per_head_rotate_half():
    """Row 2j / 2j+1 of each titan head become rows j / j + head_dim/2 of the HF head."""
    shape = phi4.FLAVORS["debug"]  # 4 heads of 16, 1 KV head
    state = {k: torch.randn(s) for k, s in hf.titan_shapes(shape, 50).items()}
    out = hf.to_hf(state, shape)["model.layers.0.self_attn.qkv_proj.weight"]
    wq, wk, wv = (state[f"layers.0.attention.qkv_linear.{w}.weight"] for w in ("wq", "wk", "wv"))
    hd = 16
    for head in range(4):
        for j in range(hd // 2):
            assert torch.equal(out[head * hd + j], wq[head * hd + 2 * j])
            assert torch.equal(out[head * hd + hd // 2 + j], wq[head * hd + 2 * j + 1])
    assert torch.equal(out[64 + 3], wk[6]) and torch.equal(out[64 + 8 + 3], wk[7])
    assert torch.equal(out[80:], wv)  # v is never permuted
    back = hf.from_hf(hf.to_hf(state, shape), shape)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# -- logits parity ---------------------------------------------------------------------------


def test_transformers_logits_equal_engine_logits(exported, tokenizer):
    import transformers
    flavor, _, checkpoint, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["model_type"] == "phi3"
    assert config["rope_scaling"] is None and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.eos_id, tokenizer.im_end_id, tokenizer.pad_id
    )
    ours = load_model(str(checkpoint), flavor=flavor, vocab_size=tokenizer.vocab_size,
                      rope_theta=THETA, max_seq_len=MAX_POS)  # fmt: skip
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Phi3ForCausalLM"
    tokens = torch.randint(0, tokenizer.vocab_size, (3, MAX_POS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(tokens)
        got = theirs(input_ids=tokens).logits
    assert got.shape == expected.shape == (3, MAX_POS, tokenizer.vocab_size)
    assert expected.std() > 0.1  # not a vacuous comparison
    diff = (got - expected).abs().max().item()
    print(f"{flavor}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, diff


# -- round trip ------------------------------------------------------------------------------


def test_export_import_export_is_bit_exact(exported, tokenizer, tmp_path):
    flavor, state, _, out = exported
    facts = hf.import_hf(out, tmp_path / "imported")
    assert facts == {"flavor": flavor, "vocab_size": tokenizer.vocab_size,
                     "rope_theta": THETA, "max_position_embeddings": MAX_POS}  # fmt: skip
    assert (tmp_path / "imported" / ".metadata").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    spec = phi4.model_spec(flavor, vocab_size=tokenizer.vocab_size, rope_theta=THETA, max_seq_len=MAX_POS)
    model = spec.model.build()
    load_model_weights(model, tmp_path / "imported")
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key]), key

    again = _export(tmp_path / "imported", tmp_path / "again", flavor, tokenizer)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(names)  # fmt: skip
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_import_reads_a_transformers_saved_model(exported, tokenizer, tmp_path):
    """transformers 5 re-saves the config with ``rope_parameters`` instead of ``rope_theta``."""
    import transformers
    flavor, state, _, out = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.save_pretrained(tmp_path / "resaved")
    facts = hf.import_hf(tmp_path / "resaved", tmp_path / "ckpt")
    assert facts == {"flavor": flavor, "vocab_size": tokenizer.vocab_size,
                     "rope_theta": THETA, "max_position_embeddings": MAX_POS}  # fmt: skip
    spec = phi4.model_spec(flavor, vocab_size=tokenizer.vocab_size, rope_theta=THETA, max_seq_len=MAX_POS)
    ours = spec.model.build()
    load_model_weights(ours, tmp_path / "ckpt")
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


def test_sharded_export_and_import(exported, tokenizer, tmp_path):
    flavor, state, checkpoint, out = exported
    sharded = _export(checkpoint, tmp_path / "sharded", flavor, tokenizer, max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) > 1 and files[0].startswith("model-00001-of-")
    assert not (sharded / "model.safetensors").exists()
    hf.import_hf(sharded, tmp_path / "ckpt")
    spec = phi4.model_spec(flavor, vocab_size=tokenizer.vocab_size, rope_theta=THETA, max_seq_len=MAX_POS)
    model = spec.model.build()
    load_model_weights(model, tmp_path / "ckpt")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bf16_export(exported, tokenizer, tmp_path):
    from safetensors.torch import load_file

    flavor, state, checkpoint, _ = exported
    out = _export(checkpoint, tmp_path / "bf16", flavor, tokenizer, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    hf.import_hf(out, tmp_path / "ckpt")  # imported as fp32: the bf16 values exactly
    spec = phi4.model_spec(flavor, vocab_size=tokenizer.vocab_size, rope_theta=THETA, max_seq_len=MAX_POS)
    model = spec.model.build()
    load_model_weights(model, tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state[key].to(torch.bfloat16).to(torch.float32)), key


def test_export_refuses_wrong_flavor_and_nonempty_output(exported, tokenizer, tmp_path):
    flavor, _, checkpoint, _ = exported
    other = "tiny" if flavor == "debug" else "debug"
    with pytest.raises(ValueError, match="flavor") as info:
        _export(checkpoint, tmp_path / "x", other, tokenizer)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep")
    with pytest.raises(ValueError, match="not an empty folder"):
        _export(checkpoint, tmp_path / "busy", flavor, tokenizer)
    assert (tmp_path / "busy" / "file").read_text() == "keep"


# -- import refusals -------------------------------------------------------------------------


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ({"sliding_window": 16}, "sliding_window"),
        ({"hidden_size": 100}, "no Phi-4 flavor has hidden_size=100"),
        ({"num_key_value_heads": 3}, "no Phi-4 flavor"),
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
        ({"vocab_size": 2000}, r"tensor model\.embed_tokens\.weight has shape"),
    ],
)
def test_import_refuses_unsupported(exported, tmp_path, changes, match):
    src = _edited_copy(exported[3], tmp_path / "src", **changes)
    with pytest.raises(ValueError, match=match) as info:
        hf.import_hf(src, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_import_refuses_missing_lm_head_and_extra_tensors(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _edited_copy(exported[3], tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    head = tensors.pop("lm_head.weight")
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight is missing") as info:
        hf.import_hf(src, tmp_path / "out")
    assert "\n" not in str(info.value)
    tensors["lm_head.weight"] = head
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(head.shape[1])
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.o_proj\.bias"):
        hf.import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- tokenizer -------------------------------------------------------------------------------


def _check_tokenizer(folder, tokenizer):
    import transformers
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        # specials in text: ours with allowed_special="all" ≡ HF's default special splitting
        assert theirs(text)["input_ids"] == tokenizer.encoding.encode(text, allowed_special="all"), text
        # ordinary text (our encode): HF with split_special_tokens
        plain = theirs(text, split_special_tokens=True)["input_ids"]
        assert plain == tokenizer.encode(text), text
        assert theirs.decode(plain) == tokenizer.decode(plain) == text
    rendered = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == tokenizer.render_chat(MESSAGES, add_generation_prompt=True)
    assert theirs.apply_chat_template(MESSAGES[:2], tokenize=False) == tokenizer.render_chat(MESSAGES[:2])
    # tokenized chat = our encode_chat, as long as contents hold no special-token strings
    ids = theirs.apply_chat_template(MESSAGES[:4], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == tokenizer.encode_chat(MESSAGES[:4], add_generation_prompt=True)[0]
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        tokenizer.eos_id, tokenizer.im_end_id, tokenizer.pad_id
    )
    assert theirs.convert_tokens_to_ids(list(tokenizer.special_ids)) == list(tokenizer.special_ids.values())
    assert len(theirs) == tokenizer.vocab_size


def test_exported_tokenizer_matches_ours(exported, tokenizer):
    out = exported[3]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    _check_tokenizer(out, tokenizer)


def test_tokenizer_files_are_deterministic(tokenizer, tmp_path):
    a = write_hf_tokenizer(tokenizer, tmp_path / "a", model_max_length=MAX_POS)
    b = write_hf_tokenizer(tokenizer, tmp_path / "b", model_max_length=MAX_POS)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_hf_tokenizer_module_needs_no_torch():
    code = ("import sys; from phi4_engine.hf_tokenizer import build_hf_tokenizer; "
            "from phi4_engine.tokenizer import build_phi4_mini; "
            "build_hf_tokenizer(build_phi4_mini(300)); assert 'torch' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_merges_rebuild_every_token():
    """Each merge's parts are lower-ranked tokens whose concatenation is the token."""
    ranks = {t: r for t, r in load_cl100k_ranks().items() if r < 4096}
    merges = derive_merges(ranks)
    multi = sorted((r, t) for t, r in ranks.items() if len(t) > 1)
    assert len(merges) == len(multi)
    for (rank, token), (left, right) in zip(multi, merges):
        assert left + right == token and ranks[left] < rank and ranks[right] < rank


def test_full_phi4_tokenizer(tmp_path):
    tokenizer = build_phi4()
    start = time.perf_counter()
    merges = derive_merges(load_cl100k_ranks())
    elapsed = time.perf_counter() - start
    assert len(merges) == 100256 - 256
    assert elapsed < 60, f"merge derivation took {elapsed:.1f} s"
    write_hf_tokenizer(tokenizer, tmp_path, model_max_length=16384)
    _check_tokenizer(tmp_path, tokenizer)
    special = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["id"], t["content"]) for t in special[:2]] == [
        (100256, "<|dummy_0|>"), (100257, "<|endoftext|>")
    ]
    assert [t["id"] for t in special] == list(range(100256, 100352))
