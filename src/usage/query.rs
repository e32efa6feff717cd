//! `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&tenant=ID][&format=csv|json]`: the query,
//! parsed with a clear message for each mistake (the endpoint answers them 400).

use chrono::NaiveDate;

use super::store::day_of_date;

/// What a statement is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// First and last local day, inclusive.
    pub from: u32,
    pub to: u32,
    pub tenant: Option<String>,
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

/// Parses the query string of `/admin/usage`; `max_days` bounds the span (the retention: older
/// days are not kept).
pub fn parse(query: &str, max_days: u32) -> Result<Query, String> {
    let (mut from, mut to, mut tenant, mut format) = (None, None, None, Format::Json);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8().map_err(|_| format!("{k}: not UTF-8"))?;
        match k {
            "from" => from = Some(date(k, &v)?),
            "to" => to = Some(date(k, &v)?),
            "tenant" if !v.is_empty() => tenant = Some(v.into_owned()),
            "format" => {
                format = match &*v {
                    "json" => Format::Json,
                    "csv" => Format::Csv,
                    other => return Err(format!("format: {other:?} is neither csv nor json")),
                }
            }
            other => return Err(format!("unknown parameter {other:?}; use from, to, tenant, format")),
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        return Err("from and to are required, as YYYY-MM-DD (the quota's local days)".into());
    };
    if from > to {
        return Err(format!("from ({}) is after to ({})", super::store::date_of(from), super::store::date_of(to)));
    }
    if to - from + 1 > max_days {
        return Err(format!("{} days asked; usage.retention keeps {max_days}", to - from + 1));
    }
    Ok(Query { from, to, tenant, format })
}

fn date(key: &str, v: &str) -> Result<u32, String> {
    let d = NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| format!("{key}: {v:?} is not a date; use YYYY-MM-DD, e.g. 2026-12-04"))?;
    if d.format("%Y-%m-%d").to_string() != v {
        return Err(format!("{key}: {v:?} is not a date; use YYYY-MM-DD, e.g. 2026-12-04"));
    }
    if d < NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date") {
        return Err(format!("{key}: {v:?} is before 1970"));
    }
    Ok(day_of_date(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_query_and_every_mistake_with_its_message() {
        let q = parse("from=2026-12-04&to=2026-12-05&tenant=bank%2Da&format=csv", 400).unwrap();
        assert_eq!(q.to - q.from, 1);
        assert_eq!(q.tenant.as_deref(), Some("bank-a"));
        assert_eq!(q.format, Format::Csv);
        assert_eq!(parse("from=2026-12-04&to=2026-12-04", 400).unwrap().format, Format::Json);
        let err = |q: &str| parse(q, 400).unwrap_err();
        assert!(err("from=2026-13-01&to=2026-12-05").contains("from: \"2026-13-01\" is not a date"));
        assert!(err("from=2026-12-4&to=2026-12-05").contains("is not a date"));
        assert!(err("from=2026-12-06&to=2026-12-05").contains("is after to"));
        assert!(err("to=2026-12-05").contains("from and to are required"));
        assert!(err("from=2020-01-01&to=2026-12-05").contains("usage.retention keeps 400"));
        assert!(err("from=2026-12-04&to=2026-12-05&format=xml").contains("neither csv nor json"));
        assert!(err("from=2026-12-04&to=2026-12-05&since=1").contains("unknown parameter \"since\""));
    }
}
