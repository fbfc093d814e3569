"""Plumbing shared by subq's Serve applications (the LLM server and the decomposer).

Bearer tokens, OpenAI-shaped errors, replica set-up (torch threads, device and dtype), request bodies
with a size limit, the model routes, deploying an app behind Serve's one HTTP proxy and waiting
until it answers, deleting it, and serving until Ctrl-C / SIGTERM. Nothing model-specific here.

Dtype policy (one place for both servers): ``dtype="auto"`` is bfloat16 on a GPU that supports it
(float32 on one that does not) and float32 on CPU, where it is both the fastest and exact. Greedy
output can differ between the two (bf16 rounds differently), so the same checkpoint may decode
differently on a GPU replica than on a CPU one; pin ``dtype`` (``--dtype``) to make them agree.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, NoReturn

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from subq.serve.chat_api import model_card
from subq.serve.fields import ApiError, error_body

logger = logging.getLogger(__name__)

# Must be in the environment before Ray starts (DESIGN §4); subq.runtime sets the same for the CLI.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}


class Secret:
    """Carries the bearer token to the replicas without ever printing it."""

    def __init__(self, value: str) -> None:
        self._value = value

    def matches(self, header: str | None) -> bool:
        scheme, _, credentials = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110 §11.1)
            return False
        return hmac.compare_digest(credentials.strip().encode("utf-8", "replace"), self._value.encode())

    def __repr__(self) -> str:
        return "Secret(***)"


def read_token(token_env: str | None) -> Secret | None:
    """Read the token in the driver: replicas may not inherit env vars set after ray.init."""
    if not token_env:
        return None
    value = os.environ.get(token_env, "")
    if not value:  # fail closed: asked for auth, but there is no token to check against
        raise ValueError(f"token_env={token_env!r} is set but that environment variable is empty")
    return Secret(value)


def api_error(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if (retry_after := getattr(exc, "retry_after_s", None)) is not None:  # admission.Overloaded
        headers = {"Retry-After": str(retry_after)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


# Routes that never wait (health, models, metrics, validation) need room beyond the generation
# requests a replica holds: Serve counts every ongoing request against max_ongoing_requests.
CHEAP_ROUTE_HEADROOM = 1000
UNBOUNDED_ONGOING = 100_000  # max_queued_requests=None: the admission queue in the replica is the only queue
# How often a stopping replica re-counts its requests in flight (Serve's default is 2 s): deleting an idle
# app then took 3 s, paid by every evaluated student and every stop of `subq serve`.
SHUTDOWN_POLL_S = 0.2
DELETE_TIMEOUT_S = 60.0  # what Serve's blocking delete allows


def max_ongoing_requests(max_batch_size: int, max_queued: int | None) -> int:
    """Serve's per-replica limit: high enough that it never queues a request in the router (where
    ``/health`` would wait behind generations); the replica's own admission bounds the work."""
    if max_queued is None:
        return UNBOUNDED_ONGOING
    return max_batch_size + max_queued + CHEAP_ROUTE_HEADROOM


def health_response(engine: Any, served_model: str) -> JSONResponse:
    """``GET /health``: 200 while the replica's engine runs, else 503 (so a probe evicts it)."""
    if engine.alive:
        return JSONResponse({"status": "ok", "model": served_model})
    return JSONResponse({"status": "unhealthy", "model": served_model,
                         "error": engine.error or "the decoding engine is shut down"}, status_code=503)


def check_engine(engine: Any) -> None:
    """Serve's replica health check: a replica whose engine died is restarted."""
    if not engine.alive:
        raise RuntimeError(engine.error or "the decoding engine is shut down")


def check_auth(token: Secret | None, request: Request) -> JSONResponse | None:
    """None when the request may pass, else the 401 to send."""
    if token is None or token.matches(request.headers.get("authorization")):
        return None
    return api_error(ApiError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                              type="authentication_error", code="invalid_api_key"))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods answer in OpenAI's error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", code=code),
                        status_code=exc.status_code)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def init_replica_torch(threads: int | None, num_cpus: float) -> int:
    """Intra-op threads = ``threads``, else the CPUs the replica reserved from Ray (at least 1), so
    replicas on one node do not oversubscribe its cores; replicas must not share torch's fixed
    default seed. Returns the thread count."""
    import torch

    count = threads or max(1, int(num_cpus))
    torch.set_num_threads(count)
    torch.seed()
    return count


def replica_device(num_gpus: float, dtype: str) -> tuple[str, Any]:
    """(device, torch dtype) of a replica by the dtype policy in this module's docstring."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    device = "cuda" if num_gpus > 0 else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("num_gpus > 0 but this replica sees no CUDA device")
    if dtype == "auto":
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, getattr(torch, dtype)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing one over ``max_bytes`` (413) before reading it all."""
    too_large = ApiError(413, f"the request body is larger than {max_bytes} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def models_response(served_model: str, created: int, fingerprint: str | None = None) -> JSONResponse:
    """``GET /v1/models``: the one model this server serves (``fingerprint``: its files' content hash)."""
    return JSONResponse({"object": "list", "data": [model_card(served_model, created, fingerprint)]})


def model_response(model_id: str, served_model: str, created: int, fingerprint: str | None = None) -> JSONResponse:
    """``GET /v1/models/{id}``: its card, or OpenAI's 404 for any other id."""
    if model_id != served_model:
        return api_error(ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                                    f"{served_model!r}", code="model_not_found"))
    return JSONResponse(model_card(model_id, created, fingerprint))


