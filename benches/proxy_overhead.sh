#!/usr/bin/env bash
# End-to-end proxy benchmark: direct to the mock bureau vs through bureau-guard
# vs through nginx, open-loop load at increasing rates, in four scenarios,
# and a closed loop with wrk (--mode closed):
# overhead (every request reaches the mock), cache-hit (every request is
# answered from the proxy's cache; issue 5), and tls / tls-handshake (each
# proxy plain and terminating TLS with the same certificate; issue 7).
#
#   bash benches/proxy_overhead.sh                    # full run, all four scenarios: ~16 minutes
#   bash benches/proxy_overhead.sh --mode overhead    # full run, overhead only: ~3 minutes
#   bash benches/proxy_overhead.sh --mode cache-hit   # full run, cache hits only: ~4.5 minutes
#   bash benches/proxy_overhead.sh --mode tls         # full run, plain vs TLS, kept-alive: ~3.5 minutes
#   bash benches/proxy_overhead.sh --mode tls-handshake  # full run, a TLS handshake per request: ~4 minutes
#   bash benches/proxy_overhead.sh --mode closed      # closed loop with wrk (issue 16): ~3 minutes
#   bash benches/proxy_overhead.sh --quick            # smoke run (CI), all five scenarios: ~70 s once built
#   bash benches/proxy_overhead.sh --help             # every option
#
# All load targets 127.0.0.1. See benches/README.md for the scenario and the criterion.
set -euo pipefail
cd "$(dirname "$0")/.."

# nginx is the reference proxy; install it the Debian way if it is missing (we run as root).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "proxy_overhead.sh: installing nginx" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q nginx
fi

# wrk drives the closed-loop mode (`--mode closed`), as the issue 16 baseline was measured.
if ! command -v wrk >/dev/null 2>&1; then
  echo "proxy_overhead.sh: installing wrk" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q wrk
fi

# Open-loop load opens as many connections as a slow target needs: allow as
# many descriptors as the hard limit permits (children inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec cargo bench --locked --bench proxy_overhead -- "$@"
