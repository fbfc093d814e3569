"""A local OpenAI-compatible chat server for any HF causal LM, on Ray Serve.

This is subq's embedded teacher and solver (DESIGN §2-3): the collection actors and the evaluation
talk to it with the official ``openai`` client, exactly as they would talk to OpenAI or vLLM.

Routes (under ``route_prefix``): ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /stats`` (batching counters) and ``GET /health`` (open, no token).

Concurrent requests are grouped by ``@serve.batch`` (the batch size counts *samples*, so a request
with ``n=3`` takes three slots) and decoded together by :func:`serve.generation.generate`, which
honours each request's own temperature, top_p, max_tokens, stop strings and n.

Usage::

    cfg = LLMServerConfig(model="embedded:smollm2-135m-instruct", port=8000)
    base_url = start_llm_server(cfg)          # "http://127.0.0.1:8000/v1"
    openai.OpenAI(base_url=base_url, api_key="unused").chat.completions.create(...)
    stop_llm_server(cfg)
"""

# No `from __future__ import annotations`: FastAPI must see real `Request` annotations on the
# route methods, which Serve re-wraps outside this module's namespace.
import asyncio
import hmac
import json
import logging
import os
import signal
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from learner.models import model_display_name
from serve.chat_api import ApiError, ChatRequest, chat_completion, error_body, model_card, parse_chat_request
from serve.generation import Completion, SamplingParams

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# Must be in the environment before Ray starts (DESIGN §4); subq.runtime sets the same for the CLI.
MAX_BODY_BYTES = 16 << 20  # far above any prompt that fits a context; stops tokenizing junk
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}


@dataclass
class LLMServerConfig:
    """Everything that defines one served model; fields are plain values so YAML can fill them."""

    model: str = EMBEDDED_MODEL  # a learner.models spec: embedded:..., tiny-random:..., a HF dir
    served_model_name: str | None = None  # the "model" clients must send; default: model_display_name
    host: str = "127.0.0.1"  # loopback unless you mean to expose it (Serve-wide: one HTTP proxy)
    port: int = 8000  # Serve-wide too: if Serve already runs, its port wins (see start_llm_server)
    route_prefix: str = "/"  # distinct per app when several share the Serve proxy
    max_batch_size: int = 8  # samples decoded together (a request with n=k counts k)
    batch_wait_timeout_s: float = 0.05  # how long a lone request waits for company
    max_prompt_tokens: int | None = None  # default: the model's context length - 1
    max_new_tokens: int = 1024  # cap on a request's max_tokens; also its default (bounded by context)
    token_env: str | None = None  # NAME of an env var holding a bearer token; None: no auth
    num_replicas: int = 1
    num_cpus: float = 1.0  # Ray CPUs reserved per replica
    torch_threads: int | None = None  # intra-op threads per replica; default: all cores of the node
    app_name: str = "subq-llm"

    def __post_init__(self) -> None:
        if not self.served_model_name:
            self.served_model_name = model_display_name(self.model)
        if not self.route_prefix.startswith("/"):
            self.route_prefix = "/" + self.route_prefix
        if self.max_batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("max_batch_size and max_new_tokens must be >= 1")

    @property
    def base_path(self) -> str:
        """The route prefix without a trailing slash ("" for the root)."""
        return self.route_prefix.rstrip("/")


class _Secret:
    """Carries the bearer token to the replicas without ever printing it."""

    def __init__(self, value: str) -> None:
        self._value = value

    def matches(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self._value.encode())

    def __repr__(self) -> str:
        return "_Secret(***)"


def _read_token(cfg: LLMServerConfig) -> _Secret | None:
    """Read the token in the driver: replicas may not inherit env vars set after ray.init."""
    if not cfg.token_env:
        return None
    value = os.environ.get(cfg.token_env, "")
    if not value:  # fail closed: asked for auth, but there is no token to check against
        raise ValueError(f"token_env={cfg.token_env!r} is set but that environment variable is empty")
    return _Secret(value)


