//! Per-dimension usage in memory: the twin of the `dims` part of `settle.lua`. A dimension
//! keeps at most `cap` distinct values per consumer and day; later values count as `other`.

use crate::model::*;
use std::collections::{BTreeMap, HashMap, HashSet};

/// One consumer's dimension usage on one day (`tg:dims:{ID}:YYYYMMDD`).
#[derive(Default)]
pub(super) struct DayDims {
    /// The values kept per dimension (`#v|<dim>|<value>`; their count is `#n|<dim>`).
    kept: HashMap<String, HashSet<String>>,
    /// Counters per (dimension, value, team).
    rows: HashMap<(String, String, String), UsageCounts>,
}

/// Every consumer's dimension usage, by (consumer, day).
#[derive(Default)]
pub(super) struct Dims {
    days: HashMap<(String, u32), DayDims>,
}

impl Dims {
    /// Adds one request's usage under each of its dimension values.
    pub(super) fn add(&mut self, consumer: &str, u: &UsageDelta) {
        let Some(d) = &u.dims else { return };
        let key = (consumer.to_string(), u.day);
        if !self.days.contains_key(&key) {
            // A new day: forget the days past the retention, as their keys' TTL does in Redis.
            let oldest = first_kept_day(u.day, d.retention_days);
            self.days.retain(|(_, day), _| *day >= oldest);
        }
        let day = self.days.entry(key).or_default();
        for (dim, value) in &d.values {
            let kept = day.kept.entry(dim.clone()).or_default();
            let value = if value == OTHER_DIM_VALUE
                || kept.contains(value)
                || (kept.len() as u64) < u64::from(d.cap) && kept.insert(value.clone())
            {
                value.as_str()
            } else {
                OTHER_DIM_VALUE
            };
            let k = (dim.clone(), value.to_string(), u.team.clone());
            day.rows.entry(k).or_default().add(&u.counts);
        }
    }

    /// The rows of `since..=until`, ordered like the Redis store's.
    pub(super) fn rows(&self, since: u32, until: u32) -> Vec<DimRow> {
        let mut out: BTreeMap<(u32, &str, &str, &str, &str), UsageCounts> = BTreeMap::new();
        for ((consumer, day), d) in &self.days {
            if *day < since || *day > until {
                continue;
            }
            for ((dim, value, team), c) in &d.rows {
                *out.entry((*day, consumer, dim, value, team)).or_default() = *c;
            }
        }
        out.into_iter()
            .map(|((day, consumer, dim, value, team), counts)| DimRow {
                day,
                consumer: consumer.into(),
                team: team.into(),
                dimension: dim.into(),
                value: value.into(),
                counts,
            })
            .collect()
    }
}

/// The first `YYYYMMDD` still kept on `day` with `retention_days` of retention.
fn first_kept_day(day: u32, retention_days: u32) -> u32 {
    let Some(date) =
        chrono::NaiveDate::from_ymd_opt((day / 10_000) as i32, day / 100 % 100, day % 100)
    else {
        return 0;
    };
    let first = date - chrono::Days::new(u64::from(retention_days.max(1)) - 1);
    use chrono::Datelike;
    first.year() as u32 * 10_000 + first.month() * 100 + first.day()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(day: u32, user: &str) -> UsageDelta {
        UsageDelta {
            day,
            team: "t".into(),
            counts: UsageCounts {
                requests: 1,
                ..Default::default()
            },
            dims: Some(DimUsage {
                values: vec![("user".into(), user.into())],
                cap: 10,
                retention_days: 35,
            }),
            ..Default::default()
        }
    }

    /// Days past the retention are forgotten once a new day is written, like expired keys.
    #[test]
    fn old_days_expire() {
        assert_eq!(first_kept_day(20260305, 35), 20260130);
        assert_eq!(first_kept_day(20260101, 1), 20260101);
        let mut d = Dims::default();
        d.add("c", &delta(20260101, "a"));
        d.add("c", &delta(20260204, "b"));
        assert_eq!(d.rows(0, 99999999).len(), 2, "34 days apart: both kept");
        d.add("c", &delta(20260205, "c"));
        let days: Vec<u32> = d.rows(0, 99999999).iter().map(|r| r.day).collect();
        assert_eq!(days, [20260204, 20260205]);
    }
}
