#!/usr/bin/env bash
# A PostgreSQL database for MLflow and an MLflow tracking server on it, all under one folder:
#
#   scripts/postgres-mlflow.sh start DIR [options] [-- more `mlflow server` options]
#   scripts/postgres-mlflow.sh stop DIR      # stops the server and PostgreSQL by PID
#   scripts/postgres-mlflow.sh status DIR
#
# then `. DIR/env` (it sets PGPASSFILE and MLFLOW_TRACKING_URI) and run the workflow as usual:
# every job logs through the server, which keeps runs in PostgreSQL and artifacts in
# DIR/artifacts. Options of start:
#   --port N        the MLflow server's port (default 5000)
#   --host ADDR     the address it listens on (default 127.0.0.1; 0.0.0.0 for other machines,
#                   e.g. cluster nodes: then add `-- --allowed-hosts NAME:PORT` for their Host header)
#   --pg-port N     PostgreSQL's port (default 5433); it listens on 127.0.0.1 only
#   --workers N     the server's worker processes (default: mlflow's)
#   --no-server     PostgreSQL alone: use DIR's postgresql:// URI as the tracking_uri directly
#
# The first start creates the cluster (initdb) in DIR/postgres/data with a superuser `mlflow`
# whose random password is only in DIR/pgpass (mode 600, found through PGPASSFILE), so the
# tracking URI, which jobs log as a param, holds none; and the database `mlflow`. A later
# start reuses them. As root, PostgreSQL runs as the user `postgres` (PG_USER), as it must
# (it then needs to reach DIR: no folder above it private to root). MLflow's background job
# runner (GenAI evaluation, seven processes) stays off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
# Needs PostgreSQL's server binaries (Debian: postgresql; PG_BIN names their folder) and a
# Python with mlflow and psycopg2 (PYTHON; default .venv/bin/python, else python3).
set -euo pipefail

usage() { echo "usage: $0 start DIR [--port N] [--host ADDR] [--pg-port N] [--workers N] [--no-server] [-- MLFLOW-SERVER-ARGS] | stop DIR | status DIR" >&2; exit 2; }
case ${1:-} in -h | --help | help) sed -n '2,/^set -/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
[ $# -ge 2 ] || usage
action=$1
dir=$(realpath -m "$2")
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "postgres-mlflow: $*" >&2; exit 1; }
log() { echo "postgres-mlflow: $*" >&2; }

port=5000 host=127.0.0.1 pg_port=5433 workers="" server=1 extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --port) port=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --pg-port) pg_port=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        --no-server) server=0; shift ;;
        --) shift; extra=("$@"); break ;;
        *) usage ;;
    esac
done

python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$here/.venv/bin/python" ]; then python=$here/.venv/bin/python; else python=python3; fi
fi
pg_bin() {
    if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -n "$found" ]; then echo "$found"; else dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)"; fi
}
PG=$(pg_bin)
data=$dir/postgres/data
# PostgreSQL refuses to run as root: then its files and processes belong to PG_USER.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u "${PG_USER:-postgres}" -- "$@"; else "$@"; fi
}
pg_pid() { [ -s "$data/postmaster.pid" ] && head -1 "$data/postmaster.pid"; }
pg_alive() { local pid; pid=$(pg_pid) && kill -0 "$pid" 2>/dev/null; }
server_pid() { [ -s "$dir/mlflow.pid" ] && cat "$dir/mlflow.pid"; }
# the server is its own process group (setsid), so its workers go with it
server_alive() { local pid; pid=$(server_pid) && kill -0 -- "-$pid" 2>/dev/null; }

