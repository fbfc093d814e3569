"""Benchmark loaders: row counts from each data folder's README, exact fields, slices, spec errors."""

from __future__ import annotations

import shutil
import time

import pytest
from subq.data_store.datasets import (
    DATA_DIR,
    KNOWN_DATASETS,
    DatasetError,
    ProblemSpec,
    accepted_answers,
    load_problems,
    parse_problem_spec,
)
from subq.data_store.schema import ANSWER_TYPES, PROBLEMS_SCHEMA, problem_id, to_table

# Row counts as documented in data_store/data/<name>/README.md.
COUNTS = {
    "gsm8k:train": 7473,
    "gsm8k:test": 1319,
    "svamp:test": 1000,
    "multiarith:test": 600,
    "addsub:test": 395,
    "singleeq:test": 508,
    "aqua:test": 254,
    "strategyqa:train": 2061,
    "strategyqa:dev": 229,
    "bamboogle:test": 125,
}


def test_every_split_is_covered():
    assert set(COUNTS) == {f"{d}:{s}" for d, info in KNOWN_DATASETS.items() for s in info.splits}


@pytest.mark.parametrize("spec", sorted(COUNTS))
def test_dataset_loads_with_documented_count(spec):
    rows = load_problems(spec)
    assert len(rows) == COUNTS[spec]
    dataset, split = spec.split(":")
    info = KNOWN_DATASETS[dataset]
    assert info.answer_type in ANSWER_TYPES
    for i, row in enumerate(rows):
        assert (row["dataset"], row["split"], row["index"]) == (dataset, split, i)
        assert row["problem_id"] == problem_id(dataset, split, i)
        assert row["answer_type"] == info.answer_type
        assert row["question"].strip() == row["question"] and row["question"]
        assert row["gold"]
        if info.answer_type == "number":
            assert isinstance(row["answer_value"], float)
    assert len({r["problem_id"] for r in rows}) == len(rows)
    to_table(rows, PROBLEMS_SCHEMA)  # every row fits the problems schema


def test_gsm8k_first_train_problem():
    row = load_problems("gsm8k:train[:1]")[0]
    assert row["question"].startswith("Natalia sold clips to 48 of her friends in April")
    assert row["gold"] == "72" and row["answer_value"] == 72.0
    assert row["answer_text"].endswith("#### 72")
    assert row["reference_subquestions"] == [
        "How many clips did Natalia sell in May?",
        "How many clips did Natalia sell altogether in April and May?",
    ]
    assert row["choices"] is None


def test_gsm8k_socratic_subquestions_everywhere():
    for split in ("train", "test"):
        rows = load_problems(f"gsm8k:{split}")
        assert all(r["reference_subquestions"] for r in rows)
        assert not any(" ** " in q for r in rows for q in r["reference_subquestions"])
    first_test = load_problems("gsm8k:test[0]")[0]
    assert first_test["reference_subquestions"] == [
        "How many eggs does Janet sell?",
        "How much does Janet make at the farmers' market?",
    ]
    assert first_test["gold"] == "18"


def test_gsm8k_gold_with_thousands_separator():
    rows = load_problems("gsm8k:train")
    big = [r for r in rows if "," in r["answer_text"].rsplit("####", 1)[1]]
    assert big, "GSM8K train has answers written with commas"
    for r in big:
        assert "," not in r["gold"] and r["answer_value"] == float(r["gold"])


def test_number_datasets_fields():
    svamp = load_problems("svamp[:1]")[0]
    assert svamp["question"] == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert (svamp["gold"], svamp["answer_value"], svamp["answer_text"]) == ("51", 51.0, "( 76.0 - 25.0 )")
    addsub = load_problems("addsub[0]")[0]  # AddSub stores answers as strings
    assert addsub["answer_value"] == 43.0 and addsub["gold"] == "43"
    multi = load_problems("multiarith[0]")[0]
    assert multi["question"].startswith("For Halloween Debby") and multi["answer_value"] == 39.0
    fractional = [r for r in load_problems("singleeq") if not r["answer_value"].is_integer()]
    assert fractional and all(float(r["gold"]) == r["answer_value"] for r in fractional)


def test_aqua_choice():
    row = load_problems("aqua:test[0]")[0]
    assert row["answer_type"] == "choice" and row["gold"] == "A" and row["answer_value"] is None
    assert len(row["choices"]) == 5 and row["choices"][0] == "A)5(√3 + 1)"
    assert {r["gold"] for r in load_problems("aqua")} <= set("ABCDE")


def test_strategyqa_yes_no():
    rows = load_problems("strategyqa:dev")
    assert rows[0]["gold"] == "no"  # "answer": false upstream
    assert rows[0]["reference_subquestions"][0] == "What is the population of Albany, Georgia?"
    assert sum(r["gold"] == "yes" for r in rows) == 107  # README: 107 true / 122 false
    assert sum(r["gold"] == "yes" for r in load_problems("strategyqa:train")) == 964


def test_bamboogle_text_and_alternatives():
    rows = load_problems("bamboogle")
    assert rows[0]["gold"] == "james madison" and rows[0]["answer_type"] == "text"
    assert accepted_answers(rows[47]) == ["Mildred Warner", "Mildred Gale"]
    assert accepted_answers(rows[0]) == ["james madison"]
    assert all(r["gold"] == r["gold"].strip() for r in rows)  # "George VI\n" upstream


