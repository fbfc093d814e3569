"""Turn ``subq eval`` / pipeline decomposer and solver specs into running endpoints.

Decomposer specs: ``none`` (single-stage baseline), ``teacher`` or ``teacher:MODEL`` (the chat model
decomposes with the teacher prompt; same endpoint as the first solver unless given), a URL of a
running subq decomposer, ``openai:MODEL@BASE_URL`` (a student checkpoint behind any OpenAI-compatible
server, e.g. ``vllm serve runs/x/final``, prompted in its training format over ``/v1/completions``), or
anything ``serve/decomposer.py`` can load (a checkpoint dir, a HF dir, ``embedded:...``), which is
served on Ray Serve for the duration of the block. ``NAME=SPEC`` sets the row label. Solver specs:
``MODEL@BASE_URL``, ``local`` for the embedded model on our own server, or a checkpoint / model
directory (``embedded:...`` and ``tiny-random:...`` too), e.g. a distilled solver from ``subq train
--algo solver-bc``: it is served by our OpenAI-compatible LLM server (``serve/llm_server.py``) while
its column is evaluated, and gets the evaluation's normal solve prompts. ``NAME=SPEC`` sets the column.

Every decomposer and solver has an *identity* before anything is served (``decomposer_identity``,
``plan_solvers``): for a served directory it holds a content hash of its files, so records made with
another checkpoint, beta or length limit never mix with these (``evaluation.fingerprint``); a URL or
``openai:`` decomposer is asked what it serves (its ``/v1/models`` entry: ``evaluation.served_identity``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subq.actors.teacher import TeacherConfig
from subq.evaluation.clients import DecomposerSpec, SolverSpec

if TYPE_CHECKING:
    from subq.actors.prices import PriceTable
    from subq.evaluation.plan import RunKey
    from subq.evaluation.run import EvalConfig

_LABEL = re.compile(r"^(?P<label>[\w.+-]+)=(?P<spec>.+)$")
# A server of ours that is not running: not yet (a planned solver), or not at all (a checkpoint decomposer
# whose plans are all stored, so nothing calls it)
PLACEHOLDER_URL = "http://127.0.0.1/v1"


@dataclass
class ServeOptions:
    """How checkpoints are served during evaluation (see serve.decomposer.DecomposerConfig)."""

    port: int = 8000
    max_batch_size: int = 8
    max_queued_requests: int | None = None  # beyond the batch: 429 + Retry-After (None: unbounded)
    num_gpus: float = 0.0
    num_cpus: float = 0.5  # per replica; small so it fits beside the solver's server on a 2-core machine
    beta: float | None = None
    max_new_tokens: int = 128


def split_label(spec: str) -> tuple[str | None, str]:
    m = _LABEL.match(spec)
    if m and "/" not in m["label"] and ":" not in m["label"]:
        return m["label"], m["spec"]
    return None, spec


def default_label(spec: str) -> str:
    """runs/quick/bc/final -> "bc"; embedded:smollm2-135m-instruct -> "smollm2-135m-instruct"."""
    if spec.startswith(("embedded:", "tiny-random:")):
        return spec.split(":", 1)[1].split("?")[0]
    path = Path(spec.rstrip("/"))
    return path.parent.name if path.name == "final" and path.parent.name else path.name


def _model_at_url(body: str, what: str, example: str) -> tuple[str, str]:
    model, sep, url = body.rpartition("@")
    if not sep or not model or not url.startswith(("http://", "https://")):
        raise ValueError(f"{what} {body!r}: expected MODEL@BASE_URL (e.g. {example})")
    return model, url


def parse_openai_decomposer(spec: str) -> tuple[str, str]:
    """``openai:MODEL@BASE_URL`` -> (model, base_url)."""
    return _model_at_url(spec.removeprefix("openai:"), "decomposer spec openai:",
                         "openai:runs/x/final@http://127.0.0.1:8000/v1")


SOLVER_FORMS = ("MODEL@BASE_URL (e.g. gpt-4o-mini@https://api.openai.com/v1), 'local', or a checkpoint / model "
                "directory to serve (e.g. se=runs/se/final)")


def _is_api_solver(body: str) -> bool:
    return "@" in body and body.rpartition("@")[2].startswith(("http://", "https://"))


def _model_identity(spec: str, hash_cache: Path | None) -> str:
    """A served model as the fingerprint knows it: its files' content hash (a directory), else its spec."""
    from subq.learner.content_hash import model_fingerprint

    return model_fingerprint(spec, hash_cache) or spec


