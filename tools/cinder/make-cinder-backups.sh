#!/usr/bin/env bash
# tools/cinder/make-cinder-backups.sh OUT_DIR [write_backups.py options...]
#
# Real Cinder-written backups for blockvault's tests of its Cinder reader: pip-installs the
# `cinder` package from PyPI into a venv of its own (cached, keyed by the pinned version)
# and runs tools/cinder/write_backups.py in it, which drives Cinder's unmodified
# PosixBackupDriver on image files (see that file's docstring for what it writes).
#
# OUT_DIR/posix is the backup_posix_path; OUT_DIR/backups.json (also printed on stdout)
# lists every backup with its exported record and the sha256 of the volume at that point.
#
# Environment knobs (defaults in brackets):
#   CINDER_PIP_SPEC [cinder==29.0.0]   what to pip install (the venv is rebuilt when it changes)
#   CINDER_VENV [${BLOCKVAULT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/blockvault}/cinder-venv-<spec, e.g. cinder__29.0.0>]
#   CINDER_BASE_PYTHON [/usr/bin/python3]   the interpreter the venv is made from
#   CINDER_SWIFTCLIENT_SPEC [python-swiftclient>=4.5,<5]   installed into the venv when
#       --driver swift is asked for (Cinder's SwiftBackupDriver needs it; cinder's wheel
#       does not depend on it)
#   CINDER_BOTO3_SPEC [boto3>=1.26,<2]   installed into the venv when --driver s3 is asked
#       for (Cinder's S3BackupDriver needs it; cinder's wheel does not depend on it)
#
# Facts learned getting this to run (keep them):
#  1. Cinder's backup objects need its database: the writer makes a SQLite file with Cinder's
#     own migrations (db_sync), as Cinder's unit test fixture does; volume rows need the
#     default volume type the migrations create.
#  2. The chunked driver sends notifications through oslo.messaging: a "fake:/" transport
#     and the "noop" notification driver keep them in-process.
#  3. backup_enable_progress_timer must be off: its looping call needs a running hub.
#  4. Cinder's zstd support is the `zstd` package (python-zstd), not `zstandard`; both read
#     and write standard zstd frames.
#  5. The first install takes ~2 minutes (about 130 packages); later runs reuse the venv.
set -euo pipefail

OUT_DIR=${1:?usage: $0 OUT_DIR [write_backups.py options...]}
shift
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
BV_CACHE=${BLOCKVAULT_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/blockvault}
PIP_SPEC=${CINDER_PIP_SPEC:-cinder==29.0.0}
VENV=${CINDER_VENV:-$BV_CACHE/cinder-venv-$(printf '%s' "$PIP_SPEC" | tr -c 'A-Za-z0-9._-' '_')}
BASE_PY=${CINDER_BASE_PYTHON:-/usr/bin/python3}
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP  # keep the caller's python settings out of the venv

log() { echo "[make-cinder-backups $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$OUT_DIR" "$(dirname "$VENV")"
# One venv shared by every run (and concurrent test sessions): install under a lock, and
# trust only a venv whose marker names the current spec (an interrupted install leaves no
# marker and is redone with --clear).
exec 8>"$VENV.lock"
flock -w 900 8 || die "could not lock $VENV.lock"
if [ "$(cat "$VENV/.blockvault-pip-spec" 2>/dev/null)" != "$PIP_SPEC" ] ||
   ! "$VENV/bin/python" -c 'import cinder.backup.drivers.posix' 2>/dev/null; then
    if ! "$BASE_PY" -c 'import ensurepip, venv' 2>/dev/null; then
        log "apt-get install python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            python3-venv >&2
    fi
    log "creating venv $VENV and pip installing $PIP_SPEC"
    "$BASE_PY" -m venv --clear "$VENV"
    # unquoted on purpose: may hold several specs
    "$VENV/bin/pip" install -q $PIP_SPEC >"$OUT_DIR/pip.log" 2>&1 ||
        { tail -n 30 "$OUT_DIR/pip.log" >&2; die "pip install $PIP_SPEC failed"; }
    "$VENV/bin/python" -c 'import cinder.backup.drivers.posix' 2>"$OUT_DIR/import.log" ||
        { tail -n 30 "$OUT_DIR/import.log" >&2; die "cinder installed but does not import"; }
    echo "$PIP_SPEC" >"$VENV/.blockvault-pip-spec"
fi
case " $* " in
    *" --driver swift "*|*" --driver=swift "*)
        if ! "$VENV/bin/python" -c 'import swiftclient' 2>/dev/null; then
            SWIFTCLIENT_SPEC=${CINDER_SWIFTCLIENT_SPEC:-python-swiftclient>=4.5,<5}
            log "pip installing $SWIFTCLIENT_SPEC into $VENV (Cinder's swift driver)"
            "$VENV/bin/python" -m pip install -q "$SWIFTCLIENT_SPEC" >"$OUT_DIR/pip-swift.log" 2>&1 ||
                { tail -n 30 "$OUT_DIR/pip-swift.log" >&2; die "pip install $SWIFTCLIENT_SPEC failed"; }
        fi
        ;;
    *" --driver s3 "*|*" --driver=s3 "*)
        if ! "$VENV/bin/python" -c 'import boto3' 2>/dev/null; then
            BOTO3_SPEC=${CINDER_BOTO3_SPEC:-boto3>=1.26,<2}
            log "pip installing $BOTO3_SPEC into $VENV (Cinder's s3 driver)"
            "$VENV/bin/python" -m pip install -q "$BOTO3_SPEC" >"$OUT_DIR/pip-s3.log" 2>&1 ||
                { tail -n 30 "$OUT_DIR/pip-s3.log" >&2; die "pip install $BOTO3_SPEC failed"; }
        fi
        ;;
esac
exec 8>&-

exec "$VENV/bin/python" -W ignore "$SCRIPT_DIR/write_backups.py" "$OUT_DIR" "$@"
