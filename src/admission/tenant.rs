//! Stage 1 of the request path: which institution sent this request.
//!
//! Everything after this stage (quotas, fair share, cache scope, metrics, audit) is per tenant, so
//! an unidentified request never gets further. Keys arrive as `x-api-key: KEY` or
//! `Authorization: Bearer KEY`; the config holds only their SHA-256 digests. The presented key is
//! hashed, its first 8 digest bytes pick a bucket, and the full digest is compared in constant
//! time (`subtle`), so neither the key nor how much of a digest matched leaks through timing.
//! The header that carried the key is removed here, so it can never reach the bureau.
//!
//! With mTLS (`server.tls.client_auth`), a connection's verified client certificate names the
//! institution instead: its identities are looked up in `client_cert_names` per request (the map
//! belongs to the config snapshot, so a reload applies to open connections too). A key is then
//! optional, and must not contradict the certificate:
//!
//! | certificate | api key | result |
//! |---|---|---|
//! | maps to T | none | T |
//! | maps to T | names T | T (key stripped) |
//! | maps to T | names U ≠ T | 401 `identity_mismatch` |
//! | maps to T | unknown | 401 `invalid_api_key` (a bad key is a bad key, with or without a certificate) |
//! | maps to no tenant | any | 403 `unknown_client_certificate` |
//! | none (plain, or `optional` without one) | | api key only, as above |

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admission::contract::{Contract, RouteContract, TenantGroup};
use crate::admission::verdict::Scope;
use crate::config::{GroupConfig, RouteConfig, TenantConfig};
use crate::respond::{ErrorKind, ProxyError};
use crate::state::StateRegistry;
use crate::tls::{ClientCert, IdentitySource};

/// Header carrying the api key.
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// A configured tenant, as the request path sees it.
#[derive(Debug)]
pub struct Tenant {
    /// Position in the config's `tenants`, for per-tenant tables.
    pub index: usize,
    pub id: Arc<str>,
    pub name: String,
    pub weight: u32,
    /// `x-tenant` value sent to the bureau, prepared once.
    pub header_value: HeaderValue,
    /// The tenant-wide limits and their live counters (shared with every snapshot that has
    /// this tenant and with persistence); `tenant.limits`, `tenant.rate` and `tenant.state`
    /// reach them through `Deref`.
    pub contract: Arc<Contract>,
    /// The tenant's limits per route, by route index (empty when it has none).
    routes: Box<[Option<RouteContract>]>,
    /// The group the tenant is in, if any.
    pub group: Option<Arc<TenantGroup>>,
    /// `RateLimit-Policy` response field (the tenant's and its group's limits), prepared once;
    /// `None` if there are no limits.
    pub policy_header: Option<HeaderValue>,
}

impl std::ops::Deref for Tenant {
    type Target = Contract;

    fn deref(&self) -> &Contract {
        &self.contract
    }
}

impl Tenant {
    /// The tenant's own limits on route `route` (an index into the snapshot's routes), if any.
    pub fn route_contract(&self, route: usize) -> Option<&RouteContract> {
        self.routes.get(route).and_then(Option::as_ref)
    }

    /// The group's aggregate limits, if the tenant is in a group that sets any.
    pub fn group_contract(&self) -> Option<&Arc<Contract>> {
        self.group.as_ref().and_then(|g| g.contract.as_ref())
    }

    /// The tenant's group as the fair scheduler weighs it: the group's index in the config's
    /// `groups` and its weight; `None` for a tenant in no group.
    pub fn group_slot(&self) -> Option<(usize, u32)> {
        self.group.as_ref().map(|g| (g.index, g.weight))
    }

    /// Every contract a request of route `route` is charged to, in the order they are checked:
    /// the tenant's, its route's, its group's.
    pub fn contracts(&self, route: usize) -> [Option<&Arc<Contract>>; 3] {
        [Some(&self.contract), self.route_contract(route).map(|r| &r.contract), self.group_contract()]
    }
}

/// Weights in the fair scheduler are in thousandths of a configured weight: precision for the
/// scheduler's virtual time (`bureau::scheduler`'s `VTIME_SCALE`).
pub const WEIGHT_SCALE: u32 = 1000;

