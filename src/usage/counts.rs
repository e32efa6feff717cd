//! What a usage statement counts: one fixed set of columns, named once (files, JSON, CSV).

use crate::respond::ErrorKind;

/// The columns before the refusals by reason.
const FIXED: usize = 6;

/// Number of columns: the fixed ones, then one per refusal reason ([`ErrorKind`]).
pub const COLUMNS: usize = FIXED + ErrorKind::ALL.len();

/// One thing a statement counts, for one tenant, route and day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// Calls the bureau took: charged to the tenant (and billed by the bureau). Includes
    /// abandoned calls and coalesced flights' single call.
    BureauCalls,
    /// Answered from the cache: no bureau call.
    CacheHits,
    /// Joined an identical call in flight: no bureau call of its own.
    Coalesced,
    /// An expired answer served because the bureau failed: no (successful) bureau call.
    Stale,
    /// Charged calls whose every requester had gone before the answer (a subset of
    /// `bureau_calls`: the bureau did the work).
    Abandoned,
    /// Calls the bureau refused (its own 429/503): not charged.
    BureauRefused,
    /// Requests answered with an error, by its code (bureau-guard's refusals and failures).
    Refused(ErrorKind),
}

impl Column {
    /// Dense index in `0..COLUMNS`.
    pub fn index(self) -> usize {
        match self {
            Column::BureauCalls => 0,
            Column::CacheHits => 1,
            Column::Coalesced => 2,
            Column::Stale => 3,
            Column::Abandoned => 4,
            Column::BureauRefused => 5,
            Column::Refused(kind) => FIXED + kind as usize,
        }
    }

    /// The column at `index` (`index < COLUMNS`).
    pub fn at(index: usize) -> Column {
        match index {
            0 => Column::BureauCalls,
            1 => Column::CacheHits,
            2 => Column::Coalesced,
            3 => Column::Stale,
            4 => Column::Abandoned,
            5 => Column::BureauRefused,
            i => Column::Refused(ErrorKind::ALL[i - FIXED]),
        }
    }

    /// Its stable name: in the usage files, the JSON statement and the CSV header.
    pub fn name(self) -> String {
        match self {
            Column::BureauCalls => "bureau_calls".into(),
            Column::CacheHits => "cache_hits".into(),
            Column::Coalesced => "coalesced".into(),
            Column::Stale => "stale".into(),
            Column::Abandoned => "abandoned".into(),
            Column::BureauRefused => "bureau_refused".into(),
            Column::Refused(kind) => format!("refused_{}", kind.code()),
        }
    }

    /// The column named `name`, if any (files written by another version may name others).
    pub fn named(name: &str) -> Option<Column> {
        (0..COLUMNS).map(Column::at).find(|c| c.name() == name)
    }
}

/// The counts of one tenant, route and day. Signed so that a delta can take back (a charge
/// made durable before its call, that the bureau then refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts(pub [i64; COLUMNS]);

impl Default for Counts {
    fn default() -> Self {
        Counts([0; COLUMNS])
    }
}

impl Counts {
    pub fn get(&self, c: Column) -> i64 {
        self.0[c.index()]
    }

    pub fn add(&mut self, c: Column, n: i64) {
        self.0[c.index()] += n;
    }

    pub fn merge(&mut self, other: &Counts) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }

    /// Look-ups answered without a bureau call of their own: cache hits, coalesced, stale.
    pub fn answered_without_bureau(&self) -> i64 {
        self.get(Column::CacheHits) + self.get(Column::Coalesced) + self.get(Column::Stale)
    }

    /// Every refusal, whatever its reason.
    pub fn refused(&self) -> i64 {
        self.0[FIXED..].iter().sum()
    }

    /// The non-zero columns, by name.
    pub fn named(&self) -> impl Iterator<Item = (String, i64)> + '_ {
        self.0.iter().enumerate().filter(|(_, n)| **n != 0).map(|(i, n)| (Column::at(i).name(), *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_has_a_distinct_name_that_reads_back() {
        let names: std::collections::HashSet<String> = (0..COLUMNS).map(|i| Column::at(i).name()).collect();
        assert_eq!(names.len(), COLUMNS);
        for i in 0..COLUMNS {
            assert_eq!(Column::named(&Column::at(i).name()).map(Column::index), Some(i));
        }
        assert_eq!(Column::Refused(ErrorKind::RateLimited).name(), "refused_rate_limited");
    }
}
