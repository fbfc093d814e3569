"""A local OpenAI-compatible chat server for any HF causal LM, on Ray Serve.

This is subq's embedded teacher and solver (DESIGN §2-3): the collection actors and the evaluation
talk to it with the official ``openai`` client, exactly as they would talk to OpenAI or vLLM.

Routes (under ``route_prefix``): ``POST /v1/chat/completions`` (``stream: true`` answers with
server-sent events), ``POST /v1/completions`` (the legacy API with ``echo`` and ``logprobs``,
``serve/completions.py``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /stats`` (batching counters),
``GET /metrics`` (Prometheus, ``serve/metrics.py``) and ``GET /health`` (open, no token; 503 when the
replica's engine is dead).

Saturation (``serve/admission.py``): ``/health``, ``/v1/models`` and request validation never wait
behind generations; beyond ``max_batch_size`` running rows plus ``max_queued_requests`` waiting
requests, a request gets a 429 with ``Retry-After`` at once.

Each replica runs one decoding engine (``serve/engine.py``): requests join the running batch between
decoding steps and leave it as soon as they finish (continuous batching; the batch size counts
*samples*, so ``n=3`` takes three rows), each with its own temperature, top_p, max_tokens, stop
strings, seed, logit_bias and penalties. Limits come before work: the body size and the messages'
length in characters (both derived from the context length) are checked before anything is
tokenized, and parsing and tokenizing run off the event loop, so ``/health`` answers while a huge
body is refused.

Usage::

    cfg = LLMServerConfig(model="embedded:smollm2-135m-instruct", port=8000)
    base_url = start_llm_server(cfg)          # "http://127.0.0.1:8000/v1"
    openai.OpenAI(base_url=base_url, api_key="unused").chat.completions.create(...)
    stop_llm_server(cfg)
"""

