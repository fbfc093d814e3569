"""Distillation quality: does training make a better decomposer? Measured on held-out GSM8K test problems.

Answer accuracy with a 135M solver cannot show it; the fidelity of the student's decompositions can.
One run trains every student through the real path (``learner.train.run_train``: Ray Data + Ray Train,
same seed, same data order), then measures each on GSM8K *test* problems that no student trained on:

students   zero-shot   the base model, prompted with the teacher's few-shot decomposition prompt
           bc          BC on GSM8K *train* problems' human (socratic) sub-questions (``source=reference``)
           filtered-bc from bc, on reward-labelled teacher samples, paper 1's rule (correct ones only)
           ilql        from bc, ILQL on the same samples (``ilql-sparse``: correctness reward only)
teacher    samples     ``--samples-store STORE`` (collected with ``subq collect``), or by default ChatGPT's
                       GSM8K-AI-SubQ decompositions (paper 1, with its correctness labels) of GSM8K test
                       problems *after* the held-out slice
measures   nll_human   per-token NLL of the human sub-questions (exactly their text tokens, no generation)
           nll_chatgpt per-token NLL of ChatGPT's sub-questions (GSM8K-AI-SubQ)
           generated   one greedy decomposition per problem from the served decomposer
                       (``serve.decomposer``, Ray Serve, ``POST /decompose``; one replica, each student
                       swapped in): ROUGE-L and |count - human|
                       against the human ones, parse rate, share that stopped by themselves
           ilql        AUC of its values ranking correct above incorrect held-out ChatGPT decompositions,
                       and beta 0 / 1 / 4 at decoding
           curve       held-out human-sub-question NLL against training step (every --eval-every steps,
                       from the training run's own validation metrics)

Outputs in --out: quality.json (figures, settings, commit), quality.md (the table), quality_curve.png.

    python benchmarks/quality.py --quick                   # embedded 135M model, 2 CPU cores, <= 25 min
    python benchmarks/quality.py --full --device cuda --model HuggingFaceTB/SmolLM2-360M-Instruct
    python benchmarks/quality.py --quick --model tiny-random:llama --bc-steps 2 ...   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subq.runtime import configure_env, init_ray  # noqa: E402

configure_env()

from subq.data_store.datasets import load_problems  # noqa: E402
from subq.data_store.store import Store  # noqa: E402

AI_SUBQ_FILE = ROOT / "data_store" / "data" / "gsm8k-ai-subq" / "qg_test_dataset.jsonl"


@dataclass
class QualityConfig:
    model: str = "embedded:smollm2-135m-instruct"  # student initialisation and the zero-shot baseline
    device: str = "cpu"  # cpu | cuda: Ray Train's use_gpu (bf16), the measures and the served decomposer
    out: str = "runs/quality"  # store, checkpoints and the report
    reference: str = "gsm8k:train[:320]"  # BC's data: GSM8K train problems with their human sub-questions
    samples_store: str | None = None  # teacher samples for filtered BC / ILQL; None: GSM8K-AI-SubQ (below)
    ai_subq_records: int = 256  # GSM8K-AI-SubQ records used as teacher samples, taken after the held-out slice
    heldout: int = 48  # GSM8K test problems [0, heldout): never trained on; the NLLs use all of them
    generate: int = 24  # ... and the first this many are decomposed by every student
    bc_steps: int = 30  # optimizer steps of each student
    fbc_steps: int = 10
    ilql_steps: int = 10
    batch_size: int = 8  # episodes per step (per worker)
    num_workers: int = 1  # Ray Train workers
    max_length: int = 256  # tokens per training episode
    lr: float = 1e-4  # AdamW peak learning rate, every student
    eval_every: int = 5  # steps between the learning curve's held-out NLL points
    curve_problems: int = 32  # held-out problems scored at each curve point (the first ones)
    betas: list[float] = field(default_factory=lambda: [0.0, 1.0, 4.0])  # ILQL guidance at decoding
    max_new_tokens: int = 160  # decoding limit (GSM8K's longest human decompositions are ~155 tokens)
    seed: int = 0
    port: int = 8031  # the decomposer's Serve port
    progress: bool = True  # training progress bars
    rounds: int = 1  # > 1: iterated distillation instead (subq/rounds.py): the quickstart pipeline for this many
    #                  rounds on the embedded teacher, its per-round table (OUT/rounds-pipeline/rounds/rounds.md)

    @property
    def use_gpu(self) -> bool:
        return self.device.startswith("cuda")


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "full": dict(reference="gsm8k:train", ai_subq_records=819, heldout=500, generate=200, bc_steps=2000,
                 fbc_steps=400, ilql_steps=400, batch_size=16, max_length=512, eval_every=100, curve_problems=200,
                 max_new_tokens=256),
}


# ---- data -------------------------------------------------------------------------------------------

def heldout_problems(cfg: QualityConfig) -> list[dict]:
    """GSM8K test[:heldout] with their human sub-questions and ChatGPT's (GSM8K-AI-SubQ, same order)."""
    problems = load_problems(f"gsm8k:test[:{cfg.heldout}]")
    records = json.loads(AI_SUBQ_FILE.read_text())
    for p, rec in zip(problems, records, strict=False):
        assert " ".join(rec["question"].split()) == " ".join(p["question"].split()), "GSM8K-AI-SubQ order changed"
        p["chatgpt_subquestions"] = list(rec["answers"])
        p["chatgpt_correct"] = bool(rec["rewards"]["answer_correctness"])
    return problems


