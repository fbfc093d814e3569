"""The driver's data step: store rows -> an episode table on disk, the training / validation split,
filtered BC's selection and the statistics a checkpoint records.

Tokenisation runs on Ray Data (``map_batches`` over the store's Parquet files) and the episodes stream
straight into ``OUT/data/episodes/*.parquet``: the driver never holds them. It then reads only a few
small columns (key, problem, correctness, usefulness, lengths) to decide which rows train and which
validate; the workers read the token columns by row position (``learner/batches.py``).

- Canonical order: episodes sorted by sample key, so the split, the selection and every epoch's
  shuffle depend on the data alone, never on the order Ray Data wrote the files in.
- Validation: ``round(val_fraction x problems)`` whole problems (all their decompositions), those with
  the smallest SHA-256 of their id: the same problems for every seed and every algorithm, and never a
  problem on both sides. Paper 1 held out 1% of the training problems.
- Filtered BC selects (``learner/filtered_bc.select``) within each split; DPO pairs episodes within
  each split and stores the reference model's log-probs of the paired ones (``learner/preference_data.py``);
  solver-bc tokenises solver episodes instead of decompositions (``learner/solver_bc.py``).
- A resumed run reuses the data its first attempt built (its manifest records how), even if the
  store has grown since; changed settings with a checkpoint in ``OUT`` are an error, not a silent mix.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from subq.learner.batches import INDEX, MANIFEST
from subq.learner.checkpoint import META_FILE, is_checkpoint
from subq.learner.filtered_bc import FilteredBCConfig, select

if TYPE_CHECKING:
    from subq.learner.train import TrainConfig

DATA_DIR = "data"  # under OUT
EPISODE_SCHEMA = pa.schema([
    ("sample_key", pa.string()), ("problem_id", pa.string()), ("excluded", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("action_mask", pa.list_(pa.int8())), ("rewards", pa.list_(pa.float32())),
    ("dones", pa.list_(pa.int8())), ("subq_end_positions", pa.list_(pa.int32())), ("correct", pa.float32()),
    ("usefulness", pa.list_(pa.float32())), ("cut_words", pa.int32()),
    ("subq_start_positions", pa.list_(pa.int32())), ("n_actions", pa.int32()),
    ("n_tokens", pa.int32()), ("token_hash", pa.string()),
])
RULE_FIELDS = ("correct_only", "fraction", "return_kind", "rank_within")  # what of FilteredBCConfig selects
_META = ["sample_key", "problem_id", "excluded", "correct", "usefulness", "cut_words", "n_actions", "n_tokens",
         "token_hash"]


@dataclasses.dataclass
class Record:
    """One row of the table as selection and splitting see it (``filtered_bc.Rankable``)."""

    row: int  # position in the table (files in manifest order, rows in file order)
    sample_key: str | None
    problem_id: str | None
    correct: float
    usefulness: list[float]
    n_actions: int
    n_tokens: int
    cut_words: int
    token_hash: str


# ------------------------------------------------------------------------ Ray Data: rows -> episodes


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    from subq.learner.models import load_tokenizer

    return load_tokenizer(spec)


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def sample_round(row: dict[str, Any]) -> int:
    """The collection round of a samples row: the teacher's rows (round null, older stores) are round 1."""
    value = row.get("round")
    return 1 if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def selected(row: dict[str, Any], rounds: list[int] | None, correct_from_round: int | None) -> bool:
    """Whether a samples row is in the training mix (``TrainConfig.sample_rounds`` / ``correct_from_round``)."""
    r = sample_round(row)
    if rounds is not None and r not in rounds:
        return False
    return correct_from_round is None or r < correct_from_round or row.get("correct") is True


