#!/usr/bin/env bash
# tools/swift/start-swift.sh RUN_DIR
#
# blockvault's own OpenStack Swift "all in one" (SAIO) for tests and local development:
# a single-replica Swift on 127.0.0.1 with
#   memcached + proxy (s3api + tempauth) + account + container + object servers
#   (+ container-updater, object-updater, object-expirer unless SWIFT_EXTRA_DAEMONS=0)
# Everything (config, rings, data, logs, pid files) lives under RUN_DIR; the Swift venv
# lives in a cache dir shared between runs so a fresh RUN_DIR starts in seconds.
#
# Idempotent: re-running while healthy is a no-op; if some servers died (e.g. the test
# fixture stopped only the proxy with "stop-swift.sh RUN_DIR proxy-server") only those are
# started again; a config change restarts everything.  No systemd; runs as root or any user.
#
# Stop with tools/swift/stop-swift.sh RUN_DIR [SERVER...].
#
# Environment knobs (defaults in brackets):
#   SWIFT_PORT [8080]        proxy port (Swift API + S3 API); SWIFT_PROXY_PORT is an alias
#   SWIFT_ACCOUNT_PORT [6202]  SWIFT_CONTAINER_PORT [6201]  SWIFT_OBJECT_PORT [6200]
#   SWIFT_MEMCACHED_PORT [11211]
#   SWIFT_DATA_DIR [$RUN_DIR/srv/node]    devices dir; must support user xattrs
#   SWIFT_INSTALL_METHOD [pip]  pip  = "pip install $SWIFT_PIP_SPEC" into SWIFT_VENV
#                                      (+ memcached, python3-venv from apt if missing)
#                               apt  = Debian's python3-swift (2.30.1 on bookworm) + memcached
#                                      (NOT recommended: see fact 8 below)
#                               none = use SWIFT_PYTHON as is, install nothing
#   SWIFT_VENV [${BLOCKVAULT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/blockvault}/swift-venv]
#   SWIFT_PIP_SPEC [swift==2.38.3]  SWIFT_PYTHON [auto]  SWIFT_BASE_PYTHON [/usr/bin/python3]
#   SWIFT_PROXY_WORKERS [1]  SWIFT_BACKEND_WORKERS [1]  SWIFT_PART_POWER [6]
#   SWIFT_S3_MIN_SEGMENT_SIZE [5242880]  SWIFT_S3_LOCATION [us-east-1]
#   SWIFT_EXTRA_DAEMONS [1]  SWIFT_LOG_LEVEL [INFO]  SWIFT_START_TIMEOUT [60]
#   SWIFT_EXTRA_TEMPAUTH_USERS  extra "user_<acct>_<user> = <key> [groups]" lines
#   SWIFT_MAX_META_OVERALL_SIZE, SWIFT_MAX_META_COUNT  [swift defaults 4096, 90]
#
# Credentials (tempauth, reseller prefix AUTH_):
#   test:tester   / testing   .admin of AUTH_test   (S3: access key "test:tester", secret "testing")
#   test:tester3  / testing3  non-admin in AUTH_test
#   test2:tester2 / testing2  .admin of AUTH_test2  (second account, for isolation tests)
#   admin:admin   / admin     .reseller_admin
# Swift auth URL: http://127.0.0.1:$SWIFT_PORT/auth/v1.0
# S3 (boto3): endpoint_url=http://127.0.0.1:$SWIFT_PORT, region us-east-1, s3v4, path-style.
#
# Facts learned getting this to run (each cost time once; keep them):
#  1. Swift reads /etc/swift/swift.conf regardless of swift_dir; the small launcher
#     (RUN_DIR/bin/saio-server.py) points it at RUN_DIR/etc instead, so nothing in /etc.
#  2. tempauth keeps tokens in memcached: without memcached, auth "succeeds" and every
#     later call is 401.
#  3. Start each server with setsid: a Swift parent does killpg(0, SIGTERM) on shutdown
#     and would otherwise kill the caller's process group (the CI script, pytest).
#  4. Swift logs to syslog; with no /dev/log the lines are lost.  The launcher sends them
#     to RUN_DIR/log/<server>.log.
#  5. Object metadata lives in one xattr; on ext4 all of an inode's xattrs must fit in
#     ~4 KiB, so objects with more than ~2.5 KB of metadata fail with 503.  Keep object
#     metadata small.  tmpfs before Linux 6.6 has no user xattrs at all.
#  6. With a single device, one 507 makes the proxy skip the device for 60 s (every
#     request 503).  error_suppression_interval = 0 in the proxy config prevents that.
#  7. s3api must come before tempauth in the pipeline, and slo between s3api and the
#     proxy, or multipart upload is silently off.  "location" must equal the client
#     region.  Non-last multipart parts must be >= 5 MiB (min_segment_size).  Bucket
#     names: 3-63 lowercase characters, no underscores.  account_autocreate = true is
#     required.
#  8. Debian's Swift 2.30 (bookworm) rejects boto3's delete_objects (needs Content-MD5):
#     one reason this script uses pip's 2.38.
#  9. Unsupported S3 sub-resources (lifecycle, object lock) answer 200 with a bucket
#     listing: never probe features that way.
# 10. Measured on 2 cores, client on the same machine: Swift PUT/GET of 50 MiB objects
#     ~150-250 MB/s, S3 PUT ~120-155 MB/s, GET ~180-260 MB/s (CPU-bound, noisy).
# 11. Debian postinsts start services (memcached on 11211): apt_install below installs
#     with a policy-rc.d that forbids it, so the only memcached is the one we start.
set -euo pipefail

