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
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from learner.models import model_display_name
from serve.chat_api import ApiError, ChatRequest, chat_completion, error_body, parse_chat_request
from serve.generation import Completion, SamplingParams
from serve.serving import (
    ReplicaStats,
    Secret,
    api_error,
    check_auth,
    delete_app,
    deploy,
    http_error,
    init_replica_torch,
    model_response,
    models_response,
    read_body,
    read_token,
    serve_until_stopped,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
MAX_BODY_BYTES = 16 << 20  # far above any prompt that fits a context; stops tokenizing junk


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



app = FastAPI(title="subq local LLM server", docs_url=None, redoc_url=None, openapi_url=None)


app.add_exception_handler(StarletteHTTPException, http_error)  # unknown routes: OpenAI's error shape too


def _rows(jobs: list[tuple[list[int], SamplingParams]]) -> int:
    return sum(params.n for _, params in jobs)


@serve.deployment
@serve.ingress(app)
class LLMServer:
    """One replica: a model, its tokenizer and a batch queue."""

    def __init__(self, cfg: LLMServerConfig, token: Secret | None) -> None:
        from learner.models import load_model_and_tokenizer
        from serve.generation import context_length, eos_token_ids

        init_replica_torch(cfg.torch_threads)
        self.cfg = cfg
        self.token = token
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.context = context_length(self.model) or 1 << 30
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or self.context - 1, self.context - 1)
        self.created = int(time.time())
        self.stats = ReplicaStats()
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # ------------------------------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self.cfg.served_model_name or ""}

    @app.get("/stats")
    async def get_stats(self, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return JSONResponse({**self.stats, "max_batch_size": self.cfg.max_batch_size})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return models_response(self.cfg.served_model_name, self.created)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return model_response(model_id, self.cfg.served_model_name, self.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        try:
            chat = self._parse(await read_body(request, MAX_BODY_BYTES))
            prompt = self._prompt_ids(chat)
            max_tokens = min(chat.max_tokens or self.cfg.max_new_tokens, self.context - len(prompt))
            completions = await self._generate((prompt, chat.sampling(max_tokens)))
        except ApiError as exc:
            return api_error(exc)
        except Exception:
            logger.exception("chat completion failed")
            return JSONResponse(error_body("the server failed to generate a completion", type="server_error"),
                                status_code=500)
        self.stats.request(len(prompt), sum(c.generated_tokens for c in completions))
        return JSONResponse(chat_completion(self.cfg.served_model_name, len(prompt), completions))

    # ----------------------------------------------------------------------------------- helpers

    def _parse(self, raw: bytes) -> ChatRequest:
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
        self.stats.batch(len(jobs), out.rows, out.forward_passes, time.perf_counter() - start)
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
    ).bind(cfg, read_token(cfg.token_env))


def start_llm_server(cfg: LLMServerConfig, *, timeout_s: float = 300.0) -> str:
    """Deploy ``cfg`` and return its OpenAI base URL (``http://host:port<prefix>/v1``) once healthy.

    Initialises Ray if the caller has not; joins Serve's proxy where it already runs (see
    ``serve.serving.deploy``).
    """
    base = deploy(build_llm_app(cfg), app_name=cfg.app_name, host=cfg.host, port=cfg.port,
                  route_prefix=cfg.route_prefix, timeout_s=timeout_s)
    return f"{base}/v1"


def stop_llm_server(cfg: LLMServerConfig) -> None:
    """Delete this app (other Serve apps and the proxy keep running)."""
    delete_app(cfg.app_name)


def run_forever(cfg: LLMServerConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then delete the app (what ``subq llm-server`` runs)."""
    url = start_llm_server(cfg)
    auth = f", bearer token from ${cfg.token_env}" if cfg.token_env else ""
    serve_until_stopped(f"serving {cfg.served_model_name!r} at {url} (Ctrl-C to stop{auth})",
                        lambda: stop_llm_server(cfg))
