//! `--mode closed` (issue 16): closed-loop throughput and CPU per request, side by side with
//! nginx, as the baseline was measured: `wrk`, keep-alive, 32 connections, the zero-latency
//! mock behind every proxy. Rounds alternate the targets' order; each figure is the median of
//! the rounds. CPU per request is the proxy process's CPU time (nginx: its workers too) over the
//! requests wrk completed against it.
//!
//! Two sets, each against its own reference:
//! - **bare** (no cache): bureau-guard as deployed by default (`server.workers` one per CPU),
//!   bureau-guard on the shared work-stealing runtime (`server.workers = 0`, the model before
//!   issue 16), bureau-guard with every feature a deployment uses on (rate limit, in-flight cap,
//!   daily and monthly quotas, quota state file, access log, audit log, usage statements with the
//!   durable charge journal), and nginx as a plain keep-alive reverse proxy;
//!   plus the hyper floor (`floor.rs`): bureau-guard's threading and buffering on hyper and
//!   hyper-util with none of its stages, the least a proxy on the required stack costs;
//! - **hit**: every request one hot subject, answered from bureau-guard's cache and from nginx's
//!   `proxy_cache`.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use super::{API_KEY, ChildGuard, Env, HOT_PATH, PROBE_PATH, cpu_time, free_ports, guard_config, median, nginx_config};

/// Connections and threads, as the baseline: `wrk -t2 -c32`.
const CONNECTIONS: u32 = 32;
const THREADS: u32 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Guard,
    GuardShared,
    /// bureau-guard with these features on (see [`Feature`]).
    GuardWith(&'static [Feature]),
    /// The least a proxy on the required stack does per request (`floor.rs`).
    Floor,
    Nginx,
}

/// What a bureau deployment turns on beyond the bare proxy, one at a time in the `features` set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Feature {
    /// Rate, burst, in-flight cap, daily and monthly quotas on the tenant (never reached).
    Limits,
    /// `[state] file`: the quota counters written every second.
    StateFile,
    /// `log.access_log = true`: a line per request (to the log file here).
    AccessLog,
    /// `[audit] file`: a JSON line per answer carrying bureau data.
    Audit,
    /// `[usage] dir`: usage statements and the durable charge journal (an fdatasync per group
    /// of calls, before they are sent).
    Usage,
}

const EVERY_FEATURE: &[Feature] =
    &[Feature::Limits, Feature::StateFile, Feature::AccessLog, Feature::Audit, Feature::Usage];

impl Feature {
    fn name(self) -> &'static str {
        match self {
            Feature::Limits => "limits and quotas",
            Feature::StateFile => "state file",
            Feature::AccessLog => "access log",
            Feature::Audit => "audit log",
            Feature::Usage => "usage + charge journal",
        }
    }

    fn apply(self, config: &str, dir: &Path) -> String {
        let d = dir.display();
        let section = |text: String| config.replacen("[[routes]]", &format!("{text}\n\n[[routes]]"), 1);
        match self {
            Feature::Limits => config.replace(
                "name = \"Bench\"\n",
                "name = \"Bench\"\nrate = 1000000\nburst = 1000000\nmax_in_flight = 1000\ndaily_quota = 1000000000\nmonthly_quota = 10000000000\n",
            ),
            Feature::StateFile => section(format!("[state]\nfile = \"{d}/state.json\"")),
            Feature::AccessLog => config.replace("access_log = false", "access_log = true"),
            Feature::Audit => section(format!("[audit]\nfile = \"{d}/audit.jsonl\"")),
            Feature::Usage => section(format!("[usage]\ndir = \"{d}/usage\"")),
        }
    }
}

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Guard => "bureau-guard".into(),
            Kind::GuardShared => "bureau-guard, workers = 0".into(),
            Kind::GuardWith(f) if f == EVERY_FEATURE => "bureau-guard, every feature".into(),
            Kind::GuardWith(f) => {
                format!("bureau-guard + {}", f.iter().map(|f| f.name()).collect::<Vec<_>>().join(" + "))
            }
            Kind::Floor => "hyper floor (no bureau-guard stage)".into(),
            Kind::Nginx => "nginx".into(),
        }
    }

    fn file_name(self, i: usize) -> String {
        match self {
            Kind::Guard => "bureau-guard".into(),
            Kind::GuardShared => "bureau-guard-shared".into(),
            _ => format!("bureau-guard-{i}"),
        }
    }
}

/// The sets of targets, run one after the other, each with its own rounds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Set {
    Bare,
    Features,
    Hit,
}

