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
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::RedisState;
use crate::usage::shared::{Copied, Shipment};
use crate::usage::store::{Pair, date_of};
use crate::usage::{Column, Counts, Row};

/// A copy or a statement may move a day's worth of pairs: longer than a script's bound.
const USAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands per pipeline (a statement over 400 days of 10k tenants is 4M reads).
const CHUNK: usize = 2000;

impl RedisState {
    fn usage_key(&self, tenant: &str, day: u32) -> String {
        self.key(tenant, format_args!("usage:{}", date_of(day)))
    }

    fn usage_tenants_key(&self, day: u32) -> String {
        self.deployment_key(&format!("usage:{}:tenants", date_of(day)))
    }

    /// Writes `shipment`'s totals (one pipeline per [`CHUNK`] commands); whether Redis took all.
    /// Logs the first failure of a run of them, and the recovery.
    pub async fn write_usage(&self, shipment: &Shipment, retention_days: u32) -> Copied {
        let mut by_key: BTreeMap<(u32, &str), Vec<(String, String)>> = BTreeMap::new();
        for (day, (tenant, route), counts) in &shipment.rows {
            let named: BTreeMap<String, i64> = counts.named().collect();
            let value = serde_json::to_string(&named).expect("a map of numbers serializes");
            by_key.entry((*day, tenant)).or_default().push((format!("{route}|{}", shipment.writer), value));
        }
        let mut pipes = vec![redis::pipe()];
        let mut commands = 0;
        for ((day, tenant), fields) in &by_key {
            if commands >= CHUNK {
                pipes.push(redis::pipe());
                commands = 0;
            }
            // A day after the day leaves the retention (counted from its start, UTC: a day
            // of slack covers any quota offset).
            let expire_at = (i64::from(*day) + i64::from(retention_days) + 1) * 86_400;
            let (key, index) = (self.usage_key(tenant, *day), self.usage_tenants_key(*day));
            let pipe = pipes.last_mut().expect("one at least");
            pipe.hset_multiple(&key, fields).ignore();
            pipe.expire_at(&key, expire_at).ignore();
            pipe.sadd(&index, *tenant).ignore();
            pipe.expire_at(&index, expire_at).ignore();
            commands += 4 + fields.len();
        }
        let mut result = Ok(());
        for pipe in &pipes {
            result = self.usage_call("usage_write", async |conn| pipe.query_async::<()>(conn).await).await;
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
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
        let mut keys: Vec<(u32, String)> = Vec::new();
        match tenant {
            Some(t) => keys.extend(days.iter().map(|d| (*d, t.to_string()))),
            None => {
                for chunk in days.chunks(CHUNK) {
                    let mut pipe = redis::pipe();
                    for day in chunk {
                        pipe.smembers(self.usage_tenants_key(*day));
                    }
                    let tenants: Vec<Vec<String>> =
                        self.usage_call("usage_read", async |conn| pipe.query_async(conn).await).await?;
                    for (day, ts) in chunk.iter().zip(tenants) {
                        keys.extend(ts.into_iter().map(|t| (*day, t)));
                    }
                }
            }
        }
        let mut sums: BTreeMap<(std::sync::Arc<str>, u32, std::sync::Arc<str>), Counts> = BTreeMap::new();
        for chunk in keys.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for (day, t) in chunk {
                pipe.hgetall(self.usage_key(t, *day));
            }
            let hashes: Vec<HashMap<String, String>> =
                self.usage_call("usage_read", async |conn| pipe.query_async(conn).await).await?;
            for ((day, t), fields) in chunk.iter().zip(hashes) {
                for (field, value) in fields {
                    let Some((route, _writer)) = field.rsplit_once('|') else { continue };
                    let Ok(named) = serde_json::from_str::<BTreeMap<String, i64>>(&value) else { continue };
                    let pair: Pair = (t.as_str().into(), route.into());
                    let c = sums.entry((pair.0, *day, pair.1)).or_default();
                    for (name, n) in named {
                        if let Some(col) = Column::named(&name) {
                            c.add(col, n);
                        }
                    }
                }
            }
        }
        Ok(sums
            .into_iter()
            .filter(|(_, c)| !c.is_zero())
            .map(|((tenant, day, route), counts)| Row { day, tenant, route, counts })
            .collect())
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
