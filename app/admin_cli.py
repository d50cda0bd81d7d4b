"""``python -m app tasks|clients|tokens ...``: the admin command line, over the REST API only.

    python -m app tasks submit FILE        create the task in FILE (a JSON object; - reads stdin)
    python -m app tasks list [--status S] [--type T] [--page N] [--per-page N]
    python -m app tasks show ID
    python -m app tasks watch ID           a progress bar per round until the task ends
    python -m app tasks pause|resume|stop ID
    python -m app clients list [--status S] [--page N] [--per-page N]
    python -m app clients disable|enable ID
    python -m app tokens list              admin API tokens: label, kind, dates (never a secret)
    python -m app tokens create [--label L] [--expires-in SECONDS]
                                           a new admin API token, printed once
    python -m app tokens revoke ID         the token is refused from the next request on

Every command takes ``--server URL`` (env ``AIFARM_SERVER``, default http://127.0.0.1:8000),
``--token TOKEN`` (env ``AIFARM_TOKEN``; an admin token) and ``--json`` (print the server's
JSON instead of text).

Exit status: 0 done; 1 the server refused (its message is printed), could not be reached,
or a file could not be read, or ``watch`` saw the task end other than completed; 2 bad
arguments; 130 interrupted.

This module talks HTTP with the standard library and draws bars with tqdm: it imports no
Flask, SQLAlchemy, Celery or torch, and never touches the database.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

PROG = "python -m app"
GROUPS = ("tasks", "clients", "tokens")
DEFAULT_SERVER = "http://127.0.0.1:8000"
FINAL_TASK = ("completed", "failed", "error", "stopped")  # as store.models.FINAL_TASK
OPEN_ASSIGNMENT = ("assigned", "training")
TASK_TARGETS = {"pause": "paused", "resume": "running", "stop": "stopped"}
CLIENT_TARGETS = {"disable": "disabled", "enable": "enabled"}
RETRY_STATUSES = (429, 503)  # watch waits these out: rate limited, or an outage that passes

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report as one line on stderr (exit 1)."""


class ServerError(CliError):
    """The server answered with an HTTP error."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class TaskEnded(CliError):
    """``watch`` saw the task end other than completed (exit 1; ``--json`` still prints it)."""

    def __init__(self, task: dict[str, Any], summary: str) -> None:
        super().__init__(summary)
        self.task = task


# --- HTTP ---


class Api:
    """The admin REST API at ``base``, with a bearer token."""

    def __init__(self, base: str, token: str, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise server_error(error) from None
        except urllib.error.URLError as error:
            raise CliError(f"cannot reach {self.base}: {reason(error.reason)}") from None
        except (OSError, http.client.HTTPException) as error:
            raise CliError(f"cannot reach {self.base}: {reason(error)}") from None
        try:
            return json.loads(payload)
        except ValueError:
            raise CliError(
                f"{method} {path}: the answer is not JSON; is {self.base} an AI Farm server?"
            ) from None


def reason(error: object) -> str:
    """``Connection refused`` rather than ``[Errno 111] Connection refused``."""
    return str(getattr(error, "strerror", None) or error or type(error).__name__)


def server_error(error: urllib.error.HTTPError) -> ServerError:
    """``404 not_found: no task 9``, from the server's ``{"error": code, "message": text}``."""
    try:
        body = json.loads(error.read())
    except (ValueError, OSError):
        body = None
    detail = str(error.reason)
    if isinstance(body, dict) and (body.get("message") or body.get("error")):
        detail = ": ".join(str(body[k]) for k in ("error", "message") if body.get(k))
    retry = error.headers.get("Retry-After") if error.headers else None
    return ServerError(error.code, f"{error.code} {detail}", _seconds(retry))