def build_store(cfg: QualityConfig, out: Path) -> str:
    """The training store: the reference problems, and teacher samples unless a store was given."""
    from subq.data_store.gsm8k_ai_subq import import_gsm8k_ai_subq

    store = Store(str(out / "store"))
    store.append("problems", load_problems(cfg.reference))
    if cfg.samples_store is None:
        records = json.loads(AI_SUBQ_FILE.read_text())[cfg.heldout:cfg.heldout + cfg.ai_subq_records]
        subset = out / "gsm8k-ai-subq-train.json"
        subset.write_text(json.dumps(records))
        import_gsm8k_ai_subq(str(subset), store, fmt="converted", split="test")
    return str(out / "store")


# ---- training -----------------------------------------------------------------------------------------

def train(cfg: QualityConfig, out: Path, store: str) -> dict[str, dict[str, Any]]:
    """BC, then filtered BC and ILQL from BC; each a real ``run_train`` (a finished one is reused)."""
    from subq.learner.checkpoint import is_checkpoint
    from subq.learner.train import TrainConfig, run_train

    samples = cfg.samples_store or store
    val = f"gsm8k:test[:{min(cfg.curve_problems, cfg.heldout)}]"
    plan = [("bc", cfg.model, store, "reference", cfg.bc_steps),
            ("filtered-bc", str(out / "train" / "bc"), samples, "samples", cfg.fbc_steps),
            ("ilql-sparse", str(out / "train" / "bc"), samples, "samples", cfg.ilql_steps)]
    runs = {}
    for algo, init, src_store, source, steps in plan:
        target = out / "train" / algo
        start = time.perf_counter()
        if not is_checkpoint(target / "final"):
            tc = TrainConfig(algo=algo, init=init, store=src_store, out=str(target), source=source,
                             num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, batch_size=cfg.batch_size,
                             max_steps=steps, epochs=1000, max_length=cfg.max_length, seed=cfg.seed,
                             checkpoint_every=steps, report_every=cfg.eval_every, algo_config={"lr": cfg.lr},
                             val_problems=val, val_every=cfg.eval_every, progress=cfg.progress)
            summary = run_train(tc)
        else:
            summary = {"step": json.loads((target / "final" / "subq_checkpoint.json").read_text())["step"]}
        runs[algo] = {"final": str(target / "final"), "steps": summary["step"], "wall_s": time.perf_counter() - start,
                      "episodes": summary.get("episodes"), "curve": learning_curve(target / "metrics.jsonl")}
    return runs


def learning_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """(step, held-out NLL per sub-question token) from a run's metrics.jsonl."""
    points = {}
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            m = json.loads(line)
            if "losses/val_nll_subq" in m:
                points[int(m["step"])] = float(m["losses/val_nll_subq"])
    return sorted(points.items())


# ---- measures ---------------------------------------------------------------------------------------

