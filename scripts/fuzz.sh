#!/usr/bin/env bash
# Fuzz the request path's parsers for a bounded time; a crash fails the run.
#
#   scripts/fuzz.sh [--seconds N] [--stable]
#
# N seconds in all (default 60), shared by the four targets (config, path, cache_key,
# proxy_header). With a nightly toolchain and cargo-fuzz (installed here if missing and
# possible) the targets run coverage-guided (libFuzzer) from fuzz/seeds and fuzz/regressions,
# growing fuzz/corpus (not committed); a crash is left in fuzz/artifacts/TARGET/. Without them,
# or with --stable, the same checks run on stable as a seeded mutation loop
# (tests/fuzz_corpus.rs) for the same time.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
mode=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --stable) mode=stable; shift ;;
    *) echo "usage: $0 [--seconds N] [--stable]" >&2; exit 2 ;;
  esac
done
targets=(config path cache_key proxy_header)
per_target=$(( seconds / ${#targets[@]} ))
[ "$per_target" -ge 1 ] || per_target=1

if [ "$mode" = auto ]; then
  mode=stable
  if rustup toolchain list 2>/dev/null | grep -q '^nightly' \
     || rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
    if cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked >/dev/null 2>&1; then
      mode=fuzz
    else
      echo "cargo-fuzz does not install here: stable mutation loop instead" >&2
    fi
  else
    echo "no nightly toolchain installs here: stable mutation loop instead" >&2
  fi
fi

start=$(date +%s)
if [ "$mode" = fuzz ]; then
  # No sanitizer: the code under test is safe Rust (ASan only slows it); debug assertions on,
  # so overflows panic. Its own target directory, since the flags differ from the main build.
  flags=(-s none -a -O)
  echo "== cargo-fuzz build ($(cargo +nightly --version))"
  (cd fuzz && env -u CARGO_TARGET_DIR cargo +nightly fuzz build "${flags[@]}")
  built=$(date +%s)
  for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    dirs=("fuzz/corpus/$t" "fuzz/seeds/$t")
    [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
    echo "== fuzz $t for ${per_target}s"
    # -max_len: the parsers' inputs are small (a config is the largest, a few KiB).
    log="fuzz/target/fuzz-$t.log"
    mkdir -p fuzz/target
    if ! (cd fuzz && env -u CARGO_TARGET_DIR cargo +nightly fuzz run "${flags[@]}" "$t" "${dirs[@]#fuzz/}" -- \
        -max_total_time="$per_target" -max_len=8192 -print_final_stats=1 -seed="${FUZZ_SEED:-0}") >"$log" 2>&1; then
      grep -E 'panicked at|^SUMMARY|Test unit written' -A2 "$log" >&2 || tail -30 "$log" >&2
      echo "fuzz $t failed; inputs in fuzz/artifacts/$t/ (replay: cd fuzz && cargo +nightly fuzz run $t FILE)" >&2
      exit 1
    fi
    grep -E '^Done|stat::number_of_executed_units|stat::new_units_added' "$log" || true
  done
  echo "== fuzz: build $((built - start))s, runs $(( $(date +%s) - built ))s"
else
  echo "== stable mutation loop for ${seconds}s"
  BUREAU_GUARD_FUZZ_SECONDS="$seconds" cargo test --locked --test fuzz_corpus -- --nocapture
  echo "== fuzz (stable): $(( $(date +%s) - start ))s"
fi
