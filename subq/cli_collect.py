"""``subq collect`` and ``subq store {stats,compact,history}``.

Exit status of ``subq collect``: 0 when every requested sample is stored and none is left in a
retryable failure (parse errors are the teacher's real answers and do not count); 4 when done but
rows stay truncated at their token limit (a plain re-run does not pay for them: --retry-truncated); 1 when rows
remain failed or missing (budget spent, outage past the patience, --no-retry-failed); 2 for a
mistake in the input (one line, nothing written); 3 when the teacher refused the account
(exhausted quota, billing, key): the run stopped at once and stored nothing as failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from subq.exit_codes import ACCOUNT_REFUSED as EXIT_ACCOUNT
from subq.exit_codes import DONE_TRUNCATED
from subq.exit_codes import INCOMPLETE as EXIT_FAILED_ROWS

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def _json_object(text: str) -> dict:
    """argparse type: a JSON object of numbers (Ray resources)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise argparse.ArgumentTypeError('expected a JSON object of numbers, e.g. {"collect_node": 0.01}')
    return value


def add_collect(sub: argparse._SubParsersAction) -> None:
    from subq.cli import TIMEOUT_S

    p = sub.add_parser("collect", help="query a teacher for decompositions, answers and feedback")
    p.add_argument("--problems", default="gsm8k:train[:8]", help="dataset spec, e.g. gsm8k:train[:100]")
    p.add_argument("--store", default=".subq/store", help="store root: a path or a pyarrow URI (s3://...)")
    p.add_argument("--teacher-base-url", help="OpenAI-compatible base URL; omitted: serve the embedded model locally")
    p.add_argument("--teacher-model", help="model name at the endpoint (default: the embedded model)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="name of the env var holding the API key")
    p.add_argument("--decomposer", metavar="SPEC",
                   help="a student decomposes instead of the teacher (iterated distillation): a checkpoint / model "
                        "to serve on Ray Serve, or openai:MODEL@BASE_URL; the teacher answers and judges its "
                        "sub-questions and pays only for that; rows are tagged with its fingerprint (docs/rounds.md)")
    p.add_argument("--round", type=int, metavar="R",
                   help="with --decomposer: the round tag of its rows (default 2: the teacher's rows are round 1)")
    p.add_argument("--samples-per-problem", type=int, default=3)
    p.add_argument("--feedback-samples", type=int, default=3)
    p.add_argument("--max-subquestions", type=int)
    p.add_argument("--temperature", type=float, default=0.7, help="decomposition and feedback temperature")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--requests-per-minute", type=float)
    p.add_argument("--tokens-per-minute", type=float)
    p.add_argument("--budget-usd", type=float,
                   help="cap on $: the store's recorded spend counts; each call's worst case is reserved first")
    p.add_argument("--budget-per-run", action="store_true", help="the budget counts this run's spend only")
    p.add_argument("--no-retry-failed", action="store_true",
                   help="leave rows stored as api_error / partial as they are")
    p.add_argument("--retry-truncated", action="store_true",
                   help="ask again for rows stored as truncated (a plain re-run does not pay for them again)")
    p.add_argument("--truncated-max-tokens", type=int, metavar="N",
                   help="a reply cut at --max-tokens is asked again once with this limit, recorded in the row "
                        "(set it to the model's output limit; default 4x; <= --max-tokens: never)")
    p.add_argument("--patience", type=float, default=600.0,
                   help="seconds an outage of the teacher is waited out before the run stops (resume later)")
    p.add_argument("--price-table",
                   help='JSON {"version": ..., "prices": {"model": [usd_in, usd_out(, usd_cached_in)] per 1M}}')
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per attempt")
    p.add_argument("--max-attempts", type=int, default=6)
    p.add_argument("--min-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actor-num-cpus", type=float, default=0.25, help="CPUs each collection actor reserves")
    p.add_argument("--actor-resources", type=_json_object, default={}, metavar="JSON",
                   help='custom Ray resources per actor, e.g. \'{"collect_node": 0.01}\' to pin actors to such nodes')
    b = p.add_argument_group("Batch API (--mode batch: half the price, answers within 24 h)")
    b.add_argument("--mode", choices=("online", "batch"), default="online",
                   help="online: call the teacher now; batch: submit each stage as Batch API jobs")
    b.add_argument("--wait", action="store_true", help="batch: poll until every sample is stored (else submit and return)")
    # defaults: actors.batch_collect.BatchConfig (not imported here: it would slow every command)
    b.add_argument("--poll-interval", type=float, help="batch: seconds between polls (default 30)")
    b.add_argument("--max-batch-requests", type=int,
                   help="batch: request lines per job, larger stages are split (default 50000, the API limit)")
    b.add_argument("--max-batch-mb", type=float, help="batch: MB (10^6 bytes) of JSONL per job (default 200, the API limit)")
    b.add_argument("--max-enqueued-tokens", type=int, metavar="N",
                   help="batch: the model's batch queue limit (your account's enqueued-token limit for it): jobs are "
                        "split and submitted so live jobs never hold more (default: not enforced)")
    b.add_argument("--resubmit-cancelled", action="store_true",
                   help="batch: send again what a cancelled job left unanswered (default: held, someone cancelled it)")
    b.add_argument("--export-requests", metavar="FILE",
                   help="batch: write the pending requests as JSONL (for vllm run-batch) instead of uploading")
    b.add_argument("--import-results", metavar="FILE", help="batch: store a results JSONL (vllm run-batch -o FILE)")
    p.add_argument("--local-model", default=EMBEDDED_MODEL, help="model served when no base URL is given")
    p.add_argument("--local-port", type=int, default=8011)
    p.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_collect)


