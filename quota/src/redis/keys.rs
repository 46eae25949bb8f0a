//! The whole key schema, in one place: every name here is documented in `docs/REDIS.md` and is
//! a contract (operators' `redis-cli` commands and scripts use it). Per-consumer and per-backend
//! keys put the id in a `{hash tag}` so that every script touches one slot.

/// The pub/sub channel of circuit changes.
pub const BREAKER_CHANNEL: &str = "tg:breaker";

/// Metric names of the usage hash fields, in [`UsageCounts`](crate::UsageCounts) order.
pub(super) const METRICS: [&str; 7] = ["in", "out", "cached", "req", "cost", "saved", "savedcost"];

/// Set once every configured consumer was seeded; gone when Redis lost its data.
pub(super) const SEEDED_KEY: &str = "tg:seeded";

/// The live replicas (one key, not hash-tagged: only `heartbeat.lua` touches it).
pub(super) const REPLICAS_KEY: &str = "tg:replicas";

pub(super) fn consumer_key(id: &str) -> String {
    ["tg:consumer:{", id, "}"].concat()
}

pub(super) fn bucket_key(id: &str) -> String {
    ["tg:bucket:{", id, "}"].concat()
}

pub(super) fn quota_key(id: &str) -> String {
    ["tg:quota:{", id, "}"].concat()
}

/// A consumer's MCP tool calls of the last minute (a sorted set scored by time).
pub(super) fn tool_rate_key(id: &str) -> String {
    ["tg:toolrate:{", id, "}"].concat()
}

/// A consumer's MCP tool calls in its quota window (`w`, `used`).
pub(super) fn tool_quota_key(id: &str) -> String {
    ["tg:toolquota:{", id, "}"].concat()
}

/// A consumer's budget spend (`w`, `spent` in nano-units).
pub(super) fn spend_key(id: &str) -> String {
    ["tg:spend:{", id, "}"].concat()
}

/// A team's record (its budget), the admin hash.
pub(super) fn team_key(team: &str) -> String {
    ["tg:team:{", team, "}"].concat()
}

/// A team's budget spend (`w`, `spent` in nano-units).
pub(super) fn team_spend_key(team: &str) -> String {
    ["tg:teamspend:{", team, "}"].concat()
}

/// A team step's reservation record.
pub(super) fn team_reservation_key(team: &str, reservation: u64) -> String {
    format!("tg:tresv:{{{team}}}:{reservation:x}")
}

/// The applied-once marker of a settle batch's team corrections (a name of its own: a team and
/// a consumer may share an id, and so a hash tag).
pub(super) fn team_settled_key(team: &str, batch_id: u64) -> String {
    format!("tg:tsettled:{{{team}}}:{batch_id:x}")
}

/// An alert's once-per-window claim.
pub(super) fn alert_key(name: &str) -> String {
    ["tg:alert:", name].concat()
}

pub(super) fn reservation_key(id: &str, reservation: u64) -> String {
    format!("tg:resv:{{{id}}}:{reservation:x}")
}

pub(super) fn usage_key(id: &str, day: u32) -> String {
    format!("tg:usage:{{{id}}}:{day}")
}

/// A consumer's tool-call totals of one day: fields `<team>|<server>|<tool>|calls|errors`.
pub(super) fn tool_usage_key(id: &str, day: u32) -> String {
    format!("tg:toolusage:{{{id}}}:{day}")
}

/// A consumer's per-dimension usage of one day (`[telemetry] dimensions`).
pub(super) fn dims_key(id: &str, day: u32) -> String {
    format!("tg:dims:{{{id}}}:{day}")
}

/// Parses `tg:dims:{ID}:YYYYMMDD` into (ID, day).
pub(super) fn parse_dims_key(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix("tg:dims:{")?;
    let (id, day) = rest.rsplit_once("}:")?;
    Some((id, day.parse().ok()?))
}

/// Parses a dimension field `<dimension>|<value>|<team>|<metric>` (counter fields only:
/// the `#`-prefixed bookkeeping fields are not rows).
pub(super) fn parse_dims_field(field: &str) -> Option<(&str, &str, &str, usize)> {
    if field.starts_with('#') {
        return None;
    }
    let (rest, metric) = field.rsplit_once('|')?;
    let metric = METRICS.iter().position(|m| *m == metric)?;
    let (dim, rest) = rest.split_once('|')?;
    let (value, team) = rest.rsplit_once('|')?;
    Some((dim, value, team, metric))
}

pub(super) fn breaker_key(backend: &str) -> String {
    ["tg:breaker:{", backend, "}"].concat()
}

pub(super) fn bfail_key(backend: &str) -> String {
    ["tg:bfail:{", backend, "}"].concat()
}

pub(super) fn seed_keys_key(id: &str) -> String {
    ["tg:seedkeys:{", id, "}"].concat()
}

pub(super) fn api_key(sha: &str) -> String {
    ["tg:key:", sha].concat()
}

/// The applied-once marker of a settle batch.
pub(super) fn settled_key(id: &str, batch_id: u64) -> String {
    format!("tg:settled:{{{id}}}:{batch_id:x}")
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its `{hash tag}` when it has a
/// non-empty one, else of the whole key, modulo 16384. A consumer id is its keys' hash tag, so
/// `key_slot(id)` is the slot of every key of that consumer.
pub(super) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(key) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Parses `tg:usage:{ID}:YYYYMMDD` into (ID, day).
pub(super) fn parse_usage_key(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix("tg:usage:{")?;
    let (id, day) = rest.rsplit_once("}:")?;
    Some((id, day.parse().ok()?))
}

/// Parses a usage field `<team>|<model>|<backend>|<metric>` (the model may contain `|`).
pub(super) fn parse_usage_field(field: &str) -> Option<(&str, &str, &str, usize)> {
    let (rest, metric) = field.rsplit_once('|')?;
    let metric = METRICS.iter().position(|m| *m == metric)?;
    let (team, rest) = rest.split_once('|')?;
    let (model, backend) = rest.rsplit_once('|')?;
    Some((team, model, backend, metric))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Usage keys and fields parse back into their parts; a model may contain `|`.
    #[test]
    fn usage_names_parse() {
        assert_eq!(
            parse_usage_key("tg:usage:{team-a}:20260101"),
            Some(("team-a", 20260101))
        );
        assert_eq!(parse_usage_key("tg:usage:{x}:notaday"), None);
        assert_eq!(
            parse_usage_field("fin|gpt|4o|ptu-1|cost"),
            Some(("fin", "gpt|4o", "ptu-1", 4))
        );
        assert_eq!(parse_usage_field("fin|gpt-4o|ptu-1|bogus"), None);
        assert_eq!(
            parse_dims_key("tg:dims:{a:b}:20261127"),
            Some(("a:b", 20261127))
        );
        assert_eq!(
            parse_dims_field("user|alice@x|fin|out"),
            Some(("user", "alice@x", "fin", 1))
        );
        assert_eq!(parse_dims_field("#n|user"), None);
        assert_eq!(parse_dims_field("#v|user|alice"), None);
    }

    /// Slots match what Redis answers to `CLUSTER KEYSLOT`; every key of a consumer shares
    /// the slot of its id.
    #[test]
    fn slots() {
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), 3443);
        assert_eq!(key_slot(b"{}foo"), 9500);
        let id = "team-a";
        for k in [
            consumer_key(id),
            bucket_key(id),
            quota_key(id),
            usage_key(id, 20260101),
            dims_key(id, 20260101),
        ] {
            assert_eq!(key_slot(k.as_bytes()), key_slot(id.as_bytes()), "{k}");
        }
    }
}
