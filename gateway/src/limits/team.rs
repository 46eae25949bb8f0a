//! The team step: a team's budget is shared by all its consumers across the cluster, but a
//! team's keys and a consumer's may live in different Redis Cluster slots, so no script may
//! touch both. The consumer's reservation (`reserve.lua`: tokens, quota, its own budget) and
//! the team's (`team_reserve.lua`: the team's budget) are two atomic steps, each exact in its
//! own slot; when one refuses, the other is compensated (refunded through the usage worker,
//! by its reservation id, so a refund applies once and a late copy debits nothing).
//!
//! The team step is taken only for teams with a budget: a team seen without one is skipped
//! for [`TEAM_CACHE_MS`] (so an operator's new `tg:team:{T}` budget applies within that).
//! When the team is known before the consumer's reservation answers (a JWT claim, the
//! configuration, or this replica's last admission of the consumer), both steps go to the
//! store at once: one round trip of latency.

use super::reserve::budget_error;
use super::{Ask, Limits, Placement, Reserved};
use crate::error::Error;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate_common::config::OnError;
use tollgate_quota::{
    BudgetScope, BudgetUse, Money, ReservationEnd, Settlement, Store, TeamCharge, TeamDecision,
    TeamReserve,
};

/// How long a team seen without a budget skips the team step.
pub const TEAM_CACHE_MS: u64 = 1_000;
/// Teams (and consumers' teams) remembered before the memory starts over.
const MAX_TEAMS: usize = 100_000;

/// The team step of one request.
#[derive(Clone, Debug)]
pub struct TeamReserved {
    pub team: String,
    /// The team reservation's id (its record in the team's slot); `None` when taken from this
    /// replica's slice of the team's budget ([`super::team_lease`]): no record of its own, so
    /// it settles as a correction of the team's spend.
    pub id: Option<u64>,
    pub budget: BudgetUse,
    /// What the step debited: the request's estimated cost (nano-units).
    pub cost_nano: u64,
}

/// What the team step did.
enum TeamStep {
    NoBudget,
    Reserved(TeamReserved),
    /// Not taken: the store did not answer in time (see [`Limits::team_step`]).
    Skipped,
}

#[derive(Default)]
pub(super) struct Teams {
    /// Team → (has a budget, when last seen, unix ms).
    budgets: Mutex<HashMap<String, (bool, u64)>>,
    /// Consumer → its team at its last admission (lets both steps go at once).
    of_consumer: Mutex<HashMap<String, String>>,
}

impl Teams {
    fn needs_step(&self, team: &str, now_ms: u64) -> bool {
        match self.budgets.lock().get(team) {
            Some((false, seen)) => now_ms.saturating_sub(*seen) >= TEAM_CACHE_MS,
            _ => true,
        }
    }

    fn saw(&self, team: &str, has_budget: bool, now_ms: u64) {
        let mut m = self.budgets.lock();
        if m.len() >= MAX_TEAMS {
            m.clear();
        }
        m.insert(team.to_string(), (has_budget, now_ms));
    }

    /// Whether `team` had a budget when last seen (usage admitted without the store charges
    /// it when it comes back).
    pub(super) fn has_budget(&self, team: &str) -> bool {
        self.budgets.lock().get(team).is_some_and(|(b, _)| *b)
    }

    fn team_of(&self, consumer: &str) -> Option<String> {
        self.of_consumer.lock().get(consumer).cloned()
    }

    fn learn_team(&self, consumer: &str, team: &str) {
        let mut m = self.of_consumer.lock();
        if m.get(consumer).is_some_and(|t| t == team) {
            return;
        }
        if m.len() >= MAX_TEAMS {
            m.clear();
        }
        m.insert(consumer.to_string(), team.to_string());
    }
}

