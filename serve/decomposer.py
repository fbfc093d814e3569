"""The decomposer deployment: a student checkpoint (or any causal LM) that splits problems into sub-questions.

Routes (under ``route_prefix``), wire format in ``serve/decompose_api.py``:

- ``POST /decompose`` ``{"problem": ..., "max_subquestions"?, "beta"?, "temperature"?, "top_p"?,
  "max_tokens"?}`` -> ``{"subquestions": [...], "raw", "model", "usage", "beta", "finish_reason"}``;
- ``POST /v1/chat/completions``: OpenAI-compatible; the last user message is the problem and the reply's
  content is "Q1: ..." lines (``protocol.prompts.format_subquestions``), so a solver pipeline written for
  the teacher can call the student unchanged;
- ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /stats`` (batching counters), ``GET /health``
  (open; every other route needs the bearer token when ``token_env`` is set).

Prompt formats: ``student`` is what the learner trains (``learner.episodes.encode_prompt``: "Problem:
...\\nSub-questions:\\n", continued by question lines and the ``<end>`` marker; a row stops as soon as
it has written ``<end>``); ``chat`` is the zero-shot teacher prompt (``protocol.prompts.decompose_messages``
through the model's chat template, parsed by ``protocol.parse.parse_subquestions``). ``auto`` picks
student for a subq checkpoint, chat for anything else.

A checkpoint with ILQL heads decodes with ``log pi + beta * (Q - V)`` (``learner.guided_decoding``);
beta defaults to the checkpoint's ILQL ``beta`` and can be set per request (0 = the plain LM).
Concurrent requests are grouped by ``@serve.batch`` and decoded together in one left-padded batch,
each row with its own beta, temperature and length; finished rows leave the batch (and the KV cache).

Usage::

    cfg = DecomposerConfig(model="runs/ilql/final", port=8001)
    url = start_decomposer(cfg)                  # "http://127.0.0.1:8001"
    httpx.post(f"{url}/decompose", json={"problem": "..."}).json()["subquestions"]
    stop_decomposer(cfg)
"""

# No `from __future__ import annotations`: FastAPI must see real `Request` annotations (see llm_server).
import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from learner.models import model_display_name
from serve.chat_api import ApiError, error_body
from serve.decompose_api import (
    MAX_BODY_BYTES,
    DecomposeRequest,
    Limits,
    chat_response,
    decode_json,
    decompose_response,
    parse_decompose_chat,
    parse_decompose_request,
)
from serve.decomposer_model import Decoded, Decoder, Job
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

PROMPT_FORMATS = ("auto", "student", "chat")