def _seconds(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def query(**params: Any) -> str:
    """``?a=1&b=x`` from the parameters that are set."""
    given = {k: v for k, v in params.items() if v is not None}
    return "?" + urllib.parse.urlencode(given) if given else ""


def quoted(text: str) -> str:
    return urllib.parse.quote(text, safe="")


# --- text output ---


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def page_footer(listing: dict[str, Any]) -> str:
    pages = max(1, -(-listing["total"] // max(1, listing["per_page"])))
    return f"{listing['total']} in all (page {listing['page']} of {pages})"


def metrics_text(metrics: dict[str, Any] | None) -> str:
    parts = []
    for key in ("test_accuracy", "test_loss", "train_loss", "updates"):
        value = (metrics or {}).get(key)
        if isinstance(value, float):
            parts.append(f"{key}={value:.4f}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def total_rounds(task: dict[str, Any]) -> int:
    rounds = (task.get("config") or {}).get("rounds")
    return rounds if isinstance(rounds, int) and rounds > 0 else 1


def round_text(task: dict[str, Any]) -> str:
    return f"{task['current_round'] + 1}/{total_rounds(task)}"


def task_line(task: dict[str, Any]) -> str:
    reason = f" ({task['status_reason']})" if task.get("status_reason") else ""
    return f"task {task['id']}: {task['type']}, {task['status']}{reason}"


def task_text(task: dict[str, Any]) -> str:
    lines = [
        task_line(task),
        f"priority {task['priority']}, {task['num_shards']} shard(s), round {round_text(task)}",
        f"created {task['created_at']}, updated {task['updated_at']}",
    ]
    if task.get("shards"):
        lines.append("shards: " + " ".join(f"{k}={v}" for k, v in sorted(task["shards"].items())))
    for r in task.get("rounds", []):
        lines.append(f"  round {r['round'] + 1}: {r['status']} {metrics_text(r.get('metrics'))}".rstrip())
    held = [a for a in task.get("assignments", []) if a["status"] in OPEN_ASSIGNMENT]
    for a in sorted(held, key=lambda a: (a["round"], a["rank"])):
        progress = f"{a['progress']:.0f}%" if a.get("progress") is not None else "-"
        lines.append(f"  rank {a['rank']}: {a['status']} by {a['client_id']}, {progress}")
    if task.get("result") is not None:
        lines.append("result: " + json.dumps(task["result"].get("final", task["result"]), sort_keys=True))
    if task.get("error_log"):
        lines.append(f"error: {task['error_log']}")
    return "\n".join(lines)


# --- watch ---


def round_progress(task: dict[str, Any], round_no: int) -> float:
    """The round's percentage: each rank's best assignment (a completed one is 100)."""
    best: dict[int, float] = {}
    for a in task.get("assignments", []):
        if a["round"] != round_no:
            continue
        if a["status"] == "completed":
            value = 100.0
        elif a["status"] in OPEN_ASSIGNMENT:
            value = float(a.get("progress") or 0.0)
        else:
            value = 0.0
        best[a["rank"]] = max(best.get(a["rank"], 0.0), value)
    return min(100.0, sum(best.values()) / max(1, task["num_shards"]))


class RoundBars:
    """One tqdm bar per round: the current round's advances, finished rounds close at 100%."""

    def __init__(self, task_id: int, out: TextIO) -> None:
        self.task_id = task_id
        self.out = out
        self.bars: dict[int, Any] = {}
        self.closed: set[int] = set()

    def _bar(self, round_no: int, rounds: int) -> Any:
        if round_no not in self.bars:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: nothing here needs it
            self.bars[round_no] = tqdm(
                total=100.0,
                desc=f"task {self.task_id} round {round_no + 1}/{rounds}",
                bar_format="{l_bar}{bar}| {n:.0f}%{postfix}",
                file=self.out,
                leave=True,
            )
        return self.bars[round_no]

    def _set(self, round_no: int, rounds: int, value: float, postfix: str) -> None:
        bar = self._bar(round_no, rounds)
        bar.n = value
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def _close(self, round_no: int) -> None:
        if round_no in self.bars and round_no not in self.closed:
            self.bars[round_no].close()
        self.closed.add(round_no)

    def show(self, task: dict[str, Any]) -> None:
        rounds = total_rounds(task)
        for r in task.get("rounds", []):
            if r["status"] != "training" and r["round"] not in self.closed:
                value = 100.0 if r["status"] == "done" else round_progress(task, r["round"])
                self._set(r["round"], rounds, value, f"{r['status']} {metrics_text(r.get('metrics'))}")
                self._close(r["round"])
        current = task["current_round"]
        if current not in self.closed:
            value = 100.0 if task["status"] == "completed" else round_progress(task, current)
            self._set(current, rounds, value, task["status"])
            if task["status"] in FINAL_TASK:
                self._close(current)

    def close(self) -> None:
        for round_no in list(self.bars):
            self._close(round_no)


def watch(api: Api, task_id: int, interval: float, out: TextIO) -> dict[str, Any]:
    """Poll the task every ``interval`` seconds, drawing its rounds, until it ends; returns it."""
    bars = RoundBars(task_id, out)
    try:
        while True:
            try:
                task = api.call("GET", f"/api/tasks/{task_id}")
            except ServerError as error:
                if error.status not in RETRY_STATUSES:
                    raise
                time.sleep(max(interval, error.retry_after or 0.0))
                continue
            bars.show(task)
            if task["status"] in FINAL_TASK:
                return dict(task)
            time.sleep(interval)
    finally:
        bars.close()


# --- commands ---


def read_task_file(name: str) -> Any:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {name}: {getattr(error, 'strerror', None) or error}") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise CliError(f"{name} is not valid JSON: {error}") from None


def tasks_submit(api: Api, args: argparse.Namespace) -> Any:
    task = api.call("POST", "/api/tasks", read_task_file(args.file))
    return task, f"submitted {task_line(task)}"


def tasks_list(api: Api, args: argparse.Namespace) -> Any:
    listing = api.call(
        "GET",
        "/api/tasks" + query(status=args.status, type=args.type, page=args.page, per_page=args.per_page),
    )
    rows = [
        (t["id"], t["status"], t["type"], round_text(t), t["num_shards"], t["priority"], t["created_at"])
        for t in listing["items"]
    ]
    headers = ("ID", "STATUS", "TYPE", "ROUND", "SHARDS", "PRIORITY", "CREATED")
    return listing, table(headers, rows) + "\n" + page_footer(listing)


def tasks_show(api: Api, args: argparse.Namespace) -> Any:
    task = api.call("GET", f"/api/tasks/{args.id}")
    return task, task_text(task)


def tasks_set_status(api: Api, args: argparse.Namespace) -> Any:
    task = api.call("PUT", f"/api/tasks/{args.id}/status", {"status": TASK_TARGETS[args.action]})
    return task, task_line(task)


def tasks_watch(api: Api, args: argparse.Namespace) -> Any:
    task = watch(api, args.id, args.interval, sys.stderr)
    final = (task.get("result") or {}).get("final")
    summary = task_line(task) + (f"; {metrics_text(final)}" if final else "")
    if task["status"] != "completed":
        raise TaskEnded(task, summary)
    return task, summary


def clients_list(api: Api, args: argparse.Namespace) -> Any:
    listing = api.call(
        "GET", "/api/clients" + query(status=args.status, page=args.page, per_page=args.per_page)
    )
    rows = [
        (
            c["id"],
            c["status"],
            "disabled" if c["disabled"] else "enabled",
            "yes" if c["connected"] else "no",
            ",".join(c.get("task_types") or []) or "any",
            c["last_seen"],
        )
        for c in listing["items"]
    ]
    headers = ("ID", "STATUS", "ENABLED", "CONNECTED", "TASK_TYPES", "LAST_SEEN")
    return listing, table(headers, rows) + "\n" + page_footer(listing)


def clients_set_status(api: Api, args: argparse.Namespace) -> Any:
    body = {"status": CLIENT_TARGETS[args.action]}
    client = api.call("PUT", f"/api/clients/{quoted(args.id)}/status", body)
    return client, f"client {client['id']}: {'disabled' if client['disabled'] else 'enabled'}"


def tokens_list(api: Api, args: argparse.Namespace) -> Any:
    listing = api.call("GET", "/api/tokens")
    rows = [
        (
            t["id"],
            t["label"],
            t["kind"],
            t["created_at"],
            t["expires_at"] or "never",
            t["last_used_at"] or "never",
            "yes" if t["expired"] else "no",
        )
        for t in listing["items"]
    ]
    headers = ("ID", "LABEL", "KIND", "CREATED", "EXPIRES", "LAST_USED", "EXPIRED")
    return listing, table(headers, rows)


def tokens_create(api: Api, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"label": args.label}
    if args.expires_in is not None:
        body["expires_in"] = args.expires_in
    made = api.call("POST", "/api/tokens", body)
    expires = made["expires_at"] or "never"
    shown = f"token {made['id']} ({made['label']}, expires {expires}); shown once, keep it now:"
    return made, f"{shown}\n{made['token']}"


def tokens_revoke(api: Api, args: argparse.Namespace) -> Any:
    done = api.call("DELETE", f"/api/tokens/{args.id}")
    return done, f"token {done['revoked']} revoked"


Command = Callable[[Api, argparse.Namespace], Any]


# --- arguments ---


def _server_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be within 0.1..3600 seconds, got {value}")
    return value


def _common() -> argparse.ArgumentParser:
    """The options every command takes (after its name: ``tasks list --token T``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        type=_server_url,
        default=os.environ.get("AIFARM_SERVER") or DEFAULT_SERVER,
        help=f"server URL (env AIFARM_SERVER; default {DEFAULT_SERVER})",
    )
    common.add_argument(
        "--token", default=os.environ.get("AIFARM_TOKEN"), help="admin token (env AIFARM_TOKEN)"
    )
    common.add_argument("--json", action="store_true", help="print the server's JSON instead of text")
    return common


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page", type=int, help="page number (default 1)")
    parser.add_argument("--per-page", type=int, help="items per page (default 20, at most 100)")


def _add_tasks(groups: Any, common: argparse.ArgumentParser) -> None:
    tasks = groups.add_parser("tasks", help="submit, list, show, watch, pause, resume and stop tasks")
    actions = tasks.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = actions.add_parser("submit", parents=[common], help="create the task described in FILE")
    submit.add_argument(
        "file", metavar="FILE", help='a JSON object: {"type": ..., "config": ...}; - for stdin'
    )
    submit.set_defaults(command=tasks_submit)
    listing = actions.add_parser("list", parents=[common], help="list tasks, newest first")
    listing.add_argument("--status", help="only tasks in this status")
    listing.add_argument("--type", help="only tasks of this type")
    _paging(listing)
    listing.set_defaults(command=tasks_list)
    show = actions.add_parser("show", parents=[common], help="a task's status, shards, rounds and holders")
    show.add_argument("id", type=int, metavar="ID")
    show.set_defaults(command=tasks_show)
    watch_cmd = actions.add_parser(
        "watch", parents=[common], help="a progress bar per round until the task ends"
    )
    watch_cmd.add_argument("id", type=int, metavar="ID")
    watch_cmd.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        help="seconds between polls (default 2; RATE_LIMIT counts them)",
    )
    watch_cmd.set_defaults(command=tasks_watch)
    for action, target in TASK_TARGETS.items():
        change = actions.add_parser(action, parents=[common], help=f"set the task {target}")
        change.add_argument("id", type=int, metavar="ID")
        change.set_defaults(command=tasks_set_status)


def _add_clients(groups: Any, common: argparse.ArgumentParser) -> None:
    clients = groups.add_parser("clients", help="list, disable and enable volunteer clients")
    actions = clients.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="list clients, newest first")
    listing.add_argument("--status", help="active, inactive or disabled")
    _paging(listing)
    listing.set_defaults(command=clients_list)
    for action in CLIENT_TARGETS:
        change = actions.add_parser(action, parents=[common], help=f"{action} a client")
        change.add_argument("id", metavar="ID")
        change.set_defaults(command=clients_set_status)


def _seconds_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {value}")
    return value


def _add_tokens(groups: Any, common: argparse.ArgumentParser) -> None:
    tokens = groups.add_parser("tokens", help="list, create and revoke admin API tokens")
    actions = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="admin tokens (never their secrets)")
    listing.set_defaults(command=tokens_list)
    create = actions.add_parser("create", parents=[common], help="a new admin API token, printed once")
    create.add_argument("--label", default="api", help="what the token is for (default: api)")
    create.add_argument(
        "--expires-in", type=_seconds_arg, metavar="SECONDS", help="refused after this many seconds"
    )
    create.set_defaults(command=tokens_create)
    revoke = actions.add_parser("revoke", parents=[common], help="refuse the token from now on")
    revoke.add_argument("id", type=int, metavar="ID")
    revoke.set_defaults(command=tokens_revoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="AI Farm admin commands, over the REST API.",
        epilog="The server's own commands: python -m app [serve | token LABEL | init-db | bootstrap-token].",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    common = _common()
    _add_tasks(groups, common)
    _add_clients(groups, common)
    _add_tokens(groups, common)
    return parser


# --- main ---


def run(command: Command, api: Api, args: argparse.Namespace) -> int:
    try:
        body, text = command(api, args)
    except TaskEnded as ended:
        if args.json:
            print(json.dumps(ended.task, indent=2))
        print(f"{PROG}: error: {ended}", file=sys.stderr)
        return EXIT_FAILED
    except CliError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(body, indent=2) if args.json else text)
    return EXIT_OK


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if not args.token:
        parser.error("--token (or AIFARM_TOKEN) is required: an admin token")
    api = Api(args.server, args.token)
    try:
        return run(args.command, api, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
