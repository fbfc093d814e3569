"""Iterated distillation (`subq pipeline --rounds 2`) on the test teacher and tiny models: the shipped rounds
config runs end to end (round 2's rows are the round-1 student's, with its fingerprint; round 2 trains from
round 1's student; both rounds are evaluated and reported), and a kill -9 inside round 2's collection resumes
without paying twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from subq.data_store.store import Store
from subq.learner.data import selected

from subq.config import ConfigError, load_config
from subq.rounds import check_rounds, mix
from tests.ports import free_port
from tests.processes import kill_tree
from tests.teacher_replies import default_answer
from tests.teacher_server import TeacherServer

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-random:llama?layers=2&hidden=32&seed=0"
ROUND1_ANSWERS = 2 * 2  # problems x samples_per_problem
ANSWER_HOLD_S = 1.0  # each round-2 answer while the kill is being aimed
# the runs' environment: the teacher's key, and a short store lease so the resume need not wait long for it to lapse
RUN_ENV = {"SUBQ_TEST_KEY": "sk-test-secret-123456", "SUBQ_LEASE_TTL_S": "6", "SUBQ_LEASE_RENEW_S": "1"}


def _config(tmp_path: Path, url: str, **extra) -> Path:
    cfg = {
        "name": "rounds", "out": str(tmp_path / "run"), "rounds": 2, "rounds_mix": "all",
        "teacher": {"base_url": url, "model": "test-teacher", "api_key_env": "SUBQ_TEST_KEY"},
        "collect": {"problems": "gsm8k:train[:2]", "samples_per_problem": 2, "feedback_samples": 1,
                    "max_tokens": 64, "max_actors": 1, "batch_size": 1},
        "train": {"algos": ["bc"], "defaults": {"init": TINY, "batch_size": 2, "max_length": 256, "max_steps": 1,
                                                 "checkpoint_every": 1, "report_every": 1, "val_fraction": 0.0}},
        # a free port of its own: other runs on this machine (this test's too) serve on the default or a fixed one
        "serve": {"max_batch_size": 4, "max_new_tokens": 16, "num_cpus": 0.1, "port": free_port()},
        "eval": {"solvers": [f"test-teacher@{url}"], "baseline": False, "benchmarks": ["gsm8k:test[:2]"],
                 "solve_max_tokens": 64, "batch_size": 2, "max_actors": 1},
        **extra,
    }
    path = tmp_path / "rounds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pipeline(argv: list[str]) -> subprocess.Popen:
    """``subq ARGV`` as a user runs it: its own process (and Ray), in a session of its own to kill."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **RUN_ENV}
    return subprocess.Popen([sys.executable, "-m", "subq.cli", *argv], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_mixes_select_the_rounds_they_name():
    class Cfg:
        rounds_mix = "latest"

    teacher, right, wrong = {"round": None, "correct": False}, {"round": 2, "correct": True}, {"round": 2,
                                                                                              "correct": False}
    Cfg.rounds_mix = "latest"
    assert [selected(r, *mix(Cfg, 2)) for r in (teacher, right, wrong)] == [False, True, True]
    Cfg.rounds_mix = "all"
    assert [selected(r, *mix(Cfg, 2)) for r in (teacher, right, wrong)] == [True, True, True]
    Cfg.rounds_mix = "teacher+correct"
    assert [selected(r, *mix(Cfg, 2)) for r in (teacher, right, wrong)] == [True, True, False]
    assert [selected(r, *mix(Cfg, 1)) for r in (teacher, right, wrong)] == [True, False, False]


def test_bad_rounds_settings_fail_naming_the_key(tmp_path):
    path = _config(tmp_path, "http://127.0.0.1:9/v1")
    for override, key in (("rounds_mix=best", "rounds_mix"), ("rounds_student=ilql", "rounds_student"),
                          ("rounds=0", "rounds")):
        cfg, _ = load_config(str(path), [override])
        with pytest.raises(ConfigError, match=key):
            check_rounds(cfg)


@pytest.mark.slow
def test_the_rounds_config_killed_in_round_two_collection_resumes_without_paying_twice_then_skips(
        ray_session, tmp_path, monkeypatch, capsys):
    """configs/gsm8k-rounds-openai.yaml end to end with the shipped-config test's overrides (its run for this config
    is this one), two rounds, and a kill -9 of the whole process tree inside round 2's collection: the resumed run
    pays nothing committed before the kill, finishes both rounds' training, evaluation and figures, and a third
    run finds every output and calls nobody. Collection's teacher and the evaluation's solver are two servers, so
    every answer and judgement the teacher billed is collection's."""
    from subq.cli import main
    from tests.test_shipped_configs_run import TINY as SHIPPED_TINY
    from tests.test_shipped_configs_run import overrides

    path = ROOT / "configs" / "gsm8k-rounds-openai.yaml"
    run = tmp_path / "run"
    round1_student = run / "train" / "bc" / "final" / "subq_checkpoint.json"
    gate = threading.Event()

    def gold(problem: str) -> float:
        # round 2's answers (round 1's student exists), while the gate is set, take ANSWER_HOLD_S each and one at
        # a time (a blocking sleep holds the server's event loop): the kill lands between committed answers and
        # answers still to come, whatever the machine's load
        if gate.is_set() and round1_student.is_file():
            time.sleep(ANSWER_HOLD_S)
        return default_answer(problem)

    with (TeacherServer(latency_s=0.05, model="test-teacher", answer_fn=gold) as srv,
          TeacherServer(model="test-solver") as solver):
        sets = [*overrides(path, srv.base_url, run),
                # 2 problems x 2 samples a round: the kill can land between round 2's committed answers
                "collect.problems=gsm8k:train[:2]", "collect.samples_per_problem=2", "rounds_samples_per_problem=2",
                f"eval.solvers=[\"test-solver@{solver.base_url}\"]"]
        argv = ["pipeline", "--config", str(path), "--no-progress", *(a for s in sets for a in ("--set", s))]
        gate.set()
        proc = _pipeline(argv)
        first = _wait_for(proc, lambda: _round2(run, "journal_answer"))  # a round-2 answer is committed
        kill_tree(proc)  # kill -9 of the whole process tree, mid round 2
        gate.clear()
        _wait_for_quiet(srv)  # the answer held at the kill, and any request the server still had, are billed too
        at_kill, killed_billed = _ledger(run), _billed(srv.stats())
        decompositions = srv.stats()["by_stage"]["decompose"]  # round 1's, and the evaluation's teacher column
        answered, judged = _round2(run, "journal_answer") | _round2(run, "samples"), _round2(run, "samples")
        assert first and len(judged) < ROUND1_ANSWERS, "the kill missed round 2's collection"
        _wait_for_lease_lapse(run / "store")
        # the resume in this process (its Ray is up already: the run is the same, a Ray start and a Serve start less)
        for key, value in RUN_ENV.items():
            monkeypatch.setenv(key, value)
        code = main(argv)
        resumed_out, resumed_err = capsys.readouterr()
        out = resumed_out + resumed_err
        (tmp_path / "resumed.log").write_text(out)  # its stage table, for a failure's post-mortem
        assert code == 0, out[-3000:]
        billed = _billed(srv.stats())
        assert srv.stats()["by_stage"]["decompose"] == decompositions  # round 2: the student decomposes, free
        ledger = _ledger(run)
        # the resumed run paid for nothing committed before the kill: no answer of an answered key, no judgement
        # of a judged one; what the killed run paid and did not record (calls in flight, results not yet written)
        # is all the teacher billed beyond the ledger, before the resume and after it
        resumed = [c for c in ledger if c["run_id"] not in {c["run_id"] for c in at_kill}]
        assert resumed
        assert not {k for c in resumed if c["stage"] == "answer" for k in c["sample_keys"]} & answered
        assert not {k for c in resumed if c["stage"] == "feedback" for k in c["sample_keys"]} & judged
        unrecorded = killed_billed - len(at_kill)
        assert 0 <= unrecorded <= 2 * 8, (killed_billed, len(at_kill))  # at most the calls in flight (8 per stage)
        assert billed - len(ledger) == unrecorded, "a call after the kill was paid and not recorded"

        rows = Store(str(run / "store")).read_rows("samples")
        assert max(Counter(r["sample_key"] for r in rows).values()) == 1
        round2 = [r for r in rows if r["round"] == 2]
        teacher = [r for r in rows if r["policy"] is None]
        assert len(teacher) == ROUND1_ANSWERS and len(round2) == ROUND1_ANSWERS
        assert {r["round"] for r in teacher} == {None}
        # the round-1 student wrote them: its content fingerprint
        from subq.learner.content_hash import model_fingerprint

        assert {r["policy"] for r in round2} == {model_fingerprint(str(run / "train" / "bc" / "final"))}
        assert all(r["decompose_cost_usd"] in (0.0, None) for r in round2)
        # every round's students, trained; round 2's from round 1's student
        for prefix in (run, run / "round-2"):
            for name in ("bc", "filtered-bc"):
                assert (prefix / "train" / name / "final" / "subq_checkpoint.json").is_file(), (prefix, name)
        meta = json.loads((run / "round-2" / "train" / "bc" / "final" / "subq_checkpoint.json").read_text())
        assert str(run / "train" / "bc" / "final") in json.dumps(meta)
        assert yaml.safe_load((run / "pipeline_config.yaml").read_text())["train"]["defaults"]["init"] == SHIPPED_TINY
        figures = json.loads((run / "rounds" / "rounds.json").read_text())
        assert [f["round"] for f in figures] == [1, 2]
        assert figures[1]["decompositions"] == ROUND1_ANSWERS and figures[0]["teacher_usd"] is not None
        assert figures[1]["teacher_tokens"] > 0  # round 2: the answers and judgements of the student's decompositions
        assert all(f["accuracy"] is not None for f in figures), figures  # both rounds' students were evaluated
        assert (run / "rounds" / "rounds.png").is_file() and (run / "rounds" / "rounds.md").is_file()
        stages = {s["stage"]: s["status"] for s in json.loads((run / "pipeline_summary.json").read_text())}
        assert stages.get("round 2: train bc") == "done" and stages["report"] == "done", stages
        results = json.loads((run / "eval" / "results.json").read_text())["runs"]
        assert results and all(r["n"] == 1 for r in results), results
        assert (run / "eval" / "results.md").is_file() and (run / "eval" / "accuracy_vs_cost.png").is_file()

        # a third run finds every output: nothing collected, trained or served, no call to either server
        calls = (srv.stats()["requests"], solver.stats()["requests"])
        assert main(argv) == 0, capsys.readouterr().err[-3000:]
        stdout, err = capsys.readouterr()
        again = {s["stage"]: s["status"] for s in json.loads((run / "pipeline_summary.json").read_text())}
        assert {st for st, status in again.items() if status not in ("skipped", "off") and not st.endswith("report")
                } == set(), again
        assert (srv.stats()["requests"], solver.stats()["requests"]) == calls
        assert json.loads((run / "eval" / "results.json").read_text())["runs"] == results
    written = "".join(p.read_text(errors="ignore") for p in run.rglob("*")
                      if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".md"))
    assert "sk-test-secret-123456" not in stdout + err + out + written


