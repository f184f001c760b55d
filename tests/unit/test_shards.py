"""Token shards: writer/reader round trip, manifest, corruption detection, the mixture fast path."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from phi4_engine.data import Document, MixtureLoader
from phi4_engine.data.prepare import PrepareInput, write_shards
from phi4_engine.data.shards import ShardSource, ShardWriter, read_manifest
from phi4_engine.engine import Engine
from phi4_engine.errors import DataError, SpecError, UsageError
from phi4_engine.plugins.synthetic import SyntheticSource
from phi4_engine.tokenizer import build_phi4_mini


@pytest.fixture(scope="module")
def tok():
    return build_phi4_mini(2048)


class TextSource:
    def __init__(self, name, texts, fail_at=None):
        self.name, self.texts, self.fail_at = name, texts, fail_at

    def __len__(self):
        return len(self.texts)

    def documents(self, start=0):
        for i in range(start, len(self.texts)):
            if i == self.fail_at:
                raise DataError(f"{self.name}.jsonl:{i + 1}: malformed JSON")
            yield Document(id=f"{self.name}:{i}", text=self.texts[i])


def _synthetic(kind="synthetic-prose", name="prose", n=120):
    return SyntheticSource(kind, seed=0, num_documents=n, name=name)


def _items(*sources):
    return [PrepareInput(s.name, "test", {}, s) for s in sources]


def _texts(source):
    return [d.text for d in source.documents()]


def _prepare(tmp_path, tok, *sources, **kw):
    out = tmp_path / kw.pop("dirname", "shards")
    manifest = write_shards(_items(*sources), tok, out, **kw)
    return out, manifest


ODD = ["", "plain words", "a <|endoftext|> and <|im_end|> stay text", "lone \ud800 surrogate", "ünïcödé ✓ 😀", "x" * 5000]


def test_round_trip_multiple_shards(tmp_path, tok):
    prose, math = _synthetic(), _synthetic("synthetic-arithmetic", "math", 90)
    odd = TextSource("odd web/ä", ODD)
    out, manifest = _prepare(tmp_path, tok, prose, math, odd, max_shard_tokens=2000)
    for source in (prose, math, odd):
        entry = next(s for s in manifest["sources"] if s["name"] == source.name)
        assert len(entry["shards"]) > 1 or source is odd
        expected = [tok.encode(t) for t in _texts(source)]
        # the .bin files are the packed stream: encode(text) + [eos] per document
        stream = np.concatenate([np.fromfile(out / s["file"], dtype="<u4") for s in entry["shards"]])
        assert stream.tolist() == [t for ids in expected for t in ids + [tok.eos_id]]
        reader = ShardSource(out, source.name)
        assert len(reader) == len(expected) == entry["documents"]
        assert [d.tokens.tolist() for d in reader.documents()] == expected
        for start in (0, 1, entry["shards"][0]["documents"], len(expected) - 1, len(expected)):
            got = list(reader.documents(start))
            assert [d.id for d in got] == [f"{source.name}:{i}" for i in range(start, len(expected))]
            assert [d.tokens.tolist() for d in got] == expected[start:]
    assert "odd_web__-00000.bin" in {s["file"] for e in manifest["sources"] for s in e["shards"]}
    assert tok.encode("<|endoftext|>") != [tok.eos_id]


def test_manifest_records_counts_sizes_hashes(tmp_path, tok):
    out, manifest = _prepare(tmp_path, tok, _synthetic(), max_shard_tokens=1500,
                             origin={"spec": "s.json", "stage": "pretrain"})
    assert manifest == read_manifest(out)
    assert manifest["format"] == "phi4-engine-shards" and manifest["dtype"] == "uint32"
    assert manifest["tokenizer"] == {"name": "phi4-mini", "vocab_size": 2144, "eos_id": tok.eos_id,
                                     "fingerprint": tok.fingerprint, "spec": None}
    (entry,) = manifest["sources"]
    assert entry["name"] == "prose" and entry["documents"] == 120
    assert entry["tokens"] == sum(len(tok.encode(t)) + 1 for t in _texts(_synthetic()))
    assert sum(s["documents"] for s in entry["shards"]) == 120
    assert sum(s["tokens"] for s in entry["shards"]) == entry["tokens"]
    for i, shard in enumerate(entry["shards"]):
        assert shard["file"] == f"prose-{i:05d}.bin" and shard["index"] == f"prose-{i:05d}.idx"
        data = (out / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) == 4 * shard["tokens"] and shard["tokens"] <= 1500
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        index = np.fromfile(out / shard["index"], dtype="<u8")
        assert shard["index_bytes"] == index.nbytes and len(index) == shard["documents"] + 1
        assert index[0] == 0 and index[-1] == shard["tokens"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_writer_splits_on_document_boundaries(tmp_path):
    writer = ShardWriter(tmp_path, "s", max_shard_tokens=10)
    lengths = np.array([3, 4, 3, 12, 1, 9, 2])
    writer.add(np.arange(lengths[:4].sum(), dtype=np.uint32), lengths[:4])
    writer.add(np.arange(lengths[4:].sum(), dtype=np.uint32), lengths[4:])
    shards = writer.close()
    assert [(s["documents"], s["tokens"]) for s in shards] == [(3, 10), (1, 12), (2, 10), (1, 2)]


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_corrupt_shard_is_a_one_line_error_naming_the_file(tmp_path, tok, damage):
    out, manifest = _prepare(tmp_path, tok, _synthetic(), max_shard_tokens=2000)
    shard = manifest["sources"][0]["shards"][1]
    path = out / shard["file"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[4 * 5 + 1] ^= 0x01  # token 5 of the shard (no EOS: documents are longer)
        path.write_bytes(bytes(data))
        reader = ShardSource(out)  # sizes still match: only the hash can tell, on first read
        with pytest.raises(DataError) as err:
            list(reader.documents())
        assert list(ShardSource(out, verify=False).documents())  # verify: false skips the hash
    else:
        if damage == "truncate":
            path.write_bytes(bytes(data[:-6]))
        else:
            path.unlink()
        with pytest.raises(DataError) as err:
            ShardSource(out)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert {"flip": "sha256 does not match", "truncate": "truncated", "missing": "missing"}[damage] in msg


def test_corrupt_offsets_are_detected(tmp_path, tok):
    out, manifest = _prepare(tmp_path, tok, _synthetic(n=10))
    shard = manifest["sources"][0]["shards"][0]
    index = np.fromfile(out / shard["index"], dtype="<u8")
    index[3] += 1
    index.tofile(out / shard["index"])
    with pytest.raises(DataError, match="sha256 does not match"):
        list(ShardSource(out).documents())
    with pytest.raises(DataError, match="offsets do not match"):
        list(ShardSource(out, verify=False).documents())


def test_no_manifest_and_unknown_source(tmp_path, tok):
    with pytest.raises(DataError, match="not a prepared shards directory"):
        ShardSource(tmp_path)
    out, _ = _prepare(tmp_path, tok, _synthetic(), _synthetic("synthetic-arithmetic", "math", 5))
    with pytest.raises(DataError, match="choose one with 'source'"):
        ShardSource(out)
    with pytest.raises(DataError, match="no source 'web'"):
        ShardSource(out, "web")


def test_mixture_over_shards_equals_mixture_over_text(tmp_path, tok):
    prose, math = _synthetic(n=60), _synthetic("synthetic-arithmetic", "math", 40)
    out, _ = _prepare(tmp_path, tok, prose, math, max_shard_tokens=3000)
    text = MixtureLoader([(prose, 0.7), (math, 0.3)], tok, seq_len=63, batch_size=4)
    shards = MixtureLoader([(ShardSource(out, "prose"), 0.7), (ShardSource(out, "math"), 0.3)], tok, seq_len=63, batch_size=4)
    for _ in range(60):  # beyond one epoch of both sources
        (a, la), (b, lb) = next(text), next(shards)
        assert a["input"].equal(b["input"]) and la.equal(lb)
    assert text.stats() == shards.stats()


def test_mixture_refuses_shards_of_another_tokenizer(tmp_path, tok):
    out, _ = _prepare(tmp_path, tok, _synthetic(n=5))
    with pytest.raises(DataError, match="prepared with tokenizer 'phi4-mini'"):
        MixtureLoader([(ShardSource(out), 1.0)], build_phi4_mini(4096), seq_len=16, batch_size=1)


def test_failed_prepare_never_looks_complete(tmp_path, tok):
    out, _ = _prepare(tmp_path, tok, _synthetic(n=20))
    bad = TextSource("web", ["some text " * 50] * 30, fail_at=25)
    with pytest.raises(UsageError, match="not empty") as err:
        write_shards(_items(bad), tok, out)
    assert err.value.exit_code == 2
    with pytest.raises(DataError, match="web.jsonl:26"):
        write_shards(_items(_synthetic(n=20), bad), tok, out, force=True, max_shard_tokens=100)
    assert list(out.iterdir()) == []  # old manifest gone first, new shards and temp files removed
    with pytest.raises(SpecError, match="distinct 'name'"):
        write_shards(_items(_synthetic(n=2), _synthetic(n=2)), tok, tmp_path / "dup")


def test_force_replaces_and_removes_stale_shards(tmp_path, tok):
    out, _ = _prepare(tmp_path, tok, _synthetic(n=50), max_shard_tokens=500)
    write_shards(_items(_synthetic("synthetic-arithmetic", "math", 5)), tok, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "math-00000.bin", "math-00000.idx"]


class ByteTokenizer:
    """Not a Phi4Tokenizer: the generic encode() path."""

    name, eos_id, vocab_size = "bytes", 256, 257

    def encode(self, text):
        return list(text.encode())


def test_generic_tokenizer(tmp_path):
    tok = ByteTokenizer()
    out, manifest = _prepare(tmp_path, tok, TextSource("t", ["ab", "", "ü"]))
    assert manifest["tokenizer"]["fingerprint"] is None
    assert [d.tokens.tolist() for d in ShardSource(out).documents()] == [[97, 98], [], [195, 188]]


def test_shards_source_spec(tmp_path, tok):
    out, _ = _prepare(tmp_path, tok, _synthetic(n=30), _synthetic("synthetic-arithmetic", "math", 10))

    def spec(**source):
        return {"name": "t", "tokenizer": {"kind": "phi4-mini", "vocab_ranks": 2048}, "stages": [
            {"kind": "pretrain", "steps": 1, "seq_len": 16, "batch_size": 1, "lr": 1e-3,
             "data": {"sources": [{"kind": "shards", **source}]}}]}

    engine = Engine(spec(path="shards", source="math"), base_dir=tmp_path)
    src_spec = engine.validate().stages[0].data.sources[0]
    assert src_spec.path == str(out)
    from phi4_engine.data.source import SourceContext

    source = engine.registry.build("data_source", src_spec, SourceContext(str(tmp_path), 0))
    assert source.name == "math" and len(source) == 10
    for bad, where in [({"path": "shards", "source": "web"}, "source 'web' is not in"),
                       ({"path": "shards"}, "choose one with 'source'"),
                       ({"path": "nowhere"}, "path: file not found"),
                       ({"path": "."}, "not a prepared shards directory")]:
        with pytest.raises(SpecError, match=where) as err:
            Engine(spec(**bad), base_dir=tmp_path).validate()
        assert "stages[0].data.sources[0]" in str(err.value)
    assert json.loads((out / "manifest.json").read_text())["sources"][1]["name"] == "math"
