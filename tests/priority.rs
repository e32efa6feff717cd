//! Priority levels end to end (issue 17): interactive work ahead of a batch surge, the request's
//! level header consumed and checked against the tenant's contract, levels reloaded live.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bureau_guard::app::Running;
use bureau_sim::mock_bureau::{MockConfig, MockHandle};
use common::*;

const LEVELS: &str = r#"
[[priority]]
name = "interactive"
share = 3
[[priority]]
name = "batch"
share = 1
"#;

/// Four bureau slots, the two levels, and bank a allowed to name either with a deep queue.
fn bank_a_with_both_levels() -> Extras<'static> {
    Extras {
        upstream: "max_concurrency = 4\nqueue_timeout = \"10s\"",
        sections: LEVELS,
        tenant_a: "priorities = [\"interactive\", \"batch\"]\nmax_queue = 1000",
        ..Extras::default()
    }
}

fn bureau() -> MockConfig {
    MockConfig {
        workers: 4,
        service_time: Duration::from_millis(40),
        jitter: Duration::ZERO,
        queue: 10_000,
        queue_timeout: Duration::from_secs(30),
    }
}

/// Sends `n` batch look-ups at once; returns how many have been answered so far, as they end.
fn batch_surge(env: &Env, n: usize) -> (Arc<AtomicUsize>, Vec<tokio::task::JoinHandle<u16>>) {
    let done = Arc::new(AtomicUsize::new(0));
    let tasks = (0..n)
        .map(|i| {
            let (url, done) = (env.url(&format!("/v1/score/B-{i}")), Arc::clone(&done));
            tokio::spawn(async move {
                let r = get(&url, &[("x-api-key", KEY_A), ("x-bureau-priority", "batch")]).await;
                done.fetch_add(1, Ordering::SeqCst);
                r.status.as_u16()
            })
        })
        .collect();
    (done, tasks)
}

/// With the bureau's 4 slots taken by a bank's batch pre-screen (60 queued), the same bank's
/// interactive look-ups are served by the next slots that free: few batch calls end before
/// them. Without levels they would wait behind the whole batch queue (the bank's one FIFO).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_look_ups_pass_the_same_banks_batch_backlog() {
    let x = bank_a_with_both_levels();
    let env = Env::with(bureau(), &x).await;
    let (done, tasks) = batch_surge(&env, 60);
    wait_until("the batch backlog forms", || env.proxy.shared.scheduler.queued_total() >= 50).await;
    let mut batch_done_before = Vec::new();
    for i in 0..4 {
        let r = get(&env.url(&format!("/v1/score/I-{i}")), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.status, 200);
        batch_done_before.push(done.load(Ordering::SeqCst));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "batch work is only delayed, never refused here");
    }
    // Each interactive look-up waited for about one slot to free and its own call (two service
    // times: some 4 to 8 batch calls end meanwhile on 4 workers); in the bank's one FIFO the
    // first would have waited for 50 or more.
    let mut before = 0;
    for (i, &n) in batch_done_before.iter().enumerate() {
        assert!(n - before <= 12, "batch calls answered before interactive look-up {i}: {batch_done_before:?}");
        before = n;
    }
}

#[tokio::test]
async fn the_level_header_is_checked_against_the_contract_and_never_reaches_the_bureau() {
    let x = Extras { sections: LEVELS, tenant_a: "priorities = [\"batch\"]", ..Extras::default() };
    let env = Env::with(fast_mock(), &x).await;
    // Allowed: consumed.
    let r = get(&env.url("/echo/x"), &[("x-api-key", KEY_A), ("x-bureau-priority", "batch")]).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("x-bureau-priority").is_none(), "{}", r.json());
    // Tenant b's contract names no level beyond its default (interactive).
    let r = get(&env.url("/echo/x"), &[("x-api-key", KEY_B), ("x-bureau-priority", "batch")]).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("allowed: interactive"), "{}", r.text());
    let r = get(&env.url("/echo/x"), &[("x-api-key", KEY_A), ("x-bureau-priority", "urgent")]).await;
    assert_eq!(r.status, 400);
    // Counted by the bureau: one allowed look-up, none of the refused ones.
    let r = get(&env.url("/v1/score/S-1"), &[("x-api-key", KEY_A), ("x-bureau-priority", "batch")]).await;
    assert_eq!(r.status, 200);
    for (key, level) in [(KEY_B, "batch"), (KEY_A, "urgent"), (KEY_A, "Batch")] {
        let r = get(&env.url("/v1/score/S-2"), &[("x-api-key", key), ("x-bureau-priority", level)]).await;
        assert_eq!(r.status, 400, "{level}");
    }
    assert_eq!(env.mock.bureau.stats().calls_total, 1, "refused requests never reach the bureau");
}