/// Key digest → tenant, built once per config.
#[derive(Debug)]
pub struct TenantTable {
    tenants: Vec<Arc<Tenant>>,
    /// Every contract: the tenants' (in tenant order), then the routes' and the groups'.
    contracts: Vec<Arc<Contract>>,
    /// Keyed by the first 8 bytes of the digest, entry inline (one cache miss per look-up); the
    /// full digest is compared in constant time. Distinct keys sharing a 64-bit digest prefix
    /// (never seen in practice) go to `by_key_collisions`.
    by_key: HashMap<u64, ([u8; 32], usize), DigestPrefix>,
    by_key_collisions: Vec<([u8; 32], usize)>,
    by_id: HashMap<Arc<str>, usize>,
    /// Client certificate identity (normalized) → tenant index; names are unique (validated).
    by_cert_name: HashMap<Box<str>, usize>,
    /// The kind of certificate name `by_cert_name` holds; `None` when the config verifies no
    /// client certificates (`client_auth = "off"`, or no `[server.tls]`).
    cert_identity: Option<IdentitySource>,
}

impl TenantTable {
    /// Builds the table from validated tenants (ids and keys already known to be unique). Live
    /// state (counters, rate buckets) comes from `states`, so it carries over across reloads.
    /// `cert_identity`: the kind of client certificate name that identifies tenants, if any.
    /// `routes` and `groups` are the config's: route limits are held by route index, and each
    /// group's contract is shared by its members.
    pub fn new(
        configs: &[TenantConfig],
        routes: &[RouteConfig],
        groups: &[GroupConfig],
        cert_identity: Option<IdentitySource>,
        states: &StateRegistry,
    ) -> TenantTable {
        let mut tenants = Vec::with_capacity(configs.len());
        let mut extra = Vec::new();
        let group_of: HashMap<&str, usize> =
            groups.iter().enumerate().flat_map(|(i, g)| g.members.iter().map(move |m| (m.as_str(), i))).collect();
        let groups: Vec<Arc<TenantGroup>> = groups
            .iter()
            .enumerate()
            .map(|(index, g)| {
                let contract = g
                    .has_limits()
                    .then(|| Arc::new(Contract::extra(format!("group:{}", g.id), Scope::Group, &g.limits, states)));
                extra.extend(contract.clone());
                let queue = states.group_queue(&g.id);
                Arc::new(TenantGroup { index, queue, id: Arc::from(g.id.as_str()), weight: g.weight, contract })
            })
            .collect();
        let mut by_key: HashMap<u64, ([u8; 32], usize), DigestPrefix> = HashMap::default();
        let mut by_key_collisions = Vec::new();
        let mut by_id = HashMap::new();
        let mut by_cert_name = HashMap::new();
        for (index, c) in configs.iter().enumerate() {
            by_cert_name.extend(c.client_cert_names.iter().map(|n| (Box::from(n.as_str()), index)));
            let id: Arc<str> = Arc::from(c.id.as_str());
            for d in &c.key_digests {
                if let Some(first) = by_key.insert(bucket(d), (*d, index)) {
                    by_key_collisions.push(first);
                }
            }
            by_id.insert(id.clone(), index);
            let contract = Arc::new(Contract::tenant(&id, &c.limits, states));
            let group = group_of.get(c.id.as_str()).map(|&g| groups[g].clone());
            let group_contract = group.as_ref().and_then(|g| g.contract.as_deref());
            let mut by_route: Vec<Option<RouteContract>> = Vec::new();
            if !c.routes.is_empty() {
                by_route.resize_with(routes.len(), || None);
                for rl in &c.routes {
                    let Some(i) = routes.iter().position(|r| r.name == rl.route) else { continue };
                    let route =
                        Arc::new(Contract::extra(format!("{}/{}", c.id, rl.route), Scope::Route, &rl.limits, states));
                    extra.push(route.clone());
                    let policy_header =
                        crate::respond::ratelimit_policy(&[Some(&contract), Some(&route), group_contract]);
                    by_route[i] = Some(RouteContract { contract: route, policy_header });
                }
            }
            tenants.push(Arc::new(Tenant {
                index,
                header_value: HeaderValue::from_str(&c.id).expect("validated ids are header-safe"),
                id,
                name: c.name.clone(),
                weight: c.weight,
                policy_header: crate::respond::ratelimit_policy(&[Some(&contract), group_contract]),
                contract,
                routes: by_route.into_boxed_slice(),
                group,
            }));
        }
        let contracts = tenants.iter().map(|t| t.contract.clone()).chain(extra).collect();
        TenantTable { tenants, contracts, by_key, by_key_collisions, by_id, by_cert_name, cert_identity }
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.tenants.iter()
    }

