"""Checks of the container files that need no container engine."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_caddyfile_valid():
    caddy = shutil.which("caddy")
    assert caddy, "caddy is not installed; run scripts/setup.sh"
    result = subprocess.run(
        [caddy, "validate", "--config", str(ROOT / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_compose_has_services(compose):
    assert set(compose["services"]) == {"db", "redis", "api", "caddy"}


def test_compose_db_is_timescaledb_with_schema(compose):
    db = compose["services"]["db"]
    assert db["image"].startswith("timescale/timescaledb:")
    mounts = [volume.split(":") for volume in db["volumes"]]
    assert ["./schema.sql", "/docker-entrypoint-initdb.d/900_p1_schema.sql", "ro"] in mounts
    assert ["db-data", "/var/lib/postgresql/data"] in mounts
    assert "db-data" in compose["volumes"]


def test_compose_api_waits_for_healthy_db(compose):
    api = compose["services"]["api"]
    assert api["depends_on"]["db"]["condition"] == "service_healthy"
    assert "healthcheck" in compose["services"]["db"]


def test_compose_caddy_ports(compose):
    ports = [str(port) for port in compose["services"]["caddy"]["ports"]]
    assert "80:80" in ports
    assert "443:443" in ports


def test_dockerfile_runs_uvicorn_as_non_root():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12[\w.-]*-slim", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
    assert '"--port", "8000"' in dockerfile
    assert "EXPOSE 8000" in dockerfile