def cmd_collect(args: argparse.Namespace) -> int:
    from subq.data_store.lease import refuse_if_held
    from subq.data_store.store import Store

    refuse_if_held(Store(args.store))  # a store another run writes: refused in a second, before the heavy imports
    from subq.actors.collect import run_collect
    from subq.actors.prices import PriceTable
    from subq.actors.teacher import TeacherConfig, TeacherFatalError, check_endpoint
    from subq.cli import UserError
    from subq.data_store.datasets import load_problems
    from subq.local_teacher import local_teacher
    from subq.runtime import init_ray

    for name in ("samples_per_problem", "feedback_samples", "max_attempts", "batch_size", "min_actors"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_actors < args.min_actors:
        raise UserError("--max-actors must be >= --min-actors")
    if args.patience <= 0 or (args.budget_usd is not None and args.budget_usd < 0):
        raise UserError("--patience must be > 0 and --budget-usd >= 0")
    problems = load_problems(args.problems)  # a bad spec fails here, before anything is written
    try:
        prices = PriceTable.from_json(args.price_table) if args.price_table else PriceTable()
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.decomposer is not None or args.round is not None:
        from subq.rounds import check_decomposer_spec

        if args.decomposer is None or args.mode == "batch":
            raise UserError("--round needs --decomposer, and --decomposer works with --mode online only")
        if (args.round or 2) < 2:
            raise UserError("--round must be >= 2 (round 1 is the teacher's)")
        try:
            check_decomposer_spec(args.decomposer)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.mode == "batch":
        return cmd_collect_batch(args, problems, prices)
    if args.wait or args.export_requests or args.import_results:
        raise UserError("--wait, --export-requests and --import-results need --mode batch")
    # The store's lease is taken before Ray starts: a second run on the store is refused in a second.
    with Store(args.store).lock("subq collect"):
        init_ray(args.ray_address)
        from subq.resources import actor_pool_demand, require

        require([actor_pool_demand("collection actors", args.actor_num_cpus, args.actor_resources, args.min_actors,
                                   hint="drop --actor-resources on a machine without such nodes")])
        with local_teacher(args.teacher_base_url, args.local_model, args.local_port) as (base_url, served):
            model = args.teacher_model or served
            if model is None:
                raise UserError("--teacher-model is required with --teacher-base-url")
            if served is not None:
                prices = prices.with_price(model, 0.0, 0.0)  # our own local server costs nothing per token
            teacher = TeacherConfig(base_url=base_url, model=model, api_key_env=args.api_key_env,
                                    timeout_s=args.timeout, max_attempts=args.max_attempts)
            check_endpoint(teacher)
            cfg = collect_config(args, teacher, prices)
            try:
                with _decomposer(args) as (student, policy):
                    cfg = dataclasses.replace(cfg, decomposer=student, policy=policy,
                                              round=(args.round or 2) if student else None)
                    report = run_collect(cfg, problems)
            except TeacherFatalError as e:
                print(f"subq: error: {e}", file=sys.stderr)
                return EXIT_ACCOUNT
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_collect_report(report, args.store, cfg))
    if not report.complete or report.retryable:
        return EXIT_FAILED_ROWS
    return DONE_TRUNCATED if report.truncated else 0


