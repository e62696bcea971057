#!/usr/bin/env bash
# tools/swift/stop-swift.sh RUN_DIR [SERVER...]
# Stops only the processes that start-swift.sh recorded in RUN_DIR/pid/*.pid: all of them,
# or only the SERVERs named (memcached, proxy-server, account-server, container-server,
# object-server, container-updater, object-updater, object-expirer).  The test fixture
# stops just proxy-server to simulate an outage; start-swift.sh RUN_DIR brings it back.
# A pid file holds "PID STARTTIME" (field 22 of /proc/PID/stat), so a recycled
# PID that now belongs to someone else is never signalled.  Each server was
# started with setsid (PGID == PID), so its forked workers are stopped with it.
# Data, config and logs are kept; "rm -rf RUN_DIR" afterwards for a clean slate.
set -uo pipefail

RUN_DIR=${1:-${SWIFT_RUN_DIR:-}}
[ -n "$RUN_DIR" ] || { echo "usage: $0 RUN_DIR [SERVER...]" >&2; exit 2; }
shift || true
ONLY=("$@")
RUN_DIR=$(cd "$RUN_DIR" 2>/dev/null && pwd -P) || { echo "[stop-swift] no $RUN_DIR" >&2; exit 0; }
PID_DIR=$RUN_DIR/pid
TIMEOUT=${SWIFT_STOP_TIMEOUT:-15}

log() { echo "[stop-swift] $*" >&2; }
[ -d "$PID_DIR" ] || { log "nothing to stop ($PID_DIR missing)"; exit 0; }

alive() {  # alive PID STARTTIME: running, not a zombie, and the very process we started
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }                       # fields 3.. (comm may contain spaces/parens)
    set -- "$2" $stat
    [ "$2" != Z ] && [ "${21}" = "$1" ]     # $2 = state, ${21} = field 22 = starttime
}
members() {  # members PGID: live processes of group PGID whose command line is under RUN_DIR
    local pg=$1 f s p
    for f in /proc/[0-9]*/stat; do
        { read -r s <"$f"; } 2>/dev/null || continue
        p=${f#/proc/}; p=${p%/stat}
        s=${s##*) }
        set -- $s                            # $1 = state, $3 = pgrp
        [ "$3" = "$pg" ] && [ "$1" != Z ] || continue
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF "$RUN_DIR/" && echo "$p"
    done
}

# proxy first (stop accepting requests), then daemons, backends, memcached last
order=(proxy-server object-expirer object-updater container-updater
       object-server container-server account-server memcached)
for f in "$PID_DIR"/*.pid; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .pid)
    case " ${order[*]} " in *" $n "*) ;; *) order+=("$n") ;; esac
done

[ ${#ONLY[@]} -eq 0 ] || order=("${ONLY[@]}")

rc=0
for name in "${order[@]}"; do
    f=$PID_DIR/$name.pid
    [ -f "$f" ] || continue
    pid='' st=''
    read -r pid st <"$f"
    [ -n "$pid" ] || { rm -f "$f"; continue; }
    if alive "$pid" "$st"; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    else
        # leader gone; kill leftover workers of ours (e.g. parent was SIGKILLed)
        left=$(members "$pid")
        [ -n "$left" ] || { rm -f "$f"; continue; }
        kill -TERM $left 2>/dev/null
    fi
    end=$((SECONDS + TIMEOUT))
    while { alive "$pid" "$st" || [ -n "$(members "$pid")" ]; } && [ "$SECONDS" -lt "$end" ]; do
        sleep 0.1
    done
    if alive "$pid" "$st" || [ -n "$(members "$pid")" ]; then
        log "$name ($pid) still running after ${TIMEOUT}s; SIGKILL"
        alive "$pid" "$st" && kill -KILL -- "-$pid" 2>/dev/null
        left=$(members "$pid"); [ -n "$left" ] && kill -KILL $left 2>/dev/null
        sleep 0.3
        if alive "$pid" "$st" || [ -n "$(members "$pid")" ]; then
            log "could not stop $name ($pid)"; rc=1; continue
        fi
    fi
    log "stopped $name ($pid)"
    rm -f "$f"
done
exit $rc