impl Set {
    fn name(self) -> &'static str {
        match self {
            Set::Bare => "bare",
            Set::Features => "features",
            Set::Hit => "hit",
        }
    }
}

/// The names `--closed-sets` accepts.
pub(super) const SETS: [&str; 4] = ["bare", "features", "hit", "memory"];

/// Idle connections and cached look-ups the memory set adds.
const MEMORY_CONNECTIONS: usize = 1000;
const MEMORY_ENTRIES: usize = 10_000;

/// The memory set: resident memory per idle kept-alive connection (each has served one request)
/// and per 10,000 cached look-ups, bureau-guard and nginx (`proxy_cache`: its entries are files,
/// so its figure is its shared memory zone plus page cache, not comparable; reported for
/// completeness).
fn memory(env: &Env<'_>, dir: &Path) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};

    let ports = free_ports::<3>()?;
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let (listen, admin, nginx_addr) = (local(ports[0]), local(ports[1]), local(ports[2]));
    let file = dir.join("bureau-guard.toml");
    let config = guard_config(listen, admin, env.mock_addr, true, None);
    fs::write(&file, config).context("writing a bureau-guard config")?;
    let mut children = Vec::new();
    let mut guard =
        ChildGuard::spawn("bureau-guard", Command::new(env.bin).arg("serve").arg("--config").arg(&file), dir)?;
    guard.wait_ready(admin, "/healthz")?;
    guard.wait_ready(listen, PROBE_PATH)?;
    let mut targets = vec![("bureau-guard", listen, guard.pid(), false)];
    children.push(guard);
    if let Some(nginx_bin) = env.nginx_bin {
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_config(dir, nginx_addr, env.mock_addr, true, None))
            .context("writing the nginx config")?;
        let child = super::spawn_nginx(nginx_bin, dir, &conf, nginx_addr)?;
        targets.push(("nginx", nginx_addr, child.pid(), true));
        children.push(child);
    }
    let ask = |stream: &mut std::net::TcpStream, path: &str| -> anyhow::Result<()> {
        stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        stream.set_nodelay(true)?;
        // One write: `write!` straight to the socket sends each piece apart (Nagle, delayed ACK).
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nx-api-key: {API_KEY}\r\n\r\n").as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).with_context(|| format!("reading the answer to GET {path}"))?;
        anyhow::ensure!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "not a 200: {:?}",
            String::from_utf8_lossy(&buf[..n.min(200)])
        );
        Ok(())
    };
    println!("\n### Memory: resident set per idle connection and per 10,000 cached look-ups\n");
    println!(
        "| target | RSS at start MiB | per idle connection KiB ({MEMORY_CONNECTIONS} kept alive) | per 10,000 cached look-ups MiB |"
    );
    println!("|---|---:|---:|---:|");
    for (name, addr, pid, children_too) in targets {
        let start = rss_kib(pid, children_too).context("reading the RSS")?;
        let mut held = Vec::with_capacity(MEMORY_CONNECTIONS);
        for _ in 0..MEMORY_CONNECTIONS {
            let mut s = std::net::TcpStream::connect(addr)?;
            ask(&mut s, HOT_PATH)?;
            held.push(s);
        }
        let with_conns = rss_kib(pid, children_too).context("reading the RSS")?;
        eprintln!("proxy_overhead: memory: {name}: {MEMORY_CONNECTIONS} idle connections held");
        let mut one = std::net::TcpStream::connect(addr)?;
        for i in 0..MEMORY_ENTRIES {
            ask(&mut one, &format!("/v1/score/M{i:08}"))?;
        }
        let with_entries = rss_kib(pid, children_too).context("reading the RSS")?;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            start as f64 / 1024.0,
            with_conns.saturating_sub(start) as f64 / MEMORY_CONNECTIONS as f64,
            with_entries.saturating_sub(with_conns) as f64 / 1024.0,
        );
        drop(held);
    }
    Ok(())
}

/// Resident set of `pid` (and, with `children`, of the processes it started), KiB.
fn rss_kib(pid: u32, children: bool) -> Option<u64> {
    let rss = |pid: &str| -> Option<(u32, u64)> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().trim_end_matches(" kB").trim().to_owned())
        };
        Some((field("PPid:")?.parse().ok()?, field("VmRSS:")?.parse().ok()?))
    };
    let (_, mut total) = rss(&pid.to_string())?;
    if children {
        for entry in fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            if let Some((ppid, kib)) = rss(name)
                && ppid == pid
            {
                total += kib;
            }
        }
    }
    Some(total)
}