def _decomposer(args: argparse.Namespace):
    """(endpoint, policy) of --decomposer, served for the block; (None, None) for the teacher."""
    from contextlib import nullcontext

    from subq.eval_setup import ServeOptions
    from subq.rounds import student_decomposer

    if args.decomposer is None:
        return nullcontext((None, None))
    return student_decomposer(args.decomposer, ServeOptions(), api_key_env=args.api_key_env, timeout_s=args.timeout)


def collect_config(args: argparse.Namespace, teacher, prices):
    """The CollectConfig of ``subq collect``'s arguments (both modes)."""
    from subq.actors.collect import CollectConfig

    return CollectConfig(
        problems=args.problems, store=args.store, teacher=teacher,
        samples_per_problem=args.samples_per_problem, feedback_samples=args.feedback_samples,
        max_subquestions=args.max_subquestions, decompose_temperature=args.temperature,
        feedback_temperature=args.temperature, max_tokens=args.max_tokens,
        requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute,
        budget_usd=args.budget_usd, budget_per_run=args.budget_per_run, retry_failed=not args.no_retry_failed,
        retry_truncated=args.retry_truncated, truncated_max_tokens=args.truncated_max_tokens,
        patience_s=args.patience, prices=prices, min_actors=args.min_actors,
        max_actors=args.max_actors, batch_size=args.batch_size, progress=not args.no_progress,
        actor_num_cpus=args.actor_num_cpus, actor_resources=args.actor_resources,
    )


def cmd_collect_batch(args: argparse.Namespace, problems: list[dict], prices) -> int:
    """``subq collect --mode batch``: poll, store what ended, submit what is next (see actors.batch_collect)."""
    from subq.actors.batch_collect import BatchConfig, run_batch_collect
    from subq.actors.teacher import TeacherConfig, TeacherFatalError, TeacherUnreachable, check_endpoint
    from subq.cli import UserError

    offline = bool(args.export_requests or args.import_results)
    if args.export_requests and args.import_results:
        raise UserError("--export-requests and --import-results are two steps: give one per run")
    default = BatchConfig()
    poll = default.poll_interval_s if args.poll_interval is None else args.poll_interval
    max_requests = default.max_requests_per_batch if args.max_batch_requests is None else args.max_batch_requests
    max_bytes = default.max_bytes_per_batch if args.max_batch_mb is None else int(args.max_batch_mb * 10**6)
    if max_requests < 1 or max_bytes < 1 or poll < 0 or (args.max_enqueued_tokens or 1) < 1:
        raise UserError("--max-batch-requests and --max-enqueued-tokens must be >= 1, --max-batch-mb > 0 and "
                        "--poll-interval >= 0")
    if args.teacher_base_url is None and not offline:
        raise UserError("--mode batch needs --teacher-base-url of an endpoint with the Batch API (OpenAI); for a "
                        "self-hosted server use --export-requests FILE, vllm run-batch, then --import-results FILE")
    if args.teacher_model is None:
        raise UserError("--mode batch needs --teacher-model (the model name the requests carry)")
    teacher = TeacherConfig(base_url=args.teacher_base_url or "offline", model=args.teacher_model,
                            api_key_env=args.api_key_env, timeout_s=args.timeout, max_attempts=args.max_attempts)
    if not offline:
        try:
            check_endpoint(teacher)
        except TeacherUnreachable as e:
            raise UserError(str(e)) from None
    cfg = collect_config(args, teacher, prices)
    batch = BatchConfig(wait=args.wait, poll_interval_s=poll, max_requests_per_batch=max_requests,
                        max_bytes_per_batch=max_bytes, max_enqueued_tokens=args.max_enqueued_tokens,
                        resubmit_cancelled=args.resubmit_cancelled, export_requests=args.export_requests, import_results=args.import_results)
    try:
        report = run_batch_collect(cfg, batch, problems)
    except TeacherFatalError as e:
        print(f"subq: error: {e}", file=sys.stderr)
        return EXIT_ACCOUNT
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(format_batch_report(report, args, cfg))
    if report.failed_jobs:
        return EXIT_FAILED_ROWS
    in_progress = report.live or report.exported or args.import_results  # more rounds will follow
    return 0 if (report.complete or in_progress) and not report.retryable else EXIT_FAILED_ROWS


