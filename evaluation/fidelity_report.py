"""The held-out NLL column of the evaluation report: one figure per decomposer that has weights.

``EvalConfig.fidelity_problems`` names held-out problems with human sub-questions (e.g.
``gsm8k:test[:32]``); each checkpoint decomposer is scored in the student format, the zero-shot
decomposer (a ``teacher`` that is a local model) in the teacher's prompt format, by
:func:`evaluation.fidelity.held_out_nll`. Figures are kept in ``OUT/fidelity.json`` by label, with
what they were computed from, so a re-run recomputes only what changed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from subq.data_store import uri

FILE = "fidelity.json"


def _identity(spec: str, fmt: str, problems: str, bf16: bool) -> dict[str, Any]:
    """What a figure depends on: the weights (a checkpoint's metadata, written last, changes with them)."""
    meta = uri.join(spec, "subq_checkpoint.json")
    if uri.is_uri(spec):  # the metadata object changes with every upload of final/
        found = uri.list_files(spec).get("subq_checkpoint.json")
        stamp = int(found[1] * 1e9) if found else None
    else:
        stamp = os.stat(meta).st_mtime_ns if os.path.isfile(meta) else None
    return {"spec": spec, "fmt": fmt, "problems": problems, "stamp": stamp, "bf16": bf16}


def update_fidelity(out_dir: str, problems_spec: str, scored: list[tuple[str, str, str]],
                    echo=print, bf16: bool = False) -> dict[str, dict[str, Any]]:
    """Compute what is missing or stale for ``scored`` = [(label, model spec, format)]; returns the file.
    ``bf16``: under bf16 autocast (every figure of the table is computed alike)."""
    from subq.data_store.datasets import load_problems
    from subq.evaluation.fidelity import held_out_nll

    path = uri.join(out_dir, FILE)
    table: dict[str, dict[str, Any]] = json.loads(uri.read_text(path)) if uri.is_file(path) else {}
    problems = None
    for label, spec, fmt in scored:
        ident = _identity(spec, fmt, problems_spec, bf16)
        if table.get(label, {}).get("identity") == ident:
            continue
        problems = problems if problems is not None else load_problems(problems_spec)
        nll = held_out_nll(spec, fmt, problems, bf16=bf16)
        table[label] = {**nll, "identity": ident}
        echo(f"held-out NLL of the human sub-questions of {problems_spec}, {label}: {nll['nll_per_token']:.3f} "
             f"nats/token over {nll['tokens']} tokens")
        uri.write_text(path, json.dumps(table, indent=2))
    return table


def read_fidelity(out_dir: str) -> dict[str, float]:
    """label -> held-out NLL per token, for the report ({} when none was computed)."""
    path = uri.join(out_dir, FILE)
    if not uri.is_file(path):
        return {}
    return {label: v["nll_per_token"] for label, v in json.loads(uri.read_text(path)).items()
            if v.get("nll_per_token") is not None}
