"""A TCP proxy a test can cut: ``refuse`` (connections die at once) or ``blackhole`` (they hang)."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "pass"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def refuse(self) -> None:
        """Drop every connection and every new one, as a dead server would."""
        self.mode = "refuse"
        self._drop_all()

    def blackhole(self) -> None:
        """Accept but never answer, as a hung server or a dead network would."""
        self.mode = "blackhole"
        self._drop_all()

    def restore(self) -> None:
        self.mode = "pass"

    def _drop_all(self) -> None:
        # shutdown() before close(): a bare close() does not wake a thread blocked in recv()
        # on Linux, and the connection to the real server would stay open (and its locks held).
        with self._lock:
            for conn in self._conns:
                _kill(conn)
            self._conns.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            if self.mode == "refuse":
                client.close()
                continue
            if self.mode == "blackhole":
                with self._lock:
                    self._conns.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _kill(src)
            _kill(dst)


def _kill(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()