def test_slices():
    full = load_problems("gsm8k:test")
    assert load_problems("gsm8k:test[10:20]") == full[10:20]
    assert load_problems("gsm8k:test[:5]") == full[:5]
    assert load_problems("gsm8k:test[1315:]") == full[1315:]
    assert load_problems("gsm8k:test[-2:]") == full[-2:]
    assert load_problems("gsm8k:test[7]") == [full[7]]
    assert load_problems("gsm8k:test[-1]") == [full[-1]]
    assert load_problems("gsm8k:test[:5000]") == full  # a stop past the end is clipped, as in Python
    assert load_problems(ProblemSpec("svamp", "test", 0, 3)) == load_problems("svamp:test[:3]")


def test_parse_problem_spec():
    assert parse_problem_spec("gsm8k:train") == ProblemSpec("gsm8k", "train", None, None)
    assert parse_problem_spec("gsm8k:train[:50]") == ProblemSpec("gsm8k", "train", None, 50)
    assert parse_problem_spec(" GSM8K:test[10:20] ") == ProblemSpec("gsm8k", "test", 10, 20)
    assert parse_problem_spec("svamp:test[:5]") == ProblemSpec("svamp", "test", None, 5)
    assert parse_problem_spec("bamboogle") == ProblemSpec("bamboogle", "test", None, None)
    assert parse_problem_spec("aqua[3:]") == ProblemSpec("aqua", "test", 3, None)
    assert str(parse_problem_spec("gsm8k:test[:5]")) == "gsm8k:test[:5]"
    assert str(parse_problem_spec("bamboogle")) == "bamboogle:test"


def test_problem_ids_are_stable():
    # Same problem, same id, whatever the slice, and a fixed value across machines and runs.
    assert (
        load_problems("gsm8k:test[10:12]")[1]["problem_id"] == load_problems("gsm8k:test")[11]["problem_id"]
    )
    assert load_problems("gsm8k:train[0]")[0]["problem_id"] == problem_id("gsm8k", "train", 0)
    assert problem_id("gsm8k", "train", 0) == "9cd8ae9cf210d9fc"


def test_returned_rows_do_not_alias_the_cache():
    first = load_problems("gsm8k:train[0]")[0]
    first["question"] = "changed"
    first["reference_subquestions"].append("extra")
    again = load_problems("gsm8k:train[0]")[0]
    assert again["question"] != "changed" and len(again["reference_subquestions"]) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gsm9k:test", r"unknown dataset 'gsm9k'.*known datasets: addsub, aqua, bamboogle, gsm8k"),
        ("asdiv", r"unknown dataset 'asdiv'"),
        ("gsm8k:dev", r"unknown split 'dev' of dataset 'gsm8k'; splits: train, test"),
        ("svamp:train", r"unknown split 'train' of dataset 'svamp'; splits: test"),
        ("gsm8k", r"dataset 'gsm8k' has splits train, test: name one"),
        ("strategyqa", r"dataset 'strategyqa' has splits train, dev"),
        ("gsm8k:test[a:b]", r"malformed slice \[a:b\]"),
        ("gsm8k:test[1:2:3]", r"malformed slice \[1:2:3\]"),
        ("gsm8k:test[]", r"malformed slice \[\]"),
        ("gsm8k:test[:5", r"malformed problem spec"),
        ("", r"malformed problem spec"),
        ("gsm8k test", r"malformed problem spec"),
    ],
)
def test_spec_errors(spec, message):
    with pytest.raises(DatasetError, match=message) as err:
        parse_problem_spec(spec)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("spec", ["gsm8k:test[5:5]", "gsm8k:test[2000:]", "bamboogle[10:2]", "aqua[999]"])
def test_empty_selection_is_an_error(spec):
    with pytest.raises(DatasetError, match=r"selects no problems \(.* has \d+\)"):
        load_problems(spec)


def test_local_data_dir(tmp_path):
    # A user's folder with the same layout, GSM8K socratic train not gzipped.
    (tmp_path / "gsm8k").mkdir()
    shutil.copy(DATA_DIR / "gsm8k" / "test.jsonl", tmp_path / "gsm8k")
    shutil.copy(DATA_DIR / "gsm8k" / "test_socratic.jsonl", tmp_path / "gsm8k")
    assert load_problems("gsm8k:test[:3]", data_dir=str(tmp_path)) == load_problems("gsm8k:test[:3]")
    with pytest.raises(DatasetError, match=r"data file not found: .*gsm8k.*train\.jsonl"):
        load_problems("gsm8k:train", data_dir=str(tmp_path))


def test_hub_is_gsm8k_only():
    with pytest.raises(DatasetError, match="gsm8k only"):
        load_problems("svamp", data_dir="hf:some/repo")


def test_loading_is_cached_and_fast():
    load_problems("gsm8k:train[:1]")
    start = time.perf_counter()
    for _ in range(5):
        load_problems("gsm8k:train[:10]")
    assert time.perf_counter() - start < 0.5