struct Target {
    kind: Kind,
    addr: SocketAddr,
    pid: u32,
}

/// One wrk run against one target.
#[derive(Clone, Copy, Debug)]
struct Run {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: Option<f64>,
}

pub(super) fn run(env: &Env<'_>, dir: &Path) -> anyhow::Result<()> {
    let Some(wrk) = find_wrk() else {
        eprintln!(
            "proxy_overhead: wrk not found (apt-get install wrk, or run benches/proxy_overhead.sh); skipping --mode closed"
        );
        return Ok(());
    };
    if env.args.closed_sets.iter().any(|s| s == "memory") {
        let path = dir.join("memory");
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        memory(env, &path)?;
    }
    for set in [Set::Bare, Set::Features, Set::Hit] {
        let name = set.name();
        if !env.args.closed_sets.iter().any(|s| s == name) {
            continue;
        }
        let path = dir.join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        run_set(env, &wrk, &path, set)?;
    }
    Ok(())
}

fn run_set(env: &Env<'_>, wrk: &Path, dir: &Path, set: Set) -> anyhow::Result<()> {
    let args = env.args;
    let cached = set == Set::Hit;
    let kinds: Vec<Kind> = match set {
        Set::Bare => vec![Kind::Guard, Kind::GuardShared, Kind::GuardWith(EVERY_FEATURE), Kind::Floor, Kind::Nginx],
        Set::Features => std::iter::once(Kind::Guard)
            .chain(EVERY_FEATURE.iter().map(|f| Kind::GuardWith(std::slice::from_ref(f))))
            .chain([Kind::GuardWith(EVERY_FEATURE)])
            .collect(),
        Set::Hit => vec![Kind::Guard, Kind::Nginx],
    };
    let mut children: Vec<ChildGuard> = Vec::new();
    let mut targets = Vec::new();
    let ports = free_ports::<16>()?;
    let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
    for (i, &kind) in kinds.iter().enumerate() {
        let (listen, admin) = (local(ports[2 * i]), local(ports[2 * i + 1]));
        let (addr, pid) = if kind == Kind::Nginx {
            let Some(nginx_bin) = env.nginx_bin else { continue };
            let conf = dir.join("nginx.conf");
            fs::write(&conf, nginx_config(dir, listen, env.mock_addr, cached, None))
                .context("writing the nginx config")?;
            let child = super::spawn_nginx(nginx_bin, dir, &conf, listen)?;
            let pid = child.pid();
            children.push(child);
            (listen, pid)
        } else if kind == Kind::Floor {
            let exe = std::env::current_exe().context("finding the bench binary")?;
            let (l, u) = (listen.to_string(), env.mock_addr.to_string());
            let mut child = ChildGuard::spawn("hyper-floor", Command::new(exe).args(["--floor-proxy", &l, &u]), dir)?;
            child.wait_ready(listen, PROBE_PATH)?;
            let pid = child.pid();
            children.push(child);
            (listen, pid)
        } else {
            let mut config = guard_config(listen, admin, env.mock_addr, cached, None);
            let name = kind.file_name(i);
            match kind {
                Kind::GuardShared => config = config.replacen("[server]\n", "[server]\nworkers = 0\n", 1),
                Kind::GuardWith(features) => {
                    let own = dir.join(&name);
                    fs::create_dir_all(&own).with_context(|| format!("creating {}", own.display()))?;
                    for f in features {
                        config = f.apply(&config, &own);
                    }
                }
                _ => {}
            }
            let file = dir.join(format!("{name}.toml"));
            fs::write(&file, config).context("writing a bureau-guard config")?;
            let name: &'static str = Box::leak(name.into_boxed_str());
            let mut child =
                ChildGuard::spawn(name, Command::new(env.bin).arg("serve").arg("--config").arg(&file), dir)?;
            child.wait_ready(admin, "/healthz")?;
            child.wait_ready(listen, PROBE_PATH)?;
            let pid = child.pid();
            children.push(child);
            (listen, pid)
        };
        if cached {
            super::warm_cache(
                if kind == Kind::Nginx { super::TargetKind::Nginx } else { super::TargetKind::BureauGuard },
                addr,
            )?;
        }
        targets.push(Target { kind, addr, pid });
    }
    let path = if cached { HOT_PATH } else { "/v1/score/S-closed" };
    let secs = args.closed_secs;
    eprintln!(
        "proxy_overhead: closed loop ({}), wrk -t{THREADS} -c{CONNECTIONS}, {} rounds of {secs} s per target, order rotated",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        args.closed_rounds
    );
    // Warm-up: each target once, not reported (pools, caches, page faults).
    for t in &targets {
        wrk_run(wrk, t, path, 1)?;
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 0..args.closed_rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            runs[i].push(wrk_run(wrk, &targets[i], path, secs)?);
        }
        for child in &mut children {
            child.check_alive()?;
        }
    }
    print!("{}", render(set, &targets, &runs, args.closed_rounds, secs));
    Ok(())
}

