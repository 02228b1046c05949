"""GET /ready: whether the service can take data."""


def test_ready_when_database_and_redis_answer(make_client):
    response = make_client().get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "redis": "ok"}


def test_ready_needs_no_token(make_client):
    assert make_client().get("/ready").status_code == 200