RUN_DIR=${1:-${SWIFT_RUN_DIR:-}}
[ -n "$RUN_DIR" ] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd -P)
ETC=$RUN_DIR/etc
DEVICES=${SWIFT_DATA_DIR:-$RUN_DIR/srv/node}
PID_DIR=$RUN_DIR/pid
LOG_DIR=$RUN_DIR/log
CACHE_DIR=$RUN_DIR/cache
BIND_IP=127.0.0.1
PROXY_PORT=${SWIFT_PORT:-${SWIFT_PROXY_PORT:-8080}}
ACCOUNT_PORT=${SWIFT_ACCOUNT_PORT:-6202}
CONTAINER_PORT=${SWIFT_CONTAINER_PORT:-6201}
OBJECT_PORT=${SWIFT_OBJECT_PORT:-6200}
MEMCACHED_PORT=${SWIFT_MEMCACHED_PORT:-11211}
INSTALL_METHOD=${SWIFT_INSTALL_METHOD:-pip}
BV_CACHE=${BLOCKVAULT_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/blockvault}
VENV=${SWIFT_VENV:-$BV_CACHE/swift-venv}
PIP_SPEC=${SWIFT_PIP_SPEC:-swift==2.38.3}
# Optional Keystone v3 auth beside tempauth: SWIFT_KEYSTONE_URL=http://host:port (a running
# Keystone), SWIFT_KEYSTONE_ADMIN_PASSWORD (its bootstrap admin's). Keystone's projects get
# accounts KEY_<project id>; tempauth keeps AUTH_*. Needs keystonemiddleware in the venv.
KEYSTONE_URL=${SWIFT_KEYSTONE_URL:-}
if [ -n "$KEYSTONE_URL" ]; then
    PIP_SPEC="$PIP_SPEC keystonemiddleware"
fi
PROXY_WORKERS=${SWIFT_PROXY_WORKERS:-1}
BACKEND_WORKERS=${SWIFT_BACKEND_WORKERS:-1}
PART_POWER=${SWIFT_PART_POWER:-6}
S3_MIN_SEGMENT_SIZE=${SWIFT_S3_MIN_SEGMENT_SIZE:-5242880}
S3_LOCATION=${SWIFT_S3_LOCATION:-us-east-1}
EXTRA_DAEMONS=${SWIFT_EXTRA_DAEMONS:-1}
LOG_LEVEL=${SWIFT_LOG_LEVEL:-INFO}
START_TIMEOUT=${SWIFT_START_TIMEOUT:-60}
RUN_USER=$(id -un)
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP  # keep the CI's python settings out of the servers

