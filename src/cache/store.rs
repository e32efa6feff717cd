//! Stage: answer repeated look-ups from memory instead of the bureau.
//!
//! During a surge many look-ups repeat (the same applicant checked by several steps of one loan
//! flow, client retries, batch re-runs); each one answered here is bureau capacity left for
//! everybody else. But a cached credit report is personal data that must reach only those allowed
//! to see it, must not outlive what the bureau allows, and must not crowd out the process's memory.
//! So:
//!
//! - entries are found by [`CacheKey`] only, and a key already carries the tenant (or the
//!   explicit shared scope), see `key.rs`: a tenant can only ever hit its own entries;
//! - a route opts in with `cache_ttl`; the bureau's `Cache-Control` can only shorten it
//!   (`max-age`/`s-maxage`) or forbid storing (`no-store`, `no-cache`, `private`); responses that
//!   vary by request headers (`Vary`) or set cookies are not stored either, and only the route's
//!   `cache_statuses` (default 200) are;
//! - the cache ([`moka`]) is bounded in bytes (`cache.max_bytes`, weighed as body + headers + a
//!   fixed overhead), and a body over `cache.max_entry_bytes` is not stored at all;
//! - an entry stays usable as *stale* for the route's `stale_if_error` after it expires: the
//!   proxy serves it, marked, only when the bureau fails or the request would be shed;
//! - the operator can purge all, one tenant's, or one route's entries (the bureau corrected a
//!   record); a purge also voids answers still in flight, so it cannot be undone by a bureau call
//!   that started before it.
//!
//! Freshness is judged with `tokio::time::Instant`, so tests move time with a paused clock; moka
//! drops each entry on its own once its stale window has passed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AGE, CACHE_CONTROL, HeaderName, HeaderValue, SET_COOKIE, VARY, WARNING};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use moka::notification::RemovalCause;
use tokio::time::Instant;

use crate::bureau::headers::{X_REQUEST_ID, X_TENANT};
use crate::cache::key::CacheKey;
use crate::config::RouteCache;
use crate::ops::metrics::CacheMetrics;
use crate::respond::{Blame, Body, ErrorKind};

/// `x-cache: HIT | MISS | COALESCED | STALE` on responses of routes that cache or coalesce.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Weight of an entry besides its body and headers: the entry, its key, the answer's header map
/// and body allocations, moka's node and queues, and the allocator's rounding and per-thread
/// arenas. Measured, not guessed (tests/cache_memory.rs, release build, 2 worker threads,
/// 16 MiB filled six times over with distinct entries): 980 bytes per entry more than the body
/// and header bytes for 60-byte scores, about 1,000 for 1.5 KB reports. With 256 here the
/// process grew by 2.5x `max_bytes` for scores; with 1,280 it stays within it.
pub const ENTRY_OVERHEAD: u32 = 1280;

/// Per header field, as HTTP/2 counts a field's size (RFC 7541 §4.1): name + value + 32.
const HEADER_OVERHEAD: usize = 32;

/// What the `x-cache` header says about a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh entry.
    Hit,
    /// Fetched from the bureau for this request.
    Miss,
    /// Received from an identical bureau call another request started.
    Coalesced,
    /// Served from an expired entry because the bureau failed or was out of capacity.
    Stale,
}

impl CacheStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Stale => "STALE",
        }
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// A route's caching rules, compiled from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    /// How long an answer is fresh, at most (the bureau may say less).
    pub ttl: Duration,
    /// How long after expiry an entry may still be served when the bureau fails.
    pub stale_if_error: Duration,
    /// Statuses worth storing.
    pub statuses: Vec<StatusCode>,
}

impl RoutePolicy {
    /// The policy of a route, or `None` if the route does not cache (`cache_ttl` unset).
    pub fn from_config(cfg: &RouteCache) -> Option<RoutePolicy> {
        Some(RoutePolicy {
            ttl: cfg.cache_ttl?,
            stale_if_error: cfg.stale_if_error,
            statuses: cfg.cache_statuses.clone(),
        })
    }
}

