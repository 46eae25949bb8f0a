//! Team leases: slices of a busy team's budget that a replica debits in the store ahead of use
//! (a normal team reservation, `team_reserve.lua`, so the cluster can never spend more than
//! the budget), then admits the team's requests from without a store call until the slice is
//! spent or [`LEASE_MS`] old; what is left goes back (the slice's record settled with the
//! unused part as its correction). The consumer's token leases ([`super::lease`]) are the
//! same design; without this, every request of a team with a budget made one store round trip
//! even when its consumer was served from a lease.
//!
//! Money stays exact: the slice is debited once; each request from it settles `actual -
//! estimate` against the team's spend (its `TeamCharge::reserved` is the estimate); the
//! unused rest is refunded on return. While slices are out, the team's spend in the store
//! counts them as spent, so a team near its budget may be refused up to one slice early on
//! another replica, never admitted beyond it. An operator's change to the budget applies
//! within [`LEASE_MS`].

use super::Limits;
use super::lease::{Demand, LEASE_MS};
use super::team::TeamReserved;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tollgate_quota::{
    BudgetUse, ReservationEnd, Settlement, Store, TeamCharge, TeamDecision, TeamReserve,
};

/// One leased slice of a team's budget.
pub struct TeamLease {
    /// The store's reservation id of the slice (its record in the team's slot).
    pub id: u64,
    /// Nano-units of the slice not yet spent.
    pub left: u64,
    pub expires_ms: u64,
    /// The team's budget as the slice's reservation found it (the slice counted as spent).
    pub budget: BudgetUse,
}

/// What a request found.
pub enum TeamTake {
    /// Admitted from the slice: the team's budget with what the slice still holds counted
    /// as remaining.
    Admitted(BudgetUse),
    /// No slice covers it. `ask`: the team is busy and nobody is asking for a slice yet (the
    /// caller now is: it must call [`TeamLeases::asked`] when done).
    Miss { ask: bool },
}

#[derive(Default)]
pub struct TeamLeases {
    active: HashMap<String, TeamLease>,
    demand: HashMap<String, Demand>,
    /// What the team had left when last seen (sizes the next slice).
    remaining: HashMap<String, i64>,
    asking: HashSet<String>,
    /// Expired slices the store did not take back yet (retried with the next sweep).
    unreturned: Vec<(String, TeamLease)>,
}

impl TeamLeases {
    /// Counts the request's estimated cost and admits it from the team's slice when it covers
    /// it.
    pub fn take(&mut self, team: &str, cost_nano: u64, now_ms: u64) -> TeamTake {
        self.demand
            .entry(team.to_string())
            .or_default()
            .record(now_ms, cost_nano);
        if let Some(l) = self.active.get_mut(team)
            && l.expires_ms > now_ms
            && l.left >= cost_nano
        {
            l.left -= cost_nano;
            let mut budget = l.budget;
            budget.spent_nano -= l.left as i64;
            return TeamTake::Admitted(budget);
        }
        let busy = self.demand.get(team).is_some_and(Demand::busy);
        let ask = busy && self.asking.insert(team.to_string());
        TeamTake::Miss { ask }
    }

    /// Gives a taken estimate back to the slice (the request was not admitted after all).
    pub fn untake(&mut self, team: &str, cost_nano: u64) {
        if let Some(l) = self.active.get_mut(team) {
            l.left += cost_nano;
        }
    }

    /// Remembers what the team's budget had left as the store last answered.
    pub fn saw(&mut self, team: &str, budget: &BudgetUse) {
        if let Some(r) = self.remaining.get_mut(team) {
            *r = budget.remaining_nano();
        } else if self.remaining.len() < 100_000 {
            self.remaining
                .insert(team.to_string(), budget.remaining_nano());
        }
    }

    /// The size of the next slice: a quarter second of the team's recent demand on this
    /// replica, at most 1/50 of what the budget had left when last seen.
    pub fn size(&self, team: &str) -> u64 {
        let mut size = self.demand.get(team).map_or(0, Demand::quarter_second);
        if let Some(r) = self.remaining.get(team) {
            size = size.min(r.max(&0).unsigned_abs() / 50);
        }
        size
    }