def format_batch_report(report, args: argparse.Namespace, cfg) -> str:
    text = format_collect_report(report, args.store, cfg).replace("collected into", "batch collection into", 1)
    lines = [text.replace("; run the same command again to finish", "")]  # the next step is said below
    if report.ingested_jobs or report.unanswered:
        lines.append(f"stored the results of {report.ingested_jobs} ended jobs (priced at batch prices)"
                     + (f"; {report.unanswered} requests they left unanswered go into the next batch"
                        if report.unanswered else ""))
    for job in report.submitted:
        lines.append(f"submitted {job['batch_id']} ({job['stage']}, {job['requests']} requests)")
    for failed in report.failed_jobs:
        lines.append(f"the API failed batch {failed}; its requests go again in smaller jobs")
    if report.held_failed:
        lines.append(f"{report.held_failed} requests whose own one-request batch failed wait before they go again")
    if report.held_cancelled:
        lines.append(f"{report.held_cancelled} requests left unanswered by a cancelled batch are held: "
                     "add --resubmit-cancelled to send them again")
    if report.queue_left_out:
        lines.append(f"{report.queue_left_out} requests wait for room under --max-enqueued-tokens")
    if report.budget_left_out:
        lines.append(f"{report.budget_left_out} requests not submitted: they do not fit --budget-usd at batch prices")
    if report.exported:
        lines.append(f"wrote {report.exported} requests to {args.export_requests}; run them, e.g. "
                     f"`vllm run-batch -i {args.export_requests} -o results.jsonl --model {cfg.teacher.model}`, "
                     "then the same command with --import-results results.jsonl instead")
    if args.import_results:
        lines.append(f"imported {report.imported} result lines from {args.import_results}"
                     + (f" ({report.unmatched} matched no pending request: skipped)" if report.unmatched else ""))
    if report.live:
        states = ", ".join(sorted({j["status"] for j in report.live}))
        lines.append(f"{len(report.live)} jobs running ({states}): "
                     + " ".join(j["batch_id"] or j["job_key"] for j in report.live[:10])
                     + (" ..." if len(report.live) > 10 else ""))
        lines.append("next: run the same command again later to store their results and submit the next stage "
                     "(or add --wait)")
    elif not report.complete and not report.exported and not args.import_results:
        lines.append("next: run the same command again")
    elif args.import_results and not report.complete:
        lines.append("next: export the next stage with --export-requests FILE")
    return "\n".join(lines)


def _reasons(reasons: dict[str, int], limit: int = 3) -> str:
    items = list(reasons.items())
    text = ", ".join(f"{r} {n}" for r, n in items[:limit])
    return text + (f", {len(items) - limit} more reasons" if len(items) > limit else "")


def format_collect_report(report, store: str, cfg) -> str:
    lines = [f"collected into {store}: {report.problems} problems, {report.retried} failed rows retried"]
    lines.append(f"{'stage':<10}{'todo':>6}{'stored':>8}{'failed':>8}{'$':>10}")
    for name, s in report.stages.items():
        cost = "?" if s.cost_unknown else f"{s.cost_usd:.4f}"
        lines.append(f"{name:<10}{s.todo:>6}{s.written:>8}{s.failed:>8}{cost:>10}")
    total = report.cost_usd
    lines.append(f"total $: {'unknown (model not in the price table, or no usage)' if total is None else f'{total:.4f}'}"
                 f"; the store's ledger: ${report.store_spent_usd:.4f}")
    if report.stopped == "budget":
        lines.append(f"stopped: the budget is spent (${cfg.budget_usd} "
                     f"{'this run' if cfg.budget_per_run else 'for this store'}); raise --budget-usd to go on")
    elif report.stopped == "outage":
        lines.append(f"stopped: the teacher failed for longer than --patience ({cfg.patience_s:.0f} s), last with "
                     f"{report.last_failure}; stored work is kept: run the same command again later")
    ok = report.samples_total - sum(report.not_ok.values())
    last = f"{report.samples_total}/{report.samples_expected} samples stored: {ok} ok"
    if report.not_ok:
        parts = [f"{status} {n}: {_reasons(report.not_ok_reasons.get(status, {}))}"
                 for status, n in sorted(report.not_ok.items())]
        last += f", {sum(report.not_ok.values())} not ok ({'; '.join(parts)})"
    if report.retryable:
        last += (f"; {report.retryable} can be retried: run the same command again"
                 + (" without --no-retry-failed" if not cfg.retry_failed else ""))
    elif not report.complete:
        last += "; run the same command again to finish"
    if report.truncated:
        last += (f"; {report.truncated} stay truncated (cut at the larger limit too): --retry-truncated asks "
                 "again, a larger --truncated-max-tokens helps")
    lines.append(last)
    return "\n".join(lines)


