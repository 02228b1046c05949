"""Settings from environment variables: defaults, and every malformed value."""

import pytest

import app as service

BASE = {
    "DATABASE_URL": "postgresql://user:secret-password@db:5432/p1",
    "REDIS_URL": "redis://redis:6379/0",
    "DEVICE_TOKENS": "tokenA:device-1,tokenB:device-2",
}


def test_defaults():
    settings = service.load_settings(BASE)
    assert settings.cache_ttl_s == 5
    assert settings.max_body_bytes == 2 * 1024 * 1024
    assert settings.max_batch_samples == 10_000
    assert settings.database_url == BASE["DATABASE_URL"]
    assert settings.redis_url == BASE["REDIS_URL"]


def test_tokens_map_to_devices():
    settings = service.load_settings(BASE)
    assert settings.device_tokens == {"tokenA": "device-1", "tokenB": "device-2"}


def test_tokens_whitespace_ignored():
    environ = {**BASE, "DEVICE_TOKENS": "  tokenA : device-1 ,\n tokenB:device-2 , "}
    assert service.load_settings(environ).device_tokens == {"tokenA": "device-1", "tokenB": "device-2"}


def test_tokens_device_with_two_tokens():
    environ = {**BASE, "DEVICE_TOKENS": "old-token:device-1,new-token:device-1"}
    assert service.load_settings(environ).device_tokens == {"old-token": "device-1", "new-token": "device-1"}


def test_cache_ttl_zero_allowed():
    assert service.load_settings({**BASE, "CACHE_TTL_S": "0"}).cache_ttl_s == 0


def test_cache_ttl_set():
    assert service.load_settings({**BASE, "CACHE_TTL_S": " 30 "}).cache_ttl_s == 30


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        pytest.param({**BASE, "DEVICE_TOKENS": "secretA"}, "DEVICE_TOKENS entry 1 has no ':'", id="no-colon"),
        pytest.param(
            {**BASE, "DEVICE_TOKENS": "tokenA:device-1,secretB"}, "DEVICE_TOKENS entry 2 has no ':'",
            id="no-colon-second",
        ),
        pytest.param({**BASE, "DEVICE_TOKENS": ":device-1"}, "entry 1 has an empty token", id="empty-token"),
        pytest.param({**BASE, "DEVICE_TOKENS": "secretA:"}, "entry 1 has an empty device id", id="empty-device"),
        pytest.param(
            {**BASE, "DEVICE_TOKENS": "secretA:device-1,secretA:device-2"},
            "entry 2 repeats the token of entry 1", id="duplicate-token",
        ),
        pytest.param(
            {**BASE, "DEVICE_TOKENS": "secret A:device-1"}, "entry 1 has a token with characters",
            id="token-with-space",
        ),
        pytest.param(
            {**BASE, "DEVICE_TOKENS": "secretA:device one"}, "entry 1 has an invalid device id",
            id="device-with-space",
        ),
        pytest.param(
            {**BASE, "DEVICE_TOKENS": "abc:secretB:device-1"}, "entry 1 has more than one ':'", id="two-colons",
        ),
        pytest.param({**BASE, "DEVICE_TOKENS": " , "}, "DEVICE_TOKENS contains no", id="no-entries"),
        pytest.param({**BASE, "CACHE_TTL_S": "-1"}, "CACHE_TTL_S must be an integer from 0 to", id="ttl-negative"),
        pytest.param({**BASE, "CACHE_TTL_S": "five"}, "CACHE_TTL_S must be an integer from 0 to", id="ttl-text"),
        pytest.param({**BASE, "CACHE_TTL_S": "1.5"}, "CACHE_TTL_S must be an integer from 0 to", id="ttl-float"),
        pytest.param({**BASE, "CACHE_TTL_S": "1_000"}, "CACHE_TTL_S must be an integer from 0 to", id="ttl-underscore"),
        pytest.param({**BASE, "CACHE_TTL_S": "\u0665"}, "CACHE_TTL_S must be an integer from 0", id="ttl-arabic-digit"),
        pytest.param(
            {**BASE, "CACHE_TTL_S": "99999999999999999999"}, "CACHE_TTL_S must be an integer from 0 to 86400",
            id="ttl-huge",
        ),
        pytest.param({**BASE, "MAX_BODY_BYTES": "10"}, "MAX_BODY_BYTES must be an integer from 1024", id="body-small"),
        pytest.param({**BASE, "DB_TIMEOUT_S": "1e-9"}, "DB_TIMEOUT_S must be a number of seconds", id="timeout-tiny"),
        pytest.param({**BASE, "DB_TIMEOUT_S": "nan"}, "DB_TIMEOUT_S must be a number of seconds", id="timeout-nan"),
        pytest.param({**BASE, "LOG_LEVEL": "bogus"}, "LOG_LEVEL must be one of", id="log-level"),
        pytest.param(
            {**BASE, "DATABASE_URL": "postgresql://u:secret-pw@db:abc/p1"}, "DATABASE_URL is not a valid URL",
            id="database-port",
        ),
        pytest.param(
            {**BASE, "DATABASE_URL": "postgresql://u:secret-pw@[::1/p1"}, "DATABASE_URL is not a valid URL",
            id="database-ipv6",
        ),
        pytest.param({**BASE, "REDIS_URL": "redis://:secret@/0"}, "REDIS_URL has no host name", id="redis-no-host"),
        pytest.param({**BASE, "DB_TIMEOUT_S": "0"}, "DB_TIMEOUT_S must be a number of seconds", id="timeout-zero"),
        pytest.param({**BASE, "DATABASE_URL": "mysql://x"}, "DATABASE_URL must start with", id="database-scheme"),
    ],
)
def test_malformed_value_rejected(environ, message):
    with pytest.raises(service.ConfigError) as raised:
        service.load_settings(environ)
    assert message in str(raised.value)
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize("name", ["DATABASE_URL", "REDIS_URL", "DEVICE_TOKENS"])
def test_missing_required_variable(name):
    environ = {key: value for key, value in BASE.items() if key != name}
    with pytest.raises(service.ConfigError, match=f"{name} is required but not set"):
        service.load_settings(environ)


