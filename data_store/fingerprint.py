"""A digest of the data a store holds for training: what a trained student records it was trained on.

Built from the key index only (every current key and its attempt, per table), so it costs a read of
the key columns, not of the data. It changes when a row is added or retried (a retry is a new
attempt); it does not change when part files are compacted or when only the call ledger or batch
bookkeeping grows, since training reads ``problems`` and ``samples`` alone.
"""

from __future__ import annotations

import hashlib

from subq.data_store.store import Store

TRAINING_TABLES = ("problems", "samples")  # what learner.data reads


def store_fingerprint(store: Store, tables: tuple[str, ...] = TRAINING_TABLES) -> str:
    """sha256 over ``table, key, attempt`` of every current row of ``tables`` (fresh listing)."""
    h = hashlib.sha256()
    for table in tables:
        attempts = store.attempts(table, fresh=True)
        h.update(f"{table}\t{len(attempts)}\n".encode())
        for key in sorted(attempts):
            h.update(f"{key}\t{attempts[key]}\n".encode())
    return h.hexdigest()
