"""The ingest benchmark with its --smoke settings, so that it keeps working between full runs."""

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(stack, tmp_path_factory):
    """Run the benchmark once against the session's servers and return its process, JSON results and Markdown."""
    output = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, str(ROOT / "bench" / "ingest_bench.py"), "--smoke",
        "--database-url", stack.database_url, "--redis-url", stack.redis_url,
        "--device-prefix", f"test-{secrets.token_hex(4)}-",
        "--output", str(output / "ingest.md"), "--json", str(output / "ingest.json"),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=output)
    data = json.loads((output / "ingest.json").read_text()) if (output / "ingest.json").exists() else {}
    markdown = (output / "ingest.md").read_text() if (output / "ingest.md").exists() else ""
    return completed, data, markdown


def test_smoke_run_exits_zero(smoke_run):
    completed, data, _ = smoke_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert data["failures"] == []


def test_smoke_main_has_every_pair(smoke_run):
    _, data, _ = smoke_run
    main = {(r["target"], r["batch_size"], r["uploaders"]) for r in data["results"] if r["section"] == "main"}
    expected = {(target, size, count) for target in ("ceiling", "service") for size in (10, 100) for count in (1, 4)}
    assert main == expected


def test_smoke_counts_add_up(smoke_run):
    _, data, _ = smoke_run
    assert data["results"]
    for result in data["results"]:
        label = f"{result['section']} {result['variant']} {result['target']} {result['batch_size']}"
        assert result["errors"] == 0, label
        assert result["rows_sent"] > 0, label
        assert result["inserted"] == result["rows_sent"], label
        assert result["stored"] == result["rows_sent"], label


def test_smoke_service_results_have_rss_and_latency(smoke_run):
    _, data, _ = smoke_run
    services = [r for r in data["results"] if r["target"] == "service"]
    assert services
    for result in services:
        assert result["peak_rss_mib"] > 0
        assert result["p99_ms"] >= result["p50_ms"] > 0


def test_smoke_table_has_ratios(smoke_run):
    _, _, markdown = smoke_run
    main_table = markdown.split("## Service against ceiling", 1)[1].split("\n## ", 1)[0]
    ratios = re.findall(r"\| \*\*(\d+\.\d\d)\*\* \|", main_table)
    assert len(ratios) == 4
    assert all(float(value) > 0 for value in ratios)
    assert "MISMATCH" not in markdown


@pytest.mark.parametrize("heading", [
    "## CPU per batch (one process, no I/O)",
    "## CPU per batch in µs, by process group",
    "## Maximum-size batch and RSS",
    "## Write path",
    "## Pool size",
    "## uvicorn --loop and --http",
    "## uvicorn --workers",
    "## Growth: empty against pre-filled table",
])
def test_smoke_report_has_section(smoke_run, heading):
    _, _, markdown = smoke_run
    assert heading in markdown