fn wrk_run(wrk: &Path, target: &Target, path: &str, secs: u32) -> anyhow::Result<Run> {
    let url = format!("http://{}{path}", target.addr);
    let is_nginx = target.kind == Kind::Nginx;
    let before = cpu_time(target.pid, is_nginx);
    let out = Command::new(wrk)
        .args(["-t", &THREADS.to_string(), "-c", &CONNECTIONS.to_string(), "-d", &format!("{secs}s"), "--latency"])
        .args(["-H", &format!("x-api-key: {API_KEY}"), &url])
        .output()
        .context("running wrk")?;
    let after = cpu_time(target.pid, is_nginx);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk against {} failed: {}", target.kind.name(), String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx or 3xx responses") || text.contains("Socket errors") {
        bail!("wrk against {} saw errors:\n{text}", target.kind.name());
    }
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse::<u64>().ok()))
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0);
    let pct = |p: &str| text.lines().find_map(|l| l.trim().strip_prefix(p).and_then(|v| wrk_ms(v.trim())));
    let cpu_us = match (before, after) {
        (Some(b), Some(a)) if requests > 0 => Some(a.saturating_sub(b).as_secs_f64() * 1e6 / requests as f64),
        _ => None,
    };
    Ok(Run { requests, rps, p50_ms: pct("50%").unwrap_or(f64::NAN), p99_ms: pct("99%").unwrap_or(f64::NAN), cpu_us })
}

/// wrk's latency figure (`512.00us`, `1.20ms`, `2.00s`) in milliseconds.
fn wrk_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

fn render(set: Set, targets: &[Target], runs: &[Vec<Run>], rounds: usize, secs: u32) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let title = match set {
        Set::Bare => "bare proxying (every request reaches the mock)",
        Set::Features => "what each feature costs (every request reaches the mock)",
        Set::Hit => "cache hits (one hot subject)",
    };
    let _ = writeln!(out, "\n### Closed loop: {title}\n");
    let _ = writeln!(
        out,
        "wrk -t{THREADS} -c{CONNECTIONS}, {rounds} rounds of {secs} s per target, order rotated each round; medians of the rounds.\n"
    );
    // The reference: nginx, or in the features set bare bureau-guard.
    let reference = if set == Set::Features { Kind::Guard } else { Kind::Nginx };
    let vs = if set == Set::Features { "bare" } else { "nginx" };
    let _ = writeln!(
        out,
        "| target | req/s | CPU µs/req | vs {vs} CPU | vs {vs} req/s | p50 ms | p99 ms | CPU µs/req per round |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|");
    let med = |rs: &[Run], f: fn(&Run) -> Option<f64>| median(rs.iter().filter_map(f).collect());
    let nginx = targets.iter().position(|t| t.kind == reference);
    let nginx_cpu = nginx.and_then(|i| med(&runs[i], |r| r.cpu_us));
    let nginx_rps = nginx.and_then(|i| med(&runs[i], |r| Some(r.rps)));
    for (t, rs) in targets.iter().zip(runs) {
        let cpu = med(rs, |r| r.cpu_us);
        let rps = med(rs, |r| Some(r.rps));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "-".into(),
        };
        let per_round: Vec<String> = rs.iter().map(|r| r.cpu_us.map_or("-".into(), |c| format!("{c:.1}"))).collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {:.3} | {:.3} | {} |",
            t.kind.name(),
            rps.unwrap_or(0.0),
            cpu.map_or("-".into(), |c| format!("{c:.1}")),
            ratio(cpu, nginx_cpu),
            ratio(rps, nginx_rps),
            med(rs, |r| Some(r.p50_ms)).unwrap_or(f64::NAN),
            med(rs, |r| Some(r.p99_ms)).unwrap_or(f64::NAN),
            per_round.join(" / "),
        );
    }
    let total: u64 = runs.iter().flatten().map(|r| r.requests).sum();
    let _ = writeln!(out, "\n{total} requests in all, every one answered 200 (wrk reports no error).");
    out
}

fn find_wrk() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("WRK") {
        return Some(p.into());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("wrk")).find(|p| p.is_file())
}
