//! Reload: change quotas, tenants and routes in the middle of a surge without a restart.
//!
//! The new config is read and validated in full before anything changes; a rejected config
//! changes nothing and says why. An accepted one is compiled into a new snapshot and swapped in
//! with one atomic store: requests in flight finish under the snapshot they started with, the
//! next request sees the new one. Live state carries over because it belongs to tenant ids, not
//! to a config (quota counters, rate buckets, in-flight counts; the bureau budget's slots).
//! Settings fixed when the process bound its sockets (listen addresses, hyper's connection
//! limits, log format, the state file) are reported as needing a restart, never silently dropped.
//! A reload also reopens the audit log (log rotation, see `cache/audit.rs`).

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{AdminAuth, Config, ConfigError, Problem, RouteConfig, TenantConfig};
use crate::runtime::{Shared, Snapshot, adaptive_controller};
use crate::tls::{FileStamp, ServerTls, UpstreamTls};

/// One difference between two configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// TOML path, e.g. `tenants[bank-a].rate` (tenants and routes by id/name, not position).
    pub path: String,
    /// What changed, e.g. `50 → 80`, `added`, `removed`.
    pub what: String,
    /// The running process keeps the old value until it is restarted.
    pub needs_restart: bool,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}{}", self.path, self.what, if self.needs_restart { " (needs a restart)" } else { "" })
    }
}

/// The result of a reload attempt, as printed by `bureau-guard reload` and returned by
/// `POST /admin/reload`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// `applied` or `rejected`.
    pub result: &'static str,
    pub changes: Vec<Change>,
    /// Every problem of a rejected config, `path: message`.
    pub problems: Vec<String>,
}

impl ReloadReport {
    pub fn applied(&self) -> bool {
        self.result == "applied"
    }

