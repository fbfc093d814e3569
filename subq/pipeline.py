"""``subq pipeline``: collect -> import -> train (BC, filtered BC, ILQL, DPO) -> serve + evaluate -> report.

Every stage is skipped when its output already exists, so re-running the same command resumes a
killed run where it stopped (collection and evaluation also resume *inside* a stage, key by key).
A trained student is kept only while the data and settings it was trained on are unchanged: each
``train/<run>/final/`` records them (``TRAINED_ON``), and a run whose record no longer matches (more
samples collected after a budget stop, a changed train config, a retrained BC under filtered BC /
ILQL / DPO) is trained again from scratch. A collection that stops incomplete (budget, outage, failed
rows) stops the pipeline before training on partial data, unless ``train_on_incomplete`` is set.
Everything that can be checked without doing work is checked first: config keys and types, files,
dataset specs, model paths and endpoints; a mistake fails in one line before the first paid call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subq.actors.collect import CollectConfig, collect_todo, run_collect
from subq.actors.prices import PriceTable
from subq.actors.teacher import TeacherConfig, check_endpoint
from subq.config import (
    ConfigError,
    PipelineConfig,
    ServeSection,
    dump,
    run_algo,
    section_config,
    train_config,
)
from subq.data_store import uri
from subq.data_store.datasets import load_problems
from subq.data_store.fingerprint import store_fingerprint
from subq.data_store.schema import STATUS_API_ERROR, STATUS_PARTIAL
from subq.data_store.store import Store
from subq.eval_setup import (
    ServeOptions,
    check_solver_spec,
    decomposer_label,
    evaluate_decomposers,
    hash_cache_file,
    plan_run_keys,
    plan_solvers,
    split_label,
)
from subq.evaluation.clients import SolverSpec
from subq.evaluation.plan import RunKey, check_labels, failures, format_failures, pending
from subq.evaluation.run import EvalConfig, report
from subq.learner.models import model_display_name
from subq.learner.train import FROM_BC, SOLVERS, TrainConfig
from subq.local_teacher import local_teacher


@dataclass
class StageResult:
    stage: str
    status: str  # done | skipped (output exists) | off (not in this config)
    wall_s: float = 0.0
    note: str = ""


@dataclass
class PipelineResult:
    stages: list[StageResult] = field(default_factory=list)
    summaries: list[Any] = field(default_factory=list)  # evaluation.report.RunSummary
    out: str = ""
    eval_failures: int = 0  # evaluation records that failed at the API and are not final (re-run retries)
    incomplete: str = ""  # why collection is incomplete ("" = it is not): exit 1, and no training unless
    # train_on_incomplete


TRAINED_ON = "pipeline_trained_on.json"  # in final/: the data and settings fingerprints it was trained on


def collect_incomplete(report: Any) -> str:
    """Why a collection's data is partial ("" when it is not): stopped early, samples missing, or rows
    failed at the API. Truncated and unparsable replies are the teacher's answers: not partial."""
    failed = sum(report.not_ok.get(s, 0) for s in (STATUS_API_ERROR, STATUS_PARTIAL))
    if report.stopped == "budget":
        return "the budget is spent; raise collect.budget_usd and run the same command again"
    if report.stopped:
        return f"collection stopped ({report.stopped}); run the same command again later"
    if not report.complete:
        return (f"{report.samples_total}/{report.samples_expected} samples stored; "
                "run the same command again to finish")
    if failed:
        return f"{failed} samples failed at the API; run the same command again to retry them"
    return ""