log() { echo "[start-swift $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }

apt_install() {
    # Non-interactive, never start services: Debian postinsts call invoke-rc.d,
    # which obeys /usr/sbin/policy-rc.d (exit 101 = "don't start").  Serialized with a
    # lock so two test sessions installing at once don't fight over dpkg's lock.
    log "apt-get install $*"
    mkdir -p "$BV_CACHE"
    local rc=0
    (
        flock -w 600 7 || { echo "could not lock $BV_CACHE/apt.lock"; exit 1; }
        created_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
            as_root chmod 755 /usr/sbin/policy-rc.d
            created_policy=1
        fi
        rc=0
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -o Dpkg::Options::=--force-confdef \
            -o Dpkg::Options::=--force-confold "$@" || rc=$?
        [ "$created_policy" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
        exit "$rc"
    ) 7>"$BV_CACHE/apt.lock" >"$LOG_DIR/apt-get.log" 2>&1 || rc=$?
    [ "$rc" = 0 ] || { tail -n 30 "$LOG_DIR/apt-get.log" >&2; die "apt-get failed (rc=$rc)"; }
}

mkdir -p "$ETC" "$DEVICES/d1" "$PID_DIR" "$LOG_DIR" "$CACHE_DIR" "$RUN_DIR/bin"
# serialize concurrent invocations on the same RUN_DIR (fd 9 is closed for the servers)
exec 9>"$RUN_DIR/.lock"
flock -w 300 9 || die "could not lock $RUN_DIR/.lock"

# ---------------------------------------------------------------- install ---
case "$INSTALL_METHOD" in
apt)
    PY=${SWIFT_PYTHON:-/usr/bin/python3}  # NOT "python3" from PATH (pyenv/venv won't see dist-packages)
    missing=()
    "$PY" -c 'import swift' 2>/dev/null || missing+=(python3-swift)
    command -v memcached >/dev/null || missing+=(memcached)
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    ;;
pip)
    PY=$VENV/bin/python
    # The venv is shared by every RUN_DIR (and concurrent test sessions): install under a
    # lock, and only trust a venv whose marker names the current spec (an interrupted
    # install leaves no marker and is redone with --clear).
    mkdir -p "$(dirname "$VENV")"
    exec 8>"$VENV.lock"
    flock -w 600 8 || die "could not lock $VENV.lock"
    if [ "$(cat "$VENV/.blockvault-pip-spec" 2>/dev/null)" != "$PIP_SPEC" ] ||
       ! "$PY" -c 'import swift' 2>/dev/null; then
        base=${SWIFT_BASE_PYTHON:-/usr/bin/python3}
        pkgs=()
        [ -x "$base" ] || pkgs+=(python3)
        [ -x "$base" ] && "$base" -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
        command -v memcached >/dev/null || pkgs+=(memcached)
        [ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"
        log "creating venv $VENV and pip installing $PIP_SPEC"
        "$base" -m venv --clear "$VENV"
        # unquoted on purpose: may hold several specs / "-c constraints.txt"
        "$VENV/bin/pip" install -q $PIP_SPEC >"$LOG_DIR/pip.log" 2>&1 ||
            { tail -n 30 "$LOG_DIR/pip.log" >&2; die "pip install failed"; }
        echo "$PIP_SPEC" >"$VENV/.blockvault-pip-spec"
    fi
    command -v memcached >/dev/null || apt_install memcached
    exec 8>&-
    ;;
none)
    PY=${SWIFT_PYTHON:-/usr/bin/python3}
    ;;
*) die "SWIFT_INSTALL_METHOD must be apt, pip or none" ;;
esac
"$PY" -c 'import swift' 2>/dev/null || die "$PY cannot import swift"
MEMCACHED=$(command -v memcached) || die "memcached not found (tempauth needs it)"
SWIFT_VERSION=$("$PY" -c 'import swift; print(swift.__version__)')

# ---------------------------------------------------------------- launcher --
# Swift hard-codes /etc/swift/swift.conf (hash prefix/suffix, storage policies,
# constraints).  This wrapper points it at $ETC/swift.conf so nothing in /etc
# is needed, and sends the servers' log lines (normally syslog; /dev/log
# rarely exists in CI containers) to stderr = $LOG_DIR/<name>.log.
CHANGED=0
install_file() {  # install_file DEST  (content on stdin); sets CHANGED=1 if different
    local dest=$1
    cat >"$dest.new"
    if [ -f "$dest" ] && cmp -s "$dest" "$dest.new"; then
        rm -f "$dest.new"
    else
        mv -f "$dest.new" "$dest"
        CHANGED=1
    fi
}
install_file "$RUN_DIR/bin/saio-server.py" <<'PYEOF'
import logging
import os
import sys

