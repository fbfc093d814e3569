"""The ``subq`` command line.

Every command validates its inputs (dataset spec, files, endpoint) before any work starts and
reports a user mistake as one line ``subq: error: ...`` with exit status 2. One flag name per
concept across commands and one exit-code table (``subq.exit_codes``): see docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from subq import exit_codes
from subq.runtime import configure_env

configure_env()

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
TIMEOUT_S = 120.0  # seconds per attempt of a call to a teacher, decomposer or solver (collect and eval alike)


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def alias(p: argparse.ArgumentParser, *names: str, dest: str, **kwargs: object) -> None:
    """Old spellings of an option: still accepted, hidden from --help (docs/cli.md lists them).
    SUPPRESS as default: the documented option's default stays the one the namespace gets."""
    p.add_argument(*names, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def existing_store(path: str):
    """The store at ``path`` for a command that reads one: a path that does not exist is a typo, not
    an empty store (a read must not report zero rows and succeed)."""
    import pyarrow.fs as pafs

    from subq.data_store.store import Store

    store = Store(path)
    try:
        missing = store.fs.get_file_info(store.root).type == pafs.FileType.NotFound
    except OSError as e:
        raise UserError(f"cannot read the store {path}: {e}") from None
    if missing:
        raise UserError(f"no store at {path} (check --store; `subq collect` or `subq import` creates one)")
    return store


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def _add_import_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import published decompositions (GSM8K-AI-SubQ) into a store")
    p.add_argument("path", help="a GSM8K-AI-SubQ file: raw (JSON Lines) or converted (JSON array)")
    p.add_argument("--store", default=".subq/store")
    p.add_argument("--format", choices=["auto", "raw", "converted"], default="auto")
    p.add_argument("--teacher-model", default="gpt-3.5-turbo")
    p.add_argument("--split", default="test", help="the GSM8K split the file's problems come from")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_import)
    e = sub.add_parser("export", help="export samples to the GSM8K-AI-SubQ converted format")
    e.add_argument("path")
    e.add_argument("--store", default=".subq/store")
    e.add_argument("--teacher-model")
    e.add_argument("--all", action="store_true", help="include samples with errors")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    import os

    from subq.data_store.gsm8k_ai_subq import import_gsm8k_ai_subq
    from subq.data_store.store import Store

    if not os.path.exists(args.path):
        raise UserError(f"no such file: {args.path}")
    store = Store(args.store)
    with store.lock("subq import"):
        r = import_gsm8k_ai_subq(args.path, store, fmt=args.format, teacher_model=args.teacher_model,
                                 split=args.split)
    if args.json:
        print_json({"path": args.path, "store": args.store, "problems_added": r.problems_added,
                    "samples_added": r.samples_added, "samples_skipped_existing": r.samples_skipped_existing,
                    "parse_errors": r.parse_errors})
        return exit_codes.DONE
    print(f"imported {args.path}: problems +{r.problems_added}, samples +{r.samples_added} "
          f"({r.samples_skipped_existing} already stored, {r.parse_errors} parse errors)")
    return exit_codes.DONE


def cmd_export(args: argparse.Namespace) -> int:
    from subq.data_store.gsm8k_ai_subq import export_gsm8k_ai_subq

    n = export_gsm8k_ai_subq(existing_store(args.store), args.path, teacher_model=args.teacher_model,
                             only_ok=not args.all)
    if args.json:
        print_json({"path": args.path, "store": args.store, "samples": n})
    else:
        print(f"exported {n} samples to {args.path}")
    return exit_codes.DONE


def _add_llm_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm-server", help="serve a local HF causal LM behind an OpenAI-compatible API")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="embedded:..., tiny-random:<arch>, or a HF model dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="samples decoded together (continuous batching)")
    from subq.cli_eval import add_queue_option

    add_queue_option(p)
    p.add_argument("--max-tokens", dest="max_new_tokens", type=int, default=1024, metavar="N",
                   help="cap and default of a request's max_tokens")
    alias(p, "--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--token-env", help="name of an env var holding a bearer token to require")
    from subq.cli_eval import add_replica_options

    add_replica_options(p)
    p.add_argument("--ray-address")
    p.set_defaults(func=cmd_llm_server)


