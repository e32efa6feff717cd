#!/usr/bin/env bash
# shellcheck disable=SC2317  # cleanup, burst and traffic run via trap and start(), which shellcheck cannot see
# Proves grafana/bureau-guard.json against a real Prometheus.
#
# Starts a mock bureau, our own redis-server (ephemeral 127.0.0.1 port, no persistence),
# bureau-guard with state.backend = "redis" (temp config, ephemeral ports), a second, nearly idle
# bureau-guard with the local backend and a state file (the state-file panels are empty by design
# with Redis) that serves TLS with optional client certificates (a CA, server and client
# certificates made with the openssl CLI in the temp dir), and our own Prometheus (temp config
# and data dir, ephemeral 127.0.0.1 port, scraping both admin /metrics every second), drives
# traffic that produces every outcome the dashboard shows (200s, 401, 404, 429 rate/quota
# enforced through Redis, dry-run limits, 503 sheds, 504 bureau timeouts, an applied and a
# rejected config reload; cache hits, coalesced look-ups against a slowed bureau, stale answers
# while the bureau times out, size evictions from a small cache, audit records; a 3 s Redis outage (CLIENT PAUSE) decided by fail_open; on the TLS
# proxy, a few requests per round: one with a client certificate a tenant lists (handshake ok,
# 200), the same certificate with another tenant's key (401 identity_mismatch), a trusted
# certificate no tenant lists (403 unknown_client_certificate), a certificate from an untrusted CA
# (handshake untrusted) and plain HTTP on the TLS port (handshake failed)), then runs
# EVERY `expr` of every panel target through Prometheus's /api/v1/query. Fails, listing the
# panels, if an expression does not parse or returns no data (a 0-valued series counts as data; a
# NaN-only result, e.g. a quantile over a window without observations, does not), or if the
# traffic did not really produce a cache hit, a coalesced and a stale answer, a stored answer, a
# size eviction, an audit record, the 429s rate_limited and daily_quota_exhausted, Redis leases,
# Redis errors and decisions made without Redis during the outage, the outage's quota units
# added to Redis after it, and the TLS handshakes and refusals above (counters that exist at 0
# would otherwise pass). Also lints the dashboard: stable uid, units and descriptions on every
# panel, `tenant=~"$tenant"` on every selector of a metric that has a tenant label.
#
# Usage (from the repo root):  bash scripts/check-dashboard.sh
# Environment:
#   BUREAU_GUARD_BIN   use this binary instead of `cargo build --release --locked`
#   PROMETHEUS_BIN     use this prometheus binary (default: `prometheus` on PATH, installed with
#                      apt-get if missing; needs root)
#   REDIS_SERVER_BIN   use this redis-server binary (default: `redis-server` on PATH, installed
#                      with apt-get if missing; needs root). redis-cli must be on PATH.
#   DASHBOARD          the dashboard to check (default grafana/bureau-guard.json)
#   CHECK_DEADLINE_S   seconds allowed for traffic + queries to satisfy every panel (default 75)
# The `openssl` CLI makes the test certificates (installed with apt-get if missing; needs root).
#
# The packaged Prometheus and Redis services (Debian's `prometheus` listens on :9090, the same port
# as bureau-guard's default admin listener; `redis-server` on :6379) are never used: the installs
# are done with a policy-rc.d that forbids starting services, and the units are disabled where
# systemd runs.
set -euo pipefail
cd "$(dirname "$0")/.."

DASHBOARD=${DASHBOARD:-grafana/bureau-guard.json}
DEADLINE_S=${CHECK_DEADLINE_S:-75}
# Grafana's interval variables, for the check. 15 s = 15 scrapes at our 1 s scrape interval.
RATE_INTERVAL=15s

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'check-dashboard: %s\n' "$*" >&2; exit 1; }

[ -f "$DASHBOARD" ] || die "$DASHBOARD not found (run from the repo root)"
command -v python3 >/dev/null || die "python3 is required"
command -v curl >/dev/null || die "curl is required"

