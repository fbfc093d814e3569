"""DPO's part of the driver's data step: preference pairs within each split, and the reference model's
log-probabilities, computed once.

``learner/data.py`` writes and splits the episodes as for every algorithm; then

- :func:`pair_records` pairs them within each split (``learner.dpo.make_pairs``; the split holds out
  whole problems and pairs never cross problems, so no pair straddles train and validation);
- :func:`reference_logps` runs the reference model (the model DPO starts from) over every episode in a
  pair on a Ray Data actor pool: each actor loads the model once and reads its episodes from the table
  by row position, as the training workers do. Only (row, log-prob) comes back to the driver.

The results go into ``OUT/data/index.npz`` (pairs as [n, 2] row positions, ``ref_logp`` per row), so a
resumed run reuses them and the training workers never hold a second model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from subq.learner.dpo import DPOConfig, make_pairs

if TYPE_CHECKING:
    from subq.learner.data import Record
    from subq.learner.train import TrainConfig

PAIR_FIELDS = ("return_kind", "margin", "max_pairs_per_problem")  # what of DPOConfig decides the pairs


def pair_records(train: list[Record], val: list[Record], cfg: DPOConfig
                 ) -> tuple[list[tuple[Record, Record]], list[tuple[Record, Record]], dict[str, int]]:
    """(train pairs, validation pairs, statistics) of already split records."""
    train_pairs, same_train = make_pairs(train, cfg)
    val_pairs, same_val = make_pairs(val, cfg)
    stats = {"pairs": len(train_pairs), "val_pairs": len(val_pairs), "identical_pairs": same_train + same_val,
             "pair_problems": len({c.problem_id for c, _ in train_pairs})}
    return train_pairs, val_pairs, stats


def pair_array(pairs: list[tuple[Record, Record]]) -> np.ndarray:
    """[n, 2] table row positions of (chosen, rejected)."""
    return np.array([[c.row, r.row] for c, r in pairs], dtype=np.int64).reshape(-1, 2)


class ReferenceLogps:
    """A Ray Data actor: the reference model's summed action log-probs of episodes given by row position."""

    def __init__(self, model_spec: str, data_dir: str, files: list[str], micro_batch: int, use_gpu: bool,
                 bf16: bool, cpu_bf16: str | bool, threads: int) -> None:
        import torch
        from subq.learner.batches import read_episode_files
        from subq.learner.checkpoint import is_checkpoint, load_checkpoint
        from subq.learner.models import load_model_and_tokenizer
        from subq.learner.train import cpu_bf16_on

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if is_checkpoint(model_spec):
            loaded = load_checkpoint(model_spec, device=str(self.device))
            self.model, tokenizer = loaded.model, loaded.tokenizer
        else:
            self.model, tokenizer = load_model_and_tokenizer(model_spec, device=str(self.device))
        self.model.eval()
        self.pad_id = tokenizer.pad_token_id
        self.table = read_episode_files(data_dir, files)
        self.micro_batch = micro_batch
        self.bf16 = bf16 if use_gpu else cpu_bf16_on(cpu_bf16)  # the workers' autocast: step 0 matches

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from subq.learner.batches import episodes_at
        from subq.learner.dpo import sequence_logps
        from subq.learner.episodes import collate

        rows = np.asarray(batch["row"], dtype=np.int64)
        episodes = episodes_at(self.table, rows)
        order = np.argsort([len(ep.input_ids) for ep in episodes], kind="stable")  # less padding
        out = np.empty(len(rows), dtype=np.float64)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        for i in range(0, len(order), self.micro_batch):
            chunk = order[i: i + self.micro_batch]
            tensors = collate([episodes[j] for j in chunk], self.pad_id)
            tensors = {k: v.to(self.device) for k, v in tensors.items()}
            with torch.no_grad(), autocast:
                logps, _ = sequence_logps(self.model, tensors)
            out[chunk] = logps.double().cpu().numpy()
        return {"row": rows, "ref_logp": out}


def reference_logps(cfg: TrainConfig, model_spec: str, data_dir: Path, files: list[str], n_rows: int,
                    rows: np.ndarray) -> np.ndarray:
    """``ref_logp`` for every table row: the reference model's value at ``rows``, NaN elsewhere."""
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy

    result = np.full(n_rows, np.nan, dtype=np.float64)
    rows = np.unique(rows)
    if not len(rows):
        return result
    actors = max(1, min(cfg.num_workers, len(rows)))
    kwargs: dict[str, Any] = {"model_spec": model_spec, "data_dir": str(data_dir), "files": files,
                              "micro_batch": 2 * cfg.batch_size, "use_gpu": cfg.use_gpu, "bf16": cfg.bf16,
                              "cpu_bf16": cfg.cpu_bf16,
                              "threads": max(1, (os.cpu_count() or 1) // actors)}
    ds = ray.data.from_arrow(pa.table({"row": rows})).map_batches(
        ReferenceLogps, fn_constructor_kwargs=kwargs, batch_size=max(32, 4 * cfg.batch_size),
        batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=0.5, num_gpus=1 if cfg.use_gpu else 0)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        result[batch["row"]] = batch["ref_logp"]
    missing = int(np.isnan(result[rows]).sum())
    if missing:
        raise RuntimeError(f"the reference pass returned no log-prob for {missing} of {len(rows)} episodes")
    return result
