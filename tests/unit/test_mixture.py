"""MixtureLoader: token-fraction weights, epochs, exact resume, exactly-once data parallelism."""

from __future__ import annotations

import io

import pytest
import torch

from phi4_engine.data.mixture import IGNORE_INDEX
from phi4_engine.data.positions import document_positions

from phi4_engine.data import Document, MixtureLoader
from phi4_engine.errors import DataError
from phi4_engine.plugins.synthetic import SyntheticSource


class FakeTokenizer:
    """UTF-8 bytes as token ids; EOS is 256."""

    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]


class ListSource:
    """In-memory source: ``n`` documents whose lengths cycle through ``lengths``."""

    def __init__(self, name: str, n: int, lengths=(40, 90, 17, 150), chat_at: int | None = None,
                 error_at: int | None = None):
        self.name = name
        self.n = n
        self.lengths = lengths
        self.chat_at = chat_at
        self.error_at = error_at
        self.starts: list[int] = []

    def __len__(self) -> int:
        return self.n

    def text(self, i: int) -> str:
        body = f"{self.name}#{i}:"
        return (body * (self.lengths[i % len(self.lengths)] // len(body) + 1))[: self.lengths[i % len(self.lengths)]]

    def documents(self, start: int = 0):
        self.starts.append(start)
        for i in range(start, self.n):
            if i == self.error_at:
                raise DataError(f"{self.name}.jsonl:{i + 1}: malformed JSON")
            if i == self.chat_at:
                yield Document(id=f"{self.name}:{i}", messages=({"role": "user", "content": "hi"},))
            else:
                yield Document(id=f"{self.name}:{i}", text=self.text(i))


WEIGHTS = [0.15, 0.15, 0.40, 0.20, 0.10]


def _five_sources():
    return [
        ListSource("web", 4000, (120, 300, 75)),
        ListSource("rewrites", 150, (200, 260)),
        SyntheticSource("synthetic-arithmetic", seed=0, num_documents=120),
        ListSource("code", 400, (500, 90, 330)),
        ListSource("academic", 200, (700, 400)),
    ]


def _loader(sources=None, weights=WEIGHTS, **kw):
    sources = sources if sources is not None else _five_sources()
    args = {"seq_len": 64, "batch_size": 4} | kw
    return MixtureLoader(list(zip(sources, weights)), FakeTokenizer(), **args)


def test_batches_shape_dtype_and_shift():
    loader = _loader()
    inputs, labels = next(iter(loader))
    assert set(inputs) == {"input", "positions"}
    x = inputs["input"]
    assert torch.equal(inputs["positions"], document_positions(x, 256))
    assert x.shape == labels.shape == (4, 64) and x.dtype == labels.dtype == torch.int64
    assert torch.equal(x[:, 1:], labels[:, :-1])
    assert int(x.max()) <= 256 and int(x.min()) >= 0


def test_stream_is_documents_plus_eos_in_deficit_order():
    a, b = ListSource("a", 5, (10,)), ListSource("b", 5, (30,))
    loader = _loader([a, b], [0.5, 0.5], seq_len=9, batch_size=1)
    stream = []
    for _ in range(12):
        inputs, labels = next(loader)
        stream += inputs["input"][0].tolist() + labels[0, -1:].tolist()
    tok = FakeTokenizer()
    # deficits: a(11) first, then b(31), then a until it catches up (a, a), then b ...
    expected = []
    for src, i in [(a, 0), (b, 0), (a, 1), (a, 2), (b, 1), (a, 3), (a, 4), (a, 0)]:
        expected += tok.encode(src.text(i)) + [256]
    assert stream[: len(expected)] == expected[: len(stream)]


def test_token_fractions_and_epochs():
    sources = _five_sources()
    loader = _loader(sources, seq_len=1023, batch_size=4)
    for _ in range(245):  # 245 * 4 * 1024 = 1,003,520 tokens
        next(loader)
    stats = loader.stats()
    total = sum(s["tokens"] for s in stats)
    assert total >= 1_000_000
    for s, w, src in zip(stats, WEIGHTS, sources):
        assert abs(s["tokens"] / total - w) < 0.01, (s["name"], s["tokens"] / total, w)
        assert s["weight"] == pytest.approx(w)
        assert s["epochs"] == pytest.approx(s["documents"] / len(src))
        assert s["unique_documents"] == min(s["documents"], len(src))
        assert s["name"] == src.name
    # the small, heavily weighted sources repeat; the big web source does not
    assert stats[2]["epochs"] > 3 and stats[0]["epochs"] < 1
    assert stats[2]["unique_tokens"] < stats[2]["tokens"]
    assert stats[0]["unique_tokens"] == stats[0]["tokens"]
    # each epoch restarts at 0; epochs completed match the counters in the state
    state = loader.state_dict()
    for i, (s, src) in enumerate(zip(stats, sources)):
        assert state["epochs"][i] == (s["documents"] - 1) // len(src)
        assert state["positions"][i] == (s["documents"] - 1) % len(src) + 1
    table = loader.table()
    assert "source" in table and "epochs" in table and "synthetic-arithmetic" in table and "40.0%" in table
    assert len(table.splitlines()) == 1 + 1 + 5 + 1 + 1


def _check_state_types(value):
    if isinstance(value, dict):
        for v in value.values():
            _check_state_types(v)
    elif isinstance(value, list):
        assert all(type(v) is int for v in value)
    else:
        assert type(value) is int, type(value)


def _small_sources():
    """Short sources, so a few batches cross many epoch boundaries."""
    return [
        ListSource("a", 7, (40, 90)),
        ListSource("one", 1, (33,)),
        SyntheticSource("synthetic-arithmetic", seed=0, num_documents=5),
        ListSource("c", 10, (300, 20, 5)),
        SyntheticSource("synthetic-prose", seed=0, num_documents=3),
    ]


@pytest.mark.parametrize("warm", [0, 1, 7, 23])
def test_exact_resume(warm):
    reference = _loader(_small_sources(), seq_len=100, batch_size=3)
    for _ in range(warm):
        next(reference)
    state = reference.state_dict()
    _check_state_types(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    expected = [next(reference) for _ in range(30)]
    resumed = _loader(_small_sources(), seq_len=100, batch_size=3)
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(resumed) for _ in range(30))):
        assert torch.equal(xa["input"], xb["input"]) and torch.equal(ya, yb)
    assert resumed.stats() == reference.stats()
    assert resumed.state_dict()["samples"] == reference.state_dict()["samples"] == 3 * (warm + 30)
    epochs = [s["epochs"] for s in reference.stats()]
    assert min(epochs) >= 1 and max(epochs) > 20  # resumed across epoch boundaries


def test_resume_reads_sources_from_their_position():
    sources = _five_sources()
    loader = _loader(sources)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    fresh = _five_sources()
    resumed = _loader(fresh)
    resumed.load_state_dict(state)
    next(resumed)
    for src, pos in zip(fresh, state["positions"]):
        if isinstance(src, ListSource) and src.starts:
            assert src.starts[0] == pos  # no replay from 0


class NumberSource:
    """Document ``i`` is the text of distinct integers: every token of the corpus is unique."""

    def __init__(self, name: str, base: int, n: int = 2000):
        self.name, self.base, self.n = name, base, n

    def __len__(self) -> int:
        return self.n

    def documents(self, start: int = 0):
        for i in range(start, self.n):
            first = self.base + i * 100
            yield Document(id=f"{self.name}:{i}", text=" ".join(str(first + j) for j in range(5 + i % 37)))


class NumberTokenizer:
    eos_id = -1
    vocab_size = 10**9

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_two_ranks_consume_the_single_rank_sequence_exactly_once(batch_size):
    def make(**kw):
        sources = [(NumberSource("a", 0), 0.3), (NumberSource("b", 10**7), 0.7)]
        return MixtureLoader(sources, NumberTokenizer(), seq_len=50, **kw)

    single = make(batch_size=2 * batch_size)
    ranks = [make(batch_size=batch_size, dp_rank=r, dp_world_size=2) for r in range(2)]
    single_samples, rank_samples = [], []
    for step in range(40):
        x, y = next(single)
        single_samples += [tuple(row) + (last,) for row, last in zip(x["input"].tolist(), y[:, -1].tolist())]
        outs = []
        for r in ranks:
            x, y = next(r)
            outs.append([tuple(row) + (last,) for row, last in zip(x["input"].tolist(), y[:, -1].tolist())])
        for j in range(batch_size):  # global sample k goes to rank k % 2
            rank_samples += [outs[0][j], outs[1][j]]
        s0, s1 = ranks[0].state_dict(), ranks[1].state_dict()
        assert {k: v for k, v in s0.items() if k != "buffer"} == {k: v for k, v in s1.items() if k != "buffer"}
        assert s0["buffer"] == s1["buffer"]
    assert rank_samples == single_samples
    tokens = [t for sample in single_samples for t in sample if t != -1]
    assert len(tokens) > 40 * 2 * batch_size * 51 * 0.8 and len(set(tokens)) == len(tokens)  # no token (so no sample) twice
    # after the chunks: exactly the leftover of the stream, nothing skipped
    left = [t for t in single.state_dict()["buffer"] if t != -1]
    assert not set(left) & set(tokens)


def _samples(loader, steps):
    out = []
    for _ in range(steps):
        x, y = next(loader)
        out += [tuple(row) + (last,) for row, last in zip(x["input"].tolist(), y[:, -1].tolist())]
    return out


def test_resume_under_another_dp_degree_continues_the_global_sequence():
    def make(**kw):
        return MixtureLoader([(NumberSource("a", 0), 0.3), (NumberSource("b", 10**7), 0.7)], NumberTokenizer(), seq_len=50, **kw)

    single = make(batch_size=4)
    _samples(single, 5)
    state = single.state_dict()
    expected = _samples(single, 6)
    ranks = [make(batch_size=2, dp_rank=r, dp_world_size=2) for r in range(2)]  # 1 process -> 2
    for r in ranks:
        r.load_state_dict(state)
    per_rank = [_samples(r, 6) for r in ranks]
    # global sample k of a step of 4 goes to rank k % 2 (its (k % 4) // 2-th of that step)
    interleaved = [per_rank[(k % 4) % 2][2 * (k // 4) + (k % 4) // 2] for k in range(len(expected))]
    assert interleaved == expected
    back = make(batch_size=4)  # 2 processes -> 1
    back.load_state_dict(ranks[1].state_dict())
    again = make(batch_size=4)
    again.load_state_dict(state)
    _samples(again, 6)
    assert _samples(back, 3) == _samples(again, 3)


def test_state_of_another_mixture_is_an_error():
    state = _loader(dp_rank=0, dp_world_size=2).state_dict()
    with pytest.raises(DataError, match="has 5 sources, this mixture has 2"):
        _loader([ListSource("a", 3), ListSource("b", 3)], [1, 1]).load_state_dict(state)


def test_chat_documents_and_source_errors_are_data_errors():
    loader = _loader([ListSource("a", 50, (10,), chat_at=3)], [1.0], seq_len=8, batch_size=1)
    with pytest.raises(DataError, match=r"'a': document a:3 is a chat record"):
        for _ in range(100):
            next(loader)
    assert loader.stats()[0]["documents"] == 3  # documents before it were drawn

    loader = _loader([ListSource("e", 50, (10,), error_at=40)], [1.0], seq_len=8, batch_size=1)
    with pytest.raises(DataError, match=r"e\.jsonl:41: malformed JSON"):
        for _ in range(100):
            next(loader)
    assert loader.stats()[0]["documents"] == 40

    with pytest.raises(DataError, match="'empty' has no documents"):
        next(_loader([ListSource("empty", 0)], [1.0]))
    with pytest.raises(DataError, match="weights must be > 0"):
        _loader([ListSource("a", 3)], [0.0])


def test_tokenizer_without_encode_batch():
    class Plain(FakeTokenizer):
        encode_batch = None

    a = MixtureLoader([(ListSource("a", 9), 1.0)], Plain(), seq_len=16, batch_size=2)
    b = MixtureLoader([(ListSource("a", 9), 1.0)], FakeTokenizer(), seq_len=16, batch_size=2)
    for _ in range(10):
        assert torch.equal(next(a)[1], next(b)[1])


class ChatTokenizer(FakeTokenizer):
    """Fake tokenizer with a chat renderer: role byte, content bytes, end marker 257."""

    def encode_chat(self, messages, add_generation_prompt=False):
        ids, mask = [], []
        for m in messages:
            body = [ord(m["role"][0])] + self.encode(m["content"]) + [257]
            ids += body
            mask += [m["role"] == "assistant" and i > 0 for i in range(len(body))]
        return ids, mask


class ChatSource:
    def __init__(self, n=50):
        self.name, self.n = "chat", n

    def __len__(self):
        return self.n

    def documents(self, start=0):
        from phi4_engine.data.source import Document

        for i in range(start, self.n):
            yield Document(id=f"c{i}", messages=({"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}!"}))


def test_chat_mode_trains_on_assistant_tokens_only():
    loader = MixtureLoader([(ChatSource(), 1.0)], ChatTokenizer(), seq_len=40, batch_size=2, chat=True)
    inputs, labels = next(loader)
    tok = ChatTokenizer()
    stream = []
    for i in range(6):
        ids, mask = tok.encode_chat([{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}!"}])
        stream += [(t, m) for t, m in zip(ids, mask)] + [(256, False)]
    # labels are the next token where it is an assistant target, IGNORE_INDEX elsewhere
    expected = [t if m else IGNORE_INDEX for t, m in stream[1:41]]
    assert labels[0].tolist() == expected
    targets = [chr(t) for t in labels[0].tolist() if t != IGNORE_INDEX and t < 256]
    assert "".join(targets).startswith("a0!")
    assert inputs["positions"][0, 0] == 0


def test_chat_mode_rejects_text_and_resumes_exactly():
    text_only = MixtureLoader([(_five_sources()[0], 1.0)], ChatTokenizer(), seq_len=16, batch_size=1, chat=True)
    with pytest.raises(DataError, match="chat stages"):
        next(text_only)
    a = MixtureLoader([(ChatSource(), 1.0)], ChatTokenizer(), seq_len=23, batch_size=2, chat=True)
    next(a)
    state = a.state_dict()
    b = MixtureLoader([(ChatSource(), 1.0)], ChatTokenizer(), seq_len=23, batch_size=2, chat=True)
    b.load_state_dict(state)
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa["input"], xb["input"]) and torch.equal(ya, yb)
