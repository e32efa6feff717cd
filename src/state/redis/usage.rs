//! Usage statements across replicas (`usage/shared.rs` says why totals per writer): each
//! replica's flush writes its changed totals in one pipeline; a statement sums every writer's.
//!
//! | key | what |
//! |---|---|
//! | `{p:TENANT}:usage:YYYY-MM-DD` | hash: `ROUTE\|WRITER` → that writer's counts (JSON, by column name) |
//! | `{p}:usage:YYYY-MM-DD:tenants` | set: the tenants with usage that day |
//!
//! Both expire a day after the day leaves `usage.retention`. Tenant ids and route names hold
//! no `|` (config validation), so a field splits at its last one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use redis::FromRedisValue;

use super::conn::Conn;
use super::{RedisState, TICK_CONCURRENCY};
use crate::usage::shared::{Copied, Shipment};
use crate::usage::store::date_of;
use crate::usage::{Column, Counts, Row};

/// A copy or a statement may move a day's worth of pairs: longer than a script's bound.
const USAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands per pipeline (a statement over 400 days of 10k tenants is 4M reads): one
/// pipeline's replies are held in memory at once.
const CHUNK: usize = 2000;

impl RedisState {
    fn usage_key(&self, tenant: &str, day: u32) -> String {
        self.key(tenant, format_args!("usage:{}", date_of(day)))
    }

    fn usage_tenants_key(&self, day: u32) -> String {
        self.deployment_key(&format!("usage:{}:tenants", date_of(day)))
    }