    /// Every contract of this config: the tenants' first (in tenant order), then the routes'
    /// and the groups' (background work: Redis renewals, give-backs, the admin view).
    pub fn contracts(&self) -> &[Arc<Contract>] {
        &self.contracts
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.by_id.get(id).map(|&i| &self.tenants[i])
    }

    /// The tenant whose key this is, comparing digests in constant time.
    pub fn by_key(&self, key: &[u8]) -> Option<&Arc<Tenant>> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let (d, index) = self.by_key.get(&bucket(&digest))?;
        if bool::from(d.ct_eq(&digest)) {
            return Some(&self.tenants[*index]);
        }
        // Same 64-bit prefix, different key: only possible with a collision list.
        let mut found = None;
        for (d, index) in &self.by_key_collisions {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(*index);
            }
        }
        found.map(|i| &self.tenants[i])
    }

    /// The tenant a client certificate names: the one tenant its identities map to.
    fn by_cert(&self, names: &[Box<str>]) -> Result<&Arc<Tenant>, ProxyError> {
        let mut found: Option<usize> = None;
        for name in names {
            match (self.by_cert_name.get(name), found) {
                (Some(&i), Some(f)) if i != f => {
                    tracing::debug!(?names, "client certificate names several tenants");
                    return Err(ProxyError::new(
                        ErrorKind::UnknownClientCertificate,
                        "the client certificate's identities name more than one tenant",
                    ));
                }
                (Some(&i), _) => found = Some(i),
                (None, _) => {}
            }
        }
        match found {
            Some(i) => Ok(&self.tenants[i]),
            None => {
                // A certificate name is an institution's name, not personal data; still debug only.
                tracing::debug!(?names, "client certificate maps to no tenant");
                Err(ProxyError::new(
                    ErrorKind::UnknownClientCertificate,
                    "the client certificate is trusted but no tenant is configured for it (client_cert_names)",
                ))
            }
        }
    }

    /// Identifies the tenant of a request on a connection with a verified client certificate
    /// (see the module doc's table); an api key, if any, is checked against it and removed.
    /// When the config no longer verifies client certificates (a reload turned `client_auth`
    /// off; the connection is being closed), the certificate is ignored and the key decides.
    pub fn identify_with_cert(&self, cert: &ClientCert, headers: &mut HeaderMap) -> Result<&Arc<Tenant>, ProxyError> {
        let Some(source) = self.cert_identity else { return self.identify(headers) };
        let tenant = self.by_cert(cert.names(source));
        let Some(key) = take_key(headers) else { return tenant };
        let tenant = tenant?;
        match self.by_key(key.as_bytes()) {
            Some(t) if Arc::ptr_eq(t, tenant) => Ok(tenant),
            Some(_) => Err(ProxyError::new(
                ErrorKind::IdentityMismatch,
                "the api key and the client certificate belong to different tenants",
            )),
            None => Err(ProxyError::new(ErrorKind::InvalidApiKey, "the api key is not known")),
        }
    }

    /// Identifies the tenant of a request and removes the header that carried its key.
    pub fn identify(&self, headers: &mut HeaderMap) -> Result<&Arc<Tenant>, ProxyError> {
        let Some(key) = take_key(headers) else {
            return Err(ProxyError::new(
                ErrorKind::MissingApiKey,
                "send your api key as `x-api-key: KEY` or `Authorization: Bearer KEY`",
            ));
        };
        self.by_key(key.as_bytes()).ok_or_else(|| ProxyError::new(ErrorKind::InvalidApiKey, "the api key is not known"))
    }
}

/// The presented key, if any, with every header that may carry one removed.
fn take_key(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let (header, key) = presented_key(headers)?;
    headers.remove(header);
    // A client may send the key both ways: neither copy may reach the bureau.
    headers.remove(&X_API_KEY);
    if headers
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes().get(..7).is_some_and(|s| s.eq_ignore_ascii_case(b"bearer ")))
    {
        headers.remove(AUTHORIZATION);
    }
    Some(key)
}

/// The bucket key is already 8 bytes of a SHA-256 digest, uniformly distributed: hashing it again
/// (SipHash) would only cost time. Keys are chosen by the operator, not by the request, so
/// there is no flooding risk to defend against here.
#[derive(Debug, Default, Clone, Copy)]
struct DigestPrefix;

impl std::hash::BuildHasher for DigestPrefix {
    type Hasher = PrefixHasher;
    fn build_hasher(&self) -> PrefixHasher {
        PrefixHasher(0)
    }
}