def _wait_for(proc: subprocess.Popen | None, done, timeout_s: float = 600.0):
    """Poll ``done()`` (a process's progress, seen in its store or the server) until truthy; fail if ``proc`` ends."""
    deadline = time.monotonic() + timeout_s
    while not (found := done()):
        assert proc is None or proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


def _wait_for_quiet(srv: TeacherServer) -> None:
    """Until the server has no request in hand and took no new one for half a second."""
    seen = None
    while seen != (now := srv.stats()["requests"]) or srv.stats()["in_flight"]:
        seen = now
        time.sleep(0.5)


def _round2(run: Path, table: str) -> set[str]:
    """Sample keys of round 2 committed to ``table`` (answered: journal_answer; judged: samples)."""
    store = run / "store"
    if not store.is_dir():
        return set()
    return {r["sample_key"] for r in Store(str(store)).read_rows(table) if r["round"] == 2}


def _ledger(run: Path) -> list[dict]:
    """The store's ``calls`` rows of the answer and judgement stages (the teacher's paid collection calls; the
    evaluation's teacher decompositions are not collection)."""
    return [c for c in Store(str(run / "store")).read_rows("calls") if c["ok"] and c["stage"] in ("answer", "feedback")]


def _billed(stats: dict) -> int:
    return sum(n for k, n in stats["billed_by_content"].items() if stats["stage_of"].get(k) in ("answer", "feedback"))


