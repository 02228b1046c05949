#!/usr/bin/env bash
# Install everything the service, its tests and its benchmark need on Debian 12
# or 13, as root: PostgreSQL with TimescaleDB, Redis, Caddy and a Python
# virtual environment in .venv. Each step is skipped when its result is already
# there, so running this again is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "run this as root: it installs Debian packages"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The PostgreSQL major version whose lib directory has TimescaleDB, if any.
timescale_pg_version() {
    local so
    for so in /usr/lib/postgresql/*/lib/timescaledb.so; do
        [ -e "$so" ] || continue
        basename "$(dirname "$(dirname "$so")")"
    done | sort -n | tail -n 1
}

# Debian 12 packages no TimescaleDB, so build the Apache-2 edition from
# Debian 13's source package against the installed server. A private sources
# list keeps the system's own apt configuration untouched.
build_timescaledb() {
    local pg=$1 dir uri opts
    apt_install "postgresql-server-dev-$pg" cmake libkrb5-dev libssl-dev \
        make gcc xz-utils ca-certificates
    dir=$(mktemp -d)
    mkdir -p "$dir/lists/partial"
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$dir/sources.list"
    opts=(-oDir::Etc::SourceList="$dir/sources.list" -oDir::Etc::SourceParts=/nonexistent -oDir::State::Lists="$dir/lists")
    apt-get "${opts[@]}" update -qq
    (cd "$dir" && apt-get "${opts[@]}" source --download-only timescaledb >/dev/null)
    tar -C "$dir" -xf "$dir"/timescaledb_*.orig.tar.*
    log "building TimescaleDB for PostgreSQL $pg"
    (
        cd "$dir"/timescaledb-*/
        ./bootstrap -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
            -DWARNINGS_AS_ERRORS=OFF -DLINTER=OFF \
            -DPG_CONFIG="/usr/lib/postgresql/$pg/bin/pg_config" >/dev/null
        make -C build -j"$(nproc)" install >/dev/null
    )
    rm -rf "$dir"
}

install_timescaledb() {
    local candidate pg
    [ -n "$(timescale_pg_version)" ] && return 0

    # Debian 13 and newer package it.
    apt_install apt-utils >/dev/null 2>&1 || true
    candidate=$(apt-cache search --names-only '^postgresql-[0-9]+-timescaledb$' | awk '{print $1}' | sort -V | tail -n 1)
    if [ -n "$candidate" ]; then
        pg=${candidate#postgresql-}
        pg=${pg%-timescaledb}
        apt_install "postgresql-$pg" "$candidate"
        return 0
    fi

    pg=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1)
    if [ -z "$pg" ] || [ ! -x "/usr/lib/postgresql/$pg/bin/postgres" ]; then
        apt_install postgresql
        pg=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
    fi
    build_timescaledb "$pg"
}

install_servers() {
    local missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v caddy >/dev/null || missing+=(caddy)
    command -v curl >/dev/null || missing+=(curl)
    id postgres >/dev/null 2>&1 || missing+=(postgresql-common)
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
    install_timescaledb
    log "TimescaleDB is installed for PostgreSQL $(timescale_pg_version)"
}

# The virtual environment is rebuilt only when a requirements file changes.
install_python() {
    local stamp=.venv/.requirements.sha256 sum
    sum=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
        return 0
    fi
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    [ -x .venv/bin/python ] || python3 -m venv .venv
    log "installing Python packages into .venv"
    # pip warns about each package index folder that this machine lacks; keep the rest.
    .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt \
        2> >(grep -v "^WARNING: Location .* is ignored" >&2)
    echo "$sum" > "$stamp"
}

install_servers
install_python
