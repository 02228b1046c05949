"""Network faults for tests: a TCP proxy that can be cut, frozen and restored, and a silent server."""

from __future__ import annotations

import socket
import threading

import devstack


def close_listener(listener: socket.socket) -> None:
    """Close a listening socket. Shutting it down first wakes a thread blocked in accept()."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


class TcpProxy:
    """A loopback TCP proxy in front of ``127.0.0.1:target_port``.

    ``cut()`` closes every connection and the listening socket, so new
    connections are refused; ``freeze()`` keeps connections open but stops
    forwarding bytes, as a network partition does; ``cut_after(n)`` drops
    every connection once ``n`` more bytes have gone to the target;
    ``thaw()`` ends a freeze and keeps the connections; ``restore()`` undoes
    all of these and drops frozen connections. ``connections`` counts accepted
    connections.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = devstack.find_free_port()
        self.connections = 0
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._bytes_left: int | None = None
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, to_target: bool) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                if to_target and self._spend(len(data)):
                    self._close_connections()
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                self._close(sock)

    def _spend(self, size: int) -> bool:
        """Count bytes sent to the target and return True once the cut_after budget is used up."""
        with self._lock:
            if self._bytes_left is None:
                return False
            self._bytes_left -= size
            return self._bytes_left <= 0

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _close_connections(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)

    def cut(self) -> None:
        if self._listener is not None:
            close_listener(self._listener)
            self._listener = None
        self._close_connections()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again on the frozen connections, as after a short network stall."""
        self._flowing.set()

    def cut_after(self, size: int) -> None:
        with self._lock:
            self._bytes_left = size

    def restore(self) -> None:
        """Forward again. Frozen connections are dropped, as a partition that lasted too long does."""
        if not self._flowing.is_set():
            self._close_connections()
            self._flowing.set()
        with self._lock:
            self._bytes_left = None
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self._flowing.set()
        self.cut()


class SilentServer:
    """A TCP server on loopback that accepts connections and never sends a byte."""

    def __init__(self):
        self.port = devstack.find_free_port()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(connection)

    def close(self) -> None:
        close_listener(self._listener)
        for connection in self._held:
            connection.close()