def cmd_llm_server(args: argparse.Namespace) -> int:
    from subq.cli_eval import queue_limit, serve_config
    from subq.runtime import init_ray
    from subq.serve.llm_server import LLMServerConfig, run_forever

    cfg = serve_config(LLMServerConfig, model=args.model, host=args.host, port=args.port,
                       max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens,
                       max_queued_requests=queue_limit(args.max_queued_requests),
                       token_env=args.token_env, num_cpus=args.num_cpus, num_gpus=args.num_gpus, dtype=args.dtype,
                       torch_threads=args.torch_threads)
    init_ray(args.ray_address)
    from subq.resources import require, serve_demand

    require([serve_demand("the llm-server replica", cfg.num_cpus, cfg.num_gpus,
                          hint="without GPUs: --num-gpus 0")])  # a replica nobody can host would wait silently
    run_forever(cfg)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from subq.learner.train import ALGOS, TrainConfig
    from subq.protocol.solve_prompts import SOLVER_TARGETS

    p = sub.add_parser("train", help="fit the student decomposer (BC, filtered BC, ILQL, DPO) or a distilled solver "
                                     "(solver-bc) on Ray Train")
    p.add_argument("--algo", choices=ALGOS, default="bc")
    p.add_argument("--target", choices=SOLVER_TARGETS,
                   help="solver-bc: end the answers with the teacher's final answer (SE-T) or the gold one (SE-A)")
    p.add_argument("--model", dest="init", default=EMBEDDED_MODEL, metavar="MODEL",
                   help="the model to start from: a model spec, HF dir, or a checkpoint (filtered BC / ILQL / DPO: "
                        "BC's)")
    alias(p, "--init", dest="init")
    p.add_argument("--store", default=".subq/store")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--source", choices=["samples", "reference"], default="samples",
                   help="teacher samples, or the GSM8K socratic reference decompositions in the store")
    p.add_argument("--teacher-model", help="train only on this teacher's samples")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (data parallel)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per worker: 0 (CPU, gloo) or 1 (CUDA, nccl)")
    alias(p, "--use-gpu", dest="num_gpus", action="store_const", const=1.0)
    p.add_argument("--no-bf16", action="store_true", help="fp32 on GPU")
    p.add_argument("--cpu-bf16", choices=("off", "on", "auto"), default="off",
                   help="autocast to bf16 on CPU (fp32 weights): faster on a CPU with AMX, slower without; "
                        "auto: only where the CPU has AMX")
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
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep Ray's resumable checkpoints (with the optimizer state) after the run completes")
    p.add_argument("--final-dtype", default=TrainConfig.final_dtype, choices=("auto", "float32", "bfloat16", "float16"),
                   help="final/'s weights (auto: the initial model's published dtype)")
    p.add_argument("--wandb-project")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm setting, e.g. --set lr=1e-5 --set fraction=0.3 --set beta=2 (JSON values)")
    p.add_argument("--ray-address")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the training summary as JSON")
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
    from subq.learner.train import SOLVERS, TrainConfig, check_config, run_train
    from subq.runtime import init_ray

    algo_config = _parse_sets(args.set)
    if args.target is not None:
        if args.algo not in SOLVERS:
            raise UserError(f"--target is for --algo {'/'.join(SOLVERS)}, not {args.algo}")
        algo_config["target"] = args.target
    if args.num_gpus not in (0, 1):
        raise UserError(f"--num-gpus is per training worker: 0 or 1 (more GPUs: --num-workers), got {args.num_gpus:g}")
    existing_store(args.store)  # a typo in --store is not "no training data"
    cfg = TrainConfig(
        algo=args.algo, init=args.init, store=args.store, out=args.out, source=args.source,
        teacher_model=args.teacher_model, num_workers=args.num_workers, use_gpu=args.num_gpus > 0,
        bf16=not args.no_bf16, cpu_bf16=args.cpu_bf16, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_steps=args.max_steps, epochs=args.epochs, max_length=args.max_length, seed=args.seed,
        checkpoint_every=args.checkpoint_every, report_every=args.report_every, lora_r=args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing, val_fraction=args.val_fraction,
        keep_checkpoints=args.keep_checkpoints, final_dtype=args.final_dtype,
        val_every=args.val_every, early_stopping_patience=args.early_stopping_patience,
        early_stopping_metric=args.early_stopping_metric,
        wandb_project=args.wandb_project, algo_config=algo_config, progress=not args.no_progress,
    )
    try:
        check_config(cfg)  # a bad setting is one line, before Ray starts
    except ValueError as e:
        raise UserError(str(e)) from None
    init_ray(args.ray_address)
    from subq.resources import require, train_demand

    require([train_demand(cfg.algo, cfg.num_workers, cfg.use_gpu, hint="without GPUs: --num-gpus 0")])
    summary = run_train(cfg)
    if args.json:
        print_json(summary)
    else:
        metrics = summary.get("metrics") or {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.endswith("loss"))
        print(f"trained {args.algo}: {summary['step']} steps on {summary['episodes']} episodes"
              f"{', ' + shown if shown else ''}; weights in {summary['final']} (--json: the full summary)")
    return exit_codes.DONE


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's default in --help, on every subcommand (also options without a help text, which
    ArgumentDefaultsHelpFormatter would leave out); None, False and empty defaults say nothing."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                show_defaults(sub)
            continue
        d, text = action.default, action.help
        if (not action.option_strings or text == argparse.SUPPRESS or d is None or d is False
                or d is argparse.SUPPRESS or d in ([], {}, "") or "%(default)" in (text or "")):
            continue
        action.help = f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    from subq import __version__

    parser = argparse.ArgumentParser(prog="subq", description=__doc__.splitlines()[0],
                                     epilog="exit codes (every command): " + "; ".join(
                                         f"{code} {text.split(':')[0]}" for code, text in exit_codes.TABLE.items()))
    parser.add_argument("--version", action="version", version=f"subq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from subq.cli_collect import add_collect, add_store
    from subq.cli_eval import add_eval, add_pipeline, add_rescore, add_serve

    for add in (add_pipeline, add_collect, add_store, _add_import_export, _add_llm_server, _add_train, add_serve,
                add_eval, add_rescore):
        add(sub)
    show_defaults(parser)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    # Only the classes of modules already imported (an error of a module never imported cannot have
    # been raised): importing them here (learner.models imports torch) kept a refused run waiting.
    classes = {"subq.actors.teacher": "TeacherUnreachable", "subq.data_store.datasets": "DatasetError",
               "subq.data_store.store": "StoreError", "subq.learner.models": "ModelError",
               "subq.resources": "ResourceError"}
    return (UserError, FileNotFoundError,
            *(getattr(sys.modules[m], c) for m, c in classes.items() if m in sys.modules))


def main(argv: list[str] | None = None) -> int:
    from subq.cli_eval import rewrite_argv

    args = build_parser().parse_args(rewrite_argv(list(sys.argv[1:] if argv is None else argv)))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("subq: interrupted; finished batches are stored, run the same command to resume", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except Exception as e:
        teacher = sys.modules.get("subq.actors.teacher")  # not imported: none of its errors was raised
        if teacher is not None and isinstance(e, teacher.TeacherFatalError):  # the account: 3 wherever it surfaces
            print(f"subq: error: {e}", file=sys.stderr)
            return exit_codes.ACCOUNT_REFUSED
        if isinstance(e, _user_errors()) or (isinstance(e, ValueError) and str(e).startswith("no API key")):
            for line in str(e).splitlines() or [""]:  # one line per problem, each a full error line
                print(f"subq: error: {line}", file=sys.stderr)
            return exit_codes.BAD_INPUT
        raise


if __name__ == "__main__":
    sys.exit(main())
