"""The decomposer deployment: a student checkpoint (or any causal LM) that splits problems into sub-questions.

Routes (under ``route_prefix``), wire format in ``serve/decompose_api.py``:

- ``POST /decompose`` ``{"problem": ..., "max_subquestions"?, "beta"?, "temperature"?, "top_p"?,
  "max_tokens"?}`` -> ``{"subquestions": [...], "raw", "model", "usage", "beta", "finish_reason"}``;
- ``POST /v1/chat/completions``: OpenAI-compatible; the last user message is the problem and the reply's
  content is "Q1: ..." lines (``protocol.prompts.format_subquestions``), so a solver pipeline written for
  the teacher can call the student unchanged;
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /stats`` (batching counters), ``GET /metrics``
  (Prometheus, ``serve/metrics.py``), ``GET /health`` (open, 503 when the engine is dead; every other
  route needs the bearer token when ``token_env`` is set).

Saturation (``serve/admission.py``): health, models and validation never wait behind generations;
beyond ``max_batch_size`` running requests plus ``max_queued_requests`` waiting ones, a 429 with
``Retry-After`` at once.

Prompt formats: ``student`` is what the learner trains (``learner.episodes.encode_prompt``: "Problem:
...\\nSub-questions:\\n", continued by question lines and the ``<end>`` marker; a row stops as soon as
it has written ``<end>``); ``chat`` is the zero-shot teacher prompt (``protocol.prompts.decompose_messages``
through the model's chat template, parsed by ``protocol.parse.parse_subquestions``). ``auto`` picks
student for a subq checkpoint, chat for anything else.

A checkpoint with ILQL heads decodes with ``log pi + beta * (Q - V)`` (``serve.sampling``, the scores
of ``learner.guided_decoding``); beta defaults to the checkpoint's ILQL ``beta`` and can be set per
request (0 = the plain LM). Each replica runs one decoding engine (``serve/engine.py``): requests join
the running batch between decoding steps and leave it when done (continuous batching), each row with
its own beta, temperature, length and stop strings. ``stream: true`` on the chat route streams the
"Q1: ..." lines as server-sent events, one sub-question at a time.

A request's default ``max_tokens`` is ``max_new_tokens`` when set, else derived from the checkpoint
(``decomposer_model.default_max_new_tokens``: the longest training target + a margin, capped; 128
when the checkpoint does not record it).

Usage::

    cfg = DecomposerConfig(model="runs/ilql/final", port=8001)
    url = start_decomposer(cfg)                  # "http://127.0.0.1:8001"
    httpx.post(f"{url}/decompose", json={"problem": "..."}).json()["subquestions"]
    stop_decomposer(cfg)
"""

# No `from __future__ import annotations`: FastAPI must see real `Request` annotations (see llm_server).
import asyncio
import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from subq.learner.checkpoint import is_checkpoint
from subq.learner.content_hash import model_fingerprint
from subq.learner.models import model_display_name
from subq.protocol.prompts import SUBQ_END
from subq.serve.admission import Admission
from subq.serve.chat_stream import stream_chat
from subq.serve.decompose_api import (
    MAX_BODY_BYTES,
    DecomposeRequest,
    Limits,
    SubquestionContent,
    chat_response,
    decompose_response,
    parse_decompose_chat,
    parse_decompose_request,
)
from subq.serve.decomposer_model import Decoder, default_max_new_tokens
from subq.serve.engine import Engine, EngineStats, RequestError, RequestStream
from subq.serve.fields import ApiError, decode_json, error_body
from subq.serve.generation import BatchDecoder
from subq.serve.metrics import CONTENT_TYPE, ServerMetrics
from subq.serve.sampling import SamplingParams
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

PROMPT_FORMATS = ("auto", "student", "chat")