# No `from __future__ import annotations`: FastAPI must see real `Request` annotations on the
# route methods, which Serve re-wraps outside this module's namespace.
import asyncio
import copy
import logging
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from subq.learner.models import model_display_name
from subq.serve.admission import Admission
from subq.serve.chat_api import ChatRequest, chat_completion, parse_chat_request
from subq.serve.chat_stream import RawText, stream_chat
from subq.serve.completions import Completions, respond
from subq.serve.engine import Engine, EngineStats, RequestError, RequestStream
from subq.serve.fields import ApiError, decode_json, error_body
from subq.serve.metrics import CONTENT_TYPE, ServerMetrics
from subq.serve.serving import (
    DTYPES,
    SHUTDOWN_POLL_S,
    Secret,
    api_error,
    check_auth,
    check_engine,
    delete_app,
    deploy,
    health_response,
    http_error,
    init_replica_torch,
    max_ongoing_requests,
    model_response,
    models_response,
    read_body,
    read_token,
    replica_device,
    serve_until_stopped,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
BODY_OVERHEAD_BYTES = 64 << 10  # JSON keys and the other fields, beyond the messages' characters


@dataclass
class LLMServerConfig:
    """Everything that defines one served model; fields are plain values so YAML can fill them."""

    model: str = EMBEDDED_MODEL  # a learner.models spec: embedded:..., tiny-random:..., a HF dir
    served_model_name: str | None = None  # the "model" clients must send; default: model_display_name
    host: str = "127.0.0.1"  # loopback unless you mean to expose it (Serve-wide: one HTTP proxy)
    port: int = 8000  # Serve-wide too: if Serve already runs, its port wins (see start_llm_server)
    route_prefix: str = "/"  # distinct per app when several share the Serve proxy
    max_batch_size: int = 8  # samples decoded together (a request with n=k counts k); more wait their turn
    max_queued_requests: int | None = None  # requests that may wait for rows; beyond: 429 + Retry-After at
    #                                         once (None: unbounded; `subq llm-server` defaults to 64)
    batch_wait_timeout_s: float = 0.05  # an idle replica waits this long for company before its first prefill
    max_prompt_tokens: int | None = None  # default: the model's context length - 1
    max_new_tokens: int = 1024  # cap on a request's max_tokens; also its default (bounded by context)
    token_env: str | None = None  # NAME of an env var holding a bearer token; None: no auth
    num_replicas: int = 1
    num_cpus: float = 1.0  # Ray CPUs reserved per replica (also its torch threads unless torch_threads)
    num_gpus: float = 0.0  # GPUs per replica; > 0 puts the model on cuda
    dtype: str = "auto"  # auto (bfloat16 on a GPU with bf16, else float32) | float32 | bfloat16 | float16
    torch_threads: int | None = None  # intra-op threads per replica; default: int(num_cpus), at least 1
    app_name: str = "subq-llm"

    def __post_init__(self) -> None:
        if not self.served_model_name:
            self.served_model_name = model_display_name(self.model)
        if not self.route_prefix.startswith("/"):
            self.route_prefix = "/" + self.route_prefix
        if self.max_batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("max_batch_size and max_new_tokens must be >= 1")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0 (or None), got {self.max_queued_requests}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")


app = FastAPI(title="subq local LLM server", docs_url=None, redoc_url=None, openapi_url=None)
app.add_exception_handler(StarletteHTTPException, http_error)  # unknown routes: OpenAI's error shape too


def max_token_chars(tokenizer) -> int:
    """The most characters any one token stands for (the length of its longest vocabulary string): a
    text of C characters has at least C / this many tokens, which bounds a prompt before tokenizing."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(t) for t in tokens if isinstance(t, str)), default=1) or 1


@serve.deployment
@serve.ingress(app)
class LLMServer:
    """One replica: a model, its tokenizer and a decoding engine."""

    def __init__(self, cfg: LLMServerConfig, token: Secret | None) -> None:
        from subq.learner.models import load_model_and_tokenizer
        from subq.serve.generation import BatchDecoder, context_length, eos_token_ids

        self.threads = init_replica_torch(cfg.torch_threads, cfg.num_cpus)
        self.cfg = cfg
        self.token = token
        device, dtype = replica_device(cfg.num_gpus, cfg.dtype)
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype, device=device)
        self.context = context_length(self.model) or 1 << 30
        self.max_prompt_tokens = min(cfg.max_prompt_tokens or self.context - 1, self.context - 1)
        self.max_prompt_chars = self.max_prompt_tokens * max_token_chars(self.tokenizer)
        self.max_body_bytes = 8 * self.max_prompt_chars + BODY_OVERHEAD_BYTES  # "\uXXXX" is 6 bytes a character
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self._tokenize_lock = threading.Lock()  # request threads share this tokenizer; the engine has its own copy
        self.created = int(time.time())
        self.stats = EngineStats()
        self.admission = Admission(cfg.max_batch_size, cfg.max_queued_requests)  # routes: `async with .rows(n)`
        self.metrics = ServerMetrics(cfg.served_model_name or "", running=lambda: self.admission.running_requests,
                                     waiting=lambda: self.admission.waiting,
                                     running_rows=lambda: self.admission.running_rows)
        decoder = BatchDecoder(self.model, copy.deepcopy(self.tokenizer),
                               eos_ids=eos_token_ids(self.model, self.tokenizer))
        self.engine = Engine(decoder, max_rows=cfg.max_batch_size, wait_s=cfg.batch_wait_timeout_s, stats=self.stats,
                             metrics=self.metrics)
        self.completions = Completions(self)  # /v1/completions and the log-probs of both routes
        self.placement = {"device": device, "dtype": str(dtype).removeprefix("torch."), "torch_threads": self.threads}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # ------------------------------------------------------------------------------------ routes

    def check_health(self) -> None:
        check_engine(self.engine)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return health_response(self.engine, self.cfg.served_model_name or "")

    @app.get("/metrics")
    async def get_metrics(self, request: Request) -> Response:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def get_stats(self, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return JSONResponse({**self.stats, "max_batch_size": self.cfg.max_batch_size, **self.placement,
                             "max_prompt_chars": self.max_prompt_chars, "max_body_bytes": self.max_body_bytes})

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
    async def chat_completions(self, request: Request) -> Response:
        response = await self._chat(request)
        self.metrics.response(response.status_code)  # requests by status (429s included)
        return response

    async def _chat(self, request: Request) -> Response:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        try:
            raw = await read_body(request, self.max_body_bytes)
            chat = await asyncio.to_thread(self._parse, raw)  # off the event loop: /health stays live
            prompt = await asyncio.to_thread(self._prompt_ids, chat)
            max_tokens = min(chat.max_tokens or self.cfg.max_new_tokens, self.context - len(prompt))
            params = chat.sampling(max_tokens)
            async with self.admission.rows(params.n) as ticket:  # validated first: a bad request never queues
                stream = RequestStream(self.engine, prompt, params, stream=chat.stream, ticket=ticket)
                if chat.stream:
                    return await stream_chat(stream, model=self.cfg.served_model_name, prompt_tokens=len(prompt),
                                             include_usage=chat.include_usage, content=RawText,
                                             on_complete=lambda tokens: self.stats.request(len(prompt), tokens))
                completions = await stream.result()
                logprobs = await self.completions.chat_logprobs(chat, prompt, completions)
        except ApiError as exc:
            return api_error(exc)
        except RequestError as exc:
            kind = "server_error" if exc.status >= 500 else "invalid_request_error"
            return JSONResponse(error_body(exc.message, type=kind), status_code=exc.status)
        except Exception:
            logger.exception("chat completion failed")
            return JSONResponse(error_body("the server failed to generate a completion", type="server_error"),
                                status_code=500)
        self.stats.request(len(prompt), sum(c.generated_tokens for c in completions))
        return JSONResponse(chat_completion(self.cfg.served_model_name, len(prompt), completions, logprobs))

    @app.post("/v1/completions")
    async def text_completions(self, request: Request) -> Response:
        if (denied := check_auth(self.token, request)) is not None:
            response: Response = denied
        else:
            response = await respond(self._completions(request), "generate a completion")
        self.metrics.response(response.status_code)
        return response

    async def _completions(self, request: Request) -> Response:
        return await self.completions.handle(await read_body(request, self.max_body_bytes))

    # ----------------------------------------------------------------------------------- helpers

    def _parse(self, raw: bytes) -> ChatRequest:
        return parse_chat_request(decode_json(raw), served_model=self.cfg.served_model_name,
                                  max_n=self.cfg.max_batch_size, max_new_tokens=self.cfg.max_new_tokens,
                                  vocab_size=self.vocab, max_prompt_chars=self.max_prompt_chars, logprobs=True)

    def _prompt_ids(self, chat: ChatRequest) -> list[int]:
        """Render the chat template, bound its length, then tokenize without adding specials a second time."""
        try:
            text = self.tokenizer.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # e.g. a template that insists on alternating roles
            raise ApiError(400, f"the messages do not fit the model's chat template: {str(e)[:300]}",
                           param="messages") from None
        if len(text) > self.max_prompt_chars:
            raise ApiError(400, f"the prompt is longer than {self.max_prompt_chars} characters, more than "
                                f"{self.max_prompt_tokens} tokens can hold", code="context_length_exceeded",
                           param="messages")
        with self._tokenize_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                f"{self.max_prompt_tokens}", code="context_length_exceeded", param="messages")
        return ids


# ------------------------------------------------------------------------------------ lifecycle


def build_llm_app(cfg: LLMServerConfig) -> serve.Application:
    """The Serve application for ``cfg`` (not yet running)."""
    return LLMServer.options(
        name=f"{cfg.app_name}-llm",
        num_replicas=cfg.num_replicas,
        # Far above the batch: Serve must not queue requests in its router, where /health would wait
        # behind generations; the replica's Admission bounds the work (serve/admission.py).
        max_ongoing_requests=max_ongoing_requests(cfg.max_batch_size, cfg.max_queued_requests),
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
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
                        lambda: stop_llm_server(cfg), health_url=f"{url.removesuffix('/v1')}/health")
