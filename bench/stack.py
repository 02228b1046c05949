"""The servers of one benchmark run: TimescaleDB, Redis and the service under uvicorn."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import devstack  # noqa: E402


def process_status(pid: int) -> dict[str, str]:
    """Return the fields of /proc/<pid>/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def child_pids(pid: int) -> list[int]:
    """Return the ids of the direct children of a process."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name in brackets may contain spaces, so split after its closing bracket.
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            children.append(int(entry))
    return children


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU time of a process in seconds, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of proc(5), the 12th and 13th after the command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


class CpuProbe:
    """CPU seconds that groups of processes spend between start() and stop().

    Processes are listed again at stop(), and only those present at both
    points count, so a process that starts or exits in between is missed.
    """

    def __init__(self, groups: dict[str, object]):
        # Each group is a function that returns the group's process ids now.
        self.groups = groups
        self.started: dict[str, dict[int, float]] = {}
        self.spent: dict[str, float] = {}

    def snapshot(self) -> dict[str, dict[int, float]]:
        times_by_group = {}
        for name, list_pids in self.groups.items():
            times = {pid: cpu_seconds(pid) for pid in list_pids()}
            times_by_group[name] = {pid: value for pid, value in times.items() if value is not None}
        return times_by_group

    def start(self) -> None:
        self.started = self.snapshot()

    def stop(self) -> None:
        ended = self.snapshot()
        self.spent = {
            name: sum(value - self.started[name][pid] for pid, value in times.items() if pid in self.started[name])
            for name, times in ended.items()
        }


def postgres_pids(data_dir: Path) -> list[int]:
    """Return the postmaster of a cluster and its child processes: backends and background workers."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [postmaster, *child_pids(postmaster)]


class Service:
    """The ingest service in a uvicorn child process, with its peak RSS read from /proc."""

    def __init__(self, workdir: Path, environment: dict[str, str], *, workers: int = 1,
                 loop: str = "auto", http: str = "auto", app_dir: Path | None = None):
        self.workdir = workdir
        self.workers = workers
        self.loop = loop
        self.http = http
        workdir.mkdir(parents=True, exist_ok=True)
        # The access log writes a line per request, which a production deployment behind Caddy does not need.
        arguments = ("--no-access-log", "--loop", loop, "--http", http, "--workers", str(workers))
        if app_dir is not None:
            # uvicorn takes the last --app-dir, so this one wins over devstack's.
            arguments += ("--app-dir", str(app_dir))
        self.process = devstack.ServiceProcess(
            environment, log_file=workdir / "service.log", cwd=workdir, uvicorn_args=arguments,
        )

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    def pids(self) -> list[int]:
        """Return the uvicorn process and, with --workers above 1, its worker processes."""
        if self.workers == 1:
            return [self.pid]
        return [self.pid, *child_pids(self.pid)]

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM of every service process. Returns False where the kernel does not allow it."""
        try:
            for pid in self.pids():
                with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")
        except OSError:
            return False
        return True

    def rss_kib(self, field: str = "VmHWM") -> int:
        """Return the sum over the service processes of a /proc status field in KiB, VmHWM or VmRSS."""
        total = 0
        for pid in self.pids():
            try:
                total += int(process_status(pid)[field].split()[0])
            except (OSError, KeyError):
                continue
        return total

    def log_problems(self) -> list[str]:
        """Return the log lines of level WARNING or above."""
        return [
            line for line in self.process.log().splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line
        ]


def start_databases() -> tuple[devstack.PostgresServer, devstack.RedisServer]:
    """Start a durable TimescaleDB (fsync on) and a Redis on free loopback ports and apply schema.sql.

    The data directory is a temporary directory of its own, because under root
    the cluster runs as the postgres user with group root, which cannot enter
    a directory that mkdtemp made for root.
    """
    postgres = devstack.PostgresServer(devstack.make_temporary_directory("p1-bench-pg-"), durable=True)
    redis_server = devstack.RedisServer()
    postgres.start()
    try:
        redis_server.start()
        postgres.apply_schema()
    except BaseException:
        postgres.stop()
        redis_server.stop()
        raise
    return postgres, redis_server


def describe_machine() -> dict[str, str]:
    """Return the facts about this machine that the results page names."""
    memory_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "n/a"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} cores, {cpu}",
        "memory": f"{memory_kib / 1024 / 1024:.1f} GiB",
        "os": f"Debian {debian}, Linux {platform.release()}",
        "python": platform.python_version(),
    }

