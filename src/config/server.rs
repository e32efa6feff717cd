//! `[server]` and `[server.tls]`: the proxy's listener, its limits and deadlines, who may speak
//! for a client's address, and the TLS it terminates.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{Problems, config_path, defaults};
use crate::tls::{ClientAuth, IdentitySource, ServerTls};

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body: u64,
    pub max_header_bytes: u64,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    /// Forward requests that match no route instead of answering 404.
    pub pass_unmatched: bool,
    /// On shutdown, `/readyz` answers 503 this long before the listener stops accepting, so load
    /// balancers stop sending new connections first. Zero: stop at once.
    pub readiness_grace: Duration,
    /// `[server.tls]`: terminate TLS (and optionally verify client certificates); `None`: plain
    /// HTTP (h2c by prior knowledge).
    pub tls: Option<crate::tls::ServerTls>,
    /// A connection with no request in flight this long is closed gracefully.
    pub idle_timeout: Duration,
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
    /// Connections open at once; `None`: derived from the descriptor limit at start
    /// (`server::nofile`).
    pub max_connections: Option<usize>,
    /// Connections from one client address; `None`: a quarter of `max_connections`.
    pub max_connections_per_source: Option<usize>,
    pub auth_penalty: crate::server::auth_failures::AuthPenalty,
    /// Connections from these may start with a PROXY header (required with `proxy_protocol`),
    /// and with `forwarded_for` their `X-Forwarded-For` is believed.
    pub trusted_proxies: crate::server::TrustedProxies,
    /// `server.proxy_protocol`: connections from `trusted_proxies` start with a PROXY header.
    pub proxy_protocol: bool,
    /// `server.workers`: how connections are served (see [`Workers`]).
    pub workers: Workers,
}

/// How the proxy's connections are spread over threads (`server.workers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One thread per CPU available to the process (the default).
    PerCpu,
    /// This many threads, each with its own single-threaded runtime, listening socket
    /// (`SO_REUSEPORT`) and bureau connection pool: a connection's request, its bureau call and
    /// its answer stay on one thread.
    Threads(usize),
    /// `0`: one work-stealing runtime shared by every connection (tasks move between threads).
    Shared,
}

impl Workers {
    /// Most threads `server.workers` may ask for.
    pub const MAX: usize = 1024;

