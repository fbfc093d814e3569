"""The ``subq`` command line.

Every command validates its inputs (dataset spec, files, endpoint) before any work starts and
reports a user mistake as one line ``subq: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from subq.runtime import configure_env

configure_env()

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def _json_object(text: str) -> dict:
    """argparse type: a JSON object of numbers (Ray resources)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError('expected a JSON object of numbers, e.g. {"collect_node": 0.01}')
    return value


def _add_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="query a teacher for decompositions, answers and feedback")
    p.add_argument("--problems", default="gsm8k:train[:8]", help="dataset spec, e.g. gsm8k:train[:100]")
    p.add_argument("--store", default=".subq/store", help="store root: a path or a pyarrow URI (s3://...)")
    p.add_argument("--teacher-base-url", help="OpenAI-compatible base URL; omitted: serve the embedded model locally")
    p.add_argument("--teacher-model", help="model name at the endpoint (default: the embedded model)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="name of the env var holding the API key")
    p.add_argument("--samples-per-problem", type=int, default=3)
    p.add_argument("--feedback-samples", type=int, default=3)
    p.add_argument("--max-subquestions", type=int)
    p.add_argument("--temperature", type=float, default=0.7, help="decomposition and feedback temperature")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--requests-per-minute", type=float)
    p.add_argument("--tokens-per-minute", type=float)
    p.add_argument("--budget-usd", type=float, help="stop starting new calls once this much is spent")
    p.add_argument("--price-table", help='JSON {"version": ..., "prices": {"model": [usd_in_per_1M, usd_out_per_1M]}}')
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt")
    p.add_argument("--max-attempts", type=int, default=6)
    p.add_argument("--min-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actor-num-cpus", type=float, default=0.25, help="CPUs each collection actor reserves")
    p.add_argument("--actor-resources", type=_json_object, default={}, metavar="JSON",
                   help='custom Ray resources per actor, e.g. \'{"collect_node": 0.01}\' to pin actors to such nodes')
    p.add_argument("--local-model", default=EMBEDDED_MODEL, help="model served when no base URL is given")
    p.add_argument("--local-port", type=int, default=8011)
    p.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_collect)


def cmd_collect(args: argparse.Namespace) -> int:
    from actors.collect import CollectConfig, run_collect
    from actors.prices import PriceTable
    from actors.teacher import TeacherConfig, check_endpoint
    from data_store.datasets import load_problems
    from subq.local_teacher import local_teacher
    from subq.runtime import init_ray

    for name in ("samples_per_problem", "feedback_samples", "max_attempts", "batch_size", "min_actors"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_actors < args.min_actors:
        raise UserError("--max-actors must be >= --min-actors")
    problems = load_problems(args.problems)  # a bad spec fails here, before anything is written
    prices = PriceTable.from_json(args.price_table) if args.price_table else PriceTable()
    init_ray(args.ray_address)
    with local_teacher(args.teacher_base_url, args.local_model, args.local_port) as (base_url, served):
        model = args.teacher_model or served
        if model is None:
            raise UserError("--teacher-model is required with --teacher-base-url")
        if served is not None:
            prices = prices.with_price(model, 0.0, 0.0)  # our own local server costs nothing per token
        teacher = TeacherConfig(base_url=base_url, model=model, api_key_env=args.api_key_env,
                                timeout_s=args.timeout, max_attempts=args.max_attempts)
        check_endpoint(teacher)
        cfg = CollectConfig(
            problems=args.problems, store=args.store, teacher=teacher,
            samples_per_problem=args.samples_per_problem, feedback_samples=args.feedback_samples,
            max_subquestions=args.max_subquestions, decompose_temperature=args.temperature,
            feedback_temperature=args.temperature, max_tokens=args.max_tokens,
            requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
            budget_usd=args.budget_usd, prices=prices, min_actors=args.min_actors,
            max_actors=args.max_actors, batch_size=args.batch_size, progress=not args.no_progress,
            actor_num_cpus=args.actor_num_cpus, actor_resources=args.actor_resources,
        )
        report = run_collect(cfg, problems)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_collect_report(report, args.store))
    return 0


