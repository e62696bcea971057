#!/usr/bin/env bash
# tools/tempest/run-tempest.sh RUN_DIR
#
# Runs Tempest's volume backup tests against a blockvault registered in a Keystone v3
# catalog (reference §11): Tempest and cinder-tempest-plugin are pip-installed into their
# own cached venv (TEMPEST_VENV [~/.cache/blockvault/tempest-venv], TEMPEST_PIP_SPEC
# [tempest==47.0.0 cinder-tempest-plugin==1.23.0]); RUN_DIR gets tempest.conf, the run's
# logs and results.json ({test id: {status, details}}).
#
# What it needs (environment):
#   OS_AUTH_URL            Keystone v3, e.g. http://keystone:5000/v3           (required)
#   TEMPEST_ACCOUNTS_FILE  Tempest pre-provisioned accounts (YAML)             (required)
#                          backups suite: one project with a user holding `member` and one
#                          holding `reader`, a second non-admin user (the quota tests' `alt`),
#                          and an admin of ANOTHER project (`types: [admin]`; the plugin's
#                          cross-project tests need it elsewhere); rbac suite: a member, a
#                          reader and an admin (`roles: [admin]`) of ONE project. One such
#                          set per worker (TEMPEST_WORKERS).
#   TEMPEST_SUITE          backups [default]: Tempest's backup tests, the backup tests among
#                          its snapshot and quota tests, cinder-tempest-plugin's backup tests;
#                          rbac: cinder-tempest-plugin's backup RBAC tests (reader, member and
#                          admin of one project against Cinder's default policy)
#   BLOCKVAULT_URL         blockvault's root, e.g. http://bv:8776: checked to answer with
#                          the versions document before Tempest starts           (optional)
#   OS_REGION_NAME         [RegionOne]
#   TEMPEST_CATALOG_TYPE   the service type blockvault is registered as [block-storage]
#   TEMPEST_ENDPOINT_TYPE  [publicURL]
#   TEMPEST_MAX_MICROVERSION [3.71]
#   TEMPEST_WORKERS        [1]; each worker locks its own accounts
#   TEMPEST_NEUTRON_GATE   [closed]: Tempest skips two whole classes (VolumesBackupsTest,
#                          VolumesSnapshotTestJSON) unless neutron is available, although with
#                          pre-provisioned accounts their volume-only tests never call the
#                          network API. `open` reports neutron available so those run; the
#                          tests that need a server or an image stay skipped (nova and glance
#                          are unavailable), and a stray network call would fail loudly (no
#                          network endpoint in the catalog), never pass silently.
#   TEMPEST_REGEX          override the test selection (a `tempest run --regex`)
#   TEMPEST_TIMEOUT        seconds for the whole `tempest run` [900]
#   TEMPEST_BUILD_TIMEOUT  seconds Tempest waits for a status [300]
#   TEMPEST_INSTALL_ONLY=1 install the venv and stop
# Exit status: Tempest's (0 when nothing failed).
set -euo pipefail

RUN_DIR=${1:?usage: $0 RUN_DIR}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd -P)
VENV=${TEMPEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/blockvault/tempest-venv}
SPEC=${TEMPEST_PIP_SPEC:-tempest==47.0.0 cinder-tempest-plugin==1.23.0}

log() { echo "[run-tempest $(date +%H:%M:%S)] $*" >&2; }

if [ "$(cat "$VENV/.blockvault-pip-spec" 2>/dev/null)" != "$SPEC" ]; then
    mkdir -p "$(dirname "$VENV")"
    (
        flock 9
        # another run may have installed it while this one waited for the lock
        if [ "$(cat "$VENV/.blockvault-pip-spec" 2>/dev/null)" != "$SPEC" ]; then
            log "creating venv $VENV and pip installing $SPEC"
            rm -rf "$VENV"
            /usr/bin/python3 -m venv "$VENV"
            # shellcheck disable=SC2086 # the spec is a list of requirements
            "$VENV/bin/pip" install -q $SPEC >"$RUN_DIR/pip.log" 2>&1 ||
                { tail -n 30 "$RUN_DIR/pip.log" >&2; exit 1; }
            echo "$SPEC" >"$VENV/.blockvault-pip-spec"
        fi
    ) 9>"$VENV.lock"
fi
[ "${TEMPEST_INSTALL_ONLY:-0}" = 1 ] && exit 0

AUTH_URL=${OS_AUTH_URL:?set OS_AUTH_URL to Keystone v3, e.g. http://keystone:5000/v3}
AUTH_URL=${AUTH_URL%/}
ACCOUNTS=${TEMPEST_ACCOUNTS_FILE:?set TEMPEST_ACCOUNTS_FILE to a Tempest accounts file}
ACCOUNTS=$(cd "$(dirname "$ACCOUNTS")" && pwd -P)/$(basename "$ACCOUNTS")
REGION=${OS_REGION_NAME:-RegionOne}
CATALOG_TYPE=${TEMPEST_CATALOG_TYPE:-block-storage}
ENDPOINT_TYPE=${TEMPEST_ENDPOINT_TYPE:-publicURL}
MAX_MV=${TEMPEST_MAX_MICROVERSION:-3.71}
WORKERS=${TEMPEST_WORKERS:-1}
case ${TEMPEST_NEUTRON_GATE:-closed} in
    open) NEUTRON=True ;;
    closed) NEUTRON=False ;;
    *) log "TEMPEST_NEUTRON_GATE is open or closed"; exit 2 ;;
esac