/// A bureau answer, buffered: what the cache stores and coalesced requests share.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    /// The bureau's headers, hop-by-hop fields already removed by `bureau/upstream.rs`, and the
    /// fields that name one request (`x-request-id`, `x-tenant`) removed here: replayed to
    /// another request they would be wrong, and to another tenant a leak.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the bureau's answer arrived: `Age` and freshness count from here.
    pub received_at: Instant,
    /// The tenant whose request fetched it (set by the proxy), for shared-route fan-out checks.
    pub fetched_for: Option<std::sync::Arc<str>>,
    /// The request id of the bureau call that fetched it (set by the proxy): the audit records
    /// of the hits and coalesced answers it gave name it (`rode_on`).
    pub fetched_by: Option<http::HeaderValue>,
}

impl Fetched {
    /// A bureau answer received now.
    pub fn new(status: StatusCode, mut headers: HeaderMap, body: Bytes) -> Fetched {
        headers.remove(&X_REQUEST_ID);
        headers.remove(&X_TENANT);
        Fetched { status, headers, body, received_at: Instant::now(), fetched_for: None, fetched_by: None }
    }

    /// A copy that owns exactly its bytes, for the cache. hyper hands out the body and the header
    /// values as slices of the bureau connection's read buffer (8 KiB and more), so an entry that
    /// kept them would pin that whole buffer: the cache's byte bound would count a few hundred
    /// bytes and hold kilobytes (measured: 8.3 KiB per small look-up, see benches/README.md).
    pub fn compact(&self) -> Fetched {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            let mut copy = HeaderValue::from_bytes(value.as_bytes()).expect("a valid header value stays valid");
            copy.set_sensitive(value.is_sensitive());
            headers.append(name.clone(), copy);
        }
        Fetched {
            status: self.status,
            headers,
            body: Bytes::copy_from_slice(&self.body),
            received_at: self.received_at,
            fetched_for: self.fetched_for.clone(),
            fetched_by: self.fetched_by.clone(),
        }
    }

    /// A buffered response from `bureau/upstream.rs` (its body is already in memory), received now.
    pub async fn from_response(resp: Response<Body>) -> Fetched {
        let (head, body) = resp.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        Fetched::new(head.status, head.headers, body)
    }

    /// The answer as a response (the body is shared, not copied), with `x-cache: status`.
    pub fn response(&self, status: CacheStatus) -> Response<Body> {
        let mut resp = Response::new(Full::new(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp.headers_mut().insert(&X_CACHE, status.header_value());
        resp
    }

    /// Whether the bureau marked this answer as meant for its requester alone (`Cache-Control:
    /// private`, or a cookie): it must not be handed to another tenant, even on a shared route.
    pub fn private_to_requester(&self) -> bool {
        self.headers.contains_key(SET_COOKIE) || CacheControl::parse(&self.headers).private
    }

    /// Age the bureau (or a cache in front of it) already gave the answer, in seconds.
    fn upstream_age(&self) -> u64 {
        self.headers.get(AGE).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

/// A stored answer with its freshness and attribution.
#[derive(Debug)]
pub struct Entry {
    pub response: Arc<Fetched>,
    /// Served as fresh before this instant.
    pub fresh_until: Instant,
    /// Served as stale (bureau failing) before this instant; equal to `fresh_until` without
    /// `stale_if_error`.
    pub stale_until: Instant,
    /// The tenant whose request fetched the answer (purges, attribution).
    pub tenant: Arc<str>,
    pub route: Arc<str>,
    /// Age the answer had when it arrived (the bureau's `Age` header).
    initial_age: u64,
    /// Time left to `stale_until` when stored: moka drops the entry after it.
    live_for: Duration,
    /// Weight in `cache.max_bytes` units.
    weight: u32,
}

impl Entry {
    /// `Age` in seconds at `now` (RFC 9111 §4.2.3: the age it arrived with plus the time here).
    pub fn age(&self, now: Instant) -> u64 {
        self.initial_age + now.saturating_duration_since(self.response.received_at).as_secs()
    }

    /// The entry as a response at `now`: `x-cache`, `Age`, and for stale entries a `Warning`.
    pub fn response(&self, now: Instant, status: CacheStatus) -> Response<Body> {
        let mut resp = self.response.response(status);
        resp.headers_mut().insert(AGE, HeaderValue::from(self.age(now)));
        if status == CacheStatus::Stale {
            // RFC 7234 §5.5.1; obsolete in RFC 9111 but still what clients and people recognise.
            resp.headers_mut().insert(WARNING, HeaderValue::from_static("110 - \"Response is Stale\""));
        }
        resp
    }
}

/// Whether a request that failed with `kind` may be answered from a stale entry instead
/// (`stale_if_error`): the bureau failed or was too slow, or its capacity was spoken for (the
/// request was shed), or the request ran out of time. Never for the client's or the tenant's own
/// faults (a bad request, a quota), which a stale answer would hide.
pub fn stale_may_answer(kind: ErrorKind) -> bool {
    matches!(kind.blame(), Blame::Bureau | Blame::Capacity) || kind == ErrorKind::RequestTimeout
}

/// Whether a bureau answer with `status` is a failure a stale entry may stand in for (5xx,
/// as RFC 5861 counts errors).
pub fn stale_may_replace(status: StatusCode) -> bool {
    status.is_server_error()
}

/// What a look-up found.
#[derive(Debug)]
pub enum Lookup {
    /// A fresh entry: answer with it (`x-cache: HIT`).
    Fresh(Arc<Entry>),
    /// An expired entry within its stale window: go to the bureau, and serve this one only if
    /// the bureau fails, times out or the request would be shed.
    Stale(Arc<Entry>),
    Miss,
}

/// Why an answer was not stored; `as_str` is the `cache_stores_total` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The status is not in the route's `cache_statuses`.
    Status,
    /// `Cache-Control: no-store` or `no-cache` (we cannot revalidate, so no-cache means no).
    NoStore,
    /// `Cache-Control: private`: meant for one user, and this is a cache many requests share.
    Private,
    /// `Vary`: the answer depends on request headers the key does not contain.
    Vary,
    /// `Set-Cookie`: a per-client state that must not be replayed.
    SetCookie,
    /// Body over `cache.max_entry_bytes`.
    TooLarge,
    /// `max-age=0` or an `Age` already past it: expired on arrival.
    Expired,
    /// A purge happened while the answer was being fetched: it may predate a correction.
    Purged,
}

impl Skip {
    pub const fn as_str(self) -> &'static str {
        match self {
            Skip::Status => "status",
            Skip::NoStore => "no_store",
            Skip::Private => "private",
            Skip::Vary => "vary",
            Skip::SetCookie => "set_cookie",
            Skip::TooLarge => "too_large",
            Skip::Expired => "expired",
            Skip::Purged => "purged",
        }
    }
}

/// What the cache did with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Stored,
    Skipped(Skip),
}

