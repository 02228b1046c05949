"""Caddy with the project's Caddyfile, and the DNS server it finds the service replicas by.

Production runs the service as replicas of the compose service ``api``, and
Caddy gets their addresses from Docker's DNS server. Here a small DNS server
on a loopback port plays that part, and each replica is a uvicorn process on
its own loopback address (127.0.0.1, 127.0.0.2, ...) with the same port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import httpx

import devstack

ROOT = Path(__file__).resolve().parent.parent

DNS_TYPE_A = 1
DNS_CLASS_IN = 1

# One line of uvicorn's access log: client address, method, target and status.
ACCESS_LOG_LINE = re.compile(
    r'^INFO:\s+(?P<client>\S+):\d+ - "(?P<method>\S+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d+)'
)


class StaticDnsServer:
    """A DNS server on 127.0.0.1 that responds to every A query with ``addresses``.

    Other query types get a response without records. It serves UDP and TCP on the same
    port, because Caddy 2.6 sends the queries of ``dynamic a`` over TCP.
    Tests change ``addresses`` to add or remove replicas; Caddy sees the
    change at its next refresh.
    """

    def __init__(self, addresses: list[str]):
        self.addresses = list(addresses)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        for listener in (self.tcp, self.udp):
            listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True),
            threading.Thread(target=self._serve_tcp, name="dns-tcp", daemon=True),
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.tcp.listen()
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.tcp.close()
        self.udp.close()

    def _serve_udp(self) -> None:
        while not self.stopped.is_set():
            try:
                query, client = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            response = self.build_response(query)
            if response:
                self.udp.sendto(response, client)

    def _serve_tcp(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.tcp.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    self._serve_connection(connection)
                except OSError:
                    pass

    def _serve_connection(self, connection: socket.socket) -> None:
        """Respond to the queries on one TCP connection, each framed by a two-byte length, until it closes."""
        buffer = b""
        while True:
            chunk = connection.recv(4096)
            if not chunk:
                return
            buffer += chunk
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
                length = struct.unpack("!H", buffer[:2])[0]
                query, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                response = self.build_response(query)
                if response:
                    connection.sendall(struct.pack("!H", len(response)) + response)

    def build_response(self, query: bytes) -> bytes | None:
        """Build the response to one query, or None for a packet that is not a query."""
        if len(query) < 12:
            return None
        query_id, flags, question_count = struct.unpack("!HHH", query[:6])
        if flags & 0x8000 or question_count != 1:
            return None

        # The question is a sequence of labels ending in an empty one, then type and class.
        end = 12
        while end < len(query) and query[end] != 0:
            end += 1 + query[end]
        end += 1
        if end + 4 > len(query):
            return None
        question = query[12 : end + 4]
        query_type, query_class = struct.unpack("!HH", query[end : end + 4])

        answers = []
        if query_type == DNS_TYPE_A and query_class == DNS_CLASS_IN:
            for address in self.addresses:
                # 0xC00C points to the name in the question; TTL 1 s; 4 bytes of IPv4 address.
                record = struct.pack("!HHHIH", 0xC00C, DNS_TYPE_A, DNS_CLASS_IN, 1, 4)
                answers.append(record + socket.inet_aton(address))
        # Response, authoritative, recursion desired as in the query, recursion available.
        response_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080
        header = struct.pack("!HHHHHH", query_id, response_flags, 1, len(answers), 0, 0)
        return header + question + b"".join(answers)


def find_caddy() -> str:
    """Return the Caddy binary: $CADDY_BINARY if set, else caddy on the PATH."""
    caddy = os.environ.get("CADDY_BINARY") or shutil.which("caddy")
    if not caddy:
        raise RuntimeError("caddy is not installed; run scripts/setup.sh as root")
    return caddy


def caddy_version() -> tuple[int, ...]:
    """Return the version of the Caddy binary, e.g. (2, 6, 2)."""
    output = subprocess.run([find_caddy(), "version"], capture_output=True, text=True, check=True, timeout=30).stdout
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", output.strip())
    if match is None:
        raise ValueError(f"unexpected output of caddy version: {output!r}")
    return tuple(int(part) for part in match.groups())


class CaddyServer:
    """Caddy running the project's Caddyfile on free ports of 127.0.0.1.

    It serves the site ``localhost`` with a certificate of its internal CA.
    Its storage, configuration autosave and home directory are under
    ``directory``, so it never writes to the real home directory and never
    touches the system trust store (the Caddyfile sets skip_install_trust).
    """

    def __init__(self, directory: Path, *, dns: StaticDnsServer, api_port: int, max_body_bytes: int):
        self.directory = Path(directory)
        self.dns = dns
        self.api_port = api_port
        self.max_body_bytes = max_body_bytes
        self.http_port = devstack.find_free_port()
        self.https_port = devstack.find_free_port()
        self.log_file = self.directory / "caddy.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def http_url(self) -> str:
        return f"http://localhost:{self.http_port}"

    @property
    def root_certificate(self) -> Path:
        """The root certificate of Caddy's internal CA, which clients must trust."""
        return self.directory / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def environment(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.directory),
            "XDG_DATA_HOME": str(self.directory / "data"),
            "XDG_CONFIG_HOME": str(self.directory / "config"),
            "SITE_ADDRESS": "localhost",
            "CADDY_HTTP_PORT": str(self.http_port),
            "CADDY_HTTPS_PORT": str(self.https_port),
            "CADDY_ADMIN": "off",
            "CADDY_BIND": "127.0.0.1",
            "API_HOST": "api",
            "API_PORT": str(self.api_port),
            "API_RESOLVERS": self.dns.address,
            "MAX_BODY_BYTES": str(self.max_body_bytes),
        }

    def start(self, timeout_s: float = 30) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [find_caddy(), "run", "--config", str(ROOT / "Caddyfile"), "--adapter", "caddyfile"]
        with open(self.log_file, "ab") as output:
            self.process = subprocess.Popen(
                command, cwd=self.directory, env=self.environment(), stdout=output, stderr=subprocess.STDOUT,
            )
        devstack.wait_for_port(self.https_port, timeout_s, self.process)
        self._wait_for_certificate(timeout_s)

    def _wait_for_certificate(self, timeout_s: float) -> None:
        """Wait until a TLS handshake with the site succeeds, which needs the certificate issued."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"caddy exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.root_certificate.exists():
                    with httpx.Client(verify=self.ssl_context(), timeout=2) as client:
                        client.get(f"{self.url}/")
                    return
            except (httpx.TransportError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"caddy served no valid certificate after {timeout_s} s:\n{self.log()}")
            time.sleep(0.1)

    def ssl_context(self) -> ssl.SSLContext:
        """Return a TLS context that trusts Caddy's internal CA and nothing else."""
        return ssl.create_default_context(cafile=str(self.root_certificate))

    def client(self, **kwargs) -> httpx.Client:
        """Return an HTTPS client of the site that trusts Caddy's internal CA and nothing else."""
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), timeout=30, **kwargs)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def dockerfile_uvicorn_options(forwarded_allow_ips: str) -> tuple[str, ...]:
    """Return the uvicorn options of the Dockerfile's CMD, without --host and --port.

    ``--forwarded-allow-ips`` gets the given value in place of the compose
    network, so the tests run uvicorn as the container does.
    """
    dockerfile = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    if match is None:
        raise ValueError("the Dockerfile has no CMD in JSON form")
    command = json.loads(match.group(1))
    options = command[command.index("app:create_app_from_environment") + 1 :]

    selected: list[str] = []
    position = 0
    while position < len(options):
        option = options[position]
        takes_value = position + 1 < len(options) and not options[position + 1].startswith("--")
        value = options[position + 1] if takes_value else None
        position += 2 if takes_value else 1
        if option in ("--host", "--port"):
            continue
        if option == "--forwarded-allow-ips":
            value = forwarded_allow_ips
        selected += [option, value] if value is not None else [option]
    return tuple(selected)


def access_log(log: str) -> list[dict[str, str]]:
    """Return the entries of uvicorn's access log in ``log``."""
    return [match.groupdict() for line in log.splitlines() if (match := ACCESS_LOG_LINE.match(line))]


def wait_for_address(host: str, port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")