kind, conf_file = sys.argv[1], os.path.abspath(sys.argv[2])

from swift.common import utils  # noqa: E402

utils.SWIFT_CONF_FILE = os.path.join(os.path.dirname(conf_file), 'swift.conf')
utils.HASH_PATH_PREFIX = utils.HASH_PATH_SUFFIX = b''


# A private copy of stderr: the servers later point fds 0-2 at /dev/null.
_log_stream = os.fdopen(os.dup(2), 'w', buffering=1)


class _StderrHandler(logging.StreamHandler):
    def __init__(self, *args, **kwargs):
        logging.StreamHandler.__init__(self, _log_stream)


for mod in (utils, getattr(utils, 'logs', None)):
    if mod is not None and hasattr(mod, 'ThreadSafeSysLogHandler'):
        mod.ThreadSafeSysLogHandler = _StderrHandler

from swift.common import constraints, storage_policy  # noqa: E402

storage_policy.reload_storage_policies()
constraints.reload_constraints()
utils.validate_hash_conf()

if kind == 'ring-builder':
    # several swift-ring-builder invocations, separated by "--", in one process
    from swift.cli.ringbuilder import main
    cmds, cur = [], []
    for a in sys.argv[2:] + ['--']:
        if a == '--':
            cmds.append(cur)
            cur = []
        else:
            cur.append(a)
    for cmd in cmds:
        try:
            rc = main(['swift-ring-builder'] + cmd)
        except SystemExit as e:
            rc = e.code
        if rc not in (None, 0, 1):   # 1 = EXIT_WARNING
            sys.exit('swift-ring-builder %s failed: %r' % (' '.join(cmd), rc))
    sys.exit(0)

sys.argv = [sys.argv[0]] + sys.argv[2:]
conf_file, options = utils.parse_options()
if kind.endswith('-server'):
    from swift.common.wsgi import run_wsgi
    kwargs = {}
    if kind == 'object-server':
        from swift.obj import server
        kwargs['global_conf_callback'] = server.global_conf_callback
    kwargs.update(options)
    sys.exit(run_wsgi(conf_file, kind, **kwargs))

from swift.common.daemon import run_daemon  # noqa: E402
if kind == 'container-updater':
    from swift.container.updater import ContainerUpdater as klass
elif kind == 'object-updater':
    from swift.obj.updater import ObjectUpdater as klass
elif kind == 'object-expirer':
    from swift.obj.expirer import ObjectExpirer as klass
else:
    sys.exit('unknown kind %r' % kind)
run_daemon(klass, conf_file, section_name=kind, **options)
PYEOF

# ------------------------------------------------------------------ config --

# fixed hash prefix/suffix: changing them later would orphan the stored data
install_file "$ETC/swift.conf" <<EOF
[swift-hash]
swift_hash_path_prefix = saio-prefix
swift_hash_path_suffix = saio-suffix

[storage-policy:0]
name = Policy-0
default = yes

[swift-constraints]
${SWIFT_MAX_META_OVERALL_SIZE:+max_meta_overall_size = $SWIFT_MAX_META_OVERALL_SIZE}
${SWIFT_MAX_META_COUNT:+max_meta_count = $SWIFT_MAX_META_COUNT}
EOF

common_default() {  # common_default PORT NAME WORKERS
    cat <<EOF
[DEFAULT]
bind_ip = $BIND_IP
bind_port = $1
workers = $3
user = $RUN_USER
swift_dir = $ETC
devices = $DEVICES
mount_check = false
log_name = $2
log_level = $LOG_LEVEL
recon_cache_path = $CACHE_DIR
eventlet_debug = false
# python $PY, swift $SWIFT_VERSION

EOF
}

keystone_filters() {
    [ -n "$KEYSTONE_URL" ] || return 0
    cat <<KSEOF
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = $KEYSTONE_URL/v3
auth_url = $KEYSTONE_URL
auth_type = password
user_domain_id = default
project_domain_id = default
project_name = admin
username = admin
password = ${SWIFT_KEYSTONE_ADMIN_PASSWORD:-secret}
interface = public
# tempauth's tokens must pass through untouched
delay_auth_decision = true

[filter:keystoneauth]
use = egg:swift#keystoneauth
reseller_prefix = KEY_
operator_roles = admin, member
KSEOF
}

