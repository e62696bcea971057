#!/usr/bin/env bash
# tools/keystone/start-keystone.sh RUN_DIR
#
# A real OpenStack Keystone (identity v3) on 127.0.0.1:$KEYSTONE_PORT [35357] for tests:
# pip-installed into a cached venv (KEYSTONE_VENV [~/.cache/blockvault/keystone-venv]),
# SQLite database, fernet tokens, bootstrapped admin (admin / $KEYSTONE_ADMIN_PASSWORD
# [secret], project admin, domain Default, region RegionOne) with public and internal
# identity endpoints (keystonemiddleware's auth_token looks for the internal one).
# Stop with tools/keystone/stop-keystone.sh RUN_DIR.
set -euo pipefail

RUN_DIR=${1:?usage: $0 RUN_DIR}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd -P)
HERE=$(cd "$(dirname "$0")" && pwd -P)
PORT=${KEYSTONE_PORT:-35357}
PASSWORD=${KEYSTONE_ADMIN_PASSWORD:-secret}
VENV=${KEYSTONE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/blockvault/keystone-venv}
SPEC=${KEYSTONE_PIP_SPEC:-keystone==30.0.0}
URL=http://127.0.0.1:$PORT

log() { echo "[start-keystone $(date +%H:%M:%S)] $*" >&2; }

if [ "$(cat "$VENV/.blockvault-pip-spec" 2>/dev/null)" != "$SPEC" ]; then
    log "creating venv $VENV and pip installing $SPEC"
    mkdir -p "$(dirname "$VENV")"
    (
        flock 9
        rm -rf "$VENV"
        /usr/bin/python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q "$SPEC" >"$RUN_DIR/pip.log" 2>&1 ||
            { tail -n 30 "$RUN_DIR/pip.log" >&2; exit 1; }
        echo "$SPEC" >"$VENV/.blockvault-pip-spec"
    ) 9>"$VENV.lock"
fi

if curl -sf "$URL/v3" >/dev/null 2>&1; then
    log "keystone already answers on $URL"
    exit 0
fi

mkdir -p "$RUN_DIR/fernet" "$RUN_DIR/credential"
chmod 700 "$RUN_DIR/fernet" "$RUN_DIR/credential"
cat >"$RUN_DIR/keystone.conf" <<EOF
[DEFAULT]
log_file = $RUN_DIR/keystone.log
[database]
connection = sqlite:///$RUN_DIR/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = $RUN_DIR/fernet
[credential]
key_repository = $RUN_DIR/credential
EOF
manage() { "$VENV/bin/keystone-manage" --config-file "$RUN_DIR/keystone.conf" "$@" \
    >>"$RUN_DIR/manage.log" 2>&1; }
if [ ! -f "$RUN_DIR/.bootstrapped" ]; then
    manage db_sync
    manage fernet_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)"
    manage credential_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)"
    manage bootstrap --bootstrap-password "$PASSWORD" --bootstrap-region-id RegionOne \
        --bootstrap-admin-url "$URL/v3" --bootstrap-public-url "$URL/v3" \
        --bootstrap-internal-url "$URL/v3"
    touch "$RUN_DIR/.bootstrapped"
fi
OS_KEYSTONE_CONFIG_FILES="$RUN_DIR/keystone.conf" setsid "$VENV/bin/python" "$HERE/serve.py" \
    "$PORT" >"$RUN_DIR/serve.log" 2>&1 < /dev/null &
echo $! >"$RUN_DIR/keystone.pid"
for _ in $(seq 1 120); do
    if curl -sf "$URL/v3" >/dev/null 2>&1; then
        log "keystone is up: $URL/v3 (admin / project admin / domain Default)"
        exit 0
    fi
    sleep 0.5
done
tail -n 30 "$RUN_DIR/serve.log" >&2
log "ERROR: keystone did not answer on $URL"
exit 1
