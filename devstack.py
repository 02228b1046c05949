"""Start local PostgreSQL + TimescaleDB and Redis servers on the loopback interface.

The test suite, the benchmark and the dev runner use these throwaway servers.
Production runs the same servers from the container images in compose.yaml.

Run ``python devstack.py serve`` to start both servers, apply schema.sql and
run the service on 127.0.0.1:8000 until Ctrl-C. The database lives in
``.local/pgdata`` so that data survives a restart of the dev runner.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dotenv import dotenv_values

logger = logging.getLogger("devstack")

ROOT = Path(__file__).resolve().parent
SCHEMA = ROOT / "schema.sql"


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def find_postgres_bin() -> Path:
    """Return the bin directory of the newest PostgreSQL that has TimescaleDB."""
    libraries = sorted(
        glob.glob("/usr/lib/postgresql/*/lib/timescaledb.so"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    if not libraries:
        raise RuntimeError(
            "TimescaleDB is not installed for any PostgreSQL in /usr/lib/postgresql; "
            "run scripts/setup.sh as root"
        )
    return Path(libraries[-1]).parent.parent / "bin"


class PostgresServer:
    """A PostgreSQL cluster with TimescaleDB preloaded, listening only on 127.0.0.1.

    PostgreSQL refuses to run as root, so under root the cluster belongs to the
    ``postgres`` system user. Authentication is ``trust``, which is acceptable
    only because nothing but this machine can reach the port.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = True):
        self.data_dir = Path(data_dir)
        self.port = port or find_free_port()
        self.durable = durable
        self.bin = find_postgres_bin()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.log_file = self.data_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.user,
            check=True,
            capture_output=True,
            text=True,
            **kwargs,
        )

    def _prepare_directory(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            # The postgres user must be able to reach the data directory.
            for parent in self.data_dir.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    logger.warning("making %s searchable by others (o+x) so that PostgreSQL can reach its data", parent)
                    os.chmod(parent, mode | 0o001)
        self.data_dir.chmod(0o700)

    def start(self) -> None:
        self._prepare_directory()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
            )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            "-c unix_socket_directories=''",
            "-c shared_preload_libraries=timescaledb",
            # The only network here is loopback, and no usage report may leave it.
            "-c timescaledb.telemetry_level=off",
            "-c max_connections=200",
        ]
        if not self.durable:
            # Tests throw the cluster away, so they trade crash safety for speed.
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
            "-l", str(self.log_file), "-o", " ".join(options),
        )
        logger.info("PostgreSQL %s started on 127.0.0.1:%d", self.bin.parent.name, self.port)

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30")
        logger.info("PostgreSQL on 127.0.0.1:%d stopped", self.port)

    def psql(self, *args: str, database: str = "postgres") -> subprocess.CompletedProcess:
        """Run psql against this cluster and stop on the first SQL error."""
        return self._run(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, *args,
        )

    def apply_schema(self, schema: Path = SCHEMA, database: str = "postgres") -> None:
        self.psql("-f", str(schema), database=database)


class RedisServer:
    """A Redis server without persistence, listening only on 127.0.0.1."""

    def __init__(self, port: int | None = None):
        self.port = port or find_free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed; run scripts/setup.sh as root")
        self.process = subprocess.Popen(
            [
                executable, "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 20, self.process)
        logger.info("Redis started on 127.0.0.1:%d", self.port)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        logger.info("Redis on 127.0.0.1:%d stopped", self.port)


class ServiceProcess:
    """The service under uvicorn in a child process, on a loopback port.

    With a log file, its output goes there so that tests can read what it
    logged; without one, it goes to this process's terminal. The working
    directory is where the service looks for a .env file.
    """

    def __init__(self, environment: dict[str, str], *, log_file: Path | None = None,
                 port: int | None = None, cwd: Path = ROOT, uvicorn_args: tuple[str, ...] = ()):
        self.environment = environment
        self.log_file = log_file
        self.port = port or find_free_port()
        self.cwd = cwd
        self.uvicorn_args = uvicorn_args
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> None:
        command = [
            sys.executable, "-m", "uvicorn", "--factory", "app:create_app_from_environment",
            "--app-dir", str(ROOT), "--host", "127.0.0.1", "--port", str(self.port), *self.uvicorn_args,
        ]
        output = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, cwd=self.cwd, env=self.environment, stdout=output, stderr=subprocess.STDOUT,
            )
        finally:
            if output:
                output.close()
        if wait:
            wait_for_port(self.port, 30, self.process)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file else ""

    def stop(self, timeout_s: float = 15) -> int:
        """Send SIGTERM and return the exit status. Kill the process if it outlives the timeout."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def make_temporary_directory(prefix: str) -> Path:
    """Create a directory under the system's temporary directory."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def serve(arguments: argparse.Namespace) -> int:
    """Run PostgreSQL, Redis and the service until Ctrl-C or SIGTERM."""
    postgres = PostgresServer(ROOT / ".local" / "pgdata", arguments.pg_port)
    redis_server = RedisServer(arguments.redis_port)
    postgres.start()
    try:
        redis_server.start()
        postgres.apply_schema()
        environment = dict(os.environ)
        environment.setdefault("DATABASE_URL", postgres.dsn)
        environment.setdefault("REDIS_URL", redis_server.url)
        if not ({**dotenv_values(ROOT / ".env"), **environment}.get("DEVICE_TOKENS") or "").strip():
            logger.warning(
                "DEVICE_TOKENS is not set or empty: using the demo token 'demo-token' for device "
                "'demo-meter'. Never use it outside this machine."
            )
            environment["DEVICE_TOKENS"] = "demo-token:demo-meter"
        service = ServiceProcess(environment, port=arguments.port)
        service.start(wait=False)
        signal.signal(signal.SIGTERM, lambda *_: service.process.terminate())
        try:
            status = service.process.wait()
        except KeyboardInterrupt:
            status = service.stop()
        # uvicorn exits by the signal it stopped on, after a clean shutdown.
        return 0 if status in (-signal.SIGTERM, -signal.SIGINT) else status
    finally:
        redis_server.stop()
        postgres.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the databases and the service")
    serve_parser.add_argument("--port", type=int, default=8000, help="service port (default 8000)")
    serve_parser.add_argument("--pg-port", type=int, default=55432, help="PostgreSQL port (default 55432)")
    serve_parser.add_argument("--redis-port", type=int, default=56379, help="Redis port (default 56379)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return serve(arguments)


if __name__ == "__main__":
    sys.exit(main())
