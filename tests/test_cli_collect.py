"""`subq collect` as a user runs it: bad input fails in one line before anything is written, and
the embedded default collects end to end through our own local OpenAI-compatible server."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from subq.data_store.store import Store

from subq.cli import main


@pytest.mark.parametrize(
    "args, message",
    [
        (["--problems", "gsm9k:train[:2]"], "unknown dataset"),
        (["--problems", "gsm8k:train[2:x]"], "slice"),
        (["--problems", "gsm8k:train[:2]", "--teacher-base-url", "http://127.0.0.1:9/v1",
          "--teacher-model", "m"], "cannot reach the teacher"),
        (["--problems", "gsm8k:train[:2]", "--local-model", "/no/such/model/dir"], "/no/such/model/dir"),
        (["--problems", "gsm8k:train[:2]", "--teacher-base-url", "https://api.example.invalid/v1",
          "--teacher-model", "m", "--api-key-env", "SUBQ_TEST_UNSET_KEY"], "SUBQ_TEST_UNSET_KEY"),
    ],
    ids=["unknown-dataset", "bad-slice", "unreachable", "missing-model", "missing-key"],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(ray_session, tmp_path, capsys, monkeypatch,
                                                        args, message):
    monkeypatch.delenv("SUBQ_TEST_UNSET_KEY", raising=False)
    store = tmp_path / "store"
    rc = main(["collect", "--store", str(store), "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("subq: error:") and message.lower() in err[0].lower(), err
    assert not store.exists()


def test_a_key_the_teacher_refuses_exits_3_before_any_work(ray_session, tmp_path, capsys, monkeypatch):
    """One exit-code table: the account refused at the preflight is 3 (subq.exit_codes), as mid-run."""
    from tests.teacher_server import TeacherServer

    monkeypatch.setenv("SUBQ_TEST_WRONG_KEY", "sk-wrong-0123456789")
    store = tmp_path / "store"
    with TeacherServer(model="m", api_key="right") as srv:
        rc = main(["collect", "--store", str(store), "--no-progress", "--problems", "gsm8k:train[:2]",
                   "--teacher-base-url", srv.base_url, "--teacher-model", "m", "--api-key-env", "SUBQ_TEST_WRONG_KEY"])
        billed = srv.stats()["billed"]
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3, err
    assert len(err) == 1 and "refused the API key from $SUBQ_TEST_WRONG_KEY (HTTP 401)" in err[0], err
    assert "sk-wrong" not in err[0] and billed == 0 and not (store / "samples").exists()


@pytest.mark.slow
def test_embedded_teacher_end_to_end(ray_session, tmp_path, capsys):
    """Two GSM8K problems through the embedded SmolLM2 served by our own Ray Serve app."""
    store = tmp_path / "store"
    # short replies, not asked again longer: the point is the served model, not its prose (the re-ask at 4x the
    # limit is test_collect_truncation.py's); on one core each generated token of the 135M model costs ~30 ms
    rc = main(["collect", "--problems", "gsm8k:train[:2]", "--samples-per-problem", "1",
               "--feedback-samples", "1", "--max-tokens", "48", "--truncated-max-tokens", "48", "--store", str(store),
               "--no-progress", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    # a reply cut at --max-tokens is stored as truncated: final (exit 4), not retried by a re-run
    assert rc == (1 if report["retryable"] else 4 if report["truncated"] else 0)
    assert report["complete"] and report["samples_total"] == 2 and report["cost_usd"] == 0.0
    rows = Store(str(store)).read_rows("samples")
    assert len(rows) == 2 and max(Counter(r["sample_key"] for r in rows).values()) == 1
    for r in rows:
        assert r["teacher_model"] == "smollm2-135m-instruct"
        assert r["decompose_raw"] and r["decompose_tokens_in"] > 0 and r["decompose_tokens_out"] > 0
        assert r["decompose_status"] in ("ok", "parse_error", "truncated")
        assert r["status"] in ("ok", "parse_error", "truncated")  # the model is weak, but never an API error
        assert r["cost_usd"] == 0.0