    /// The ask for `team` is over; a granted slice replaces the old one, which is returned.
    pub fn asked(&mut self, team: &str, granted: Option<TeamLease>) -> Option<TeamLease> {
        self.asking.remove(team);
        granted.and_then(|l| self.active.insert(team.to_string(), l))
    }

    /// Takes the slices expired by `now_ms` (all of them with `all`), to be returned.
    pub fn expired(&mut self, now_ms: u64, all: bool) -> Vec<(String, TeamLease)> {
        let teams: Vec<String> = self
            .active
            .iter()
            .filter(|(_, l)| all || l.expires_ms <= now_ms)
            .map(|(t, _)| t.clone())
            .collect();
        self.demand.retain(|_, d| !d.idle(now_ms));
        let demand = &self.demand;
        self.remaining.retain(|t, _| demand.contains_key(t));
        let mut out = std::mem::take(&mut self.unreturned);
        out.extend(
            teams
                .into_iter()
                .filter_map(|t| self.active.remove(&t).map(|l| (t, l))),
        );
        out
    }

    /// Slices the store could not take back, returned with the next sweep (never spent
    /// again: the team's requests go to the store meanwhile).
    pub fn put_back(&mut self, slices: Vec<(String, TeamLease)>) {
        self.unreturned.extend(slices);
    }
}

impl Limits {
    /// The team's step from this replica's slice, or whether to ask for one (`Err(true)`: the
    /// team is busy and the caller is the one asking).
    pub(super) fn take_team_lease(&self, team: &str, cost_nano: u64) -> Result<TeamReserved, bool> {
        let Some(leases) = &self.team_leases else {
            return Err(false);
        };
        match leases.lock().take(team, cost_nano, self.clock.now_ms()) {
            TeamTake::Admitted(budget) => Ok(TeamReserved {
                team: team.to_string(),
                id: None,
                budget,
                cost_nano,
            }),
            TeamTake::Miss { ask } => Err(ask),
        }
    }

    pub(super) fn untake_team_lease(&self, team: &str, cost_nano: u64) {
        if let Some(leases) = &self.team_leases {
            leases.lock().untake(team, cost_nano);
        }
    }

    pub(super) fn saw_team_budget(&self, team: &str, budget: &BudgetUse) {
        if let Some(leases) = &self.team_leases {
            leases.lock().saw(team, budget);
        }
    }

    /// The ask for a slice is over without one (the team's own step was not admitted).
    pub(super) fn no_team_lease(&self, team: &str) {
        if let Some(leases) = &self.team_leases {
            leases.lock().asked(team, None);
        }
    }

    /// Reserves a slice of the team's budget in the background (with the background
    /// deadline: slow is not down).
    pub(super) fn acquire_team_lease(self: Arc<Self>, team: String) {
        tokio::spawn(async move {
            let Some(leases) = &self.team_leases else {
                return;
            };
            let size = leases.lock().size(&team);
            let mut granted = None;
            if size > 0 {
                let id = tollgate_quota::new_reservation_id();
                let req = TeamReserve {
                    team: &team,
                    cost_nano: size,
                    id,
                    background: true,
                };
                match self.store.reserve_team(&req).await {
                    Ok(TeamDecision::Admitted(budget)) => {
                        leases.lock().saw(&team, &budget);
                        granted = Some(TeamLease {
                            id,
                            left: size,
                            expires_ms: self.clock.now_ms() + LEASE_MS,
                            budget,
                        });
                    }
                    // Refused, or no budget (any more): nothing was debited.
                    Ok(d) => tracing::debug!(%team, size, decision = ?d, "team slice refused"),
                    Err(e) => {
                        tracing::debug!(%team, size, error = %e, "team slice not granted");
                        // It may still run when the store wakes: have it refunded.
                        self.abandoned
                            .lock()
                            .push(super::team::team_refund(&team, &team, id));
                    }
                }
            }
            let old = leases.lock().asked(&team, granted);
            if let Some(old) = old
                && let Err(kept) = self.return_team_leases(vec![(team, old)]).await
            {
                leases.lock().put_back(kept);
            }
        });
    }

