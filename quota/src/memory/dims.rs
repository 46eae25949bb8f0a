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
        let day = self.days.entry((consumer.to_string(), u.day)).or_default();
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
