//! bureau-sim: what bureau-guard is tested, benchmarked and shown against, kept apart from the
//! proxy so that a deployed bureau-guard carries none of it.
//!
//! - [`mock_bureau`]: a bureau stand-in that fails like a real one: workers and a queue, overload
//!   503s, refusals on demand, calls that outlive their client, `/stats` of what reached it
//! - [`loadgen`]: an open-loop load generator (requests sent on schedule, whatever the answers)
//! - [`surge`]: the 2017 day and six harder launch days replayed through bureau-guard and
//!   straight to the bureau, judged against their issues' criteria
//!
//! bureau-guard runs these as `bureau-guard mock-bureau` and `bureau-guard demo` (its default
//! `tools` feature), and in its tests and benchmarks. This crate cannot depend on bureau-guard in
//! turn: the surge replay starts the proxy through [`surge::GuardUnderTest`], which bureau-guard
//! implements.

pub mod loadgen;
pub mod mock_bureau;
pub mod surge;