impl Admission {
    pub const fn as_str(self) -> &'static str {
        match self {
            Admission::Stored => "stored",
            Admission::Skipped(skip) => skip.as_str(),
        }
    }
}

/// Which entries a purge removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge<'a> {
    All,
    /// Entries fetched for this tenant id (shared-scope entries it fetched included).
    Tenant(&'a str),
    /// Entries of this route name.
    Route(&'a str),
}

impl Purge<'_> {
    fn matches(&self, e: &Entry) -> bool {
        match self {
            Purge::All => true,
            Purge::Tenant(t) => &*e.tenant == *t,
            Purge::Route(r) => &*e.route == *r,
        }
    }
}

/// Taken before a bureau call whose answer may be stored: a purge in between voids it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// The response cache: one per process, shared by every snapshot.
pub struct Cache {
    inner: moka::future::Cache<CacheKey, Arc<Entry>>,
    max_entry_bytes: u64,
    /// Bumped by every purge; see [`Ticket`].
    epoch: AtomicU64,
    metrics: CacheMetrics,
}

/// moka's per-entry expiry: drop an entry once its stale window is over.
struct StaleWindow;

impl moka::Expiry<CacheKey, Arc<Entry>> for StaleWindow {
    fn expire_after_create(&self, _: &CacheKey, e: &Arc<Entry>, _: std::time::Instant) -> Option<Duration> {
        Some(e.live_for)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        e: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        // A replacement is a new answer with its own lifetime, not the old one's remainder.
        Some(e.live_for)
    }
}