class Pipeline:
    """One run of a PipelineConfig; each stage is a method, each checks whether it has work first."""

    def __init__(self, cfg: PipelineConfig, raw: dict[str, Any], *, progress: bool = True,
                 echo: Callable[[str], None] = print) -> None:
        self.cfg, self.raw, self.progress, self.echo = cfg, raw, progress, echo
        # A location string, never a Path (Path("s3://b/x") is a local folder "s3:"): a URI as given, a local
        # path absolute (Ray Train workers and Serve replicas do not run in this process's directory).
        try:
            self.out = uri.check(cfg.out)
        except uri.UriError as e:
            raise ConfigError(f"out: {e}") from None
        if "://" not in cfg.store_uri:
            cfg.store = str(Path(cfg.store_uri).expanduser().resolve())
        self.result = PipelineResult(out=uri.redact(self.out))  # shown to the user: no secrets from a query
        self.prices = PriceTable.from_json(cfg.teacher.price_table) if cfg.teacher.price_table else PriceTable()

    # ------------------------------------------------------------------ plan (no work, no Ray)

    def collect_config(self) -> CollectConfig | None:
        c = self.cfg.collect
        if "collect" not in self.cfg.stages or not c or not c.get("enabled", True):
            return None
        t = self.cfg.teacher
        teacher = TeacherConfig(base_url=t.base_url or "http://127.0.0.1", model=t.model or model_display_name(t.local_model),
                                api_key_env=t.api_key_env, timeout_s=t.timeout_s, max_attempts=t.max_attempts)
        return section_config(CollectConfig, c, "collect", "collect", store=self.cfg.store_uri, teacher=teacher,
                              prices=self.prices, progress=self.progress)

    def train_dir(self, name: str) -> str:
        return uri.join(self.out, "train", name)

    def final_dir(self, name: str) -> str:
        return uri.join(self.train_dir(name), "final")

    def algo(self, name: str) -> str:
        """The algorithm of the training run ``name`` (see ``TrainSection.algos``)."""
        return run_algo(self.cfg.train, name)

    def bc_run(self) -> str | None:
        """The first BC run: filtered BC, ILQL and DPO start from its checkpoint."""
        return next((n for n in self.cfg.train.algos if self.algo(n) == "bc"), None)

    def algo_train_config(self, name: str) -> TrainConfig:
        """Run ``name``'s TrainConfig; filtered BC, ILQL and DPO start from this pipeline's BC (paper 1;
        DPO's reference model) unless their own section names an ``init``."""
        bc = self.bc_run()
        init = self.final_dir(bc) if self.algo(name) in FROM_BC and bc else None
        tc = train_config(self.cfg.train, name, self.cfg.store_uri, str(self.train_dir(name)), init=init)
        # with rounds, round 1 trains on the teacher's rows only (later rounds' mixes: subq/rounds.py)
        return dataclasses.replace(tc, sample_rounds=[1]) if self.cfg.rounds > 1 else tc

    def data_fingerprint(self) -> str:
        """The data the students are trained on, as their records name it (with rounds: round 1's rows)."""
        if self.cfg.rounds > 1:
            from subq.rounds import mix_fingerprint

            return mix_fingerprint(self.cfg.store_uri, [1], None)
        return store_fingerprint(Store(self.cfg.store_uri))

    def eval_config(self) -> EvalConfig:
        return section_config(EvalConfig, self.cfg.eval.settings, "eval", "eval", out_dir=uri.join(self.out, "eval"),
                              progress=self.progress)

    def decomposer_specs(self) -> list[str]:
        e = self.cfg.eval
        if e.decomposers is not None:
            return list(e.decomposers)
        # the trained decomposers; a distilled solver (solver-bc) is not one
        specs = [f"{a}={self.final_dir(a)}" for a in self.cfg.train.algos
                 if "train" in self.cfg.stages and self.algo(a) not in SOLVERS]
        if e.teacher_decomposes:
            specs.append(f"teacher:{self.teacher_model()}")
        if e.baseline:
            specs.append("none")
        return specs

    def solver_specs(self) -> list[str]:
        """``eval.solvers``, then every solver this pipeline trains (served from its checkpoint)."""
        trained = [f"{a}={self.final_dir(a)}" for a in self.cfg.train.algos
                   if self.cfg.eval.trained_solvers and "train" in self.cfg.stages and self.algo(a) in SOLVERS]
        return list(self.cfg.eval.solvers) + trained

    def planned_solvers(self, ec: EvalConfig) -> list[SolverSpec]:
        """The solvers as evaluation.clients.SolverSpec, before any server runs."""
        t = self.cfg.teacher
        return plan_solvers(self.solver_specs(), t.local_model, t.api_key_env, hash_cache_file(ec))

    def teacher_model(self) -> str:
        return self.cfg.teacher.model or model_display_name(self.cfg.teacher.local_model)

    def preflight(self) -> None:
        """Fail before any work: datasets, model paths, endpoints the remaining work needs."""
        from subq.learner.checkpoint import is_checkpoint, training_disk_estimate
        from subq.learner.models import resolve_model_path
        from subq.learner.train import final_dtype

        cc = self.collect_config()
        if cc is not None:
            load_problems(cc.problems)
            if self.cfg.teacher.base_url and self._collect_todo(cc):
                check_endpoint(cc.teacher)
        if "import" in self.cfg.stages and self.cfg.imports.reference:
            load_problems(self.cfg.imports.reference)
        if "train" in self.cfg.stages:
            need: list[tuple[str, int]] = []
            model_dir = None
            for algo in self.cfg.train.algos:
                tc = train_config(self.cfg.train, algo, self.cfg.store_uri, str(self.train_dir(algo)))
                own_init = (self.algo(algo) not in FROM_BC or self.bc_run() is None
                            or "init" in (self.cfg.train.per_algo.get(algo) or {}))
                if own_init:  # otherwise it starts from BC's final/, a model of the same size
                    if is_checkpoint(tc.init):
                        model_dir = tc.init
                    elif Path(tc.init, "final").is_dir():
                        model_dir = str(Path(tc.init, "final"))
                    else:
                        model_dir = resolve_model_path(tc.init)  # a wrong path fails now, not after collection
                if model_dir and not uri.exists(self.final_dir(algo)):
                    per_weight = 1.0 if final_dtype(tc.final_dtype, tc.init).itemsize == 4 else 0.5
                    need.append((algo, *training_disk_estimate(model_dir, self.algo(algo), tc.keep_checkpoints,
                                                               per_weight)))
            self._check_disk(need)
        if "eval" in self.cfg.stages:
            try:
                for s in self.cfg.eval.solvers:  # the trained ones exist only once trained
                    check_solver_spec(s)
                solvers = self.planned_solvers(self.eval_config())
                # labels name the record folders: two runs must not share one
                check_labels([decomposer_label(d, solvers) for d in self.decomposer_specs()],
                             [s.label for s in solvers])
            except ValueError as e:
                raise ConfigError(f"eval: {e}") from None
        if "eval" in self.cfg.stages and self._eval_todo(self.eval_config()):
            for raw, sv in zip(self.solver_specs(), self.planned_solvers(self.eval_config()), strict=True):
                if split_label(raw)[1] != "local" and sv.served is None:
                    check_endpoint(TeacherConfig(base_url=sv.base_url, model=sv.model, api_key_env=sv.api_key_env))

    def _check_disk(self, need: list[tuple[str, int, int]]) -> None:
        """Checkpoints are GBs: a full disk should stop the run now, not halfway through training. Runs go
        one after the other: the need is what the earlier ones leave plus the largest peak."""
        if not need:
            return
        path = uri.stage_dir(self.out)  # at a URI, checkpoints and final/ are built in the local cache first
        while not path.exists():
            path = path.parent
        left = [0, *[after for _, _, after in need]]
        free = shutil.disk_usage(path).free
        total = max(sum(left[:i + 1]) + peak for i, (_, peak, _) in enumerate(need))
        if free < total:
            parts = ", ".join(f"{algo} {peak / 1e9:.1f} while it runs, {after / 1e9:.1f} after" for algo, peak, after
                              in need)
            raise ConfigError(f"not enough disk for the training checkpoints under {path if uri.is_uri(self.out) else self.out}: about "
                              f"{total / 1e9:.1f} GB needed ({parts}), {free / 1e9:.1f} GB free; free some "
                              "space or set `out` (--out) to a larger disk")

    def _collect_todo(self, cc: CollectConfig) -> int:
        return collect_todo(cc, load_problems(cc.problems))

    def _keys(self, ec: EvalConfig) -> list[RunKey]:
        """Every (decomposer, solver) run key with its settings fingerprint, known before any server."""
        planned = plan_run_keys(ec, self.decomposer_specs(), self.planned_solvers(ec), _serve_options(self.cfg.serve),
                                api_key_env=self.cfg.teacher.api_key_env)  # openai: decomposers' key, as in eval
        return [k for _, keys in planned for k in keys]

    def _eval_todo(self, ec: EvalConfig) -> int:
        return pending(ec, self._keys(ec))

    # ------------------------------------------------------------------------------ stages

    @contextmanager
    def _stage(self, name: str) -> Iterator[StageResult]:
        res = StageResult(name, "done")
        index = len(self.result.stages) + 1
        total = 4 + len(self.cfg.train.algos)
        self.echo(f"\n== [{index}/{total}] {name} ==")
        start = time.perf_counter()
        try:
            yield res
        except BaseException as e:
            res.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            res.note = res.note or type(e).__name__
            raise
        finally:
            res.wall_s = time.perf_counter() - start
            self.result.stages.append(res)
            self.echo(f"-- {name}: {res.status}{' (' + res.note + ')' if res.note else ''} in {res.wall_s:.0f} s")

    def _teacher_server(self) -> Any:
        t = self.cfg.teacher
        return local_teacher(t.base_url, t.local_model, t.local_port)

    def collect(self) -> None:
        with self._stage("collect") as res:
            cc = self.collect_config()
            if cc is None:
                res.status, res.note = "off", "no collect section"
                return
            todo = self._collect_todo(cc)
            if todo == 0:
                res.status, res.note = "skipped", "every sample is stored (none to retry)"
                return
            with self._teacher_server() as (base_url, served):
                teacher = dataclasses.replace(cc.teacher, base_url=base_url)
                prices = cc.prices.with_price(teacher.model, 0.0, 0.0) if served else cc.prices
                if served is None:
                    check_endpoint(teacher)
                report = run_collect(dataclasses.replace(cc, teacher=teacher, prices=prices))
            stages = report.stages
            failed = sum(s.failed for s in stages.values())
            cost = sum(s.cost_usd for s in stages.values())
            res.note = (f"{report.samples_total}/{report.samples_expected} samples, {failed} stage failures, "
                        f"${cost:.4f}")
            why = collect_incomplete(report)
            if why:
                res.status = "incomplete"
                res.note += f"; {why}"
                self.result.incomplete = f"collection incomplete: {why}"

    def imports(self) -> None:
        with self._stage("import") as res:
            imp = self.cfg.imports
            if "import" not in self.cfg.stages or not (imp.reference or imp.gsm8k_ai_subq):
                res.status, res.note = "off", "nothing to import"
                return
            store = Store(self.cfg.store_uri)
            notes = []
            if imp.reference:
                problems = load_problems(imp.reference)
                before = len(store.keys("problems"))
                store.append("problems", problems)  # unique keys: a re-run adds nothing
                notes.append(f"{imp.reference}: +{len(store.keys('problems', fresh=True)) - before} problems")
            if imp.gsm8k_ai_subq:
                from subq.data_store.gsm8k_ai_subq import import_gsm8k_ai_subq

                r = import_gsm8k_ai_subq(imp.gsm8k_ai_subq, store, teacher_model=imp.gsm8k_ai_subq_teacher,
                                         split=imp.gsm8k_ai_subq_split)
                notes.append(f"GSM8K-AI-SubQ: +{r.samples_added} samples")
            res.note = "; ".join(notes)

    def trained_on(self, name: str, data: str) -> dict[str, Any]:
        """What run ``name`` is (to be) trained on: the store's data, its TrainConfig, and the record id of
        the BC checkpoint it starts from (a retrained BC retrains its followers)."""
        tc = dataclasses.asdict(self.algo_train_config(name))
        tc.pop("progress", None)
        config = hashlib.sha256(json.dumps(tc, sort_keys=True, default=str).encode()).hexdigest()
        bc = self.bc_run()
        init = None
        if self.algo(name) in FROM_BC and bc and bc != name and "init" not in (self.cfg.train.per_algo.get(name) or {}):
            init = _read_record(self.final_dir(bc)).get("id")
        return {"data": data, "config": config, "init": init}

    def _stale(self, name: str, wanted: dict[str, Any]) -> str:
        """Why run ``name``'s final/ must be trained again ("" when it still matches)."""
        saved = _read_record(self.final_dir(name))
        if not saved:
            return "no record of the data it was trained on"
        changed = [what for key, what in (("data", "the store's data"), ("config", "the train settings"),
                                          ("init", "the BC checkpoint it starts from"))
                   if saved.get(key) != wanted[key]]
        return " and ".join(changed) + (" changed" if changed else "")

    def train(self) -> None:
        from subq.learner.checkpoint import is_checkpoint
        from subq.learner.train import run_train

        data = None
        if hasattr(getattr(self, "_lease", None), "release"):
            self._lease.release()  # the store is only read from here on: another run may write it
        for algo in self.cfg.train.algos if "train" in self.cfg.stages else []:
            with self._stage(f"train {algo}") as res:
                out, final = self.train_dir(algo), self.final_dir(algo)
                data = data or self.data_fingerprint()
                wanted = self.trained_on(algo, data)
                if is_checkpoint(final):
                    why = self._stale(algo, wanted)
                    if not why:
                        res.status, res.note = "skipped", f"{uri.redact(final)} was trained on this data"
                        continue
                    # never keep a student trained on other data: the run starts over (run_train would
                    # otherwise return the finished run, or resume Ray's checkpoints of the old data)
                    self.echo(f"{uri.redact(final)}: {why}; training it again")
                    uri.remove(out)
                    if uri.is_uri(out):  # and its local staging (the old data/) with it
                        shutil.rmtree(uri.stage_dir(out), ignore_errors=True)
                    res.note = f"retrained: {why}; "
                summary = run_train(dataclasses.replace(self.algo_train_config(algo), progress=self.progress))
                _write_record(final, {**wanted, "id": uuid.uuid4().hex})
                metrics = summary.get("metrics") or {}
                loss = next((v for k, v in metrics.items() if k.endswith("loss")), None)
                res.note += (f"{summary['step']} steps on {summary['episodes']} episodes"
                             + (f", loss {loss:.3f}" if loss is not None else ""))

    def evaluate(self) -> None:
        with self._stage("serve + eval") as res:
            if "eval" not in self.cfg.stages:
                res.status, res.note = "off", "not in stages"
                return
            ec = self.eval_config()
            specs = self.decomposer_specs()
            self._fidelity(ec, specs)
            if self._eval_todo(ec) == 0:
                res.status, res.note = "skipped", "every answer is stored"
                return
            t = self.cfg.teacher
            added = evaluate_decomposers(ec, specs, self.solver_specs(), local_model=t.local_model,
                                         local_port=t.local_port, api_key_env=t.api_key_env, prices=self.prices,
                                         serve_opts=_serve_options(self.cfg.serve), teacher_base_url=t.base_url,
                                         local_teacher_model=True)
            failed = sum(failures(ec, self._keys(ec)).values())
            res.note = f"{added} answers" + (f", {failed} failed at the API (re-run to retry)" if failed else "")

    def _fidelity(self, ec: EvalConfig, specs: list[str]) -> None:
        """The held-out NLL of every decomposer with weights here: checkpoints in the student format, a
        teacher that is the local model (the zero-shot base model) in the teacher's prompt format."""
        from subq.evaluation.fidelity_report import update_fidelity
        from subq.learner.checkpoint import is_checkpoint
        from subq.learner.train import cpu_bf16_on

        if not ec.fidelity_problems:
            return
        t = self.cfg.teacher
        solvers = self.planned_solvers(ec)
        scored = []
        for raw in specs:
            spec = split_label(raw)[1]
            if spec.startswith("teacher") and t.local_model and not t.base_url:
                scored.append((decomposer_label(raw, solvers), t.local_model, "chat"))
            elif is_checkpoint(spec):
                scored.append((decomposer_label(raw, solvers), spec, "student"))
        update_fidelity(ec.out_dir, ec.fidelity_problems, scored, echo=self.echo,
                        bf16=cpu_bf16_on(ec.fidelity_cpu_bf16))

    def report(self) -> None:
        from subq.evaluation.report import format_table

        with self._stage("report") as res:
            if "eval" not in self.cfg.stages and "report" not in self.cfg.stages:
                res.status = "off"
                return
            ec = self.eval_config()
            keys = self._keys(ec)
            self.result.summaries = report(ec, keys)
            res.note = uri.redact(uri.join(ec.out_dir, "results.md"))
            if self.result.summaries:
                self.echo(format_table(self.result.summaries))
            failed = failures(ec, keys)
            self.result.eval_failures = sum(failed.values())
            if failed:
                self.echo(format_failures(failed, ec.retry_failed))

    def run(self) -> PipelineResult:
        if self.cfg.rounds != 1:
            from subq.rounds import check_rounds

            check_rounds(self.cfg)
        if self._writes_store():  # a store another run writes: refused at once, before any check or write
            from subq.data_store.lease import refuse_if_held

            refuse_if_held(Store(self.cfg.store_uri))
        self.preflight()  # the cheap checks next: a run refused by them writes nothing, not even the store
        with self._store_lease():  # taken before Ray starts: a second writer of the store is refused at once
            return self._run()

    def _store_lease(self) -> Any:
        """The store's lease while the pipeline may write it (collect, import); ``train`` hands it back
        early, as training and evaluation only read the store."""
        self._lease = Store(self.cfg.store_uri).lock("subq pipeline") if self._writes_store() else nullcontext()
        return self._lease

    def _writes_store(self) -> bool:
        imp = self.cfg.imports
        return self.collect_config() is not None or (
            "import" in self.cfg.stages and bool(imp.reference or imp.gsm8k_ai_subq))

    def _run(self) -> PipelineResult:
        from subq.runtime import init_ray

        if not uri.is_uri(self.out):
            Path(self.out).mkdir(parents=True, exist_ok=True)
        uri.write_text(uri.join(self.out, "pipeline_config.yaml"), dump(dataclasses.asdict(self.cfg)))
        init_ray(self.cfg.ray_address)
        from subq.preflight import pipeline_demands
        from subq.resources import require

        require(pipeline_demands(self), echo=self.echo)  # a resource no node has fails now, not silently later
        for step in (self.collect, self.imports, self.train, self.evaluate, self.report):
            if self.result.incomplete and not self.cfg.train_on_incomplete:
                break  # nothing is trained (or evaluated) on partial data
            step()
        if self.cfg.rounds > 1 and not (self.result.incomplete and not self.cfg.train_on_incomplete):
            from subq.rounds import run_rounds

            run_rounds(self)  # rounds 2..K: the student decomposes, the teacher judges, the students retrain
        uri.write_text(uri.join(self.out, "pipeline_summary.json"), json.dumps(
            [dataclasses.asdict(s) for s in self.result.stages], indent=2))
        return self.result


def _read_record(final: str) -> dict[str, Any]:
    try:
        return json.loads(uri.read_text(uri.join(final, TRAINED_ON)))
    except (OSError, ValueError):
        return {}


def _write_record(final: str, record: dict[str, Any]) -> None:
    uri.write_text(uri.join(final, TRAINED_ON), json.dumps(record, indent=2))  # whole: a PUT, or a rename


def _serve_options(s: ServeSection) -> ServeOptions:
    return ServeOptions(port=s.port, max_batch_size=s.max_batch_size, num_gpus=s.num_gpus, num_cpus=s.num_cpus,
                        beta=s.beta, max_new_tokens=s.max_new_tokens, max_queued_requests=s.max_queued_requests)


def format_stages(result: PipelineResult) -> str:
    rows = [("stage", "status", "wall", "note")] + [
        (s.stage, s.status, f"{s.wall_s:.0f} s", s.note) for s in result.stages]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)
