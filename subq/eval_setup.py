"""Turn ``subq eval`` / pipeline decomposer and solver specs into running endpoints.

Decomposer specs: ``none`` (single-stage baseline), ``teacher`` or ``teacher:MODEL`` (the chat model
decomposes with the teacher prompt; same endpoint as the first solver unless given), a URL of a
running subq decomposer, or anything ``serve/decomposer.py`` can load (a checkpoint dir, a HF dir,
``embedded:...``), which is served on Ray Serve for the duration of the block. ``NAME=SPEC`` sets
the row label. Solver specs: ``MODEL@BASE_URL``, or ``local`` for the embedded model on our own server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from actors.teacher import TeacherConfig
from evaluation.clients import DecomposerSpec, SolverSpec

if TYPE_CHECKING:
    from actors.prices import PriceTable
    from evaluation.run import EvalConfig

_LABEL = re.compile(r"^(?P<label>[\w.+-]+)=(?P<spec>.+)$")


@dataclass
class ServeOptions:
    """How checkpoints are served during evaluation (see serve.decomposer.DecomposerConfig)."""

    port: int = 8000
    max_batch_size: int = 8
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


def parse_solver(spec: str, local: tuple[str, str] | None, api_key_env: str) -> SolverSpec:
    """``MODEL@BASE_URL`` or ``local`` (needs ``local`` = (base_url, model) of our own server)."""
    label, body = split_label(spec)
    if body == "local":
        if local is None:
            raise ValueError("solver 'local' needs the local server")
        return SolverSpec(base_url=local[0], model=local[1], api_key_env=api_key_env, label=label)
    model, sep, url = body.rpartition("@")
    if not sep or not model or not url.startswith(("http://", "https://")):
        raise ValueError(f"solver spec {spec!r}: expected MODEL@BASE_URL (e.g. gpt-4o-mini@https://api.openai.com/v1)"
                         " or 'local'")
    return SolverSpec(base_url=url, model=model, api_key_env=api_key_env, label=label)


def decomposer_label(raw: str, solvers: list[SolverSpec]) -> str:
    """The report row of a decomposer spec, known before anything is served."""
    label, spec = split_label(raw)
    if label:
        return label
    if spec == "none":
        return "none (CoT)"
    if spec == "teacher" or spec.startswith("teacher:"):
        return f"teacher ({spec.split(':', 1)[1] if ':' in spec else solvers[0].model})"
    if spec.startswith(("http://", "https://")):
        return spec.rstrip("/")
    return default_label(spec)


def plan_solvers(specs: list[str], local_model: str, api_key_env: str) -> list[SolverSpec]:
    """Solver specs parsed before any server runs: right labels and models, with a placeholder URL
    for ``local`` (its server starts only when work remains)."""
    from learner.models import model_display_name

    placeholder = ("http://127.0.0.1/v1", model_display_name(local_model))
    return [parse_solver(s, placeholder, api_key_env) for s in specs]


@contextmanager
def open_decomposer(raw: str, index: int, solvers: list[SolverSpec], serve_opts: ServeOptions, *,
                    token_env: str | None = None, timeout_s: float = 120.0,
                    teacher_endpoint: tuple[str, str] | None = None) -> Iterator[DecomposerSpec]:
    """One decomposer, ready to call; a checkpoint or model is served until the block ends.

    One at a time on purpose: a 2-core machine cannot hold several model replicas at once.
    ``teacher_endpoint`` = (base_url, api_key_env) for ``teacher`` specs; default: the first solver's.
    """
    label = decomposer_label(raw, solvers)
    _, spec = split_label(raw)
    if spec == "none":
        yield DecomposerSpec("none", label)
    elif spec == "teacher" or spec.startswith("teacher:"):
        first = solvers[0]
        model = spec.split(":", 1)[1] if ":" in spec else first.model
        base_url, key_env = teacher_endpoint or (first.base_url, first.api_key_env)
        teacher = TeacherConfig(base_url=base_url, model=model, api_key_env=key_env, timeout_s=timeout_s)
        yield DecomposerSpec("teacher", label, teacher=teacher)
    elif spec.startswith(("http://", "https://")):
        yield DecomposerSpec("url", label, url=spec.rstrip("/"), token_env=token_env, beta=serve_opts.beta)
    else:
        with _served(spec, index, serve_opts) as url:
            yield DecomposerSpec("url", label, url=url, beta=serve_opts.beta)


@contextmanager
def _served(spec: str, index: int, opts: ServeOptions) -> Iterator[str]:
    from learner.checkpoint import is_checkpoint
    from learner.models import resolve_model_path
    from serve.decomposer import DecomposerConfig, start_decomposer, stop_decomposer

    if not is_checkpoint(spec):
        resolve_model_path(spec)  # a wrong path fails here, in one line, not inside a replica
    cfg = DecomposerConfig(model=spec, port=opts.port, route_prefix=f"/decomposer-{index}",
                           app_name=f"subq-decomposer-{index}", max_batch_size=opts.max_batch_size,
                           num_gpus=opts.num_gpus, num_cpus=opts.num_cpus, max_new_tokens=opts.max_new_tokens)
    url = start_decomposer(cfg)
    try:
        yield url
    finally:
        stop_decomposer(cfg)


def evaluate_decomposers(cfg: EvalConfig, decomposers: list[str], solver_specs: list[str], *, local_model: str,
                         local_port: int, api_key_env: str, prices: PriceTable, serve_opts: ServeOptions,
                         teacher_base_url: str | None = None, local_teacher_model: bool = False,
                         token_env: str | None = None, check_endpoints: bool = False) -> int:
    """Evaluate every decomposer that still has answers missing, one served at a time; returns the
    answers added (what ``subq eval`` and the pipeline's eval stage run; Ray must be up).

    The local server (``local_model`` on ``local_port``) runs for the whole loop when a solver is
    ``local``, or when a ``teacher`` decomposer needs it (``local_teacher_model``: the teacher is that
    model). ``teacher`` decomposers call ``teacher_base_url``, else that local server, else the first
    solver's endpoint. Our own server bills nothing.
    """
    from actors.teacher import check_endpoint
    from evaluation.run import evaluate, pending
    from subq.local_teacher import local_teacher

    wants_teacher = any(split_label(d)[1].split(":")[0] == "teacher" for d in decomposers)
    need_local = any(split_label(s)[1] == "local" for s in solver_specs) or (
        wants_teacher and local_teacher_model and not teacher_base_url)
    server = local_teacher(None, local_model, local_port) if need_local else nullcontext((None, None))
    added = 0
    with server as (url, served):
        solvers = [parse_solver(s, (url, served) if served else None, api_key_env) for s in solver_specs]
        if check_endpoints:
            for sv in solvers:
                check_endpoint(TeacherConfig(base_url=sv.base_url, model=sv.model, api_key_env=sv.api_key_env))
        if served:
            prices = prices.with_price(served, 0.0, 0.0)
        teacher_url = teacher_base_url or (url if local_teacher_model else None)
        teacher = (teacher_url, api_key_env) if teacher_url else None
        labels = [sv.label for sv in solvers]
        for i, raw in enumerate(decomposers):
            if pending(cfg, decomposer_label(raw, solvers), labels) == 0:
                continue  # every answer is stored: do not even start its server
            with open_decomposer(raw, i, solvers, serve_opts, token_env=token_env, teacher_endpoint=teacher) as spec:
                added += evaluate(cfg, spec, solvers, prices)
    return added