@dataclass
class DecomposerConfig:
    """One served decomposer; fields are plain values so YAML can fill them."""

    model: str = "embedded:smollm2-135m-instruct"  # a learner checkpoint dir, a HF dir, embedded:..., tiny-random:...
    served_model_name: str | None = None  # the "model" clients send; default: the checkpoint dir's name / spec name
    prompt_format: str = "auto"  # student (the learner's "Problem:/Sub-questions:" format) | chat (zero-shot
    #                              decompose_messages through the chat template) | auto: student for a subq
    #                              checkpoint, chat otherwise
    beta: float | None = None  # default ILQL guidance; None: the checkpoint's ILQL beta (0 without heads)
    temperature: float = 0.0  # default decoding temperature (0 = greedy); requests may override
    max_new_tokens: int = 128  # cap on a request's max_tokens, and its default
    max_subquestions: int | None = None  # default cap on the sub-questions returned (None: all parsed)
    max_problem_chars: int = 4000  # longer problems are refused with a 400
    host: str = "127.0.0.1"  # loopback unless you mean to expose it (Serve-wide: one HTTP proxy per cluster)
    port: int = 8000  # Serve-wide too: if Serve already runs, its port wins
    route_prefix: str = "/"  # distinct per app when several share the Serve proxy
    app_name: str = "subq-decomposer"  # the Serve application's name (stop_decomposer deletes it)
    max_batch_size: int = 8  # requests decoded together
    batch_wait_timeout_s: float = 0.05  # how long a lone request waits for company
    min_replicas: int = 1  # with max_replicas > min_replicas, Serve autoscales between the two
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0  # autoscaling target per replica (only when autoscaling)
    num_cpus: float = 1.0  # Ray CPUs reserved per replica
    num_gpus: float = 0.0  # > 0: the model runs on cuda (bf16 where supported)
    torch_threads: int | None = None  # intra-op threads per replica; default: all cores of the node
    token_env: str | None = None  # NAME of an env var holding a bearer token; None: no auth

    def __post_init__(self) -> None:
        if not self.served_model_name:
            self.served_model_name = model_display_name(self.model)
        local = Path(self.model).expanduser()
        if local.exists():  # replicas need not share the driver's working directory
            self.model = str(local.resolve())
        if not self.route_prefix.startswith("/"):
            self.route_prefix = "/" + self.route_prefix
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if min(self.max_batch_size, self.max_new_tokens, self.max_problem_chars, self.max_replicas) < 1:
            raise ValueError("max_batch_size, max_new_tokens, max_problem_chars and max_replicas must be >= 1")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.beta is not None and not 0 <= self.beta <= 100:
            raise ValueError(f"beta must be between 0 and 100, got {self.beta}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if self.max_subquestions is not None and self.max_subquestions < 1:
            raise ValueError("max_subquestions must be >= 1 (or None)")


app = FastAPI(title="subq decomposer", docs_url=None, redoc_url=None, openapi_url=None)
app.add_exception_handler(StarletteHTTPException, http_error)  # unknown routes: OpenAI's error shape too


@serve.deployment
@serve.ingress(app)
class Decomposer:
    """One replica: a :class:`Decoder` and a batch queue."""

    def __init__(self, cfg: DecomposerConfig, token: Secret | None) -> None:
        import torch

        init_replica_torch(cfg.torch_threads)
        self.cfg = cfg
        self.token = token
        device, dtype = "cpu", None
        if cfg.num_gpus > 0:
            device = "cuda"
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        self.decoder = Decoder.load(cfg.model, prompt_format=cfg.prompt_format, beta=cfg.beta, device=device,
                                    dtype=dtype)
        self.limits = Limits(served_model=cfg.served_model_name or "", max_problem_chars=cfg.max_problem_chars,
                             max_new_tokens=cfg.max_new_tokens, default_temperature=cfg.temperature,
                             default_max_subquestions=cfg.max_subquestions)
        self.created = int(time.time())
        self.stats = ReplicaStats()
        self._decode.set_max_batch_size(cfg.max_batch_size)
        self._decode.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # ------------------------------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self.cfg.served_model_name or ""}

    @app.get("/stats")
    async def get_stats(self, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return JSONResponse({**self.stats, "max_batch_size": self.cfg.max_batch_size,
                             "prompt_format": self.decoder.prompt_format, "default_beta": self.decoder.default_beta,
                             "has_heads": self.decoder.heads is not None})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return models_response(self.limits.served_model, self.created)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        return model_response(model_id, self.limits.served_model, self.created)

    @app.post("/decompose")
    async def decompose(self, request: Request) -> JSONResponse:
        return await self._serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        return await self._serve(request, chat=True)

    # ----------------------------------------------------------------------------------- helpers

    async def _serve(self, request: Request, *, chat: bool) -> JSONResponse:
        if (denied := check_auth(self.token, request)) is not None:
            return denied
        try:
            body = decode_json(await read_body(request, MAX_BODY_BYTES))
            req = parse_decompose_chat(body, self.limits) if chat else parse_decompose_request(body, self.limits)
            job = self._job(req)
            decoded = await self._decode(job)
        except ApiError as exc:
            return api_error(exc)
        except Exception:
            logger.exception("decomposition failed")
            return JSONResponse(error_body("the server failed to decompose the problem", type="server_error"),
                                status_code=500)
        subquestions = self.decoder.subquestions(decoded.text, req.max_subquestions)
        self.stats.request(len(job.prompt), decoded.generated_tokens)
        name = self.limits.served_model
        if chat:
            return JSONResponse(chat_response(model=name, subquestions=subquestions, prompt_tokens=len(job.prompt),
                                              completion_tokens=decoded.generated_tokens,
                                              finish_reason=decoded.finish_reason))
        return JSONResponse(decompose_response(model=name, subquestions=subquestions, raw=decoded.text,
                                               prompt_tokens=len(job.prompt),
                                               completion_tokens=decoded.generated_tokens, beta=job.beta,
                                               finish_reason=decoded.finish_reason))

    def _job(self, req: DecomposeRequest) -> Job:
        """The decoding job for a request: its prompt ids and effective settings (checked against the model)."""
        beta = self.decoder.default_beta if req.beta is None else req.beta
        if beta > 0 and self.decoder.heads is None:
            raise ApiError(400, f"'beta' must be 0 here: {self.limits.served_model!r} has no ILQL heads",
                           param="beta")
        prompt = self.decoder.prompt_ids(req.problem, req.max_subquestions)
        room = self.decoder.context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context holds "
                                f"{self.decoder.context}", code="context_length_exceeded")
        max_tokens = min(req.max_tokens or self.cfg.max_new_tokens, room)
        return Job(prompt=prompt, beta=beta, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                   stop=req.stop)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _decode(self, jobs: list[Job]) -> list[Decoded]:
        """One batch, decoded in a worker thread so health checks and queueing stay responsive."""
        start = time.perf_counter()
        out = await asyncio.to_thread(self.decoder.decode, jobs)
        self.stats.batch(len(jobs), len(jobs), out.forward_passes, time.perf_counter() - start)
        return out.decoded


# ------------------------------------------------------------------------------------ lifecycle


def build_decomposer_app(cfg: DecomposerConfig) -> serve.Application:
    """The Serve application for ``cfg`` (not yet running)."""
    scaling: dict[str, Any] = {"num_replicas": cfg.min_replicas}
    if cfg.max_replicas > cfg.min_replicas:
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": cfg.target_ongoing_requests}}
    return Decomposer.options(
        name=f"{cfg.app_name}-decomposer",
        # >= max_batch_size, or Serve never hands a replica enough requests to fill a batch
        # (DESIGN §4); twice that lets the next batch queue while one decodes.
        max_ongoing_requests=2 * cfg.max_batch_size,
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


def stop_decomposer(cfg: DecomposerConfig) -> None:
    """Delete this app (other Serve apps and the proxy keep running)."""
    delete_app(cfg.app_name)


def run_decomposer_forever(cfg: DecomposerConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then delete the app (what ``subq serve`` runs)."""
    url = start_decomposer(cfg)
    auth = f", bearer token from ${cfg.token_env}" if cfg.token_env else ""
    serve_until_stopped(f"serving decomposer {cfg.served_model_name!r} at {url} (POST {url}/decompose, OpenAI "
                        f"base URL {url}/v1; Ctrl-C to stop{auth})", lambda: stop_decomposer(cfg))