def parse_solver(spec: str, local: tuple[str, str] | None, api_key_env: str,
                 hash_cache: Path | None = None) -> SolverSpec:
    """``MODEL@BASE_URL``, ``local`` (needs ``local`` = (base_url, model) of our own server), or anything
    else: a checkpoint / model to serve, whose base_url is a placeholder until it runs
    (``check_solver_spec`` says whether it exists; ``served_solver`` serves it)."""
    label, body = split_label(spec)
    if body == "local":
        if local is None:
            raise ValueError("solver 'local' needs the local server")
        return SolverSpec(base_url=local[0], model=local[1], api_key_env=api_key_env, label=label)
    if not _is_api_solver(body):
        label = label or default_label(body)
        return SolverSpec(base_url=PLACEHOLDER_URL, model=f"served-{label}", api_key_env=api_key_env, label=label,
                          served=body, identity={"kind": "served", "model": _model_identity(body, hash_cache)})
    model, url = _model_at_url(body, "solver spec", "gpt-4o-mini@https://api.openai.com/v1")
    return SolverSpec(base_url=url, model=model, api_key_env=api_key_env, label=label)


def check_solver_spec(spec: str) -> None:
    """A solver spec that can work, checked without network: a served one must exist now."""
    _, body = split_label(spec)
    if body == "local" or _is_api_solver(body):
        parse_solver(spec, ("http://127.0.0.1/v1", "local"), "")
        return
    if "@" in body and not Path(body).expanduser().is_dir():
        _model_at_url(body, "solver spec", "gpt-4o-mini@https://api.openai.com/v1")  # a URL without http(s)://
    if not (body.startswith(("embedded:", "tiny-random:")) or Path(body).expanduser().is_dir()):
        raise ValueError(f"solver spec {spec!r}: expected {SOLVER_FORMS}; {body!r} is not a directory")


def _api_solver(solvers: list[SolverSpec]) -> SolverSpec:
    """The solver whose endpoint a ``teacher`` decomposer uses by default: the first one not served by us."""
    for sv in solvers:
        if sv.served is None:
            return sv
    raise ValueError("a 'teacher' decomposer uses the first API solver's endpoint, and every solver here is a "
                     "served checkpoint: add an API solver (MODEL@BASE_URL or 'local')")


def decomposer_label(raw: str, solvers: list[SolverSpec]) -> str:
    """The report row of a decomposer spec, known before anything is served."""
    label, spec = split_label(raw)
    if label:
        return label
    if spec == "none":
        return "none (CoT)"
    if spec == "teacher" or spec.startswith("teacher:"):
        return f"teacher ({spec.split(':', 1)[1] if ':' in spec else _api_solver(solvers).model})"
    if spec.startswith(("http://", "https://")):
        return spec.rstrip("/")
    if spec.startswith("openai:"):
        return default_label(parse_openai_decomposer(spec)[0])
    return default_label(spec)


def plan_solvers(specs: list[str], local_model: str, api_key_env: str,
                 hash_cache: Path | None = None) -> list[SolverSpec]:
    """Solver specs parsed before any server runs: right labels, models and identities, with a
    placeholder URL for ``local`` and served checkpoints (their servers start only when work remains)."""
    from subq.learner.models import model_display_name

    placeholder = (PLACEHOLDER_URL, model_display_name(local_model))
    return [parse_solver(s, placeholder, api_key_env, hash_cache) for s in specs]