def teacher_forced(cfg: QualityConfig, spec: str, fmt: str, problems: list[dict], values: bool = True
                   ) -> dict[str, Any]:
    """NLL of the human and ChatGPT sub-questions, and for an ILQL checkpoint its value AUC."""
    import torch
    from subq.evaluation.fidelity import auc, reference_nll, value_scores
    from subq.learner.checkpoint import is_checkpoint, load_checkpoint
    from subq.learner.ilql import ILQLHeads
    from subq.learner.models import load_model_and_tokenizer

    heads = None
    if is_checkpoint(spec):
        loaded = load_checkpoint(spec, device=cfg.device)
        model, tok = loaded.model, loaded.tokenizer
        if loaded.heads_state is not None:
            param = next(model.parameters())
            heads = ILQLHeads.from_state_dict(loaded.heads_state).to(device=param.device, dtype=param.dtype)
    else:
        model, tok = load_model_and_tokenizer(spec, device=cfg.device)
    with torch.no_grad():
        human = reference_nll(model, tok, [(p["question"], p["reference_subquestions"] or []) for p in problems], fmt)
        chatgpt = reference_nll(model, tok, [(p["question"], p["chatgpt_subquestions"]) for p in problems], fmt)
    out: dict[str, Any] = {"nll_human": human["nll_per_token"], "nll_human_tokens": human["tokens"],
                           "nll_chatgpt": chatgpt["nll_per_token"], "nll_chatgpt_tokens": chatgpt["tokens"]}
    if heads is not None and values:
        pairs = [(p["question"], p["chatgpt_subquestions"]) for p in problems]
        labels = [p["chatgpt_correct"] for p in problems]
        values = value_scores(model, heads, tok, pairs)
        out["value_auc"] = {name: auc(scores, labels) for name, scores in values.items()}
    del model
    return out


async def _decompose_all(url: str, problems: list[dict], beta: float | None, max_tokens: int) -> list[dict]:
    import httpx

    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(p: dict) -> dict:
            body: dict[str, Any] = {"problem": p["question"], "temperature": 0.0, "max_tokens": max_tokens}
            if beta is not None:
                body["beta"] = beta
            async with sem:
                r = await client.post(f"{url}/decompose", json=body)
            if r.status_code != 200:
                return {"subquestions": [], "finish_reason": "error", "error": r.text[:200]}
            data = r.json()
            return {"subquestions": data["subquestions"], "finish_reason": data.get("finish_reason"),
                    "completion_tokens": data["usage"]["completion_tokens"]}

        return await asyncio.gather(*(one(p) for p in problems))


def generated(cfg: QualityConfig, url: str, problems: list[dict], betas: list[float | None]) -> dict[str, Any]:
    """Decompose every problem once per beta with the decomposer served at ``url``, measure against the humans."""
    from subq.evaluation.fidelity import generation_measures

    out = {}
    for beta in betas:
        start = time.perf_counter()
        outputs = asyncio.run(_decompose_all(url, problems, beta, cfg.max_new_tokens))
        m = generation_measures(outputs, [p["reference_subquestions"] for p in problems])
        m["wall_s"] = time.perf_counter() - start
        m["examples"] = [o["subquestions"] for o in outputs[:2]]
        out["default" if beta is None else f"beta={beta:g}"] = m
    return out


# ---- report -----------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    rows = ["| student | steps | NLL human ↓ | NLL ChatGPT ↓ | ROUGE-L ↑ | abs(count − human) ↓ | parsed | "
            "stopped | sub-q / problem |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["students"].items():
        for gen_name, g in s["generated"].items():
            label = name if gen_name in ("default", "beta=0") and len(s["generated"]) == 1 else f"{name} ({gen_name})"
            rows.append(f"| {label} | {s.get('steps', 0)} | {_f(s['nll_human'])} | {_f(s['nll_chatgpt'])} | "
                        f"{_f(g['rougeL'])} | {_f(g['abs_count_diff'], 2)} | {_f(g['parse_rate'], 2)} | "
                        f"{_f(g['stop_rate'], 2)} | {_f(g['subquestions'], 2)} |")
    lines = ["\n".join(rows)]
    ilql = result["students"].get("ilql", {}).get("value_auc")
    if ilql:
        lines.append("ILQL value diagnostic (AUC of correct vs. incorrect held-out ChatGPT decompositions, 95% CI): "
                     + "; ".join(f"{k} {_f(v['auc'])} [{_f(v['low'], 2)}, {_f(v['high'], 2)}]" for k, v in ilql.items())
                     + f" ({next(iter(ilql.values()))['positives']} correct, {next(iter(ilql.values()))['negatives']}"
                       " incorrect)")
    return "\n\n".join(lines) + "\n"