def _error(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


app = FastAPI(title="subq local LLM server", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods answer in OpenAI's error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", code=code),
                        status_code=exc.status_code)


def _rows(jobs: list[tuple[list[int], SamplingParams]]) -> int:
    return sum(params.n for _, params in jobs)


@serve.deployment
@serve.ingress(app)
class LLMServer:
    """One replica: a model, its tokenizer and a batch queue."""

    def __init__(self, cfg: LLMServerConfig, token: _Secret | None) -> None:
        import torch

        from learner.models import load_model_and_tokenizer
        from serve.generation import context_length, eos_token_ids

        torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)  # Ray sets OMP threads to num_cpus
        torch.seed()  # replicas must not share torch's fixed default seed
        self.cfg = cfg
        self.token = token
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.context = context_length(self.model) or 1 << 30
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or self.context - 1, self.context - 1)
        self.created = int(time.time())
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "forward_passes": 0, "max_batch_requests": 0,
                      "prompt_tokens": 0, "completion_tokens": 0, "generate_seconds": 0.0}
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # ------------------------------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self.cfg.served_model_name or ""}

    @app.get("/stats")
    async def get_stats(self, request: Request) -> JSONResponse:
        """Counters for this replica, so tests and benchmarks can check batching without timing."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        return JSONResponse({**self.stats, "max_batch_size": self.cfg.max_batch_size})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        if (denied := self._check_auth(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [model_card(self.cfg.served_model_name, self.created)]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        if (denied := self._check_auth(request)) is not None:
            return denied
        if model_id != self.cfg.served_model_name:
            return _error(ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                                        f"{self.cfg.served_model_name!r}", code="model_not_found"))
        return JSONResponse(model_card(model_id, self.created))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        if (denied := self._check_auth(request)) is not None:
            return denied
        try:
            chat = self._parse(await request.body())
            prompt = self._prompt_ids(chat)
            max_tokens = min(chat.max_tokens or self.cfg.max_new_tokens, self.context - len(prompt))
            completions = await self._generate((prompt, chat.sampling(max_tokens)))
        except ApiError as exc:
            return _error(exc)
        except Exception:
            logger.exception("chat completion failed")
            return JSONResponse(error_body("the server failed to generate a completion", type="server_error"),
                                status_code=500)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt)
        self.stats["completion_tokens"] += sum(c.generated_tokens for c in completions)
        return JSONResponse(chat_completion(self.cfg.served_model_name, len(prompt), completions))

    # ----------------------------------------------------------------------------------- helpers

    def _check_auth(self, request: Request) -> JSONResponse | None:
        if self.token is None or self.token.matches(request.headers.get("authorization")):
            return None
        return _error(ApiError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                               type="authentication_error", code="invalid_api_key"))

    def _parse(self, raw: bytes) -> ChatRequest:
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        return parse_chat_request(body, served_model=self.cfg.served_model_name,
                                  max_n=self.cfg.max_batch_size, max_new_tokens=self.cfg.max_new_tokens)

    def _prompt_ids(self, chat: ChatRequest) -> list[int]:
        """Render the chat template, then tokenize without adding specials a second time."""
        try:
            text = self.tokenizer.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # e.g. a template that insists on alternating roles
            raise ApiError(400, f"the messages do not fit the model's chat template: {e}",
                           param="messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}", code="context_length_exceeded", param="messages")
        return ids

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=_rows)
    async def _generate(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[Completion]]:
        """One batch: decoded in a worker thread so health checks and queueing stay responsive."""
        from serve.generation import generate

        start = time.perf_counter()
        out = await asyncio.to_thread(generate, self.model, self.tokenizer, [j[0] for j in jobs],
                                      [j[1] for j in jobs], eos_ids=self.eos_ids)
        self.stats["generate_seconds"] += time.perf_counter() - start
        self.stats["batches"] += 1
        self.stats["rows"] += out.rows
        self.stats["forward_passes"] += out.forward_passes
        self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(jobs))
        return out.completions


# ------------------------------------------------------------------------------------ lifecycle


def build_llm_app(cfg: LLMServerConfig) -> serve.Application:
    """The Serve application for ``cfg`` (not yet running)."""
    return LLMServer.options(
        name=f"{cfg.app_name}-llm",
        num_replicas=cfg.num_replicas,
        # >= max_batch_size, or Serve never hands a replica enough requests to fill a batch
        # (DESIGN §4); twice that lets the next batch queue while one decodes.
        max_ongoing_requests=2 * cfg.max_batch_size,
        ray_actor_options={"num_cpus": cfg.num_cpus},
    ).bind(cfg, _read_token(cfg))


def start_llm_server(cfg: LLMServerConfig, *, timeout_s: float = 300.0) -> str:
    """Deploy ``cfg`` and return its OpenAI base URL (``http://host:port<prefix>/v1``) once healthy.

    Initialises Ray (with DESIGN §4's environment) if the caller has not. Serve has one HTTP proxy
    per cluster: if it is already running on another host/port, the app joins it and the returned
    URL names the port actually in use.
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"log_level": "WARNING"})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's "app ready" chatter
    host, port = _serve_address(cfg)
    serve.run(build_llm_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{url_host}:{port}{cfg.base_path}"
    _wait_healthy(f"{base}/health", timeout_s)
    return f"{base}/v1"


def stop_llm_server(cfg: LLMServerConfig) -> None:
    """Delete this app (other Serve apps and the proxy keep running)."""
    import ray

    if ray.is_initialized():
        try:
            serve.delete(cfg.app_name)
        except Exception as e:  # Serve already gone: nothing to stop
            logger.debug("stop_llm_server: %s", e)


def run_forever(cfg: LLMServerConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then delete the app (what ``subq llm-server`` runs)."""
    url = start_llm_server(cfg)
    auth = f", bearer token from ${cfg.token_env}" if cfg.token_env else ""
    print(f"serving {cfg.served_model_name!r} at {url} (Ctrl-C to stop{auth})", flush=True)

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `ray job stop`: same clean exit as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Only our app: on a shared cluster (--ray-address) other Serve apps must keep running; a
        # local Ray started by this process goes away with it.
        stop_llm_server(cfg)


def _serve_address(cfg: LLMServerConfig) -> tuple[str, int]:
    """The proxy's real host and port (Serve keeps its first http_options)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, int(http.port)
    except Exception:  # private API moved: trust the config
        return cfg.host, cfg.port
    if (host, port) != (cfg.host, cfg.port):
        logger.warning("Serve already listens on %s:%s; %s joins it there instead of %s:%s",
                       host, port, cfg.app_name, cfg.host, cfg.port)
    return host, port


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
    raise TimeoutError(f"the LLM server at {url} did not become healthy in {timeout_s:.0f} s ({last})")