#[test]
fn bad_priority_settings_are_refused_with_their_path() {
    let cases = [
        ("[[priority]]\nname = \"x\"\nshare = 0", "priority[0].share"),
        ("[[priority]]\nname = \"x\"\nlendable = 1.5", "priority[0].lendable"),
        ("[[priority]]\nname = \"x\"\n[[priority]]\nname = \"x\"", "priority[1].name"),
    ];
    for (sections, path) in cases {
        let text = config_with("http://127.0.0.1:1", &Extras { sections, ..Extras::default() });
        let err = bureau_guard::config::Config::from_toml(&text, &|_| None).expect_err(sections);
        assert!(err.to_string().contains(path), "{sections}: {err}");
    }
    // Nine levels, a tenant naming the ninth: reported, not a panic.
    let nine: String = (0..9).map(|i| format!("[[priority]]\nname = \"l{i}\"\n")).collect();
    let text = config_with(
        "http://127.0.0.1:1",
        &Extras { sections: &nine, tenant_a: "priority = \"l8\"", ..Extras::default() },
    );
    let err = bureau_guard::config::Config::from_toml(&text, &|_| None).expect_err("nine levels");
    assert!(err.to_string().contains("at most 8"), "{err}");
    let text = config_with("http://127.0.0.1:1", &Extras { tenant_a: "priority = \"batch\"", ..Extras::default() });
    let err = bureau_guard::config::Config::from_toml(&text, &|_| None).expect_err("no levels");
    assert!(err.to_string().contains("tenants[0].priority"), "{err}");
    let text = config_with(
        "http://127.0.0.1:1",
        &Extras { sections: LEVELS, score: "priority = \"bulk\"", ..Extras::default() },
    );
    let err = bureau_guard::config::Config::from_toml(&text, &|_| None).expect_err("unknown level");
    assert!(err.to_string().contains("routes[0].priority") && err.to_string().contains("interactive, batch"), "{err}");
}

