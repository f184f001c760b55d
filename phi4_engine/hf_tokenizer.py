"""Hugging Face tokenizer files for our tiktoken-based Phi-4 tokenizers (no torch needed).

:func:`write_hf_tokenizer` writes ``tokenizer.json``, ``tokenizer_config.json`` (with the
microsoft/phi-4 chat template) and ``special_tokens_map.json`` so that
``transformers.AutoTokenizer.from_pretrained(folder)`` encodes exactly like
:class:`~phi4_engine.tokenizer.Phi4Tokenizer` (``phi4`` and ``phi4-mini`` alike).

How a tiktoken rank table becomes a ``tokenizers`` byte-level BPE:

* **Vocab:** every token's bytes are spelled in GPT-2's byte-to-unicode alphabet (each byte one
  printable character); its id is its rank.
* **Merges:** tiktoken has none; it merges whichever adjacent pair forms the lowest-ranked
  token. For each multi-byte token we run that BPE over the token's own bytes allowing only
  lower ranks; it ends in exactly two parts, and ``(left, right)`` is the token's merge. Merges
  are listed in rank order, so a merge's priority is its result's rank, as in tiktoken.
* **ignore_merges:** tiktoken emits a pre-token that is itself in the vocab as one id without
  running BPE; ``BPE(ignore_merges=True)`` does the same.
* **Pre-tokenizer:** ``Split`` on the cl100k regex (``isolated``), then ``ByteLevel`` with
  ``use_regex=False`` (only the byte-to-unicode mapping). ``tokenizers`` compiles the regex with
  Oniguruma's Ruby syntax, where ``X{1,3}+`` is NOT a possessive interval but "one or more of
  X{1,3}" (any digit run in one piece); the only such spot, ``\\p{N}{1,3}+``, becomes
  ``\\p{N}{1,3}`` (equal match: nothing follows it inside its alternative). ``?+ ++ *+`` are
  possessive in both engines; ``$`` is only reached after a possessive ``\\s++`` (end of
  string or before a non-space), where Ruby's end-of-line ``$`` equals end-of-string.
* **Specials:** Phi-4's 96 special tokens are added special tokens with their exact ids.

Output is deterministic: the same tokenizer gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from phi4_engine.tokenizer import PAD_TOKEN, Phi4Tokenizer

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_hf_tokenizer",
    "byte_to_unicode",
    "derive_merges",
    "hf_pattern",
    "special_token_ids",
    "tokenizer_config",
    "write_hf_tokenizer",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
"""microsoft/phi-4's chat template (FACTS.md §2), byte for byte."""

BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
"""HF metadata of microsoft/phi-4 and torchtune: bos ``<|endoftext|>``, eos/chat stop ``<|im_end|>``,
pad ``<|dummy_85|>`` (FACTS.md §2). Never pad with EOS."""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def hf_pattern(pattern: str) -> str:
    """The tiktoken regex rewritten for Oniguruma (see the module docstring)."""
    return pattern.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def derive_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One ``(left, right)`` merge per multi-byte token, in rank order.

    For a token of rank ``r``, BPE over its bytes with only ranks ``< r`` allowed must end in
    two parts; a token for which it does not is not reachable by BPE and raises ValueError.
    The full cl100k table (100,000 merges) takes about 3 s on one CPU core.
    """
    get = ranks.get
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        n = len(token)
        if n == 1:
            continue
        if n == 2:
            merges.append((token[:1], token[1:]))
            continue
        parts = [token[i : i + 1] for i in range(n)]
        while len(parts) > 2:
            best_rank, best_i = rank, -1
            for i in range(len(parts) - 1):
                r = get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best_rank, best_i = r, i
            if best_i < 0:
                raise ValueError(
                    f"hf tokenizer: token rank {rank} ({token!r}) is not reachable by BPE merges"
                )
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def special_token_ids(tokenizer: Phi4Tokenizer) -> dict[str, int]:
    """bos/eos/pad ids of ``tokenizer`` as HF configs name them."""
    return {
        "bos_token_id": tokenizer.special_ids[BOS_TOKEN],
        "eos_token_id": tokenizer.special_ids[EOS_TOKEN],
        "pad_token_id": tokenizer.special_ids[PAD_TOKEN],
    }


def build_hf_tokenizer(tokenizer: Phi4Tokenizer):
    """A ``tokenizers.Tokenizer`` equivalent to ``tokenizer`` (encode, specials, decode)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    # Phi4Tokenizer keeps its rank table and regex as ``_ranks`` / ``_pattern`` (no public name).
    ranks: Mapping[bytes, int] = tokenizer._ranks
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("hf tokenizer: ranks must be the ids 0..n-1 without gaps")
    table = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in derive_merges(ranks)]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    hf = Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(hf_pattern(tokenizer._pattern)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])  # fmt: skip
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([
        AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        for s, _ in specials
    ])  # fmt: skip
    for s, i in specials:
        if hf.token_to_id(s) != i:
            raise ValueError(f"hf tokenizer: special {s} got id {hf.token_to_id(s)}, expected {i}")
    return hf


def tokenizer_config(tokenizer: Phi4Tokenizer, *, model_max_length: int) -> dict:
    """``tokenizer_config.json``: chat template, bos/eos/pad, no automatic BOS/EOS."""
    decoder = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for s, i in sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])
    }  # fmt: skip
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        # phi3 is in transformers' "incorrect hub tokenizer class" list and loads as
        # TokenizersBackend anyway; GPT2Tokenizer would rebuild GPT-2's own pre-tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_hf_tokenizer(tokenizer: Phi4Tokenizer, out_dir: str | Path, *, model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Returns the paths written. ``model_max_length`` is the model's context
    (``max_position_embeddings``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]
    build_hf_tokenizer(tokenizer).save(str(paths[0]), pretty=True)
    _dump(paths[1], tokenizer_config(tokenizer, model_max_length=model_max_length))
    _dump(paths[2], {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN})
    return paths
