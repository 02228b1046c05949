#!/usr/bin/env bash
# Install what is missing, check the code with ruff, then run the whole test
# suite. The tests start their own TimescaleDB, Redis and Caddy on loopback
# ports and stop them at the end. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .

status=0
.venv/bin/pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure here" >&2
    exit 1
fi
exit "$status"
