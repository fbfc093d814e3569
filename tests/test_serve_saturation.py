"""Serving at saturation (issue 21): admission by rows with a bounded queue and 429s, cheap routes that
never wait behind generations, and SIGTERM that stops a server within 10 s whatever Ray's state.

The admission policy is tested on its own (asyncio, no Ray, no clock); the acceptance checks run the
real servers on tiny random models and the official ``openai`` client. Time bounds here are liveness
bounds ("answers within 1 s while generations run"), far above what a free machine needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from subq.learner.models import build_byte_tokenizer
from subq.serve.admission import Admission, Overloaded

from tests.ports import free_port

LLM_MODEL = "tiny-random:llama?ctx=4096"
EOS = build_byte_tokenizer().eos_token_id
MSG = [{"role": "user", "content": "Say hi"}]
ROWS, QUEUE, CLIENTS = 2, 4, 12


# ------------------------------------------------------------------------------ admission policy


def _run(coro):
    return asyncio.run(coro)


async def _settle() -> None:
    """Let granted tasks resume and their callbacks run (a few loop turns; no clock)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_beyond_rows_plus_queue_a_request_is_refused_at_once_with_retry_after():
    async def main() -> None:
        adm = Admission(max_rows=2, max_queued=1)
        held = [await adm.acquire(1), await adm.acquire(1)]
        queued = asyncio.create_task(adm.acquire(1))
        await asyncio.sleep(0)
        assert adm.waiting == 1 and not queued.done()
        with pytest.raises(Overloaded) as info:
            await adm.acquire(1)
        assert info.value.status == 429 and info.value.retry_after_s >= 1 and adm.rejected == 1
        assert info.value.body()["error"]["code"] == "rate_limit_exceeded"
        held[0].release()
        third = await queued
        assert adm.running_rows == 2 and adm.waiting == 0
        for t in (held[1], third):
            t.release()
            t.release()  # idempotent
        assert adm.running_rows == 0 and adm.running_requests == 0

    _run(main())


def test_queue_of_zero_refuses_whenever_rows_are_busy_and_n_above_rows_is_a_400():
    async def main() -> None:
        adm = Admission(max_rows=1, max_queued=0)
        t = await adm.acquire(1)
        with pytest.raises(Overloaded):
            await adm.acquire(1)
        t.release()
        (await adm.acquire(1)).release()
        with pytest.raises(Exception, match="more rows") as info:
            await adm.acquire(2)
        assert info.value.status == 400

    _run(main())


def test_small_requests_bypass_a_large_one_a_bounded_number_of_times():
    """n=4 waits for 4 rows while 2 are busy: small requests behind it run on the free rows (no
    head-of-line blocking), but only max_bypass of them; then the large one is next (no starvation)."""
    async def main() -> None:
        adm = Admission(max_rows=4, max_queued=None, max_bypass=3)
        busy = [await adm.acquire(1), await adm.acquire(1)]
        large = asyncio.create_task(adm.acquire(4))
        await _settle()
        granted: list[str] = []
        smalls = []
        for i in range(6):
            task = asyncio.create_task(adm.acquire(1))
            task.add_done_callback(lambda _t, i=i: granted.append(f"s{i}"))
            smalls.append(task)
        large.add_done_callback(lambda _t: granted.append("large"))
        await _settle()
        assert granted == ["s0", "s1"]  # the two free rows went to small requests at once
        # small requests keep finishing: the third bypass is the last one
        (await smalls[0]).release()
        await _settle()
        assert granted == ["s0", "s1", "s2"]
        for t in [*busy, await smalls[1], await smalls[2]]:
            t.release()
            await _settle()
        assert granted[3] == "large", granted  # s3..s5 could have run on the free rows, but may not pass it
        (await large).release()
        await _settle()
        assert sorted(granted[4:]) == ["s3", "s4", "s5"]
        for t in smalls[3:]:
            (await t).release()
        assert adm.running_rows == 0

    _run(main())


def test_a_large_request_does_not_block_small_ones_forever():
    """The other direction: with max_bypass=0 the large one would hold everyone; with the default
    (one batch of rows) small requests flow on the free rows while it waits."""
    async def main() -> None:
        adm = Admission(max_rows=8, max_queued=16)
        busy = await adm.acquire(2)
        large = asyncio.create_task(adm.acquire(8))
        await asyncio.sleep(0)
        smalls = [await asyncio.wait_for(adm.acquire(1), 1) for _ in range(6)]  # all fit beside the busy rows
        assert not large.done() and adm.running_rows == 8
        for t in [busy, *smalls]:
            t.release()
        (await asyncio.wait_for(large, 1)).release()

    _run(main())


def test_a_client_that_leaves_the_queue_frees_its_place():
    async def main() -> None:
        adm = Admission(max_rows=1, max_queued=1)
        t = await adm.acquire(1)
        waiting = asyncio.create_task(adm.acquire(1))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert adm.waiting == 0
        again = asyncio.create_task(adm.acquire(1))  # the place is free again: it queues, no 429
        await asyncio.sleep(0)
        t.release()
        (await again).release()
        assert adm.running_rows == 0 and adm.rejected == 0

    _run(main())


# ------------------------------------------------------------------------------ acceptance on real servers