def _needs_serving(spec: str) -> bool:
    return not (spec in ("none", "teacher") or spec.startswith(("teacher:", "openai:", "http://", "https://")))


def _client_spec(raw: str, solvers: list[SolverSpec], serve_opts: ServeOptions, *, token_env: str | None,
                 api_key_env: str, timeout_s: float, teacher_endpoint: tuple[str, str] | None) -> DecomposerSpec:
    """The DecomposerSpec of every spec that needs no server of ours (no I/O)."""
    label = decomposer_label(raw, solvers)
    _, spec = split_label(raw)
    if spec == "none":
        return DecomposerSpec("none", label)
    if spec == "teacher" or spec.startswith("teacher:"):
        first = _api_solver(solvers)
        model = spec.split(":", 1)[1] if ":" in spec else first.model
        base_url, key_env = teacher_endpoint or (first.base_url, first.api_key_env)
        teacher = TeacherConfig(base_url=base_url, model=model, api_key_env=key_env, timeout_s=timeout_s)
        return DecomposerSpec("teacher", label, teacher=teacher)
    if spec.startswith("openai:"):
        model, url = parse_openai_decomposer(spec)
        return DecomposerSpec("openai", label, url=url, model=model, token_env=token_env or api_key_env)
    return DecomposerSpec("url", label, url=spec.rstrip("/"), token_env=token_env, beta=serve_opts.beta)


def _served_identity(spec: str, opts: ServeOptions, hash_cache: Path | None) -> dict[str, Any]:
    """A served model: its files' content (a directory) or its registry name, and how it is served."""
    return {"kind": "served", "model": _model_identity(spec, hash_cache), "beta": opts.beta,
            "max_new_tokens": opts.max_new_tokens}


def decomposer_identity(raw: str, solvers: list[SolverSpec], serve_opts: ServeOptions,
                        hash_cache: Path | None = None, *, token_env: str | None = None,
                        api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 30.0) -> dict[str, Any]:
    """What the settings fingerprint calls a decomposer spec, before anything of ours is served.

    A URL or ``openai:`` decomposer is asked what it serves (``evaluation.served_identity``: its
    ``/v1/models`` entry, with the checkpoint's content hash where the server reports one), so another
    checkpoint behind the same address starts new records. ``token_env`` / ``api_key_env`` as in
    ``open_decomposer``.
    """
    from subq.evaluation.served_identity import served_model

    _, spec = split_label(raw)
    if _needs_serving(spec):
        return _served_identity(spec, serve_opts, hash_cache)
    client = _client_spec(raw, solvers, serve_opts, token_env=None, api_key_env="", timeout_s=0.0,
                          teacher_endpoint=None)
    if client.kind == "url":
        return {**client.identity, "served": served_model("url", client.url, None, token_env, timeout_s)}
    if client.kind == "openai":
        return {**client.identity, "served": served_model("openai", client.url, client.model,
                                                          token_env or api_key_env, timeout_s)}
    return client.identity


def hash_cache_file(cfg: EvalConfig) -> Path:
    """Where checkpoint content digests are cached (by path, size and mtime) for this output folder."""
    from subq.data_store.uri import resolve, stage_dir

    return stage_dir(resolve(cfg.out_dir)) / "records" / ".content_hashes.json"  # a URI's: a local cache


def plan_run_keys(cfg: EvalConfig, decomposers: list[str], solvers: list[SolverSpec],
                  serve_opts: ServeOptions, *, token_env: str | None = None,
                  api_key_env: str = "OPENAI_API_KEY") -> list[tuple[dict[str, Any], list[RunKey]]]:
    """Per decomposer spec, its identity and its run keys with every solver: known before any server of
    ours starts (URL and ``openai:`` decomposers are asked what they serve)."""
    from subq.evaluation.plan import run_keys

    out = []
    for raw in decomposers:
        identity = decomposer_identity(raw, solvers, serve_opts, hash_cache_file(cfg), token_env=token_env,
                                       api_key_env=api_key_env, timeout_s=cfg.timeout_s)
        out.append((identity, run_keys(cfg, decomposer_label(raw, solvers), identity, solvers)))
    return out


