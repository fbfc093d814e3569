"""Evaluation under real faults (issue 9): failed records are retried and only what failed is paid
again; changed settings never mix with old records; fatal endpoint errors stop the run; a student
behind any OpenAI-compatible server is prompted in its training format (issue 10 item 7).

Billed calls are counted by the fault-injecting test server across every run of a scenario (its
counters are never reset in between): a call paid twice shows up as a content billed twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from subq.actors.prices import PriceTable
from subq.data_store.datasets import load_problems
from subq.evaluation.clients import DecomposerSpec, SolverSpec
from subq.evaluation.fingerprint import content_hash
from subq.evaluation.plan import run_keys
from subq.evaluation.records import failure, read_history, read_records
from subq.evaluation.run import SKIPPED_SOLVE, EvalConfig, run_eval
from subq.protocol.prompts import decompose_messages, student_prompt

from subq.cli import main
from subq.eval_setup import ServeOptions, decomposer_identity
from tests.teacher_server import FaultPlan, TeacherServer, completion_key, content_key

N = 8
BENCH = f"gsm8k:test[:{N}]"
KEY_ENV = "SUBQ_TEST_KEY"
# Keys are read inside the Ray workers, which see the environment Ray started with: set at import,
# before the session's Ray starts (monkeypatch.setenv inside a test would come too late).
os.environ.setdefault("SUBQ_EVAL_RIGHT_KEY", "right")
os.environ.setdefault("SUBQ_EVAL_WRONG_KEY", "wrong")


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-eval-secret-0123456789")


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``subq`` in this process: (exit code, stdout, stderr). Not capsys: the test servers' uvicorn
    binds its log handler to the sys.stderr it starts with, which capsys would close under it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _files(out: Path) -> dict[str, Path]:
    """decomposer__solver folder name -> its one records file."""
    found = {}
    for path in (out / "records").rglob("*.jsonl"):
        assert path.parent.name not in found, f"two settings files for {path.parent.name}"
        found[path.parent.name] = path
    return found


def _decomposition_keys(problems: list[dict]) -> list[str]:
    """The billing keys of every decomposition call: the teacher's chat and the student's completion."""
    chat = [content_key({"messages": decompose_messages(p["question"]), "n": 1, "temperature": 0.0}) for p in problems]
    student = [completion_key({"prompt": student_prompt(p["question"]), "n": 1, "temperature": 0.0}) for p in problems]
    return chat + student


def test_failed_records_are_retried_and_a_retry_pays_only_what_failed(ray_session, tmp_path):
    """A solver and decomposer outage (every faulted call fails its 2 attempts in the first run): the
    first run stores failed records and exits 1; --no-retry-failed keeps them and calls nobody; the next
    runs retry exactly them as new attempts, re-paying no decomposition that had succeeded, until all
    are final (exit 0); a last run has nothing to do. Across all runs each of the 4N calls is billed once."""
    problems = load_problems(BENCH)
    out = tmp_path / "eval"
    faults = FaultPlan(rate=0.35, kinds=("500",), seed=3, fail_attempts=2)
    with TeacherServer(model="test-teacher", faults=faults) as srv:
        argv = ["eval", "--decomposer", "teacher", "--decomposer", f"student=openai:test-teacher@{srv.base_url}",
                "--solver", f"test-teacher@{srv.base_url}", "--api-key-env", KEY_ENV, "--benchmark", BENCH,
                "--out", str(out), "--batch-size", "4", "--max-actors", "1", "--max-attempts", "2", "--no-progress"]
        rc, printed, _ = _cli(argv)
        assert rc == 1
        assert "failed at the API and are not final" in printed and "run the same command again" in printed
        first = {name: read_records(path) for name, path in _files(out).items()}
        assert set(first) == {"teacher_test-teacher__test-teacher", "student__test-teacher"}
        failed = {name: {r["problem_id"]: failure(r) for r in recs if failure(r)} for name, recs in first.items()}
        reasons = [why for f in failed.values() for why in f.values()]
        assert any(w.startswith("solve: ") for w in reasons)
        for f in failed.values():  # both decomposers give up after --max-attempts 2
            assert any(w.startswith("decompose: ") for w in f.values())
        assert all("InternalServerError" in w or "HTTP 500" in w for w in reasons), reasons
        for recs in first.values():
            for r in recs:  # no solver was paid for a plan that will be asked for again
                if r["decompose_error"] and r["decompose_error"].startswith("api_error"):
                    assert r["solve_error"] == SKIPPED_SOLVE and r["solve_tokens_in"] == 0
        n_failed = sum(map(len, failed.values()))
        assert f"{n_failed} record(s) failed" in printed

        calls = srv.stats()["requests"]
        rc, printed, _ = _cli([*argv, "--no-retry-failed"])  # kept as they are: nobody is called
        assert rc == 1 and srv.stats()["requests"] == calls
        assert "kept as they are (--no-retry-failed)" in printed

        for _ in range(4):  # a retried plan means new solve calls, which the fault plan may hit again
            rc, printed, _ = _cli(argv)
            if rc == 0:
                break
        assert rc == 0 and "every record is final" in printed
        for name, path in _files(out).items():
            history, now = read_history(path), read_records(path)
            assert len(now) == N and all(failure(r) is None for r in now)
            assert len(history) == sum(r["attempt"] for r in now)  # every failed attempt stays inspectable
            # only what failed was redone: a record final in the first run was never touched again
            assert {r["problem_id"] for r in now if r["attempt"] > 1} == set(failed[name])
            for r in now:  # a plan that succeeded in the first run was reused, not asked for again
                before = next(x for x in first[name] if x["problem_id"] == r["problem_id"])
                if not before["decompose_error"]:
                    assert r["subquestions"] == before["subquestions"]
        stats = srv.stats()
        assert stats["billed"] == 4 * N  # 2N decompositions + 2N solves, each paid once over all runs
        assert max(stats["billed_by_content"].values()) == 1
        assert all(stats["billed_by_content"].get(k) == 1 for k in _decomposition_keys(problems))

        calls = stats["requests"]
        assert _cli(argv)[0] == 0 and srv.stats()["requests"] == calls  # nothing left to do
    report = json.loads((out / "results.json").read_text())
    assert {r["n"] for r in report["runs"]} == {N} and all(r["api_failures"] == 0 for r in report["runs"])


def test_changed_settings_start_new_records_and_never_mix(ray_session, tmp_path):
    """A re-run with another solver max_tokens writes new records (reusing the plans, whose settings
    did not change) and reports only them; going back resumes the old records without a call; a
    decomposer setting (max sub-questions) makes new plans."""
    out = tmp_path / "eval"
    with TeacherServer(model="test-teacher") as srv:
        base = ["eval", "--decomposer", "teacher", "--solver", f"test-teacher@{srv.base_url}", "--api-key-env",
                KEY_ENV, "--benchmark", BENCH, "--out", str(out), "--batch-size", "4", "--max-actors", "1",
                "--no-progress"]
        assert _cli([*base, "--solve-max-tokens", "64"])[0] == 0
        assert srv.stats()["by_stage"] == {"decompose": N, "answer": N, "feedback": 0, "unknown": 0, "student": 0}
        [old] = _files(out).values()
        old_lines = old.read_text()

        rc, _, err = _cli([*base, "--solve-max-tokens", "128"])
        assert rc == 0
        assert "settings changed (solver.max_tokens 64 -> 128)" in err
        assert srv.stats()["by_stage"]["decompose"] == N  # same decomposer settings: plans reused
        assert srv.stats()["by_stage"]["answer"] == 2 * N
        files = list((out / "records").rglob("*.jsonl"))
        assert len(files) == 2 and old.read_text() == old_lines
        new = next(f for f in files if f != old)
        assert all(r["settings"]["solver"]["max_tokens"] == 128 for r in read_records(new))
        runs = json.loads((out / "results.json").read_text())["runs"]
        assert len(runs) == 1 and runs[0]["settings"]["solver"]["max_tokens"] == 128 and runs[0]["n"] == N
        assert json.loads((out / "results.json").read_text())["config"]["solve_max_tokens"] == 128

        requests = srv.stats()["requests"]
        assert _cli([*base, "--solve-max-tokens", "64"])[0] == 0  # back: the old records, no call
        assert srv.stats()["requests"] == requests
        runs = json.loads((out / "results.json").read_text())["runs"]
        assert runs[0]["settings"]["solver"]["max_tokens"] == 64 and runs[0]["fingerprint"] == old.stem

        rc, _, err = _cli([*base, "--solve-max-tokens", "64", "--max-subquestions", "2"])
        assert rc == 0 and "decomposer.max_subquestions None -> 2" in err
        assert srv.stats()["by_stage"]["decompose"] == 2 * N  # other decomposer settings: new plans
        latest = max((out / "records").rglob("*.jsonl"), key=lambda f: f.stat().st_mtime)
        assert all(len(r["subquestions"]) <= 2 for r in read_records(latest))


def test_a_checkpoint_is_identified_by_its_content_hashed_once(tmp_path, monkeypatch):
    ckpt = tmp_path / "final"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\0" * 1000)
    (ckpt / "heads.safetensors").write_bytes(b"\1" * 100)
    (ckpt / ".final.tmp-x").mkdir()  # a save's leftover is not part of the checkpoint
    (ckpt / ".final.tmp-x" / "junk").write_text("x")
    solvers = [SolverSpec(base_url="http://127.0.0.1/v1", model="m")]
    opts, cache = ServeOptions(max_new_tokens=64), tmp_path / "cache.json"

    import subq.learner.content_hash as fp

    reads: list[str] = []
    digest = fp._file_digest
    monkeypatch.setattr(fp, "_file_digest", lambda p: reads.append(p.name) or digest(p))
    first = decomposer_identity(f"ilql={ckpt}", solvers, opts, cache)
    assert first["kind"] == "served" and first["model"].startswith("sha256:") and first["max_new_tokens"] == 64
    assert sorted(reads) == ["heads.safetensors", "model.safetensors"]
    assert decomposer_identity(f"ilql={ckpt}", solvers, opts, cache) == first and len(reads) == 2  # cached
    (ckpt / "heads.safetensors").write_bytes(b"\2" * 100)  # same size, new content (and mtime)
    second = decomposer_identity(f"ilql={ckpt}", solvers, opts, cache)
    assert second["model"] != first["model"] and reads[2:] == ["heads.safetensors"]
    assert decomposer_identity(f"ilql={ckpt}", solvers, ServeOptions(max_new_tokens=64, beta=2.0), cache) != second
    assert content_hash(ckpt) == second["model"].removeprefix("sha256:")  # the cache changes nothing


def test_a_fatal_endpoint_error_stops_the_run_and_stores_nothing_for_it(ray_session, tmp_path):
    """A wrong key stops the run at once (exit 3, a clear line, no record, no solver call); an account
    that runs dry mid-run stops it too, keeps what finished, and after a top-up the same command
    finishes without paying again for the stored decompositions."""
    problems = load_problems(BENCH)
    with TeacherServer(model="student", api_key="right") as dec, TeacherServer(model="solver") as solver:
        out = tmp_path / "auth"
        argv = ["eval", "--decomposer", f"s=openai:student@{dec.base_url}", "--solver", f"solver@{solver.base_url}",
                "--api-key-env", KEY_ENV, "--benchmark", BENCH, "--batch-size", "2", "--max-actors", "1",
                "--no-progress"]
        rc, _, err = _cli([*argv, "--out", str(out), "--decomposer-token-env", "SUBQ_EVAL_WRONG_KEY"])
        assert rc == 3  # exit_codes.ACCOUNT_REFUSED
        assert "refused the credentials (HTTP 401)" in err and "wrong" not in err.replace("wrong URL", "")
        assert not list(out.rglob("*.jsonl")) and solver.stats()["requests"] == 0
        assert dec.stats()["requests"] <= N  # each call once: a 401 is not retried

        out = tmp_path / "quota"
        dec.reset_stats()
        dec.set_quota(3)  # 3 requests, then the account is empty
        argv = [*argv, "--out", str(out), "--decomposer-token-env", "SUBQ_EVAL_RIGHT_KEY"]
        rc, _, err = _cli(argv)
        assert rc == 3 and "no quota left (HTTP 429 insufficient_quota)" in err
        [path] = out.rglob("*.jsonl")
        kept = read_records(path)
        assert len(kept) <= 3 and all(failure(r) is None for r in kept)  # nothing failed is stored
        dec.set_quota(None)
        assert _cli(argv)[0] == 0
        now = read_records(path)
        assert len(now) == N and all(failure(r) is None for r in now)
        assert all(r == next(n for n in now if n["problem_id"] == r["problem_id"]) for r in kept)
    billed = dec.stats()["billed_by_content"]
    stored_first = {r["problem_id"] for r in kept}
    for p in problems:  # a stored decomposition is never paid again; the others at most once more
        key = completion_key({"prompt": student_prompt(p["question"]), "n": 1, "temperature": 0.0})
        assert billed.get(key) == 1 if p["problem_id"] in stored_first else 1 <= billed.get(key, 0) <= 2


def test_a_student_behind_an_openai_server_is_prompted_in_its_training_format(ray_session, tmp_path):
    """`vllm serve runs/x/final` as a decomposer: the completions endpoint gets exactly the training
    prompt, and the sub-questions equal what subq's own decoder (serve/) makes of the same checkpoint."""
    from subq.learner.checkpoint import save_checkpoint
    from subq.learner.models import load_model_and_tokenizer
    from subq.serve.decomposer_model import Decoder, Job

    from tests.completions_server import CompletionsServer

    model, tok = load_model_and_tokenizer("tiny-random:llama?layers=2&hidden=32&heads=2&ctx=2048&seed=1")
    ckpt = save_checkpoint(tmp_path / "x" / "final", model, tok, algo="bc", config={"algo": "bc"})
    bench, max_tokens = "gsm8k:test[:3]", 24
    problems = load_problems(bench)
    with CompletionsServer(str(ckpt), "runs/x/final") as student, TeacherServer(model="solver") as solver:
        dec = DecomposerSpec("openai", "x", url=student.base_url, model="runs/x/final")
        sv = SolverSpec(base_url=solver.base_url, model="solver", api_key_env=KEY_ENV)
        cfg = EvalConfig(benchmarks=[bench], out_dir=str(tmp_path / "eval"), decompose_max_tokens=max_tokens,
                         batch_size=3, max_actors=1, progress=False)
        [summary] = run_eval(cfg, [dec], [sv], PriceTable().with_price("runs/x/final", 0.0, 0.0))
        assert sorted(student.prompts) == sorted(student_prompt(p["question"]) for p in problems)
    [key] = run_keys(cfg, "x", dec.identity, [sv])
    recs = {r["problem_id"]: r for r in read_records(key.path(cfg.out_dir, bench))}
    decoder = Decoder.load(str(ckpt))
    assert decoder.student
    for p in problems:
        want = decoder.decode([Job(prompt=decoder.prompt_ids(p["question"]), max_tokens=max_tokens)]).decoded[0]
        rec = recs[p["problem_id"]]
        assert rec["decompose_raw"] == want.text
        assert rec["subquestions"] == decoder.subquestions(want.text) or rec["decompose_error"]
        assert rec["decompose_tokens_out"] == max_tokens and rec["decompose_cost_usd"] == 0.0
    assert summary.n == 3 and summary.decompose_tokens_out == 3 * max_tokens
