#!/usr/bin/env bash
# tools/keystone/stop-keystone.sh RUN_DIR: stops the Keystone started there.
set -uo pipefail
RUN_DIR=${1:?usage: $0 RUN_DIR}
if [ -f "$RUN_DIR/keystone.pid" ]; then
    kill "$(cat "$RUN_DIR/keystone.pid")" 2>/dev/null
    rm -f "$RUN_DIR/keystone.pid"
fi
exit 0