@contextmanager
def open_decomposer(raw: str, index: int, solvers: list[SolverSpec], serve_opts: ServeOptions, *,
                    token_env: str | None = None, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0,
                    teacher_endpoint: tuple[str, str] | None = None,
                    identity: dict[str, Any] | None = None, plans_stored: bool = False,
                    host: DecomposerHost | None = None) -> Iterator[DecomposerSpec]:
    """One decomposer, ready to call; a checkpoint or model is served until the block ends.

    One at a time on purpose: a 2-core machine cannot hold several model replicas at once.
    ``teacher_endpoint`` = (base_url, api_key_env) for ``teacher`` specs; default: the first solver's.
    ``openai:`` decomposers use the key in ``token_env``, else ``api_key_env`` (none needed on loopback).
    ``identity``: the spec's, from ``decomposer_identity`` (the records it writes are keyed by it; for a
    served spec computed here when not given). ``plans_stored``: the caller checked that every answer to do
    reuses a stored plan, so a checkpoint is not served at all (its replica would only load and idle).
    ``host``: a checkpoint is loaded into its replica (started once for several decomposers) instead of
    a replica of its own that stops with the block.
    """
    _, spec = split_label(raw)
    if not _needs_serving(spec):
        client = _client_spec(raw, solvers, serve_opts, token_env=token_env, api_key_env=api_key_env,
                              timeout_s=timeout_s, teacher_endpoint=teacher_endpoint)
        yield replace(client, identity=identity) if identity is not None else client
        return
    identity = identity or _served_identity(spec, serve_opts, None)
    if plans_stored:  # every answer of this pass reuses a stored plan: no call reaches the decomposer
        yield DecomposerSpec("url", decomposer_label(raw, solvers), url=PLACEHOLDER_URL, beta=serve_opts.beta,
                             identity=identity)
        return
    with host.serving(spec) if host is not None else _served(spec, index, serve_opts) as url:
        yield DecomposerSpec("url", decomposer_label(raw, solvers), url=url, beta=serve_opts.beta, identity=identity)


def _decomposer_config(spec: str, name: str, opts: ServeOptions):
    """The served decomposer of ``spec`` under app ``subq-<name>`` and route ``/<name>``, checked first: a
    wrong path and a replica no node can hold fail here, in one line, not inside a replica."""
    from subq.learner.checkpoint import is_checkpoint
    from subq.learner.models import resolve_model_path
    from subq.resources import require, serve_demand
    from subq.serve.decomposer import DecomposerConfig

    if not is_checkpoint(spec):
        resolve_model_path(spec)
    cfg = DecomposerConfig(model=spec, port=opts.port, route_prefix=f"/{name}", app_name=f"subq-{name}",
                           max_batch_size=opts.max_batch_size, max_queued_requests=opts.max_queued_requests,
                           num_gpus=opts.num_gpus, num_cpus=opts.num_cpus, max_new_tokens=opts.max_new_tokens)
    require([serve_demand(f"the decomposer replica for {spec}", cfg.num_cpus, cfg.num_gpus,
                          hint="without GPUs: serve.num_gpus=0 (subq eval: --num-gpus 0)")])
    return cfg


@contextmanager
def _served(spec: str, index: int, opts: ServeOptions) -> Iterator[str]:
    from subq.serve.decomposer import start_decomposer, stop_decomposer

    cfg = _decomposer_config(spec, f"decomposer-{index}", opts)
    url = start_decomposer(cfg)
    try:
        yield url
    finally:
        stop_decomposer(cfg)