def format_collect_report(report, store: str) -> str:
    lines = [f"collected into {store}: {report.problems} problems, "
             f"{report.samples_total}/{report.samples_expected} samples complete"]
    lines.append(f"{'stage':<10}{'todo':>6}{'stored':>8}{'failed':>8}{'$':>10}")
    for name, s in report.stages.items():
        cost = "?" if s.cost_unknown else f"{s.cost_usd:.4f}"
        lines.append(f"{name:<10}{s.todo:>6}{s.written:>8}{s.failed:>8}{cost:>10}")
    total = report.cost_usd
    lines.append(f"total $: {'unknown (model not in the price table)' if total is None else f'{total:.4f}'}")
    if not report.complete:
        lines.append("incomplete (budget reached or interrupted): run the same command again to resume")
    return "\n".join(lines)


def _add_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect a store")
    ssub = p.add_subparsers(dest="store_cmd", required=True)
    s = ssub.add_parser("stats", help="counts per table, status, teacher, tokens and $")
    s.add_argument("--store", default=".subq/store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_store_stats)


def cmd_store_stats(args: argparse.Namespace) -> int:
    from data_store.store import Store

    stats = Store(args.store).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"store {stats['root']}")
    for table, n in stats["tables"].items():
        print(f"  {table:<18}{n:>8} rows")
    for teacher, t in stats["teachers"].items():
        status = ", ".join(f"{k}={v}" for k, v in sorted(t["status"].items()))
        cost = f"${t['cost_usd']:.4f}" + (f" (+{t['cost_unknown']} unpriced)" if t["cost_unknown"] else "")
        print(f"  teacher {teacher}: {t['samples']} samples ({status}), correct={t['correct']}, "
              f"tokens in/out={t['tokens_in']}/{t['tokens_out']}, {cost}")
    return 0


