"""``subq pipeline``, ``subq serve``, ``subq eval`` and ``subq eval rescore``."""

from __future__ import annotations

import argparse

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def add_replica_options(p: argparse.ArgumentParser) -> None:
    """Where a Serve replica runs: the options `subq llm-server` and `subq serve` share."""
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica (also its torch threads)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on a GPU with bf16, float32 otherwise), float32, bfloat16 or float16; pin "
                        "it to make CPU and GPU replicas decode alike")
    p.add_argument("--torch-threads", type=int, help="intra-op threads per replica (default: --num-cpus)")



def add_queue_option(p: argparse.ArgumentParser) -> None:
    """The bounded queue both servers share (serve/admission.py)."""
    p.add_argument("--max-queued-requests", type=int, default=64, metavar="N",
                   help="requests that may wait for a free row; beyond the running batch plus N, a request gets "
                        "429 with Retry-After at once (-1: unbounded)")


def queue_limit(value: int) -> int | None:
    """--max-queued-requests as the config takes it: -1 is unbounded (None); other negatives are refused there."""
    return None if value == -1 else value


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a distilled decomposer (/decompose, /v1/chat/completions) on Ray Serve")
    from subq.cli import alias

    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help="a subq checkpoint dir (e.g. runs/quickstart/ilql/final), a HF model dir, or embedded:...")
    alias(p, "--checkpoint", dest="model")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name /v1/models lists and responses report (default: the training run's name "
                        "for its final/, e.g. bc for runs/bc/final; else the directory's or spec's name)")
    p.add_argument("--token-env", help="name of an env var holding a bearer token to require")
    p.add_argument("--beta", type=float, help="default ILQL guidance (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=0.0)
    alias(p, "--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--max-tokens", dest="max_new_tokens", type=int, metavar="N",
                   help="cap and default of a request's max_tokens (default: the checkpoint's longest training "
                        "target + 25%%, at least +16, at most 512; 128 when the checkpoint does not record it)")
    p.add_argument("--max-subquestions", type=int)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (continuous batching)")
    add_queue_option(p)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=1, help="> --min-replicas turns on autoscaling")
    p.add_argument("--target-ongoing-requests", type=float, default=4.0)
    add_replica_options(p)
    p.add_argument("--ray-address")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from subq.learner.checkpoint import is_checkpoint
    from subq.learner.models import resolve_model_path
    from subq.runtime import init_ray
    from subq.serve.decomposer import DecomposerConfig, run_decomposer_forever

    if not is_checkpoint(args.model):
        resolve_model_path(args.model)  # a wrong path fails here, in one line
    cfg = serve_config(
        DecomposerConfig,
        model=args.model, host=args.host, port=args.port, route_prefix=args.route_prefix, token_env=args.token_env,
        served_model_name=args.served_model_name,
        beta=args.beta, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        max_subquestions=args.max_subquestions, max_batch_size=args.max_batch_size, min_replicas=args.min_replicas,
        max_queued_requests=queue_limit(args.max_queued_requests),
        max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests, num_gpus=args.num_gpus,
        num_cpus=args.num_cpus, dtype=args.dtype, torch_threads=args.torch_threads,
    )
    init_ray(args.ray_address)
    from subq.resources import require, serve_demand

    require([serve_demand("decomposer replicas", cfg.num_cpus, cfg.num_gpus, args.min_replicas,
                          hint="without GPUs: --num-gpus 0")])
    run_decomposer_forever(cfg)
    return 0


def serve_config(cls, **fields):
    """A serve config dataclass; a value it refuses is a one-line user error, before Ray starts."""
    from subq.cli import UserError

    try:
        return cls(**fields)
    except ValueError as e:
        raise UserError(str(e)) from None