#[derive(Debug)]
struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in for completeness.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn bucket(digest: &[u8; 32]) -> u64 {
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The key and the header it came in: `x-api-key` first, else a Bearer `authorization`.
fn presented_key(headers: &HeaderMap) -> Option<(&'static HeaderName, HeaderValue)> {
    if let Some(v) = headers.get(&X_API_KEY) {
        return Some((&X_API_KEY, v.clone()));
    }
    let auth = headers.get(AUTHORIZATION)?.as_bytes();
    let scheme = auth.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = auth[7..].trim_ascii();
    if token.is_empty() {
        return None;
    }
    Some((&AUTHORIZATION, HeaderValue::from_bytes(token).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantLimits;

    fn table() -> TenantTable {
        let t = |id: &str, keys: &[&str]| TenantConfig {
            client_cert_names: vec![format!("{id}.example")],
            id: id.into(),
            name: id.into(),
            key_digests: keys.iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect(),
            weight: 1,
            routes: Vec::new(),
            limits: TenantLimits {
                rate: None,
                burst: 1,
                max_in_flight: None,
                daily_quota: None,
                monthly_quota: None,
                max_queue: 0,
                dry_run: Default::default(),
            },
        };
        TenantTable::new(
            &[t("a", &["key-a", "key-a2"]), t("b", &["key-b"])],
            &[],
            &[],
            Some(IdentitySource::SanDns),
            &StateRegistry::default(),
        )
    }

    #[test]
    fn identifies_by_either_header_and_strips_it() {
        let t = table();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-a2"));
        assert_eq!(&*t.identify(&mut h).unwrap().id, "a");
        assert!(h.get("x-api-key").is_none());

        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  key-b "));
        assert_eq!(&*t.identify(&mut h).unwrap().id, "b");
        assert!(h.get(AUTHORIZATION).is_none());

        // Both headers at once: both are removed.
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-a"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer key-a"));
        assert_eq!(&*t.identify(&mut h).unwrap().id, "a");
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn missing_and_unknown_keys_are_distinct_errors() {
        let t = table();
        let mut h = HeaderMap::new();
        assert_eq!(t.identify(&mut h).unwrap_err().kind, ErrorKind::MissingApiKey);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        assert_eq!(t.identify(&mut h).unwrap_err().kind, ErrorKind::MissingApiKey);
        h.insert("x-api-key", HeaderValue::from_static("key-c"));
        assert_eq!(t.identify(&mut h).unwrap_err().kind, ErrorKind::InvalidApiKey);
        assert!(h.get("x-api-key").is_none(), "an unknown key is not forwarded either");
    }

    fn cert(names: &[&str]) -> ClientCert {
        ClientCert::with_names(names)
    }

    #[test]
    fn a_certificate_identifies_and_a_key_must_agree() {
        let t = table();
        let a = cert(&["a.example"]);
        assert_eq!(&*t.identify_with_cert(&a, &mut HeaderMap::new()).unwrap().id, "a");

        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-a"));
        assert_eq!(&*t.identify_with_cert(&a, &mut h).unwrap().id, "a");
        assert!(h.is_empty(), "the agreeing key is still stripped");

        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer key-b"));
        assert_eq!(t.identify_with_cert(&a, &mut h).unwrap_err().kind, ErrorKind::IdentityMismatch);
        assert!(h.is_empty());

        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-zzz"));
        assert_eq!(t.identify_with_cert(&a, &mut h).unwrap_err().kind, ErrorKind::InvalidApiKey);

        for unmapped in [cert(&["c.example"]), cert(&[]), cert(&["a.example", "b.example"])] {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", HeaderValue::from_static("key-a"));
            let err = t.identify_with_cert(&unmapped, &mut h).unwrap_err();
            assert_eq!(err.kind, ErrorKind::UnknownClientCertificate, "{unmapped:?}");
            assert!(h.is_empty(), "the key is removed even when refused");
        }
        // Extra names that map nowhere do not matter.
        assert_eq!(&*t.identify_with_cert(&cert(&["x.example", "b.example"]), &mut HeaderMap::new()).unwrap().id, "b");
    }

    #[test]
    fn without_client_verification_in_the_config_a_certificate_is_ignored_and_the_key_decides() {
        let mut t = table();
        t.cert_identity = None;
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-b"));
        assert_eq!(&*t.identify_with_cert(&cert(&["a.example"]), &mut h).unwrap().id, "b");
        let err = t.identify_with_cert(&cert(&["a.example"]), &mut HeaderMap::new()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::MissingApiKey);
    }
}
