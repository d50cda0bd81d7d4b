"""The demo's federated run, simulated in process, against centralized training, seed by seed.

    .venv/bin/python bench/seeds.py [--seeds 0 1 2 3 4] [--clients 4] [--rounds 10]
                                    [--set local_epochs=5 --set lr=0.1 ...] [--per-round]

No server: the computation of a federated task without churn, done with the functions the
real processes call, in the order they call them, so the numbers equal a real run's (the
seed-0 row is ``make demo``'s final accuracy; the final model's bytes are the same too):

* the task: ``launch.digits_config`` (the config of ``make demo`` and bench/federated.py),
  ``--set FIELD=VALUE`` overrides on top, plus ``seed``; normalized like a submission
  (``training.spec.normalize_federated_config`` with the server's default settings);
* round 0's global model: ``build_model(config)`` as safetensors bytes (``workers.federated.prepare``);
* a client (``client.federated``): ``state_from_bytes`` of the round's model,
  ``build_model``, ``train_local(model, config, rank, round_num=r, global_state=...)`` on
  the CPU with 1 torch thread (the client's default ``--threads``), and its upload is
  ``state_to_bytes(model.state_dict())`` claiming ``num_examples``;
* the server (``workers.federated.take``/``plan``/``run_here``/``complete``): the task's strategy from
  ``aggregation.build_strategy`` runs the round over the update files in rank order, each an
  ``UpdateFile`` with the claim and ``max_examples = shard_size``, ``round_seed`` as the worker
  derives it, then ``evaluate(params, config)`` on the test split.

Centralized: ``training.train_centralized`` on the same normalized config (the same seed,
hence the same train/test split and initial weights): the whole train split for
``rounds * local_epochs`` epochs with the same optimiser settings.

Prints a markdown table (seed, federated and centralized test accuracy, gap in points);
exits 1 when a seed's gap is more than ``--goal`` points (default 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first: bench/aggregation.py would shadow the aggregation package

import torch  # noqa: E402

import aggregation  # noqa: E402
import server_settings  # noqa: E402
from launch import digits_config  # noqa: E402
from training import (  # noqa: E402
    build_model,
    evaluate,
    shard_size,
    state_from_bytes,
    state_to_bytes,
    train_centralized,
    train_local,
)
from training.spec import normalize_federated_config  # noqa: E402


def round_seed(cfg: dict[str, Any], round_no: int) -> int:
    """``workers.federated.round_seed`` (copied: importing workers starts Celery's app); it
    only seeds DP noise, which FedAvg does not add."""
    return int(cfg.get("seed", 0)) * 1_000_003 + round_no


def task_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The task as the server stores it after a submission (``app.validation``)."""
    settings = server_settings.Settings()
    raw = {**digits_config(args.rounds, args.clients), **args.overrides, "seed": seed}
    return normalize_federated_config(
        raw, default_batch_size=settings.DEFAULT_BATCH_SIZE, default_epochs=settings.DEFAULT_EPOCHS
    )


def federated(cfg: dict[str, Any], workdir: Path) -> list[float]:
    """Test accuracy of the global model after each round."""
    settings = server_settings.Settings()
    strategy = aggregation.build_strategy(cfg["strategy"], cfg["strategy_params"])
    global_path = workdir / "global-0.safetensors"
    global_path.write_bytes(state_to_bytes(build_model(cfg).state_dict()))
    state_path: Path | None = None
    accuracies = []
    for round_no in range(int(cfg["rounds"])):
        blob = global_path.read_bytes()
        updates = []
        for rank in range(int(cfg["num_shards"])):
            client_cfg = {**cfg, "num_shards": int(cfg["num_shards"])}
            model = build_model(client_cfg)
            metrics = train_local(
                model,
                client_cfg,
                rank,
                round_num=round_no,
                global_state=state_from_bytes(blob),
                device="cpu",
            )
            path = workdir / f"update-{round_no}-{rank}.safetensors"
            path.write_bytes(state_to_bytes(model.state_dict()))
            updates.append(
                aggregation.UpdateFile(
                    path=str(path),
                    num_examples=int(metrics["num_examples"]),
                    max_examples=shard_size(cfg, rank),
                    key=str(rank),
                )
            )
        result = strategy.run_round(
            str(global_path),
            updates,
            str(state_path) if state_path else None,
            round_seed=round_seed(cfg, round_no),
            max_slice_bytes=settings.AGGREGATION_SLICE_BYTES,
        )
        if not result.ok or result.params is None:
            raise SystemExit(f"round {round_no} could not be aggregated: {result.reason}")
        accuracies.append(float(evaluate(result.params, cfg)["test_accuracy"]))
        global_path = workdir / f"global-{round_no + 1}.safetensors"
        global_path.write_bytes(state_to_bytes(result.params))
        if result.state:
            from safetensors.torch import save

            state_path = workdir / f"state-{round_no + 1}.safetensors"
            state_path.write_bytes(
                save(
                    {k: v.contiguous() for k, v in result.state.items()},
                    metadata={"aggregation.strategy": cfg["strategy"]},
                )
            )
    return accuracies


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set wants FIELD=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--set", dest="sets", type=parse_override, action="append", default=[],
        metavar="FIELD=VALUE", help="override a field of digits_config (value read as JSON)",
    )  # fmt: skip
    parser.add_argument("--goal", type=float, default=1.0, help="largest acceptable gap, in points")
    parser.add_argument("--per-round", action="store_true", help="also print each round's accuracy")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the client's default)")
    args = parser.parse_args()
    args.overrides = dict(args.sets)
    torch.set_num_threads(args.threads)

    shown = task_config(args, args.seeds[0])
    shown.pop("seed")
    print(f"config: {json.dumps(shown)}")
    print(f"centralized: train_centralized, {shown['rounds'] * shown['local_epochs']} epochs\n")
    print("| seed | federated | centralized | gap (points) |")
    print("|---|---|---|---|")
    gaps, feds, centrals = [], [], []
    fed_s = central_s = 0.0
    for seed in args.seeds:
        cfg = task_config(args, seed)
        clock = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="aifarm-seeds-") as tmp:
            accuracies = federated(cfg, Path(tmp))
        fed_s += time.perf_counter() - clock
        clock = time.perf_counter()
        central = float(train_centralized(cfg)["test_accuracy"])
        central_s += time.perf_counter() - clock
        gap = (central - accuracies[-1]) * 100
        gaps.append(gap)
        feds.append(accuracies[-1])
        centrals.append(central)
        print(f"| {seed} | {accuracies[-1]:.4f} | {central:.4f} | {gap:.2f} |", flush=True)
        if args.per_round:
            print("|   | rounds: " + " ".join(f"{a:.4f}" for a in accuracies) + " | | |", flush=True)
    worst = max(gaps)
    print(
        f"\nworst gap {worst:.2f} points, mean {statistics.fmean(gaps):.2f} (goal: at most {args.goal:g}); "
        f"federated mean {statistics.fmean(feds):.4f}, min {min(feds):.4f}; "
        f"centralized mean {statistics.fmean(centrals):.4f}, min {min(centrals):.4f}\n"
        f"{fed_s:.1f} s federated, {central_s:.1f} s centralized ({args.threads} torch thread(s))"
    )
    return 0 if worst <= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