# ---------------------------------------------------------------- children and cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/check-dashboard.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +m  # no "Terminated" job notices for the children we stop
  for pid in "${PIDS[@]}"; do
    # Each child runs in its own process group (set -m below), so its own children go too.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "$rc" -ne 0 ] && [ -d "$TMP" ]; then
    for f in "$TMP"/*.log; do
      [ "$(basename "$f")" != traffic.log ] || continue
      [ -s "$f" ] || continue
      printf -- '--- last lines of %s\n' "$(basename "$f")" >&2
      tail -n 15 "$f" >&2
    done
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Background jobs get their own process group, so cleanup can kill a job and its children.
set -m

start() { # start NAME CMD...: runs CMD in the background, output to $TMP/NAME.log
  local name=$1; shift
  "$@" >"$TMP/$name.log" 2>&1 &
  PIDS+=("$!")
}

wait_http() { # wait_http URL SECONDS WHAT: polls until URL answers 2xx
  local url=$1 limit=$2 what=$3 end=$((SECONDS + $2))
  until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
    [ "$SECONDS" -lt "$end" ] || die "$what not ready at $url after ${limit}s"
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || die "$what: a started process exited early"; done
    sleep 0.1
  done
}

# ---------------------------------------------------------------- prometheus and redis
apt_install() { # apt_install PACKAGE [SERVICE]: installs PACKAGE without letting its service start
  local pkg=$1 service=${2:-} policy=/usr/sbin/policy-rc.d own_policy=0 install_rc=0
  [ "$(id -u)" -eq 0 ] || die "$pkg is not installed and installing it needs root (apt-get install $pkg)"
  log "installing $pkg (apt-get; its packaged service is kept from starting)"
  if [ ! -e "$policy" ]; then
    # Debian's standard switch: maintainer scripts may not start services while it exits 101.
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$pkg"; } >"$TMP/apt.log" 2>&1 ||
    install_rc=$?
  [ "$own_policy" -eq 0 ] || rm -f "$policy"
  [ "$install_rc" -eq 0 ] || { tail -n 20 "$TMP/apt.log" >&2; die "apt-get install $pkg failed"; }
  if [ -n "$service" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl disable --now "$service" >/dev/null 2>&1 || true
  fi
}

PROMETHEUS=${PROMETHEUS_BIN:-$(command -v prometheus || true)}
if [ -z "$PROMETHEUS" ]; then
  apt_install prometheus prometheus
  PROMETHEUS=$(command -v prometheus) || die "prometheus still not on PATH after install"
fi
log "prometheus: $("$PROMETHEUS" --version 2>&1 | head -n 1)"

REDIS_SERVER=${REDIS_SERVER_BIN:-$(command -v redis-server || true)}
if [ -z "$REDIS_SERVER" ] || ! command -v redis-cli >/dev/null; then
  apt_install redis-server redis-server  # its dependency redis-tools brings redis-cli
  REDIS_SERVER=${REDIS_SERVER_BIN:-$(command -v redis-server)} || die "redis-server still not on PATH after install"
  command -v redis-cli >/dev/null || die "redis-cli still not on PATH after install"
fi
log "redis: $("$REDIS_SERVER" --version 2>&1 | head -n 1)"

if ! command -v openssl >/dev/null; then
  apt_install openssl
  command -v openssl >/dev/null || die "openssl still not on PATH after install"
fi

# ---------------------------------------------------------------- bureau-guard
if [ -n "${BUREAU_GUARD_BIN:-}" ]; then
  BIN=$BUREAU_GUARD_BIN
else
  log "cargo build --release --locked"
  cargo build --release --locked --quiet
  BIN=target/release/bureau-guard
fi
[ -x "$BIN" ] || die "$BIN is not an executable"

T0=$SECONDS

# Ephemeral ports: ask the kernel for free ones (all bound at once, so they are distinct).
read -r BUREAU_PORT PROXY_PORT ADMIN_PORT PROM_PORT REDIS_PORT LOCAL_PROXY_PORT LOCAL_ADMIN_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
PROXY=http://127.0.0.1:$PROXY_PORT
ADMIN=http://127.0.0.1:$ADMIN_PORT
BUREAU=http://127.0.0.1:$BUREAU_PORT
PROM=http://127.0.0.1:$PROM_PORT
LOCAL_ADMIN=http://127.0.0.1:$LOCAL_ADMIN_PORT
LOCAL_PROXY=https://127.0.0.1:$LOCAL_PROXY_PORT
redis() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
KEY_A=check-key-bank-a   # low rate and a small daily quota: 429 rate_limited, daily_quota_exhausted
KEY_B=check-key-bank-b   # max_queue = 1: 503 queue_full when it bursts
KEY_C=check-key-card-c   # deep queue: 503 queue_timeout; in-flight limit in dry run; monthly quota

cat >"$TMP/bureau-guard.toml" <<EOF
# Written by scripts/check-dashboard.sh; removed when it exits.
[server]
listen = "127.0.0.1:$PROXY_PORT"
request_timeout = "5s"
drain_timeout = "1s"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"
insecure_no_token = true   # a throwaway proxy on loopback, for this check only

[upstream]
url = "$BUREAU"
connect_timeout = "500ms"
# The script slows the mock bureau past this for a moment: 504 bureau_timeout.
response_timeout = "150ms"
max_concurrency = 2
queue_timeout = "50ms"

# Limits shared through Redis (state.file is an error with this backend). The default policy,
# fail_open: during the Redis outage the traffic causes, limits are decided locally.
[state]
backend = "redis"

[state.redis]
url = "redis://127.0.0.1:$REDIS_PORT"
on_unavailable = "fail_open"

[log]
access_log = false

# Small on purpose: the distinct subjects of the traffic below fill it, so it evicts by size.
# (max_entry_bytes must not exceed max_bytes; a credit report is ~1.5 KB.)
[cache]
max_bytes = "64KiB"
max_entry_bytes = "8KiB"

[audit]
file = "$TMP/audit.jsonl"

# Charges made durable before each call (the usage row's charge wait).
[usage]
dir = "$TMP/usage"

# Two priority levels: the credit reports queue as batch, the scores as interactive.
[[priority]]
name = "interactive"
share = 3

[[priority]]
name = "batch"
share = 1

# Expires after 1 s but may be served stale for 1 h: answers it while the bureau times out.
[[routes]]
name = "credit_report"
method = "POST"
path = "/v1/credit-report"
cost = 1
priority = "batch"
cache_ttl = "1s"
stale_if_error = "1h"
cache_key = ["body.subject_id", "body.report_type"]

# Cached and coalesced: repeated subjects hit, identical concurrent look-ups share one call.
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{subject_id}"
cost = 1
coalesce = true
cache_ttl = "10m"
cache_key = ["path.subject_id"]

[[tenants]]
id = "bank-a"
api_key_sha256 = "$(sha "$KEY_A")"
weight = 2
rate = 20
burst = 10
daily_quota = 60

[[tenants]]
id = "bank-b"
api_key_sha256 = "$(sha "$KEY_B")"
weight = 1
max_queue = 1
# A route quota (high: it never refuses here) for the contracts panel.
[tenants.routes.score]
daily_quota = 100000

[[tenants]]
id = "card-c"
api_key_sha256 = "$(sha "$KEY_C")"
weight = 1
max_in_flight = 2
dry_run = ["in_flight"]
monthly_quota = 1000000

# A group quota (high: it never refuses here) for the contracts panel.
[[groups]]
id = "card-family"
members = ["card-c"]
daily_quota = 1000000
EOF

# Certificates for the TLS listener of the local-backend proxy: a CA, a server certificate for
# 127.0.0.1, client certificates (one whose SAN DNS name bank-a lists in client_cert_names, one
# no tenant lists) and a client certificate from a second CA the proxy does not trust.
TLS=$TMP/tls
mkdir -p "$TLS"
make_ca() { # make_ca NAME CN
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 -subj "/CN=$2" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$TLS/$1.key" -out "$TLS/$1.pem"
}
make_cert() { # make_cert NAME CA SAN EXTENDED_KEY_USAGE
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
    -keyout "$TLS/$1.key" -out "$TLS/$1.csr"
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n' \
    "$3" "$4" >"$TLS/$1.ext"
  openssl x509 -req -days 365 -in "$TLS/$1.csr" -CA "$TLS/$2.pem" -CAkey "$TLS/$2.key" -CAcreateserial \
    -extfile "$TLS/$1.ext" -out "$TLS/$1.pem"
}
{
  make_ca ca "check-dashboard CA" &&
    make_ca other-ca "check-dashboard untrusted CA" &&
    make_cert server ca IP:127.0.0.1 serverAuth &&
    make_cert bank-a ca DNS:bank-a.check.example clientAuth &&
    make_cert stranger ca DNS:stranger.check.example clientAuth &&
    make_cert impostor other-ca DNS:bank-a.check.example clientAuth
} >"$TMP/openssl.log" 2>&1 || { tail -n 20 "$TMP/openssl.log" >&2; die "openssl could not make the test certificates"; }
# An (empty) CRL of the banks' CA, due in a week: the "CRL due" panel has data only with one.
mkdir -p "$TLS/ca-db" && : >"$TLS/ca-db/index.txt" && echo 1000 >"$TLS/ca-db/crlnumber"
printf '[ca]\ndefault_ca = banks\n[banks]\ndatabase = %s\ncrlnumber = %s\ndefault_md = sha256\ndefault_crl_days = 7\n' \
  "$TLS/ca-db/index.txt" "$TLS/ca-db/crlnumber" >"$TLS/ca.cnf"
openssl ca -config "$TLS/ca.cnf" -gencrl -keyfile "$TLS/ca.key" -cert "$TLS/ca.pem" -out "$TLS/ca.crl.pem" \
  >>"$TMP/openssl.log" 2>&1 || { tail -n 20 "$TMP/openssl.log" >&2; die "openssl could not make the test CRL"; }

# The local backend with a state file, idle but for a few TLS requests: the state-file panels have
# data only there, and so do the TLS panels (the proxy under traffic serves plain HTTP).
cat >"$TMP/bureau-guard-local.toml" <<EOF
# Written by scripts/check-dashboard.sh; removed when it exits.
[server]
listen = "127.0.0.1:$LOCAL_PROXY_PORT"
drain_timeout = "1s"

[server.tls]
cert = "$TLS/server.pem"
key = "$TLS/server.key"
client_auth = "optional"
client_ca = "$TLS/ca.pem"
crl = ["$TLS/ca.crl.pem"]
client_identity = "san_dns"

[admin]
listen = "127.0.0.1:$LOCAL_ADMIN_PORT"
insecure_no_token = true

[upstream]
url = "$BUREAU"

[state]
file = "$TMP/state.json"
flush_interval = "1s"

[log]
access_log = false

[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{subject_id}"

[[tenants]]
id = "bank-a"
api_key_sha256 = "$(sha "$KEY_A")"
client_cert_names = ["bank-a.check.example"]
daily_quota = 60

# Its key with bank-a's certificate: 401 identity_mismatch.
[[tenants]]
id = "bank-b"
api_key_sha256 = "$(sha "$KEY_B")"
EOF

cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: bureau-guard
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT", "127.0.0.1:$LOCAL_ADMIN_PORT"]
EOF

log "starting mock bureau ($BUREAU), redis (127.0.0.1:$REDIS_PORT), bureau-guard ($PROXY, admin $ADMIN;" \
  "local backend: $LOCAL_PROXY, admin $LOCAL_ADMIN), prometheus ($PROM)"
for cfg in bureau-guard bureau-guard-local; do
  "$BIN" check --config "$TMP/$cfg.toml" >"$TMP/check.log" 2>&1 || { cat "$TMP/check.log" >&2; die "temp config $cfg.toml rejected"; }
done
start redis "$REDIS_SERVER" --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
end=$((SECONDS + 20))
until [ "$(redis ping 2>/dev/null)" = PONG ]; do
  [ "$SECONDS" -lt "$end" ] || die "redis not answering PING on 127.0.0.1:$REDIS_PORT after 20s"
  kill -0 "${PIDS[-1]}" 2>/dev/null || die "redis-server exited early"
  sleep 0.1
done
start mock-bureau "$BIN" mock-bureau --listen "127.0.0.1:$BUREAU_PORT" --workers 4 --service-ms 5
start bureau-guard env RUST_LOG=warn "$BIN" serve --config "$TMP/bureau-guard.toml"
start bureau-guard-local env RUST_LOG=warn "$BIN" serve --config "$TMP/bureau-guard-local.toml"
start prometheus "$PROMETHEUS" --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prometheus-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn
wait_http "$BUREAU/stats" 20 "mock bureau"
wait_http "$ADMIN/healthz" 20 "bureau-guard"
wait_http "$LOCAL_ADMIN/healthz" 20 "bureau-guard (local backend)"
wait_http "$PROM/-/ready" 30 "prometheus"

# ---------------------------------------------------------------- traffic
# Bounded: at most $ROUNDS rounds of a few bursts each; stopped early once every panel has data.
ROUNDS=60
# burst KEY COUNT PARALLEL TAG [KIND]: COUNT requests, PARALLEL at once. KIND:
#   score   GET  /v1/score/S-TAG-1 .. S-TAG-COUNT    (distinct subjects: misses, cache fills)
#   same    GET  /v1/score/S-TAG, COUNT times        (one subject: coalesced, then cache hits)
#   report  POST /v1/credit-report, subject S-TAG   (the same look-up COUNT times)
burst() {
  local key=$1 n=$2 par=$3 tag=$4 kind=${5:-score}
  local hdr=() opts=() url
  [ -z "$key" ] || hdr=(-H "x-api-key: $key")
  # curl holds parallel transfers to one host back until it knows whether the first connection can
  # multiplex (HTTP/1.1: no); identical look-ups must arrive together to be coalesced.
  [ "$kind" != same ] || opts=(--parallel-immediate)
  if [ "$kind" = report ]; then
    curl -s --no-progress-meter -Z --parallel-max "$par" --max-time 5 "${hdr[@]}" -H 'content-type: application/json' \
      -d "{\"subject_id\":\"S-$tag\",\"report_type\":\"full\"}" -o /dev/null -w '%{http_code}\n' \
      "$PROXY/v1/credit-report?n=[1-$n]" || true
  else
    url="$PROXY/v1/score/S-$tag-[1-$n]"
    [ "$kind" != same ] || url="$PROXY/v1/score/S-$tag?n=[1-$n]"  # the query is not part of the cache key
    curl -s --no-progress-meter -Z "${opts[@]}" --parallel-max "$par" --max-time 5 "${hdr[@]}" -o /dev/null \
      -w '%{http_code}\n' "$url" || true
  fi
}
# tls_requests ROUND: on the TLS proxy, lines "tls <what> <HTTP status> <curl exit code>" (status 000 =
# the handshake was refused) in the traffic log. The handshake results go to
# bureau_guard_tls_handshakes_total, the refusals after a handshake to requests_total.
tls_curl() { # tls_curl WHAT CURL_ARGS...
  local what=$1; shift
  curl -s -o /dev/null --max-time 2 -w "tls $what %{http_code} %{exitcode}\n" "$@" || true
}
tls_requests() {
  local url="$LOCAL_PROXY/v1/score/S-tls$1" ca=(--cacert "$TLS/ca.pem")
  tls_curl bank-a-cert "${ca[@]}" --cert "$TLS/bank-a.pem" --key "$TLS/bank-a.key" "$url"  # ok, 200
  tls_curl bank-a-cert+bank-b-key "${ca[@]}" --cert "$TLS/bank-a.pem" --key "$TLS/bank-a.key" \
    -H "x-api-key: $KEY_B" "$url"                                                      # ok, 401 identity_mismatch
  tls_curl unlisted-cert "${ca[@]}" --cert "$TLS/stranger.pem" --key "$TLS/stranger.key" "$url"  # ok, 403
  tls_curl untrusted-cert "${ca[@]}" --cert "$TLS/impostor.pem" --key "$TLS/impostor.key" "$url" # untrusted
  tls_curl plain-http "http://127.0.0.1:$LOCAL_PROXY_PORT/v1/score/S-tls$1"             # failed
}
bureau_service_ms() { curl -fsS -o /dev/null --max-time 2 -d "{\"service_ms\": $1}" "$BUREAU/control" || true; }
traffic() {
  local r
  burst "$KEY_B" 1 1 stale report             # cached now; expired (1 s) when a slow bureau comes below
  for r in $(seq "$ROUNDS"); do
    tls_requests "$r"                         # TLS handshakes: ok, untrusted, failed; 401, 403
    burst "$KEY_A" 30 4 "a$r"                 # over rate 20/burst 10, later over daily_quota 60: 429
    burst "$KEY_B" 10 2 report report         # steady; one look-up, cached for 1 s: hits, stale look-ups
    burst "$KEY_C" 10 2 "c$r"                 # steady
    burst "$KEY_B" 20 4 hot same              # the same subject again and again: cache hits
    burst "$KEY_C" 20 4 hot same
    burst "$KEY_B" 30 15 "bb$r"               # max_queue 1: 503 queue_full
    burst "$KEY_C" 80 40 "cc$r"               # deep queue, 50 ms queue_timeout: 503 queue_timeout;
                                              # over max_in_flight 2 in dry run
    burst "wrong-key" 3 3 "x$r"               # 401 invalid_api_key
    burst "" 2 2 "y$r"                        # 401 missing_api_key
    curl -s -o /dev/null -w '%{http_code}\n' --max-time 2 -H "x-api-key: $KEY_B" "$PROXY/v1/nowhere" || true  # 404
    if [ "$r" -eq 2 ]; then                   # one applied and one rejected config reload
      curl -s -o /dev/null -X POST --max-time 5 "$ADMIN/admin/reload" || true
      cp "$TMP/bureau-guard.toml" "$TMP/good.toml"
      echo 'not_a_key = 1' >>"$TMP/bureau-guard.toml"
      curl -s -o /dev/null -X POST --max-time 5 "$ADMIN/admin/reload" || true
      cp "$TMP/good.toml" "$TMP/bureau-guard.toml"
    fi
    if [ "$r" -eq 3 ]; then                   # Redis stops answering for 3 s: its calls time out
      redis client pause 3000 >/dev/null || true      # (1 s), Redis is marked down and limits are
      sleep 0.3                               # decided locally (fail_open); then a heartbeat
      burst "$KEY_A" 20 4 "outage-a$r"        # succeeds and the quota units charged meanwhile
      burst "$KEY_C" 20 4 "outage-c$r"        # are added to Redis (quota_sync)
      sleep 1.2
      burst "$KEY_A" 20 4 "outage-a2-$r"
      burst "$KEY_C" 20 4 "outage-c2-$r"
    fi
    bureau_service_ms 100                     # slower, still within response_timeout: identical
    burst "$KEY_C" 12 12 "co$r" same          # concurrent look-ups join one bureau call (coalesced)
    bureau_service_ms 5
    if [ $((r % 3)) -eq 1 ]; then             # the bureau slows past response_timeout: 504
      burst "$KEY_B" 1 1 stale report         # fresh in the cache (a small cache evicts it between
      sleep 1.1                               # rounds), then expired: served stale below
      bureau_service_ms 300
      burst "$KEY_B" 2 2 "slow$r"
      burst "$KEY_B" 1 1 stale report         # expired entry within stale_if_error: a stale answer
      bureau_service_ms 5
      burst "$KEY_B" 1 1 stale report         # the bureau is back: refreshed (expires again in 1 s)
    fi
    sleep 0.2
  done
}
start traffic traffic

# ---------------------------------------------------------------- evaluate the dashboard
log "waiting for data, then evaluating every panel expression (deadline ${DEADLINE_S}s)"
# In the background and waited for, so that a signal interrupts the wait and cleanup runs at once.
python3 - "$DASHBOARD" "$PROM" "$DEADLINE_S" "$RATE_INTERVAL" >"$TMP/result.txt" <<'EOF' &
import json, re, sys, time, urllib.parse, urllib.request

path, prom, deadline_s, rate_interval = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + deadline_s
dash = json.load(open(path))


def api(endpoint, **params):
    url = f"{prom}/api/v1/{endpoint}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400 = bad expression: the body says why
        try:
            return json.load(e)
        except Exception:
            return {"status": "error", "error": f"HTTP {e.code}"}
    except Exception as e:
        return {"status": "error", "error": str(e)}


def substitute(expr):
    for var, value in [("${__rate_interval}", rate_interval), ("$__rate_interval", rate_interval),
                       ("${__interval}", rate_interval), ("$__interval", rate_interval),
                       ("${__range}", "5m"), ("$__range", "5m")]:
        expr = expr.replace(var, value)
    return re.sub(r"\$\{tenant(:[a-z]+)?\}|\$tenant\b", ".*", expr)


def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))


# ---- static lint of the dashboard
problems = []
if dash.get("uid") != "bureau-guard":
    problems.append(f"uid is {dash.get('uid')!r}, expected 'bureau-guard'")
names = [v.get("name") for v in dash.get("templating", {}).get("list", [])]
for want in ("datasource", "tenant"):
    if want not in names:
        problems.append(f"no ${want} variable")
ids = [p.get("id") for p in panels(dash["panels"])]
if len(ids) != len(set(ids)):
    problems.append("duplicate panel ids")
checks = []  # (panel title, refId, raw expr)
for p in panels(dash["panels"]):
    if p.get("type") == "row":
        continue
    title = p.get("title", f"panel {p.get('id')}")
    if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
        problems.append(f"{title}: no unit")
    if not p.get("description"):
        problems.append(f"{title}: no description")
    targets = p.get("targets", [])
    if not targets:
        problems.append(f"{title}: no targets")
    for t in targets:
        if not t.get("expr"):
            problems.append(f"{title} [{t.get('refId')}]: target without expr")
            continue
        checks.append((title, t.get("refId", "?"), t["expr"]))

# Which metrics carry a tenant label, as bureau-guard actually exports them.
end = time.monotonic() + min(30, deadline_s)
tenant_metrics = set()
while time.monotonic() < end:
    r = api("series", **{"match[]": '{__name__=~"bureau_guard_.+", tenant!=""}'})
    tenant_metrics = {s["__name__"] for s in r.get("data", [])} if r.get("status") == "success" else set()
    if "bureau_guard_requests_total" in tenant_metrics:
        break
    time.sleep(0.5)
if not tenant_metrics:
    problems.append("prometheus has no bureau_guard_* series with a tenant label: is the scrape working?")
sel = re.compile(r"\b(bureau_guard_[a-z0-9_]+)\s*(\{[^}]*\})?")
for title, ref, expr in checks:
    for m in sel.finditer(expr):
        if m.group(1) in tenant_metrics and 'tenant=~"$tenant"' not in (m.group(2) or ""):
            problems.append(f'{title} [{ref}]: {m.group(1)} is not filtered by tenant=~"$tenant"')

# ---- the traffic must really have produced what the cache, coalescing and audit panels show:
# their counters exist at 0 (or appear on first use), so "returns data" alone would not prove it.
proofs = [
    ("a cache hit", 'sum(bureau_guard_requests_total{outcome="cache_hit"})'),
    ("a coalesced answer", 'sum(bureau_guard_requests_total{outcome="coalesced"})'),
    ("a stale answer", 'sum(bureau_guard_requests_total{outcome="stale"})'),
    ("an answer stored in the cache", 'sum(bureau_guard_cache_stores_total{result="stored"})'),
    ("a size eviction", 'sum(bureau_guard_cache_evictions_total{cause="size"})'),
    ("a 2xx bureau answer", 'sum(bureau_guard_bureau_responses_total{class="2xx"})'),
    ("an audit record written", "sum(bureau_guard_audit_records_total)"),
    ("the audit log healthy", "min(bureau_guard_audit_healthy)"),
    # state.backend = "redis": the limits are still enforced, and the Redis panels show real calls.
    ("a 429 rate_limited", 'sum(bureau_guard_requests_total{outcome="rate_limited"})'),
    ("a 429 daily_quota_exhausted", 'sum(bureau_guard_requests_total{outcome="daily_quota_exhausted"})'),
    ("a Redis lease", 'sum(bureau_guard_state_redis_calls_total{op=~"rate_lease|quota_lease"})'),
    ("a Redis error (outage)", "sum(bureau_guard_state_redis_errors_total)"),
    ("a decision made without Redis (outage)", "sum(bureau_guard_state_fallback_decisions_total)"),
    ("outage units added to Redis after it", 'sum(bureau_guard_state_redis_calls_total{op="quota_sync"})'),
    # the TLS listener of the local-backend proxy: its handshake counters exist at 0 from the start.
    ("a TLS handshake ok", 'sum(bureau_guard_tls_handshakes_total{result="ok"})'),
    ("a TLS handshake untrusted", 'sum(bureau_guard_tls_handshakes_total{result="untrusted"})'),
    ("a TLS handshake failed", 'sum(bureau_guard_tls_handshakes_total{result="failed"})'),
    ("a 403 unknown_client_certificate", 'sum(bureau_guard_requests_total{outcome="unknown_client_certificate"})'),
    ("a 401 identity_mismatch", 'sum(bureau_guard_requests_total{outcome="identity_mismatch"})'),
]
proved = {}


def prove(again=False):
    for what, expr in proofs:
        if proved.get(what, 0) > 0 and not again:
            continue
        r = api("query", query=expr)
        data = r.get("data", {}).get("result", []) if r.get("status") == "success" else []
        try:
            value = max((float(s["value"][1]) for s in data), default=0)
        except ValueError:
            value = 0
        proved[what] = max(value, proved.get(what, 0))


# ---- every expression must parse and return data; poll until then or the deadline
results = {}
while True:
    prove()
    for i, (title, ref, expr) in enumerate(checks):
        if results.get(i, (None, 0))[1] > 0 or results.get(i, ("",))[0].startswith("error: bad_data"):
            continue  # has data, or does not parse (that will not change)
        r = api("query", query=substitute(expr))
        if r.get("status") != "success":
            results[i] = (f"error: {r.get('errorType', '')} {r.get('error', '')}".strip(), 0)
        else:
            data = r["data"]["result"]
            if r["data"]["resultType"] == "vector":
                values = [s["value"][1] for s in data]
            else:  # scalar
                values = [data[1]]
            # NaN-only (e.g. a quantile over a window without observations) is not yet proof of data.
            finite = [v for v in values if v not in ("NaN", "+Inf", "-Inf")]
            results[i] = ("ok" if finite else ("only NaN" if values else "no data"), len(values) if finite else 0)
    waiting = [i for i in range(len(checks)) if results[i][1] == 0 and not results[i][0].startswith("error: bad_data")]
    waiting += [what for what, _ in proofs if proved.get(what, 0) <= 0]
    if not waiting or time.monotonic() > deadline:
        break
    time.sleep(1)

w = max(len(f"{t} [{r}]") for t, r, _ in checks)
print(f"{'panel [ref]':<{w}}  {'series':>6}  expr")
for i, (title, ref, expr) in enumerate(checks):
    status, n = results[i]
    shown = re.sub(r"\s+", " ", expr)
    flag = "" if n else f"   <-- {status}"
    print(f"{f'{title} [{ref}]':<{w}}  {n:>6}  {shown}{flag}")
failed = [(checks[i][0], checks[i][1], results[i][0]) for i in range(len(checks)) if results[i][1] == 0]
for title, ref, status in failed:
    problems.append(f"{title} [{ref}]: {status}")
print()
prove(again=True)  # the totals at the end, for the record
print("traffic produced: " + ", ".join(f"{what} ({proved.get(what, 0):g})" for what, _ in proofs))
for what, expr in proofs:
    if proved.get(what, 0) <= 0:
        problems.append(f"traffic: no proof of {what} ({expr} is 0 or absent)")
print()
if problems:
    print(f"FAIL: {len(problems)} problem(s):")
    for p in problems:
        print(f"  - {p}")
    sys.exit(1)
print(f"OK: {len(checks)} expressions in {sum(1 for p in panels(dash['panels']) if p.get('type') != 'row')} "
      f"panels parse and return data; every panel has a unit and a description; tenant filter on every "
      f"tenant-labelled metric; the traffic produced every cache, coalescing, audit, 429, Redis and TLS "
      f"outcome.")
EOF
CHECKER=$!
PIDS+=("$CHECKER")
rc=0
wait "$CHECKER" || rc=$?
cat "$TMP/result.txt"

# Responses the traffic got, for the record.
if [ -s "$TMP/traffic.log" ]; then
  printf 'traffic so far (HTTP status: count): %s\n' \
    "$(grep -E '^[0-9]{3}$' "$TMP/traffic.log" | sort | uniq -c | awk '{printf "%s: %s  ", $2, $1}')"
  printf 'TLS requests so far (what, HTTP status, curl exit code: count): %s\n' \
    "$(grep -E '^tls ' "$TMP/traffic.log" | sort | uniq -c | awk '{printf "%s %s %s: %s  ", $3, $4, $5, $1}')"
fi
[ ! -f "$TMP/audit.jsonl" ] || printf 'audit log: %s lines\n' "$(wc -l <"$TMP/audit.jsonl")"
log "done in $((SECONDS - T0))s after the build"
exit "$rc"
