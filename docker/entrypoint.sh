#!/bin/sh
# memchat's container entrypoint (POSIX sh).
#
#   entrypoint.sh          wait for the database, migrate it (`python -m app db upgrade`), then
#                          exec the server, `python -m app serve` (uvicorn on MEMCHAT_HOST:
#                          MEMCHAT_PORT, MEMCHAT_WORKERS workers), with MEMCHAT_AUTO_MIGRATE=false
#                          (the schema is already at head)
#   entrypoint.sh CMD...   wait for the database, then exec CMD (no migration), e.g.
#                          `docker compose run --rm app python -m app db current`
#
# Settings come from the environment (MEMCHAT_*, see .env.example). Read here only, not a setting
# of the app: DB_WAIT_TIMEOUT (seconds to wait for the database, default 60) and PYTHON (the
# interpreter, default `python` from PATH).
#
# Signals: the server is exec'd, so it is this process (PID 1 in a container) and gets SIGTERM
# itself (uvicorn: graceful shutdown, up to 30 s for the requests in progress). Before that, each step runs in the background while this
# script waits for it, so a SIGTERM/SIGINT during the wait or the migration stops it at once.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
python=${PYTHON:-python}
child=''

log() {
    printf '[entrypoint] %s\n' "$*" >&2
}

on_signal() {  # $1: signal name, $2: its number
    log "got SIG$1 before the server started; stopping"
    if [ -n "$child" ]; then
        # async commands of a non-interactive shell ignore SIGINT: always send TERM
        kill -s TERM "$child" 2>/dev/null || :
        wait "$child" 2>/dev/null || :
    fi
    exit $((128 + $2))
}
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT

# step CMD...: run CMD in the background and wait for it (interruptible by the traps above).
step() {
    "$@" &
    child=$!
    status=0
    wait "$child" || status=$?
    child=''
    return "$status"
}

step "$python" "$here/wait_for_db.py" --timeout "${DB_WAIT_TIMEOUT:-60}"

if [ "$#" -gt 0 ]; then
    trap - TERM INT
    exec "$@"
fi

log "migrating the database"
step "$python" -m app db upgrade

export MEMCHAT_AUTO_MIGRATE=false
log "starting the server on ${MEMCHAT_HOST:-127.0.0.1}:${MEMCHAT_PORT:-8000}" \
    "with ${MEMCHAT_WORKERS:-1} worker(s)"
trap - TERM INT
# uvicorn, in this process: `serve` reads MEMCHAT_HOST / MEMCHAT_PORT / MEMCHAT_WORKERS
exec "$python" -m app serve