    /// Writes `shipment`'s totals; whether Redis took all. Logs the first failure of a run of
    /// them, and the recovery.
    pub async fn write_usage(&self, shipment: &Shipment, retention_days: u32) -> Copied {
        let mut by_key: BTreeMap<(&str, u32), Vec<(String, String)>> = BTreeMap::new();
        for (day, (tenant, route), counts) in &shipment.rows {
            let named: BTreeMap<String, i64> = counts.named().collect();
            let value = serde_json::to_string(&named).expect("a map of numbers serializes");
            by_key.entry((tenant, *day)).or_default().push((format!("{route}|{}", shipment.writer), value));
        }
        // A day after the day leaves the retention (counted from its start, UTC: a day of
        // slack covers any quota offset).
        let expire_at = |day: u32| (i64::from(day) + i64::from(retention_days) + 1) * 86_400;
        // One group per hash tag: each tenant's days, then every day's tenant list.
        let mut groups: Vec<Vec<redis::Cmd>> = Vec::new();
        let mut index: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        let mut last_tenant = None;
        for ((tenant, day), fields) in &by_key {
            if last_tenant != Some(*tenant) {
                groups.push(Vec::new());
                last_tenant = Some(*tenant);
            }
            let key = self.usage_key(tenant, *day);
            let group = groups.last_mut().expect("pushed above");
            group.push(redis::Cmd::hset_multiple(&key, fields));
            group.push(redis::Cmd::expire_at(&key, expire_at(*day)));
            index.entry(*day).or_default().push(tenant);
        }
        groups.push(
            index
                .iter()
                .flat_map(|(day, tenants)| {
                    let key = self.usage_tenants_key(*day);
                    [redis::Cmd::sadd(&key, tenants), redis::Cmd::expire_at(&key, expire_at(*day))]
                })
                .collect(),
        );
        match self.for_each_reply::<redis::Value>("usage_write", groups, |_, _, _| {}).await {
            Ok(_) => {
                if self.usage_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("usage copied to Redis again; the counts kept meanwhile are in it");
                }
                Copied::Yes
            }
            Err(e) => {
                if !self.usage_failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "cannot copy usage to Redis; kept and copied at a later flush (statements answer 503 meanwhile)");
                }
                Copied::No
            }
        }
    }

    /// Every writer's counts summed, from day `from` to `to` (inclusive), of `tenant` if given,
    /// sorted by tenant, day and route.
    pub async fn read_usage(&self, from: u32, to: u32, tenant: Option<&str>) -> Result<Vec<Row>, String> {
        let days: Vec<u32> = (from..=to).collect();
        // (tenant, day), grouped by tenant (one hash tag).
        let mut keys: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        match tenant {
            Some(t) => {
                keys.insert(t.to_string(), days);
            }
            None => {
                let lists = days.iter().map(|d| redis::Cmd::smembers(self.usage_tenants_key(*d))).collect();
                self.for_each_reply("usage_read", vec![lists], |_, i, tenants: Vec<String>| {
                    for t in tenants {
                        keys.entry(t).or_default().push(days[i]);
                    }
                })
                .await?;
            }
        }
        let order: Vec<(Arc<str>, &[u32])> =
            keys.iter().map(|(t, days)| (Arc::from(t.as_str()), days.as_slice())).collect();
        let groups = keys
            .iter()
            .map(|(t, days)| days.iter().map(|d| redis::Cmd::hgetall(self.usage_key(t, *d))).collect())
            .collect();
        let mut sums: BTreeMap<(Arc<str>, u32, Arc<str>), Counts> = BTreeMap::new();
        self.for_each_reply("usage_read", groups, |g, i, fields: HashMap<String, String>| {
            let (tenant, days) = &order[g];
            for (field, value) in fields {
                let Some((route, _writer)) = field.rsplit_once('|') else { continue };
                let Ok(named) = serde_json::from_str::<BTreeMap<String, i64>>(&value) else { continue };
                let c = sums.entry((tenant.clone(), days[i], Arc::from(route))).or_default();
                for (name, n) in named {
                    if let Some(col) = Column::named(&name) {
                        c.add(col, n);
                    }
                }
            }
        })
        .await?;
        Ok(sums
            .into_iter()
            .filter(|(_, c)| !c.is_zero())
            .map(|((tenant, day, route), counts)| Row { day, tenant, route, counts })
            .collect())
    }

    /// Runs `groups` of commands, the keys of each group under one hash tag, and hands each
    /// reply to `each(group, its command's index in the group, reply)` in order as its pipeline
    /// answers: only one pipeline's replies are held at a time (a statement over every tenant and
    /// the whole retention reads millions of hashes, each with a field per route and writer).
    /// On a single Redis they go as pipelines of [`CHUNK`] commands, whatever the groups; on a
    /// cluster a pipeline reaches one node, so each group is a pipeline of its own
    /// ([`TICK_CONCURRENCY`] at once, handed on in order).
    async fn for_each_reply<T: FromRedisValue + Send + 'static>(
        &self,
        op: &'static str,
        groups: Vec<Vec<redis::Cmd>>,
        mut each: impl FnMut(usize, usize, T),
    ) -> Result<(), String> {
        let pipe = |cmds: &[redis::Cmd]| {
            let mut p = redis::pipe();
            for c in cmds {
                p.add_command(c.clone());
            }
            p
        };
        match &self.conn {
            Conn::Single(_) => {
                let at: Vec<(usize, usize)> =
                    groups.iter().enumerate().flat_map(|(g, cmds)| (0..cmds.len()).map(move |i| (g, i))).collect();
                let all: Vec<redis::Cmd> = groups.into_iter().flatten().collect();
                for (chunk, at) in all.chunks(CHUNK).zip(at.chunks(CHUNK)) {
                    let p = pipe(chunk);
                    let got: Vec<T> = self.usage_call(op, async |conn| p.query_async(conn).await).await?;
                    for (&(g, i), reply) in at.iter().zip(got) {
                        each(g, i, reply);
                    }
                }
            }
            Conn::Cluster(_) => {
                let mut replies = futures_util::stream::iter(groups)
                    .map(|group| async move {
                        let mut replies = Vec::with_capacity(group.len());
                        for chunk in group.chunks(CHUNK) {
                            let p = pipe(chunk);
                            let got: Vec<T> = self.usage_call(op, async |conn| p.query_async(conn).await).await?;
                            replies.extend(got);
                        }
                        Ok::<_, String>(replies)
                    })
                    .buffered(TICK_CONCURRENCY)
                    .enumerate();
                while let Some((g, got)) = replies.next().await {
                    for (i, reply) in got?.into_iter().enumerate() {
                        each(g, i, reply);
                    }
                }
            }
        }
        Ok(())
    }

    /// One usage pipeline with its own time bound; errors as text without the URL's password.
    /// Not an outage of the limits: a statement or a copy failing leaves admission alone.
    async fn usage_call<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut super::conn::AnyConn) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        self.metrics.calls.with_label_values(&[op]).inc();
        match tokio::time::timeout(USAGE_TIMEOUT, self.conn.run(f)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.errors.with_label_values(&[op]).inc();
                Err(self.redact(&e.to_string()))
            }
            Err(_) => {
                self.metrics.errors.with_label_values(&[op]).inc();
                Err(format!("no answer within {} s", USAGE_TIMEOUT.as_secs()))
            }
        }
    }
}
