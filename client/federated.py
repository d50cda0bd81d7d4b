"""The ``federated_training`` runner: download the round's model, train the shard, upload, report.

Imports torch (through :mod:`training`); the rest of the client does not need it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from client import transfer
from client.runner import Assignment, Runner, TaskControl, TaskDropped

log = logging.getLogger("aifarm.client")


def _field(data: Mapping[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"task.data.{key} must be {'an integer' if kind is int else 'a ' + kind.__name__}")
    return value


def make_runner(base_url: str, device: str) -> Runner:
    """A runner that trains on ``device`` (``cpu``, ``cuda``, ``auto``) against the server at ``base_url``."""

    def run(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        from training import build_model, state_from_bytes, state_to_bytes, train_local
        from training.loop import TrainingStopped

        data = assignment.data
        config = data.get("config")
        if not isinstance(config, Mapping):
            raise ValueError("task.data.config must be an object")
        rank = _field(data, "rank", int)
        num_shards = _field(data, "num_shards", int)
        round_no = _field(data, "round", int)
        model_url = _field(data, "model_url", str)
        update_url = _field(data, "update_url", str)
        if not 0 <= rank < num_shards:
            raise ValueError(f"rank {rank} is outside 0..{num_shards - 1}")
        config = {**config, "num_shards": num_shards}

        try:
            blob = transfer.download_model(
                base_url, model_url, control.identity(), should_stop=control.should_stop
            )
            global_state = state_from_bytes(blob)
            model = build_model(config)
            log.info(
                "%s: training %d local epoch(s) on %s",
                assignment.label,
                config.get("local_epochs", 1),
                device,
            )
            metrics = train_local(
                model,
                config,
                rank,
                round_num=round_no,
                global_state=global_state,
                on_progress=control.report,
                should_pause=control.should_pause,
                should_stop=control.should_stop,
                device=device,
            )
            if control.should_stop():
                raise TaskDropped("stopped by the server")
            update = state_to_bytes(model.state_dict())
            answer = transfer.upload_update(
                base_url,
                update_url,
                control.identity(),
                update,
                int(metrics["num_examples"]),
                should_stop=control.should_stop,
            )
        except TrainingStopped:
            raise TaskDropped("stopped by the server") from None
        except transfer.Cancelled:
            raise TaskDropped("stopped by the server") from None
        except transfer.TransferError as error:
            if error.task_gone:
                raise TaskDropped(f"no longer assigned to this client ({error})") from None
            raise
        log.info(
            "%s: update %s (%d bytes, sha256 %s)",
            assignment.label,
            answer.get("status", "sent"),
            len(update),
            str(answer.get("sha256", "?"))[:12],
        )
        return {
            "train_loss": float(metrics["train_loss"]),
            "train_accuracy": float(metrics["train_accuracy"]),
            "num_examples": int(metrics["num_examples"]),
        }

    return run