def add_eval(sub: argparse._SubParsersAction) -> None:
    from subq.cli import TIMEOUT_S, alias

    p = sub.add_parser("eval", help="decomposer -> solver accuracy, tokens, latency and $ on benchmarks "
                                    "(`subq eval rescore` re-scores paper 1's records)")
    p.add_argument("--decomposer", action="append", default=[], metavar="SPEC",
                   help="none | teacher[:MODEL] | URL of a running decomposer | openai:MODEL@BASE_URL (a student "
                        "behind vLLM or any OpenAI-compatible server, prompted in its training format) | "
                        "checkpoint/model to serve; NAME=SPEC sets the row label; repeat for several")
    p.add_argument("--solver", action="append", default=[], metavar="SPEC",
                   help="MODEL@BASE_URL (an OpenAI-compatible solver) | local (the embedded model on our own "
                        "server) | a checkpoint/model dir to serve for the run, e.g. a distilled solver from "
                        "`subq train --algo solver-bc`; NAME=SPEC sets the column label; repeat for several")
    p.add_argument("--benchmark", action="append", default=[], metavar="SPEC",
                   help="e.g. gsm8k:test[:100], svamp, aqua, strategyqa:dev, bamboogle; repeat")
    p.add_argument("--out", default="runs/eval", help="records/, results.json, results.md, accuracy_vs_cost.png")
    p.add_argument("--scorer", choices=["strict", "paper1"], default="strict")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var with the solvers' API key")
    p.add_argument("--decomposer-token-env",
                   help="env var with a bearer token for decomposer URLs and openai: decomposers (default for "
                        "openai: --api-key-env)")
    p.add_argument("--decomposer-version", metavar="NAME",
                   help="your name for the weights behind URL, openai: and checkpoint decomposers (not none or "
                        "teacher): a new value starts new records. Needed where nothing visible changes, e.g. vLLM "
                        "serving a checkpoint retrained in place at the same path")
    p.add_argument("--price-table", help='JSON {"version": ..., "prices": {"model": [usd_in_per_1M, usd_out_per_1M]}}')
    p.add_argument("--max-subquestions", type=int)
    p.add_argument("--beta", type=float, help="ILQL guidance sent to every served decomposer")
    p.add_argument("--solve-max-tokens", type=int, default=512)
    p.add_argument("--decompose-max-tokens", type=int, default=256, help="teacher and openai: decomposers")
    p.add_argument("--max-attempts", type=int, default=6, help="per call; then the record is stored as failed")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per attempt")
    p.add_argument("--no-retry-failed", action="store_true",
                   help="keep records that failed at the API as they are (default: a re-run retries them)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-actors", type=int, default=4)
    p.add_argument("--local-model", default=EMBEDDED_MODEL, help="model behind solver 'local'")
    p.add_argument("--local-port", type=int, default=8011)
    p.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs per replica of a served decomposer or solver checkpoint")
    alias(p, "--serve-num-gpus", dest="num_gpus", type=float)
    p.add_argument("--ray-address")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the results (results.json's runs) as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import sys

    from subq import exit_codes
    from subq.actors.prices import PriceTable
    from subq.cli import UserError
    from subq.eval_setup import (
        ServeOptions,
        check_solver_spec,
        decomposer_label,
        evaluate_decomposers,
        hash_cache_file,
        parse_openai_decomposer,
        plan_run_keys,
        plan_solvers,
        split_label,
    )
    from subq.evaluation.clients import AccountRefusedError, FatalEndpointError
    from subq.evaluation.plan import check_labels, failures, format_failures, pending
    from subq.evaluation.report import format_table
    from subq.evaluation.run import EvalConfig, report
    from subq.runtime import init_ray

    decomposers = args.decomposer or ["none"]
    solvers_raw = args.solver or ["local"]
    serve_opts = ServeOptions(port=args.local_port, num_gpus=args.num_gpus, beta=args.beta)
    try:
        cfg = EvalConfig(benchmarks=args.benchmark or ["gsm8k:test[:20]"], out_dir=args.out, scorer=args.scorer,
                         max_subquestions=args.max_subquestions, solve_max_tokens=args.solve_max_tokens,
                         decompose_max_tokens=args.decompose_max_tokens, max_attempts=args.max_attempts,
                         timeout_s=args.timeout, retry_failed=not args.no_retry_failed,
                         batch_size=args.batch_size, max_actors=args.max_actors, progress=not args.no_progress,
                         decomposer_version=args.decomposer_version)
        from subq.data_store.uri import check as check_location

        check_location(cfg.out_dir)  # a URI that cannot be opened is bad input, before any work
        for s in solvers_raw:
            check_solver_spec(s)  # malformed specs and missing checkpoints fail before Ray starts
        for d in decomposers:
            if split_label(d)[1].startswith("openai:"):
                parse_openai_decomposer(split_label(d)[1])
        prices = PriceTable.from_json(args.price_table) if args.price_table else PriceTable()
        # Labels and settings fingerprints (so what is already stored) are known before any server starts.
        planned = plan_solvers(solvers_raw, args.local_model, args.api_key_env, hash_cache_file(cfg))
        check_labels([decomposer_label(d, planned) for d in decomposers], [sv.label for sv in planned])
        keys = [k for _, ks in plan_run_keys(cfg, decomposers, planned, serve_opts,
                                             token_env=args.decomposer_token_env, api_key_env=args.api_key_env)
                for k in ks]
    except ValueError as e:
        raise UserError(str(e)) from None
    if pending(cfg, keys):
        init_ray(args.ray_address)
        from subq.resources import actor_pool_demand, require

        require([actor_pool_demand("evaluation actors", cfg.actor_num_cpus, cfg.actor_resources, cfg.min_actors)])
        try:
            evaluate_decomposers(cfg, decomposers, solvers_raw, local_model=args.local_model,
                                 local_port=args.local_port, api_key_env=args.api_key_env, prices=prices,
                                 serve_opts=serve_opts, token_env=args.decomposer_token_env, check_endpoints=True)
        except AccountRefusedError as e:  # the line collection prints, and its exit code
            print(f"subq: error: {e}", file=sys.stderr)
            return exit_codes.ACCOUNT_REFUSED
        except FatalEndpointError as e:
            raise UserError(f"evaluation stopped: {e}. Finished batches are stored; nothing was stored "
                            "for the refused calls.") from None
    summaries = report(cfg, keys)
    failed = failures(cfg, keys)
    if args.json:
        import json

        from subq.data_store import uri

        results = json.loads(uri.read_text(uri.join(args.out, "results.json")))
        print(json.dumps({**results, "failed": dict(failed)}, indent=2))
    else:
        print(format_table(summaries))
        print(f"\nrecords, results.json, results.md and accuracy_vs_cost.png in {args.out}")
        print(format_failures(failed, cfg.retry_failed))
    return 1 if failed else 0


def add_rescore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-rescore", help="re-score records in paper 1's evaluation format (also: subq eval rescore)")
    p.add_argument("file", help='JSONL with {"problem", "questions", "answers", "answer"} per line')
    p.add_argument("--mode", choices=["paper1", "strict"], default="strict")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=cmd_rescore)


