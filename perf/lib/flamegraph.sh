#!/usr/bin/env bash
# A flame graph of one live shard, with py-spy (from PyPI: pip install py-spy,
# or `pip install -e '.[perf]'`). Sampling reads the shard's memory with
# ptrace; run it as root or as the server's user.
#
#   perf/lib/flamegraph.sh [SHARD] [SECONDS] [ADMIN_URL]
#   perf/lib/flamegraph.sh 0 30 http://127.0.0.1:9090   -> perf/results/flame-shard0.svg
set -euo pipefail
shard=${1:-0}
seconds=${2:-30}
admin=${3:-http://127.0.0.1:9090}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../.venv/bin/python}
pid=$("$py" - "$admin" "$shard" <<'PY'
import json, sys, urllib.request
status = json.load(urllib.request.urlopen(sys.argv[1] + "/status", timeout=5))
print(next(s["pid"] for s in status["shards"] if s["id"] == int(sys.argv[2])))
PY
)
mkdir -p "$here/results"
out="$here/results/flame-shard$shard.svg"
spy=$(dirname "$py")/py-spy
command -v "$spy" >/dev/null 2>&1 || spy=py-spy
echo "recording shard $shard (pid $pid) for $seconds s -> $out"
exec "$spy" record --pid "$pid" --duration "$seconds" --rate 250 --output "$out" --format flamegraph
