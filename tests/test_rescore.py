"""evaluation.rescore: paper 1's released evaluation format, scored in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from subq.evaluation.rescore import RescoreError, RescoreResult, rescore_file, rescore_records

SUBQ_DATA = Path(__file__).resolve().parents[1] / "data_store" / "data" / "gsm8k-ai-subq"

# Each record is chosen for where the two modes part (see the comments): 7 replies in 6 records.
RECORDS = [
    # strict reads 1000, paper 1 reads "1,000" as 1
    {"problem": "p1", "questions": "Q1: a?", "answers": "A1: 10 * 100 = 1,000\nFinal answer: 1,000", "answer": 1000.0},
    # strict: the last marker (7); paper 1: the first (5)
    {"problem": "p2", "questions": "Q1: a?", "answers": "Final answer: 5\nFinal answer: 7", "answer": "#### 7"},
    # both: a list of one reply, a GSM8K rationale as the gold
    {"problem": "p3", "questions": ["Q1: a?"], "answers": ["The total is 42.\n\nFinal answer: 42"],
     "answer": "She has 40 + 2 = <<40+2=42>>42.\n#### 42"},
    # both wrong: upstream stores None for a refused request
    {"problem": "p4", "questions": "Q1: a?", "answers": None, "answer": 3.0},
    # two parallel decompositions, each its own attempt: one right, one wrong in both modes
    {"problem": "p5", "questions": ["Q1: a?", "Q1: b?"], "answers": ["Final answer: 3", "Final answer: 4"],
     "answer": "#### 3"},
    # paper 1 drops the sign of both prediction and gold ("-10" -> 10): right in both modes
    {"problem": "p6", "questions": "Q1: a?", "answers": "Final answer: -10", "answer": "#### -10"},
]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_both_modes_give_their_own_accuracy(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "eval.jsonl", RECORDS)
    strict = rescore_file(path, "strict")
    paper1 = rescore_file(path, "paper1")
    assert (strict.n, strict.correct, strict.unparsed, strict.problems) == (7, 5, 1, 6)
    assert (paper1.n, paper1.correct, paper1.unparsed, paper1.problems) == (7, 3, 1, 6)
    assert strict.accuracy == pytest.approx(5 / 7) and paper1.accuracy == pytest.approx(3 / 7)
    assert strict.ci_low < strict.accuracy < strict.ci_high
    assert rescore_records(RECORDS, "strict") == strict and rescore_records(RECORDS, "paper1") == paper1
    assert rescore_file(str(path)) == strict  # strict is the default


def test_json_list_and_upstream_array_in_a_jsonl_file(tmp_path: Path) -> None:
    as_json = tmp_path / "eval.json"
    as_json.write_text(json.dumps(RECORDS, indent=1))
    one_line_array = tmp_path / "test_chat.jsonl"  # upstream's test_chat.jsonl holds one JSON array
    one_line_array.write_text(json.dumps(RECORDS) + "\n")
    for mode, correct in (("strict", 5), ("paper1", 3)):
        assert rescore_file(as_json, mode).correct == correct
        assert rescore_file(one_line_array, mode).correct == correct


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n\n   \n" + json.dumps(RECORDS[1]) + "\n")
    assert rescore_file(path).n == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"problem": "p", "questions": "q", "answers": "Final answer: 1"}', "missing key 'answer'"),
        ('{"problem": "p", "answer": 1}', "missing key 'answers'"),
        ('{"answers": 7, "answer": 1}', "must hold strings"),
        ('{"answers": [], "answer": 1}', "empty list"),
        ('{"answers": "Final answer: 1", "answer": "#### ?"}', "no gold number"),
        ('{"answers": "Final answer: 1", "answer": [1]}', "'answer' must be a number or a string"),
        ('"just a string"', "expected a JSON object"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n" + line + "\n")
    for mode in ("strict", "paper1"):
        with pytest.raises(RescoreError, match=message) as err:
            rescore_file(path, mode)
        assert f"{path}:3" in str(err.value)
    assert issubclass(RescoreError, ValueError)


def test_malformed_records_and_files(tmp_path: Path) -> None:
    with pytest.raises(RescoreError, match="record 2: missing key 'answers'"):
        rescore_records([RECORDS[0], {"answer": 1}])
    with pytest.raises(RescoreError, match="no such file"):
        rescore_file(tmp_path / "missing.jsonl")
    not_a_list = tmp_path / "eval.json"
    not_a_list.write_text('{"answers": "x", "answer": 1}')
    with pytest.raises(RescoreError, match="list of records"):
        rescore_file(not_a_list)
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2,")
    with pytest.raises(RescoreError, match="not valid JSON"):
        rescore_file(broken)
    with pytest.raises(ValueError, match="mode"):
        rescore_records(RECORDS, "lenient")


def test_no_records() -> None:
    assert rescore_records([]) == RescoreResult(0, 0, 0.0, 0.0, 1.0, 0, 0)


def test_paper1_mode_reproduces_the_published_correctness_labels() -> None:
    """Paper 1's own labels (qg_test_dataset.jsonl, answer_correctness) were computed with its protocol."""
    raw_path, labels_path = SUBQ_DATA / "qg_test_data_raw.jsonl", SUBQ_DATA / "qg_test_dataset.jsonl"
    if not raw_path.exists() or not labels_path.exists():
        pytest.skip("GSM8K-AI-SubQ files not in data_store/data")
    raw = [json.loads(line) for line in raw_path.read_text().splitlines()]
    labels = [r["rewards"]["answer_correctness"] for r in json.loads(labels_path.read_text())]
    assert len(raw) == len(labels) == 1319
    per_record = [rescore_records([r], "paper1").correct for r in raw]
    assert per_record == [int(v) for v in labels]
    assert rescore_file(raw_path, "paper1").correct == 882
    # our strict reading of the same replies: commas and "-" read correctly (+10 problems), and the
    # 4 replies naming two values ("180 socks and 90 dishes", gold 180) are parse failures (-1 problem)
    strict = rescore_file(raw_path, "strict")
    assert (strict.correct, strict.unparsed) == (891, 8)
    # test_chat.jsonl stores golds already parsed by paper 1 ("#### 2,125" -> 2.0), so both modes agree
    # there but for the same two-valued reply
    chat = SUBQ_DATA / "test_chat.jsonl"
    if chat.exists():
        assert (rescore_file(chat, "paper1").correct, rescore_file(chat, "strict").correct) == (882, 881)


def test_score_on_gsm8k_rows_reproduces_the_published_labels() -> None:
    """The same check through evaluation.scoring.score on our GSM8K problem rows (what `subq eval` uses)."""
    from subq.data_store.datasets import load_problems
    from subq.evaluation.scoring import score

    raw_path, labels_path = SUBQ_DATA / "qg_test_data_raw.jsonl", SUBQ_DATA / "qg_test_dataset.jsonl"
    if not raw_path.exists() or not labels_path.exists():
        pytest.skip("GSM8K-AI-SubQ files not in data_store/data")
    raw = [json.loads(line) for line in raw_path.read_text().splitlines()]
    labels = [bool(r["rewards"]["answer_correctness"]) for r in json.loads(labels_path.read_text())]
    problems = load_problems("gsm8k:test")
    assert [p["question"] for p in problems[:3]] == [r["problem"].strip() for r in raw[:3]]
    assert [score(r["answers"][0], p, "paper1").correct for r, p in zip(raw, problems, strict=True)] == labels
    assert sum(score(r["answers"][0], p).correct for r, p in zip(raw, problems, strict=True)) == 891
