"""The fault-injecting test teacher (tests/teacher_server.py) behaves as the other tests assume."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.teacher_server import MALFORMED_TEXT, AccountFaults, FaultPlan, TeacherServer, content_key

MODEL = "test-teacher"
PROBLEM = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
ROOT = Path(__file__).resolve().parents[1]

try:  # the real protocol when it is there; the contract's shapes otherwise
    from subq.protocol import parse as _parse
    from subq.protocol import prompts as _prompts

    _prompts.decompose_messages, _parse.parse_subquestions  # noqa: B018
except (ImportError, AttributeError):
    _prompts = _parse = None


def decompose_messages(problem: str, max_subquestions: int | None = None) -> list[dict[str, str]]:
    if _prompts:
        return _prompts.decompose_messages(problem, max_subquestions)
    limit = "" if max_subquestions is None else f"\n\nWrite at most {max_subquestions} sub-questions."
    return [{"role": "system", "content": "Decompose the problem into sub-questions."},
            {"role": "user", "content": f"Problem: {problem}{limit}"}]


def answer_messages(problem: str, subqs: list[str]) -> list[dict[str, str]]:
    if _prompts:
        return _prompts.answer_messages(problem, subqs)
    qs = "\n".join(f"Q{i}: {q}" for i, q in enumerate(subqs, 1))
    return [{"role": "system", "content": "Answer each sub-question."},
            {"role": "user", "content": f"Problem: {problem}\n\n{qs}"}]


def feedback_messages(problem: str, subqs: list[str], answers: list[str]) -> list[dict[str, str]]:
    if _prompts:
        return _prompts.feedback_messages(problem, subqs, answers)
    qa = "\n".join(f"Q{i}: {q}\nA{i}: {a}" for i, (q, a) in enumerate(zip(subqs, answers, strict=True), 1))
    return [{"role": "system", "content": "Give feedback: is each sub-question useful?"},
            {"role": "user", "content": f"Problem: {problem}\n\n{qa}"}]


def parse_subquestions(text: str) -> list[str]:
    if _parse:
        p = _parse.parse_subquestions(text, None)
        assert (p.error is None) == bool(p.subquestions)
        return p.subquestions
    return re.findall(r"^Q\d+: (.+)$", text, re.MULTILINE)


def parse_answers(text: str, n: int) -> tuple[list[str], float | None]:
    if _parse:
        p = _parse.parse_answers(text, n)
        assert p.error is None
        return p.subanswers, p.final_value
    final = re.search(r"^Final answer: (\S+)$", text, re.MULTILINE)
    return re.findall(r"^A\d+: (.+)$", text, re.MULTILINE), float(final.group(1)) if final else None


def parse_feedback(text: str, n: int) -> list[bool]:
    if _parse:
        p = _parse.parse_feedback(text, n)
        assert p.error is None and None not in p.votes
        return list(p.votes)
    return [v == "Yes" for v in re.findall(r"^Q\d+: (Yes|No)$", text, re.MULTILINE)]


def chat(client: openai.OpenAI, messages: list[dict[str, str]], **kw: Any) -> list[str]:
    r = client.chat.completions.create(model=MODEL, messages=messages, **kw)
    return [c.message.content or "" for c in r.choices]


def wait_for(cond, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def clean():
    with TeacherServer(answer_fn={PROBLEM: 72.0}) as srv:
        yield srv, openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)


def test_stages_parse_and_n_works(clean):
    srv, client = clean
    decomps = chat(client, decompose_messages(PROBLEM), n=3, temperature=0.7)
    assert len(decomps) == 3 and len(set(decomps)) > 1
    assert decomps == chat(client, decompose_messages(PROBLEM), n=3, temperature=0.7)  # deterministic
    subqs = parse_subquestions(decomps[0])
    assert 2 <= len(subqs) <= 4

    (answer,) = chat(client, answer_messages(PROBLEM, subqs), temperature=0.0)
    subanswers, final = parse_answers(answer, len(subqs))
    assert len(subanswers) == len(subqs) and final == 72.0  # answer_fn controls correctness

    judgements = chat(client, feedback_messages(PROBLEM, subqs, subanswers), n=3, temperature=0.7)
    assert len(judgements) == 3
    assert all(len(parse_feedback(j, len(subqs))) == len(subqs) for j in judgements)

    limited = decompose_messages(PROBLEM, max_subquestions=2)
    assert all(len(parse_subquestions(t)) <= 2 for t in chat(client, limited, n=4, temperature=0.7))

    st = srv.stats()
    assert st["by_stage"]["decompose"] >= 2 and st["by_stage"]["answer"] >= 1
    assert st["by_stage"]["feedback"] >= 1


def test_usage_models_and_wrong_model(clean):
    srv, client = clean
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=decompose_messages(PROBLEM), n=2)
    words_in = sum(len(m["content"].split()) for m in decompose_messages(PROBLEM))
    assert r.usage.prompt_tokens == words_in
    assert r.usage.completion_tokens == sum(len(c.message.content.split()) for c in r.choices)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=decompose_messages(PROBLEM))
    assert e.value.body["code"] == "model_not_found"


def test_429_has_retry_after_then_succeeds():
    plan = FaultPlan(rate=1.0, kinds=("429",), retry_after_s=0.2)
    with TeacherServer(faults=plan) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            chat(client, decompose_messages(PROBLEM))
        assert e.value.response.headers["retry-after"] == "0.2"
        assert chat(client, decompose_messages(PROBLEM))  # the retry of the same content succeeds
        st = srv.stats()
        assert st["by_outcome"]["429"] == 1 and st["by_outcome"]["ok"] == 1 and st["billed"] == 1


@pytest.mark.parametrize(
    ("kind", "error"),
    [("500", openai.InternalServerError), ("disconnect", openai.APIConnectionError),
     ("hang", openai.APITimeoutError)],
)
def test_transient_fault_fails_once_then_succeeds(kind: str, error: type[Exception]):
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=(kind,), hang_s=3.0)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0, timeout=0.5)
        with pytest.raises(error):
            chat(client, decompose_messages(PROBLEM))
        assert chat(client, decompose_messages(PROBLEM))
        wait_for(lambda: srv.stats()["in_flight"] == 0)  # a hang notices its client has gone
        st = srv.stats()
        key = content_key({"messages": decompose_messages(PROBLEM)})
        assert st["by_outcome"][kind] == 1 and st["by_outcome"]["ok"] == 1
        assert st["billed_by_content"] == {key: 1}


def test_malformed_and_400_are_persistent():
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("malformed",))) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        for _ in range(3):
            (text,) = chat(client, decompose_messages(PROBLEM))
            assert text == MALFORMED_TEXT and parse_subquestions(text) == []
        assert srv.stats()["by_outcome"]["malformed"] == 3 and srv.stats()["billed"] == 3  # paid every time
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("400",))) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        for _ in range(3):
            with pytest.raises(openai.BadRequestError):
                chat(client, decompose_messages(PROBLEM))
        assert srv.stats()["by_outcome"]["400"] == 3 and srv.stats()["billed"] == 0


def test_counters_exact_under_mixed_faults():
    plan = FaultPlan(rate=0.5, kinds=("429", "500", "malformed", "400", "disconnect"), seed=7,
                     retry_after_s=0.0)
    problems = [f"Tom has {i} apples and buys {i + 3} more. How many apples?" for i in range(40)]
    with TeacherServer(faults=plan) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        expected = {k: 0 for k in ("ok", "429", "500", "malformed", "400", "disconnect")}
        billed_keys = []
        for p in problems:
            messages = decompose_messages(p)
            kind = plan.kind_for(content_key({"messages": messages}))
            for _ in range(2):  # at most one retry: transient faults clear after one attempt
                try:
                    chat(client, messages)
                    break
                except (openai.APIStatusError, openai.APIConnectionError):
                    pass
            if kind in ("429", "500", "disconnect"):
                expected[kind] += 1
                expected["ok"] += 1
            elif kind in ("malformed", "400"):
                expected[kind] += 2 if kind == "400" else 1  # the caller retried the 400 once
            else:
                expected["ok"] += 1
            if kind != "400":
                billed_keys.append(content_key({"messages": messages}))
        st = srv.stats()
        assert sum(expected[k] for k in plan.kinds) > 0 and expected["ok"] > 0
        assert {k: st["by_outcome"][k] for k in expected} == expected
        assert st["billed_by_content"] == dict.fromkeys(billed_keys, 1)  # no content paid twice
        assert st["billed"] == len(billed_keys) and st["requests"] == sum(expected.values())
        assert httpx.get(srv.base_url.removesuffix("/v1") + "/stats").json() == st
        httpx.post(srv.base_url.removesuffix("/v1") + "/stats/reset")
        assert srv.stats()["requests"] == 0 and srv.stats()["billed_by_content"] == {}


def test_faulted_share_matches_rate():
    plan = FaultPlan(rate=0.1, seed=3)
    share = sum(plan.kind_for(f"{i:016x}") is not None for i in range(4000)) / 4000
    assert 0.08 < share < 0.12
    assert plan.kind_for("abc") == FaultPlan(rate=0.1, seed=3).kind_for("abc")  # same across restarts


def test_50_concurrent_requests_overlap():
    async def run(base_url: str) -> None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0)
        await asyncio.gather(*(
            client.chat.completions.create(model=MODEL, messages=decompose_messages(f"{PROBLEM} #{i}"))
            for i in range(50)
        ))
        await client.close()

    with TeacherServer(latency_s=0.2) as srv:
        t0 = time.perf_counter()
        asyncio.run(run(srv.base_url))
        elapsed = time.perf_counter() - t0
        assert elapsed < 3.0, elapsed  # serial would be 10 s
        assert srv.stats()["by_outcome"]["ok"] == 50 and srv.stats()["peak_in_flight"] >= 40


def test_max_concurrency_queues():
    async def run(base_url: str) -> None:
        async with httpx.AsyncClient(base_url=base_url) as c:
            await asyncio.gather(*(
                c.post("/chat/completions", json={"model": MODEL, "messages": decompose_messages(f"p{i}")})
                for i in range(12)
            ))

    with TeacherServer(latency_s=0.1, max_concurrency=3) as srv:
        t0 = time.perf_counter()
        asyncio.run(run(srv.base_url))
        assert time.perf_counter() - t0 >= 0.4  # 12 requests / 3 slots x 0.1 s
        assert srv.stats()["by_outcome"]["ok"] == 12


def test_subprocess_mode():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.teacher_server", "--port", "0", "--latency", "0.05",
         "--fault-rate", "1", "--fault-kinds", "500"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        base_url = line.split()[1]
        client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            chat(client, decompose_messages(PROBLEM))
        assert parse_subquestions(chat(client, decompose_messages(PROBLEM))[0])
        st = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
        assert st["by_outcome"]["500"] == 1 and st["billed"] == 1
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)


# --- the faults of a real API (issue 9) ------------------------------------------------------


def test_few_choices_then_the_follow_up_fails_then_the_content_recovers():
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("few_choices",))) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        assert len(chat(client, decompose_messages(PROBLEM), n=3, temperature=0.7)) == 1
        with pytest.raises(openai.InternalServerError):  # the follow-up for the 2 missing choices
            chat(client, decompose_messages(PROBLEM), n=2, temperature=0.7)
        assert len(chat(client, decompose_messages(PROBLEM), n=3, temperature=0.7)) == 3  # transient
        st = srv.stats()
        assert st["by_outcome"]["few_choices"] == 1 and st["by_outcome"]["follow_up"] == 1 and st["billed"] == 2


def test_no_usage_truncated_and_max_tokens_cut():
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("no_usage",))) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=decompose_messages(PROBLEM))
        assert r.usage is None and r.choices[0].finish_reason == "stop"
        assert srv.stats()["billed"] == 1 and srv.stats()["completion_tokens"] > 0  # billed all the same
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("truncated",))) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=decompose_messages(PROBLEM))
        full = client.chat.completions.create(model=MODEL, messages=decompose_messages(PROBLEM))
        assert r.choices[0].finish_reason == "length" and full.choices[0].finish_reason == "stop"
        assert full.choices[0].message.content.startswith(r.choices[0].message.content)
    with TeacherServer() as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        for param in ("max_tokens", "max_completion_tokens"):
            r = client.chat.completions.create(model=MODEL, messages=decompose_messages(PROBLEM), **{param: 3})
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_slow_reply_holds_and_in_flight_keys_name_it():
    with TeacherServer(faults=FaultPlan(rate=1.0, kinds=("slow",), slow_s=1.0)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        start = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(chat, client, decompose_messages(PROBLEM))
            wait_for(lambda: srv.stats()["in_flight_keys"] == [content_key({"messages": decompose_messages(PROBLEM)})])
            assert fut.result()
        assert time.monotonic() - start >= 1.0 and srv.stats()["in_flight_keys"] == []


def test_quota_is_exhausted_after_k_billed_calls():
    with TeacherServer(account=AccountFaults(quota_after_billed=2)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        for i in range(2):
            chat(client, decompose_messages(f"{PROBLEM} {i}"))
        with pytest.raises(openai.RateLimitError) as e:
            chat(client, decompose_messages(PROBLEM))
        assert e.value.code == "insufficient_quota" and "retry-after" not in e.value.response.headers
        assert srv.stats()["by_outcome"]["quota"] == 1 and srv.stats()["billed"] == 2


@pytest.mark.parametrize("status", [503, 429])
def test_outage_window(status):
    with TeacherServer(account=AccountFaults(outage_after_requests=2, outage_s=0.5, outage_status=status)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        chat(client, decompose_messages(PROBLEM))
        with pytest.raises(openai.APIStatusError) as e:
            chat(client, decompose_messages(PROBLEM))
        assert e.value.status_code == status and "retry-after" not in e.value.response.headers
        time.sleep(0.6)
        assert chat(client, decompose_messages(PROBLEM))
        srv.start_outage(0.3)
        with pytest.raises(openai.InternalServerError):
            chat(client, decompose_messages(PROBLEM))
        assert srv.stats()["by_outcome"]["outage"] == 2


def test_unsupported_parameters_are_refused_as_openai_words_it():
    with TeacherServer(account=AccountFaults(reject_params=("max_tokens", "temperature"))) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, decompose_messages(PROBLEM), max_tokens=50)
        assert e.value.param == "max_tokens" and "max_completion_tokens" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, decompose_messages(PROBLEM), temperature=0.7)
        assert e.value.param == "temperature" and e.value.code == "unsupported_value"
        assert chat(client, decompose_messages(PROBLEM), max_completion_tokens=50, temperature=1)
        assert srv.stats()["by_outcome"]["unsupported"] == 2


def test_requests_per_minute_limit_answers_429_with_retry_after():
    with TeacherServer(account=AccountFaults(requests_per_minute=300)) as srv:  # 5/s, a bucket of 5
        client = openai.OpenAI(base_url=srv.base_url, api_key="test", max_retries=0)
        time.sleep(1.1)  # the bucket fills
        ok = limited = 0
        for i in range(8):
            try:
                chat(client, decompose_messages(f"{PROBLEM} {i}"))
                ok += 1
            except openai.RateLimitError as e:
                limited += 1
                assert 0 < float(e.response.headers["retry-after"]) <= 0.2
        assert ok == 5 and limited == 3
