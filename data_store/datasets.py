"""Benchmark loaders: a spec string such as ``gsm8k:train[:50]`` -> rows of the ``problems`` table.

The benchmark files ship inside the package (``data_store/data/<name>/``, each with its LICENSE and
README); ``data_dir`` points the loaders at another folder with the same layout, and
``data_dir="hf:openai/gsm8k"`` reads GSM8K from the Hugging Face hub (needs the optional
``datasets`` library and network).

Row conventions (see ``schema.PROBLEMS_SCHEMA``):
- ``index`` is the row's position in the *full* split, so ``problem_id`` does not depend on a slice;
- ``gold`` is the answer as text: a number without trailing ``.0`` ("72", "0.5"), a letter A-E
  (AQuA), "yes"/"no" (StrategyQA) or a short text (Bamboogle);
- ``answer_text`` is the dataset's reference solution: GSM8K rationale, the equation of the
  MAWPS-style sets and SVAMP, AQuA's rationale, StrategyQA's facts (one per line), and for
  Bamboogle the accepted answers joined by ``" | "`` (see :func:`accepted_answers`);
- ``reference_subquestions`` holds human decompositions: GSM8K socratic sub-questions (the text
  before ``" ** "`` on each rationale line) and StrategyQA's annotated decomposition.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from subq.data_store.schema import problem_id
from subq.protocol.answers import gsm8k_gold

DATA_DIR = Path(__file__).resolve().parent / "data"
HF_PREFIX = "hf:"
ANSWER_SEPARATOR = " | "  # joins Bamboogle's accepted answers in ``answer_text``


class DatasetError(ValueError):
    """A bad problem spec or a missing data file; the message is one line a user can act on."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    splits: tuple[str, ...]
    answer_type: str  # one of schema.ANSWER_TYPES
    default_split: str | None  # the split a bare name selects; None when there are several
    files: dict[str, str]  # split -> file under data/<name>/


KNOWN_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "gsm8k", ("train", "test"), "number", None, {"train": "train.jsonl", "test": "test.jsonl"}
        ),
        DatasetInfo("svamp", ("test",), "number", "test", {"test": "SVAMP.json"}),
        DatasetInfo("multiarith", ("test",), "number", "test", {"test": "MultiArith.json"}),
        DatasetInfo("addsub", ("test",), "number", "test", {"test": "AddSub.json"}),
        DatasetInfo("singleeq", ("test",), "number", "test", {"test": "SingleEq.json"}),
        DatasetInfo("aqua", ("test",), "choice", "test", {"test": "test.json"}),
        DatasetInfo(
            "strategyqa", ("train", "dev"), "yesno", None, {"train": "train.json", "dev": "dev.json"}
        ),
        DatasetInfo("bamboogle", ("test",), "text", "test", {"test": "bamboogle.csv"}),
    )
}
# GSM8K's socratic twin files: same questions in the same order, steps prefixed by sub-questions.
_GSM8K_SOCRATIC = {"train": "train_socratic.jsonl.gz", "test": "test_socratic.jsonl"}


@dataclass(frozen=True)
class ProblemSpec:
    dataset: str
    split: str
    start: int | None = None  # Python slice bounds over the full split (negative allowed)
    stop: int | None = None

    def __str__(self) -> str:
        if self.start is None and self.stop is None:
            return f"{self.dataset}:{self.split}"
        fmt = lambda v: "" if v is None else str(v)  # noqa: E731
        return f"{self.dataset}:{self.split}[{fmt(self.start)}:{fmt(self.stop)}]"


_SPEC_RE = re.compile(r"^(?P<ds>[A-Za-z0-9_.-]+)(?::(?P<split>[A-Za-z0-9_.-]*))?(?:\[(?P<sl>[^\[\]]*)\])?$")
_INT_RE = re.compile(r"^\s*-?\d+\s*$")


def _known() -> str:
    return ", ".join(sorted(KNOWN_DATASETS))


def parse_problem_spec(spec: str) -> ProblemSpec:
    """``dataset[:split][[start:stop]]`` -> :class:`ProblemSpec`; ``[i]`` selects one problem."""
    text = str(spec).strip()
    m = _SPEC_RE.match(text)
    if not m:
        raise DatasetError(f"malformed problem spec {spec!r}; expected e.g. 'gsm8k:test[:50]' or 'svamp'")
    name = m["ds"].lower()
    info = KNOWN_DATASETS.get(name)
    if info is None:
        raise DatasetError(f"unknown dataset {m['ds']!r} in {spec!r}; known datasets: {_known()}")
    split = m["split"]
    if not split:
        if info.default_split is None:
            raise DatasetError(
                f"dataset {name!r} has splits {', '.join(info.splits)}: name one, e.g. '{name}:{info.splits[-1]}'"
            )
        split = info.default_split
    if split not in info.splits:
        raise DatasetError(f"unknown split {split!r} of dataset {name!r}; splits: {', '.join(info.splits)}")
    start = stop = None
    if m["sl"] is not None:
        start, stop = _parse_slice(m["sl"], spec)
    return ProblemSpec(name, split, start, stop)