/// Levels are reloaded live under a batch backlog: no request fails, the gauges follow the
/// levels in force, and `check --diff`'s changes name them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_reload_under_load_without_a_failed_request() {
    let x = bank_a_with_both_levels();
    let env = Env::with(bureau(), &x).await;
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    assert_eq!(metric_value(&metrics, r#"bureau_guard_level_nominal{level="interactive"}"#), Some(3.0), "{metrics}");
    assert_eq!(metric_value(&metrics, r#"bureau_guard_level_nominal{level="batch"}"#), Some(1.0));

    let (_, tasks) = batch_surge(&env, 40);
    wait_until("the batch backlog forms", || env.proxy.shared.scheduler.queued_total() >= 30).await;
    // Batch's share grows, then the batch level goes away (its queued requests move to bank a's
    // default level, interactive), then comes back.
    let steps = [
        LEVELS.replace("share = 1", "share = 3"),
        "[[priority]]\nname = \"interactive\"\n".to_string(),
        LEVELS.to_string(),
    ];
    for (i, sections) in steps.iter().enumerate() {
        let tenant_a = if i == 1 { "max_queue = 1000" } else { x.tenant_a };
        let text = config_with(&env.mock.url(), &Extras { sections, tenant_a, ..x.clone() });
        let report = bureau_guard::ops::reload::apply(&env.proxy.shared, parse(&text));
        assert!(report.applied(), "step {i}: {report:?}");
        let r = get(&env.url(&format!("/v1/score/I-{i}")), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.status, 200, "step {i}");
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "no queued batch request failed through the reloads");
    }
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    assert_eq!(metric_value(&metrics, r#"bureau_guard_level_in_flight{level="batch"}"#), Some(0.0), "{metrics}");
    assert_eq!(env.proxy.shared.scheduler.in_flight(), 0);
}

/// A reload that reorders the levels while both have waiters keeps each waiter and each call
/// in flight in its own level (a level keeps its scheduler slot by name): the gauges still
/// count interactive work as interactive, and once the bureau serves again interactive waiters
/// get interactive's share (3 of 4 slots), batch's waiters batch's. Were the slots taken by
/// place, the reorder would relabel the queues: interactive's 40 waiters counted as batch and
/// served at batch's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_levels_live_keeps_each_waiter_in_its_own_level() {
    let x = bank_a_with_both_levels();
    let env = Env::with(bureau(), &x).await;
    // The bureau stalls, so the queues stand still while they are counted.
    env.mock.bureau.set_workers(0);
    let order = Arc::new(AtomicUsize::new(0));
    let surge = |level: &'static str, n: usize| {
        (0..n)
            .map(|i| {
                let (url, order) = (env.url(&format!("/v1/score/{level}-{i}")), Arc::clone(&order));
                tokio::spawn(async move {
                    let r = get(&url, &[("x-api-key", KEY_A), ("x-bureau-priority", level)]).await;
                    (r.status.as_u16(), order.fetch_add(1, Ordering::SeqCst))
                })
            })
            .collect::<Vec<_>>()
    };
    let sched = env.proxy.shared.scheduler.clone();
    let batch = surge("batch", 40);
    wait_until("batch holds every slot and queues", || sched.in_flight() == 4 && sched.queued_total() == 36).await;
    let interactive = surge("interactive", 40);
    wait_until("interactive queues too", || sched.queued_total() == 76).await;

    let reordered = "[[priority]]\nname = \"batch\"\nshare = 1\n[[priority]]\nname = \"interactive\"\nshare = 3\n";
    let text = config_with(&env.mock.url(), &Extras { sections: reordered, ..x.clone() });
    let report = bureau_guard::ops::reload::apply(&env.proxy.shared, parse(&text));
    assert!(report.applied(), "{report:?}");
    let metrics = get(&env.admin_url("/metrics"), &[]).await.text();
    for (series, want) in [
        (r#"bureau_guard_level_queued{level="interactive"}"#, 40.0),
        (r#"bureau_guard_level_queued{level="batch"}"#, 36.0),
        (r#"bureau_guard_level_in_flight{level="batch"}"#, 4.0),
        (r#"bureau_guard_level_in_flight{level="interactive"}"#, 0.0),
        (r#"bureau_guard_level_nominal{level="interactive"}"#, 3.0),
    ] {
        assert_eq!(metric_value(&metrics, series), Some(want), "{series}\n{metrics}");
    }

    env.mock.bureau.set_workers(4);
    let mut first_twenty = 0;
    for t in interactive {
        let (status, at) = t.await.unwrap();
        assert_eq!(status, 200);
        first_twenty += usize::from(at < 20);
    }
    for t in batch {
        assert_eq!(t.await.unwrap().0, 200);
    }
    // Interactive's share is 3 of 4 slots: some 15 of the first 20 answers (at batch's share,
    // some 5).
    assert!(first_twenty >= 12, "interactive had {first_twenty} of the first 20 answers");
    assert_eq!(sched.in_flight(), 0);
}

/// A coalesced flight queues at the most important level among its waiters: a batch look-up
/// queued behind a batch backlog is raised to interactive when the same bank's interactive
/// look-up of the same subject joins it, falls back when that look-up leaves, and is sent once.
/// Without it the interactive look-up would wait at batch priority, behind the whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_queues_at_its_most_important_waiters_level() {
    let x = Extras { score: "coalesce = true\ncache_key = [\"path.subject_id\"]", ..bank_a_with_both_levels() };
    let env = Env::with(bureau(), &x).await;
    env.mock.bureau.set_workers(0);
    let sched = env.proxy.shared.scheduler.clone();
    let (done, batch) = batch_surge(&env, 40);
    wait_until("batch holds every slot and queues", || sched.in_flight() == 4 && sched.queued_total() == 36).await;
    let look_up = |level: &'static str| {
        let url = env.url("/v1/score/X");
        tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A), ("x-bureau-priority", level)]).await.status })
    };
    let (interactive, batch_level) = (sched.levels().order()[0], sched.levels().order()[1]);
    let queued = |slot| sched.level_stats(slot).queued;
    let leader = look_up("batch");
    wait_until("the batch flight queues", || queued(batch_level) == 37).await;
    // An interactive look-up joins: the flight moves to interactive...
    let follower = look_up("interactive");
    wait_until("the flight raised", || queued(interactive) == 1 && queued(batch_level) == 36).await;
    // ...and back to batch when it leaves.
    follower.abort();
    wait_until("the flight back at batch", || queued(interactive) == 0 && queued(batch_level) == 37).await;
    let follower = look_up("interactive");
    wait_until("the flight raised again", || queued(interactive) == 1).await;

    env.mock.bureau.set_workers(4);
    assert_eq!(follower.await.unwrap(), 200);
    let batch_before = done.load(Ordering::SeqCst);
    assert_eq!(leader.await.unwrap(), 200);
    for t in batch {
        assert_eq!(t.await.unwrap(), 200);
    }
    // Served at the next free slot or two (interactive's nominal part is 3 of 4), not behind 36.
    assert!(batch_before <= 12, "{batch_before} batch calls were answered before the raised flight");
    assert_eq!(env.mock.bureau.stats().calls_total, 41, "the flight was sent once");
}

