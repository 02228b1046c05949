"""The container files: Caddyfile, compose.yaml, Dockerfile and the database init, checked without a container engine.

compose.yaml is validated against the Compose specification's JSON schema as
vendored by check-jsonschema. The database init runs schema.sql the way the
postgres image's entrypoint does, on the session's TimescaleDB cluster.
"""

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from caddy_server import find_caddy

import app as service
import devstack

ROOT = Path(__file__).resolve().parent.parent

# The init scripts of the timescale/timescaledb images, which run before ours.
TIMESCALE_INIT_SCRIPTS = ("000_install_timescaledb.sh", "001_timescaledb_tune.sh")

# The command of docker_process_sql in the postgres image's docker-entrypoint.sh.
ENTRYPOINT_PSQL = (
    'psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc --dbname "$POSTGRES_DB"'
)

# A pinned image tag names a full version, such as 2.19.3-pg17 or 7.4.2-alpine.
PINNED_TAG = re.compile(r"^\d+\.\d+\.\d+(-[\w.-]+)?$")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_json_instruction(dockerfile: str, instruction: str) -> list[str]:
    """Return the JSON array of an instruction such as CMD, joined across continuation lines."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    match = re.search(rf"^{instruction} .*?(\[.*\])$", joined, re.MULTILINE)
    assert match, f"the Dockerfile has no {instruction} in JSON form"
    return json.loads(match.group(1))


def required_variables(compose_text: str) -> set[str]:
    """Return the variables that compose.yaml requires with ${NAME:?message}."""
    return set(re.findall(r"\$\{(\w+):\?", compose_text))


# Caddyfile


def test_caddyfile_valid(tmp_path):
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "SITE_ADDRESS": "p1.example.com",
    }
    result = subprocess.run(
        [find_caddy(), "validate", "--config", str(ROOT / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60, env=environment,
    )
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_caddyfile_body_limit_matches_service():
    defaults = re.findall(r"\{\$MAX_BODY_BYTES:(\d+)\}", (ROOT / "Caddyfile").read_text())
    assert defaults
    assert {int(default) for default in defaults} == {service.Settings.max_body_bytes}


def test_compose_passes_body_limit_to_both(compose):
    api = compose["services"]["api"]["environment"]["MAX_BODY_BYTES"]
    caddy = compose["services"]["caddy"]["environment"]["MAX_BODY_BYTES"]
    assert api == caddy == f"${{MAX_BODY_BYTES:-{service.Settings.max_body_bytes}}}"


# compose.yaml


def test_compose_matches_specification_schema():
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "compose.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_has_services(compose):
    assert set(compose["services"]) == {"db", "redis", "api", "caddy"}


@pytest.mark.parametrize("name", ["db", "redis", "caddy"])
def test_compose_image_tags_pinned(compose, name):
    image = compose["services"][name]["image"]
    _, _, tag = image.partition(":")
    assert PINNED_TAG.match(tag), f"{name} uses {image!r}; pin a full version"


@pytest.mark.parametrize("name", ["db", "redis", "api"])
def test_compose_health_checks(compose, name):
    assert compose["services"][name]["healthcheck"]["test"]


@pytest.mark.parametrize(("name", "dependency"), [("api", "db"), ("api", "redis"), ("caddy", "api")])
def test_compose_waits_for_healthy(compose, name, dependency):
    assert compose["services"][name]["depends_on"][dependency]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["db", "redis", "api", "caddy"])
def test_compose_restart_policy(compose, name):
    assert compose["services"][name]["restart"] == "unless-stopped"


@pytest.mark.parametrize(
    ("name", "volume", "target"),
    [("db", "db-data", "/var/lib/postgresql/data"), ("caddy", "caddy-data", "/data"),
     ("caddy", "caddy-config", "/config")],
)
def test_compose_named_volumes(compose, name, volume, target):
    assert f"{volume}:{target}" in compose["services"][name]["volumes"]
    assert volume in compose["volumes"]


def test_compose_api_can_scale(compose):
    api = compose["services"]["api"]
    assert "ports" not in api
    assert "container_name" not in api
    assert api["deploy"]["replicas"] == "${API_REPLICAS:-1}"


def test_compose_caddy_ports(compose):
    ports = [str(port) for port in compose["services"]["caddy"]["ports"]]
    assert "80:80" in ports
    assert "443:443" in ports
    assert "443:443/udp" in ports


def test_compose_secrets_from_env_file():
    compose_text = (ROOT / "compose.yaml").read_text()
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?(\w+)=", example, re.MULTILINE))
    assert required_variables(compose_text) == {"POSTGRES_PASSWORD", "DEVICE_TOKENS", "SITE_ADDRESS"}
    assert required_variables(compose_text) <= listed


def test_env_file_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", ".env"], cwd=ROOT, capture_output=True, timeout=30)
    assert ignored.returncode == 0
    assert tracked.returncode != 0


def test_compose_schema_mount_sorts_last(compose):
    mounts = [volume for volume in compose["services"]["db"]["volumes"] if volume.startswith("./schema.sql:")]
    assert len(mounts) == 1
    source, target, mode = mounts[0].split(":")
    directory, _, name = target.rpartition("/")
    assert directory == "/docker-entrypoint-initdb.d"
    assert name.endswith(".sql")
    assert mode == "ro"
    assert sorted([*TIMESCALE_INIT_SCRIPTS, name])[-1] == name


def test_compose_subnet_trusted_by_dockerfile(compose, dockerfile):
    subnets = [entry["subnet"] for entry in compose["networks"]["default"]["ipam"]["config"]]
    command = dockerfile_json_instruction(dockerfile, "CMD")
    trusted = command[command.index("--forwarded-allow-ips") + 1]
    assert subnets == [trusted]


def test_compose_api_healthcheck_as_dockerfile(compose, dockerfile):
    healthcheck = dockerfile_json_instruction(dockerfile, "HEALTHCHECK")
    assert compose["services"]["api"]["healthcheck"]["test"] == ["CMD", *healthcheck]


# Dockerfile


def test_dockerfile_base_image_pinned(dockerfile):
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim-\w+$", dockerfile, re.MULTILINE)


def test_dockerfile_runs_as_non_root(dockerfile):
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")


def test_dockerfile_installs_no_build_tools(dockerfile):
    commands = re.findall(r"^RUN (.*)$", re.sub(r"\\\n\s*", " ", dockerfile), re.MULTILINE)
    installs = [command for command in commands if "pip install" in command]
    assert installs
    assert all("--only-binary=:all:" in command for command in installs)
    assert not [command for command in commands if re.search(r"apt-get|apk |gcc|build-essential|\bmake\b", command)]


def test_dockerfile_health_uses_ready(dockerfile):
    healthcheck = dockerfile_json_instruction(dockerfile, "HEALTHCHECK")
    assert "http://127.0.0.1:8000/ready" in " ".join(healthcheck)


def test_dockerfile_trusts_proxy_headers(dockerfile):
    command = dockerfile_json_instruction(dockerfile, "CMD")
    assert command[:3] == ["uvicorn", "--factory", "app:create_app_from_environment"]
    assert "--proxy-headers" in command
    assert command[command.index("--port") + 1] == "8000"


@pytest.mark.parametrize("pattern", [".env", ".git", ".venv", ".local", "tests"])
def test_dockerignore_excludes(pattern):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert pattern in lines


# Database init and readiness


@pytest.fixture
def make_database(stack, db):
    """Create empty databases in the session's cluster and drop them at the end."""
    if stack.postgres is None:
        pytest.skip("needs the cluster that the test session started")
    names: list[str] = []

    def make() -> str:
        name = f"p1_init_{secrets.token_hex(4)}"
        db.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return name

    yield make
    for name in names:
        db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def scratch_database(make_database) -> str:
    return make_database()