impl Limits {
    /// Reserves a request: the consumer's step (tokens, quota, its own budget) and, when its
    /// team has a budget, the team's step. `team` is the caller's team when a token says it;
    /// otherwise the store's record of the consumer decides.
    pub async fn reserve(
        self: &Arc<Self>,
        ask: Ask<'_>,
        team: Option<&str>,
    ) -> Result<Reserved, Error> {
        let (consumer, cost_nano) = (ask.consumer, ask.cost_nano);
        let now = self.clock.now_ms();
        let guess = team
            .map(str::to_string)
            .or_else(|| self.teams.team_of(consumer))
            .or_else(|| self.seeds.record(consumer).map(|r| r.team.clone()))
            .filter(|t| !t.is_empty() && self.teams.needs_step(t, now));
        let consumer_step = self.reserve_consumer(&ask);
        let (first, early) = match &guess {
            Some(t) => {
                let (c, t) = tokio::join!(consumer_step, self.team_step(t, cost_nano));
                (c, Some((guess.clone().unwrap_or_default(), t)))
            }
            None => (consumer_step.await, None),
        };
        let mut reserved = match first {
            Ok(r) => r,
            Err(e) => {
                if let Some((t, Ok(TeamStep::Reserved(step)))) = early {
                    self.compensate_team(consumer, &t, &step);
                }
                return Err(e);
            }
        };
        let actual = team
            .map(str::to_string)
            .unwrap_or_else(|| reserved.admission.team.clone());
        if team.is_none() && !actual.is_empty() {
            self.teams.learn_team(consumer, &actual);
        }
        let step = match early {
            Some((t, step)) if t == actual => step,
            other => {
                // The guess was wrong (the consumer moved team): undo it, take the right one.
                if let Some((t, Ok(TeamStep::Reserved(step)))) = other {
                    self.compensate_team(consumer, &t, &step);
                }
                if actual.is_empty() || !self.teams.needs_step(&actual, now) {
                    return Ok(reserved);
                }
                self.team_step(&actual, cost_nano).await
            }
        };
        match step {
            Ok(TeamStep::NoBudget) => Ok(reserved),
            Ok(TeamStep::Reserved(step)) => {
                reserved.team = Some(step);
                Ok(reserved)
            }
            Ok(TeamStep::Skipped) => {
                reserved.charge_team = Some(actual);
                Ok(reserved)
            }
            Err(e) => {
                self.compensate(consumer, &reserved);
                Err(e)
            }
        }
    }

    /// The team's step. When the store does not answer in time, a team this replica knows to
    /// have a budget is refused under `escrow` and `fail_closed` (no allowance of the team's
    /// money was obtained before the fault); any other team is admitted without the step, its
    /// cost charged to the team at settle (a slow link must not stop consumers whose team has
    /// no budget).
    async fn team_step(self: &Arc<Self>, team: &str, cost_nano: u64) -> Result<TeamStep, Error> {
        // A busy team's slice on this replica covers it without a store call.
        let wants_lease = match self.take_team_lease(team, cost_nano) {
            Ok(step) => return Ok(TeamStep::Reserved(step)),
            Err(ask) => ask,
        };
        let step = self.team_step_in_store(team, cost_nano).await;
        if wants_lease {
            match &step {
                Ok(TeamStep::Reserved(_)) => self.clone().acquire_team_lease(team.to_string()),
                _ => self.no_team_lease(team),
            }
        }
        step
    }

    /// The team's step with one store call.
    async fn team_step_in_store(&self, team: &str, cost_nano: u64) -> Result<TeamStep, Error> {
        // The team's keys are tagged with its id, so they live in the slot of that id.
        if !self.try_shared(self.consumer_part(team)) {
            // The store failed moments ago: no call until it is retried.
            return self.team_step_failed(team);
        }
        let req = TeamReserve {
            team,
            cost_nano,
            id: tollgate_quota::new_reservation_id(),
            background: false,
        };
        let now = self.clock.now_ms();
        match self.hedged_team(&req).await {
            Ok(TeamDecision::NoBudget) => {
                self.teams.saw(team, false, now);
                Ok(TeamStep::NoBudget)
            }
            Ok(TeamDecision::Admitted(budget)) => {
                self.teams.saw(team, true, now);
                self.saw_team_budget(team, &budget);
                Ok(TeamStep::Reserved(TeamReserved {
                    team: team.to_string(),
                    id: Some(req.id),
                    budget,
                    cost_nano,
                }))
            }
            Ok(TeamDecision::Exceeded(r)) => {
                self.teams.saw(team, true, now);
                Err(budget_error(
                    BudgetScope::Team,
                    team,
                    &r,
                    &self.policy.currency,
                ))
            }
            Ok(TeamDecision::Cancelled) => Err(Error::StoreUnavailable),
            Err(e) => {
                // Not marked as a store failure: that would let this replica spend expired
                // leases under escrow; the team step's own policy is `team_step_failed`.
                tracing::debug!(team, error = %e, "team step got no answer");
                // It may still run when the store wakes: have it refunded.
                self.abandoned.lock().push(team_refund(team, team, req.id));
                self.team_step_failed(team)
            }
        }
    }

