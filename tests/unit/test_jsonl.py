"""The ``jsonl`` data source: strict reading (errors name file:line), .zst, truncation, resume."""

from __future__ import annotations

import os

import orjson
import pytest
import zstandard
from pydantic import ValidationError

from phi4_engine.data import Document, SourceContext
from phi4_engine.errors import DataError
from phi4_engine.plugins import jsonl
from phi4_engine.plugins.jsonl import JsonlSource, JsonlSourceSpec, build_jsonl_source


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def _records(n: int) -> list[bytes]:
    return [orjson.dumps({"text": f"document number {i} " + "word " * (i % 7), "n": i}) for i in range(n)]


def test_reads_text_records_with_ids_and_meta(tmp_path):
    path = _write(tmp_path / "a.jsonl", _records(5))
    src = JsonlSource(path)
    docs = list(src.documents())
    assert len(src) == 5 and len(docs) == 5
    assert docs[0].id == "a.jsonl:1" and docs[4].id == "a.jsonl:5"
    assert docs[2].text.startswith("document number 2") and docs[2].meta == {"n": 2}
    assert src.name == "a.jsonl"


def test_id_field_and_last_line_without_newline(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "x", "uid": "doc-7"}\n{"text": "y", "uid": 8}')
    src = JsonlSource(str(path), id_field="uid")
    assert [d.id for d in src.documents()] == ["doc-7", "8"]
    assert len(src) == 2


def test_chat_records(tmp_path):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "answer": "1"}
    path = _write(tmp_path / "c.jsonl", [orjson.dumps(rec)])
    (doc,) = JsonlSource(path, field="messages").documents()
    assert doc.messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    assert doc.text == "" and doc.meta == {"answer": "1"}
    with pytest.raises(DataError, match=r"c\.jsonl:1: missing field 'text'.*messages"):
        list(JsonlSource(path).documents())


