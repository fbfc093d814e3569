"""The model card (``final/README.md``) of a training run: what the student is, how it was made, how to
prompt it without subq.

Hugging Face style: YAML front matter (``base_model`` when it is a hub model, ``library_name``,
``license``, ``tags``), then the base model, the algorithm and its settings, the data (store, teacher
models, episodes and problems), steps, the held-out figures the run measured, a ``transformers`` snippet
that prompts it through the chat template ``learner.checkpoint`` saved, and the license. Everything is
read from what the run wrote (``subq_checkpoint.json``, ``train_summary.json``, the data manifest), so
a card can be rebuilt for any finished run; facts that cannot be read are left out, never guessed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from subq.learner.checkpoint import META_FILE, is_checkpoint, strip_secrets
from subq.learner.models import EMBEDDED_PREFIX, TINY_PREFIX
from subq.protocol.prompts import SUBQ_END

CARD_FILE = "README.md"
# embedded model -> (its Hugging Face hub id, its license)
_EMBEDDED_HUB = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_ALGOS = {
    "bc": "behaviour cloning: cross-entropy on every teacher decomposition",
    "filtered-bc": "filtered behaviour cloning: cross-entropy on the best decompositions by return",
    "ilql": "implicit language Q-learning with per-sub-question usefulness and correctness rewards",
    "ilql-sparse": "implicit language Q-learning with the correctness reward only",
    "dpo": "direct preference optimisation on pairs of decompositions of one problem",
    "solver-bc": "behaviour cloning of a solver: the teacher's answers to sub-questions",
}


def base_model(init: str, depth: int = 0) -> tuple[str | None, str, str | None]:
    """(hub id or None, a readable name, license or None) of the model a run started from; a subq
    checkpoint (filtered BC's BC run) is followed to the model its own run started from."""
    spec = str(init).strip()
    if spec.startswith(EMBEDDED_PREFIX):
        hub, lic = _EMBEDDED_HUB.get(spec[len(EMBEDDED_PREFIX):], (None, None))
        return hub, hub or spec, lic
    if spec.startswith(TINY_PREFIX):
        return None, f"a randomly initialised test model ({spec})", None
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_checkpoint(path) and depth < 8:
            parent = (json.loads((path / META_FILE).read_text()).get("config") or {}).get("init")
            if parent:
                return base_model(str(parent), depth + 1)
        return None, f"a local model ({path.name})", None
    return spec, spec, None  # a hub id


def _store_name(store: str) -> str:
    return re.sub(r"//[^/@]*@", "//", store)  # no user:password@ of a store URI in a public card


def data_facts(out: Path, store: str, source: str) -> dict[str, Any]:
    """Problems and teacher models behind the run's training and validation episodes (best effort: a
    store that cannot be read leaves the teachers out)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from subq.learner.batches import INDEX, MANIFEST
    from subq.learner.data import DATA_DIR

    data = out / DATA_DIR
    files = json.loads((data / MANIFEST).read_text())["files"]
    table = pa.concat_tables([pq.read_table(data / f, columns=["sample_key", "problem_id"]) for f in files])
    keys, problems = table.column("sample_key").to_pylist(), table.column("problem_id").to_pylist()
    index = np.load(data / INDEX)
    rows = {split: sorted({int(r) for r in index[split].ravel()}) for split in ("train", "val")}
    facts: dict[str, Any] = {"problems": len({problems[r] for r in rows["train"]}),
                             "val_problems": len({problems[r] for r in rows["val"]})}
    if source == "samples":
        try:
            from subq.data_store.store import Store

            samples = Store(store).read_table("samples", columns=["sample_key", "teacher_model"]).to_pydict()
            teacher = dict(zip(samples["sample_key"], samples["teacher_model"], strict=True))
            facts["teachers"] = dict(Counter(str(teacher.get(keys[r])) for r in rows["train"]).most_common())
        except Exception:  # the card must never fail a finished run
            pass
    return facts


def _yaml(value: str) -> str:
    """A YAML scalar: bare when that is unambiguous, else a JSON string (valid YAML)."""
    return value if re.fullmatch(r"[A-Za-z][A-Za-z0-9._/-]*", value) else json.dumps(value)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_model_card(meta: dict[str, Any], summary: dict[str, Any], facts: dict[str, Any], name: str) -> str:
    """The card's Markdown. ``meta``: subq_checkpoint.json; ``summary``: run_train's summary."""
    cfg = meta.get("config") or {}
    algo = str(meta.get("algo"))
    hub, base_name, lic = base_model(str(cfg.get("init", "")))
    solver = algo == "solver-bc"
    version = (meta.get("versions") or {}).get("subq") or "(unknown version)"
    front = {"base_model": hub, "library_name": "transformers", "license": lic or "other",
             "pipeline_tag": "text-generation"}
    lines = ["---", *(f"{k}: {_yaml(v)}" for k, v in front.items() if v is not None), "tags:",
             *(f"- {_yaml(t)}" for t in ("subq", "distillation", "solver" if solver else "question-decomposition", algo)),
             "---", "",
             f"# {name}: a subq {'solver' if solver else 'problem decomposer'}", "",
             ("Answers the sub-questions of a math word problem in order, then gives the final answer." if solver
              else "Splits a math word problem into the sub-questions needed to solve it, one per line, and ends "
                   f"with `{SUBQ_END}`; a solver (any LLM) then answers them in order."),
             f"Trained with subq {version} (decompose-then-solve distillation on Ray).", "",
             "## Training", "",
             f"- Base model: {base_name}",
             f"- Algorithm: `{algo}`, {_ALGOS.get(algo, 'see subq')}",
             f"- Steps: {meta.get('step')} optimizer steps (planned {summary.get('planned_steps')}); batch "
             f"{cfg.get('batch_size')} episodes x {cfg.get('num_workers')} workers x {cfg.get('grad_accum')} "
             f"accumulation, {cfg.get('epochs')} epoch(s) at most, max length {cfg.get('max_length')} tokens, "
             f"seed {cfg.get('seed')}" + (f", LoRA rank {cfg['lora_r']} (merged)" if cfg.get("lora_r") else ""),
             f"- Prompt version: `{meta.get('prompt_version')}`", "",
             "Algorithm settings:", "", "```json",
             json.dumps(strip_secrets((meta.get("extra") or {}).get("algo_config") or {}), indent=1, default=str),
             "```", ""]
    stats = summary.get("data") or {}
    excluded = ", ".join(f"{n} {why}" for why, n in (stats.get("excluded") or {}).items())
    teachers = facts.get("teachers")
    source = ("GSM8K socratic human decompositions (the store's problems table)"
              if cfg.get("source") == "reference" else "teacher decompositions (the store's samples table)")
    lines += ["## Data", "", f"- Store: `{_store_name(str(cfg.get('store')))}`, {source}"]
    if teachers:
        lines.append("- Teacher models: " + ", ".join(f"`{t}` ({n} episodes)" for t, n in teachers.items()))
    elif cfg.get("teacher_model"):
        lines.append(f"- Teacher model: `{cfg['teacher_model']}`")
    lines += [f"- Training: {stats.get('episodes')} episodes"
              + (f" of {facts['problems']} problems" if "problems" in facts else ""),
              f"- Validation: {stats.get('val_episodes')} episodes"
              + (f" of {facts['val_problems']} problems" if "val_problems" in facts else "")
              + (f" (human sub-questions of `{cfg['val_problems']}`)" if cfg.get("val_problems")
                 else f" (a {cfg.get('val_fraction')} share of the problems, held out)"),
              f"- Not trained on: {excluded or 'no'} excluded samples, {stats.get('filtered_out', 0)} episodes not "
              "kept by the algorithm's rule", ""]
    val = {k: v for k, v in (summary.get("metrics") or {}).items() if "/val_" in k}
    lines += ["## Held-out figures", ""]
    lines += (["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in sorted(val.items())), ""]
              if val else ["None measured (no validation data).", ""])
    lines += _how_to_prompt(name, solver, bool(meta.get("has_heads")))
    lines += ["## License", "",
              f"The weights derive from {base_name}" + (f" and inherit its license ({lic})." if lic
                                                       else "; its license applies."), ""]
    return "\n".join(lines)


def _how_to_prompt(name: str, solver: bool, heads: bool) -> list[str]:
    if solver:
        return ["## How to prompt it", "",
                "Through the tokenizer's chat template with the messages of `subq.protocol.solve_prompts` "
                "(or serve it with `subq llm-server`).", ""]
    lines = ["## How to prompt it", "",
             "The tokenizer's chat template renders the last user message as the training prompt "
             "(`Problem: ...\\nSub-questions:\\n`); `generation_config.json` decodes greedily and stops at "
             f"`{SUBQ_END}` (a stop string, so `generate` needs `tokenizer=`).", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'tok = AutoTokenizer.from_pretrained("final")',
             'model = AutoModelForCausalLM.from_pretrained("final")',
             'problem = "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?"',
             'inputs = tok.apply_chat_template([{"role": "user", "content": problem}], add_generation_prompt=True,',
             '                                 return_tensors="pt", return_dict=True)',
             "out = model.generate(**inputs, tokenizer=tok)  # greedy, stops at the end marker",
             'text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)',
             f'subquestions = [q for q in text.split("{SUBQ_END}")[0].splitlines() if q.strip()]', "```", "",
             f"With vLLM: `vllm serve final --served-model-name {name}`, then chat completions with "
             f'`"stop": ["{SUBQ_END}"]` and `"temperature": 0`. `subq serve final` serves it as `{name}` with '
             "`/decompose` and an OpenAI chat route whose reply is `Q1: ...` lines.", ""]
    if heads:
        lines += ["ILQL: `heads.safetensors` holds the Q and V heads. Plain transformers (and vLLM) decode the "
                  "language model alone, without Q/V guidance (beta = 0); `subq serve` adds "
                  "`beta * (Q - V)` to the log-probabilities.", ""]
    return lines


def write_model_card(final: Path, summary: dict[str, Any], name: str) -> Path:
    """``final/README.md`` for a finished run whose ``out`` (``final``'s parent) holds its data directory."""
    meta = json.loads((final / META_FILE).read_text())
    cfg = meta.get("config") or {}
    try:
        facts = data_facts(final.parent, str(cfg.get("store")), str(cfg.get("source")))
    except (OSError, KeyError, ValueError):
        facts = {}
    path = final / CARD_FILE
    path.write_text(build_model_card(meta, summary, facts, name))
    return path
