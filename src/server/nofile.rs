//! The descriptor limit, and the connection cap derived from it.
//!
//! Every connection is a descriptor; when the process runs out, `accept` fails (EMFILE) for
//! everyone, banks included. Many systems start services with a soft `RLIMIT_NOFILE` of 1024
//! and a hard one far higher (systemd: 1024 / 524288), expecting servers to raise the soft limit
//! themselves, as nginx (`worker_rlimit_nofile`) and Envoy do. We raise it to the hard limit at
//! start, then size `server.max_connections` to leave room for everything else.
//!
//! `libc` rather than `rustix`: it is already built for tokio and mio, and these are two calls
//! with plain-old-data arguments; `rustix`'s safe wrappers would need its `process` feature
//! compiled for just this.

/// Descriptors kept for everything that is not a client connection, beyond the bureau pool:
/// the admin listener and its clients, the audit log, the state file, Redis, logs, TLS files
/// read on reload.
pub const RESERVED: u64 = 128;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force
/// (`None` if it cannot be read). A failure to raise is logged, not fatal: the cap is then
/// derived from the lower limit.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
pub fn raise_to_hard_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one valid `rlimit`; raising soft up to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(
                from = lim.rlim_cur,
                to = lim.rlim_max,
                "raised the descriptor limit (RLIMIT_NOFILE) to its hard limit"
            );
            lim.rlim_cur = lim.rlim_max;
        } else {
            tracing::warn!(soft = lim.rlim_cur, hard = lim.rlim_max, error = %std::io::Error::last_os_error(), "cannot raise the descriptor limit");
        }
    }
    Some(lim.rlim_cur as u64)
}

/// The soft `RLIMIT_NOFILE` now in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
pub fn current() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: as in `raise_to_hard_limit`.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur as u64)
}

/// `server.max_connections` when it is not set: the descriptors left after the bureau's
/// connections (`bureau_connections`: `max_concurrency + pool_max_idle`) and [`RESERVED`], at
/// least 64 (a limit so low that this is negative is a misconfigured host, and it is warned
/// about at start). `nofile` of `None` (unknown, or unlimited) gives 65,536 — memory, not
/// descriptors, is then the bound, and a few KiB per connection stays far below it.
pub fn default_max_connections(nofile: Option<u64>, bureau_connections: u64) -> usize {
    match nofile {
        None => 65_536,
        Some(n) if n >= u64::from(u32::MAX) => 65_536,
        Some(n) => n.saturating_sub(bureau_connections + RESERVED).max(64) as usize,
    }
}

/// `server.max_connections_per_source` when it is not set: a quarter of the connections, so no
/// one address (one bank's NAT, one attacker) can take more than that, and a bank's pool of a
/// few hundred h1 connections still fits under the default cap of a raised limit.
pub fn default_per_source(max_connections: usize) -> usize {
    (max_connections / 4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_for_the_bureau_and_files() {
        // 1024 (an unraised soft limit), the default bureau pool 256 + budget 64.
        assert_eq!(default_max_connections(Some(1024), 320), 576);
        assert_eq!(default_max_connections(Some(524_288), 320), 523_840);
        assert_eq!(default_max_connections(Some(256), 320), 64);
        assert_eq!(default_max_connections(None, 320), 65_536);
        assert_eq!(default_per_source(576), 144);
    }
}