impl Cache {
    /// A cache of at most `max_bytes` (weighed), storing bodies up to `max_entry_bytes`.
    pub fn new(max_bytes: u64, max_entry_bytes: u64, metrics: CacheMetrics) -> Cache {
        let m = metrics.clone();
        let inner = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &CacheKey, e: &Arc<Entry>| e.weight)
            .expire_after(StaleWindow)
            .eviction_listener(move |_, _, cause| match cause {
                RemovalCause::Size => m.evicted_size.inc(),
                RemovalCause::Expired => m.evicted_expired.inc(),
                RemovalCause::Explicit => m.evicted_purged.inc(),
                RemovalCause::Replaced => m.evicted_replaced.inc(),
            })
            .build();
        Cache { inner, max_entry_bytes, epoch: AtomicU64::new(0), metrics }
    }

    /// Looks `key` up at the current time.
    pub async fn lookup(&self, key: &CacheKey) -> Lookup {
        let now = Instant::now();
        match self.inner.get(key).await {
            Some(e) if now < e.fresh_until => {
                self.metrics.hits.inc();
                Lookup::Fresh(e)
            }
            Some(e) if now < e.stale_until => {
                self.metrics.stale.inc();
                Lookup::Stale(e)
            }
            _ => {
                self.metrics.misses.inc();
                Lookup::Miss
            }
        }
    }

    /// Take one before the bureau call whose answer will be offered to [`Cache::store`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.epoch.load(Ordering::SeqCst))
    }

    /// Stores `response` under `key` if the route's `policy`, the bureau's `Cache-Control` and
    /// the size limit allow it, attributed to `tenant` and `route`. `ticket` was taken before
    /// the bureau call.
    pub async fn store(
        &self,
        ticket: Ticket,
        key: CacheKey,
        response: &Arc<Fetched>,
        policy: &RoutePolicy,
        tenant: &Arc<str>,
        route: &Arc<str>,
    ) -> Admission {
        let admission = self.try_store(ticket, key, response, policy, tenant, route).await;
        self.metrics.stores.with_label_values(&[admission.as_str()]).inc();
        admission
    }

    async fn try_store(
        &self,
        ticket: Ticket,
        key: CacheKey,
        response: &Arc<Fetched>,
        policy: &RoutePolicy,
        tenant: &Arc<str>,
        route: &Arc<str>,
    ) -> Admission {
        if !policy.statuses.contains(&response.status) {
            return Admission::Skipped(Skip::Status);
        }
        if response.body.len() as u64 > self.max_entry_bytes {
            return Admission::Skipped(Skip::TooLarge);
        }
        let h = &response.headers;
        if h.contains_key(VARY) {
            return Admission::Skipped(Skip::Vary);
        }
        if h.contains_key(SET_COOKIE) {
            return Admission::Skipped(Skip::SetCookie);
        }
        let cc = CacheControl::parse(h);
        if cc.no_store {
            return Admission::Skipped(Skip::NoStore);
        }
        if cc.private {
            return Admission::Skipped(Skip::Private);
        }
        let initial_age = response.upstream_age();
        let mut ttl = policy.ttl;
        // We are a shared cache: s-maxage overrides max-age (RFC 9111 §5.2.2.10).
        if let Some(lifetime) = cc.s_maxage.or(cc.max_age) {
            ttl = ttl.min(Duration::from_secs(lifetime.saturating_sub(initial_age)));
        }
        if ttl.is_zero() {
            return Admission::Skipped(Skip::Expired);
        }
        let fresh_until = response.received_at + ttl;
        let stale_until = fresh_until + policy.stale_if_error;
        let live_for = stale_until.saturating_duration_since(Instant::now());
        if live_for.is_zero() {
            return Admission::Skipped(Skip::Expired);
        }
        if self.epoch.load(Ordering::SeqCst) != ticket.0 {
            return Admission::Skipped(Skip::Purged);
        }
        let entry = Entry {
            weight: weight(response, tenant, route),
            response: Arc::new(response.compact()),
            fresh_until,
            stale_until,
            tenant: tenant.clone(),
            route: route.clone(),
            initial_age,
            live_for,
        };
        self.inner.insert(key, Arc::new(entry)).await;
        // A purge may have started between the check above and the insert, and missed this
        // entry: it bumped the epoch first, so one of the two always sees the other.
        if self.epoch.load(Ordering::SeqCst) != ticket.0 {
            self.inner.invalidate(&key).await;
            return Admission::Skipped(Skip::Purged);
        }
        Admission::Stored
    }

    /// Removes the entries `what` names and voids answers being fetched; returns how many
    /// entries were removed.
    pub async fn purge(&self, what: Purge<'_>) -> u64 {
        // First the epoch: answers in flight from now on cannot be stored with an older ticket.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let keys: Vec<Arc<CacheKey>> = self.inner.iter().filter(|(_, e)| what.matches(e)).map(|(k, _)| k).collect();
        let mut removed = 0;
        for key in keys {
            if self.inner.remove(&*key).await.is_some() {
                removed += 1;
            }
        }
        removed
    }

    /// Entries in the cache (approximate: moka counts lazily).
    pub fn entries(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Weighted size in bytes (approximate: moka counts lazily).
    pub fn weighted_bytes(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Sets the size gauges; call before each metrics scrape.
    pub fn update_gauges(&self) {
        self.metrics.entries.set(self.entries() as i64);
        self.metrics.bytes.set(self.weighted_bytes() as i64);
    }

    /// Runs moka's pending maintenance (evictions, counts) now. Tests, and before a scrape.
    pub async fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks().await;
    }
}