/// A flight whose most important waiter's level has no room in its tenant's queue stays queued
/// where it is: its waiters are not failed for it. Bank a's interactive queue is full (3 of 3)
/// when its interactive look-up joins the batch flight of the same subject; the flight keeps
/// its batch place and every look-up is answered once the bureau frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_that_cannot_move_to_a_full_level_stays_where_it_is() {
    let x = Extras {
        score: "coalesce = true\ncache_key = [\"path.subject_id\"]",
        tenant_a: "priorities = [\"interactive\", \"batch\"]\nmax_queue = 3",
        ..bank_a_with_both_levels()
    };
    let env = Env::with(bureau(), &x).await;
    env.mock.bureau.set_workers(0);
    let sched = env.proxy.shared.scheduler.clone();
    let (interactive, batch_level) = (sched.levels().order()[0], sched.levels().order()[1]);
    let queued = |slot| sched.level_stats(slot).queued;
    let look_up = |subject: String, level: &'static str| {
        let url = env.url(&format!("/v1/score/{subject}"));
        tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A), ("x-bureau-priority", level)]).await.status })
    };
    let mut others: Vec<_> = (0..7).map(|i| look_up(format!("I-{i}"), "interactive")).collect();
    wait_until("interactive holds every slot, its queue full", || sched.in_flight() == 4 && queued(interactive) == 3)
        .await;
    let leader = look_up("X".into(), "batch");
    wait_until("the batch flight queues", || queued(batch_level) == 1).await;
    let follower = look_up("X".into(), "interactive");
    // Eight flights (seven interactive, the batch one) with one waiter each, then the follower.
    let coalescer = &env.proxy.shared.coalescer;
    wait_until("the follower joins the flight", || coalescer.waiting_total() == 9).await;
    // The move was refused: the flight is still queued, at batch.
    assert_eq!((queued(interactive), queued(batch_level)), (3, 1));

    env.mock.bureau.set_workers(4);
    assert_eq!(leader.await.unwrap(), 200);
    assert_eq!(follower.await.unwrap(), 200);
    for t in others.drain(..) {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(env.mock.bureau.stats().calls_total, 8, "the flight was sent once");
}

/// A bureau of two workers, a proxy of two slots in front of it with bank a (weight 1) alone
/// and bank b in a group (weight 1) with two affiliates (keys `key-b2`, `key-b3`); deep queues.
async fn bank_and_family() -> (MockHandle, Running) {
    let mock = start_mock(MockConfig { workers: 2, ..bureau() }).await;
    let proxy = start_proxy(&family_config(&mock.url(), FAMILY)).await;
    (mock, proxy)
}

const FAMILY: &str = "[[groups]]\nid = \"bank-b-family\"\nmembers = [\"b\", \"b2\", \"b3\"]\n";

