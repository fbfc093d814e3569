"""GSM8K-AI-SubQ import/export on the shipped files: round trips, idempotence, malformed records."""

from __future__ import annotations

import json

import pytest
from subq.data_store.datasets import DATA_DIR, load_problems
from subq.data_store.gsm8k_ai_subq import PROMPT_VERSION, export_gsm8k_ai_subq, import_gsm8k_ai_subq
from subq.data_store.schema import problem_id
from subq.data_store.store import Store

SUBQ = DATA_DIR / "gsm8k-ai-subq"
RAW, CONVERTED, CHAT = (
    SUBQ / "qg_test_data_raw.jsonl",
    SUBQ / "qg_test_dataset.jsonl",
    SUBQ / "test_chat.jsonl",
)
N = 1319


@pytest.fixture(scope="module")
def published() -> list[dict]:
    return json.loads(CONVERTED.read_text())


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory) -> Store:
    store = Store(str(tmp_path_factory.mktemp("raw")))
    report = import_gsm8k_ai_subq(str(RAW), store)
    assert (report.fmt, report.records, report.matched_gsm8k) == ("raw", N, N)
    assert (report.problems_added, report.samples_added, report.samples_skipped_existing) == (N, N, 0)
    # 8 answers have no usable "Final answer" (a word, no marker, or a restarted A1: list), and 4 give
    # more than one value ("180 socks and 90 dishes"): a hedge is no answer (protocol.answers.hedged_value).
    assert report.parse_errors == 12
    return store


def test_converted_round_trip_is_exact(tmp_path, published):
    store = Store(str(tmp_path / "s"))
    report = import_gsm8k_ai_subq(str(CONVERTED), store)
    assert (report.fmt, report.samples_added, report.problems_added, report.parse_errors) == (
        "converted",
        N,
        N,
        0,
    )
    assert report.matched_gsm8k == N
    # 16 published golds lost a thousands separator or a minus sign upstream ("2,125" -> 2.0).
    assert report.gold_mismatches == 16
    out = tmp_path / "out.json"
    assert export_gsm8k_ai_subq(store, str(out)) == N
    assert json.loads(out.read_text()) == published
    assert out.read_bytes() == CONVERTED.read_bytes()  # even byte for byte


def test_reimport_adds_nothing(tmp_path):
    store = Store(str(tmp_path))
    import_gsm8k_ai_subq(str(CONVERTED), store)
    again = import_gsm8k_ai_subq(str(CONVERTED), store)
    assert (again.problems_added, again.samples_added, again.samples_skipped_existing) == (0, 0, N)
    assert store.count("samples") == N


def test_imported_rows_share_gsm8k_problem_ids(raw_store):
    gsm8k = load_problems("gsm8k:test")
    problems = {r["problem_id"]: r for r in raw_store.read_rows("problems")}
    assert set(problems) == {r["problem_id"] for r in gsm8k}
    assert problems[gsm8k[0]["problem_id"]]["reference_subquestions"] == gsm8k[0]["reference_subquestions"]
    first = next(r for r in raw_store.read_rows("samples") if r["problem_id"] == gsm8k[0]["problem_id"])
    assert first["source"] == "import:gsm8k-ai-subq-raw" and first["prompt_version"] == PROMPT_VERSION
    assert first["teacher_model"] == "gpt-3.5-turbo" and first["sample_index"] == 0
    assert first["subquestions"][0] == "How many eggs does Janet eat for breakfast every morning?"
    assert len(first["subanswers"]) == 5 and first["final_value"] == 18.0 and first["correct"] is True
    assert first["decompose_raw"].startswith("Q1: ") and first["answer_raw"].endswith("Final answer: 18")
    assert (first["decompose_status"], first["answer_status"], first["feedback_status"]) == (
        "ok",
        "ok",
        "skipped",
    )
    assert first["status"] == "ok" and first["usefulness"] is None and first["cost_usd"] is None
    assert first["created_at"].tzinfo is not None


def test_raw_round_trip_matches_published_conversion(raw_store, tmp_path, published):
    out = tmp_path / "raw.json"
    assert export_gsm8k_ai_subq(raw_store, str(out), only_ok=False) == N
    exported = json.loads(out.read_text())
    assert [e["question"] for e in exported] == [p["question"] for p in published]
    assert export_gsm8k_ai_subq(raw_store, str(tmp_path / "ok.json")) == N - 12  # parse errors left out

    def strip(qs):
        return [q.strip() for q in qs]

    # Sub-questions: the published file keeps trailing spaces; the protocol parser strips them and
    # drops repeated sub-questions (3 decompositions repeat one).
    same_subqs = sum(
        strip(e["answers"]) == strip(p["answers"]) for e, p in zip(exported, published, strict=True)
    )
    assert same_subqs >= N - 3
    # Correctness, on the rows whose published gold is right: 1296 of 1303 agree. The rest: two
    # negative answers upstream accepted (-2 for 2), three "48+96+140=284" finals upstream read as 48,
    # one "Final answer" our parser does not reach, one two-valued "180 socks and 90 dishes" (gold 180).
    gold = {r["question"]: r["answer_value"] for r in load_problems("gsm8k:test")}
    good = [
        (e, p) for e, p in zip(exported, published, strict=True) if p["true_answer"] == gold[p["question"]]
    ]
    assert len(good) == N - 16
    agree = sum(e["rewards"]["answer_correctness"] == p["rewards"]["answer_correctness"] for e, p in good)
    assert agree >= len(good) - 7
    # Where the published gold is wrong, ours is the dataset's (raw "#### 2,125" -> 2125).
    assert all(e["true_answer"] == gold[e["question"]] for e in exported)


