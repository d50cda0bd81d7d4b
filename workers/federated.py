"""Federated rounds: the initial global model, aggregation, evaluation, checkpoints (issue 3, in progress)."""

from __future__ import annotations

import config
from store.blobs import BlobStore
from store.db import Database


def prepare(db: Database, blobs: BlobStore, task_id: int, settings: config.Settings) -> bool:
    raise NotImplementedError("federated training is being built (issue 3)")


def aggregate(db: Database, blobs: BlobStore, task_id: int, round_no: int, settings: config.Settings) -> str:
    raise NotImplementedError("federated training is being built (issue 3)")