/// The config of [`bank_and_family`], with `groups` for its `[[groups]]`.
fn family_config(mock_url: &str, groups: &str) -> String {
    let mut text = config_with(
        mock_url,
        &Extras {
            upstream: "max_concurrency = 2\nqueue_timeout = \"20s\"",
            tenant_a: "max_queue = 1000",
            tenant_b: "max_queue = 1000",
            ..Extras::default()
        },
    );
    for (id, key) in [("b2", "key-b2"), ("b3", "key-b3")] {
        text.push_str(&format!("[[tenants]]\nid = \"{id}\"\napi_key_sha256 = \"{}\"\nmax_queue = 1000\n", sha(key)));
    }
    text.push_str(groups);
    text
}

/// Groups are reloaded live while three affiliates have a backlog: the group's weight changes,
/// a member leaves it, the group goes away, then comes back. No queued request fails, and the
/// proxy serves the unaffiliated bank at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_reload_under_load_without_a_failed_request() {
    let (mock, proxy) = bank_and_family().await;
    let family: Vec<_> = ["key-b", "key-b2", "key-b3"].into_iter().flat_map(|k| surge_of(&proxy, k, 40)).collect();
    let sched = proxy.shared.scheduler.clone();
    wait_until("the three affiliates backlogged", || [1, 2, 3].iter().all(|&t| sched.queued(t) >= 10)).await;
    let steps = [
        format!("{FAMILY}weight = 3\n"),
        "[[groups]]\nid = \"bank-b-family\"\nmembers = [\"b\", \"b2\"]\n".to_string(),
        String::new(),
        FAMILY.to_string(),
    ];
    for (i, groups) in steps.iter().enumerate() {
        let report = bureau_guard::ops::reload::apply(&proxy.shared, parse(&family_config(&mock.url(), groups)));
        assert!(report.applied(), "step {i}: {report:?}");
        assert!(sched.queued_total() > 0, "step {i} ran under load");
        let r = get(&format!("http://{}/v1/score/A-{i}", proxy.addr), &[("x-api-key", KEY_A)]).await;
        assert_eq!(r.status, 200, "step {i}");
    }
    for t in family {
        assert_eq!(t.await.unwrap(), 200, "no queued request failed through the reloads");
    }
    wait_until("every slot back", || sched.in_flight() == 0).await;
}

/// `n` look-ups of the tenant with api key `key`, at once.
fn surge_of(proxy: &Running, key: &'static str, n: usize) -> Vec<tokio::task::JoinHandle<http::StatusCode>> {
    (0..n)
        .map(|i| {
            let u = format!("http://{}/v1/score/{key}-{i}", proxy.addr);
            tokio::spawn(async move { get(&u, &[("x-api-key", key)]).await.status })
        })
        .collect()
}

/// The bureau calls of tenants `ids` while bank a's surge `alone` is answered, counted from
/// when the scheduler's tenants `backlogged` all have a backlog.
async fn calls_while_the_bank_surges(
    mock: &MockHandle,
    proxy: &Running,
    alone: Vec<tokio::task::JoinHandle<http::StatusCode>>,
    backlogged: &[usize],
    ids: &[&str],
) -> (u64, u64) {
    let sched = proxy.shared.scheduler.clone();
    wait_until("every surging tenant backlogged", || backlogged.iter().all(|&t| sched.queued(t) >= 20)).await;
    let before = mock.bureau.stats().calls_by_tenant;
    for t in alone {
        assert_eq!(t.await.unwrap(), 200);
    }
    let after = mock.bureau.stats().calls_by_tenant;
    let delta = |t: &str| after.get(t).copied().unwrap_or(0) - before.get(t).copied().unwrap_or(0);
    (delta("a"), ids.iter().map(|t| delta(t)).sum())
}