def episode_rows(batch, *, tokenizer_spec: str, source: str, placement: str, max_length: int,
                 teacher_model: str | None, solver_target: str | None = None, rounds: list[int] | None = None,
                 correct_from_round: int | None = None) -> pa.Table:
    """A ``map_batches`` function: store rows (pandas) -> one row per episode, or per excluded sample.
    ``solver_target``: solver episodes (``learner/solver_bc.py``) with that target instead of decompositions."""
    from subq.learner.episodes import episode_from_reference, episode_from_sample
    from subq.learner.solver_bc import solver_episode_from_sample

    tokenizer = _tokenizer(tokenizer_spec)
    out = []
    for row in batch.to_dict("records"):
        if source == "reference":
            refs = row.get("reference_subquestions")
            if refs is None or (isinstance(refs, float) and math.isnan(refs)):
                continue  # a problem without a human decomposition is not a sample
            ep, reason = episode_from_reference(row, tokenizer, placement=placement, max_length=max_length)
        else:
            if teacher_model and row.get("teacher_model") != teacher_model:
                continue
            if not selected(row, rounds, correct_from_round):  # not in this round's mix (subq/rounds.py)
                continue
            if solver_target is not None:
                ep, reason = solver_episode_from_sample(row, tokenizer, target=solver_target, max_length=max_length)
            else:
                ep, reason = episode_from_sample(row, tokenizer, placement=placement, max_length=max_length)
        if ep is None:
            key = _text(row.get("sample_key")) or f"reference:{_text(row.get('problem_id'))}"
            out.append({"sample_key": key, "problem_id": _text(row.get("problem_id")), "excluded": reason})
            continue
        ids = np.asarray(ep.input_ids, dtype=np.int32)
        out.append({**{k: getattr(ep, k) for k in ("sample_key", "problem_id", "input_ids", "action_mask", "rewards",
                                                   "dones", "subq_end_positions", "correct", "usefulness",
                                                   "cut_words", "subq_start_positions")},
                    "excluded": None, "n_actions": int(sum(ep.action_mask)), "n_tokens": len(ids),
                    "token_hash": hashlib.sha1(ids.tobytes()).hexdigest()[:16]})
    return pa.Table.from_pylist(out, schema=EPISODE_SCHEMA)


def placement(algo: str) -> str:
    """How an algorithm's episodes place rewards. ILQL reads per-sub-question rewards and DPO ranks by a
    return that includes usefulness by default ("full", which needs every sample's usefulness); BC, filtered
    BC and solver-bc read none, so a sample without usefulness (e.g. GSM8K-AI-SubQ's test split, or a run
    that collected no feedback) still trains them ("sparse" keeps a complete usefulness list for filtered
    BC's return, and stores [] otherwise)."""
    return "full" if algo in ("ilql", "dpo") else "sparse"


def write_episodes(cfg: TrainConfig, tokenizer_spec: str, target: Path, solver_target: str | None = None,
                   via: str | None = None) -> None:
    """Tokenise the store's rows on Ray Data, streaming them into ``target/*.parquet``. ``via``: a URI the
    Ray Data tasks write to instead (on a cluster they may run on nodes that do not share ``target``'s
    disk), downloaded into ``target`` afterwards."""
    from subq.data_store import uri
    from subq.data_store.store import Store

    table = "problems" if cfg.source == "reference" else "samples"
    dataset = Store(cfg.store).dataset(table).map_batches(
        episode_rows, batch_format="pandas", batch_size=256, num_cpus=0.5,
        fn_kwargs={"tokenizer_spec": tokenizer_spec, "source": cfg.source, "max_length": cfg.max_length,
                   "placement": placement(cfg.algo),
                   "teacher_model": cfg.teacher_model, "solver_target": solver_target,
                   "rounds": cfg.sample_rounds, "correct_from_round": cfg.correct_from_round},
    )
    if via is None:
        dataset.write_parquet(str(target))
        return
    uri.remove(via)
    fs, path = uri.open_fs(via)
    dataset.write_parquet(path, filesystem=fs)
    uri.download_dir(via, target)