    /// The team step with the hot deadline, sent once more (same id: it debits once) when it
    /// is not answered within half of it, like the consumer's reserve: slow is not down.
    async fn hedged_team(
        &self,
        req: &TeamReserve<'_>,
    ) -> Result<TeamDecision, tollgate_quota::Error> {
        let first = self.store.reserve_team(req);
        tokio::pin!(first);
        let first_failed = tokio::select! {
            r = &mut first => match r {
                Ok(d) => return Ok(d),
                Err(_) => true,
            },
            _ = tokio::time::sleep(self.policy.timeout / 2) => false,
        };
        let second = self.store.reserve_team(req);
        if first_failed {
            return second.await;
        }
        tokio::pin!(second);
        tokio::select! {
            r = &mut first => match r {
                Ok(d) => Ok(d),
                Err(_) => second.await,
            },
            r = &mut second => match r {
                Ok(d) => Ok(d),
                Err(_) => first.await,
            },
        }
    }

    fn team_step_failed(&self, team: &str) -> Result<TeamStep, Error> {
        match self.policy.on_error {
            OnError::Escrow | OnError::FailClosed if self.teams.has_budget(team) => {
                Err(Error::StoreUnavailable)
            }
            _ => Ok(TeamStep::Skipped),
        }
    }

    /// Undoes a team step whose request was not admitted.
    fn compensate_team(&self, consumer: &str, team: &str, step: &TeamReserved) {
        match step.id {
            Some(id) => self.abandoned.lock().push(team_refund(consumer, team, id)),
            None => self.untake_team_lease(team, step.cost_nano),
        }
    }

    /// Undoes a consumer's reservation whose request was not admitted (its team refused).
    pub(super) fn compensate(&self, consumer: &str, r: &Reserved) {
        match (r.place, r.end) {
            (Placement::Shared, ReservationEnd::Settled { id, .. }) => self.abandon(consumer, id),
            // Served from a lease: give the tokens back to the store.
            (Placement::Shared, ReservationEnd::None) => {
                self.abandoned
                    .lock()
                    .push(unused(consumer, r, Money::default()))
            }
            (Placement::Local, _) => {
                let money = Money {
                    reserved: r.cost_nano,
                    actual: 0,
                    window: r.admission.budget.map_or(0, |b| b.window),
                    team: None,
                };
                let s = unused(consumer, r, money);
                let _ = futures::FutureExt::now_or_never(
                    self.local.settle(tollgate_quota::new_batch_id(), &[s]),
                );
            }
            _ => {}
        }
    }

    /// The consumer's team as this replica last saw it admitted.
    pub fn known_team(&self, consumer: &str) -> Option<String> {
        self.teams.team_of(consumer)
    }

    /// Whether usage admitted without the store should be charged to `team`'s budget once it
    /// is back (the team had a budget when last seen).
    pub fn team_has_budget(&self, team: &str) -> bool {
        self.teams.has_budget(team)
    }
}

/// A settlement that refunds a team step by its id (whatever it debited, if it ran).
pub(super) fn team_refund(consumer: &str, team: &str, id: u64) -> Settlement {
    team_only(
        consumer,
        TeamCharge {
            team: team.to_string(),
            end: ReservationEnd::Abandoned { id },
            window: 0,
            reserved: 0,
        },
    )
}

/// A settlement that moves only a team's budget (`charge`); the consumer's part is empty.
pub(super) fn team_only(consumer: &str, charge: TeamCharge) -> Settlement {
    Settlement {
        consumer: consumer.to_string(),
        end: ReservationEnd::None,
        reserved: 0,
        actual: 0,
        window: 0,
        tpm: None,
        usage: None,
        money: Money {
            team: Some(charge),
            ..Money::default()
        },
    }
}

#[cfg(test)]
#[path = "team_tests.rs"]
mod tests;

/// Gives back a reservation nothing was served for: all its tokens, and `money` as given.
fn unused(consumer: &str, r: &Reserved, money: Money) -> Settlement {
    Settlement {
        consumer: consumer.to_string(),
        end: ReservationEnd::None,
        reserved: r.tokens,
        actual: 0,
        window: r.admission.window,
        tpm: r.admission.tpm,
        usage: None,
        money,
    }
}
