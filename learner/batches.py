"""What a training worker reads: the episode table the driver wrote, and the order it is read in.

Order. Every epoch visits the training episodes in ``epoch_order(n, seed, epoch)``, a permutation
that depends only on the seed, the epoch and the number of episodes (the driver fixes their
canonical order, by sample key). A *position* is the number of episodes of that order already
trained on in the epoch; a global micro-batch takes the next ``batch_size x world`` of them and
rank r trains on the r-th of ``world`` near-equal contiguous pieces. So a checkpoint's
(epoch, position) pins the exact data that comes next, for any number of workers, and a resumed
run, even on another number of workers, continues the same order without skipping or repeating.

Why not Ray Data's ``streaming_split``: it hands blocks to whichever worker asks first, so with more
than one worker the episodes a rank sees (and therefore its first loss) change from run to run, and
"skip the first k micro-batches" after a resume skips different episodes than were trained on.
Reading by index needs random access, hence a Parquet table that every worker opens (``out`` is
a shared path on a cluster, as Ray Train's storage already requires).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from subq.learner.episodes import Episode

MANIFEST = "manifest.json"  # the data directory's description, written last (its presence = complete)
INDEX = "index.npz"  # row positions of the training and validation episodes, in canonical order
EPISODE_COLUMNS = ("input_ids", "action_mask", "rewards", "dones", "subq_end_positions", "correct",
                   "usefulness", "sample_key", "problem_id", "cut_words", "subq_start_positions")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits n episodes: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batches(order: np.ndarray, start: int, batch_size: int, rank: int, world: int
                  ) -> Iterator[tuple[np.ndarray, int]]:
    """This rank's micro-batches of ``order`` from position ``start``: (the episodes it trains on, as values
    of ``order``; how many episodes the whole micro-batch consumed). Every rank gets the same number of micro-batches, each non-empty
    (DDP needs every rank in every all-reduce): a last global micro-batch with fewer episodes than
    ranks is topped up from the start of the order, as torch's DistributedSampler pads."""
    pos = start
    while pos < len(order):
        chunk = order[pos: pos + batch_size * world]
        consumed = len(chunk)
        if len(chunk) < world:
            chunk = np.resize(np.concatenate([chunk, order]), world)
        yield np.array_split(chunk, world)[rank], consumed
        pos += consumed


def micro_batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    return -(-n // (batch_size * world))


def steps_per_epoch(n: int, batch_size: int, world: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: the last step takes the micro-batches that are left, never carries them."""
    return -(-micro_batches_per_epoch(n, batch_size, world) // grad_accum)


def read_episode_files(data_dir: str | Path, files: list[str]) -> pa.Table | None:
    """The episode columns of the table's files, in manifest order (memory-mapped); None when empty."""
    tables = [pq.read_table(Path(data_dir) / f, columns=list(EPISODE_COLUMNS), memory_map=True) for f in files]
    return pa.concat_tables(tables) if tables else None


def episodes_at(table: pa.Table | None, rows: np.ndarray) -> list[Episode]:
    """The episodes at these row positions of ``table``, in this order."""
    if table is None:
        raise ValueError("the episode table holds no episodes")
    cols = table.take(pa.array(rows, type=pa.int64())).to_pydict()
    return [Episode(**{k: cols[k][i] for k in EPISODE_COLUMNS}) for i in range(len(rows))]


class EpisodeTable:
    """The driver's episode table (``learner/data.py``) opened by a worker: rows by position, as episodes.

    ``train_rows`` / ``val_rows``: row positions, in canonical order; for DPO, [n, 2] arrays of
    (chosen, rejected) positions, one preference pair per row, and ``ref_logp`` holds the reference
    model's summed action log-probs per table row (NaN for rows in no pair).
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        self.manifest = json.loads((self.dir / MANIFEST).read_text())
        self.table = read_episode_files(self.dir, self.manifest["files"])
        with np.load(self.dir / INDEX) as index:
            self.train_rows, self.val_rows = index["train"], index["val"]
            self.ref_logp = index.get("ref_logp")  # DPO only

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def pairs(self) -> bool:
        """Whether the training units are preference pairs (DPO) rather than episodes."""
        return self.train_rows.ndim == 2

    def episodes(self, rows: np.ndarray) -> list[Episode]:
        """The episodes at these row positions, in this order."""
        if self.table is None:
            raise ValueError(f"{self.dir} holds no episodes")
        return episodes_at(self.table, rows)