class DecomposerHost:
    """One decomposer replica for every checkpoint an evaluation serves, one checkpoint at a time: the
    first starts it, each next one is loaded into it (``serve.decomposer.swap_decomposer``), so N
    checkpoints pay one process start, import and Serve deployment instead of N (~6 s each on a CPU).
    Leaving the ``with`` block deletes it. ``name``: its app ``subq-<name>`` and route ``/<name>``."""

    def __init__(self, opts: ServeOptions, name: str = "eval-decomposer") -> None:
        self.opts, self.name = opts, name
        self.cfg: Any = None  # the running app's DecomposerConfig
        self.url = ""

    def __enter__(self) -> DecomposerHost:
        return self

    def __exit__(self, *exc: object) -> None:
        from subq.serve.decomposer import stop_decomposer

        if self.cfg is not None:
            stop_decomposer(self.cfg)
            self.cfg = None

    @contextmanager
    def serving(self, spec: str) -> Iterator[str]:
        from subq.serve.decomposer import start_decomposer, swap_decomposer

        cfg = _decomposer_config(spec, self.name, self.opts)  # checked before a start or a swap
        if self.cfg is None:
            self.url, self.cfg = start_decomposer(cfg), cfg
        else:
            swap_decomposer(self.cfg, spec)
        yield self.url


@contextmanager
def served_solver(solver: SolverSpec, index: int, opts: ServeOptions) -> Iterator[SolverSpec]:
    """``solver`` with the URL of its checkpoint, served by our OpenAI-compatible LLM server until the
    block ends (the decomposer's machinery: the same Serve proxy, its own route and app)."""
    import os

    from subq.learner.models import resolve_model_path
    from subq.serve.llm_server import LLMServerConfig, start_llm_server, stop_llm_server

    resolve_model_path(solver.served)  # a wrong path fails here, in one line, not inside a replica
    # Solving is the stage's real work: decode on every core (as the local server does), reserve little.
    cfg = LLMServerConfig(model=solver.served, served_model_name=solver.model, port=opts.port,
                          route_prefix=f"/solver-{index}", app_name=f"subq-solver-{index}",
                          max_batch_size=opts.max_batch_size, max_queued_requests=opts.max_queued_requests,
                          num_gpus=opts.num_gpus, num_cpus=opts.num_cpus, torch_threads=os.cpu_count())
    from subq.resources import require, serve_demand

    require([serve_demand(f"the solver replica for {solver.served}", cfg.num_cpus, cfg.num_gpus,
                          hint="without GPUs: serve.num_gpus=0 (subq eval: --num-gpus 0)")])
    url = start_llm_server(cfg)
    try:
        yield replace(solver, base_url=url)
    finally:
        stop_llm_server(cfg)


def solver_groups(solvers: list[SolverSpec]) -> list[list[int]]:
    """Solver indices evaluated together: every API (and ``local``) solver at once, then each served
    checkpoint alone, so at most one served solver holds memory beside the served decomposer."""
    api = [i for i, sv in enumerate(solvers) if sv.served is None]
    return ([api] if api else []) + [[i] for i, sv in enumerate(solvers) if sv.served is not None]