start() {
    [ -x "$PG/initdb" ] && [ -x "$PG/pg_ctl" ] || die "PostgreSQL's server binaries not found in $PG (Debian: apt-get install postgresql; or set PG_BIN)"
    "$python" -c "import mlflow, psycopg2" 2>/dev/null || die "$python lacks mlflow or psycopg2 (pip install mlflow psycopg2-binary; or set PYTHON)"
    ! pg_alive || die "PostgreSQL already runs for $dir (pid $(pg_pid)); stop it first"
    ! server_alive || die "the MLflow server already runs for $dir (pid $(server_pid)); stop it first"
    mkdir -p "$dir/postgres" "$dir/artifacts"
    local pg_user=${PG_USER:-postgres}
    [ "$(id -u)" -ne 0 ] || chown "$pg_user:" "$dir/postgres"
    chmod 700 "$dir/postgres"
    as_pg test -x "$dir/postgres" || die "user $pg_user cannot reach $dir/postgres: let it through the folders above (chmod o+x)"
    local fresh=0
    if [ ! -s "$data/PG_VERSION" ]; then
        fresh=1
        local password pwfile=$dir/postgres/pwfile
        password=$("$python" -c "import secrets; print(secrets.token_urlsafe(24))")
        as_pg sh -c "umask 077 && cat > '$pwfile'" <<<"$password"
        log "initdb $data"
        as_pg "$PG/initdb" -D "$data" -U mlflow --pwfile="$pwfile" --auth=scram-sha-256 \
            --no-locale -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 || { rm -f "$pwfile"; die "initdb failed (log: $dir/initdb.log)"; }
        rm -f "$pwfile"
        (umask 077 && printf '127.0.0.1:*:*:mlflow:%s\nlocalhost:*:*:mlflow:%s\n' "$password" "$password" >"$dir/pgpass")
    fi
    [ -s "$dir/pgpass" ] || die "$dir/pgpass is missing: the database's password is lost (remove $dir/postgres to start afresh)"
    export PGPASSFILE=$dir/pgpass
    mkdir -p "$dir/postgres/socket"
    [ "$(id -u)" -ne 0 ] || chown "$pg_user:" "$dir/postgres/socket"
    log "PostgreSQL on 127.0.0.1:$pg_port"
    as_pg "$PG/pg_ctl" -D "$data" -l "$dir/postgres/postgres.log" -w -t 60 \
        -o "-p $pg_port -k '$dir/postgres/socket' -c listen_addresses=127.0.0.1" start >/dev/null ||
        die "PostgreSQL did not start (log: $dir/postgres/postgres.log)"
    local uri=postgresql://mlflow@127.0.0.1:$pg_port/mlflow
    if [ $fresh -eq 1 ]; then
        "$PG/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow || die "createdb failed"
    fi
    {
        echo "# written by scripts/postgres-mlflow.sh start; source it: . $dir/env"
        echo "export PGPASSFILE=$dir/pgpass"
        echo "MLFLOW_BACKEND_STORE_URI=$uri"
    } >"$dir/env"
    if [ $server -eq 0 ]; then
        echo "export MLFLOW_TRACKING_URI=$uri" >>"$dir/env"
        log "ready: tracking URI $uri (with PGPASSFILE=$dir/pgpass); . $dir/env"
        return
    fi
    # The schema first, once: the server's workers would otherwise all create it at once.
    MLFLOW_DISABLE_TELEMETRY=true "$python" -m mlflow db upgrade "$uri" >"$dir/db-upgrade.log" 2>&1 ||
        die "mlflow db upgrade failed (log: $dir/db-upgrade.log)"
    local args=(server --backend-store-uri "$uri" --artifacts-destination "$dir/artifacts" --host "$host" --port "$port")
    [ -z "$workers" ] || args+=(--workers "$workers")
    # training runs never use MLflow's job runner (see the head of this file)
    MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
        setsid "$python" -m mlflow "${args[@]}" "${extra[@]}" >"$dir/mlflow.log" 2>&1 </dev/null &
    echo $! >"$dir/mlflow.pid"
    local reach=$host
    case $host in 0.0.0.0 | "::" | "[::]") reach=127.0.0.1 ;; esac
    local deadline=$((SECONDS + 120))
    until "$python" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://$reach:$port/health', timeout=2).status != 200)" 2>/dev/null; do
        server_alive || die "the MLflow server ended (log: $dir/mlflow.log)"
        [ $SECONDS -lt $deadline ] || die "the MLflow server did not answer in 120 s (log: $dir/mlflow.log)"
        sleep 0.5
    done
    local url=http://$host:$port
    case $host in 0.0.0.0 | "::" | "[::]") url=http://$(hostname):$port ;; esac
    echo "export MLFLOW_TRACKING_URI=$url" >>"$dir/env"
    log "ready: MLflow server $url (pid $(server_pid)) on $uri, artifacts in $dir/artifacts; . $dir/env"
}

stop() {
    local pid
    if pid=$(server_pid) && server_alive; then
        log "stopping the MLflow server (process group $pid)"
        kill -TERM -- "-$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while server_alive && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if server_alive; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    fi
    rm -f "$dir/mlflow.pid"
    if pid=$(pg_pid) && pg_alive; then
        log "stopping PostgreSQL (pid $pid)"
        as_pg "$PG/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        ! kill -0 "$pid" 2>/dev/null || die "PostgreSQL (pid $pid) did not stop"
    fi
}

status() {
    if pg_alive; then echo "postgres: running (pid $(pg_pid))"; else echo "postgres: stopped"; fi
    if server_alive; then echo "mlflow server: running (pid $(server_pid))"; else echo "mlflow server: stopped"; fi
}

case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
