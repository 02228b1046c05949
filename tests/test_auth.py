"""Bearer token authentication of the /v1/ endpoints."""

import pytest
from helpers import sample


def test_health_needs_no_token(make_client):
    response = make_client().get("/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_valid_token_gives_its_device(client, device_id, db):
    response = client.post("/v1/ingest", json={"samples": [sample(device_id, "2024-03-01T12:00:00Z")]})
    assert response.status_code == 200
    assert db.count(device_id) == 1


def test_bearer_scheme_case_insensitive(make_client, token, device_id):
    body = {"samples": [sample(device_id, "2024-03-01T12:00:00Z")]}
    response = make_client().post("/v1/ingest", json=body, headers={"Authorization": f"bEaReR {token}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("header", "message"),
    [
        pytest.param(None, "missing Authorization header", id="missing"),
        pytest.param("Basic dXNlcjpwYXNz", "Authorization header must use the Bearer scheme", id="basic"),
        pytest.param("tokenwithoutscheme", "Authorization header must use the Bearer scheme", id="no-scheme"),
        pytest.param("Bearer", "Bearer token is empty", id="empty"),
        pytest.param("Bearer    ", "Bearer token is empty", id="blank"),
        pytest.param("Bearer not-a-known-token", "unknown token", id="unknown"),
        pytest.param([("Authorization", "Bearer x"), ("Authorization", "Bearer y")],
                     "more than one Authorization header", id="two-headers"),
    ],
)
def test_rejected_header_gives_401(make_client, device_id, db, header, message):
    headers = {} if header is None else header if isinstance(header, list) else {"Authorization": header}
    body = {"samples": [sample(device_id, "2024-03-01T12:00:00Z")]}
    response = make_client().post("/v1/ingest", json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": message}
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert db.count(device_id) == 0


def test_other_devices_token_rejected_with_403(make_client, settings, device_id, db):
    other_token = next(token for token, device in settings.device_tokens.items() if device != device_id)
    body = {"samples": [sample(device_id, "2024-03-01T12:00:00Z")]}
    response = make_client().post("/v1/ingest", json=body, headers={"Authorization": f"Bearer {other_token}"})
    assert response.status_code == 403
    assert db.count(device_id) == 0


def test_tab_after_scheme_accepted(make_client, token, device_id):
    body = {"samples": [sample(device_id, "2024-03-01T12:00:00Z")]}
    response = make_client().post("/v1/ingest", json=body, headers={"Authorization": f"Bearer\t{token}"})
    assert response.status_code == 200