gen_proxy_conf() {
    common_default "$PROXY_PORT" proxy-server "$PROXY_WORKERS"
    cat <<EOF
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl ratelimit s3api ${KEYSTONE_URL:+authtoken keystoneauth }tempauth copy container-quotas account-quotas slo dlo versioned_writes symlink proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true
expose_info = true
# With a single device, the default error limiting (a 507 or 10 errors =>
# node skipped for 60s) turns one failed request into 60s of 503s.
error_suppression_interval = 0

[filter:tempauth]
use = egg:swift#tempauth
reseller_prefix = AUTH
token_life = 86400
user_admin_admin = admin .admin .reseller_admin
user_test_tester = testing .admin
user_test_tester3 = testing3
user_test2_tester2 = testing2 .admin
${SWIFT_EXTRA_TEMPAUTH_USERS:-}
$(keystone_filters)

[filter:s3api]
use = egg:swift#s3api
location = $S3_LOCATION
s3_acl = false
dns_compliant_bucket_names = true
min_segment_size = $S3_MIN_SEGMENT_SIZE

[filter:cache]
use = egg:swift#memcache
memcache_servers = $BIND_IP:$MEMCACHED_PORT

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:bulk]
use = egg:swift#bulk

[filter:tempurl]
use = egg:swift#tempurl

[filter:ratelimit]
use = egg:swift#ratelimit

[filter:copy]
use = egg:swift#copy

[filter:container-quotas]
use = egg:swift#container_quotas

[filter:account-quotas]
use = egg:swift#account_quotas

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo

[filter:versioned_writes]
use = egg:swift#versioned_writes
allow_versioned_writes = true
allow_object_versioning = true

[filter:symlink]
use = egg:swift#symlink
EOF
}
install_file "$ETC/proxy-server.conf" < <(gen_proxy_conf)

backend_conf() {  # backend_conf TYPE PORT
    common_default "$2" "$1-server" "$BACKEND_WORKERS"
    cat <<EOF
[pipeline:main]
pipeline = healthcheck recon $1-server

[app:$1-server]
use = egg:swift#$1

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:recon]
use = egg:swift#recon
EOF
}
install_file "$ETC/account-server.conf" < <(backend_conf account "$ACCOUNT_PORT")
gen_container_conf() {
    backend_conf container "$CONTAINER_PORT"
    printf '\n[container-updater]\ninterval = 5\n'
}
install_file "$ETC/container-server.conf" < <(gen_container_conf)
gen_object_conf() {
    backend_conf object "$OBJECT_PORT"
    printf '\n[object-updater]\ninterval = 5\n'
    printf '\n[object-expirer]\ninterval = 5\ndequeue_from_legacy = true\ninternal_client_conf_path = %s\n' "$ETC/internal-client.conf"
}
install_file "$ETC/object-server.conf" < <(gen_object_conf)
install_file "$ETC/internal-client.conf" <<EOF
[DEFAULT]
swift_dir = $ETC
user = $RUN_USER
log_name = internal-client
log_level = $LOG_LEVEL

[pipeline:main]
pipeline = catch_errors proxy-logging cache symlink proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:cache]
use = egg:swift#memcache
memcache_servers = $BIND_IP:$MEMCACHED_PORT

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:symlink]
use = egg:swift#symlink
EOF

