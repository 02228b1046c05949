#!/usr/bin/env bash
# Install what is missing, then run PostgreSQL + TimescaleDB, Redis and the
# service on this machine until Ctrl-C. Extra arguments go to devstack.py serve
# (--port, --pg-port, --redis-port).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python devstack.py serve "$@"
