"""Table schemas and stable keys of the store: the one source of truth for column names and types.

Two public tables (DESIGN §2):
- ``problems``: one row per benchmark problem, keyed by ``problem_id``;
- ``samples``: one row per teacher decomposition, keyed by ``sample_key``.

Collection also keeps one *journal* table per intermediate stage (``journal_decompose``,
``journal_answer``) holding partial ``samples`` rows: a stage's result is stored the moment its
call finishes, so a resumed run never pays the teacher twice for it; and ``calls``, a ledger of
every teacher call that was (or may have been) billed, which is what a store's spend is.

Samples and journals are *versioned*: a retried row is a new ``attempt`` of the same key. Reads
see the latest attempt of each key; the earlier ones stay in the table as its history.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

STAGES = ("decompose", "answer", "feedback")

# Stage status values. "skipped": an earlier stage failed, so this stage made no call.
STATUS_OK = "ok"
STATUS_PARSE_ERROR = "parse_error"
STATUS_API_ERROR = "api_error"
STATUS_SKIPPED = "skipped"
STATUS_TRUNCATED = "truncated"  # the output was cut at the token limit (finish_reason "length")
STATUS_PARTIAL = "partial"  # fewer judgements than asked, and asking for the rest failed
STATUSES = (STATUS_OK, STATUS_PARSE_ERROR, STATUS_API_ERROR, STATUS_TRUNCATED, STATUS_PARTIAL, STATUS_SKIPPED)
# Failures a re-run retries by default; a parse error is the teacher's real answer and is kept. A
# truncated reply was already asked again with a larger limit: a re-run retries it only when asked
# (``subq collect --retry-truncated``), since the same limit would pay for the same cut.
RETRYABLE_STATUSES = (STATUS_API_ERROR, STATUS_PARTIAL)

# Answer types of benchmark problems (evaluation scores each differently).
ANSWER_TYPES = ("number", "choice", "yesno", "text")


def problem_id(dataset: str, split: str, index: int) -> str:
    """Stable id of a problem: a hash of dataset/split/index (same on every machine and run)."""
    return hashlib.sha1(f"{dataset}/{split}/{index}".encode()).hexdigest()[:16]


def sample_key(problem_id: str, teacher_model: str, prompt_version: str, sample_index: int,
               fingerprint: str | None = None) -> str:
    """Stable unique key of one teacher decomposition. ``fingerprint`` (of the settings that
    change a sample's output, see :func:`settings_fingerprint`) makes other settings other keys;
    imported samples have none."""
    raw = f"{problem_id}|{teacher_model}|{prompt_version}|{sample_index}"
    if fingerprint:
        raw += f"|{fingerprint}"
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able dict of settings (key order does not matter)."""
    canon = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(canon.encode()).hexdigest()[:12]


PROBLEMS_SCHEMA = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer_text", pa.string()),  # the dataset's full answer (e.g. GSM8K rationale)
        pa.field("answer_value", pa.float64()),  # numeric gold answer; null for non-numeric types
        pa.field("answer_type", pa.string(), nullable=False),  # one of ANSWER_TYPES
        pa.field("gold", pa.string()),  # gold answer as text ("72", "C", "yes", "Paris")
        pa.field("choices", pa.list_(pa.string())),  # AQuA options, else null
        pa.field("reference_subquestions", pa.list_(pa.string())),  # GSM8K socratic, else null
    ]
)


def _stage_fields(stage: str) -> list[pa.Field]:
    raw_type = pa.list_(pa.string()) if stage == "feedback" else pa.string()
    return [
        pa.field(f"{stage}_status", pa.string()),  # one of STATUSES; null = not run yet
        pa.field(f"{stage}_error", pa.string()),  # parse / API error message (never a secret)
        pa.field(f"{stage}_raw", raw_type),  # the teacher's text (feedback: one per judgement)
        pa.field(f"{stage}_tokens_in", pa.int64()),
        pa.field(f"{stage}_tokens_out", pa.int64()),
        pa.field(f"{stage}_latency_s", pa.float64()),
        pa.field(f"{stage}_cost_usd", pa.float64()),  # null when the model's price is unknown
        pa.field(f"{stage}_calls", pa.int64()),  # HTTP attempts made, retries included
        pa.field(f"{stage}_finish_reason", pa.string()),  # "stop", "length" (cut: truncated), ...
        pa.field(f"{stage}_max_tokens", pa.int64()),  # the limit its reply was asked with (a cut one: asked
        #                                               again with a larger one); null: older stores
    ]


SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_key", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("teacher_model", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("attempt", pa.int64()),  # 0, 1, ...: a retry is a new attempt (null in old stores = 0)
        pa.field("fingerprint", pa.string()),  # hash of the settings that shaped this sample (in the key)
        pa.field("settings", pa.string()),  # those settings as JSON, for inspection
        pa.field("run_id", pa.string()),  # the collection run that wrote this attempt
        pa.field("policy", pa.string()),  # the decomposer that wrote it: a student's content fingerprint (in the
        #                                   key); null = the teacher (older stores: always the teacher)
        pa.field("round", pa.int64()),  # the distillation round that collected it (subq/rounds.py); null = 1
        pa.field("source", pa.string(), nullable=False),  # "collect" or "import:<format>"
        pa.field("question", pa.string(), nullable=False),
        pa.field("gold_value", pa.float64()),
        pa.field("subquestions", pa.list_(pa.string())),
        pa.field("subanswers", pa.list_(pa.string())),
        pa.field("final_answer", pa.string()),  # text after the last "Final answer:"
        pa.field("final_value", pa.float64()),
        pa.field("correct", pa.bool_()),  # null when there is no final value or no gold
        pa.field("usefulness", pa.list_(pa.float64())),  # share of "Yes" per sub-question
        pa.field("status", pa.string(), nullable=False),  # ok, or the first failing stage's status
        *[f for stage in STAGES for f in _stage_fields(stage)],
        pa.field("cost_usd", pa.float64()),  # sum over stages; null if any stage's price unknown
        pa.field("price_table_version", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)

# One row per teacher call that was, or may have been, billed (a timeout may be billed too).
CALLS_SCHEMA = pa.schema(
    [
        pa.field("call_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("stage", pa.string()),  # decompose | answer | feedback
        pa.field("problem_id", pa.string()),
        pa.field("sample_keys", pa.list_(pa.string())),  # the rows this call was made for
        pa.field("attempt", pa.int64()),  # the rows' attempt
        pa.field("teacher_model", pa.string()),
        pa.field("http_attempts", pa.int64()),
        pa.field("ok", pa.bool_()),
        pa.field("tokens_in", pa.int64()),
        pa.field("tokens_out", pa.int64()),
        pa.field("cached_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),  # the response's priced usage; null = unknown
        pa.field("charged_usd", pa.float64()),  # what the budget counts: cost, or the worst case if unknown
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Batch API collection (actors.batch_jobs): one row per batch job and state change (the latest
# ``attempt`` of a job is its current state), written before anything is waited on.
BATCH_JOBS_SCHEMA = pa.schema(
    [
        pa.field("job_key", pa.string(), nullable=False),  # subq's id of the job (also in its metadata)
        pa.field("attempt", pa.int64()),  # version of this row: every state change is a new one
        pa.field("stage", pa.string()),  # decompose | answer | feedback
        pa.field("batch_id", pa.string()),  # the API's id; null until the batch was created
        pa.field("input_file_id", pa.string()),
        pa.field("base_url", pa.string()),  # the endpoint that runs the job
        pa.field("teacher_model", pa.string()),
        pa.field("settings", pa.string()),  # the StageSettings the requests were built with (JSON)
        pa.field("status", pa.string()),  # preparing, then the API's: validating ... completed / expired / ...
        pa.field("requests", pa.int64()),  # request lines in the job
        pa.field("completed", pa.int64()),  # the API's request counts
        pa.field("failed", pa.int64()),
        pa.field("output_file_id", pa.string()),
        pa.field("error_file_id", pa.string()),
        pa.field("ingested", pa.bool_()),  # its results are stored: the job is done with
        pa.field("error", pa.string()),  # why the batch failed as a whole (validation errors)
        pa.field("run_id", pa.string()),  # the collection run that submitted it
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)

# One row per request line and submission: a request a batch left unanswered (expired,
# cancelled) is submitted again as the next ``attempt`` of the same custom_id.
BATCH_REQUESTS_SCHEMA = pa.schema(
    [
        pa.field("custom_id", pa.string(), nullable=False),  # "<sample key>:<stage>:<sample attempt>"
        pa.field("attempt", pa.int64()),  # submission of this request: 0, 1, ...
        pa.field("job_key", pa.string()),  # the job holding this submission
        pa.field("stage", pa.string()),
        pa.field("sample_keys", pa.list_(pa.string())),  # the samples it answers
        pa.field("item", pa.string()),  # the stage's input (JSON): results are read against it
        pa.field("worst_usd", pa.float64()),  # its worst-case cost at batch prices (budget reservation)
        pa.field("tokens", pa.int64()),  # the tokens it can enqueue (prompt bound + n * max_tokens); null: older rows
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "problems": PROBLEMS_SCHEMA,
    "samples": SAMPLES_SCHEMA,
    "journal_decompose": SAMPLES_SCHEMA,
    "journal_answer": SAMPLES_SCHEMA,
    "calls": CALLS_SCHEMA,
    "batch_jobs": BATCH_JOBS_SCHEMA,
    "batch_requests": BATCH_REQUESTS_SCHEMA,
}
KEYS: dict[str, str] = {
    "problems": "problem_id",
    "samples": "sample_key",
    "journal_decompose": "sample_key",
    "journal_answer": "sample_key",
    "calls": "call_id",
    "batch_jobs": "job_key",
    "batch_requests": "custom_id",
}
# Tables whose keys have attempts: the highest attempt of a key is its current row.
ATTEMPT_COLUMN = "attempt"
VERSIONED = frozenset({"samples", "journal_decompose", "journal_answer", "batch_jobs", "batch_requests"})


def empty_row(schema: pa.Schema) -> dict[str, Any]:
    return {name: None for name in schema.names}


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) -> a table of exactly ``schema``; missing columns become null, extras fail."""
    extra = {k for row in rows for k in row} - set(schema.names)
    if extra:
        raise ValueError(f"unknown columns {sorted(extra)} for schema with {schema.names}")
    cols = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(cols, schema=schema)