def _wait_for_lease_lapse(store: Path) -> None:
    """Until the killed run's store lease has expired (SUBQ_LEASE_TTL_S after its last renewal)."""
    lease = json.loads((store / "_writer.lease").read_text())
    time.sleep(max(0.0, lease["expires_at"] - time.time()) + 0.2)

def _eval_records(out: str, bench: str, decomposer: str, subqs: dict[str, list[str]], humans: dict[str, list[str]]):
    """One evaluation run's records (``evaluation.records``) and its summary, as the pipeline's report makes them."""
    from subq.evaluation.records import append_records, records_path
    from subq.evaluation.report import summarize

    recs = [{"problem_id": pid, "question": f"Question {pid}?", "answer_type": "number", "subquestions": q,
             "reference_subquestions": humans[pid], "solver_text": "Final answer: 1", "correct": pid == "b",
             "decompose_cost_usd": 0.0, "solve_cost_usd": 0.0} for pid, q in subqs.items()]
    append_records(records_path(out, bench, decomposer, "solver", "fp-" + decomposer), [json.dumps(r) for r in recs])
    return summarize(recs, decomposer, "solver", bench, "strict", fingerprint="fp-" + decomposer)


def test_round_figures_compare_the_student_with_the_human_and_the_teacher_sub_questions(tmp_path, monkeypatch):
    """Per round: NLL and ROUGE-L of the student against the human sub-questions and against round 1's teacher's
    decompositions of the same held-out problems, kept until the student's weights change; in the table and plot."""
    import subq.evaluation.fidelity as fidelity
    from subq.evaluation.fidelity import reference_nll
    from subq.evaluation.fidelity_report import FILE
    from subq.evaluation.run import EvalConfig
    from subq.evaluation.similarity import decomposition_similarity
    from subq.learner.checkpoint import save_checkpoint
    from subq.learner.models import load_model_and_tokenizer

    from subq.rounds_report import FIGURES, round_figures, teacher_decompositions

    bench = "gsm8k:test[:2]"
    human = {"a": ["How many apples are left?"], "b": ["How much does one pen cost?", "How much do five cost?"]}
    teacher = {"a": ["How many apples did Tom eat?", "How many apples are left?"], "b": ["What is the price of a pen?"]}
    student = {"b": ["What is the price of a pen?"], "a": ["zebra quokka"]}  # b: the teacher's words exactly

    class Pipe:  # what round_figures reads of a subq.pipeline.Pipeline
        def __init__(self, out: Path):
            self.out = out
            self.cfg = type("Cfg", (), {"store_uri": str(tmp_path / "store"), "rounds_student": "bc"})()

        def collect_config(self):
            return None

        def train_dir(self, name: str) -> Path:
            return self.out / "train" / name

        def final_dir(self, name: str) -> str:
            return str(self.train_dir(name) / "final")

        def eval_config(self) -> EvalConfig:
            return EvalConfig(out_dir=str(self.out / "eval"))

    base, round2 = Pipe(tmp_path / "run"), Pipe(tmp_path / "run" / "round-2")
    model, tok = load_model_and_tokenizer(TINY)
    for pipe in (base, round2):
        save_checkpoint(pipe.final_dir("bc"), model, tok, algo="bc", config={})
    (base.out / "eval").mkdir(parents=True)
    (base.out / "eval" / FILE).write_text(json.dumps({"bc": {"nll_per_token": 5.5}}))
    summaries = [_eval_records(base.eval_config().out_dir, bench, "teacher (test-teacher)", teacher, human),
                 _eval_records(base.eval_config().out_dir, bench, "bc", student, human)]
    found = teacher_decompositions(base, summaries)
    assert found is not None and found[0] == bench
    assert found[1]["a"] == ("Question a?", teacher["a"])

    fig = round_figures(base, 1, summaries, found)
    want_nll = reference_nll(model, tok, [(f"Question {p}?", teacher[p]) for p in ("a", "b")], "student")
    human_nll = reference_nll(model, tok, [(f"Question {p}?", human[p]) for p in ("a", "b")], "student")
    assert fig["nll_teacher"] == pytest.approx(want_nll["nll_per_token"], rel=1e-5)
    # the teacher's words, not the humans' (a random model puts both near ln(vocab): apart by more than the noise)
    assert abs(fig["nll_teacher"] - human_nll["nll_per_token"]) > 1e-3
    assert fig["nll_human"] == 5.5  # the evaluation's own figure (eval.fidelity_problems)
    pair = (decomposition_similarity(student["a"], teacher["a"])["rougeL"], 1.0)  # matched by problem, not order
    assert fig["rougeL_teacher"] == pytest.approx(sum(pair) / 2)
    humans = [decomposition_similarity(student[p], human[p])["rougeL"] for p in ("a", "b")]
    assert fig["rougeL_human"] == pytest.approx(sum(humans) / 2)
    assert fig["accuracy"] == 0.5

    # kept: a report re-run computes nothing again until the student changes
    def fail(*_a, **_k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(fidelity, "decomposer_nll", fail)
    assert round_figures(base, 1, summaries, found)["nll_teacher"] == fig["nll_teacher"]
    save_checkpoint(base.final_dir("bc"), model, tok, algo="bc", config={}, step=1)  # retrained
    with pytest.raises(AssertionError, match="recomputed"):
        round_figures(base, 1, summaries, found)
    monkeypatch.undo()

    # round 2: its own student's records against round 1's teacher; no teacher evaluated -> None, not 0
    (round2.out / "eval").mkdir(parents=True)
    two = [_eval_records(round2.eval_config().out_dir, bench, "bc", teacher, human)]
    fig2 = round_figures(round2, 2, two, found)
    assert fig2["rougeL_teacher"] == pytest.approx(1.0) and fig2["nll_human"] is None
    assert round_figures(round2, 2, two, None)["nll_teacher"] is None
    assert teacher_decompositions(round2, two) is None

    # subq.rounds.run_rounds: round 1's teacher decompositions reach every round's figures, into OUT/rounds
    from types import SimpleNamespace

    import subq.rounds as rounds

    def step() -> None:
        return None

    base.result = SimpleNamespace(summaries=summaries, stages=[], incomplete="")
    base.cfg.rounds, base.cfg.train_on_incomplete, base.echo = 2, False, lambda _: None
    round2.result = SimpleNamespace(summaries=two, stages=[], incomplete="")
    round2.collect = round2.train = round2.evaluate = round2.report = step
    monkeypatch.setattr(rounds, "round_pipeline", lambda _base, r: round2)
    figures = rounds.run_rounds(base)
    assert [f["rougeL_teacher"] for f in figures] == [pytest.approx(fig["rougeL_teacher"]), pytest.approx(1.0)]
    assert figures[1]["nll_teacher"] == pytest.approx(fig["nll_teacher"])  # round 2's student: the same weights here
    table = (base.out / "rounds" / "rounds.md").read_text()
    assert all(name in table.splitlines()[0] for name in FIGURES)
    assert json.loads((base.out / "rounds" / "rounds.json").read_text()) == figures
    assert (base.out / "rounds" / "rounds.png").stat().st_size > 0