def write_val_episodes(cfg: TrainConfig, tokenizer_spec: str, data_dir: Path) -> str:
    """``cfg.val_problems``' human sub-questions as episodes in one file (a few hundred problems at most:
    built on the driver); returns its name relative to ``data_dir``."""
    import pandas as pd
    from subq.data_store.datasets import load_problems

    problems = [p for p in load_problems(cfg.val_problems) if p.get("reference_subquestions")]
    if not problems:
        raise ValueError(f"val_problems {cfg.val_problems!r} has no problem with human sub-questions")
    table = episode_rows(pd.DataFrame(problems), tokenizer_spec=tokenizer_spec, source="reference",
                         placement=placement(cfg.algo), max_length=cfg.max_length,
                         teacher_model=None)
    (data_dir / "val").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / "val" / "episodes.parquet")
    return "val/episodes.parquet"


# ------------------------------------------------------------------- driver: split, select, describe


def read_records(data_dir: Path, files: list[str], first_row: int = 0) -> tuple[list[Record], Counter[str]]:
    """The small columns of every row (valid episodes) and the exclusion counts; ``first_row``: the
    position of the first file's first row in the whole table."""
    records, excluded, row = [], Counter(), first_row
    for name in files:
        cols = pq.read_table(data_dir / name, columns=_META).to_pydict()
        for i in range(len(cols["sample_key"])):
            if cols["excluded"][i] is not None:
                excluded[cols["excluded"][i]] += 1
            else:
                records.append(Record(row + i, **{k: cols[k][i] for k in _META if k != "excluded"}))
        row += len(cols["sample_key"])
    return records, excluded