BAD_LINES = [
    (b'{"text": "ok"', "malformed JSON"),
    (b"", "empty line"),
    (b"   ", "empty line"),
    (b'{"txt": "a"}', "missing field 'text'"),
    (b'{"text": 5}', "must be a string or a list of messages, got int"),
    (b'{"text": null}', "got null"),
    (b'["text"]', "expected a JSON object, got array"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    (b'{"text": [{"role": "user"}]}', "text[0].content must be a string, got missing"),
    (b'{"text": []}', "empty list of messages"),
]


@pytest.mark.parametrize("bad,what", BAD_LINES, ids=[w for _, w in BAD_LINES])
def test_bad_input_names_file_and_line(tmp_path, bad, what):
    lines = _records(3) + [bad] + _records(2)
    path = _write(tmp_path / "bad.jsonl", lines)
    src = JsonlSource(path)
    with pytest.raises(DataError) as info:
        list(src.documents())
    message = str(info.value)
    assert f"{path}:4: " in message and what in message
    assert "\n" not in message
    # records before the bad line are delivered before the error
    got = []
    with pytest.raises(DataError):
        for doc in src.documents():
            got.append(doc.id)
    assert got == ["bad.jsonl:1", "bad.jsonl:2", "bad.jsonl:3"]


def test_bad_id_field(tmp_path):
    path = _write(tmp_path / "d.jsonl", [b'{"text": "a", "id": "x"}', b'{"text": "b"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing id field 'id'"):
        list(JsonlSource(path, id_field="id").documents())


def _zst(path, data: bytes, *, frames: int = 1) -> str:
    cctx = zstandard.ZstdCompressor()
    step = -(-len(data) // frames)
    with open(path, "wb") as fh:
        for i in range(frames):  # streamed frames: no content size in the header, like `zstd -` output
            with cctx.stream_writer(fh, closefd=False) as w:
                w.write(data[i * step:(i + 1) * step])
    return str(path)


def test_zst_round_trip(tmp_path):
    plain = _write(tmp_path / "p.jsonl", _records(3000))
    data = open(plain, "rb").read()
    for frames in (1, 3):
        path = _zst(tmp_path / f"p{frames}.jsonl.zst", data, frames=frames)
        src = JsonlSource(path)
        docs = list(src.documents())
        assert len(src) == 3000
        assert [d.text for d in docs] == [d.text for d in JsonlSource(plain).documents()]
        assert docs[-1].id == f"p{frames}.jsonl.zst:3000"


def test_truncated_zst_is_an_error_not_a_short_file(tmp_path):
    data = open(_write(tmp_path / "t.jsonl", _records(20000)), "rb").read()
    full = _zst(tmp_path / "t.jsonl.zst", data)
    raw = open(full, "rb").read()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    # the pitfall: a plain streaming read returns partial data silently
    with open(cut, "rb") as fh:
        partial = zstandard.ZstdDecompressor().stream_reader(fh).read()
    assert 0 < len(partial) < len(data)
    src = JsonlSource(str(cut))
    with pytest.raises(DataError, match=r"cut\.jsonl\.zst: truncated zstd stream"):
        for _ in src.documents():
            pass
    with pytest.raises(DataError, match="truncated zstd stream"):
        len(src)
    empty = tmp_path / "empty.jsonl.zst"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="truncated zstd stream"):
        list(JsonlSource(str(empty)).documents())


def test_corrupt_zst(tmp_path):
    path = tmp_path / "x.jsonl.zst"
    path.write_bytes(b"this is not zstd at all\n")
    with pytest.raises(DataError, match=r"x\.jsonl\.zst: corrupt zstd data"):
        list(JsonlSource(str(path)).documents())


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_resume_with_start(tmp_path, suffix):
    plain = _write(tmp_path / "r.jsonl", _records(5000))
    path = plain if suffix == ".jsonl" else _zst(tmp_path / "r.jsonl.zst", open(plain, "rb").read())
    src = JsonlSource(path)
    full = list(src.documents())
    for start in (0, 1, 2047, 4999, 5000, 6000):
        assert list(src.documents(start)) == full[start:]


def test_spec_validates_path_and_registers(tmp_path):
    path = _write(tmp_path / "s.jsonl", _records(2))
    spec = JsonlSourceSpec.model_validate({"kind": "jsonl", "path": "s.jsonl"}, context={"base_dir": str(tmp_path)})
    assert spec.path == path and spec.field == "text" and spec.weight == 1.0
    with pytest.raises(ValidationError, match="file not found"):
        JsonlSourceSpec.model_validate({"kind": "jsonl", "path": "nope.jsonl"}, context={"base_dir": str(tmp_path)})
    with pytest.raises(ValidationError):
        JsonlSourceSpec.model_validate({"kind": "jsonl", "path": path, "colour": 1})
    src = build_jsonl_source(spec, SourceContext(base_dir=str(tmp_path), seed=0))
    assert isinstance(next(src.documents()), Document)

    registered = []
    jsonl.phi4_register_data_sources(lambda kind, model, factory: registered.append((kind, model, factory)))
    assert registered == [("jsonl", JsonlSourceSpec, build_jsonl_source)]
    assert os.path.isabs(spec.path)


# -- on_error: skip ---------------------------------------------------------------------------


def _skip_source(path: str, quarantine: str | None = None, fraction: float = 0.5) -> JsonlSource:
    return JsonlSource(path, on_error="skip", max_skip_fraction=fraction, quarantine_path=quarantine)


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "file"])
@pytest.mark.parametrize("bad,what", BAD_LINES, ids=[w for _, w in BAD_LINES])
def test_skip_quarantines_bad_record_and_keeps_every_valid_one(tmp_path, bad, what, in_memory):
    good = _records(5)
    path = _write(tmp_path / "bad.jsonl", good[:3] + [bad] + good[3:])
    clean = list(JsonlSource(_write(tmp_path / "clean.jsonl", good)).documents())
    qfile = None if in_memory else str(tmp_path / "data" / "quarantine" / "bad.jsonl")
    src = _skip_source(path, qfile)
    docs = list(src.documents())
    assert [d.text for d in docs] == [d.text for d in clean]
    assert [d.id for d in docs] == ["bad.jsonl:1", "bad.jsonl:2", "bad.jsonl:3", "bad.jsonl:5", "bad.jsonl:6"]
    report = src.report()
    assert (report["read"], report["kept"], report["skipped"]) == (6, 5, 1) and report["complete"]
    assert report["read"] == report["kept"] + report["skipped"]
    if in_memory:
        (record,) = report["quarantined"]
        assert report["quarantine_file"] is None
    else:
        assert report["quarantine_file"] == qfile and report["quarantined"] == []
        (record,) = [orjson.loads(line) for line in open(qfile, "rb")]
    assert record["file"] == path and record["line"] == 4 and what in record["error"]
    assert record["raw"] == bad.decode("utf-8", errors="replace")
    # a second pass (next epoch) neither loses records nor quarantines twice
    assert [d.id for d in src.documents()] == [d.id for d in docs]
    assert src.report()["skipped"] == 1 and len(src) == 5
    if not in_memory:
        assert len(open(qfile, "rb").read().splitlines()) == 1


def test_skip_fraction_exceeded_at_end_names_file_and_counts(tmp_path):
    path = _write(tmp_path / "few.jsonl", _records(3) + [b"{oops"] + _records(2))
    src = JsonlSource(path, on_error="skip")  # default max_skip_fraction 0.01
    got = []
    with pytest.raises(DataError) as info:
        for doc in src.documents():
            got.append(doc.id)
    message = str(info.value)
    assert message.startswith(f"{path}: 1 bad records of 6 read") and "max_skip_fraction 0.01" in message
    assert "line 4: malformed JSON" in message and "\n" not in message
    assert len(got) == 5  # every valid record was delivered before the verdict
    with pytest.raises(DataError, match="exceed max_skip_fraction"):  # sticky: later reads fail too
        list(src.documents())


def test_skip_fraction_checked_once_100_records_were_read(tmp_path):
    lines = _records(1000)
    for i in (10, 20, 30):
        lines[i] = b"not json"
    path = _write(tmp_path / "many.jsonl", lines)
    src = JsonlSource(path, on_error="skip", max_skip_fraction=0.02)
    got = []
    with pytest.raises(DataError, match=r"many\.jsonl: 3 bad records of 100 read"):
        for doc in src.documents():
            got.append(doc)
    assert len(got) == 96  # stopped when record 100 was read, not at the end of the file
    src = JsonlSource(path, on_error="skip", max_skip_fraction=0.05)
    assert len(list(src.documents())) == 997 and src.report()["skipped"] == 3


def test_skip_never_accepts_a_truncated_zst(tmp_path):
    data = open(_write(tmp_path / "t.jsonl", _records(20000)), "rb").read()
    raw = open(_zst(tmp_path / "t.jsonl.zst", data), "rb").read()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(raw[: len(raw) // 2])
    src = JsonlSource(str(cut), on_error="skip", max_skip_fraction=1.0)
    with pytest.raises(DataError, match=r"cut\.jsonl\.zst: truncated zstd stream"):
        for _ in src.documents():
            pass
    with pytest.raises(DataError, match="truncated zstd stream"):
        len(JsonlSource(str(cut), on_error="skip", max_skip_fraction=1.0))
    assert src.report()["skipped"] == 0  # the partial last line was not taken for a bad record


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_skip_resume_by_position_over_kept_records(tmp_path, suffix):
    lines = _records(3000)
    bad = [0, 1, 7, 1500, 1501, 2047, 2999]
    for i in bad:
        lines[i] = b'{"no": "text"}'
    plain = _write(tmp_path / "r.jsonl", lines)
    path = plain if suffix == ".jsonl" else _zst(tmp_path / "r.jsonl.zst", open(plain, "rb").read(), frames=2)
    full = list(_skip_source(path, fraction=0.05).documents())
    expected = [f"document number {i} " for i in range(3000) if i not in bad]
    assert [d.text.split("word")[0] for d in full] == expected
    warm = _skip_source(path, fraction=0.05)
    assert len(warm) == len(full) == 3000 - len(bad)
    for start in (0, 1, 5, 1499, 1500, 2040, 2992, 2993, 5000):
        assert list(warm.documents(start)) == full[start:]  # index known: jumps to the line
        fresh = _skip_source(path, fraction=0.05)  # a resumed process: re-reads to find it
        assert list(fresh.documents(start)) == full[start:]
        report = fresh.report()
        assert report["read"] == 3000 and report["skipped"] == len(bad) and report["kept"] == len(full)


def test_skip_partial_pass_counts_only_what_was_read(tmp_path):
    lines = _records(300)
    lines[5] = b""
    src = _skip_source(_write(tmp_path / "p.jsonl", lines), fraction=0.01)
    it = src.documents()
    first = [next(it) for _ in range(50)]
    report = src.report()
    assert (report["read"], report["kept"], report["skipped"], report["complete"]) == (51, 50, 1, False)
    # a resume in the middle of the counted region, then beyond it
    assert [d.id for d in src.documents(10)][:2] == ["p.jsonl:12", "p.jsonl:13"]
    assert list(src.documents(0))[:50] == first and src.report()["read"] == 300


def test_spec_on_error_fields_and_quarantine_in_work_dir(tmp_path):
    path = _write(tmp_path / "s.jsonl", _records(2) + [b"[1]"] + _records(1))
    base = {"kind": "jsonl", "path": path}
    spec = JsonlSourceSpec.model_validate(base)
    assert spec.on_error == "strict" and spec.max_skip_fraction == 0.01
    with pytest.raises(ValidationError):
        JsonlSourceSpec.model_validate({**base, "on_error": "ignore"})
    with pytest.raises(ValidationError):
        JsonlSourceSpec.model_validate({**base, "max_skip_fraction": 1.5})
    spec = JsonlSourceSpec.model_validate({**base, "on_error": "skip", "max_skip_fraction": 0.5, "name": "my web/data"})
    work = tmp_path / "run" / "pretrain" / "data"
    src = build_jsonl_source(spec, SourceContext(base_dir=str(tmp_path), seed=0, work_dir=str(work)))
    assert len(list(src.documents())) == 3
    qfile = work / "quarantine" / "my_web_data.jsonl"
    assert src.report()["quarantine_file"] == str(qfile) and qfile.exists()
    assert orjson.loads(qfile.read_bytes())["line"] == 3
    # strict sources and sources without a work dir write nothing
    strict = build_jsonl_source(JsonlSourceSpec.model_validate(base), SourceContext(str(tmp_path), 0, str(work)))
    with pytest.raises(DataError, match=r"s\.jsonl:3: expected a JSON object"):
        list(strict.documents())
    mem = build_jsonl_source(spec, SourceContext(base_dir=str(tmp_path), seed=0))
    list(mem.documents())
    assert mem.report()["quarantine_file"] is None and len(mem.report()["quarantined"]) == 1


def test_quarantine_file_written_only_by_rank_zero(tmp_path, monkeypatch):
    path = _write(tmp_path / "q.jsonl", _records(2) + [b"x"])
    monkeypatch.setenv("RANK", "1")
    qfile = tmp_path / "q" / "q.jsonl"
    src = _skip_source(path, str(qfile))
    assert len(list(src.documents())) == 2 and src.report()["skipped"] == 1
    assert not qfile.exists()
    monkeypatch.setenv("RANK", "0")
    list(_skip_source(path, str(qfile)).documents())
    assert len(qfile.read_bytes().splitlines()) == 1