# ------------------------------------------------------------------- rings --
ring_builder() { "$PY" "$RUN_DIR/bin/saio-server.py" ring-builder "$@"; }
RING_SPEC="pp=$PART_POWER ip=$BIND_IP a=$ACCOUNT_PORT c=$CONTAINER_PORT o=$OBJECT_PORT"
if [ "$(cat "$ETC/rings.spec" 2>/dev/null)" != "$RING_SPEC" ] ||
   [ ! -f "$ETC/account.ring.gz" ] || [ ! -f "$ETC/container.ring.gz" ] ||
   [ ! -f "$ETC/object.ring.gz" ]; then
    log "building rings ($RING_SPEC)"
    rm -rf "$ETC/backups"
    args=()
    for spec in "account:$ACCOUNT_PORT" "container:$CONTAINER_PORT" "object:$OBJECT_PORT"; do
        r=${spec%%:*} port=${spec#*:}
        rm -f "$ETC/$r.builder" "$ETC/$r.ring.gz"
        # create <part_power> <replicas=1> <min_part_hours=1>; one device "d1"
        args+=(-- "$ETC/$r.builder" create "$PART_POWER" 1 1
               -- "$ETC/$r.builder" add "r1z1-$BIND_IP:$port/d1" 1
               -- "$ETC/$r.builder" rebalance)
    done
    ring_builder "${args[@]:1}" >"$LOG_DIR/ring-builder.log" 2>&1 ||
        { cat "$LOG_DIR/ring-builder.log" >&2; die "ring building failed"; }
    echo "$RING_SPEC" >"$ETC/rings.spec"
    CHANGED=1
fi

# ------------------------------------------------------------ xattr check --
# Swift keeps each object's metadata as a pickle in the xattr
# user.swift.metadata (+ user.swift.metadata_checksum).  No user xattrs => the
# object server cannot work at all.  ext4 fits all xattrs of an inode in one
# 4 KiB block => objects whose pickled metadata exceeds ~3.9 KB get 507/503.
"$PY" - "$DEVICES/d1" <<'PYEOF' || die "the storage dir $DEVICES does not support user xattrs (tmpfs before Linux 6.6? nfs? set SWIFT_DATA_DIR to an ext4/xfs/btrfs path)"
import os, sys, tempfile
fd, path = tempfile.mkstemp(dir=sys.argv[1], prefix='.xattr-test')
try:
    os.setxattr(path, 'user.swift.metadata', b'x' * 200)
    try:
        os.setxattr(path, 'user.swift.metadata', b'x' * 16384)
    except OSError:
        sys.stderr.write('[start-swift] note: %s caps xattrs at ~4 KiB per inode (ext4?): '
                         'keep per-object metadata under ~2.5 KB or PUTs fail with 503\n' % sys.argv[1])
finally:
    os.close(fd)
    os.unlink(path)
PYEOF

# --------------------------------------------------------- process helpers --
SERVERS=(memcached account-server container-server object-server proxy-server)
[ "$EXTRA_DAEMONS" = 1 ] && SERVERS+=(container-updater object-updater object-expirer)

proc_start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null; }
is_ours_alive() {  # is_ours_alive NAME -> 0 if pidfile's process is alive (not zombie) and same start time
    local f=$PID_DIR/$1.pid pid st state
    [ -f "$f" ] || return 1
    read -r pid st <"$f" || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [ "$state" != Z ] && [ "$(proc_start_time "$pid")" = "$st" ]
}
port_busy() { (exec 3<>"/dev/tcp/$BIND_IP/$1") 2>/dev/null; }
start_bg() {  # start_bg NAME CMD...
    local name=$1; shift
    # setsid: own session/process group.  Important: on SIGTERM a swift server
    # does killpg(0, SIGTERM), which would otherwise hit the caller's group.
    setsid "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 9>&- &
    local pid=$!
    echo "$pid $(proc_start_time "$pid")" >"$PID_DIR/$name.pid"
}

health_urls() {
    echo "http://$BIND_IP:$ACCOUNT_PORT/healthcheck"
    echo "http://$BIND_IP:$CONTAINER_PORT/healthcheck"
    echo "http://$BIND_IP:$OBJECT_PORT/healthcheck"
    echo "http://$BIND_IP:$PROXY_PORT/healthcheck"
}

# healthy -> exit 0 without touching anything
all_alive=1
for s in "${SERVERS[@]}"; do is_ours_alive "$s" || { all_alive=0; break; }; done
if [ "$all_alive" = 1 ] && [ "$CHANGED" = 0 ]; then
    if "$PY" - $(health_urls) <<'PYEOF'
import sys, urllib.request
for u in sys.argv[1:]:
    urllib.request.urlopen(u, timeout=5).read()
PYEOF
    then
        log "already running (swift $SWIFT_VERSION, proxy http://$BIND_IP:$PROXY_PORT)"
        exit 0
    fi
fi