    fn rejected(problems: &[Problem]) -> ReloadReport {
        ReloadReport {
            result: "rejected",
            changes: Vec::new(),
            problems: problems.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Re-reads the config file the proxy was started with and applies it (see the module doc).
///
/// Every attempt, accepted or not, also reopens the audit log's path: `logrotate`'s
/// `postrotate` sends SIGHUP, and a typo in the config must not keep records going to the
/// rotated file. The file is read under the reload lock: of two reloads at once, the one that
/// read the file last applies last, so the running config is the file's latest contents, never
/// an older read that lost the race to the lock.
pub fn reload_from_file(shared: &Shared) -> ReloadReport {
    reload_with(shared, Config::load)
}

/// [`reload_from_file`] with the file read by `read` (tests pause between read and apply).
fn reload_with(shared: &Shared, read: impl FnOnce(&std::path::Path) -> Result<Config, ConfigError>) -> ReloadReport {
    if let Some(audit) = &shared.audit {
        audit.reopen();
    }
    let Some(path) = shared.config_path.as_deref() else {
        return ReloadReport {
            result: "rejected",
            changes: Vec::new(),
            problems: vec!["this proxy was started without a config file; nothing to re-read".to_string()],
        };
    };
    let one_at_a_time = shared.reload_lock.lock().expect("reload lock not poisoned");
    match read(path) {
        Ok(config) => apply_locked(shared, config, one_at_a_time),
        Err(e) => {
            let out = ReloadReport::rejected(&e.problems);
            record(shared, &out);
            out
        }
    }
}

/// Applies a validated config: compile, swap, resize the bureau budget. Serialized, so two
/// reloads never interleave.
pub fn apply(shared: &Shared, config: Config) -> ReloadReport {
    let one_at_a_time = shared.reload_lock.lock().expect("reload lock not poisoned");
    apply_locked(shared, config, one_at_a_time)
}

/// [`apply`] under the reload lock, which the caller took (and which is held until the end).
fn apply_locked(shared: &Shared, config: Config, _one_at_a_time: std::sync::MutexGuard<'_, ()>) -> ReloadReport {
    let old = shared.snapshot.load_full();
    let changes = diff(&old.config, &config);
    let new_config = Arc::new(config);
    let mut snapshot = Snapshot::compile(new_config.clone(), &shared.states, Some(&old), &shared.random_secret);

    // The bureau budget: a new adaptive controller if its settings changed, else the new fixed limit.
    let u_old = &old.config.upstream;
    let u_new = &new_config.upstream;
    if u_old.adaptive != u_new.adaptive || u_old.max_concurrency != u_new.max_concurrency {
        let controller = adaptive_controller(&new_config);
        shared.adaptive.store(controller.clone());
        shared.scheduler.set_controller(controller.clone());
        if controller.is_none() {
            shared.scheduler.set_limit(u_new.max_concurrency);
        }
    }
    shared.scheduler.set_max_waiting(u_new.max_queue_total);
    // Requests queued in a level the new config removes move to their tenant's default level.
    let mut defaults: Vec<Option<usize>> = Vec::new();
    for t in snapshot.tenants.iter() {
        let slot = t.state.index;
        if slot >= defaults.len() {
            defaults.resize(slot + 1, None);
        }
        defaults[slot] = new_config.priority.tenants.get(t.index).map(|p| p.default);
    }
    // Each level keeps its scheduler slot by name, so waiters and permits stay in their level.
    snapshot.level_slots =
        crate::runtime::set_levels(&shared.scheduler, &new_config, &|t| defaults.get(t).copied().flatten());
    shared.metrics.set_certificate_expiry(&new_config, shared.tls_listener.is_some(), false);
    crate::ops::series::declare(&shared.metrics, &new_config, Some(&old.config));
    for w in new_config.warnings() {
        tracing::warn!(warning = %w, "config warning");
    }
    shared.snapshot.store(Arc::new(snapshot));
    // After the snapshot, so a bank that reconnects is served under the new config: a new
    // certificate serves the next handshake while open connections keep theirs; new client
    // verification (CA, CRL, client_auth) also closes the open connections whose clients no
    // longer pass it (`Listener::reload`). A listener started without TLS stays plain (and one
    // with TLS keeps its last certificates) until a restart: the diff says so.
    if let (Some(listener), Some(tls)) = (&shared.tls_listener, &new_config.server.tls) {
        crate::tls::Listener::reload(listener, tls);
    }
    if let Some(redis) = &shared.redis {
        // A limit that was raised applies at once, not after a refusal Redis gave under the old one.
        redis.forget_denials(&shared.snapshot.load().tenants);
    }
    let out = ReloadReport { result: "applied", changes, problems: Vec::new() };
    record(shared, &out);
    out
}

fn record(shared: &Shared, out: &ReloadReport) {
    let m = &shared.metrics;
    m.reloads_total.with_label_values(&[out.result]).inc();
    if out.applied() {
        m.reload_last_success_timestamp_seconds.set(shared.clock.now_unix_ms() / 1000);
        let restart = out.changes.iter().filter(|c| c.needs_restart).count();
        tracing::info!(changes = out.changes.len(), needs_restart = restart, "config reloaded");
        for c in &out.changes {
            tracing::info!(change = %c, "config change");
        }
    } else {
        tracing::warn!(problems = out.problems.len(), "config reload rejected; the running config is unchanged");
        for p in &out.problems {
            tracing::warn!(problem = %p, "config problem");
        }
    }
}

/// What `new` changes relative to `old`.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut out = Vec::new();
    let mut field = |path: &str, a: String, b: String, needs_restart: bool| {
        if a != b {
            out.push(Change { path: path.to_string(), what: format!("{a} → {b}"), needs_restart });
        }
    };
    let (s0, s1) = (&old.server, &new.server);
    field("server.listen", s0.listen.to_string(), s1.listen.to_string(), true);
    field("server.max_header_bytes", s0.max_header_bytes.to_string(), s1.max_header_bytes.to_string(), true);
    field("server.header_read_timeout", dur(s0.header_read_timeout), dur(s1.header_read_timeout), true);
    field("server.max_body", s0.max_body.to_string(), s1.max_body.to_string(), false);
    field("server.request_timeout", dur(s0.request_timeout), dur(s1.request_timeout), false);
    field("server.drain_timeout", dur(s0.drain_timeout), dur(s1.drain_timeout), true);
    field("server.pass_unmatched", s0.pass_unmatched.to_string(), s1.pass_unmatched.to_string(), false);
    field("server.readiness_grace", dur(s0.readiness_grace), dur(s1.readiness_grace), true);
    // The listener's connection handling is fixed when it starts.
    field("server.idle_timeout", dur(s0.idle_timeout), dur(s1.idle_timeout), true);
    let ka = |s: &crate::config::ServerConfig| {
        format!("{}/{}", dur(s.http2_keep_alive_interval), dur(s.http2_keep_alive_timeout))
    };
    field("server.http2_keep_alive", ka(s0), ka(s1), true);
    let opt = |n: Option<usize>| n.map_or_else(|| "default".to_string(), |n| n.to_string());
    field("server.max_connections", opt(s0.max_connections), opt(s1.max_connections), true);
    field(
        "server.max_connections_per_source",
        opt(s0.max_connections_per_source),
        opt(s1.max_connections_per_source),
        true,
    );
    field("server.auth_failure_*", format!("{:?}", s0.auth_penalty), format!("{:?}", s1.auth_penalty), true);
    field("server.proxy_protocol", s0.proxy_protocol.to_string(), s1.proxy_protocol.to_string(), true);
    let trusted = |s: &crate::config::ServerConfig| {
        let blocks: Vec<String> = s.trusted_proxies.blocks.iter().map(ToString::to_string).collect();
        format!("[{}] forwarded_for={}", blocks.join(", "), s.trusted_proxies.forwarded_for)
    };
    field("server.trusted_proxies", trusted(s0), trusted(s1), true);
    field("server.workers", s0.workers.to_string(), s1.workers.to_string(), true);
    field("admin.listen", old.admin.listen.to_string(), new.admin.listen.to_string(), true);
    match (&old.admin.auth, &new.admin.auth) {
        (AdminAuth::Token(a), AdminAuth::Token(b)) if a != b => {
            field("admin.token", "(old)".into(), "(new)".into(), false);
        }
        (a, b) => {
            let show = |x: &AdminAuth| match x {
                AdminAuth::Token(_) => "required".to_string(),
                AdminAuth::InsecureNoToken => "none (insecure_no_token)".to_string(),
            };
            field("admin.token", show(a), show(b), false);
        }
    }
    field(
        "admin.allowed_hosts",
        format!("{:?}", old.admin.allowed_hosts),
        format!("{:?}", new.admin.allowed_hosts),
        false,
    );
    field(
        "admin.zero_series_max_tenants",
        old.admin.zero_series_max_tenants.to_string(),
        new.admin.zero_series_max_tenants.to_string(),
        false,
    );
    let (u0, u1) = (&old.upstream, &new.upstream);
    field("upstream.url", u0.url.to_string(), u1.url.to_string(), false);
    field("upstream.connect_timeout", dur(u0.connect_timeout), dur(u1.connect_timeout), false);
    field("upstream.response_timeout", dur(u0.response_timeout), dur(u1.response_timeout), false);
    field("upstream.pool_max_idle", u0.pool_max_idle.to_string(), u1.pool_max_idle.to_string(), false);
    field("upstream.pool_idle_timeout", dur(u0.pool_idle_timeout), dur(u1.pool_idle_timeout), false);
    field("upstream.max_response_body", u0.max_response_body.to_string(), u1.max_response_body.to_string(), false);
    field("upstream.max_concurrency", u0.max_concurrency.to_string(), u1.max_concurrency.to_string(), false);
    field("upstream.queue_timeout", dur(u0.queue_timeout), dur(u1.queue_timeout), false);
    field("upstream.max_queue_total", u0.max_queue_total.to_string(), u1.max_queue_total.to_string(), false);
    field("upstream.adaptive", format!("{:?}", u0.adaptive), format!("{:?}", u1.adaptive), false);
    field("upstream.max_call_time", dur(u0.max_call_time), dur(u1.max_call_time), false);
    field("upstream.retry_after_cap", dur(u0.retry_after_cap), dur(u1.retry_after_cap), false);
    field("upstream.breaker.failures", u0.breaker.failures.to_string(), u1.breaker.failures.to_string(), false);
    field("upstream.breaker.open_for", dur(u0.breaker.open_for), dur(u1.breaker.open_for), false);
    field("upstream.breaker.probes", u0.breaker.probes.to_string(), u1.breaker.probes.to_string(), false);
    field("quota.utc_offset", old.quota.utc_offset.to_string(), new.quota.utc_offset.to_string(), false);
    field("state.file", format!("{:?}", old.state.file), format!("{:?}", new.state.file), true);
    field("state.flush_interval", dur(old.state.flush_interval), dur(new.state.flush_interval), true);
    // The Redis connection, replica id and leases are set up at start-up. Compared as values:
    // the text hides the URL's password, and a new password (in `url`, or a new value of
    // `url_env`'s variable) needs a restart as much as a new host.
    let (b0, b1) = (backend(&old.state.backend), backend(&new.state.backend));
    if b0 == b1 && old.state.backend != new.state.backend {
        field("state.redis.url", "(old credentials, not shown)".into(), "(new, not shown)".into(), true);
    }
    field("state.backend", b0, b1, true);
    field("log.format", format!("{:?}", old.log.format), format!("{:?}", new.log.format), true);
    field("log.access_log", old.log.access_log.to_string(), new.log.access_log.to_string(), false);
    // The cache and the audit writer are built once per process (their entries and queue
    // outlive snapshots); the key secret is read per snapshot (a new one only makes the old
    // entries unreachable until they expire).
    field("cache.max_bytes", old.cache.max_bytes.to_string(), new.cache.max_bytes.to_string(), true);
    field("cache.max_entry_bytes", old.cache.max_entry_bytes.to_string(), new.cache.max_entry_bytes.to_string(), true);
    if old.cache.key_secret != new.cache.key_secret {
        field("cache.key_secret", "(old)".into(), "(new)".into(), false);
    }
    field("audit.file", format!("{:?}", old.audit.file), format!("{:?}", new.audit.file), true);
    field("audit.fail_closed", old.audit.fail_closed.to_string(), new.audit.fail_closed.to_string(), true);
    // The usage store is opened once per process, as the audit writer is.
    field("usage.dir", format!("{:?}", old.usage.dir), format!("{:?}", new.usage.dir), true);
    // In days, as it is written (humantime would say "1year 1month 4days 7h 26m 24s").
    let days = |u: &crate::config::UsageConfig| format!("{}d", u.retention_days());
    field("usage.retention", days(&old.usage), days(&new.usage), true);
    field("usage.flush_interval", dur(old.usage.flush_interval), dur(new.usage.flush_interval), true);

    diff_server_tls(&mut out, old.server.tls.as_ref(), new.server.tls.as_ref());
    diff_upstream_tls(&mut out, old.upstream.tls.as_ref(), new.upstream.tls.as_ref());
    diff_priority(&mut out, old, new);
    diff_named(&mut out, "routes", &old.routes, &new.routes, |r| &r.name, route_fields);
    diff_named(&mut out, "tenants", &old.tenants, &new.tenants, |t| &t.id, tenant_fields);
    for o in &old.tenants {
        if let Some(n) = new.tenants.iter().find(|n| n.id == o.id) {
            let section = format!("tenants[{}].routes", o.id);
            diff_named(&mut out, &section, &o.routes, &n.routes, |r| &r.route, |r| limit_fields(&r.limits));
        }
    }
    diff_named(&mut out, "groups", &old.groups, &new.groups, |g| &g.id, group_fields);
    for o in &old.tenants {
        if let Some(n) = new.tenants.iter().find(|n| n.id == o.id)
            && let Some(what) = keys_change(&o.key_digests, &n.key_digests)
        {
            out.push(Change { path: format!("tenants[{}].api_key", o.id), what, needs_restart: false });
        }
    }
    out
}

/// `[[priority]]` levels, and the level each route and tenant names (by name, as the file
/// says them). All apply live: requests already queued in a level that is removed move to their
/// tenant's default level.
fn diff_priority(out: &mut Vec<Change>, old: &Config, new: &Config) {
    let levels = |c: &Config| {
        let list: Vec<String> = c
            .priority
            .levels
            .iter()
            .map(|l| {
                let borrow = l.spec.borrow.map_or_else(|| "any".to_string(), |b| b.to_string());
                format!("{} (share {}, lendable {}, borrow {borrow})", l.name, l.spec.share, l.spec.lendable)
            })
            .collect();
        if list.is_empty() { "none".to_string() } else { list.join(", ") }
    };
    let (a, b) = (levels(old), levels(new));
    if a != b {
        out.push(Change { path: "priority".into(), what: format!("{a} → {b}"), needs_restart: false });
    }
    let name = |c: &Config, slot: Option<usize>| {
        slot.and_then(|s| c.priority.levels.get(s)).map_or_else(|| "default".to_string(), |l| l.name.clone())
    };
    for (i, r) in new.routes.iter().enumerate() {
        if let Some(j) = old.routes.iter().position(|o| o.name == r.name) {
            let (x, y) = (name(old, old.priority.routes[j]), name(new, new.priority.routes[i]));
            if x != y {
                out.push(Change {
                    path: format!("routes[{}].priority", r.name),
                    what: format!("{x} → {y}"),
                    needs_restart: false,
                });
            }
        }
    }
    let tenant = |c: &Config, i: usize| {
        let t = c.priority.tenants[i];
        let allowed: Vec<String> = (0..8).filter(|&s| t.allows(s)).map(|s| name(c, Some(s))).collect();
        format!("{} (may name {})", name(c, Some(t.default)), allowed.join(", "))
    };
    for (i, t) in new.tenants.iter().enumerate() {
        if let Some(j) = old.tenants.iter().position(|o| o.id == t.id) {
            let (x, y) = (tenant(old, j), tenant(new, i));
            if x != y {
                out.push(Change {
                    path: format!("tenants[{}].priority", t.id),
                    what: format!("{x} → {y}"),
                    needs_restart: false,
                });
            }
        }
    }
}

/// A TLS file in a diff: its path and a keyed fingerprint of its contents (never the contents,
/// nor a plain digest of them: see [`FileStamp::short`]).
fn file(f: Option<&FileStamp>) -> String {
    f.map_or_else(|| "none".to_string(), |f| format!("{f:?}"))
}

fn files(list: &[FileStamp]) -> String {
    format!("[{}]", list.iter().map(|f| file(Some(f))).collect::<Vec<_>>().join(", "))
}

/// `[server.tls]`: turning it on or off needs a restart (the listener is bound plain or TLS);
/// a new certificate and key serve the next handshake; new client verification (client_auth,
/// client_ca, crl) closes the open connections gracefully so banks are verified again; the
/// identity kind applies to the next request.
fn diff_server_tls(out: &mut Vec<Change>, old: Option<&ServerTls>, new: Option<&ServerTls>) {
    let (a, b) = match (old, new) {
        (None, None) => return,
        (Some(_), None) | (None, Some(_)) => {
            let on = |t: Option<&ServerTls>| if t.is_some() { "on" } else { "off" }.to_string();
            out.push(Change {
                path: "server.tls".into(),
                what: format!("{} → {}", on(old), on(new)),
                needs_restart: true,
            });
            return;
        }
        (Some(a), Some(b)) => (a, b),
    };
    let mut field = |path: &str, x: String, y: String| {
        if x != y {
            out.push(Change { path: path.to_string(), what: format!("{x} → {y}"), needs_restart: false });
        }
    };
    field("server.tls.cert", file(Some(&a.cert)), file(Some(&b.cert)));
    field("server.tls.key", file(Some(&a.key)), file(Some(&b.key)));
    field("server.tls.client_auth", a.client_auth.as_str().into(), b.client_auth.as_str().into());
    field("server.tls.client_ca", file(a.client_ca.as_ref()), file(b.client_ca.as_ref()));
    field("server.tls.crl", files(&a.crls), files(&b.crls));
    field("server.tls.client_identity", a.identity.as_str().into(), b.identity.as_str().into());
}

/// `[upstream.tls]`: any change builds a new bureau client (new connections, new files).
fn diff_upstream_tls(out: &mut Vec<Change>, old: Option<&UpstreamTls>, new: Option<&UpstreamTls>) {
    let part = |t: Option<&UpstreamTls>, f: fn(&UpstreamTls) -> Option<&FileStamp>| match t {
        None => "none (http)".to_string(),
        Some(t) => f(t).map_or_else(|| "none".to_string(), |s| file(Some(s))),
    };
    for (path, f) in [
        ("upstream.tls.ca", (|t| t.ca.as_ref()) as fn(&UpstreamTls) -> Option<&FileStamp>),
        ("upstream.tls.client_cert", |t| t.client_cert.as_ref()),
        ("upstream.tls.client_key", |t| t.client_key.as_ref()),
    ] {
        let (x, y) = (part(old, f), part(new, f));
        if x != y {
            out.push(Change { path: path.to_string(), what: format!("{x} → {y}"), needs_restart: false });
        }
    }
}

fn dur(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn route_fields(r: &RouteConfig) -> Vec<(&'static str, String)> {
    let c = &r.cache;
    let list = |v: Vec<String>| format!("[{}]", v.join(", "));
    vec![
        ("method", r.method.to_string()),
        ("path", r.path.clone()),
        ("cost", r.cost.to_string()),
        ("coalesce", c.coalesce.to_string()),
        ("cache_ttl", c.cache_ttl.map_or_else(|| "none".to_string(), dur)),
        ("cache_key", list(c.cache_key.iter().map(ToString::to_string).collect())),
        ("scope", c.scope.as_str().to_string()),
        ("stale_if_error", dur(c.stale_if_error)),
        ("cache_statuses", list(c.cache_statuses.iter().map(|s| s.as_u16().to_string()).collect())),
    ]
}

/// The limits a route or group contract shares with a tenant's (`max_queue` aside).
fn limit_fields(l: &crate::config::TenantLimits) -> Vec<(&'static str, String)> {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "none".to_string());
    vec![
        ("rate", opt(l.rate.map(|r| r.to_string()))),
        ("burst", l.burst.to_string()),
        ("max_in_flight", opt(l.max_in_flight.map(|n| n.to_string()))),
        ("daily_quota", opt(l.daily_quota.map(|n| n.to_string()))),
        ("monthly_quota", opt(l.monthly_quota.map(|n| n.to_string()))),
        ("dry_run", format!("{:?}", l.dry_run)),
    ]
}

fn group_fields(g: &crate::config::GroupConfig) -> Vec<(&'static str, String)> {
    let mut fields = vec![("members", format!("[{}]", g.members.join(", "))), ("weight", g.weight.to_string())];
    fields.extend(limit_fields(&g.limits));
    fields
}

fn tenant_fields(t: &TenantConfig) -> Vec<(&'static str, String)> {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "none".to_string());
    let l = &t.limits;
    vec![
        ("name", t.name.clone()),
        ("weight", t.weight.to_string()),
        ("rate", opt(l.rate.map(|r| r.to_string()))),
        ("burst", l.burst.to_string()),
        ("max_in_flight", opt(l.max_in_flight.map(|n| n.to_string()))),
        ("daily_quota", opt(l.daily_quota.map(|n| n.to_string()))),
        ("monthly_quota", opt(l.monthly_quota.map(|n| n.to_string()))),
        ("max_queue", l.max_queue.to_string()),
        ("dry_run", format!("{:?}", l.dry_run)),
        ("client_cert_names", format!("{:?}", t.client_cert_names)),
    ]
}

/// A tenant's api keys that changed, by their place in the config (`[1] changed, [2] added`;
/// a lone key: `changed`). Nothing derived from a key is shown: a digest, or any part of one,
/// would let whoever reads the reload output test guessed keys offline.
fn keys_change(old: &[[u8; 32]], new: &[[u8; 32]]) -> Option<String> {
    if old == new {
        return None;
    }
    if old.len() == 1 && new.len() == 1 {
        return Some("changed".to_string());
    }
    let what: Vec<String> = (0..old.len().max(new.len()))
        .filter_map(|i| match (old.get(i), new.get(i)) {
            (Some(a), Some(b)) if a != b => Some(format!("[{i}] changed")),
            (Some(_), None) => Some(format!("[{i}] removed")),
            (None, Some(_)) => Some(format!("[{i}] added")),
            _ => None,
        })
        .collect();
    Some(what.join(", "))
}

fn diff_named<T>(
    out: &mut Vec<Change>,
    section: &str,
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &String,
    fields: impl Fn(&T) -> Vec<(&'static str, String)>,
) {
    for o in old {
        match new.iter().find(|n| name(n) == name(o)) {
            None => out.push(Change {
                path: format!("{section}[{}]", name(o)),
                what: "removed".into(),
                needs_restart: false,
            }),
            Some(n) => {
                for ((f, a), (_, b)) in fields(o).into_iter().zip(fields(n)) {
                    if a != b {
                        let what = format!("{a} → {b}");
                        out.push(Change { path: format!("{section}[{}].{f}", name(o)), what, needs_restart: false });
                    }
                }
            }
        }
    }
    for n in new {
        if !old.iter().any(|o| name(o) == name(n)) {
            out.push(Change { path: format!("{section}[{}]", name(n)), what: "added".into(), needs_restart: false });
        }
    }
}

/// `state.backend` and its settings as the diff shows them (the URL without its password).
fn backend(b: &crate::config::StateBackend) -> String {
    match b {
        crate::config::StateBackend::Local => "local".to_string(),
        crate::config::StateBackend::Redis(r) => format!("{r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_tenant: &str, rate: &str) -> Config {
        let text = format!(
            r#"
[upstream]
url = "http://127.0.0.1:8081"
[[routes]]
name = "score"
method = "GET"
path = "/v1/score/{{subject_id}}"
[[tenants]]
id = "a"
api_key_sha256 = "{}"
{rate}
{extra_tenant}
[admin]
insecure_no_token = true
"#,
            "ab".repeat(32)
        );
        Config::from_toml(&text, &|_| None).unwrap()
    }

    #[test]
    fn diff_names_tenants_and_fields_and_flags_restarts() {
        let old = config("", "rate = 50");
        let mut new =
            config(&format!("[[tenants]]\nid = \"b\"\napi_key_sha256 = \"{}\"", "cd".repeat(32)), "rate = 80");
        new.server.listen = "127.0.0.1:1".parse().unwrap();
        let changes: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert!(
            changes.contains(&"server.listen: 127.0.0.1:8080 → 127.0.0.1:1 (needs a restart)".to_string()),
            "{changes:?}"
        );
        assert!(changes.contains(&"tenants[a].rate: 50 → 80".to_string()), "{changes:?}");
        assert!(changes.contains(&"tenants[b]: added".to_string()), "{changes:?}");
        assert!(
            changes.iter().any(|c| c.starts_with("tenants[a].burst: 50 → 80")),
            "burst follows the rate by default"
        );
        assert!(diff(&new, &old).iter().any(|c| c.to_string() == "tenants[b]: removed"));
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn diff_shows_cache_settings_and_which_need_a_restart() {
        let old = config("", "");
        let mut new = old.clone();
        new.routes[0].cache.coalesce = true;
        new.routes[0].cache.cache_ttl = Some(std::time::Duration::from_secs(60));
        new.routes[0].cache.cache_key = vec![crate::cache::key::KeyPart::parse("path.subject_id").unwrap()];
        new.cache.max_bytes = 1 << 20;
        new.cache.key_secret = Some(crate::cache::key::KeySecret::from_bytes([9; 32]));
        new.audit.file = Some("audit.jsonl".into());
        let changes: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        for want in [
            "routes[score].coalesce: false → true",
            "routes[score].cache_ttl: none → 1m",
            "routes[score].cache_key: [] → [path.subject_id]",
            "cache.max_bytes: 268435456 → 1048576 (needs a restart)",
            "cache.key_secret: (old) → (new)",
            "audit.file: None → Some(\"audit.jsonl\") (needs a restart)",
        ] {
            assert!(changes.contains(&want.to_string()), "missing {want:?} in {changes:#?}");
        }
        assert_eq!(changes.len(), 6, "{changes:#?}");
    }

    #[test]
    fn diff_shows_usage_settings_needing_a_restart_and_the_series_cap_not() {
        let old = config("", "");
        let mut new = old.clone();
        new.usage.dir = Some("usage".into());
        new.usage.retention = std::time::Duration::from_secs(30 * 86_400);
        new.admin.zero_series_max_tenants = 10;
        let changes: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            [
                "admin.zero_series_max_tenants: 1000 → 10",
                "usage.dir: None → Some(\"usage\") (needs a restart)",
                "usage.retention: 400d → 30d (needs a restart)",
            ],
            "{changes:#?}"
        );
    }

    #[test]
    fn turning_listener_tls_on_needs_a_restart_and_file_changes_do_not() {
        let dir = crate::tls::test_certs::files("reload-diff", 90);
        let tls = |key: &str| {
            let text = format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                dir.join("leaf.pem").display(),
                dir.join(key).display()
            );
            let mut c = config("", "");
            c.server.tls = Config::from_toml(&format!("{text}{}", toml_of_minimal()), &|_| None).unwrap().server.tls;
            c
        };
        let plain = config("", "");
        let on = tls("leaf.key");
        let changes: Vec<String> = diff(&plain, &on).iter().map(ToString::to_string).collect();
        assert_eq!(changes, ["server.tls: off → on (needs a restart)"]);
        // Same path, new contents (a rotated key): shown by a keyed fingerprint, never by
        // content nor by a digest one could check a guessed key file against.
        let mut rotated = on.clone();
        let t = rotated.server.tls.as_mut().unwrap();
        t.key.sha256 = [7; 32];
        let changes: Vec<String> = diff(&on, &rotated).iter().map(ToString::to_string).collect();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[0].starts_with("server.tls.key: ") && changes[0].contains("(contents "), "{changes:?}");
        assert!(!changes[0].contains("070707"), "{changes:?}");
        assert!(!changes[0].contains("restart"));
    }

    #[test]
    fn a_new_redis_password_needs_a_restart_and_is_never_shown() {
        let with_url = |url: &str| {
            let text = format!("[state]\nbackend = \"redis\"\n[state.redis]\nurl = \"{url}\"\n{}", toml_of_minimal());
            Config::from_toml(&text, &|_| None).unwrap()
        };
        let old = with_url("redis://app:old-Secret-1@redis.internal:6379/0");
        let new = with_url("redis://app:new-Secret-2@redis.internal:6379/0");
        let changes: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(changes, ["state.redis.url: (old credentials, not shown) → (new, not shown) (needs a restart)"]);
        let moved = with_url("redis://app:new-Secret-2@redis2.internal:6379/0");
        let changes: Vec<String> = diff(&old, &moved).iter().map(ToString::to_string).collect();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(changes[0].starts_with("state.backend: ") && changes[0].ends_with("(needs a restart)"));
        assert!(!changes[0].contains("Secret"), "{changes:?}");
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn reload_output_names_changed_keys_by_place_and_shows_nothing_derived_from_them() {
        use sha2::{Digest, Sha256};
        let key_file = crate::tls::test_certs::files("reload-keys", 90).join("leaf.key");
        let key_digest: [u8; 32] = Sha256::digest(std::fs::read(&key_file).unwrap()).into();
        let with_key = |path: &std::path::Path| {
            let cert = path.with_file_name("leaf.pem");
            let text = format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n{}",
                cert.display(),
                path.display(),
                toml_of_minimal()
            );
            Config::from_toml(&text, &|_| None).unwrap()
        };
        let old = with_key(&key_file);
        let copy = key_file.with_file_name("leaf-copy.key");
        std::fs::copy(&key_file, &copy).unwrap();
        let mut new = with_key(&copy);
        // A guessable api key, rotated, and a second one added.
        let guess: [u8; 32] = Sha256::digest(b"bank-a-2024").into();
        new.tenants[0].key_digests = vec![guess];
        let changes: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert!(changes.contains(&"tenants[a].api_key: changed".to_string()), "{changes:?}");
        new.tenants[0].key_digests.push([1; 32]);
        let more: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert!(more.contains(&"tenants[a].api_key: [0] changed, [1] added".to_string()), "{more:?}");
        let all = format!("{changes:?}{more:?}");
        for digest in [key_digest, guess, old.tenants[0].key_digests[0]] {
            for n in [4, 6, 8] {
                let prefix = hex::encode(&digest[..n]);
                assert!(!all.contains(&prefix), "{prefix} (a digest prefix) in {all}");
            }
        }
        assert!(all.contains("server.tls.key: "), "the key file moved: {all}");
    }

    #[test]
    fn two_reloads_at_once_apply_the_files_latest_contents_last() {
        use std::sync::mpsc;
        let dir = std::env::temp_dir().join(format!("bureau-guard-reload-order-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bureau-guard.toml");
        let write = |rate: u32| {
            std::fs::write(&path, toml_of_minimal().replace("id = \"a\"", &format!("id = \"a\"\nrate = {rate}")))
                .unwrap()
        };
        write(1);
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
        let shared = crate::runtime::Shared::build(Config::load(&path).unwrap(), clock, Some(path.clone())).unwrap();
        let (read_tx, read_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let shared = &shared;
        std::thread::scope(|s| {
            // A reads rate = 2, then is held between its read and its apply...
            write(2);
            let first = s.spawn(move || {
                reload_with(shared, |p| {
                    // The read happens under the reload lock: no other reload can apply meanwhile.
                    assert!(shared.reload_lock.try_lock().is_err(), "the file is read without the reload lock");
                    let c = Config::load(p);
                    read_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    c
                })
            });
            read_rx.recv().unwrap();
            // ...while the operator writes rate = 3 and reloads again.
            write(3);
            let second = s.spawn(|| reload_from_file(shared));
            go_tx.send(()).unwrap();
            assert!(first.join().unwrap().applied());
            assert!(second.join().unwrap().applied());
        });
        let rate = shared.snapshot.load().config.tenants[0].limits.rate;
        assert_eq!(rate, Some(3.0), "the file's latest contents are what runs");
    }

    fn toml_of_minimal() -> String {
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:8081\"\n[[routes]]\nname = \"score\"\nmethod = \"GET\"\npath = \"/s\"\n\
             [[tenants]]\nid = \"a\"\napi_key_sha256 = \"{}\"\n[admin]\ninsecure_no_token = true\n",
            "ab".repeat(32)
        )
    }
}