def database_url(stack, name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{stack.postgres.port}/{name}"


def run_sql(stack, database: str, sql: str) -> None:
    subprocess.run(
        [str(stack.postgres.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
         "-p", str(stack.postgres.port), "-U", "postgres", "-d", database, "-c", sql],
        check=True, capture_output=True, text=True, timeout=60,
    )


def run_as_entrypoint(stack, database: str, sql_file: Path) -> subprocess.CompletedProcess:
    """Run an SQL file as the postgres image runs its init files, with TCP in place of its Unix socket."""
    environment = {
        "PATH": f"{stack.postgres.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": database,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(stack.postgres.port),
    }
    return subprocess.run(
        ["bash", "-c", f'{ENTRYPOINT_PSQL} -f "$1"', "init", str(sql_file)],
        env=environment, capture_output=True, text=True, timeout=120,
    )


def hypertables(stack, database: str) -> str:
    result = subprocess.run(
        [str(stack.postgres.bin / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(stack.postgres.port),
         "-U", "postgres", "-d", database, "-c",
         "SELECT string_agg(hypertable_name, ',') FROM timescaledb_information.hypertables"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return result.stdout.strip()


@pytest.fixture
def start_service(stack, tmp_path):
    """Start the service under uvicorn against a given database; stop it at the end."""
    started: list[devstack.ServiceProcess] = []

    def start(database: str) -> devstack.ServiceProcess:
        environment = {
            "DATABASE_URL": database_url(stack, database),
            "REDIS_URL": stack.redis_url,
            "DEVICE_TOKENS": f"{secrets.token_urlsafe(32)}:test-init",
        }
        process = devstack.ServiceProcess(
            environment, log_file=tmp_path / f"service-{len(started)}.log", cwd=tmp_path,
        )
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.stop()


def test_schema_applies_as_entrypoint(stack, scratch_database):
    result = run_as_entrypoint(stack, scratch_database, ROOT / "schema.sql")
    assert result.returncode == 0, result.stderr
    assert hypertables(stack, scratch_database) == "p1_samples"


def test_ready_503_without_table(stack, scratch_database, start_service):
    run_sql(stack, scratch_database, "CREATE EXTENSION timescaledb")
    response = httpx.get(f"{start_service(scratch_database).url}/ready", timeout=10)
    assert response.status_code == 503
    assert response.json()["database"] == "p1_samples is missing or not a hypertable; apply schema.sql"


def test_half_initialized_database_recovers(stack, scratch_database, start_service):
    # An init that stopped after CREATE TABLE leaves a plain table, and the
    # image never runs its init files on that data volume again.
    create_table = re.search(r"CREATE TABLE .*?\);", (ROOT / "schema.sql").read_text(), re.DOTALL).group(0)
    run_sql(stack, scratch_database, f"CREATE EXTENSION timescaledb; {create_table}")
    server = start_service(scratch_database)
    before = httpx.get(f"{server.url}/ready", timeout=10)
    applied = run_as_entrypoint(stack, scratch_database, ROOT / "schema.sql")
    after = httpx.get(f"{server.url}/ready", timeout=10)
    assert before.status_code == 503
    assert applied.returncode == 0, applied.stderr
    assert after.status_code == 200


def test_healthcheck_follows_readiness(stack, scratch_database, start_service, dockerfile):
    healthcheck = dockerfile_json_instruction(dockerfile, "HEALTHCHECK")
    run_sql(stack, scratch_database, "CREATE EXTENSION timescaledb")
    server = start_service(scratch_database)
    # The image's python is this interpreter here, and the service listens on a free port, not 8000.
    command = [sys.executable if part == "python" else part.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
               for part in healthcheck]
    unhealthy = subprocess.run(command, capture_output=True, timeout=30)
    run_as_entrypoint(stack, scratch_database, ROOT / "schema.sql")
    healthy = subprocess.run(command, capture_output=True, timeout=30)
    assert unhealthy.returncode != 0
    assert healthy.returncode == 0, healthy.stderr


# schema-timescale.sql


def test_timescale_policies_rejected_on_apache(stack, scratch_database):
    run_as_entrypoint(stack, scratch_database, ROOT / "schema.sql")
    result = run_as_entrypoint(stack, scratch_database, ROOT / "schema-timescale.sql")
    assert result.returncode != 0
    assert "needs the Timescale edition of TimescaleDB, but this server runs the apache edition" in result.stderr
    assert hypertables(stack, scratch_database) == "p1_samples"


def test_timescale_policies_resolve_on_apache(stack, scratch_database, tmp_path):
    # Without the edition check, each statement reaches TimescaleDB's license
    # check, which comes after PostgreSQL has parsed it and resolved its functions.
    run_as_entrypoint(stack, scratch_database, ROOT / "schema.sql")
    unguarded = re.sub(r"DO \$\$.*?\$\$;", "", (ROOT / "schema-timescale.sql").read_text(), flags=re.DOTALL)
    (tmp_path / "unguarded.sql").write_text(unguarded)
    result = subprocess.run(
        [str(stack.postgres.bin / "psql"), "-X", "-h", "127.0.0.1", "-p", str(stack.postgres.port),
         "-U", "postgres", "-d", scratch_database, "-f", str(tmp_path / "unguarded.sql")],
        capture_output=True, text=True, timeout=60,
    )
    errors = [line for line in result.stderr.splitlines() if "ERROR:" in line]
    assert len(errors) == 3, result.stderr
    assert all('"apache" license' in line for line in errors), result.stderr



# Backup and restore as docs/operations.md describes them


def test_backup_restores_hypertable(stack, make_database, tmp_path):
    source, target = make_database(), make_database()
    run_as_entrypoint(stack, source, ROOT / "schema.sql")
    run_sql(stack, source, """
        INSERT INTO p1_samples
        SELECT 'test-backup', ts, 100, 100, NULL, NULL
        FROM generate_series('2024-01-01'::timestamptz, '2024-01-04', INTERVAL '1 minute') AS ts
    """)
    connection = ["-h", "127.0.0.1", "-p", str(stack.postgres.port), "-U", "postgres"]
    dump = tmp_path / "p1.dump"
    subprocess.run([str(stack.postgres.bin / "pg_dump"), *connection, "-d", source, "-Fc", "-f", str(dump)],
                   check=True, capture_output=True, timeout=120)

    run_sql(stack, target, "CREATE EXTENSION timescaledb; SELECT timescaledb_pre_restore();")
    with dump.open("rb") as stdin:
        restored = subprocess.run([str(stack.postgres.bin / "pg_restore"), *connection, "-d", target, "--no-owner"],
                                  stdin=stdin, capture_output=True, text=True, timeout=120)
    run_sql(stack, target, "SELECT timescaledb_post_restore();")

    count = subprocess.run(
        [str(stack.postgres.bin / "psql"), "-X", "-A", "-t", *connection, "-d", target,
         "-c", "SELECT count(*) FROM p1_samples"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    assert restored.returncode == 0, restored.stderr
    assert count.stdout.strip() == str(3 * 24 * 60 + 1)
    assert hypertables(stack, target) == "p1_samples"