    /// Returns what expired slices (all of them with `all`) did not spend.
    pub(super) async fn sweep_team_leases(&self, all: bool) {
        let Some(leases) = &self.team_leases else {
            return;
        };
        let expired = leases.lock().expired(self.clock.now_ms(), all);
        if let Err(kept) = self.return_team_leases(expired).await
            && !all
        {
            leases.lock().put_back(kept);
        }
    }

    /// Settles slices' records, the unused part as a refund (one settle batch, retried with
    /// its id); on failure hands the slices back.
    async fn return_team_leases(
        &self,
        slices: Vec<(String, TeamLease)>,
    ) -> Result<(), Vec<(String, TeamLease)>> {
        if slices.is_empty() {
            return Ok(());
        }
        let batch: Vec<Settlement> = slices
            .iter()
            .map(|(team, l)| {
                let charge = TeamCharge {
                    team: team.clone(),
                    end: ReservationEnd::Settled {
                        id: l.id,
                        retried: false,
                    },
                    window: l.budget.window,
                    reserved: l.left,
                };
                super::team::team_only(team, charge)
            })
            .collect();
        if self.settle_returned(&batch).await {
            return Ok(());
        }
        // An unreturned slice only makes the team's budget look more spent for a while.
        tracing::debug!(
            slices = batch.len(),
            "could not return unused team slices yet"
        );
        Err(slices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_common::types::{BudgetAction, Period};

    fn budget(limit: u64, spent: i64) -> BudgetUse {
        BudgetUse {
            limit_nano: limit,
            spent_nano: spent,
            window: 100,
            window_end: 200,
            period: Period::Month,
            action: BudgetAction::Block,
        }
    }

    /// A team becomes busy at 20 requests a second; one ask at a time; a slice admits what it
    /// covers until spent or expired; a request given back restores the slice; expired slices
    /// are handed out once for return.
    #[test]
    fn team_lease_arithmetic() {
        let mut l = TeamLeases::default();
        for i in 0..19 {
            assert!(matches!(
                l.take("t", 1_000, 1_000 + i),
                TeamTake::Miss { ask: false }
            ));
        }
        assert!(matches!(
            l.take("t", 1_000, 1_019),
            TeamTake::Miss { ask: true }
        ));
        assert!(matches!(
            l.take("t", 1_000, 1_020),
            TeamTake::Miss { ask: false }
        ));
        // 21 requests × 1000 this second: a quarter is 5250; unknown budget: no other cap.
        assert_eq!(l.size("t"), 5_250);
        l.saw("t", &budget(1_000_000, 900_000));
        assert_eq!(l.size("t"), 2_000, "1/50 of the 100,000 left");

        let slice = TeamLease {
            id: 9,
            left: 2_500,
            expires_ms: 1_300,
            budget: budget(1_000_000, 902_500),
        };
        assert!(l.asked("t", Some(slice)).is_none());
        match l.take("t", 1_000, 1_100) {
            TeamTake::Admitted(b) => assert_eq!(b.remaining_nano(), 97_500 + 1_500),
            _ => panic!("the slice covers it"),
        }
        assert!(matches!(l.take("t", 1_000, 1_100), TeamTake::Admitted(_)));
        assert!(
            matches!(l.take("t", 1_000, 1_100), TeamTake::Miss { .. }),
            "500 left is not enough"
        );
        l.untake("t", 1_000);
        assert!(matches!(l.take("t", 1_000, 1_200), TeamTake::Admitted(_)));
        assert!(
            matches!(l.take("t", 100, 1_300), TeamTake::Miss { .. }),
            "expired"
        );
        let back = l.expired(1_300, false);
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].1.id, back[0].1.left), (9, 500));
        assert!(l.expired(1_300, true).is_empty());
    }
}