def split_problems(records: list[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, val) in canonical order: val holds round(val_fraction x problems) whole problems."""
    records = sorted(records, key=lambda r: (r.sample_key or "", r.token_hash))
    problem = lambda r: r.problem_id or r.sample_key or r.token_hash  # noqa: E731
    problems = sorted({problem(r) for r in records}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    val = set(problems[: round(val_fraction * len(problems))])
    return [r for r in records if problem(r) not in val], [r for r in records if problem(r) in val]


def data_stats(train: list[Record], val: list[Record], excluded: Counter[str], selected_out: int) -> dict[str, Any]:
    """What a checkpoint records about its data; the decomposer's decoding limits derive from it."""
    targets = np.array([r.n_actions for r in train] or [0])
    return {
        "episodes": len(train), "val_episodes": len(val),
        "max_target_tokens": int(targets.max()),  # the longest sub-question list + end marker trained on
        "p99_target_tokens": int(np.percentile(targets, 99, method="higher")),
        "p50_target_tokens": int(np.percentile(targets, 50, method="higher")),
        "max_episode_tokens": max((r.n_tokens for r in train), default=0),
        "truncated_contexts": sum(r.cut_words > 0 for r in train + val),  # problems cut in their middle
        "excluded": dict(sorted(excluded.items())),  # samples that gave no episode, by reason
        "filtered_out": selected_out,  # episodes the algorithm's rule did not keep (filtered BC's filter,
        #                                solver-bc's correct_only; DPO: episodes in no pair)
    }


def selection_rule(cfg: TrainConfig, acfg: Any) -> dict[str, Any] | None:
    """What of the algorithm's config decides the episodes it trains on (part of the build settings)."""
    if cfg.algo == "filtered-bc":
        return {k: getattr(acfg, k) for k in RULE_FIELDS}
    if cfg.algo == "dpo":
        from subq.learner.preference_data import PAIR_FIELDS

        return {k: getattr(acfg, k) for k in PAIR_FIELDS}
    if cfg.algo == "solver-bc":
        from subq.protocol.solve_prompts import SOLVE_PROMPT_VERSION

        return {"target": acfg.target, "correct_only": acfg.correct_only, "solve_prompt": SOLVE_PROMPT_VERSION}
    return None


def build_settings(cfg: TrainConfig, tokenizer_spec: str, acfg: Any = None) -> dict[str, Any]:
    """Everything that decides the episode table; a resume must find the same. ``acfg``: the
    algorithm's config (default: ``learner.train.algo_config(cfg)``)."""
    from subq.learner.train import algo_config

    rule = selection_rule(cfg, algo_config(cfg) if acfg is None else acfg)
    return {"store": cfg.store, "source": cfg.source, "teacher_model": cfg.teacher_model,
            **({"rounds": cfg.sample_rounds, "correct_from_round": cfg.correct_from_round}
               if cfg.sample_rounds is not None or cfg.correct_from_round is not None else {}),
            "tokenizer": tokenizer_spec, "max_length": cfg.max_length,
            "val_fraction": 0.0 if cfg.val_problems else cfg.val_fraction, "val_problems": cfg.val_problems,
            "placement": placement(cfg.algo), "selection": rule}


def training_units(stats: dict[str, Any]) -> int:
    """What an epoch visits: preference pairs (DPO) or episodes."""
    return int(stats["pairs"]) if "pairs" in stats else int(stats["episodes"])


def _checkpoints(out: str | Path) -> list[str]:
    """The complete checkpoints under ``OUT/ray`` (a path or URI): Ray Train resumes from the latest one."""
    from subq.data_store import uri

    if not uri.is_uri(out):
        return [str(p) for p in (Path(out) / "ray").glob("*/checkpoint_*") if is_checkpoint(p)]
    ray_dir = uri.join(str(out), "ray")
    found = [uri.join(ray_dir, run, c) for run in uri.listdir(ray_dir)
             for c in uri.listdir(uri.join(ray_dir, run)) if c.startswith("checkpoint_")]
    return [c for c in found if uri.is_file(uri.join(c, META_FILE)) and uri.is_file(uri.join(c, "config.json"))]


def has_checkpoint(out: str | Path) -> bool:
    return bool(_checkpoints(out))


def _checkpoint_fingerprints(out: str | Path) -> set[str | None]:
    from subq.data_store import uri

    return {json.loads(uri.read_text(uri.join(p, META_FILE))).get("extra", {}).get("data_fingerprint")
            for p in _checkpoints(out)}


def _no_data_error(cfg: TrainConfig, excluded: Counter[str], val: int, not_kept: int, pairs: bool) -> ValueError:
    hint = (f"; {excluded['too_long']} samples do not fit --max-length {cfg.max_length}: raise it"
            if excluded.get("too_long") else "")
    what = "preference pairs (two decompositions of one problem whose returns differ by the margin)" if pairs \
        else "usable training episodes"
    return ValueError(f"no {what} in {cfg.store} ({cfg.source}, {cfg.algo}): excluded {dict(excluded)}, {val} in "
                      f"validation, {not_kept} not kept by the algorithm's rule{hint}")


def prepare_data(cfg: TrainConfig, tokenizer_spec: str, out: Path, acfg: Any = None,
                 checkpoints: str | None = None) -> dict[str, Any]:
    """``OUT/data`` for this run (built, or reused by a resume); returns its manifest. ``acfg``: the
    algorithm's config (default: ``learner.train.algo_config(cfg)``), whose rule picks the training (and
    validation) episodes: filtered BC's filter, solver-bc's target and ``correct_only``, DPO's pairs (whose
    reference log-probs are computed here, once: ``learner/preference_data.py``). ``checkpoints``: the run's
    location (a URI when ``out`` is only its local staging folder): its checkpoints and data upload there."""
    from subq.data_store import uri
    from subq.learner.train import algo_config

    acfg = algo_config(cfg) if acfg is None else acfg
    data_dir = out / DATA_DIR
    remote = checkpoints if checkpoints is not None and uri.is_uri(checkpoints) else None
    checkpoints = checkpoints or str(out)
    build = build_settings(cfg, tokenizer_spec, acfg)
    if (data_dir / MANIFEST).is_file() and has_checkpoint(checkpoints):
        manifest = json.loads((data_dir / MANIFEST).read_text())
        if manifest["build"] != build:
            changed = sorted(k for k in build if manifest["build"].get(k) != build[k])
            raise ValueError(f"{out} holds a checkpoint trained on data built with other settings ({changed}: "
                             f"{[manifest['build'].get(k) for k in changed]} then, {[build[k] for k in changed]} "
                             f"now); resume with the old settings, or use a new --out (or delete {out / 'ray'})")
        return manifest
    shutil.rmtree(data_dir, ignore_errors=True)
    write_episodes(cfg, tokenizer_spec, data_dir / "episodes", acfg.target if cfg.algo == "solver-bc" else None,
                   via=uri.join(remote, DATA_DIR, "episodes") if remote else None)
    files = sorted(f"episodes/{p.name}" for p in (data_dir / "episodes").glob("*.parquet"))
    records, excluded = read_records(data_dir, files)
    if cfg.val_problems:  # given validation problems, after the training files: rows keep counting on
        val_file = write_val_episodes(cfg, tokenizer_spec, data_dir)
        val, _ = read_records(data_dir, [val_file], first_row=sum(pq.read_metadata(data_dir / f).num_rows
                                                                    for f in files))
        files.append(val_file)
        held_out = {r.problem_id for r in val}
        train = [r for r in sorted(records, key=lambda r: (r.sample_key or "", r.token_hash))
                 if r.problem_id not in held_out]
        if len(train) < len(records):
            excluded["validation_problem"] += len(records) - len(train)
    else:
        train, val = split_problems(records, cfg.val_fraction)
    n_split = len(train) + len(val)
    if cfg.algo in ("filtered-bc", "solver-bc"):
        rule = acfg if cfg.algo == "filtered-bc" else FilteredBCConfig(correct_only=acfg.correct_only)
        train, val = select(train, rule), select(val, rule)
    train_index = np.array([r.row for r in train], dtype=np.int64)
    val_index = np.array([r.row for r in val], dtype=np.int64)
    extra: dict[str, Any] = {}
    keys = json.dumps([[r.sample_key, r.token_hash] for r in train]) + json.dumps([r.sample_key for r in val])
    if cfg.algo == "dpo":
        from subq.learner.preference_data import pair_array, pair_records

        train_pairs, val_pairs, extra = pair_records(train, val, acfg)
        train = sorted({id(r): r for p in train_pairs for r in p}.values(), key=lambda r: r.row)
        val = sorted({id(r): r for p in val_pairs for r in p}.values(), key=lambda r: r.row)
        train_index, val_index = pair_array(train_pairs), pair_array(val_pairs)
        keys = json.dumps([[c.sample_key, r.sample_key, c.token_hash, r.token_hash] for c, r in train_pairs]
                          + [[c.sample_key, r.sample_key] for c, r in val_pairs])
    elif cfg.algo == "solver-bc":
        from subq.protocol.solve_prompts import SOLVE_PROMPT_VERSION

        extra = {"solver_target": acfg.target, "solve_prompt_version": SOLVE_PROMPT_VERSION}
    not_kept = n_split - len(train) - len(val)
    if not len(train_index):
        raise _no_data_error(cfg, excluded, len(val), not_kept, cfg.algo == "dpo")
    manifest = {"build": build, "files": files, "stats": {**data_stats(train, val, excluded, not_kept), **extra},
                "fingerprint": hashlib.sha256((json.dumps(build, sort_keys=True) + keys).encode()).hexdigest()}
    if has_checkpoint(checkpoints) and manifest["fingerprint"] not in _checkpoint_fingerprints(checkpoints):
        raise ValueError(f"{out / DATA_DIR} was missing and the data built now differs from what the checkpoints "
                         f"in {out / 'ray'} were trained on (the store changed, or they predate data fingerprints); use a new "
                         f"--out, or delete "
                         f"{out / 'ray'} to start over")
    arrays = {"train": train_index, "val": val_index}
    if cfg.algo == "dpo":  # after the checks: the reference pass is a forward over every paired episode
        from subq.learner.preference_data import reference_logps

        n_rows = sum(pq.read_metadata(data_dir / f).num_rows for f in files)
        arrays["ref_logp"] = reference_logps(cfg, tokenizer_spec, data_dir, files, n_rows,
                                             np.concatenate([train_index.ravel(), val_index.ravel()]))
    np.savez(data_dir / INDEX, **arrays)
    tmp = data_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, data_dir / MANIFEST)  # last: a manifest means a complete data directory
    return manifest
