//! The fuzz targets on stable Rust: every committed seed (and every saved regression) through
//! its target on each `cargo test`, then a short mutation loop over the seeds. With
//! `BUREAU_GUARD_FUZZ_SECONDS=N` the loop runs N seconds per target instead (what
//! `scripts/fuzz.sh` falls back to when no nightly toolchain installs); `BUREAU_GUARD_FUZZ_SEED`
//! replays one loop. The coverage-guided runs are `fuzz/` (cargo-fuzz, nightly).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../fuzz/src/lib.rs"]
mod checks;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("config", checks::config),
    ("path", checks::path),
    ("cache_key", checks::cache_key),
    ("proxy_header", checks::proxy_header),
];

/// Mutations per target when no time budget is given: about a second in all on a debug build.
const DEFAULT_MUTATIONS: u64 = 1500;

/// Byte strings the parsers give meaning to, spliced in by the mutator.
const DICTIONARY: &[&[u8]] = &[
    b"/",
    b"//",
    b"/..",
    b"/.",
    b"%2F",
    b"%2f",
    b"%2E",
    b"%5C",
    b"%41",
    b"%",
    b"%c3%a9",
    b"?",
    b"&",
    b"=",
    b";",
    b"\\",
    b"+",
    b"\n",
    b"\r\n",
    b"\0",
    b"\"",
    b"[",
    b"]",
    b"[[routes]]",
    b"[[tenants]]",
    b" = ",
    b"{",
    b"}",
    b"\\u005f",
    b"PROXY ",
    b"TCP4 ",
    b"TCP6 ",
    b"UNKNOWN",
    b"\r\n\r\n\0\r\nQUIT\n",
    b"\x21\x11",
    b"\xff\xff",
    b"subject_id",
    b"Subject_ID",
    b"report_type",
    b"report%5Ftype",
];

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target)
}

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(dir(kind, target)) else { continue };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        out.extend(paths.iter().map(|p| std::fs::read(p).unwrap()));
    }
    out
}

/// Runs `check` on `input`; on a panic, saves the input where cargo-fuzz would and fails with it.
fn run(target: &str, check: Target, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/artifacts").join(target);
        std::fs::create_dir_all(&artifacts).unwrap();
        let file = artifacts.join(format!("crash-{}", blake3_hex(input)));
        std::fs::write(&file, input).unwrap();
        panic!("{target}: {:?} fails its check; saved to {}", String::from_utf8_lossy(input), file.display());
    }
}

fn blake3_hex(input: &[u8]) -> String {
    blake3::hash(input).to_hex()[..16].to_string()
}

#[test]
fn every_seed_passes_its_target() {
    for (target, check) in TARGETS {
        let seeds = inputs(target);
        assert!(!seeds.is_empty(), "fuzz/seeds/{target} is empty");
        for seed in &seeds {
            run(target, *check, seed);
        }
    }
}

fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(..=input.len());
        match rng.u8(..6) {
            0 if !input.is_empty() => {
                let i = rng.usize(..input.len());
                input[i] ^= 1 << rng.u8(..8);
            }
            1 => input.insert(at, rng.u8(..)),
            2 => {
                let end = rng.usize(at..=input.len().min(at + 8));
                input.drain(at..end);
            }
            3 => {
                let word = DICTIONARY[rng.usize(..DICTIONARY.len())];
                input.splice(at..at, word.iter().copied());
            }
            4 if !pool.is_empty() => {
                let other = &pool[rng.usize(..pool.len())];
                let from = rng.usize(..=other.len());
                let to = rng.usize(from..=other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            _ if !input.is_empty() => {
                let from = rng.usize(..input.len());
                let to = rng.usize(from..=input.len().min(from + 16));
                let piece = input[from..to].to_vec();
                input.splice(at..at, piece);
            }
            _ => input.push(rng.u8(..)),
        }
    }
}

#[test]
fn mutated_seeds_pass_their_target() {
    let budget = std::env::var("BUREAU_GUARD_FUZZ_SECONDS")
        .ok()
        .map(|s| Duration::from_secs(s.parse().expect("BUREAU_GUARD_FUZZ_SECONDS is a whole number of seconds")));
    let seed = std::env::var("BUREAU_GUARD_FUZZ_SEED").map_or_else(|_| fastrand::u64(..), |s| s.parse().unwrap());
    println!("mutation seed {seed} (BUREAU_GUARD_FUZZ_SEED={seed} replays it)");
    let per_target = budget.map(|b| b / TARGETS.len() as u32);
    for (target, check) in TARGETS {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut pool = inputs(target);
        let start = Instant::now();
        let mut runs = 0u64;
        loop {
            let done = match per_target {
                Some(t) => start.elapsed() >= t,
                None => runs >= DEFAULT_MUTATIONS,
            };
            if done {
                break;
            }
            let mut input = pool[rng.usize(..pool.len())].clone();
            mutate(&mut rng, &mut input, &pool);
            input.truncate(4096);
            run(target, *check, &input);
            // Keep a few mutants as parents: deeper mutations without coverage feedback.
            if pool.len() < 512 && rng.u8(..16) == 0 {
                pool.push(input);
            }
            runs += 1;
        }
        println!("{target}: {runs} mutated inputs in {:.1?}", start.elapsed());
    }
}
