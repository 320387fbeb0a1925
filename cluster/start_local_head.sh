#!/usr/bin/env bash
# Start a one-machine Ray "cluster" to submit jobs to, with the flags this kind of machine needs.
#   cluster/start_local_head.sh            # start
#   cluster/start_local_head.sh stop       # stop this head (only its own processes)
# Then, from the repo root:
#   export RAY_AUTH_MODE=token             # Ray 2.60 turns token auth on; the CLI needs this set
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python experiments/sweep_sigma.py paths.runs_dir=$PWD/runs
# (paths.runs_dir must be absolute: a submitted job runs in a temporary copy of the repo.)
# Settings (environment): NUM_CPUS, HEAD_TMP (Ray's temp dir, which names this head; default
# /tmp/ray-nds), HEAD_PORT (GCS, 6379), DASHBOARD_PORT (job API, 8265), CLIENT_PORT (10001),
# AGENT_PORT (dashboard agent, 52365): a second head beside a running one needs its own of each.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
HEAD_TMP="${HEAD_TMP:-/tmp/ray-nds}"
if [ "${1:-start}" = stop ]; then
  # `ray stop` would stop every Ray process of the user (a sweep running beside this head too):
  # stop only the processes started for this head, which all name its temp dir
  pkill -TERM -f -- "$HEAD_TMP" || true
  for _ in $(seq 20); do pgrep -f -- "$HEAD_TMP" >/dev/null || exit 0; sleep 0.5; done
  pkill -KILL -f -- "$HEAD_TMP" || true
  exit 0
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/runs/cache/torch_extensions}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
ray start --head --num-cpus "${NUM_CPUS:-$(nproc)}" --temp-dir "$HEAD_TMP" --port "${HEAD_PORT:-6379}" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "${CLIENT_PORT:-10001}" \
  --dashboard-agent-listen-port "${AGENT_PORT:-52365}" --disable-usage-stats
# the job API answers a few seconds after `ray start` returns; wait so a submit right after works
DASHBOARD_PORT="$DASHBOARD_PORT" HEAD_TMP="$HEAD_TMP" python - <<'PY'
import os, time, urllib.error, urllib.request
url = f"http://127.0.0.1:{os.environ['DASHBOARD_PORT']}/api/version"
# (on a freshly installed venv the dashboard's first start took over 30 s here: allow 2 minutes)
deadline = time.monotonic() + 120
while True:
    try:
        urllib.request.urlopen(url, timeout=2)
        break
    except urllib.error.HTTPError:  # it answers (401 without a token under token auth): it is up
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit(f"Ray's job API did not come up at {url} within 2 minutes (is ray[default] "
                             f"installed? see {os.environ['HEAD_TMP']}/session_latest/logs/dashboard.log)")
        time.sleep(0.5)
PY
echo "Ray head up (temp dir $HEAD_TMP); dashboard and job API at http://127.0.0.1:$DASHBOARD_PORT"