def _parse_slice(body: str, spec: str) -> tuple[int | None, int | None]:
    bad = DatasetError(
        f"malformed slice [{body}] in {spec!r}; expected [start:stop], [:stop], [start:] or [i]"
    )
    parts = body.split(":")
    if len(parts) == 1:  # [i]: one problem
        if not _INT_RE.match(parts[0]):
            raise bad
        i = int(parts[0])
        return i, (i + 1 if i != -1 else None)
    if len(parts) != 2:
        raise bad
    bounds = []
    for p in parts:
        if p.strip() == "":
            bounds.append(None)
        elif _INT_RE.match(p):
            bounds.append(int(p))
        else:
            raise bad
    return bounds[0], bounds[1]


# ---- loading --------------------------------------------------------------------------------
def load_problems(spec: str | ProblemSpec, data_dir: str | None = None) -> list[dict[str, Any]]:
    """Rows of the ``problems`` table for ``spec`` (fresh dicts; safe to mutate)."""
    ps = spec if isinstance(spec, ProblemSpec) else parse_problem_spec(spec)
    if ps.dataset not in KNOWN_DATASETS or ps.split not in KNOWN_DATASETS[ps.dataset].splits:
        raise DatasetError(f"unknown dataset/split {ps.dataset}:{ps.split}; known datasets: {_known()}")
    rows = _load_split(ps.dataset, ps.split, _normalize_dir(data_dir))
    selected = rows[slice(ps.start, ps.stop)]
    if not selected:
        raise DatasetError(
            f"problem spec {str(ps)!r} selects no problems ({ps.dataset}:{ps.split} has {len(rows)})"
        )
    # Copy so that callers cannot corrupt the per-process cache.
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()} for row in selected]


def question_index(dataset: str, split: str, data_dir: str | None = None) -> dict[str, int]:
    """Map question text (whitespace-normalised) -> index in the split; used to match imports."""
    return dict(_question_index(dataset, split, _normalize_dir(data_dir)))


def accepted_answers(problem: dict[str, Any]) -> list[str]:
    """Every accepted answer of a problem row (Bamboogle lists alternatives in ``answer_text``)."""
    if problem.get("dataset") == "bamboogle" and problem.get("answer_text"):
        return problem["answer_text"].split(ANSWER_SEPARATOR)
    return [problem["gold"]] if problem.get("gold") is not None else []


def normalize_question(text: str) -> str:
    return " ".join(text.split())


def _normalize_dir(data_dir: str | None) -> str | None:
    if data_dir is None or str(data_dir).startswith(HF_PREFIX):
        return data_dir
    return str(Path(data_dir).expanduser().resolve())


@lru_cache(maxsize=32)  # 10 shipped splits; a few local or hub copies on top
def _question_index(dataset: str, split: str, data_dir: str | None) -> tuple[tuple[str, int], ...]:
    rows = _load_split(dataset, split, data_dir)
    return tuple((normalize_question(r["question"]), r["index"]) for r in rows)