    /// The number of worker threads; 0 for the shared runtime.
    pub fn threads(self) -> usize {
        match self {
            Workers::PerCpu => std::thread::available_parallelism().map_or(1, |n| n.get()).min(Workers::MAX),
            Workers::Threads(n) => n,
            Workers::Shared => 0,
        }
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::PerCpu => write!(f, "one per CPU ({})", self.threads()),
            Workers::Threads(n) => write!(f, "{n}"),
            Workers::Shared => f.write_str("0 (shared runtime)"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<String>,
    max_body: Option<String>,
    max_header_bytes: Option<String>,
    header_read_timeout: Option<String>,
    request_timeout: Option<String>,
    drain_timeout: Option<String>,
    pass_unmatched: Option<bool>,
    readiness_grace: Option<String>,
    pub(super) tls: Option<RawServerTls>,
    idle_timeout: Option<String>,
    http2_keep_alive_interval: Option<String>,
    http2_keep_alive_timeout: Option<String>,
    max_connections: Option<i64>,
    max_connections_per_source: Option<i64>,
    auth_failure_limit: Option<i64>,
    auth_failure_window: Option<String>,
    auth_failure_penalty: Option<String>,
    proxy_protocol: Option<bool>,
    trusted_proxies: Option<Vec<String>>,
    forwarded_for: Option<bool>,
    workers: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServerTls {
    cert: Option<String>,
    key: Option<String>,
    client_auth: Option<String>,
    client_ca: Option<String>,
    crl: Option<Vec<String>>,
    client_identity: Option<String>,
}

/// `[server]` but its `tls`, which is read with the other TLS files once the rest is known.
pub(super) fn validate(p: &mut Problems, s: &RawServer) -> ServerConfig {
    let max_header_bytes = p.size("server.max_header_bytes", s.max_header_bytes.as_deref(), defaults::MAX_HEADER_BYTES);
    if max_header_bytes < 1024 {
        p.add("server.max_header_bytes", "must be at least 1KiB");
    }
    let server = ServerConfig {
        listen: p.addr("server.listen", s.listen.as_deref(), defaults::LISTEN),
        max_body: p.size("server.max_body", s.max_body.as_deref(), defaults::MAX_BODY),
        max_header_bytes,
        header_read_timeout: p.duration(
            "server.header_read_timeout",
            s.header_read_timeout.as_deref(),
            defaults::HEADER_READ_TIMEOUT,
        ),
        request_timeout: p.duration("server.request_timeout", s.request_timeout.as_deref(), defaults::REQUEST_TIMEOUT),
        drain_timeout: p.duration("server.drain_timeout", s.drain_timeout.as_deref(), defaults::DRAIN_TIMEOUT),
        pass_unmatched: s.pass_unmatched.unwrap_or(false),
        readiness_grace: p.duration_or_zero("server.readiness_grace", s.readiness_grace.as_deref(), Duration::ZERO),
        tls: None,
        idle_timeout: p.duration("server.idle_timeout", s.idle_timeout.as_deref(), defaults::IDLE_TIMEOUT),
        http2_keep_alive_interval: p.duration(
            "server.http2_keep_alive_interval",
            s.http2_keep_alive_interval.as_deref(),
            defaults::HTTP2_KEEP_ALIVE_INTERVAL,
        ),
        http2_keep_alive_timeout: p.duration(
            "server.http2_keep_alive_timeout",
            s.http2_keep_alive_timeout.as_deref(),
            defaults::HTTP2_KEEP_ALIVE_TIMEOUT,
        ),
        max_connections: positive(p, "server.max_connections", s.max_connections),
        max_connections_per_source: positive(p, "server.max_connections_per_source", s.max_connections_per_source),
        auth_penalty: crate::server::auth_failures::AuthPenalty {
            limit: match s.auth_failure_limit {
                None => defaults::AUTH_FAILURE_LIMIT,
                Some(n) => u32::try_from(n).unwrap_or_else(|_| {
                    p.add("server.auth_failure_limit", "must be 0 (off) to 4294967295");
                    defaults::AUTH_FAILURE_LIMIT
                }),
            },
            window: p.duration(
                "server.auth_failure_window",
                s.auth_failure_window.as_deref(),
                defaults::AUTH_FAILURE_WINDOW,
            ),
            penalty: p.duration(
                "server.auth_failure_penalty",
                s.auth_failure_penalty.as_deref(),
                defaults::AUTH_FAILURE_PENALTY,
            ),
        },
        trusted_proxies: crate::server::TrustedProxies {
            blocks: s
                .trusted_proxies
                .iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, c)| {
                    crate::server::client_addr::Cidr::parse(c)
                        .map_err(|e| p.add(format!("server.trusted_proxies[{i}]"), e))
                        .ok()
                })
                .collect(),
            forwarded_for: s.forwarded_for.unwrap_or(false),
        },
        proxy_protocol: s.proxy_protocol.unwrap_or(false),
        workers: match s.workers {
            None => Workers::PerCpu,
            Some(0) => Workers::Shared,
            Some(n) => match usize::try_from(n) {
                Ok(n) if n <= Workers::MAX => Workers::Threads(n),
                _ => {
                    p.add(
                        "server.workers",
                        format!(
                            "must be 0 (one shared runtime) to {} threads (leave it out for one per CPU)",
                            Workers::MAX
                        ),
                    );
                    Workers::PerCpu
                }
            },
        },
    };
    if s.trusted_proxies.as_ref().is_none_or(|t| t.is_empty()) {
        if server.proxy_protocol {
            p.add(
                "server.proxy_protocol",
                "needs server.trusted_proxies: the load balancers allowed to send the header",
            );
        }
        if server.trusted_proxies.forwarded_for {
            p.add(
                "server.forwarded_for",
                "needs server.trusted_proxies: the proxies whose X-Forwarded-For is believed",
            );
        }
    }
    if server.http2_keep_alive_timeout >= server.http2_keep_alive_interval {
        p.add("server.http2_keep_alive_timeout", "must be shorter than server.http2_keep_alive_interval");
    }
    server
}

/// An optional count that must be at least 1.
fn positive(p: &mut Problems, path: &str, raw: Option<i64>) -> Option<usize> {
    let n = raw?;
    match usize::try_from(n) {
        Ok(n) if n > 0 => Some(n),
        _ => {
            p.add(path, "must be at least 1 (leave it out for the default)");
            None
        }
    }
}

/// `[server.tls]`: settings parsed, then every file read, checked and built into a rustls config.
pub(super) fn validate_tls(p: &mut Problems, t: &RawServerTls, now: i64) -> Option<ServerTls> {
    let before = p.0.len();
    let cert = config_path(p, "server.tls.cert", t.cert.as_deref(), "required: the PEM certificate chain, leaf first");
    let key = config_path(p, "server.tls.key", t.key.as_deref(), "required: the PEM private key of the certificate");
    let client_auth = match t.client_auth.as_deref() {
        None => ClientAuth::Off,
        Some(s) => ClientAuth::parse(s).unwrap_or_else(|| {
            p.add(
                "server.tls.client_auth",
                format!("unknown value {s:?}; expected \"off\", \"optional\" or \"required\""),
            );
            ClientAuth::Off
        }),
    };
    let identity = match t.client_identity.as_deref() {
        None => IdentitySource::SanDns,
        Some(s) => IdentitySource::parse(s).unwrap_or_else(|| {
            p.add(
                "server.tls.client_identity",
                format!("unknown value {s:?}; expected \"san_dns\", \"san_uri\" or \"cn\""),
            );
            IdentitySource::SanDns
        }),
    };
    let mtls = client_auth != ClientAuth::Off;
    let client_ca = match (&t.client_ca, mtls) {
        (None, true) => {
            p.add(
                "server.tls.client_ca",
                "required with client_auth: the PEM bundle of CAs that issue banks' certificates",
            );
            None
        }
        (Some(_), false) => {
            p.add("server.tls.client_ca", "only meaningful with client_auth = \"optional\" or \"required\"");
            None
        }
        (Some(s), true) => config_path(p, "server.tls.client_ca", Some(s), ""),
        (None, false) => None,
    };
    let mut crl = Vec::new();
    if let Some(list) = &t.crl {
        if !mtls {
            p.add("server.tls.crl", "only meaningful with client_auth = \"optional\" or \"required\"");
        }
        for (i, s) in list.iter().enumerate() {
            crl.extend(config_path(p, &format!("server.tls.crl[{i}]"), Some(s), ""));
        }
    }
    if t.client_identity.is_some() && !mtls {
        p.add("server.tls.client_identity", "only meaningful with client_auth = \"optional\" or \"required\"");
    }
    if p.0.len() != before {
        return None;
    }
    let settings = crate::tls::ServerTlsSettings { cert: cert?, key: key?, client_auth, client_ca, crl, identity };
    match crate::tls::load_server(&settings, now) {
        Ok(tls) => Some(tls),
        Err(problems) => {
            for fp in problems {
                p.add(format!("server.tls.{}", fp.key), fp.message);
            }
            None
        }
    }
}