/// An entry's weight: body, headers, attribution and a fixed overhead.
fn weight(response: &Fetched, tenant: &str, route: &str) -> u32 {
    let headers: usize = response.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD).sum();
    let total = response.body.len() + headers + tenant.len() + route.len();
    u32::try_from(total).unwrap_or(u32::MAX).saturating_add(ENTRY_OVERHEAD)
}

/// The directives of `Cache-Control` that decide whether and how long to store.
#[derive(Debug, Default, PartialEq, Eq)]
struct CacheControl {
    no_store: bool,
    private: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
}

impl CacheControl {
    /// Reads every `Cache-Control` field. Doubtful input errs towards not storing: an unreadable
    /// field or a `max-age` that is not a number counts as `no-store` / zero (RFC 9111 §4.2.1).
    fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                cc.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" | "no-cache" => cc.no_store = true,
                    "private" => cc.private = true,
                    // Several values: the smallest, to be safe.
                    "max-age" => cc.max_age = Some(cc.max_age.map_or(seconds(), |m| m.min(seconds()))),
                    "s-maxage" => cc.s_maxage = Some(cc.s_maxage.map_or(seconds(), |m| m.min(seconds()))),
                    _ => {}
                }
            }
        }
        cc
    }
}

#[cfg(test)]
mod tests;