class CheapRoutes:
    """Polls ``/health`` and ``/v1/models`` while a load runs; keeps the slowest answer of each."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base, self.headers = base, headers or {}
        self.slowest = {"/health": 0.0, "/v1/models": 0.0}
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> CheapRoutes:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _poll(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30, trust_env=False, headers=self.headers) as client:
            while not self._stop.is_set():
                for path in self.slowest:
                    start = time.perf_counter()
                    status = client.get(path).status_code
                    self.slowest[path] = max(self.slowest[path], time.perf_counter() - start)
                    self.statuses.add(status)
                self._stop.wait(0.2)


def _burst(send, clients: int) -> list[tuple[int, float, str | None]]:
    """``clients`` calls of ``send`` at once: (status, seconds, Retry-After) of each."""
    barrier = threading.Barrier(clients)

    def one(_: int) -> tuple[int, float, str | None]:
        barrier.wait()
        start = time.perf_counter()
        try:
            send()
            return 200, time.perf_counter() - start, None
        except openai.APIStatusError as e:
            return e.status_code, time.perf_counter() - start, e.response.headers.get("retry-after")

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def _check_saturation(results, cheap: CheapRoutes, *, exact: bool) -> None:
    statuses = sorted(s for s, _, _ in results)
    assert all(s in (200, 429) for s in statuses), statuses  # never a 5xx, nothing else
    refused = [r for r in results if r[0] == 429]
    if exact:  # every request outlives the burst: exactly the rows plus the queue are served
        assert len(refused) == CLIENTS - ROWS - QUEUE, statuses
    assert len(refused) >= 1 and len(results) - len(refused) >= ROWS + QUEUE, statuses
    assert all(seconds < 5 and retry_after and int(retry_after) >= 1 for _, seconds, retry_after in refused), refused
    assert cheap.statuses == {200} and max(cheap.slowest.values()) < 1.0, cheap.slowest


@pytest.fixture(scope="module")
def llm_server(ray_session):
    from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server

    cfg = LLMServerConfig(model=LLM_MODEL, port=free_port(), route_prefix="/sat-llm", app_name="subq-sat-llm",
                          max_batch_size=ROWS, max_queued_requests=QUEUE, max_new_tokens=3000, num_cpus=0.5,
                          torch_threads=1)
    url = start_llm_server(cfg)
    yield cfg, url
    stop_llm_server(cfg)


def test_llm_server_at_saturation_refuses_beyond_its_queue_and_health_never_waits(llm_server):
    cfg, url = llm_server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)

    def long_request() -> None:  # ~2000 tokens each: every request outlives the burst
        client.chat.completions.create(model=cfg.served_model_name, messages=MSG, max_tokens=2000, temperature=0,
                                       logit_bias={str(EOS): -100})

    with CheapRoutes(url.removesuffix("/v1")) as cheap:
        results = _burst(long_request, CLIENTS)
        # validation still answers at once while every row is busy and the queue is full
        with httpx.Client(timeout=30, trust_env=False) as http:
            bad = http.post(f"{url}/chat/completions", json={"model": cfg.served_model_name, "messages": "x"})
    _check_saturation(results, cheap, exact=True)
    assert bad.status_code == 400


@pytest.fixture(scope="module")
def decomposer_server(ray_session):
    from subq.serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer

    cfg = DecomposerConfig(model=LLM_MODEL, port=free_port(), route_prefix="/sat-dec", app_name="subq-sat-dec",
                           prompt_format="chat", max_batch_size=ROWS, max_queued_requests=QUEUE,
                           max_new_tokens=3000, num_cpus=0.5, torch_threads=1)
    url = start_decomposer(cfg)
    yield cfg, url
    stop_decomposer(cfg)


def test_decomposer_at_saturation_refuses_beyond_its_queue_and_health_never_waits(decomposer_server):
    cfg, url = decomposer_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    def long_request() -> None:  # a random model may write eos early: some requests may end sooner
        client.chat.completions.create(model=cfg.served_model_name, max_tokens=2000, temperature=0,
                                       messages=[{"role": "user", "content": "Tom has 3 apples and buys 4."}])

    with CheapRoutes(url) as cheap:
        results = _burst(long_request, CLIENTS)
    _check_saturation(results, cheap, exact=False)


# ------------------------------------------------------------------------------ SIGTERM


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _start_cli_server(ray_tmp: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}  # its own local Ray
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "subq.cli", "llm-server", "--model", "tiny-random:llama",
                             "--port", str(port), "--num-cpus", "0.5"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    seen = []
    for line in proc.stdout:  # the banner comes once /health answered
        seen.append(line)
        if line.startswith("serving "):  # from here on drain its output: a full pipe would block its exit
            threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()
            return proc, f"http://127.0.0.1:{port}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(seen[-30:]))


def _sigterm_exits_within(proc: subprocess.Popen, seconds: float) -> float:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=seconds)
    return time.monotonic() - start


@pytest.mark.parametrize("kill_ray_first", [False, True], ids=["healthy", "raylet-killed"])
def test_sigterm_stops_the_cli_server_within_10_s(kill_ray_first):
    ray_tmp = tempfile.mkdtemp(prefix="subq-rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    proc, base = _start_cli_server(ray_tmp)
    family = _descendants(proc.pid)
    try:
        assert httpx.get(f"{base}/health", timeout=30, trust_env=False).status_code == 200
        if kill_ray_first:
            raylets = [p for p in family if "raylet" in " ".join(p.cmdline())]
            assert raylets, [p.name() for p in family]
            for p in raylets:
                p.kill()
            time.sleep(1)
        if proc.poll() is None:  # Ray may also take its driver down with it: then it has exited already
            assert _sigterm_exits_within(proc, 10) < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in family:  # whatever Ray left behind (our own children only)
            with contextlib.suppress(Exception):
                p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
