//! A usage statement as the admin endpoint and `bureau-guard usage` give it: JSON with totals
//! per tenant then rows per day and route, or CSV (a header row, one row per day, tenant and
//! route) for a spreadsheet. "Savings" are the look-ups answered without a bureau call of their
//! own: cache hits, coalesced and stale answers.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Row;
use super::counts::{COLUMNS, Column, Counts};
use super::store::date_of;

/// What a statement says about one set of counts.
#[derive(Debug, Serialize, PartialEq)]
pub struct Figures {
    /// Calls the bureau took and charged (the bureau's invoice counts these).
    pub bureau_calls: i64,
    pub cache_hits: i64,
    pub coalesced: i64,
    pub stale: i64,
    /// Savings: cache hits + coalesced + stale, answered without a bureau call of their own.
    pub answered_without_bureau: i64,
    /// Share of the answered look-ups that cost no bureau call (0 when none were answered).
    pub savings_share: f64,
    /// Charged calls whose requesters had all gone (included in `bureau_calls`).
    pub abandoned: i64,
    /// Calls the bureau refused (429/503): not charged.
    pub bureau_refused: i64,
    /// Requests answered with an error, in total and by code.
    pub refused: i64,
    pub refused_by_reason: BTreeMap<&'static str, i64>,
}

impl Figures {
    pub fn of(c: &Counts) -> Figures {
        let without = c.answered_without_bureau();
        let answered = c.get(Column::BureauCalls) - c.get(Column::Abandoned) + without;
        Figures {
            bureau_calls: c.get(Column::BureauCalls),
            cache_hits: c.get(Column::CacheHits),
            coalesced: c.get(Column::Coalesced),
            stale: c.get(Column::Stale),
            answered_without_bureau: without,
            savings_share: if answered > 0 { round4(without as f64 / answered as f64) } else { 0.0 },
            abandoned: c.get(Column::Abandoned),
            bureau_refused: c.get(Column::BureauRefused),
            refused: c.refused(),
            refused_by_reason: crate::respond::ErrorKind::ALL
                .iter()
                .map(|k| (k.code(), c.get(Column::Refused(*k))))
                .filter(|(_, n)| *n != 0)
                .collect(),
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[derive(Debug, Serialize)]
pub struct Statement {
    pub from: String,
    pub to: String,
    /// The offset whose local days the statement counts (`quota.utc_offset`).
    pub utc_offset: String,
    pub totals: Figures,
    pub tenants: Vec<TenantStatement>,
}

#[derive(Debug, Serialize)]
pub struct TenantStatement {
    pub tenant: String,
    pub totals: Figures,
    pub rows: Vec<DayRow>,
}

#[derive(Debug, Serialize)]
pub struct DayRow {
    pub day: String,
    pub route: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// The JSON statement of `rows` (sorted by tenant, day, route), for days `from`..=`to`.
/// `tenants` are listed even with no rows (so a statement shows a tenant's zero).
pub fn statement(from: u32, to: u32, offset: chrono::FixedOffset, tenants: &[String], rows: &[Row]) -> Statement {
    let mut by_tenant: BTreeMap<&str, (Counts, Vec<DayRow>)> =
        tenants.iter().map(|t| (t.as_str(), (Counts::default(), Vec::new()))).collect();
    let mut all = Counts::default();
    for r in rows {
        let (total, list) = by_tenant.entry(&r.tenant).or_default();
        total.merge(&r.counts);
        all.merge(&r.counts);
        list.push(DayRow {
            day: date_of(r.day).to_string(),
            route: r.route.to_string(),
            figures: Figures::of(&r.counts),
        });
    }
    Statement {
        from: date_of(from).to_string(),
        to: date_of(to).to_string(),
        utc_offset: offset.to_string(),
        totals: Figures::of(&all),
        tenants: by_tenant
            .into_iter()
            .map(|(t, (total, rows))| TenantStatement { tenant: t.to_string(), totals: Figures::of(&total), rows })
            .collect(),
    }
}

/// The CSV statement: a header row, then one row per day, tenant and route (no total rows, so a
/// spreadsheet's sums are right); every column always present.
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from("day,tenant,route,answered_without_bureau,refused");
    for i in 0..COLUMNS {
        out.push(',');
        out.push_str(&Column::at(i).name());
    }
    out.push_str("\r\n");
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{}",
            date_of(r.day),
            field(&r.tenant),
            field(&r.route),
            r.counts.answered_without_bureau(),
            r.counts.refused()
        ));
        for n in r.counts.0 {
            out.push_str(&format!(",{n}"));
        }
        out.push_str("\r\n");
    }
    out
}

/// A CSV field, quoted when it must be (RFC 4180); a leading formula character is defused so a
/// spreadsheet shows a tenant id as text.
fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::respond::ErrorKind;

    fn row(day: u32, tenant: &str, route: &str, cols: &[(Column, i64)]) -> Row {
        let mut counts = Counts::default();
        for (c, n) in cols {
            counts.add(*c, *n);
        }
        Row { day, tenant: Arc::from(tenant), route: Arc::from(route), counts }
    }

    #[test]
    fn totals_per_tenant_then_rows_with_savings() {
        let rows = [
            row(20_000, "a", "score", &[(Column::BureauCalls, 6), (Column::CacheHits, 3), (Column::Coalesced, 1)]),
            row(20_001, "a", "score", &[(Column::BureauCalls, 2), (Column::Refused(ErrorKind::RateLimited), 4)]),
        ];
        let kst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
        let s = statement(20_000, 20_001, kst, &["a".into(), "b".into()], &rows);
        assert_eq!(s.tenants.len(), 2, "b has no rows but is listed");
        let a = &s.tenants[0];
        assert_eq!((a.totals.bureau_calls, a.totals.answered_without_bureau, a.totals.refused), (8, 4, 4));
        assert_eq!(a.totals.savings_share, 0.3333);
        assert_eq!(a.totals.refused_by_reason.get("rate_limited"), Some(&4));
        assert_eq!(a.rows[1].day, "2024-10-05");
        assert_eq!(s.tenants[1].totals.bureau_calls, 0);
        assert_eq!(s.utc_offset, "+09:00");
    }

    #[test]
    fn csv_has_a_header_and_one_row_per_day_tenant_route() {
        let rows = [row(20_000, "a,b", "score", &[(Column::BureauCalls, 6), (Column::Stale, 1)])];
        let text = csv(&rows);
        let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 2);
        let header: Vec<&str> = lines[0].split(',').collect();
        assert_eq!(&header[..6], ["day", "tenant", "route", "answered_without_bureau", "refused", "bureau_calls"]);
        assert!(header.contains(&"refused_daily_quota_exhausted"));
        assert!(lines[1].starts_with("2024-10-04,\"a,b\",score,1,0,6,0,0,1,"), "{}", lines[1]);
        assert_eq!(field("=cmd"), "'=cmd");
    }
}
