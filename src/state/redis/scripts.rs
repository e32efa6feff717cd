//! The Lua scripts the shared state runs in Redis, one `.lua` file each beside this one (so they
//! read, diff and lint as Lua), hashed once at start-up.

use redis::Script;

/// GCRA for a batch: grants up to `want` tokens of `t` µs each within burst tolerance `tau`,
/// and none unless at least `need` (what the waiting request still lacks): fewer would sit
/// unused in the pool while the request is refused. Returns {granted, retry_after_us (until
/// `need` are there), tokens left}.
pub(super) const RATE_LEASE: &str = include_str!("rate_lease.lua");

/// Gives `n` unused tokens of `t` µs back to the bucket (never before now).
pub(super) const RATE_RETURN: &str = include_str!("rate_return.lua");

/// Leases up to `want` quota units within `limit` (-1: none); the key expires at ARGV[3]
/// (unix s). Returns {granted, leased out in the window}.
pub(super) const QUOTA_LEASE: &str = include_str!("quota_lease.lua");

/// Gives back `n` unspent quota units.
pub(super) const QUOTA_RETURN: &str = include_str!("quota_return.lua");

/// Adds units charged while Redis was unreachable, once per token (`KEYS[2]`): a resent sync
/// adds nothing. No limit check: those bureau calls were made, and the count must say so even
/// past the limit. Returns {1 if added now (0: added before), units leased out in the window}.
/// Public so its semantics can be tested against a real Redis.
pub const QUOTA_SYNC: &str = include_str!("quota_sync.lua");

/// In-flight slots: fields replica → 'held:expiry_ms'. Drops expired fields, then sets ARGV[1]'s
/// slots to ARGV[3] ('set': a renewal, or a release at 0) or adds ARGV[3] to them ('add': a
/// refill; never fewer than held), never beyond what `max` (-1: none) leaves beside the other
/// live replicas, and renews the expiry. Returns {slots granted, held by this replica now,
/// held by all live replicas}.
pub(super) const IN_FLIGHT: &str = include_str!("in_flight.lua");

/// Admin reset of both quota windows; returns what they held.
pub(super) const RESET: &str = include_str!("reset.lua");

/// Heartbeat: drops replicas whose lease expired, renews ours. KEYS: the replica set, when it
/// was last created (ms, Redis clock), the deployment's epoch, the owners of replica ids (id →
/// `instance:expiry_ms`). ARGV: id, lease ttl ms, an epoch to write if there is none, this
/// process's instance, `join` (start-up: do not enter the set under an id another live process
/// renews) or `beat`.
///
/// Returns {live replicas, our rank among them by name (ranks split the bureau budget's
/// remainder deterministically), age of the replica set ms, epoch, 1 if another live process
/// holds our id}. A set created less than a lease ttl ago may not yet hold every live replica
/// (a Redis that lost its data, or the first replica of a deployment): see `heartbeat`.
pub(super) const HEARTBEAT: &str = include_str!("heartbeat.lua");

/// Leaving at shutdown: out of the replica set, and the id given up if it is still ours.
pub(super) const LEAVE: &str = include_str!("leave.lua");

/// The scripts, hashed once (`EVALSHA`, with a fallback to `EVAL` after a Redis restart).
pub(super) struct Scripts {
    pub(super) rate_lease: Script,
    pub(super) rate_return: Script,
    pub(super) quota_lease: Script,
    pub(super) quota_return: Script,
    pub(super) quota_sync: Script,
    pub(super) in_flight: Script,
    pub(super) heartbeat: Script,
    pub(super) leave: Script,
    pub(super) reset: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            rate_lease: Script::new(RATE_LEASE),
            rate_return: Script::new(RATE_RETURN),
            quota_lease: Script::new(QUOTA_LEASE),
            quota_return: Script::new(QUOTA_RETURN),
            quota_sync: Script::new(QUOTA_SYNC),
            in_flight: Script::new(IN_FLIGHT),
            heartbeat: Script::new(HEARTBEAT),
            leave: Script::new(LEAVE),
            reset: Script::new(RESET),
        }
    }
}
