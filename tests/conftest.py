"""Fixtures: a real TimescaleDB and Redis for the whole session, an app per test.

The session starts its own PostgreSQL + TimescaleDB and Redis on free
loopback ports and stops them at the end. To run against servers that are
already up, set TEST_DATABASE_URL and TEST_REDIS_URL; the schema is applied
to that database, and each test writes only rows of its own device ids.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest
import redis
from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app as service  # noqa: E402
import devstack  # noqa: E402


@dataclass
class Stack:
    database_url: str
    redis_url: str
    postgres: devstack.PostgresServer | None = None
    redis_server: devstack.RedisServer | None = None


class Database:
    """A blocking wrapper around one asyncpg connection, for checks in tests."""

    def __init__(self, dsn: str):
        self.loop = asyncio.new_event_loop()
        self.connection: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(dsn))

    def fetch(self, query: str, *args) -> list[asyncpg.Record]:
        return self.loop.run_until_complete(self.connection.fetch(query, *args))

    def fetchval(self, query: str, *args):
        return self.loop.run_until_complete(self.connection.fetchval(query, *args))

    def execute(self, query: str, *args) -> str:
        return self.loop.run_until_complete(self.connection.execute(query, *args))

    def rows(self, device_id: str) -> list[asyncpg.Record]:
        return self.fetch("SELECT * FROM p1_samples WHERE device_id = $1 ORDER BY ts", device_id)

    def count(self, device_id: str) -> int:
        return self.fetchval("SELECT count(*) FROM p1_samples WHERE device_id = $1", device_id)

    def close(self) -> None:
        self.loop.run_until_complete(self.connection.close())
        self.loop.close()


def apply_schema(dsn: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute((ROOT / "schema.sql").read_text())
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    database_url = os.environ.get("TEST_DATABASE_URL")
    redis_url = os.environ.get("TEST_REDIS_URL")
    if database_url and redis_url:
        apply_schema(database_url)
        yield Stack(database_url, redis_url)
        return

    data_dir = devstack.make_temporary_directory("p1-test-pg-")
    postgres = devstack.PostgresServer(data_dir, durable=False)
    redis_server = devstack.RedisServer()
    postgres.start()
    try:
        redis_server.start()
        postgres.apply_schema()
        yield Stack(postgres.dsn, redis_server.url, postgres, redis_server)
    finally:
        redis_server.stop()
        postgres.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def db(stack: Stack) -> Iterator[Database]:
    database = Database(stack.database_url)
    yield database
    database.close()


@pytest.fixture(scope="session")
def cache(stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.fixture
def device_id() -> str:
    """A device id of this test alone, so that tests never see each other's rows."""
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def settings(stack: Stack, device_id: str, token: str) -> service.Settings:
    other_token = secrets.token_urlsafe(32)
    return service.Settings(
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        device_tokens={token: device_id, other_token: f"{device_id}-other"},
        db_timeout_s=3.0,
    )


@pytest.fixture
def start_service(tmp_path):
    """Start the service under uvicorn on a loopback port with the given environment. Each one stops after the test."""
    services = []

    def start(environment, wait=True):
        process = devstack.ServiceProcess(environment, log_file=tmp_path / "service.log", cwd=tmp_path)
        process.start(wait=wait)
        services.append(process)
        return process

    yield start
    for process in services:
        process.stop()


@pytest.fixture
def make_client(settings: service.Settings):
    """Build a TestClient, with the lifespan running, from the test's settings and overrides."""
    clients: list[TestClient] = []

    def build(**overrides) -> TestClient:
        client = TestClient(service.create_app(replace(settings, **overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client, token: str) -> TestClient:
    test_client = make_client()
    test_client.headers["Authorization"] = f"Bearer {token}"
    return test_client