def evaluate_decomposers(cfg: EvalConfig, decomposers: list[str], solver_specs: list[str], *, local_model: str,
                         local_port: int, api_key_env: str, prices: PriceTable, serve_opts: ServeOptions,
                         teacher_base_url: str | None = None, local_teacher_model: bool = False,
                         token_env: str | None = None, check_endpoints: bool = False) -> int:
    """Evaluate every decomposer that still has answers to do, one served at a time; returns the
    records added (what ``subq eval`` and the pipeline's eval stage run; Ray must be up).

    The local server (``local_model`` on ``local_port``) runs for the whole loop when a solver is
    ``local``, or when a ``teacher`` decomposer needs it (``local_teacher_model``: the teacher is that
    model). ``teacher`` decomposers call ``teacher_base_url``, else that local server, else the first
    API solver's endpoint. Every decomposer's API solvers answer first; then each served checkpoint
    solver is started once and answers for every decomposer, reusing the stored plans (a decomposition
    is paid once, and a checkpoint decomposer whose plans are all stored is not served again). Our own
    servers bill nothing. Raises a client's
    FatalEndpointError (bad key, no quota) after storing what finished.
    """
    from subq.actors.teacher import check_endpoint
    from subq.evaluation.plan import pending, unplanned
    from subq.evaluation.run import evaluate
    from subq.local_teacher import local_teacher

    wants_teacher = any(split_label(d)[1].split(":")[0] == "teacher" for d in decomposers)
    need_local = any(split_label(s)[1] == "local" for s in solver_specs) or (
        wants_teacher and local_teacher_model and not teacher_base_url)
    # Keys from the planned solvers: the URLs of our own servers are not part of any fingerprint.
    planned_solvers = plan_solvers(solver_specs, local_model, api_key_env, hash_cache_file(cfg))
    planned = plan_run_keys(cfg, decomposers, planned_solvers, serve_opts, token_env=token_env,
                            api_key_env=api_key_env)
    groups = solver_groups(planned_solvers)
    todo = []  # (index, spec, identity, keys, solver groups with answers to do): the rest is not even served
    for i, (raw, (identity, keys)) in enumerate(zip(decomposers, planned, strict=True)):
        busy = [g for g in groups if pending(cfg, [keys[j] for j in g])]
        if busy:
            todo.append((i, raw, identity, keys, busy))
    if not todo:
        return 0
    server = local_teacher(None, local_model, local_port) if need_local else nullcontext((None, None))
    added = 0
    with server as (url, served):
        solvers = [replace(sv, base_url=url) if split_label(raw)[1] == "local" else sv
                   for raw, sv in zip(solver_specs, planned_solvers, strict=True)]
        if check_endpoints:
            for sv in solvers:
                if sv.served is None:
                    check_endpoint(TeacherConfig(base_url=sv.base_url, model=sv.model, api_key_env=sv.api_key_env))
        for model in [served] + [sv.model for sv in solvers if sv.served is not None]:
            if model:
                prices = prices.with_price(model, 0.0, 0.0)
        teacher_url = teacher_base_url or (url if local_teacher_model else None)
        teacher = (teacher_url, api_key_env) if teacher_url else None
        def decomposer(i: int, raw: str, identity: dict[str, Any], host: DecomposerHost,
                       plans_stored: bool = False) -> Any:
            return open_decomposer(raw, i, solvers, serve_opts, token_env=token_env, api_key_env=api_key_env,
                                   teacher_endpoint=teacher, identity=identity, plans_stored=plans_stored,
                                   host=host)

        # one replica, each checkpoint loaded into it in turn; deleted before any solver replica starts
        with DecomposerHost(serve_opts) as host:
            for i, raw, identity, _, busy in todo:  # the API solvers first: this pass stores every plan
                api = [g for g in busy if solvers[g[0]].served is None]
                if api:
                    with decomposer(i, raw, identity, host) as spec:
                        added += sum(evaluate(cfg, spec, [solvers[j] for j in g], prices) for g in api)
        # Then each served solver once, for every decomposer: a decomposer whose plans are stored by now
        # is not served again (one replica start per checkpoint, not one per decomposer x solver).
        for s in sorted({g[0] for *_, busy in todo for g in busy if solvers[g[0]].served is not None}):
            users = [(i, raw, identity, keys) for i, raw, identity, keys, busy in todo if [s] in busy]
            with served_solver(solvers[s], s, serve_opts) as sv, DecomposerHost(serve_opts) as host:
                for i, raw, identity, keys in users:
                    with decomposer(i, raw, identity, host, plans_stored=not unplanned(cfg, [keys[s]])) as spec:
                        added += evaluate(cfg, spec, [sv], prices)
    return added