@dataclass
class DecomposerConfig:
    """One served decomposer; fields are plain values so YAML can fill them."""

    model: str = "embedded:smollm2-135m-instruct"  # a learner checkpoint dir, a HF dir, embedded:..., tiny-random:...
    served_model_name: str | None = None  # the "model" clients send and /v1/models lists; default: the training
    #                                       run's name for its final/ (runs/bc/final -> "bc"), else the dir's name
    #                                       or the spec's (served_name)
    prompt_format: str = "auto"  # student (the learner's "Problem:/Sub-questions:" format) | chat (zero-shot
    #                              decompose_messages through the chat template) | auto: student for a subq
    #                              checkpoint, chat otherwise
    beta: float | None = None  # default ILQL guidance; None: the checkpoint's ILQL beta (0 without heads)
    temperature: float = 0.0  # default decoding temperature (0 = greedy); requests may override
    max_new_tokens: int | None = None  # cap on a request's max_tokens, and its default; None: derived from the
    #                                    checkpoint's longest training target (default_max_new_tokens)
    max_subquestions: int | None = None  # default cap on the sub-questions returned (None: all parsed)
    max_problem_chars: int = 4000  # longer problems are refused with a 400
    host: str = "127.0.0.1"  # loopback unless you mean to expose it (Serve-wide: one HTTP proxy per cluster)
    port: int = 8000  # Serve-wide too: if Serve already runs, its port wins
    route_prefix: str = "/"  # distinct per app when several share the Serve proxy
    app_name: str = "subq-decomposer"  # the Serve application's name (stop_decomposer deletes it)
    max_batch_size: int = 8  # requests decoded together; more wait their turn (they join between steps)
    max_queued_requests: int | None = None  # requests that may wait for a row; beyond: 429 + Retry-After at
    #                                         once (None: unbounded; `subq serve` defaults to 64)
    batch_wait_timeout_s: float = 0.05  # an idle replica waits this long for company before its first prefill
    min_replicas: int = 1  # with max_replicas > min_replicas, Serve autoscales between the two
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0  # autoscaling target per replica (only when autoscaling)
    num_cpus: float = 1.0  # Ray CPUs reserved per replica (also its torch threads unless torch_threads)
    num_gpus: float = 0.0  # > 0: the model runs on cuda
    dtype: str = "auto"  # auto (bfloat16 on a GPU with bf16, else float32) | float32 | bfloat16 | float16
    torch_threads: int | None = None  # intra-op threads per replica; default: int(num_cpus), at least 1
    token_env: str | None = None  # NAME of an env var holding a bearer token; None: no auth

    def __post_init__(self) -> None:
        if not self.served_model_name:
            self.served_model_name = served_name(self.model)
        local = Path(self.model).expanduser()
        if local.exists():  # replicas need not share the driver's working directory
            self.model = str(local.resolve())
        if not self.route_prefix.startswith("/"):
            self.route_prefix = "/" + self.route_prefix
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if min(self.max_batch_size, self.max_new_tokens or 1, self.max_problem_chars, self.max_replicas) < 1:
            raise ValueError("max_batch_size, max_new_tokens, max_problem_chars and max_replicas must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0 (or None), got {self.max_queued_requests}")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.beta is not None and not 0 <= self.beta <= 100:
            raise ValueError(f"beta must be between 0 and 100, got {self.beta}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if self.max_subquestions is not None and self.max_subquestions < 1:
            raise ValueError("max_subquestions must be >= 1 (or None)")


def served_name(model: str) -> str:
    """The default served name: a training run's ``final/`` checkpoint is named after its run folder (the
    pipeline's run names: ``bc``, ``ilql``, ...), so that several served students are told apart; any other
    model by ``learner.models.model_display_name``."""
    local = Path(model).expanduser()
    if local.name == "final" and is_checkpoint(local):
        return local.resolve().parent.name
    return model_display_name(model)


app = FastAPI(title="subq decomposer", docs_url=None, redoc_url=None, openapi_url=None)
app.add_exception_handler(StarletteHTTPException, http_error)  # unknown routes: OpenAI's error shape too


@serve.deployment
@serve.ingress(app)
class Decomposer:
    """One replica: a :class:`Decoder` (model, heads, prompt format) and a decoding engine."""

    def __init__(self, cfg: DecomposerConfig, token: Secret | None) -> None:
        self.threads = init_replica_torch(cfg.torch_threads, cfg.num_cpus)
        self.token = token
        self.device, self.dtype = replica_device(cfg.num_gpus, cfg.dtype)
        self.admission = Admission(cfg.max_batch_size, cfg.max_queued_requests)  # routes: `async with .rows(n)`
        self.__dict__.update(self._build(cfg))

    async def load_model(self, model: str, served_model_name: str) -> str:
        """Serve ``model`` from now on (``swap_decomposer``, through a Serve handle): it is loaded off the
        event loop beside the old one, then every attribute a request reads is switched at once; the old
        engine's requests still in flight fail with a 503 (an evaluation swaps between its passes, with
        nothing in flight). Returns the served name."""
        old = self.engine
        parts = await asyncio.to_thread(self._build, replace(self.cfg, model=model,
                                                                 served_model_name=served_model_name))
        self.__dict__.update(parts)
        old.close()
        return self.limits.served_model

    def _build(self, cfg: DecomposerConfig) -> dict[str, Any]:
        """What serving ``cfg.model`` needs: the model, its limits, fingerprint, metrics and engine."""
        decoder = Decoder.load(cfg.model, prompt_format=cfg.prompt_format, beta=cfg.beta, device=self.device,
                               dtype=self.dtype)
        max_new_tokens = cfg.max_new_tokens or default_max_new_tokens(decoder.meta)
        vocab = decoder.model.get_output_embeddings().weight.shape[0]
        limits = Limits(served_model=cfg.served_model_name or "", max_problem_chars=cfg.max_problem_chars,
                        max_new_tokens=max_new_tokens, default_temperature=cfg.temperature,
                        default_max_subquestions=cfg.max_subquestions, vocab_size=vocab)
        # The checkpoint's content hash for /v1/models, so clients see a retrained model behind the same
        # URL; hashed beside the serving (GBs take seconds), awaited by the first /v1/models.
        hasher = ThreadPoolExecutor(1, thread_name_prefix="subq-fingerprint")
        fingerprint: Future[str | None] = hasher.submit(model_fingerprint, cfg.model)
        hasher.shutdown(wait=False)
        stats = EngineStats()
        # The engine detokenizes in its own thread with its own tokenizer copy; prompts use the Decoder's.
        batch = BatchDecoder(decoder.model, copy.deepcopy(decoder.tokenizer), heads=decoder.heads,
                             eos_ids=decoder.eos)
        metrics = ServerMetrics(limits.served_model, running=lambda: self.admission.running_requests,
                                waiting=lambda: self.admission.waiting,
                                running_rows=lambda: self.admission.running_rows)
        engine = Engine(batch, max_rows=cfg.max_batch_size, wait_s=cfg.batch_wait_timeout_s, stats=stats,
                        metrics=metrics)
        return {"cfg": cfg, "decoder": decoder, "max_new_tokens": max_new_tokens, "limits": limits,
                "created": int(time.time()), "fingerprint": fingerprint, "stats": stats, "metrics": metrics,
                "engine": engine, "placement": {"device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                                                "torch_threads": self.threads}}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # ------------------------------------------------------------------------------------ routes

    def check_health(self) -> None:
        check_engine(self.engine)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return health_response(self.engine, self.limits.served_model)

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
                             "prompt_format": self.decoder.prompt_format, "default_beta": self.decoder.default_beta,
                             "has_heads": self.decoder.heads is not None, "max_new_tokens": self.max_new_tokens})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return models_response(self.limits.served_model, self.created, await asyncio.wrap_future(self.fingerprint))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return model_response(model_id, self.limits.served_model, self.created,
                              await asyncio.wrap_future(self.fingerprint))

    @app.post("/decompose")
    async def decompose(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    # ----------------------------------------------------------------------------------- helpers

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        response = await self._answer(request, chat=chat)
        self.metrics.response(response.status_code)  # requests by status (429s included)
        return response

    async def _answer(self, request: Request, *, chat: bool) -> Response:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        name = self.limits.served_model
        try:
            raw = await read_body(request, MAX_BODY_BYTES)
            req = await asyncio.to_thread(self._parse, raw, chat)  # off the event loop: /health stays live
            prompt, params = await asyncio.to_thread(self._job, req)
            streaming = req.chat is not None and req.chat.stream
            async with self.admission.rows(params.n) as ticket:  # validated first: a bad request never queues
                stream = RequestStream(self.engine, prompt, params, stream=streaming, ticket=ticket)
                if streaming:
                    cut = req.max_subquestions
                    return await stream_chat(
                        stream, model=name, prompt_tokens=len(prompt), include_usage=req.chat.include_usage,
                        content=lambda: SubquestionContent(lambda t: self.decoder.subquestions(t, cut)),
                        on_complete=lambda tokens: self.stats.request(len(prompt), tokens))
                done = (await stream.result())[0]
        except ApiError as exc:
            return api_error(exc)
        except RequestError as exc:
            kind = "server_error" if exc.status >= 500 else "invalid_request_error"
            return JSONResponse(error_body(exc.message, type=kind), status_code=exc.status)
        except Exception:
            logger.exception("decomposition failed")
            return JSONResponse(error_body("the server failed to decompose the problem", type="server_error"),
                                status_code=500)
        subquestions = self.decoder.subquestions(done.text, req.max_subquestions)
        self.stats.request(len(prompt), done.generated_tokens)
        if chat:
            return JSONResponse(chat_response(model=name, subquestions=subquestions, prompt_tokens=len(prompt),
                                              completion_tokens=done.generated_tokens,
                                              finish_reason=done.finish_reason))
        return JSONResponse(decompose_response(model=name, subquestions=subquestions, raw=done.text,
                                               prompt_tokens=len(prompt), completion_tokens=done.generated_tokens,
                                               beta=params.beta, finish_reason=done.finish_reason))

    def _parse(self, raw: bytes, chat: bool) -> DecomposeRequest:
        body = decode_json(raw)
        return parse_decompose_chat(body, self.limits) if chat else parse_decompose_request(body, self.limits)

    def _job(self, req: DecomposeRequest) -> tuple[list[int], SamplingParams]:
        """A request's prompt ids and effective settings (checked against the model)."""
        beta = self.decoder.default_beta if req.beta is None else req.beta
        if beta > 0 and self.decoder.heads is None:
            raise ApiError(400, f"'beta' must be 0 here: {self.limits.served_model!r} has no ILQL heads",
                           param="beta")
        prompt = self.decoder.prompt_ids(req.problem, req.max_subquestions)
        room = self.decoder.context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context holds "
                                f"{self.decoder.context}: no room to generate", code="context_length_exceeded")
        params = req.sampling(min(req.max_tokens or self.max_new_tokens, room), beta)
        if self.decoder.student:  # the learner's targets end with the marker: a row stops as soon as it writes it
            params = replace(params, stop=(SUBQ_END, *params.stop))
        return prompt, params


# ------------------------------------------------------------------------------------ lifecycle


def build_decomposer_app(cfg: DecomposerConfig) -> serve.Application:
    """The Serve application for ``cfg`` (not yet running)."""
    scaling: dict[str, Any] = {"num_replicas": cfg.min_replicas}
    if cfg.max_replicas > cfg.min_replicas:
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": cfg.target_ongoing_requests}}
    return Decomposer.options(
        name=f"{cfg.app_name}-decomposer",
        # Far above the batch: Serve must not queue requests in its router, where /health would wait
        # behind generations; the replica's Admission bounds the work (serve/admission.py).
        max_ongoing_requests=max_ongoing_requests(cfg.max_batch_size, cfg.max_queued_requests),
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        **scaling,
    ).bind(cfg, read_token(cfg.token_env))


def start_decomposer(cfg: DecomposerConfig, *, timeout_s: float = 300.0) -> str:
    """Deploy ``cfg`` and return its base URL (``http://host:port<prefix>``, no ``/v1``) once healthy.

    Initialises Ray if the caller has not; joins Serve's proxy where it already runs (see
    ``serve.serving.deploy``).
    """
    return deploy(build_decomposer_app(cfg), app_name=cfg.app_name, host=cfg.host, port=cfg.port,
                  route_prefix=cfg.route_prefix, timeout_s=timeout_s)


def swap_decomposer(cfg: DecomposerConfig, model: str, served_model_name: str | None = None, *,
                    timeout_s: float = 300.0) -> str:
    """Serve ``model`` in the replica ``start_decomposer(cfg)`` runs, at the same URL: no new process, import or Serve
    deployment (an evaluation of several checkpoints pays one replica start, not one per checkpoint).
    ``served_model_name``: its name in requests and ``/v1/models`` (None: the model's default name). Every
    other setting stays ``cfg``'s; returns the served name once the new model answers. One replica only: a
    Serve handle reaches one replica (Serve's own in-place update, ``user_config``, restarts replicas of
    an app deployed from Python, whose code version is new on every ``serve.run``)."""
    if cfg.max_replicas != 1 or cfg.min_replicas != 1:
        raise ValueError("swap_decomposer needs an app of exactly one replica (min_replicas = max_replicas = 1)")
    target = replace(cfg, model=model, served_model_name=served_model_name)  # resolved path, default name
    handle = serve.get_app_handle(cfg.app_name)
    return handle.load_model.remote(target.model, target.served_model_name or "").result(timeout_s=timeout_s)


def stop_decomposer(cfg: DecomposerConfig) -> None:
    """Delete this app (other Serve apps and the proxy keep running)."""
    delete_app(cfg.app_name)


def run_decomposer_forever(cfg: DecomposerConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then delete the app (what ``subq serve`` runs)."""
    url = start_decomposer(cfg)
    auth = f", bearer token from ${cfg.token_env}" if cfg.token_env else ""
    serve_until_stopped(f"serving decomposer {cfg.served_model_name!r} at {url} (POST {url}/decompose, OpenAI "
                        f"base URL {url}/v1; Ctrl-C to stop{auth})", lambda: stop_decomposer(cfg),
                        health_url=f"{url}/health")