def cmd_rescore(args: argparse.Namespace) -> int:
    from subq.cli import UserError
    from subq.evaluation.rescore import RescoreError, rescore_file

    try:
        r = rescore_file(args.file, args.mode)
    except RescoreError as e:
        raise UserError(str(e)) from None
    print(f"{args.mode}: accuracy {r.accuracy:.4f} ({r.correct}/{r.n}), 95% CI [{r.ci_low:.4f}, {r.ci_high:.4f}], "
          f"no answer found in {r.unparsed}")
    return 0


def add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the whole loop: collect -> train BC / filtered BC / ILQL -> serve -> eval "
                                        "-> report (re-run to resume)")
    p.add_argument("--config", required=True,
                   help="a YAML file, or a shipped config by name (quickstart, gsm8k-openai, ...); a path that "
                        "exists wins")
    p.add_argument("--check", action="store_true",
                   help="check everything the run needs (models, datasets, keys by name, outputs, Ray resources) "
                        "without running it or calling any endpoint; exit 0 or 2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set train.defaults.max_steps=10 "
                        "--set 'eval.benchmarks=[\"gsm8k:test[:20]\"]' (YAML values)")
    p.add_argument("--out", help="shortcut for --set out=DIR")
    p.add_argument("--rounds", type=int, metavar="K",
                   help="shortcut for --set rounds=K: iterated distillation, each round's student decomposes the "
                        "training problems for the next (docs/rounds.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true",
                   help="print the stages and results as JSON (stage logs still go to stdout before it)")
    p.set_defaults(func=cmd_pipeline)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from subq.cli import UserError
    from subq.config import ConfigError, load_config
    from subq.preflight import check, print_report, resolve_config

    overrides = list(args.set) + ([f"out={args.out}"] if args.out else [])
    overrides += [f"rounds={args.rounds}"] if args.rounds is not None else []
    try:
        cfg, raw = load_config(resolve_config(args.config), overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    # the same preflight before every run; resources are checked by the run itself, once Ray is up
    verdict = print_report(check(cfg, raw, resources=args.check), verbose=args.check)
    if args.check or verdict:
        return verdict
    import sys

    from subq import exit_codes
    from subq.evaluation.clients import AccountRefusedError, FatalEndpointError
    from subq.pipeline import Pipeline, format_stages

    try:
        result = Pipeline(cfg, raw, progress=not args.no_progress).run()
    except ConfigError as e:
        raise UserError(str(e)) from None
    except AccountRefusedError as e:  # the account, as in collect and eval: 3, one line
        print(f"subq: error: {e}. Finished work is stored; run the same command to resume.", file=sys.stderr)
        return exit_codes.ACCOUNT_REFUSED
    except FatalEndpointError as e:
        raise UserError(f"stopped: {e}. Finished work is stored; run the same command to resume.") from None
    if args.json:
        import dataclasses
        import json

        print(json.dumps({"out": result.out, "incomplete": result.incomplete or None,
                          "eval_failures": result.eval_failures,
                          "stages": [dataclasses.asdict(s) for s in result.stages],
                          "runs": [dataclasses.asdict(s) for s in result.summaries]}, indent=2, default=str))
    else:
        print("\n" + format_stages(result))
        print(f"\noutputs in {result.out} (resolved config: {result.out}/pipeline_config.yaml)")
    if result.incomplete:
        then = ("trained on it anyway (train_on_incomplete)" if cfg.train_on_incomplete
                else "stopped before training on partial data (train_on_incomplete: true trains on it)")
        print(f"subq: {result.incomplete}; {then}", file=sys.stderr)
    return exit_codes.INCOMPLETE if result.incomplete or result.eval_failures else exit_codes.DONE


def rewrite_argv(argv: list[str]) -> list[str]:
    """``subq eval rescore ...`` is spelled ``eval-rescore`` inside argparse."""
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] == "rescore":
        return ["eval-rescore", *argv[2:]]
    return argv