@lru_cache(maxsize=32)  # 10 shipped splits; a few local or hub copies on top
def _load_split(dataset: str, split: str, data_dir: str | None) -> tuple[dict[str, Any], ...]:
    info = KNOWN_DATASETS[dataset]
    if data_dir is not None and data_dir.startswith(HF_PREFIX):
        records = _hf_gsm8k(dataset, split, data_dir[len(HF_PREFIX) :])
    else:
        folder = Path(data_dir) / dataset if data_dir else DATA_DIR / dataset
        records = _READERS[dataset](folder, split)
    rows = []
    for index, rec in enumerate(records):
        row = {
            "problem_id": problem_id(dataset, split, index),
            "dataset": dataset,
            "split": split,
            "index": index,
            "answer_type": info.answer_type,
            "answer_value": None,
            "choices": None,
            "reference_subquestions": None,
            **rec,
        }
        row["question"] = row["question"].strip()  # a few upstream questions end in a space
        # Tuples, so that the cached rows cannot be changed through a caller's copy.
        rows.append({k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
    return tuple(rows)


def _open_text(path: Path):
    """Open ``path`` or its gzipped / un-gzipped twin (a user's copy may differ from ours)."""
    twin = path.with_suffix("") if path.suffix == ".gz" else path.with_name(path.name + ".gz")
    for p in (path, twin):
        if p.is_file():
            return gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else open(p, encoding="utf-8")
    raise DatasetError(f"data file not found: {path}")


def _read_json(path: Path) -> Any:
    with _open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"cannot parse {path}: {e}") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise DatasetError(f"cannot parse {path}: {e}") from e


def format_number(value: float) -> str:
    """72.0 -> "72", 0.5 -> "0.5" (the gold as a person would write it)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _socratic_subquestions(answer: str) -> list[str]:
    return [line.split(" ** ", 1)[0].strip() for line in answer.split("\n") if " ** " in line]


def _gsm8k_rows(main: list[dict], socratic: list[dict] | None, where: str) -> list[dict[str, Any]]:
    if socratic is not None and len(socratic) != len(main):
        raise DatasetError(f"GSM8K socratic file has {len(socratic)} rows, main file {len(main)}: {where}")
    out = []
    for i, rec in enumerate(main):
        value = gsm8k_gold(rec["answer"])
        refs = _socratic_subquestions(socratic[i]["answer"]) if socratic is not None else None
        out.append(
            {
                "question": rec["question"],
                "answer_text": rec["answer"],
                "answer_value": value,
                "gold": None if value is None else format_number(value),
                "reference_subquestions": refs or None,
            }
        )
    return out


def _read_gsm8k(folder: Path, split: str) -> list[dict[str, Any]]:
    main = _read_jsonl(folder / KNOWN_DATASETS["gsm8k"].files[split])
    socratic = _read_jsonl(folder / _GSM8K_SOCRATIC[split])
    return _gsm8k_rows(main, socratic, str(folder))


def _hf_gsm8k(dataset: str, split: str, repo: str) -> list[dict[str, Any]]:
    if dataset != "gsm8k":
        raise DatasetError(f"reading from the Hugging Face hub is supported for gsm8k only, not {dataset!r}")
    try:
        import datasets as hf_datasets  # optional dependency, only for hub reads
    except ImportError as e:
        raise DatasetError("data_dir='hf:...' needs the 'datasets' library: pip install datasets") from e
    try:
        main = list(hf_datasets.load_dataset(repo, "main", split=split))
        socratic = list(hf_datasets.load_dataset(repo, "socratic", split=split))
    except Exception as e:  # network, auth, unknown repo: one clear line
        raise DatasetError(f"cannot load {repo} ({split}) from the Hugging Face hub: {e}") from e
    return _gsm8k_rows(main, socratic, f"hf:{repo}")


def _number_row(question: str, value: float, answer_text: str) -> dict[str, Any]:
    return {
        "question": question.strip(),
        "answer_text": answer_text,
        "answer_value": float(value),
        "gold": format_number(float(value)),
    }


def _read_svamp(folder: Path, split: str) -> list[dict[str, Any]]:
    return [
        _number_row(f"{r['Body'].strip()} {r['Question'].strip()}", r["Answer"], r["Equation"].strip())
        for r in _read_json(folder / "SVAMP.json")
    ]


def _mawps_reader(file: str):
    """MultiArith / AddSub / SingleEq share the MAWPS layout (AddSub stores answers as strings)."""

    def read(folder: Path, split: str) -> list[dict[str, Any]]:
        return [
            _number_row(r["sQuestion"], float(r["lSolutions"][0]), r["lEquations"][0].strip())
            for r in _read_json(folder / file)
        ]

    return read


def _read_aqua(folder: Path, split: str) -> list[dict[str, Any]]:
    return [
        {
            "question": r["question"],
            "answer_text": r["rationale"],
            "gold": r["correct"].strip(),
            "choices": list(r["options"]),
        }
        for r in _read_jsonl(folder / "test.json")
    ]


def _read_strategyqa(folder: Path, split: str) -> list[dict[str, Any]]:
    return [
        {
            "question": r["question"],
            "answer_text": "\n".join(r.get("facts") or []) or None,
            "gold": "yes" if r["answer"] else "no",
            "reference_subquestions": list(r.get("decomposition") or []) or None,
        }
        for r in _read_json(folder / KNOWN_DATASETS["strategyqa"].files[split])
    ]


def _read_bamboogle(folder: Path, split: str) -> list[dict[str, Any]]:
    with _open_text(folder / "bamboogle.csv") as f:
        records = [r for r in csv.reader(f) if r and r[0].strip()]
    out = []
    for r in records:
        # Column 4 is the gold answer, column 5 an optional alternative (see the folder's README).
        answers = [a.strip() for a in r[4:6] if a.strip()]
        out.append(
            {"question": r[0].strip(), "gold": answers[0], "answer_text": ANSWER_SEPARATOR.join(answers)}
        )
    return out


_READERS = {
    "gsm8k": _read_gsm8k,
    "svamp": _read_svamp,
    "multiarith": _mawps_reader("MultiArith.json"),
    "addsub": _mawps_reader("AddSub.json"),
    "singleeq": _mawps_reader("SingleEq.json"),
    "aqua": _read_aqua,
    "strategyqa": _read_strategyqa,
    "bamboogle": _read_bamboogle,
}