if [ -n "${BLOCKVAULT_URL:-}" ]; then
    code=$(curl -s -o /dev/null -w '%{http_code}' "${BLOCKVAULT_URL%/}/") || code=000
    if [ "$code" != 300 ]; then
        log "ERROR: $BLOCKVAULT_URL/ answered $code, not 300 with the versions document"
        exit 2
    fi
fi

case ${TEMPEST_SUITE:-backups} in
    # Tempest's backup tests (reference §11); among its snapshot and quota tests those that
    # create a backup or read, set or count the backup quotas; cinder-tempest-plugin's
    # backup tests but test_incremental_backup, which boots a server from an image and
    # (unlike Tempest's own) is not marked as needing compute and image.
    backups) SUITE_REGEX='^tempest\.api\.volume\.(test_volumes_backup|admin\.test_volumes_backup|admin\.test_backups)\.|^tempest\.api\.volume\.test_volumes_snapshots\.VolumesSnapshotTestJSON\.test_snapshot_backup\b|^tempest\.api\.volume\.admin\.test_volume_quotas\.VolumeQuotasAdminTestJSON\.(test_list_quotas|test_list_default_quotas|test_update_all_quota_resources_for_tenant|test_show_quota_usage)\b|^cinder_tempest_plugin\.api\.volume\.(admin\.)?test_volume_backup\.VolumesBackupsTest\.(?!test_incremental_backup\[)' ;;
    rbac) SUITE_REGEX='^cinder_tempest_plugin\.rbac\.v3\.test_backups\.' ;;
    *) log "TEMPEST_SUITE is backups or rbac"; exit 2 ;;
esac
REGEX=${TEMPEST_REGEX:-$SUITE_REGEX}

mkdir -p "$RUN_DIR/etc" "$RUN_DIR/locks"
cat >"$RUN_DIR/etc/tempest.conf" <<EOF
[DEFAULT]
log_file = $RUN_DIR/tempest.log
use_stderr = False

[oslo_concurrency]
lock_path = $RUN_DIR/locks

[auth]
use_dynamic_credentials = False
test_accounts_file = $ACCOUNTS
default_credentials_domain_name = Default
admin_domain_name = Default
create_isolated_networks = False

[identity]
auth_version = v3
uri_v3 = $AUTH_URL
region = $REGION
v3_endpoint_type = public

[identity-feature-enabled]
api_v2 = False
api_v3 = True

[service_available]
cinder = True
nova = False
glance = False
neutron = $NEUTRON
swift = False
horizon = False

[enforce_scope]
cinder = True

[volume]
catalog_type = $CATALOG_TYPE
region = $REGION
endpoint_type = $ENDPOINT_TYPE
min_microversion = 3.0
max_microversion = $MAX_MV
backup_driver = posix
volume_size = 1
build_interval = 1
build_timeout = ${TEMPEST_BUILD_TIMEOUT:-300}

[volume-feature-enabled]
backup = True
snapshot = True

[validation]
run_validation = False
EOF

# A workspace of our own: no `tempest init`, nothing registered in ~/.tempest.
SITE=$("$VENV/bin/python" -c 'import os, tempest; print(os.path.dirname(os.path.dirname(tempest.__file__)))')
cat >"$RUN_DIR/.stestr.conf" <<EOF
[DEFAULT]
test_path=$SITE/tempest/test_discover
top_dir=$SITE
group_regex=([^\.]*\.)*
EOF
rm -rf "$RUN_DIR/.stestr" "$RUN_DIR/results.json"

log "tempest run against $AUTH_URL (suite ${TEMPEST_SUITE:-backups}, $CATALOG_TYPE, volume $MAX_MV, $WORKERS worker(s), neutron gate ${TEMPEST_NEUTRON_GATE:-closed})"
started=$(date +%s)
set +e
(cd "$RUN_DIR" && TEMPEST_CONFIG_DIR="$RUN_DIR/etc" timeout "${TEMPEST_TIMEOUT:-900}" \
    "$VENV/bin/tempest" run --config-file "$RUN_DIR/etc/tempest.conf" \
    --concurrency "$WORKERS" --regex "$REGEX") >"$RUN_DIR/run.log" 2>&1
rc=$?
set -e
log "tempest run exited $rc after $(($(date +%s) - started)) s; log: $RUN_DIR/run.log"

# results.json: every test id with its status and, for skips and failures, the reason.
(cd "$RUN_DIR" && "$VENV/bin/stestr" last --subunit 2>/dev/null) | "$VENV/bin/python" -c '
import json, sys, subunit, testtools
results = {}
class Collect(testtools.StreamResult):
    def status(self, test_id=None, test_status=None, file_name=None, file_bytes=None, **kw):
        if not test_id:
            return
        entry = results.setdefault(test_id, {"status": None, "details": ""})
        if test_status in ("success", "fail", "skip", "xfail", "uxsuccess"):
            entry["status"] = test_status
        if file_bytes and file_name in ("reason", "traceback"):
            entry["details"] += bytes(file_bytes).decode("utf-8", "replace")
stream = subunit.ByteStreamToStreamResult(sys.stdin.buffer, non_subunit_name="stdout")
result = Collect()
result.startTestRun(); stream.run(result); result.stopTestRun()
json.dump(results, open(sys.argv[1], "w"), indent=1, sort_keys=True)
' "$RUN_DIR/results.json" || log "could not read the subunit stream into results.json"
sed -n '/^Totals/,$p' "$RUN_DIR/run.log" >&2 || true
grep -E '^\{[0-9]+\} .*\.\.\. (FAILED|SKIPPED)' "$RUN_DIR/run.log" >&2 || true
exit $rc
