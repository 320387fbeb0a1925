#!/usr/bin/env bash
# Start a one-machine Ray "cluster" to submit jobs to, with the flags this kind of machine needs.
#   cluster/start_local_head.sh            # start
#   cluster/start_local_head.sh stop       # stop
# Then, from the repo root:
#   export RAY_AUTH_MODE=token             # Ray 2.60 turns token auth on; the CLI needs this set
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python experiments/sweep_sigma.py paths.runs_dir=$PWD/runs
# (paths.runs_dir must be absolute: a submitted job runs in a temporary copy of the repo.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
if [ "${1:-start}" = stop ]; then exec ray stop; fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/runs/cache/torch_extensions}"
ray start --head --num-cpus "${NUM_CPUS:-$(nproc)}" --dashboard-host 127.0.0.1 --disable-usage-stats
# the job API answers a few seconds after `ray start` returns; wait so a submit right after works
python - <<'PY'
import time, urllib.error, urllib.request
# (on a freshly installed venv the dashboard's first start took over 30 s here: allow 2 minutes)
deadline = time.monotonic() + 120
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=2)
        break
    except urllib.error.HTTPError:  # it answers (401 without a token under token auth): it is up
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("Ray's job API did not come up on 127.0.0.1:8265 within 2 minutes "
                             "(is ray[default] installed? see /tmp/ray/session_latest/logs/dashboard.log)")
        time.sleep(0.5)
PY
echo "Ray head up; dashboard and job API at http://127.0.0.1:8265"