def test_test_chat_holds_the_same_samples_as_raw(raw_store, tmp_path):
    # test_chat.jsonl is the raw layout as one JSON array, golds as floats (some wrong upstream):
    # same decompositions, so the same sample keys; judged against the dataset's gold.
    report = import_gsm8k_ai_subq(str(CHAT), raw_store)
    assert (report.fmt, report.samples_added, report.samples_skipped_existing) == ("raw", 0, N)
    fresh = Store(str(tmp_path))
    import_gsm8k_ai_subq(str(CHAT), fresh)
    key = lambda r: r["sample_key"]  # noqa: E731
    cols = ["sample_key", "subquestions", "final_value", "gold_value", "correct", "status"]
    assert sorted(fresh.read_rows("samples", cols), key=key) == sorted(
        raw_store.read_rows("samples", cols), key=key
    )


def test_malformed_raw_records_are_kept_as_parse_errors(tmp_path):
    good = {
        "problem": "Tom has 2 apples and buys 3 more. How many apples does he have?",
        "questions": ["Q1: How many apples does Tom buy?\nQ2: How many apples does he have?"],
        "answers": ["A1: 3\nA2: 2 + 3 = 5\n\nFinal answer: 5"],
        "answer": "#### 5",
    }
    lines = [
        json.dumps(good),
        json.dumps({**good, "problem": "Another problem?", "questions": ["no numbered lines here"]}),
        json.dumps({**good, "problem": "A third problem?", "answers": ["A1: 3\nA2: five"]}),
        json.dumps({**good, "problem": "A fourth problem?", "questions": 42}),
        '{"problem": "truncated',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    store = Store(str(tmp_path / "s"))
    report = import_gsm8k_ai_subq(str(path), store)
    assert (report.fmt, report.records, report.samples_added, report.parse_errors) == ("raw", 5, 5, 4)
    assert report.matched_gsm8k == 0
    rows = {r["question"]: r for r in store.read_rows("samples")}
    ok = rows[good["problem"]]
    assert ok["status"] == "ok" and ok["correct"] is True and ok["gold_value"] == 5.0
    assert ok["subquestions"] == ["How many apples does Tom buy?", "How many apples does he have?"]
    no_q = rows["Another problem?"]
    assert no_q["status"] == "parse_error" and no_q["decompose_status"] == "parse_error"
    assert no_q["decompose_error"] and no_q["decompose_raw"] == "no numbered lines here"
    no_final = rows["A third problem?"]
    assert no_final["decompose_status"] == "ok" and no_final["answer_status"] == "parse_error"
    assert no_final["answer_error"] and no_final["correct"] is None
    assert "not a list of strings" in rows["A fourth problem?"]["decompose_error"]
    broken = rows[""]
    assert broken["decompose_raw"] == '{"problem": "truncated' and broken["status"] == "parse_error"
    # Problems outside GSM8K get their own dataset and a text-derived, stable id.
    problem = next(p for p in store.read_rows("problems") if p["question"] == good["problem"])
    assert problem["dataset"] == "gsm8k-ai-subq" and problem["answer_value"] == 5.0
    assert problem["problem_id"] == problem_id("gsm8k-ai-subq", "test", problem["index"])
    again = import_gsm8k_ai_subq(str(path), store)
    assert (again.samples_added, again.problems_added) == (0, 0)


def test_malformed_converted_records_are_kept_as_parse_errors(tmp_path):
    records = [
        {
            "question": "Q one?",
            "answers": ["How many?"],
            "rewards": {"answer_correctness": 1.0, "usefulness": [0.5]},
            "true_answer": 3.0,
        },
        {
            "question": "Q two?",
            "answers": [],
            "rewards": {"answer_correctness": 0.0, "usefulness": []},
            "true_answer": 1.0,
        },
        {"question": "Q three?", "answers": ["Why?"], "rewards": {}, "true_answer": 2.0},
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(records))
    store = Store(str(tmp_path / "s"))
    report = import_gsm8k_ai_subq(str(path), store, teacher_model="my-teacher", split="train")
    assert (report.fmt, report.samples_added, report.parse_errors) == ("converted", 3, 2)
    rows = {r["question"]: r for r in store.read_rows("samples")}
    assert rows["Q one?"]["usefulness"] == [0.5] and rows["Q one?"]["feedback_status"] == "ok"
    assert rows["Q one?"]["source"] == "import:gsm8k-ai-subq-converted"
    assert rows["Q two?"]["decompose_status"] == "parse_error"
    assert rows["Q three?"]["answer_status"] == "parse_error" and rows["Q three?"]["correct"] is None
    out = tmp_path / "out.json"
    assert export_gsm8k_ai_subq(store, str(out), teacher_model="my-teacher") == 1
    assert json.loads(out.read_text()) == records[:1]
    assert export_gsm8k_ai_subq(store, str(out), teacher_model="someone-else") == 0


def test_format_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="cannot tell the GSM8K-AI-SubQ format"):
        import_gsm8k_ai_subq(str(path), Store(str(tmp_path / "s")))
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        import_gsm8k_ai_subq(str(path), Store(str(tmp_path / "s")), fmt="csv")