def deploy(application: serve.Application, *, app_name: str, host: str, port: int, route_prefix: str,
           timeout_s: float) -> str:
    """Run ``application`` under ``route_prefix`` and return ``http://host:port<prefix>`` once /health answers.

    Initialises Ray (with DESIGN §4's environment) if the caller has not. Serve has one HTTP proxy
    per cluster: if it already runs on another host/port, the app joins it and the URL says so.
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's "app ready" chatter
    real_host, real_port = _serve_address(host, port, app_name)
    serve.run(application, name=app_name, route_prefix=route_prefix)
    url_host = "127.0.0.1" if real_host in ("0.0.0.0", "::", "") else real_host
    base = f"http://{url_host}:{real_port}{route_prefix.rstrip('/')}"
    _wait_healthy(f"{base}/health", timeout_s)
    return base


def delete_app(app_name: str) -> None:
    """Delete one app (other Serve apps and the proxy keep running)."""
    import ray

    if ray.is_initialized():
        try:
            # Serve's own blocking delete re-checks once a second; an idle replica is gone in ~0.3 s.
            serve.delete(app_name, _blocking=False)
            deadline = time.monotonic() + DELETE_TIMEOUT_S
            while app_name in serve.status().applications:
                if time.monotonic() > deadline:  # warn; raising here would mask the error that ended the caller
                    logger.warning("the app %r was not deleted in %.0f s", app_name, DELETE_TIMEOUT_S)
                    return
                time.sleep(0.05)
        except Exception as e:  # Serve already gone: nothing to stop
            logger.debug("delete %s: %s", app_name, e)


STOP_DEADLINE_S = 7.0  # SIGTERM to exit: what a pod's grace period or a supervisor may expect (< 10 s)
HEALTH_POLL_S = 5.0  # how often the serving loop probes its own /health
UNHEALTHY_EXIT_S = 60.0  # unanswered /health for this long (Ray gone, proxy dead): exit 1 for a supervisor


def serve_until_stopped(banner: str, stop: Callable[[], None], *, health_url: str | None = None,
                        unhealthy_exit_s: float = UNHEALTHY_EXIT_S) -> NoReturn:
    """Print ``banner``, wait for Ctrl-C or SIGTERM, then ``stop()`` and end the process (what the ``subq``
    serve commands run; it never returns).

    Stopping never takes more than ``STOP_DEADLINE_S``, whatever state Ray is in: deleting the app and
    shutting down a Ray this process started run in a helper thread, and a process whose Ray does not
    answer (raylet or GCS dead) leaves at the deadline without them. With ``health_url``, a server whose
    ``/health`` stays unanswered for ``unhealthy_exit_s`` stops and exits with 1 instead of lingering.
    """
    print(banner, flush=True)

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `ray job stop`: same clean exit as Ctrl-C
    code = 0
    try:
        _watch(health_url, unhealthy_exit_s)
        code = 1
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the bounded stop short
        _stop_within(stop, STOP_DEADLINE_S)
    # Our app is deleted and our Ray shut down: leave now. The interpreter's own exit waited another
    # ~8 s on Ray's threads and handlers (measured: stop 4.8 s, then exit at 13 s after SIGTERM).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _watch(health_url: str | None, unhealthy_exit_s: float) -> None:
    """Return once ``health_url`` has not answered 200 for ``unhealthy_exit_s``; never without a URL.

    The main thread only sleeps in short steps: a signal may be delivered to one of Ray's threads, and
    Python runs its handler only when the main thread next runs bytecode (a long sleep or a blocking
    probe here delayed SIGTERM by as long). The probes run in a daemon thread.
    """
    last_ok = [time.monotonic()]

    def _probe() -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                with opener.open(health_url, timeout=HEALTH_POLL_S) as resp:
                    if resp.status == 200:
                        last_ok[0] = time.monotonic()
            except Exception as e:  # refused, timed out, 503: unhealthy this time
                logger.debug("health probe: %s", e)
            time.sleep(HEALTH_POLL_S)

    if health_url is not None:
        threading.Thread(target=_probe, name="subq-health-watch", daemon=True).start()
    while True:
        time.sleep(0.2)
        down = time.monotonic() - last_ok[0]
        if health_url is not None and down >= unhealthy_exit_s:
            print(f"{health_url} has not answered for {down:.0f} s (is Ray still running?); stopping",
                  file=sys.stderr, flush=True)
            return


def _stop_within(stop: Callable[[], None], deadline_s: float) -> None:
    """Run ``stop()`` and shut down a Ray this process started, giving up after ``deadline_s``."""

    def _work() -> None:
        try:
            # Only our app: on a shared cluster other Serve apps must keep running; a local Ray started
            # by this process goes away with it (shutdown kills only the processes this driver started).
            stop()
            import ray

            ray.shutdown()
        except Exception as e:
            logger.warning("stopping: %s", e)

    worker = threading.Thread(target=_work, name="subq-stop", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():  # Ray does not answer: leave now; atexit would wait on it again
        print(f"Ray did not stop within {deadline_s:.0f} s; exiting without it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _serve_address(host: str, port: int, app_name: str) -> tuple[str, int]:
    """The proxy's real host and port (Serve keeps its first http_options)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        real = (http.host, int(http.port))
    except Exception:  # private API moved: trust the config
        return host, port
    if real != (host, port):
        logger.warning("Serve already listens on %s:%s; %s joins it there instead of %s:%s",
                       real[0], real[1], app_name, host, port)
    return real


def _wait_healthy(url: str, timeout_s: float) -> None:
    """serve.run returns when replicas are up; the proxy's route table can lag a moment behind."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: ignore HTTP_PROXY
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} did not become healthy in {timeout_s:.0f} s ({last})")
