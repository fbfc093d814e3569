"""A decomposer's identity includes what it serves (issue 20 item 3).

A decomposer reached by address (a URL of ``subq serve``, ``openai:MODEL@URL`` for vLLM and the like)
used to be identified by its address only: a retrained checkpoint served at the same URL silently reused
the old one's records. Now its ``/v1/models`` entry (``id``, ``root``, ``parent``, ``fingerprint``) and
the user's ``--decomposer-version`` are part of its settings fingerprint. Requests are counted at the
test server across every run of a scenario (the counter is never reset).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from subq.actors.teacher import TeacherFatalError, TeacherUnreachable
from subq.evaluation.fingerprint import decomposer_settings
from subq.evaluation.records import read_records
from subq.evaluation.served_identity import served_model
from subq.learner.content_hash import model_fingerprint

from subq.cli import main
from subq.eval_setup import ServeOptions, decomposer_identity
from tests.ports import free_port
from tests.teacher_server import TeacherServer, ThreadedServer

N = 4
BENCH = f"gsm8k:test[:{N}]"
KEY_ENV = "SUBQ_TEST_KEY"
SECRET = "sk-identity-secret-0123456789"


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``subq`` in this process (not capsys: uvicorn keeps the sys.stderr it started with)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _checkpoint(path, seed: int) -> str:
    from subq.learner.checkpoint import save_checkpoint
    from subq.learner.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(f"tiny-random:llama?layers=2&hidden=32&heads=2&ctx=2048&seed={seed}")
    return str(save_checkpoint(path, model, tok, algo="bc", config={"algo": "bc"}))


def test_a_retrained_student_behind_the_same_url_starts_new_records(ray_session, tmp_path):
    """openai:MODEL@URL: another checkpoint behind the same URL and name makes new requests; the same
    one (again, or back) none; --decomposer-version starts new records where nothing visible changed."""
    from tests.completions_server import CompletionsServer

    a, b = _checkpoint(tmp_path / "a" / "final", 1), _checkpoint(tmp_path / "b" / "final", 2)
    fa, fb = model_fingerprint(a), model_fingerprint(b)
    assert fa != fb and fa.startswith("sha256:")
    out = tmp_path / "eval"
    with CompletionsServer(a, "runs/x/final", fa) as student, TeacherServer(model="solver") as solver:
        argv = ["eval", "--decomposer", f"x=openai:runs/x/final@{student.base_url}", "--solver",
                f"solver@{solver.base_url}", "--api-key-env", KEY_ENV, "--benchmark", BENCH, "--out", str(out),
                "--decompose-max-tokens", "8", "--batch-size", "4", "--max-actors", "1", "--no-progress"]
        assert _cli(argv)[0] == 0 and len(student.prompts) == N
        assert _cli(argv)[0] == 0 and len(student.prompts) == N  # the same checkpoint: 0 new requests

        student.load(b, fb)  # retrained, redeployed at the same URL under the same name
        rc, _, err = _cli(argv)
        assert rc == 0 and len(student.prompts) == 2 * N
        assert f"decomposer.served.fingerprint {fa} -> {fb}" in err
        files = list((out / "records").rglob("*.jsonl"))
        assert len(files) == 2
        newest = max(files, key=lambda f: f.stat().st_mtime_ns)
        assert {r["settings"]["decomposer"]["served"]["fingerprint"] for r in read_records(newest)} == {fb}
        assert all("created" not in r["settings"]["decomposer"]["served"] for r in read_records(newest))

        student.load(a, fa)  # back to the first: its records, no request
        assert _cli(argv)[0] == 0 and len(student.prompts) == 2 * N

        # A version of the user's: new records although the server reports the same (what tells apart
        # a checkpoint that vLLM serves retrained in place: same id and root, no fingerprint).
        rc, _, err = _cli([*argv, "--decomposer-version", "v2"])
        assert rc == 0 and len(student.prompts) == 3 * N and "decomposer.version (unset) -> v2" in err
        assert _cli([*argv, "--decomposer-version", "v2"])[0] == 0 and len(student.prompts) == 3 * N
    assert not any(SECRET.encode() in f.read_bytes() for f in out.rglob("*") if f.is_file())


def _replicas(app: str) -> list[str]:
    """The live replica actors of a Serve app (named actors in Serve's namespace; no dashboard needed)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and f"{app}#" in a["name"])


def test_subq_decomposer_reports_its_checkpoint_content_and_swaps_it_in_place(ray_session, tmp_path):
    """A URL of subq's own decomposer: its /v1/models entry carries the checkpoint's content hash, so the
    same URL and served name with another checkpoint is another identity; a restart is not. A checkpoint
    swapped into the running replica (what an evaluation of several does) is served by that same replica
    at the same URL, and reported as what it is."""
    from subq.serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer, swap_decomposer

    a, b = _checkpoint(tmp_path / "a" / "final", 1), _checkpoint(tmp_path / "b" / "final", 2)
    cfg = DecomposerConfig(model=a, served_model_name="student", port=free_port(), route_prefix="/dec-identity",
                           app_name="subq-test-identity", max_new_tokens=8, num_cpus=0.5, torch_threads=1)

    def seen(url: str, model: str) -> dict[str, Any]:
        card = httpx.get(f"{url}/v1/models", timeout=120, trust_env=False).json()["data"][0]
        assert card["fingerprint"] == model_fingerprint(model) and card["id"] == "student"
        one = httpx.get(f"{url}/v1/models/student", timeout=120, trust_env=False).json()
        assert one["fingerprint"] == card["fingerprint"]
        reply = httpx.post(f"{url}/decompose", json={"problem": "Tom has 3 apples."}, timeout=120, trust_env=False)
        assert reply.status_code == 200 and reply.json()["model"] == "student", reply.text
        return decomposer_identity(url, [], ServeOptions())

    url = start_decomposer(cfg)
    try:
        replica = _replicas(cfg.app_name)
        first = seen(url, a)
        assert swap_decomposer(cfg, b, "student") == "student"
        swapped = seen(url, b)
        assert _replicas(cfg.app_name) == replica and len(replica) == 1  # loaded in place: no new replica
    finally:
        stop_decomposer(cfg)
    url2 = start_decomposer(cfg)  # a restart on the first checkpoint
    try:
        restarted = seen(url2, a)
    finally:
        stop_decomposer(cfg)
    assert url2 == url
    assert first["served"] == {"id": "student", "fingerprint": model_fingerprint(a)}
    assert first != swapped and first == restarted  # another checkpoint: new records; a restart keeps them


class _Models(ThreadedServer):
    """A /v1 root whose models route answers ``status`` with ``body``; wants ``Bearer right``."""

    name = "models-server"

    def __init__(self, status: int = 200, body: Any = None) -> None:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse(body, status)

        @app.get("/v1/v1/models")  # kind "url" takes the app's base URL: <url>/v1/models
        async def app_models() -> JSONResponse:
            return JSONResponse(body, status)

        self._bind(app)


def _entry(**kw: Any) -> dict[str, Any]:
    return {"id": "m", "object": "model", "created": 1, "owned_by": "x", "permission": [], **kw}


def test_what_an_endpoint_reports_and_its_failures(monkeypatch):
    with _Models(body={"object": "list", "data": [_entry(root="/ckpt", parent=None), _entry(id="other")]}) as srv:
        assert served_model("openai", srv.base_url, "m", KEY_ENV) == {"id": "m", "root": "/ckpt"}
        with pytest.raises(TeacherUnreachable, match="model 'gone' is not served at .* \\(served: m, other\\)"):
            served_model("openai", srv.base_url, "gone", KEY_ENV)
        assert served_model("url", srv.base_url, None, None) == [{"id": "m", "root": "/ckpt"}, {"id": "other"}]
    with _Models(status=404, body={"detail": "Not Found"}) as srv:  # no models route: address and name only
        assert served_model("openai", srv.base_url, "m", KEY_ENV) is None
    with _Models(status=401, body={"error": "no"}) as srv, pytest.raises(TeacherFatalError) as e:
        served_model("openai", srv.base_url, "m", KEY_ENV)  # the account refused: exit 3, not bad input
    assert f"refused the credentials (HTTP 401) from ${KEY_ENV}" in str(e.value) and SECRET not in str(e.value)
    with _Models(status=200, body=["not", "a", "list"]) as srv, pytest.raises(TeacherUnreachable, match="model list"):
        served_model("openai", srv.base_url, "m", KEY_ENV)
    port = free_port()  # nothing listens there
    with pytest.raises(TeacherUnreachable, match="cannot reach the decomposer at .* start it"):
        decomposer_identity(f"http://127.0.0.1:{port}", [], ServeOptions(), timeout_s=5)
    assert os.environ[KEY_ENV] == SECRET


def test_a_version_names_weights_not_the_baseline_or_the_teacher():
    kw = {"temperature": 0.0, "max_tokens": 64, "max_subquestions": None}
    for kind, ident in (("url", {"kind": "url", "url": "http://h", "beta": None, "served": None}),
                        ("openai", {"kind": "openai", "model": "m", "served": None}),
                        ("served", {"kind": "served", "model": "sha256:x", "beta": None, "max_new_tokens": 8})):
        assert decomposer_settings(ident, **kw, version="v2")["version"] == "v2", kind
        assert "version" not in decomposer_settings(ident, **kw)
    for ident in ({"kind": "none"}, {"kind": "teacher", "model": "gpt"}):
        assert decomposer_settings(ident, **kw, version="v2") == decomposer_settings(ident, **kw)