def _add_import_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import published decompositions (GSM8K-AI-SubQ) into a store")
    p.add_argument("path", help="a GSM8K-AI-SubQ file: raw (JSON Lines) or converted (JSON array)")
    p.add_argument("--store", default=".subq/store")
    p.add_argument("--format", choices=["auto", "raw", "converted"], default="auto")
    p.add_argument("--teacher-model", default="gpt-3.5-turbo")
    p.add_argument("--split", default="test", help="the GSM8K split the file's problems come from")
    p.set_defaults(func=cmd_import)
    e = sub.add_parser("export", help="export samples to the GSM8K-AI-SubQ converted format")
    e.add_argument("path")
    e.add_argument("--store", default=".subq/store")
    e.add_argument("--teacher-model")
    e.add_argument("--all", action="store_true", help="include samples with errors")
    e.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    import os

    from data_store.gsm8k_ai_subq import import_gsm8k_ai_subq
    from data_store.store import Store

    if not os.path.exists(args.path):
        raise UserError(f"no such file: {args.path}")
    r = import_gsm8k_ai_subq(args.path, Store(args.store), fmt=args.format,
                             teacher_model=args.teacher_model, split=args.split)
    print(f"imported {args.path}: problems +{r.problems_added}, samples +{r.samples_added} "
          f"({r.samples_skipped_existing} already stored, {r.parse_errors} parse errors)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from data_store.gsm8k_ai_subq import export_gsm8k_ai_subq
    from data_store.store import Store

    n = export_gsm8k_ai_subq(Store(args.store), args.path, teacher_model=args.teacher_model,
                             only_ok=not args.all)
    print(f"exported {n} samples to {args.path}")
    return 0


def _add_llm_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm-server", help="serve a local HF causal LM behind an OpenAI-compatible API")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="embedded:..., tiny-random:<arch>, or a HF model dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--token-env", help="name of an env var holding a bearer token to require")
    p.add_argument("--ray-address")
    p.set_defaults(func=cmd_llm_server)


def cmd_llm_server(args: argparse.Namespace) -> int:
    from serve.llm_server import LLMServerConfig, run_forever
    from subq.runtime import init_ray

    init_ray(args.ray_address)
    run_forever(LLMServerConfig(model=args.model, host=args.host, port=args.port,
                                max_batch_size=args.max_batch_size, token_env=args.token_env))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from learner.train import ALGOS, TrainConfig
    from protocol.solve_prompts import SOLVER_TARGETS

    p = sub.add_parser("train", help="fit the student decomposer (BC, filtered BC, ILQL, DPO) or a distilled solver "
                                     "(solver-bc) on Ray Train")
    p.add_argument("--algo", choices=ALGOS, default="bc")
    p.add_argument("--target", choices=SOLVER_TARGETS,
                   help="solver-bc: end the answers with the teacher's final answer (SE-T) or the gold one (SE-A)")
    p.add_argument("--init", default=EMBEDDED_MODEL,
                   help="model spec, HF dir, or a checkpoint (filtered BC / ILQL / DPO: BC's)")
    p.add_argument("--store", default=".subq/store")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--source", choices=["samples", "reference"], default="samples",
                   help="teacher samples, or the GSM8K socratic reference decompositions in the store")
    p.add_argument("--teacher-model", help="train only on this teacher's samples")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on GPU")
    p.add_argument("--batch-size", type=int, default=8, help="episodes per worker per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--report-every", type=int, default=10)
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction,
                   help="share of the problems held out for validation (0: none)")
    p.add_argument("--val-every", type=int, default=TrainConfig.val_every, help="steps between validations")
    p.add_argument("--early-stopping-patience", type=int, default=TrainConfig.early_stopping_patience,
                   help="stop after this many validations without a new best (0: off)")
    p.add_argument("--early-stopping-metric", default=TrainConfig.early_stopping_metric)
    p.add_argument("--wandb-project")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm setting, e.g. --set lr=1e-5 --set fraction=0.3 --set beta=2 (JSON values)")
    p.add_argument("--ray-address")
    p.set_defaults(func=cmd_train)


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from learner.train import SOLVERS, TrainConfig, check_config, run_train
    from subq.runtime import init_ray

    algo_config = _parse_sets(args.set)
    if args.target is not None:
        if args.algo not in SOLVERS:
            raise UserError(f"--target is for --algo {'/'.join(SOLVERS)}, not {args.algo}")
        algo_config["target"] = args.target
    cfg = TrainConfig(
        algo=args.algo, init=args.init, store=args.store, out=args.out, source=args.source,
        teacher_model=args.teacher_model, num_workers=args.num_workers, use_gpu=args.use_gpu,
        bf16=not args.no_bf16, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_steps=args.max_steps, epochs=args.epochs, max_length=args.max_length, seed=args.seed,
        checkpoint_every=args.checkpoint_every, report_every=args.report_every, lora_r=args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing, val_fraction=args.val_fraction,
        val_every=args.val_every, early_stopping_patience=args.early_stopping_patience,
        early_stopping_metric=args.early_stopping_metric,
        wandb_project=args.wandb_project, algo_config=algo_config,
    )
    try:
        check_config(cfg)  # a bad setting is one line, before Ray starts
    except ValueError as e:
        raise UserError(str(e)) from None
    init_ray(args.ray_address)
    summary = run_train(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from subq.cli_eval import add_eval, add_pipeline, add_rescore, add_serve

    for add in (add_pipeline, _add_collect, _add_store, _add_import_export, _add_llm_server, _add_train, add_serve,
                add_eval, add_rescore):
        add(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from actors.teacher import TeacherUnreachable
    from data_store.datasets import DatasetError
    from data_store.store import StoreError
    from learner.models import ModelError

    return (UserError, TeacherUnreachable, DatasetError, StoreError, ModelError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    from subq.cli_eval import rewrite_argv

    args = build_parser().parse_args(rewrite_argv(list(sys.argv[1:] if argv is None else argv)))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("subq: interrupted; finished batches are stored, run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()) or (isinstance(e, ValueError) and str(e).startswith("no API key")):
            print(f"subq: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
