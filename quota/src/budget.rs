//! Budgets in money: the records and decisions of a consumer's budget (checked in the
//! consumer's own reservation) and a team's budget (a second atomic step in the team's slot).
//!
//! Money is counted in **nano-units** (1e-9 of the price currency) as whole numbers: a budget of
//! 500.0 is 500_000_000_000. Costs are computed in pico-units (tokens × price per 1M in
//! micro-units, as the usage totals) and charged to budgets rounded up to the next nano-unit, so a
//! budget is never charged less than the usage totals say. The Lua scripts hold these counters
//! in doubles: exact up to 9,007,199 currency units per window, within a nano-unit beyond.

pub use tollgate_common::BudgetAction;
use tollgate_common::Period;

/// Nano-units in one unit of the price currency.
pub const NANO_PER_UNIT: f64 = 1e9;

/// A configured amount (currency units, as in `budget = 500.0`) in nano-units, rounded.
pub fn nano_from_units(units: f64) -> u64 {
    if units.is_finite() && units > 0.0 {
        (units * NANO_PER_UNIT).round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// Nano-units as currency units (for headers, messages and gauges).
pub fn units_from_nano(nano: i64) -> f64 {
    nano as f64 / NANO_PER_UNIT
}

/// A cost in pico-units charged to a budget: rounded up to the next nano-unit.
pub fn nano_from_pico(pico: u64) -> u64 {
    pico.div_ceil(1000)
}

/// Whose budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetScope {
    Consumer,
    Team,
}

impl BudgetScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetScope::Consumer => "consumer",
            BudgetScope::Team => "team",
        }
    }
}

/// A budget: so much money per fixed UTC window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub limit_nano: u64,
    pub period: Period,
    pub action: BudgetAction,
}

impl Budget {
    /// The refusal of a blocking budget that `cost` would take past its limit (`spent` so far
    /// in the window ending at `window_end`, unix s), as `reserve.lua` and `team_reserve.lua`
    /// decide it; `None` when the cost fits or the budget only alerts.
    pub fn refuse(
        &self,
        spent: i64,
        cost: i64,
        window_end: u64,
        now_s: u64,
    ) -> Option<BudgetRefusal> {
        (self.action == BudgetAction::Block && spent + cost > self.limit_nano as i64).then(|| {
            BudgetRefusal {
                retry_after_ms: window_end.saturating_sub(now_s).max(1) * 1000,
                remaining_nano: self.limit_nano as i64 - spent,
                limit_nano: self.limit_nano,
                period: self.period,
            }
        })
    }
}

/// A budget as a reservation left it: the spend includes this reservation's estimate (and every
/// other reservation in flight), so it is what may be spent at most once they settle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetUse {
    pub limit_nano: u64,
    pub spent_nano: i64,
    /// Start and end (unix seconds) of the window counted.
    pub window: u64,
    pub window_end: u64,
    pub period: Period,
    pub action: BudgetAction,
}

impl BudgetUse {
    pub fn remaining_nano(&self) -> i64 {
        self.limit_nano as i64 - self.spent_nano
    }

    /// Spend as a fraction of the budget (≥ 1 when spent; 1 for a zero budget).
    pub fn fraction(&self) -> f64 {
        if self.limit_nano == 0 {
            return 1.0;
        }
        self.spent_nano.max(0) as f64 / self.limit_nano as f64
    }
}

/// A budget that refused a reservation; nothing was debited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetRefusal {
    /// Until the window ends.
    pub retry_after_ms: u64,
    /// What is left (a cheaper request would still pass).
    pub remaining_nano: i64,
    pub limit_nano: u64,
    pub period: Period,
}

/// A team as the store holds it (`tg:team:{id}` in Redis).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TeamRecord {
    pub id: String,
    /// `None`: the team has no budget, and its consumers skip the team step.
    pub budget: Option<Budget>,
}

/// The team step of a reservation: the team's budget, in the team's own slot.
#[derive(Clone, Debug)]
pub struct TeamReserve<'a> {
    pub team: &'a str,
    /// The estimate to debit (nano-units).
    pub cost_nano: u64,
    /// A reservation id of its own (the team's record), applied once like the consumer's.
    pub id: u64,
    pub background: bool,
}

/// The outcome of the team step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TeamDecision {
    /// The team has no budget: nothing debited, nothing to settle.
    NoBudget,
    Admitted(BudgetUse),
    /// The team's budget lacks the estimate (and its action is `block`); nothing debited.
    Exceeded(BudgetRefusal),
    /// This reservation id was abandoned before the store saw it.
    Cancelled,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Amounts round to the nano-unit; costs round up; bad amounts are zero.
    #[test]
    fn money_units() {
        assert_eq!(nano_from_units(500.0), 500_000_000_000);
        assert_eq!(nano_from_units(0.1), 100_000_000);
        assert_eq!(nano_from_units(f64::NAN), 0);
        assert_eq!(nano_from_units(-1.0), 0);
        assert_eq!(nano_from_pico(1), 1);
        assert_eq!(nano_from_pico(1000), 1);
        assert_eq!(nano_from_pico(1001), 2);
        assert_eq!(units_from_nano(1_500_000_000), 1.5);
        let u = BudgetUse {
            limit_nano: 100,
            spent_nano: 80,
            window: 0,
            window_end: 1,
            period: Period::Day,
            action: BudgetAction::Block,
        };
        assert_eq!((u.remaining_nano(), u.fraction()), (20, 0.8));
    }
}
