#!/bin/sh
# Start a PostgreSQL server on localhost for tests/test_sweeps.py (Debian 12 / Ubuntu, as root
# or with sudo) and print its SQLAlchemy URL on the last line of stdout:
#
#   export REGBENCH_TEST_POSTGRES_URL="$(sh .ci/postgres.sh | tail -n 1)"
#
# Installs Debian's `postgresql` package when no server binaries are found, creates a private
# cluster (owned by the `postgres` user: the server refuses to run as root) under
# $REGBENCH_PG_DIR (default /var/tmp/regbench-pg), starts it on 127.0.0.1:$REGBENCH_PG_PORT
# (default 54329), and creates the role and database `regbench` (password `regbench`).
# Idempotent: a cluster already running there is reused.
set -eu
DIR="${REGBENCH_PG_DIR:-/var/tmp/regbench-pg}"
PORT="${REGBENCH_PG_PORT:-54329}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "postgres.sh: not root and no sudo" >&2
        exit 1
    fi
fi

find_bin() {
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/$1" ]; then echo "$d/$1"; return 0; fi
    done
    command -v "$1" 2>/dev/null || return 1
}

if ! find_bin initdb >/dev/null || ! find_bin pg_ctl >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq --no-install-recommends postgresql >&2
fi
INITDB="$(find_bin initdb)"
PG_CTL="$(find_bin pg_ctl)"
PSQL="$(find_bin psql)"
id postgres >/dev/null 2>&1 || $SUDO useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres

as_pg() {
    if [ "$(id -un)" = postgres ]; then "$@"
    elif [ -n "$SUDO" ]; then sudo -u postgres "$@"
    else runuser -u postgres -- "$@"; fi
}

$SUDO mkdir -p "$DIR"
$SUDO chown postgres:postgres "$DIR"
$SUDO chmod 700 "$DIR"
if [ ! -f "$DIR/data/PG_VERSION" ]; then
    rm -rf "$DIR/data"
    printf 'postgres\n' > "$DIR/pwfile"
    chown postgres "$DIR/pwfile"
    as_pg "$INITDB" -D "$DIR/data" -U postgres -A scram-sha-256 --pwfile="$DIR/pwfile" >&2
    rm -f "$DIR/pwfile"
    # local socket connections for the postgres user without a password (setup below)
    as_pg sh -c "printf 'local all postgres trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n' > '$DIR/data/pg_hba.conf'"
fi
if ! as_pg "$PG_CTL" -D "$DIR/data" status >/dev/null 2>&1; then
    as_pg "$PG_CTL" -D "$DIR/data" -w -l "$DIR/server.log" \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1" start >&2
fi
q() { as_pg "$PSQL" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAc "$1"; }
[ "$(q "SELECT 1 FROM pg_roles WHERE rolname = 'regbench'")" = 1 ] || q "CREATE ROLE regbench LOGIN PASSWORD 'regbench'" >&2
[ "$(q "SELECT 1 FROM pg_database WHERE datname = 'regbench'")" = 1 ] || q "CREATE DATABASE regbench OWNER regbench" >&2
echo "postgresql+psycopg2://regbench:regbench@127.0.0.1:$PORT/regbench"
