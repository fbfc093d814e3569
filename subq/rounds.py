"""Iterated distillation: the student decomposes the training problems, the teacher judges, the student retrains.

Both papers distil once. Here round 1 is the ordinary pipeline (the teacher decomposes, the students
train); each round r > 1 then

1. serves round r-1's chosen student (``rounds_student``, default BC) on Ray Serve;
2. collects its decompositions of the training problems into the same store (``actors.student``):
   the teacher answers and judges them exactly as its own and pays only for that; the rows carry the
   student's content fingerprint (``policy``, in their key) and ``round = r``;
3. retrains every configured algorithm from round r-1's student on ``rounds_mix``: ``latest`` (round
   r's rows only), ``all`` (every round, the teacher's included) or ``teacher+correct`` (the teacher's
   rows plus the students' rows whose answer was correct), into ``OUT/round-r/train/<run>``;
4. evaluates them (``OUT/round-r/eval``) and adds a row to ``OUT/rounds/rounds.{json,md,png}``.

Round 1 keeps the pipeline's layout (``OUT/train``, ``OUT/eval``) and trains on the teacher's rows
only once rounds are on. Every step resumes (collection key by key, training by its record), and the
collection budget is one, over the store's ledger, across all rounds. See docs/rounds.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from subq.actors.student import StudentEndpoint
from subq.data_store import uri
from subq.eval_setup import ServeOptions, open_decomposer, parse_openai_decomposer

MIXES = ("latest", "all", "teacher+correct")


def policy_of(spec: str, opts: ServeOptions | None = None) -> str:
    """The ``policy`` tag of a student spec: a served directory's content hash (``sha256:...``), a
    registry name as given; beta joins it when set (it changes what the student writes)."""
    from subq.learner.content_hash import model_fingerprint

    policy = model_fingerprint(uri.local_copy(spec) if uri.is_uri(spec) else spec) or spec  # content, not its URI
    beta = opts.beta if opts is not None else None
    return policy if beta is None else f"{policy}?beta={beta}"


@contextmanager
def student_decomposer(spec: str, opts: ServeOptions, *, api_key_env: str = "OPENAI_API_KEY",
                       timeout_s: float = 120.0, index: int = 0) -> Iterator[tuple[StudentEndpoint, str]]:
    """(endpoint, policy) of a collection decomposer spec, ready to call until the block ends.

    ``openai:MODEL@BASE_URL``: a student behind any OpenAI-compatible server, prompted in its training
    format over ``/completions`` (its policy: what ``/models`` says it serves, hashed). Anything else
    ``subq eval`` serves (a checkpoint directory, ``embedded:`` / ``tiny-random:``) is served on Ray
    Serve for the block and asked over its chat route (its policy: the directory's content hash).
    """
    if spec.startswith("openai:"):
        from subq.eval_setup import decomposer_identity
        from subq.evaluation.fingerprint import fingerprint

        model, url = parse_openai_decomposer(spec)
        identity = decomposer_identity(spec, [], opts, api_key_env=api_key_env)
        yield (StudentEndpoint(base_url=url, model=model, api="completions", api_key_env=api_key_env,
                               timeout_s=timeout_s), f"openai:{fingerprint(identity)}")
        return
    if spec.startswith(("http://", "https://", "teacher", "none")):
        raise ValueError(f"--decomposer {spec!r}: expected a checkpoint / model to serve or openai:MODEL@BASE_URL "
                         "(the teacher decomposes when --decomposer is left out)")
    from subq.serve.decomposer import served_name

    policy = policy_of(spec, opts)
    with open_decomposer(spec, index, [], opts, identity={"kind": "served", "model": policy}) as served:
        yield (StudentEndpoint(base_url=f"{served.url.rstrip('/')}/v1", model=served_name(spec), api="chat",
                               timeout_s=timeout_s, max_tokens=opts.max_new_tokens), policy)


def check_decomposer_spec(spec: str) -> None:
    """Fails in one line (ValueError) for a spec that cannot be a collection decomposer; no network."""
    from pathlib import Path

    if spec.startswith("openai:"):
        parse_openai_decomposer(spec)
        return
    if spec.startswith(("http://", "https://", "teacher", "none")):
        raise ValueError(f"--decomposer {spec!r}: expected a checkpoint / model to serve or openai:MODEL@BASE_URL")
    if not (spec.startswith(("embedded:", "tiny-random:")) or Path(spec).expanduser().is_dir()):
        raise ValueError(f"--decomposer {spec!r}: not a directory (a checkpoint or model to serve), nor "
                         "openai:MODEL@BASE_URL")


# ------------------------------------------------------------------------------------------ the mix


def mix(cfg: Any, r: int) -> tuple[list[int], int | None]:
    """(sample rounds, correct_from_round) that round ``r``'s students train on (``rounds_mix``)."""
    if r == 1:
        return [1], None
    if cfg.rounds_mix == "latest":
        return [r], None
    if cfg.rounds_mix == "all":
        return list(range(1, r + 1)), None
    return list(range(1, r + 1)), 2  # teacher+correct: the teacher's rows, the students' correct ones


def check_rounds(cfg: Any) -> None:
    """The rounds settings, checked before any work (ConfigError in one line)."""
    from subq.config import ConfigError, run_algo

    if cfg.rounds < 1:
        raise ConfigError(f"rounds: must be >= 1, got {cfg.rounds}")
    if cfg.rounds == 1:
        return
    if cfg.rounds_mix not in MIXES:
        raise ConfigError(f"rounds_mix: {cfg.rounds_mix!r} is not one of {', '.join(MIXES)}")
    if cfg.rounds_student not in cfg.train.algos or run_algo(cfg.train, cfg.rounds_student) == "solver-bc":
        raise ConfigError(f"rounds_student: {cfg.rounds_student!r} is not a decomposer this pipeline trains "
                          f"(train.algos: {', '.join(cfg.train.algos)})")
    own = {**(cfg.train.defaults or {}), **(cfg.train.per_algo.get(cfg.rounds_student) or {})}
    if own.get("source", "samples") != "samples":
        raise ConfigError(f"rounds_student: {cfg.rounds_student!r} trains on source {own['source']!r}: the rounds "
                          "feed it the students' samples, so it needs source: samples")
    if not cfg.collect or not cfg.collect.get("enabled", True) or "train" not in cfg.stages:
        raise ConfigError("rounds > 1 needs the collect section and the train stage (the students collect and retrain)")


def mix_fingerprint(store_uri: str, rounds: list[int], correct_from_round: int | None, extra: str = "") -> str:
    """A digest of the rows in a mix (their keys and attempts): what a round's students record as their data."""
    import hashlib

    from subq.data_store.store import Store
    from subq.learner.data import selected

    store = Store(store_uri)
    store.refresh()
    rows = store.read_table("samples", columns=["sample_key", "attempt", "round", "correct"]).to_pylist()
    h = hashlib.sha256(f"{rounds}|{correct_from_round}|{extra}\n".encode())
    for row in sorted((r for r in rows if selected(r, rounds, correct_from_round)), key=lambda r: r["sample_key"]):
        h.update(f"{row['sample_key']}\t{row['attempt'] or 0}\n".encode())
    h.update(f"problems\t{len(store.keys('problems', fresh=True))}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ a round


def student_dir(base: Any, r: int) -> str:
    """The chosen student of round ``r`` (round 1: the pipeline's own ``OUT/train/<run>/final``); a location
    (``base.out`` may be a URI: data_store/uri.py)."""
    out = base.out if r == 1 else uri.join(base.out, f"round-{r}")
    return uri.join(out, "train", base.cfg.rounds_student, "final")


def round_pipeline(base: Any, r: int) -> Any:
    """Round ``r`` > 1 of ``base`` (a ``subq.pipeline.Pipeline``): the same stages under ``OUT/round-r``, the
    student collecting instead of the teacher, every run retrained from round r-1's student on the mix."""
    from subq.learner.train import FROM_BC
    from subq.pipeline import Pipeline, _read_record, _serve_options

    class RoundPipeline(Pipeline):
        round = r

        def algo_train_config(self, name: str):
            tc = super().algo_train_config(name)
            rounds, correct_from = mix(self.cfg, r)
            init = tc.init if self.algo(name) in FROM_BC and self.bc_run() else str(student_dir(base, r - 1))
            return dataclasses.replace(tc, init=init, sample_rounds=rounds, correct_from_round=correct_from)

        def data_fingerprint(self) -> str:
            rounds, correct_from = mix(self.cfg, r)
            previous = _read_record(student_dir(base, r - 1)).get("id", "")  # a retrained student retrains this round
            return mix_fingerprint(self.cfg.store_uri, rounds, correct_from, extra=previous)

        def decomposer_specs(self) -> list[str]:  # the teacher and the baseline were evaluated in round 1
            return [s for s in super().decomposer_specs() if not s.startswith(("teacher", "none"))]

        def collect(self) -> None:
            with self._stage(f"collect (round {r}: {self.cfg.rounds_student} of round {r - 1} decomposes)") as res:
                cc = self.round_collect_config()
                todo = collect_todo(cc, load_problems(cc.problems))
                if todo == 0:
                    res.status, res.note = "skipped", "every sample of the student is stored"
                    return
                with Store(self.cfg.store_uri).lock(f"subq pipeline round {r}"), self._teacher_server() as (url, served):
                    teacher = dataclasses.replace(cc.teacher, base_url=url)
                    prices = cc.prices.with_price(teacher.model, 0.0, 0.0) if served else cc.prices
                    if served is None:
                        check_endpoint(teacher)
                    with student_decomposer(str(student_dir(base, r - 1)), _serve_options(self.cfg.serve),
                                            timeout_s=self.cfg.teacher.timeout_s, index=100 + r) as (student, _):
                        report = run_collect(dataclasses.replace(cc, teacher=teacher, prices=prices,
                                                                 decomposer=student))
                res.note = f"{report.samples_total}/{report.samples_expected} samples, ${report.cost_usd or 0:.4f}"
                why = collect_incomplete(report)
                if why:
                    res.status, res.note = "incomplete", f"{res.note}; {why}"
                    self.result.incomplete = f"round {r} collection incomplete: {why}"

        def round_collect_config(self):
            cc = self.collect_config()
            c = self.cfg
            return dataclasses.replace(
                cc, samples_per_problem=c.rounds_samples_per_problem or cc.samples_per_problem,
                decompose_temperature=(cc.decompose_temperature if c.rounds_temperature is None
                                       else c.rounds_temperature),
                policy=policy_of(str(student_dir(base, r - 1)), _serve_options(c.serve)), round=r)

        def imports(self) -> None:  # round 1 imported what there is to import
            return

    from subq.actors.collect import collect_todo, run_collect
    from subq.actors.teacher import check_endpoint
    from subq.data_store.datasets import load_problems
    from subq.data_store.store import Store
    from subq.pipeline import collect_incomplete

    cfg = dataclasses.replace(base.cfg, out=uri.join(base.out, f"round-{r}"), store=base.cfg.store_uri)
    pipe = RoundPipeline(cfg, base.raw, progress=base.progress, echo=base.echo)
    pipe.prices = base.prices
    return pipe


def run_rounds(base: Any) -> list[dict[str, Any]]:
    """Rounds 2..K after ``base`` ran round 1; returns the per-round figures (also written under OUT/rounds)."""
    from subq.rounds_report import round_figures, teacher_decompositions, write_rounds

    teacher = teacher_decompositions(base, base.result.summaries)  # every round is compared with round 1's teacher
    figures = [round_figures(base, 1, base.result.summaries, teacher)]
    for r in range(2, base.cfg.rounds + 1):
        base.echo(f"\n==== round {r} of {base.cfg.rounds} ====")
        pipe = round_pipeline(base, r)
        for step in (pipe.collect, pipe.train, pipe.evaluate, pipe.report):
            if pipe.result.incomplete and not base.cfg.train_on_incomplete:
                break
            step()
        base.result.stages += [dataclasses.replace(s, stage=f"round {r}: {s.stage}") for s in pipe.result.stages]
        if pipe.result.incomplete:
            base.result.incomplete = pipe.result.incomplete
            if not base.cfg.train_on_incomplete:
                break
        figures.append(round_figures(pipe, r, pipe.result.summaries, teacher))
    write_rounds(uri.join(base.out, "rounds"), figures, base.echo)
    return figures
