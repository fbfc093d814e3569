"""Pipeline configs: YAML files composed onto each stage's own dataclass config.

A config has one section per stage; each section's keys are exactly the fields of that stage's
dataclass (``CollectConfig``, ``TrainConfig``, ``EvalConfig``, ...), minus the few the pipeline
wires itself (store paths, endpoints). Unknown keys and wrong types fail at load time, naming the
key, before any work starts. ``--set section.key=value`` overrides any value (YAML syntax).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from subq.actors.collect import CollectConfig
from subq.data_store import uri
from subq.evaluation.run import EvalConfig
from subq.learner.train import ALGOS, TrainConfig
from subq.learner.train import check_config as check_train_config

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A config mistake; the message names the file and key."""


@dataclass
class TeacherSection:
    base_url: str | None = None  # OpenAI-compatible root; None: serve local_model on 127.0.0.1:local_port
    model: str | None = None  # model name at base_url (required with base_url)
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key (the key never enters a config)
    local_model: str = EMBEDDED_MODEL  # served as teacher and as solver "local" when no base_url
    local_port: int = 8011
    timeout_s: float = 120.0  # per attempt (as `subq collect --timeout` and `subq eval --timeout`)
    max_attempts: int = 6
    price_table: str | None = None  # JSON price table file (default: the built-in versioned table)


@dataclass
class ImportSection:
    reference: str | None = None  # e.g. gsm8k:train: problems with human (socratic) sub-questions, for source=reference
    gsm8k_ai_subq: str | None = None  # a GSM8K-AI-SubQ file (paper 1's published teacher data) into `samples`
    gsm8k_ai_subq_split: str = "train"  # the GSM8K split that file's problems come from
    gsm8k_ai_subq_teacher: str = "gpt-3.5-turbo"  # the teacher model its samples are stored under


@dataclass
class TrainSection:
    # Training runs, in this order. A run named after an algorithm runs it; any other name is a named
    # run whose section says which (`se-a: {algo: solver-bc, ...}`): two runs of one algorithm with
    # other settings. Each run writes <out>/train/<name>/.
    algos: list[str] = field(default_factory=lambda: ["bc", "filtered-bc", "ilql"])
    defaults: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every run
    per_algo: dict[str, dict[str, Any]] = field(default_factory=dict)  # {run name: TrainConfig fields (+ algo)}


@dataclass
class ServeSection:
    port: int = 8011  # the Serve HTTP proxy (shared with the local teacher/solver server)
    max_batch_size: int = 8
    max_queued_requests: int | None = None  # per replica, beyond the batch: 429 + Retry-After (None: unbounded,
    #                                         the pipeline's own clients retry; see serve/admission.py)
    num_cpus: float = 0.5
    num_gpus: float = 0.0  # > 0: decomposer replicas on GPU
    beta: float | None = None  # ILQL guidance; None: each checkpoint's own
    max_new_tokens: int = 128


@dataclass
class EvalSection:
    decomposers: list[str] | None = None  # None: every trained algorithm + the baseline (+ teacher, below)
    solvers: list[str] = field(default_factory=lambda: ["local"])  # MODEL@BASE_URL or local
    baseline: bool = True  # the single-stage (CoT) solver alone
    teacher_decomposes: bool = False  # also the teacher's own decompositions (paper 1's last column)
    trained_solvers: bool = True  # also every solver trained in this run (solver-bc), as columns after `solvers`
    settings: dict[str, Any] = field(default_factory=dict)  # EvalConfig fields (benchmarks, scorer, ...)


@dataclass
class PipelineConfig:
    name: str = "subq"
    out: str = "runs/subq"  # every stage's outputs go under here
    store: str | None = None  # default: <out>/store; any pyarrow URI (s3://...) on a cluster
    ray_address: str | None = None  # default: $RAY_ADDRESS (set by `ray job submit`) or a local Ray
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # a subset skips the others
    # Collection stopped early (budget, outage) or left failed rows: train on what is stored anyway.
    # False: the pipeline stops after collect with exit 1 (raise the budget or wait, then re-run).
    train_on_incomplete: bool = False
    # Iterated distillation (subq/rounds.py, docs/rounds.md): rounds > 1 lets each round's student decompose the
    # training problems, the teacher judge them, and the students retrain on the result.
    rounds: int = 1  # 1: the plain pipeline
    rounds_student: str = "bc"  # the train run whose student decomposes in the next round
    rounds_mix: str = "latest"  # what round r trains on: latest (its rows) | all (every round) | teacher+correct
    rounds_samples_per_problem: int | None = None  # the student's decompositions per problem (None: collect's)
    rounds_temperature: float | None = None  # its sampling temperature (None: collect.decompose_temperature)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    collect: dict[str, Any] = field(default_factory=dict)  # CollectConfig fields; {} or enabled: false skips
    imports: ImportSection = field(default_factory=ImportSection)
    train: TrainSection = field(default_factory=TrainSection)
    serve: ServeSection = field(default_factory=ServeSection)
    eval: EvalSection = field(default_factory=EvalSection)

    @property
    def store_uri(self) -> str:
        return self.store or uri.join(str(self.out), "store")  # not Path: out may be a URI


