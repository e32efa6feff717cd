#!/usr/bin/env bash
# Admission overhead with the Redis backend vs local, through one replica (issue 8).
#
#   bash benches/redis_admission.sh            # 3 rotated rounds x 10 s per variant at 2,000 req/s
#   bash benches/redis_admission.sh --quick    # 1 round x 2 s (CI smoke run)
#
# All load targets 127.0.0.1; Redis is started by the benchmark on an ephemeral port.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis_admission.sh: installing redis-server" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q redis-server
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec cargo bench --locked --bench redis_admission -- "$@"
