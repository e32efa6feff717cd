//! `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&tenant=ID][&format=csv|json]` and
//! `GET /admin/usage/request?id=ID|client_request_id=ID&tenant=T[&since=YYYY-MM-DD][&limit=N]`:
//! the queries, parsed with a clear message for each mistake (the endpoint answers them 400).

use chrono::NaiveDate;

use super::reconcile::{self, DEFAULT_LIMIT, MAX_LIMIT, Search};
use super::store::day_of_date;

/// What a reconciliation search is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    pub search: Search,
    /// Audit files last written before this (Unix ms, the start of the local day `since`) are
    /// not read.
    pub since_unix_ms: Option<i64>,
    /// At most this many records ([`DEFAULT_LIMIT`] unless asked; 1 to [`MAX_LIMIT`]).
    pub limit: usize,
}

/// Parses the query string of `/admin/usage/request`; `offset` is the quota's UTC offset (the
/// local day `since` starts at).
pub fn parse_search(query: &str, offset: chrono::FixedOffset) -> Result<SearchQuery, String> {
    const USE: &str = "use ?id=REQUEST_ID or ?client_request_id=ID&tenant=TENANT, with [&since=YYYY-MM-DD][&limit=N]";
    let (mut id, mut client, mut tenant, mut since, mut limit) = (None, None, None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8().map_err(|_| format!("{k}: not UTF-8"))?;
        let slot = match k {
            "id" => &mut id,
            "client_request_id" => &mut client,
            "tenant" => &mut tenant,
            "since" => &mut since,
            "limit" => &mut limit,
            other => return Err(format!("unknown parameter {other:?}; {USE}")),
        };
        if slot.replace(v.into_owned()).is_some() {
            return Err(format!("{k} is given twice"));
        }
    }
    let checked = |key: &str, v: String| {
        if reconcile::valid_id(&v) { Ok(v) } else { Err(format!("{key}: a request id is 1-128 of A-Za-z0-9-_.:")) }
    };
    let search = match (id, client, tenant) {
        (Some(id), None, None) => Search::Request(checked("id", id)?),
        (Some(_), None, Some(_)) => {
            return Err("tenant applies to client_request_id only: ?id= searches bureau-guard's own request ids, which are unique".into());
        }
        (None, Some(id), Some(tenant)) if !tenant.is_empty() => {
            Search::Client { id: checked("client_request_id", id)?, tenant }
        }
        (None, Some(_), _) => {
            return Err("client_request_id needs tenant=ID: a bank sets its client ids itself, so they are searched within the tenant that sent them".into());
        }
        (Some(_), Some(_), _) => return Err(format!("give id or client_request_id, not both; {USE}")),
        (None, None, _) => return Err(format!("id or client_request_id is required; {USE}")),
    };
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(format!("limit: {v:?} is not a number from 1 to {MAX_LIMIT}")),
        },
    };
    let since_unix_ms = match since {
        None => None,
        Some(v) => {
            let day = i64::from(date("since", &v)?);
            Some((day * 86_400 - i64::from(offset.local_minus_utc())) * 1000)
        }
    };
    Ok(SearchQuery { search, since_unix_ms, limit })
}

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

    #[test]
    fn a_search_query_and_every_mistake_with_its_message() {
        let kst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
        let q = parse_search("id=feedbeef-01", kst).unwrap();
        assert_eq!((q.search, q.since_unix_ms, q.limit), (Search::Request("feedbeef-01".into()), None, DEFAULT_LIMIT));
        let q = parse_search("client_request_id=bank%2D42&tenant=b&since=1970-01-02&limit=1000", kst).unwrap();
        assert_eq!(q.search, Search::Client { id: "bank-42".into(), tenant: "b".into() });
        assert_eq!(q.since_unix_ms, Some((86_400 - 9 * 3600) * 1000), "the local day's start");
        assert_eq!(q.limit, MAX_LIMIT);
        let err = |q: &str| parse_search(q, kst).unwrap_err();
        assert!(err("client_request_id=x").contains("client_request_id needs tenant=ID"));
        assert!(err("client_request_id=x&tenant=").contains("client_request_id needs tenant=ID"));
        assert!(err("id=x&tenant=b").contains("tenant applies to client_request_id only"));
        assert!(err("id=x&client_request_id=y&tenant=b").contains("not both"));
        assert!(err("").contains("id or client_request_id is required"));
        assert!(err("id=a%20b").contains("id: a request id is 1-128"));
        assert!(err("client_request_id=a%20b&tenant=b").contains("client_request_id: a request id"));
        for bad in ["0", "1001", "-1", "ten", ""] {
            assert!(err(&format!("id=x&limit={bad}")).contains("limit:"), "{bad}");
        }
        assert!(err("id=x&limit=5&limit=6").contains("limit is given twice"));
        assert!(err("id=x&since=2026-12-4").contains("since: \"2026-12-4\" is not a date"));
        assert!(err("id=x&from=2026-12-04").contains("unknown parameter \"from\""));
    }
}