def plot_curves(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    zero = result["students"]["zero-shot"]["nll_human"]
    ax.axhline(zero, color="grey", linestyle="--", label=f"zero-shot ({zero:.2f})")
    for name, s in result["students"].items():
        if s.get("curve"):
            steps, nll = zip(*s["curve"], strict=True)
            ax.plot(steps, nll, marker="o", markersize=3, label=name)
    ax.set_xlabel("training step (filtered BC and ILQL continue from BC's last step)")
    ax.set_ylabel("held-out NLL per human sub-question token")
    ax.set_title("Learning curves on GSM8K test problems never trained on", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _commit() -> str | None:
    """HEAD, with "+dirty" when the working tree has uncommitted changes to tracked files."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run(cfg: QualityConfig) -> dict[str, Any]:
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    init_ray()
    problems = heldout_problems(cfg)
    gen = problems[:cfg.generate]
    store = build_store(cfg, out)
    runs = train(cfg, out, store)
    bc_steps = runs["bc"]["steps"]
    students: dict[str, dict[str, Any]] = {
        "zero-shot": {"spec": cfg.model, "fmt": "chat", "steps": 0, "curve": []},
        "bc": {"spec": runs["bc"]["final"], "fmt": "student", "steps": bc_steps, "curve": runs["bc"]["curve"]},
    }
    for algo, name in (("filtered-bc", "filtered-bc"), ("ilql-sparse", "ilql")):
        r = runs[algo]
        students[name] = {"spec": r["final"], "fmt": "student", "steps": r["steps"],
                          "curve": [(bc_steps + s, v) for s, v in r["curve"]]}
    curve_set = problems[:min(cfg.curve_problems, cfg.heldout)]
    base = teacher_forced(cfg, cfg.model, "student", curve_set, values=False)["nll_human"]
    students["bc"]["curve"] = [(0, base), *students["bc"]["curve"]]  # the initial model, student format
    # one decomposer replica on Ray Serve (the evaluation's host): the first student starts it, each next one is
    # swapped in
    from subq.eval_setup import DecomposerHost, ServeOptions

    opts = ServeOptions(port=cfg.port, max_batch_size=8, num_gpus=1.0 if cfg.use_gpu else 0.0, num_cpus=1.0,
                        max_new_tokens=cfg.max_new_tokens)
    with DecomposerHost(opts, name="quality") as host:
        for name, s in students.items():
            s.update(teacher_forced(cfg, s["spec"], s["fmt"], problems))
            with host.serving(s["spec"]) as url:
                s["generated"] = generated(cfg, url, gen, list(cfg.betas) if name == "ilql" else [0.0])
            if name in runs or name == "ilql":
                s["train_wall_s"] = runs["ilql-sparse" if name == "ilql" else name]["wall_s"]
    result = {"commit": _commit(), "settings": asdict(cfg), "heldout": f"gsm8k:test[:{cfg.heldout}]",
              "students": students, "wall_s": time.perf_counter() - t0}
    (out / "quality.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "quality.md").write_text(markdown(result))
    plot_curves(result, out / "quality_curve.png")
    return result


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> QualityConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the 2-core CPU preset (default)")
    size.add_argument("--full", action="store_true", help="paper-scale data and steps (for a GPU)")
    for f in dataclasses.fields(QualityConfig):
        if f.name == "betas":
            p.add_argument("--betas", type=float, nargs="+")
        else:
            kind = type(f.default) if f.default is not None else str
            p.add_argument("--" + f.name.replace("_", "-"), type=_bool if kind is bool else kind)
    args = p.parse_args(argv)
    values = dict(PRESETS["full" if args.full else "quick"])
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(QualityConfig)
                   if getattr(args, f.name) is not None})
    return QualityConfig(**values)


def run_rounds_benchmark(cfg: QualityConfig) -> int:
    """``--rounds K``: the quickstart pipeline (embedded 135M teacher, BC on its samples) for K rounds. The 135M
    teacher's answers and judgements are weak: this proves the machinery and the per-round accounting, not
    that the rounds help (docs/rounds.md)."""
    from subq.config import load_config
    from subq.pipeline import Pipeline, format_stages

    out = Path(cfg.out).resolve() / "rounds-pipeline"
    # the teacher decomposes the benchmark once (round 1): every round's student is compared with it; the
    # local teacher and Serve take --port, not quickstart's 8011 that other runs on the machine may hold
    cfg_, raw = load_config(str(ROOT / "configs" / "quickstart.yaml"), [
        f"out={out}", f"rounds={cfg.rounds}", "rounds_mix=all", "train.algos=[bc]", "train.bc.source=samples",
        "train.bc.max_steps=3", "train.bc.epochs=3", "import.reference=null", "eval.teacher_decomposes=true",
        f"teacher.local_port={cfg.port}", f"serve.port={cfg.port}"])
    result = Pipeline(cfg_, raw, progress=cfg.progress).run()
    print(format_stages(result))
    print((out / "rounds" / "rounds.md").read_text() if (out / "rounds" / "rounds.md").is_file() else "no rounds table")
    return 1 if result.incomplete else 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.rounds > 1:
        return run_rounds_benchmark(cfg)
    result = run(cfg)
    print(markdown(result))
    print(f"wall {result['wall_s']:.0f} s; outputs in {Path(cfg.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