STAGES = ("collect", "import", "train", "eval", "report")
# Fields the pipeline sets itself, so a config may not.
_WIRED = {"collect": {"store", "teacher", "prices", "progress"},
          "train": {"algo", "store", "out", "progress"},
          "eval": {"out_dir", "progress"}}


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce: int -> float) ``value`` against a type hint."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type):
        if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def build(cls: type, values: dict[str, Any] | None, where: str, *, exclude: set[str] = frozenset(),
          extra: dict[str, type] | None = None) -> Any:
    """``cls(**values)`` after checking every key and type; nested dataclass fields recurse."""
    values = dict(values or {})
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = set(values) - names - set(extra or {})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names | set(extra or {}))}")
    kwargs = {}
    for key, value in values.items():
        if extra and key in extra:
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[key] = build(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_type(value, tp, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def section_config(cls: type, values: dict[str, Any], where: str, stage: str, **wired: Any) -> Any:
    """A stage's dataclass from its config section plus the fields the pipeline wires in."""
    obj = build(cls, values, where, exclude=_WIRED[stage], extra={"enabled": bool})
    return dataclasses.replace(obj, **wired) if wired else obj


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` (YAML value) into the raw mapping; creates intermediate mappings."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.defaults.max_steps=10), got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: not a YAML value: {e}") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_config(path: str | None, overrides: list[str] | None = None) -> tuple[PipelineConfig, dict[str, Any]]:
    """Parse, override and validate; returns the config and the resolved raw mapping (to save)."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    where = path or "config"
    top = {k: v for k, v in raw.items() if k not in ("train", "import", "eval")}
    if "import" in raw:
        top["imports"] = raw["import"]
    cfg: PipelineConfig = build(PipelineConfig, top, where, exclude={"train", "eval"})
    cfg.train = _train_section(raw.get("train") or {}, f"{where}: train")
    cfg.eval = _eval_section(raw.get("eval") or {}, f"{where}: eval")
    validate(cfg, where)
    return cfg, raw


_RUN_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def run_algo(section: TrainSection, name: str) -> str:
    """The algorithm a training run runs: its section's ``algo``, else its name."""
    return str((section.per_algo.get(name) or {}).get("algo", name))


def _train_section(raw: dict[str, Any], where: str) -> TrainSection:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    algos = _check_type(raw.get("algos", TrainSection().algos), list[str], f"{where}.algos")
    if len(set(algos)) != len(algos):
        raise ConfigError(f"{where}.algos: run names must be distinct (each writes train/<name>/): {algos}")
    per_algo = {k: v for k, v in raw.items() if k not in ("algos", "defaults")}
    for name, values in per_algo.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping, got {type(values).__name__} {values!r}")
    # a section with `algo:` defines a named run, also while it is left out of algos
    unknown = {k for k, v in per_algo.items() if k not in ALGOS and k not in algos and "algo" not in v}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: algos, defaults, {', '.join(ALGOS)} "
                          "and named runs (a section with `algo:`)")
    for name in algos:
        algo = (per_algo.get(name) or {}).get("algo")
        if name in ALGOS:
            if algo not in (None, name):
                raise ConfigError(f"{where}.{name}.algo: a run named after an algorithm runs it ({name!r}, not "
                                  f"{algo!r}); give the run another name")
        elif not _RUN_NAME.match(name):
            raise ConfigError(f"{where}.algos: run name {name!r} must be letters, digits, '.', '_' or '-'")
        elif algo is None:
            raise ConfigError(f"{where}.algos: {name!r} is not an algorithm ({', '.join(ALGOS)}); a named run "
                              f"needs a section saying which, e.g. {name}: {{algo: solver-bc}}")
        elif algo not in ALGOS:
            raise ConfigError(f"{where}.{name}.algo: unknown algorithm {algo!r}; choose from {list(ALGOS)}")
    section = TrainSection(algos=algos, defaults=raw.get("defaults") or {}, per_algo=per_algo)
    for a in algos:  # every run's merged settings must build a valid TrainConfig now
        try:
            check_train_config(train_config(section, a, "/tmp/x", "/tmp/x", where))
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}.{a}: {e}") from None
    return section


def _eval_section(raw: dict[str, Any], where: str) -> EvalSection:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    own = {f.name for f in dataclasses.fields(EvalSection)} - {"settings"}
    section = build(EvalSection, {k: v for k, v in raw.items() if k in own}, where)
    section.settings = {k: v for k, v in raw.items() if k not in own}
    build(EvalConfig, section.settings, where, exclude=_WIRED["eval"])
    return section


def train_config(section: TrainSection, name: str, store: str, out: str, where: str = "train",
                 init: str | None = None) -> TrainConfig:
    """TrainConfig for one run: defaults, then the run's own keys, then the wiring."""
    own = {k: v for k, v in (section.per_algo.get(name) or {}).items() if k != "algo"}
    values = {**section.defaults, **own}
    if init is not None and "init" not in own:
        values["init"] = init
    cfg = build(TrainConfig, values, f"{where}.{name}", exclude=_WIRED["train"])
    return dataclasses.replace(cfg, algo=run_algo(section, name), store=store, out=out)


def validate(cfg: PipelineConfig, where: str) -> None:
    """Cross-field checks that need no network: files exist, required pairs are given."""
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"{where}.stages: unknown stage {stage!r}; stages: {list(STAGES)}")
    if cfg.teacher.base_url and not cfg.teacher.model:
        raise ConfigError(f"{where}: teacher.model is required with teacher.base_url")
    for key, path in (("teacher.price_table", cfg.teacher.price_table), ("import.gsm8k_ai_subq",
                                                                            cfg.imports.gsm8k_ai_subq)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{where}: {key}: file not found: {path}")
    if cfg.collect:
        section_config(CollectConfig, cfg.collect, f"{where}: collect", "collect")


def dump(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)
