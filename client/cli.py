"""``python -m client``: the command line of the reference volunteer client.

Exit status: 0 after ``--max-tasks`` results (or never, without it), 1 on a fatal error (the
last log line says why), 2 for bad arguments, 130 when interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from client import hardware, state
from client.backoff import Backoff
from client.connection import Connection, GaveUp, http_base, ws_url
from client.progress import TqdmDisplay, make_display
from client.runner import FEDERATED
from client.session import ClientSession, Fatal

log = logging.getLogger("aifarm.client")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="AI Farm volunteer client: connects to a server, trains the shards it is given.",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("AIFARM_SERVER"),
        help="server URL, e.g. http://127.0.0.1:8000 (env AIFARM_SERVER)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=Path(os.environ.get("AIFARM_STATE") or state.DEFAULT_PATH),
        help="file keeping this client's id and token across restarts (env AIFARM_STATE; "
        "default ~/.aifarm/client.json)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=os.environ.get("AIFARM_DEVICE", "auto"),
        help="where to train: auto = CUDA when torch sees a GPU, else CPU (env AIFARM_DEVICE)",
    )
    parser.add_argument(
        "--max-tasks",
        type=_positive_int,
        default=None,
        help="exit (status 0) once the server acknowledged this many results; default: run until stopped",
    )
    parser.add_argument(
        "--rotate-token",
        action="store_true",
        help="once registered, ask the server for a new token and save it (the old one stops working)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=os.environ.get("AIFARM_THREADS", "1"),
        help="torch CPU threads (env AIFARM_THREADS; default 1: the models are small, and several "
        "clients often share a machine)",
    )
    parser.add_argument(
        "--give-up-after",
        type=_non_negative_float,
        default=0.0,
        help="exit (status 1) when not registered with the server for this many seconds; 0 = retry forever",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("AIFARM_LOG_LEVEL", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="log verbosity (env AIFARM_LOG_LEVEL)",
    )
    return parser


class _TqdmHandler(logging.Handler):
    """Writes log lines through tqdm so a progress bar on the terminal is not torn apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _setup_logging(level: str, tty: bool) -> None:
    handler: logging.Handler = _TqdmHandler() if tty else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("websocket", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _select_device(choice: str) -> str:
    import torch

    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise Fatal("--device cuda was given, but torch sees no CUDA GPU")
    return "cpu"


def _on_sigterm(signum: int, frame: FrameType | None) -> Any:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device (or AIFARM_DEVICE) must be auto, cpu or cuda, got {args.device!r}")
    if args.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error(
            f"--log-level (or AIFARM_LOG_LEVEL) must be DEBUG, INFO, WARNING or ERROR, got {args.log_level!r}"
        )
    if not args.server:
        parser.print_usage(sys.stderr)
        print("python -m client: error: --server (or AIFARM_SERVER) is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        ws_url(args.server)
    except ValueError as error:
        print(f"python -m client: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    display = make_display()
    _setup_logging(args.log_level, isinstance(display, TqdmDisplay))
    signal.signal(signal.SIGTERM, _on_sigterm)

    session: ClientSession | None = None
    try:
        import torch

        torch.set_num_threads(args.threads)
        device = _select_device(args.device)
        from client.federated import make_runner
        from training import warm_up

        warm_up(device)  # before asking for work: a cold first shard would hold its round up

        state_path = args.state.expanduser()
        identity = state.load(state_path)
        server = http_base(args.server)
        detected = hardware.detect(include_gpus=device == "cuda")
        log.info(
            "client starting: server %s, device %s, %d cores, %.1f GiB RAM, %d GPU(s), identity %s",
            server,
            device,
            detected["cpu_info"]["cores"],
            detected["ram_info"]["total_gb"],
            len(detected["gpu_info"]),
            identity.client_id if identity else "(new)",
        )
        session = ClientSession(
            hardware=detected,
            identity=identity,
            runners={FEDERATED: make_runner(server, device)},
            save_identity=lambda ident: state.save(state_path, ident, server=server),
            forget_identity=lambda: state.clear(state_path),
            max_tasks=args.max_tasks,
            display=display,
            utilization=hardware.UtilizationProbe(include_gpus=device == "cuda").sample,
            rotate_token=args.rotate_token,
        )
        connection = Connection(
            args.server, session, backoff=Backoff(), give_up_after=args.give_up_after or None
        )
        connection.run()
        log.info("done: %d task result(s) acknowledged", args.max_tasks or 0)
        return EXIT_OK
    except KeyboardInterrupt:
        log.info("interrupted; stopping")
        return EXIT_INTERRUPTED
    except (Fatal, GaveUp, state.StateError) as error:
        log.error("fatal: %s", error)
        return EXIT_FATAL
    finally:
        if session is not None:
            session.shutdown(timeout=5.0)
