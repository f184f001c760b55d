"""Decontamination ([P4] App. B.1 Alg. 1): 13-gram hits, 7-gram ratio, allow-list, wrapper, spec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from phi4_engine.data import Document
from phi4_engine.data.decontam import DecontaminatedSource, DecontaminationIndex, read_benchmark
from phi4_engine.data.ngrams import normalize, word_hashes
from phi4_engine.engine import Engine
from phi4_engine.errors import DataError, SpecError
from phi4_engine.plugins.jsonl import JsonlSource
from phi4_engine.stage import StageContext
from phi4_engine.training import build_sources
from tests.conftest import REPO, tiny_pretrain_spec, write_spec

GSM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
TRIVIA = "Which is the name of the river that flows through Paris, France?"  # 12 words: no 13-gram
OPTIONS = "none of the above; all of the above; both a and b; neither a nor b; cannot be determined"
MCQ = (
    "Which gas makes up most of the atmosphere of the planet Earth by volume today? "
    f"Options: nitrogen, oxygen, argon, carbon dioxide, {OPTIONS}."
)
FILLER = " ".join(f"filler{i} words about gardening and the weather in spring" for i in range(20))


def _index(allow=(), **kw) -> DecontaminationIndex:
    items = [("bench.jsonl:1", GSM), ("bench.jsonl:2", TRIVIA), ("bench.jsonl:3", MCQ)]
    return DecontaminationIndex(items, allow, **kw)


def test_normalize_lowercases_and_breaks_on_punctuation():
    assert normalize("Hello,  WORLD!\n2+2=4; don't_stop") == ["hello", "world", "2", "2", "4", "don", "t", "stop"]


def _wh(text: str) -> list[int]:
    return word_hashes([text])[0].tolist()


def test_word_hashes_follow_normalize_for_any_script():
    ascii_text = "Cafe naive -- it's 2+2=4, isn't it?"
    fancy = "Cafe\u00a0naive \u2014 it\u2019s 2+2=4, isn\u2019t it\u2026"
    assert normalize(fancy) == normalize(ascii_text)
    assert _wh(fancy) == _wh(ascii_text) and len(_wh(ascii_text)) == len(normalize(ascii_text)) == 10
    a, b = _wh("Café «naïve» ÉLAN"), _wh("café naïve élan")
    assert a == b and len(set(a)) == 3
    assert len(_wh("x" * 70_000 + " y")) == 2 and _wh("... !!") == []
    assert _wh("ab") != _wh("ba")
    # a batch: same hashes as one by one, and the document of each word
    texts = ["One two", "", "!!", "three, Four five", "six"]
    hashes, doc = word_hashes(texts)
    assert hashes.tolist() == [h for t in texts for h in _wh(t)]
    assert doc.tolist() == [0, 0, 3, 3, 3, 4]


def test_benchmark_item_inside_a_longer_document_is_dropped_by_13_gram():
    doc = f"{FILLER} Here is a homework problem. {GSM} The answer is 72. {FILLER}"
    verdict = _index().check(doc)
    assert (verdict.status, verdict.reason, verdict.item) == ("contaminated", "ngram", "bench.jsonl:1")
    assert _index().check(FILLER).status == "clean"


def test_punctuation_and_case_do_not_evade_the_check():
    mangled = GSM.upper().replace(" ", "  ").replace(",", " ,").replace("?", "!!!").replace(".", " -- ")
    mangled = mangled.replace("clips", "'clips'")
    assert _index().check(f"{FILLER}\n{mangled}\n{FILLER}").reason == "ngram"
    assert _index().check(f"Quiz:\nWHICH is the name of the river that flows through *Paris* (France)").reason == "ratio"


def test_short_items_are_caught_by_the_7_gram_ratio():
    # a 12-word item has no 13-gram: only the ratio can catch it
    assert _index().check(f"{FILLER}. {TRIVIA} {FILLER}") == ("contaminated", "ratio", "bench.jsonl:2", 1.0)
    # paraphrase sharing 5 of the item's 6 7-grams: 0.83 >= 0.8 -> dropped
    verdict = _index().check(f"{FILLER} what is the name of the river that flows through paris france {FILLER}")
    assert (verdict.status, verdict.reason) == ("contaminated", "ratio") and verdict.ratio == pytest.approx(5 / 6)
    # 4 of 6: above the info threshold, below the drop threshold -> partial (kept, reported)
    verdict = _index().check(f"{FILLER} tell me the name of the river that flows through paris france {FILLER}")
    assert (verdict.status, verdict.ratio) == ("partial", pytest.approx(4 / 6))
    verdict = _index(info_threshold=0.7, contaminated_threshold=0.9).check(
        f"{FILLER} tell me the name of the river that flows through paris france"
    )
    assert verdict.status == "clean"


def test_allow_listed_phrase_alone_does_not_contaminate():
    doc = f"{FILLER} Pick one: {OPTIONS}. {FILLER}"
    assert _index().check(doc).reason == "ngram"  # without the allow-list it matches the MCQ item
    assert _index(allow=[OPTIONS]).check(doc).status == "clean"
    # the allow-list does not hide the rest of the item
    assert _index(allow=[OPTIONS]).check(f"{FILLER} {MCQ}").reason == "ngram"


def test_hashes_are_stable_across_processes(tmp_path):
    code = (
        "from phi4_engine.data.decontam import DecontaminationIndex as I;"
        "print(I([('a', %r)]).long.keys.tolist())" % GSM
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] and runs[0].count(",") > 10


class ListSource:
    def __init__(self, texts: list[str], name: str = "list"):
        self.texts = texts
        self.name = name
        self.calls: list[int] = []

    def documents(self, start: int = 0):
        self.calls.append(start)
        for i in range(start, len(self.texts)):
            yield Document(id=f"doc-{i}", text=self.texts[i])

    def __len__(self) -> int:
        return len(self.texts)


def _corpus() -> list[str]:
    texts = []
    for i in range(60):
        if i % 7 == 3:
            texts.append(f"{FILLER} {i} {GSM}")
        elif i % 11 == 5:
            texts.append(f"{i} what is the name of the river that flows through paris france")
        elif i % 13 == 6:
            texts.append(f"{i} tell me the name of the river that flows through paris france {FILLER}")
        else:
            texts.append(f"document {i}: {FILLER}")
    return texts


def test_wrapper_keeps_the_source_contract_and_reports():
    texts = _corpus()
    inner = ListSource(texts)
    src = DecontaminatedSource(inner, _index())
    kept_ids = [d.id for d in src.documents()]
    expected = [f"doc-{i}" for i in range(60) if i % 7 != 3 and not (i % 11 == 5 and i % 7 != 3)]
    assert kept_ids == expected and len(src) == len(expected) and src.name == "list"
    full = list(src.documents())
    for start in range(len(full) + 2):
        assert list(src.documents(start)) == full[start:]
    report = src.report()
    ngram, ratio = sum(i % 7 == 3 for i in range(60)), len(texts) - len(expected) - sum(i % 7 == 3 for i in range(60))
    partial = sum(1 for i in range(60) if i % 13 == 6 and i % 7 != 3 and i % 11 != 5)
    assert report["scanned"] == 60 and report["kept"] == len(expected)
    assert report["dropped"] == {"ngram": ngram, "ratio": ratio} and report["partial"] == partial
    assert report["scanned"] == report["kept"] + ngram + ratio
    assert len(report["examples"]["ngram"]) == 5 and report["examples"]["ngram"][0] == {
        "id": "doc-3", "item": "bench.jsonl:1", "ratio": None,
    }
    assert all(e["item"] == "bench.jsonl:2" for e in report["examples"]["ratio"] + report["examples"]["partial"])
    assert inner.calls[0] == 0 and inner.calls[-1] > 0  # resumes read the inner source from a position


def test_wrapper_over_jsonl_with_skip_and_everything_dropped(tmp_path):
    lines = [orjson.dumps({"text": t}) for t in _corpus()[:20]] + [b"{bad"]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    inner = JsonlSource(str(path), on_error="skip", max_skip_fraction=0.1)
    src = DecontaminatedSource(inner, _index())
    assert inner.report()["skipped"] == 1 and src.report()["scanned"] == 20
    assert [d.id for d in src.documents(2)] == [d.id for d in src.documents()][2:]
    gone = DecontaminatedSource(ListSource([GSM, TRIVIA]), _index())
    assert len(gone) == 0 and list(gone.documents()) == []


def test_read_benchmark_formats(tmp_path):
    (tmp_path / "b.txt").write_text("first item here\n\nsecond item\n")
    assert read_benchmark(str(tmp_path / "b.txt")) == [("b.txt:1", "first item here"), ("b.txt:3", "second item")]
    rec = {"q": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "b.jsonl").write_bytes(orjson.dumps(rec) + b"\n" + orjson.dumps({"q": "plain"}) + b"\n")
    assert read_benchmark(str(tmp_path / "b.jsonl"), "q") == [("b.jsonl:1", "hi there\nyo"), ("b.jsonl:2", "plain")]
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*'text'"):
        read_benchmark(str(tmp_path / "bad.jsonl"))


def _decon_spec(tmp_path: Path, **section) -> dict:
    (tmp_path / "bench.jsonl").write_bytes(b"\n".join(orjson.dumps({"text": t}) for t in (GSM, TRIVIA, MCQ)) + b"\n")
    (tmp_path / "allow.txt").write_text(OPTIONS + "\n")
    data = tiny_pretrain_spec()
    data["stages"][0]["data"]["decontamination"] = {"benchmarks": ["bench.jsonl"], "allow_list": "allow.txt", **section}
    return data


def test_spec_with_decontamination_validates(tmp_path):
    spec = Engine.from_file(write_spec(tmp_path / "spec.json", _decon_spec(tmp_path))).validate()
    section = spec.stages[0].data.decontamination
    assert section.benchmarks == [str(tmp_path / "bench.jsonl")] and section.allow_list == str(tmp_path / "allow.txt")
    assert (section.ngram, section.ratio_ngram, section.info_threshold, section.contaminated_threshold) == (13, 7, 0.5, 0.8)
    assert "does not give the value" in str(Engine({"name": "s", "stages": []}).schema())


@pytest.mark.parametrize("section,where,what", [
    ({"benchmarks": ["bench.jsonl", "missing.jsonl"]}, "stages[0].data.decontamination.benchmarks[1]", "missing.jsonl"),
    ({"allow_list": "nope.txt"}, "stages[0].data.decontamination.allow_list", "nope.txt"),
    ({"info_threshold": 0.9}, "stages[0].data.decontamination", "contaminated_threshold must be >= info_threshold"),
    ({"benchmarks": []}, "stages[0].data.decontamination.benchmarks", "at least 1"),
])
def test_bad_decontamination_section_is_a_located_one_line_error(tmp_path, section, where, what):
    path = write_spec(tmp_path / "spec.json", _decon_spec(tmp_path, **section))
    with pytest.raises(SpecError) as info:
        Engine.from_file(path).validate()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: {where}: ") and what in message


def test_build_sources_wraps_and_writes_the_report(tmp_path):
    data = _decon_spec(tmp_path)
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(orjson.dumps({"text": t}) for t in _corpus()) + b"\n")
    data["stages"][0]["data"]["sources"] = [{"kind": "jsonl", "name": "web", "path": "train.jsonl"}]
    engine = Engine.from_file(write_spec(tmp_path / "spec.json", data))
    spec = engine.validate()
    ctx = StageContext(
        run_dir=str(tmp_path / "run"), stage_name="pretrain", spec=spec, stage_spec=spec.stages[0],
        registry=engine.registry, tokenizer=None, init_checkpoint=None, notify=lambda *a, **k: None,
        extra={"spec_dir": str(tmp_path)},
    )
    ((src, weight),) = build_sources(ctx, spec.stages[0].data.sources)
    assert isinstance(src, DecontaminatedSource) and weight == 1.0 and src.name == "web"
    report = orjson.loads((tmp_path / "run" / "pretrain" / "data" / "decontamination.json").read_bytes())
    assert report["index"]["items"] == 3 and report["sources"]["web"] == src.report()
    assert report["sources"]["web"]["dropped"]["ngram"] > 0
    ((plain, _),) = build_sources(ctx, spec.stages[0].data.sources, decontamination=None)
    assert isinstance(plain, JsonlSource) and len(plain) == 60


def _naive(index: DecontaminationIndex, items, allow, text: str) -> tuple[str, str | None]:
    """Alg. 1 as written (tuples of words, every item), with our allow-list rule for 7-grams."""
    def ngrams(words, n):
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    allow_long = set().union(*(ngrams(normalize(a), 13) for a in allow))
    allow_short = set().union(*(ngrams(normalize(a), 7) for a in allow))
    words = normalize(text)
    bench_long = set().union(*(ngrams(normalize(t), 13) for _, t in items)) - allow_long
    if ngrams(words, 13) & bench_long:
        return "contaminated", "ngram"
    doc = ngrams(words, 7)
    best = 0.0
    for _, t in items:
        item = ngrams(normalize(t), 7)
        if item and doc:
            best = max(best, len(doc & (item - allow_short)) / min(len(doc), len(item)))
    if best > index.info:
        return ("contaminated" if best >= index.contaminated else "partial"), "ratio"
    return "clean", None


def test_batched_index_agrees_with_the_textbook_algorithm():
    import random

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(40)]  # a small vocabulary: many partial overlaps
    items = [(f"b:{j}", " ".join(rng.choices(vocab, k=rng.randint(6, 30)))) for j in range(60)]
    allow = [" ".join(rng.choices(vocab, k=14)) for _ in range(3)] + [items[0][1]]
    index = DecontaminationIndex(items, allow)
    texts = []
    for _ in range(300):
        words = rng.choices(vocab, k=rng.randint(0, 60))
        if rng.random() < 0.5:
            src = normalize(rng.choice(items)[1])
            a = rng.randint(0, len(src))
            words[rng.randint(0, len(words)):0] = [w.upper() + rng.choice(["", ",", "!"]) for w in src[a:a + rng.randint(5, 14)]]
        texts.append(" ".join(words))
    batch = index.check_many(texts)
    assert [index.check(t) for t in texts] == batch
    assert [(v.status, v.reason) for v in batch] == [_naive(index, items, allow, t) for t in texts]
    assert {v.status for v in batch} == {"clean", "partial", "contaminated"}


def test_pre_tokenized_documents_are_decoded_or_refused():
    class Shards(ListSource):
        def documents(self, start: int = 0):
            for i in range(start, len(self.texts)):
                yield Document(id=f"s-{i}", tokens=[ord(c) for c in self.texts[i]])

    src = Shards([f"{FILLER} {GSM}", FILLER], name="shards")
    with pytest.raises(DataError, match="'shards': document s-0 is pre-tokenized"):
        DecontaminatedSource(src, _index())
    wrapped = DecontaminatedSource(src, _index(), decode=lambda ids: "".join(map(chr, ids)))
    assert [d.id for d in wrapped.documents()] == ["s-1"]