/// Three affiliates in one group (weight 1) surge together beside an unaffiliated bank
/// (weight 1) surging as hard: the group's three ids share one share of the bureau between
/// them, so while all four are backlogged the bank gets about as many calls as the three
/// together (without the group it would get a quarter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affiliates_surging_together_get_their_groups_share_not_one_each() {
    let (mock, proxy) = bank_and_family().await;
    let family: Vec<_> = ["key-b", "key-b2", "key-b3"].into_iter().flat_map(|k| surge_of(&proxy, k, 60)).collect();
    let alone = surge_of(&proxy, KEY_A, 60);
    // Counted from when all four have a backlog (the requests arrive over a few hundred ms).
    let (bank, family_calls) =
        calls_while_the_bank_surges(&mock, &proxy, alone, &[0, 1, 2, 3], &["b", "b2", "b3"]).await;
    assert!(bank >= 20, "the bank's backlog was served while counted: {bank}");
    assert!(
        family_calls <= bank * 5 / 4 + 2,
        "while all were backlogged the three affiliates had {family_calls} calls to the bank's {bank}"
    );
    for t in family {
        assert_eq!(t.await.unwrap(), 200);
    }
}

/// One affiliate surging alone beside an unaffiliated bank of the group's weight gets the
/// group's whole share, its idle affiliates' parts included: about as many calls as the bank
/// (its weight divided statically among the three, it would get a third of the bank's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_affiliate_surging_alone_gets_its_groups_whole_share() {
    let (mock, proxy) = bank_and_family().await;
    let member = surge_of(&proxy, "key-b", 60);
    let alone = surge_of(&proxy, KEY_A, 60);
    let (bank, member_calls) = calls_while_the_bank_surges(&mock, &proxy, alone, &[0, 1], &["b"]).await;
    assert!(bank >= 20, "the bank's backlog was served while counted: {bank}");
    assert!(
        member_calls * 4 >= bank * 3,
        "while both were backlogged the affiliate had {member_calls} calls to the bank's {bank}"
    );
    for t in member {
        assert_eq!(t.await.unwrap(), 200);
    }
}

/// A raised flight whose interactive waiter leaves while the bank's batch queue is full again
/// keeps its call: the move back is refused for lack of room, so it stays queued where it is
/// (its waiters are not failed for a move). Found by review: the move left the queue first and
/// answered 503 to every waiter when the new level had no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_falling_back_to_a_full_level_keeps_its_call() {
    let x = Extras {
        score: "coalesce = true\ncache_key = [\"path.subject_id\"]",
        tenant_a: "priorities = [\"interactive\", \"batch\"]\nmax_queue = 37",
        ..bank_a_with_both_levels()
    };
    let env = Env::with(bureau(), &x).await;
    env.mock.bureau.set_workers(0);
    let sched = env.proxy.shared.scheduler.clone();
    let (_, batch) = batch_surge(&env, 40);
    wait_until("batch holds every slot and queues", || sched.in_flight() == 4 && sched.queued_total() == 36).await;
    let look_up = |path: &'static str, level: &'static str| {
        let url = env.url(path);
        tokio::spawn(async move { get(&url, &[("x-api-key", KEY_A), ("x-bureau-priority", level)]).await.status })
    };
    let (interactive, batch_level) = (sched.levels().order()[0], sched.levels().order()[1]);
    let queued = |slot| sched.level_stats(slot).queued;
    // The batch flight takes the last place of the bank's batch queue (37).
    let leader = look_up("/v1/score/X", "batch");
    wait_until("the batch flight queues", || queued(batch_level) == 37).await;
    // Raised by an interactive waiter; its batch place is taken by the next batch look-up.
    let follower = look_up("/v1/score/X", "interactive");
    wait_until("the flight raised", || queued(interactive) == 1 && queued(batch_level) == 36).await;
    let late = look_up("/v1/score/L", "batch");
    wait_until("the batch queue full again", || queued(batch_level) == 37).await;
    // The interactive waiter gives up: the flight would fall back to a full batch queue.
    let coalescer = &env.proxy.shared.coalescer;
    let waiting = coalescer.waiting_total();
    follower.abort();
    wait_until("the follower gone", || coalescer.waiting_total() == waiting - 1).await;
    assert_eq!((queued(interactive), queued(batch_level)), (1, 37), "the flight stays queued");
    // The bureau frees up only after a service time (40 ms): a refused move has long answered.
    env.mock.bureau.set_workers(4);
    assert_eq!(leader.await.unwrap(), 200, "the flight's call was kept");
    assert_eq!(late.await.unwrap(), 200);
    for t in batch {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(sched.in_flight(), 0);
}
