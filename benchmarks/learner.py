"""Learner throughput: BC vs. ILQL steps, Ray Train overhead, guided decoding with and without a KV cache.

Prints, in one run on one machine, with one model and one batch shape (B episodes x up to L tokens of
GSM8K train problems and their human sub-questions, usefulness 1.0 each, correct 1.0):
1. tokens/s of a BC step and of an ILQL step (median of --steps timed steps after one warm-up step,
   same model, same batch) and the ILQL / BC step-time ratio;
2. Ray Train overhead: K (default 20) BC optimizer steps through ``learner.train.run_train`` (1 worker,
   reading the same K x B episodes from a temporary store, ``source="reference"``) vs. a bare PyTorch loop doing
   the same K steps on the same episodes (fresh model each): the wall time of the K training steps in
   each and the overhead %, then the end-to-end wall of ``run_train`` (Ray Train start-up, worker model
   load, the K steps, the final checkpoint that is always written) split into its parts;
3. ILQL-guided greedy decoding (``generate_guided``) with the KV cache vs. recomputing the prefix at
   every token (paper 1's released decoder), same prompts and heads: tokens/s of each and the
   speed-up; the two outputs must be identical (asserted).

    python benchmarks/learner.py                            # SmolLM2-135M, the student (~10 min on 2 cores)
    python benchmarks/learner.py --model tiny-random:llama --max-length 192  # quick

Torch runs with 2 intra-op threads here (--threads); the Ray Train worker sets its own count
(cpu_count // num_workers, i.e. 2 on a 2-core machine). This machine's speed drifts by 10-15% over
minutes, so the bare loop runs before and after the Ray runs and Ray Train is compared with their mean.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subq.runtime import configure_env, init_ray  # noqa: E402

configure_env()

import torch  # noqa: E402
import transformers  # noqa: E402
from subq.data_store.datasets import load_problems  # noqa: E402
from subq.learner.batches import epoch_order  # noqa: E402
from subq.learner.bc import BC, BCConfig  # noqa: E402
from subq.learner.episodes import Episode, build_episode, collate, encode_prompt  # noqa: E402
from subq.learner.guided_decoding import generate_guided  # noqa: E402
from subq.learner.ilql import ILQL, ILQLConfig, ILQLHeads  # noqa: E402
from subq.learner.models import load_model_and_tokenizer, load_tokenizer  # noqa: E402


def _episodes(tokenizer, n: int, max_length: int) -> tuple[list[dict], list[Episode]]:
    """The first ``n`` GSM8K train problems whose reference decomposition fits ``max_length``, and their
    episodes, built the way ``reference_episodes`` (the driver's ``source="reference"``) builds them."""
    problems, episodes = [], []
    for p in load_problems(f"gsm8k:train[:{4 * n + 64}]"):
        subqs = p.get("reference_subquestions")
        if not subqs:
            continue
        ep = build_episode(tokenizer, p["question"], list(subqs), usefulness=[1.0] * len(subqs), correct=1.0,
                           max_length=max_length)
        if ep is not None:
            problems.append(p)
            episodes.append(ep)
        if len(episodes) == n:
            return problems, episodes
    raise SystemExit(f"only {len(episodes)} GSM8K problems fit max_length={max_length}")


def _timed_steps(step, batch: dict, n: int) -> float:
    """Median seconds of ``step(batch)`` over ``n`` steps after one warm-up step."""
    step(batch)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_steps(args: argparse.Namespace, model, tokenizer, batch: dict) -> ILQLHeads:
    tokens = int(batch["attention_mask"].sum())
    bc = BC(model, BCConfig(batch_size=args.batch_size, max_length=args.max_length))
    t_bc = _timed_steps(bc.train_step, batch, args.steps)
    del bc
    gc.collect()
    icfg = ILQLConfig(batch_size=args.batch_size, max_length=args.max_length)
    heads = ILQLHeads.for_model(model, two_q=icfg.two_q, hidden_mult=icfg.head_hidden_mult)
    ilql = ILQL(model, heads, icfg)
    t_ilql = _timed_steps(ilql.train_step, batch, args.steps)
    del ilql
    gc.collect()
    shape = tuple(batch["input_ids"].shape)
    print(f"1. train steps, batch {shape[0]} x {shape[1]} ({tokens} tokens, "
          f"{int(batch['action_mask'].sum())} actions), median of {args.steps} after 1 warm-up:")
    print(f"   BC   {t_bc:7.3f} s/step  {tokens / t_bc:9.1f} tokens/s")
    print(f"   ILQL {t_ilql:7.3f} s/step  {tokens / t_ilql:9.1f} tokens/s")
    print(f"   ILQL/BC step time = {t_ilql / t_bc:.2f}")
    return heads


def _ray_order(problems: list[dict], episodes: list[Episode]) -> list[Episode]:
    """The episodes in the order run_train's first epoch visits them: the driver's canonical order (by sample
    key, ``reference:<problem_id>``), shuffled by ``epoch_order(n, seed 0, epoch 0)``."""
    canonical = sorted(range(len(episodes)), key=lambda i: f"reference:{problems[i]['problem_id']}")
    return [episodes[canonical[i]] for i in epoch_order(len(episodes), 0, 0)]


def _train_config(args: argparse.Namespace, store: str = "", out: str = "", report_every: int = 10**6):
    from subq.learner.train import TrainConfig

    return TrainConfig(algo="bc", init=args.model, store=store, out=out, source="reference", num_workers=1,
                       batch_size=args.batch_size, max_length=args.max_length, max_steps=args.train_steps,
                       epochs=1, report_every=report_every, checkpoint_every=10**6, val_fraction=0.0,
                       progress=False)


def _bare_loop(args: argparse.Namespace, episodes: list[Episode], pad_id: int):
    """K BC steps in plain PyTorch on a fresh model: per step collate, loss, backward, clip, AdamW;
    the optimizer and LR schedule exactly as run_train builds them for K steps."""
    from subq.learner.train import algo_config

    model, _ = load_model_and_tokenizer(args.model)
    torch.manual_seed(0)
    bc = BC(model, algo_config(_train_config(args), decay_steps=args.train_steps))
    times = []
    for i in range(args.train_steps):
        t = time.perf_counter()
        bc.train_step(collate(episodes[i * args.batch_size:(i + 1) * args.batch_size], pad_id))
        times.append(time.perf_counter() - t)
    del bc
    gc.collect()
    return model, times


def _ray_train(args: argparse.Namespace, store: str, out: str, report_every: int) -> tuple[dict, list[dict], dict]:
    """One ``run_train``; its summary, metric lines, and wall-clock marks (driver clock)."""
    from subq.learner.train import run_train

    cfg = _train_config(args, store, out, report_every)
    start = time.time()
    summary = run_train(cfg)
    end = time.time()
    metrics_file = Path(out) / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    # rank 0 appends a line just before each ray.train.report; the last one precedes the final checkpoint
    marks = {"start": start, "end": end, "last_line": metrics_file.stat().st_mtime}
    if summary["step"] != args.train_steps:
        raise SystemExit(f"unexpected run: {summary}")
    return summary, lines, marks


def bench_ray_train(args: argparse.Namespace, problems: list[dict], episodes: list[Episode], pad_id: int) -> None:
    from subq.data_store.store import Store
    from subq.learner.checkpoint import load_checkpoint

    k, b = args.train_steps, args.batch_size
    episodes = _ray_order(problems, episodes)  # the same batches in the same order as the Ray Train run
    batch_tokens = [sum(len(ep.input_ids) for ep in episodes[i * b:(i + 1) * b]) for i in range(k)]
    tokens = sum(batch_tokens)
    bare_model, bare_steps = _bare_loop(args, episodes, pad_id)

    t0 = time.perf_counter()
    init_ray()
    t_ray_init = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="subq-bench-") as tmp:
        Store(f"{tmp}/store").append("problems", problems)
        summary, lines, marks = _ray_train(args, f"{tmp}/store", f"{tmp}/out", report_every=10**6)
        ray_model = load_checkpoint(summary["final"]).model
        # final/ is stored in the model's published dtype (bf16 for SmolLM2): round the bare weights the same way
        weight_diff = max(float((a.to(c.dtype) - c).abs().max()) for a, c in
                          zip(bare_model.state_dict().values(), ray_model.state_dict().values(), strict=True))
        del ray_model, bare_model
        gc.collect()
        if not args.no_per_step:
            _, step_lines, step_marks = _ray_train(args, f"{tmp}/store", f"{tmp}/out-per-step", report_every=1)
    if summary["episodes"] != len(episodes) or len(lines) != 1:
        raise SystemExit(f"unexpected run: {summary}, {len(lines)} metric lines")
    # The bare loop again, after the Ray runs: this machine's speed drifts by 10-15% over minutes, so
    # Ray Train is compared with the mean of a bare run before it and one after it.
    _, bare_after = _bare_loop(args, episodes, pad_id)
    bare = (sum(bare_steps) + sum(bare_after)) / 2
    # The worker's tokens/s counts the real tokens of its micro-batches since just before its data loop,
    # so tokens / (tokens/s) is the wall of the K steps inside Ray Train (episode reads included).
    ray_train = tokens / lines[0]["charts/tokens_per_s"]
    e2e = marks["end"] - marks["start"]
    before = marks["last_line"] - marks["start"] - ray_train  # driver + trainer + worker start-up, model load
    after = marks["end"] - marks["last_line"]  # final checkpoint (model + optimizer state), shut-down, copy
    print(f"2. {k} BC optimizer steps of {b} episodes (<= {args.max_length} tokens, {tokens} tokens in all), "
          f"cold start in both:")
    print(f"   bare PyTorch loop ({torch.get_num_threads()} threads): {bare:7.2f} s  ({tokens / bare:8.1f} tokens/s;"
          f" mean of {sum(bare_steps):.2f} s before the Ray runs and {sum(bare_after):.2f} s after them)")
    print(f"   Ray Train, 1 worker, report/checkpoint only at the end: {ray_train:7.2f} s  "
          f"({lines[0]['charts/tokens_per_s']:8.1f} tokens/s, the worker's charts/tokens_per_s)")
    print(f"   Ray Train overhead on the training steps: {100 * (ray_train / bare - 1):+.1f} %  "
          f"(final weights vs. the bare loop's: max |diff| {weight_diff:.1e}"
          f"{', identical: same batches in the same order' if weight_diff == 0 else ''})")
    print(f"   end to end: run_train {e2e:.1f} s (+ ray.init {t_ray_init:.1f} s) = {before:.1f} s start-up + "
          f"{ray_train:.1f} s steps + {after:.1f} s final checkpoint and tear-down; "
          f"x{(e2e + t_ray_init) / bare:.1f} the bare steps")
    if not args.no_per_step:
        # Same run with a report after every step: each window is one step (the first also opens the
        # episode table); tokens per window are exact when the batches come in the bare loop's order
        # (identical final weights above say they do; otherwise the windows are approximate).
        windows = [batch_tokens[m["step"] - 1] / m["charts/tokens_per_s"] for m in step_lines]
        later, bare_later = sum(windows[1:]), (sum(bare_steps[1:]) + sum(bare_after[1:])) / 2
        print(f"   per-step view (a 2nd run, report_every=1): Ray windows {', '.join(f'{t:.2f}' for t in windows)} s;"
              f" step 1 {windows[0] - bare_steps[0]:+.2f} s vs. bare (first step),"
              f" steps 2..{k} {100 * (later / bare_later - 1):+.1f} %;"
              f" run_train {step_marks['end'] - step_marks['start']:.1f} s ({k - 1} more reports)")