@pytest.mark.parametrize("name", ["DATABASE_URL", "REDIS_URL", "DEVICE_TOKENS"])
def test_empty_required_variable(name):
    with pytest.raises(service.ConfigError, match=f"{name} is required but not set"):
        service.load_settings({**BASE, name: "  "})


def test_database_url_password_never_shown():
    with pytest.raises(service.ConfigError) as raised:
        service.load_settings({**BASE, "DATABASE_URL": "mysql://user:secret-password@db/p1"})
    assert "secret-password" not in str(raised.value)


def test_swapped_entry_warning_names_no_device(caplog):
    token = "Zk3v9Q2mX8pL4rT7wY1cN6bH5jD0sF2gA9eK3uV8qR4"
    settings = service.load_settings({**BASE, "DEVICE_TOKENS": f"meter-1:{token}"})
    service.warn_about_weak_tokens(settings)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "check that each entry is token:device_id" in messages[1]
    assert all(token not in message for message in messages)


def test_unset_optional_values_defaults():
    settings = service.load_settings({**BASE, "CACHE_TTL_S": "", "LOG_LEVEL": ""})
    assert settings.cache_ttl_s == 5
    assert settings.log_level == "INFO"


def test_token_map_finds_device():
    tokens = service.TokenMap({"tokenA": "device-1"})
    assert tokens.device_for("tokenA") == "device-1"


@pytest.mark.parametrize("presented", ["tokenB", "tokenA ", "tokena", "tokenA" * 100])
def test_token_map_unknown_token(presented):
    assert service.TokenMap({"tokenA": "device-1"}).device_for(presented) is None
