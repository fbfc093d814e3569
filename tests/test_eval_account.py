"""Evaluation when the endpoint refuses the account (issue 20 item 1): a solver's or a teacher
decomposer's quota / key error stops `subq eval` with collection's one line and exit code 3, stores
nothing as failed, and after the fix the same command does the records, paying nothing twice.

Billed calls are counted by the test server across every run (its counters are never reset).
"""

from __future__ import annotations

from subq.evaluation.records import failure, read_records

from subq.exit_codes import ACCOUNT_REFUSED, DONE
from tests.teacher_server import TeacherServer
from tests.test_eval_faults import KEY_ENV, _cli, _files

N = 6
BENCH = f"gsm8k:test[:{N}]"


def _argv(srv: TeacherServer, out, decomposer: str) -> list[str]:
    return ["eval", "--decomposer", decomposer, "--solver", f"test-teacher@{srv.base_url}", "--api-key-env", KEY_ENV,
            "--benchmark", BENCH, "--out", str(out), "--batch-size", "2", "--max-actors", "1", "--no-progress"]


def _stop_line(err: str) -> str:
    [line] = [ln for ln in err.splitlines() if ln.startswith("subq: error:")]
    return line


def test_a_solver_out_of_quota_stops_eval_with_exit_3_and_resumes_after_a_top_up(ray_session, tmp_path):
    out = tmp_path / "eval"
    with TeacherServer(model="test-teacher", latency_s=0.05) as srv:
        srv.set_quota(3)  # 3 solves, then the account is empty
        argv = _argv(srv, out, "none")
        rc, _, err = _cli(argv)
        assert rc == ACCOUNT_REFUSED, err
        line = _stop_line(err)
        assert "the solver at" in line and "quota or billing exhausted" in line and "insufficient_quota" in line
        assert "stored nothing as failed" in line and "run the same command again" in line
        assert "Traceback" not in err and "sk-eval-secret" not in err
        kept = [r for path in _files(out).values() for r in read_records(path)]
        assert len(kept) <= 3 and all(failure(r) is None for r in kept)  # nothing failed is stored
        srv.set_quota(None)  # the user adds credit and runs the same command
        rc, _, err = _cli(argv)
        assert rc == DONE, err
        [path] = _files(out).values()
        now = read_records(path)
        assert len(now) == N and all(failure(r) is None for r in now)
        stats = srv.stats()
        assert stats["billed"] == N and max(stats["billed_by_content"].values()) == 1  # nothing paid twice


def test_a_teacher_decomposer_refused_stops_eval_with_exit_3_and_nothing_stored(ray_session, tmp_path):
    out = tmp_path / "eval"
    with TeacherServer(model="test-teacher", latency_s=0.05) as srv:
        srv.set_quota(0)  # the decomposition is the first call: the teacher decomposer meets the empty account
        argv = _argv(srv, out, "teacher")
        rc, _, err = _cli(argv)
        assert rc == ACCOUNT_REFUSED, err
        line = _stop_line(err)
        assert "the teacher decomposer at" in line and "quota or billing exhausted" in line
        assert "Traceback" not in err
        assert not [r for path in _files(out).values() for r in read_records(path)]
        assert srv.stats()["billed"] == 0
        srv.set_quota(None)
        rc, _, err = _cli(argv)
        assert rc == DONE, err
        [path] = _files(out).values()
        assert len(read_records(path)) == N and all(failure(r) is None for r in read_records(path))
        stats = srv.stats()
        assert stats["billed"] == 2 * N and max(stats["billed_by_content"].values()) == 1