def add_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect or compact a store")
    ssub = p.add_subparsers(dest="store_cmd", required=True)
    s = ssub.add_parser("stats", help="counts per table, status and why not ok, teacher, tokens and $")
    s.add_argument("--store", default=".subq/store")
    s.add_argument("--json", action="store_true", help="print the counts as JSON")
    s.set_defaults(func=cmd_store_stats)
    c = ssub.add_parser("compact", help="merge small part files (takes the store's writer lock)")
    c.add_argument("--store", default=".subq/store")
    c.add_argument("--target-rows", type=int, default=200_000, help="rows per merged file")
    c.add_argument("--json", action="store_true", help="print part files before/after per table as JSON")
    c.set_defaults(func=cmd_store_compact)
    h = ssub.add_parser("history", help="every attempt of samples that were retried")
    h.add_argument("--store", default=".subq/store")
    h.add_argument("--key", action="append", default=[], help="only these sample keys")
    h.add_argument("--json", action="store_true", help="print the attempts as JSON")
    h.set_defaults(func=cmd_store_history)


def cmd_store_stats(args: argparse.Namespace) -> int:
    from subq.cli import existing_store

    stats = existing_store(args.store).stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"store {stats['root']}")
    for table, n in stats["tables"].items():
        extra = stats["superseded_attempts"].get(table)
        print(f"  {table:<18}{n:>8} rows in {stats['part_files'][table]:>5} part files"
              + (f", {extra} earlier attempts" if extra else ""))
    for teacher, t in stats["teachers"].items():
        status = ", ".join(f"{k}={v}" for k, v in sorted(t["status"].items()))
        cost = f"${t['cost_usd']:.4f}" + (f" (+{t['cost_unknown']} unpriced)" if t["cost_unknown"] else "")
        print(f"  teacher {teacher}: {t['samples']} samples ({status}), correct={t['correct']}, "
              f"tokens in/out={t['tokens_in']}/{t['tokens_out']}, {cost}, {t['fingerprints']} setting(s)")
        for s, reasons in t["not_ok"].items():
            print(f"    {s}: {_reasons(reasons, limit=6)}")
    print(f"  spent (ledger of {stats['calls']} calls): ${stats['spent_usd']:.4f}")
    jobs = stats["batch_jobs"]
    if jobs:
        live = [j for j in jobs if not j["ingested"]]
        print(f"  batch jobs: {len(jobs)}, {len(live)} not stored yet (run subq collect --mode batch to poll them)")
        for j in (live + [j for j in jobs if j["ingested"]])[:20]:  # the live ones first
            answered = f"{j['completed'] or 0}/{j['requests']} answered, {j['failed'] or 0} failed"
            print(f"    {j['batch_id'] or j['job_key']:<32}{j['stage']:<10}{j['status']:<12}{answered}"
                  + ("" if j["ingested"] else "  (results not stored yet)"))
        if len(jobs) > 20:
            print(f"    ... {len(jobs) - 20} more (--json lists them all)")
    return 0


def cmd_store_compact(args: argparse.Namespace) -> int:
    from subq.cli import existing_store
    from subq.data_store.schema import SCHEMAS

    store = existing_store(args.store)
    parts = {}
    with store.lock("subq store compact"):
        for table in SCHEMAS:
            parts[table] = before, after = store.compact(table, args.target_rows)
            if not args.json:
                print(f"{table:<18}{before:>6} -> {after} part files")
    if args.json:
        print(json.dumps({t: {"before": b, "after": a} for t, (b, a) in parts.items()}, indent=2))
    return 0


def cmd_store_history(args: argparse.Namespace) -> int:
    from subq.cli import existing_store
    from subq.data_store.store_stats import failure_reason

    rows = existing_store(args.store).read_rows("samples", history=True)
    retried = {r["sample_key"] for r in rows if (r["attempt"] or 0) > 0}
    keys = set(args.key) or retried
    shown = sorted((r for r in rows if r["sample_key"] in keys), key=lambda r: (r["sample_key"], r["attempt"] or 0))
    if args.json:
        print(json.dumps({"retried": len(retried), "attempts": [
            {"sample_key": r["sample_key"], "attempt": r["attempt"] or 0, "status": r["status"],
             "reason": None if r["status"] == "ok" else failure_reason(r), "run_id": r["run_id"],
             "updated_at": r["updated_at"]} for r in shown]}, indent=2, default=str))
        return 0
    for r in shown:
        why = "" if r["status"] == "ok" else f"  ({failure_reason(r)})"
        print(f"{r['sample_key']}  attempt {r['attempt'] or 0}  {r['status']}{why}  run {r['run_id']}  "
              f"{r['updated_at']:%Y-%m-%d %H:%M:%S}")
    print(f"{len(keys)} samples shown; {len(retried)} in the store were retried")
    return 0