port_of() {
    case $1 in
    memcached) echo "$MEMCACHED_PORT" ;;
    account-server) echo "$ACCOUNT_PORT" ;;
    container-server) echo "$CONTAINER_PORT" ;;
    object-server) echo "$OBJECT_PORT" ;;
    proxy-server) echo "$PROXY_PORT" ;;
    esac
}
conf_of() {
    case $1 in
    container-updater) echo "$ETC/container-server.conf" ;;
    object-updater | object-expirer) echo "$ETC/object-server.conf" ;;
    *) echo "$ETC/$1.conf" ;;
    esac
}

# Which servers to (re)start: after a config change, or if everything runs but is not
# healthy, all of them; otherwise only the dead ones (the test fixture stops just the
# proxy to simulate an outage and brings it back with this script).
TO_START=()
if [ "$CHANGED" = 1 ] || [ "$all_alive" = 1 ]; then
    if ls "$PID_DIR"/*.pid >/dev/null 2>&1; then
        if [ "$CHANGED" = 1 ]; then log "configuration changed; restarting"
        else log "running but not healthy; restarting"; fi
        "$SCRIPT_DIR/stop-swift.sh" "$RUN_DIR" >&2
    fi
    TO_START=("${SERVERS[@]}")
else
    for s in "${SERVERS[@]}"; do is_ours_alive "$s" || TO_START+=("$s"); done
    # leftovers of a dead leader (orphaned workers still holding the port)
    "$SCRIPT_DIR/stop-swift.sh" "$RUN_DIR" "${TO_START[@]}" >&2
fi

for s in "${TO_START[@]}"; do
    p=$(port_of "$s")
    [ -z "$p" ] || ! port_busy "$p" || die "port $BIND_IP:$p ($s) is already in use by another process"
done

# ------------------------------------------------------------------- start --
log "starting swift $SWIFT_VERSION ($PY) in $RUN_DIR: ${TO_START[*]}"
mc_user=(); [ "$(id -u)" -eq 0 ] && mc_user=(-u root)
for s in "${TO_START[@]}"; do
    if [ "$s" = memcached ]; then
        start_bg memcached "$MEMCACHED" -l "$BIND_IP" -p "$MEMCACHED_PORT" -U 0 -m 64 "${mc_user[@]}"
    else
        start_bg "$s" "$PY" "$RUN_DIR/bin/saio-server.py" "$s" "$(conf_of "$s")"
    fi
done

# ------------------------------------------------------------------- wait ---
fail_start() {
    for s in "${SERVERS[@]}"; do
        echo "----- $LOG_DIR/$s.log (tail)" >&2
        tail -n 20 "$LOG_DIR/$s.log" >&2 2>/dev/null || true
    done
    "$SCRIPT_DIR/stop-swift.sh" "$RUN_DIR" >&2 || true
    die "$*"
}
deadline=$((SECONDS + START_TIMEOUT))
while :; do
    for s in "${SERVERS[@]}"; do
        is_ours_alive "$s" || fail_start "$s exited during startup (see $LOG_DIR/$s.log)"
    done
    if "$PY" - "$BIND_IP" "$PROXY_PORT" $(health_urls) 2>/dev/null <<'PYEOF'
import json, sys, urllib.request
ip, port, urls = sys.argv[1], sys.argv[2], sys.argv[3:]
for u in urls:
    assert urllib.request.urlopen(u, timeout=5).read() == b'OK'
info = json.load(urllib.request.urlopen('http://%s:%s/info' % (ip, port), timeout=5))
assert 's3api' in info and 'tempauth' in info, info.keys()
# end-to-end: tempauth token (needs memcached) + account HEAD (needs all rings)
req = urllib.request.Request('http://%s:%s/auth/v1.0' % (ip, port),
                             headers={'X-Auth-User': 'test:tester', 'X-Auth-Key': 'testing'})
r = urllib.request.urlopen(req, timeout=5)
tok, url = r.headers['X-Auth-Token'], r.headers['X-Storage-Url']
r = urllib.request.urlopen(urllib.request.Request(url, method='HEAD', headers={'X-Auth-Token': tok}), timeout=5)
assert r.status in (200, 204), r.status
PYEOF
    then break; fi
    [ "$SECONDS" -lt "$deadline" ] || fail_start "timed out after ${START_TIMEOUT}s waiting for swift"
    sleep 0.2
done
log "swift $SWIFT_VERSION is up: proxy http://$BIND_IP:$PROXY_PORT  (auth /auth/v1.0, S3 path-style, region $S3_LOCATION)"
exit 0