def bench_decoding(args: argparse.Namespace, model, tokenizer, heads: ILQLHeads, problems: list[dict]) -> None:
    model.eval()
    heads.eval()
    prompts = [encode_prompt(tokenizer, p["question"]) for p in problems[:args.prompts]]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    beta = ILQLConfig().beta

    def run(use_cache: bool) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        out = generate_guided(model, heads, input_ids, mask, max_new_tokens=args.new_tokens, beta=beta,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, use_cache=use_cache)
        return out, time.perf_counter() - t

    generate_guided(model, heads, input_ids, mask, max_new_tokens=2, beta=beta,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)  # warm-up
    cached, t_cached = run(True)
    recomputed, t_recomputed = run(False)
    new = cached[:, width:]
    # Generated tokens: up to and including each row's eos (what a client receives).
    is_eos = (new == tokenizer.eos_token_id).int()
    n_tokens = int(torch.where(is_eos.any(1), is_eos.argmax(1) + 1, new.shape[1]).sum())
    print(f"3. ILQL-guided greedy decoding (beta {beta}), {len(prompts)} prompts of <= {width} tokens, left-padded, "
          f"{n_tokens} new tokens (<= {args.new_tokens} per prompt):")
    print(f"   KV cache:          {t_cached:7.2f} s  {n_tokens / t_cached:8.1f} tokens/s")
    print(f"   recompute prefix:  {t_recomputed:7.2f} s  {n_tokens / t_recomputed:8.1f} tokens/s")
    print(f"   speed-up of the cache: x{t_recomputed / t_cached:.2f}")
    if not torch.equal(cached, recomputed):
        diff = (cached != recomputed).nonzero()
        raise AssertionError(f"cached and recomputed decoding differ at {diff[:5].tolist()} ...")
    print("   outputs identical: yes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct",
                    help="model spec (learner/models.py); tiny-random:llama for a quick run")
    ap.add_argument("--batch-size", type=int, default=4, help="episodes per step")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per episode")
    ap.add_argument("--steps", type=int, default=3, help="timed BC / ILQL steps (after 1 warm-up)")
    ap.add_argument("--train-steps", type=int, default=20, help="K: optimizer steps, Ray Train vs. bare loop")
    ap.add_argument("--prompts", type=int, default=4, help="prompts decoded together")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens per prompt")
    ap.add_argument("--no-per-step", action="store_true", help="skip the 2nd Ray Train run (report every step)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads in this process")
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would bury the figures
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = load_tokenizer(args.model)
    n = max(args.batch_size, args.train_steps * args.batch_size)
    problems, episodes = _episodes(tokenizer, n, args.max_length)
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other processes skew every figure)")

    model, tokenizer = load_model_and_tokenizer(args.model)
    heads = bench_steps(args, model, tokenizer, collate(episodes[:args.batch_size], tokenizer.pad_token_id))
    bench_ray_train(args, problems, episodes, tokenizer.pad_token_id)
    bench_decoding(args, model, tokenizer, heads, problems)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
