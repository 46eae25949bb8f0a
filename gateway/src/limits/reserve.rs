//! The reservation: from this replica's lease when a busy consumer has one, else one store
//! call, sent once more with the same id when it is slow (slow is not down), abandoned (to be
//! refunded) when it gets no answer, and the failure policy when the store is unreachable.

use super::lease::{Key, LEASE_MS, Lease, Take};
use super::{Ask, Limits, Placement, Reserved};
use crate::error::Error;
use std::sync::Arc;
use std::time::Duration;
use tollgate_common::config::OnError;
use tollgate_quota::{
    Admission, BudgetRefusal, BudgetScope, Decision, LimitDefaults, ReservationEnd, ReserveRequest,
    Settlement, Store, units_from_nano,
};

impl Limits {
    /// Debits `tokens` (and `cost_nano` from the consumer's budget) for the consumer, or says
    /// why not: from this replica's lease when the consumer is busy and has one (never when
    /// it has a budget), else with one store call.
    pub(super) async fn reserve_consumer(
        self: &Arc<Self>,
        ask: &Ask<'_>,
    ) -> Result<Reserved, Error> {
        let Some(leases) = &self.leases else {
            return self.reserve_direct(ask).await;
        };
        let Ask {
            consumer,
            model,
            tokens,
            require_record,
            ..
        } = *ask;
        let key: Key = (consumer.to_string(), model.to_string());
        // While the store is unreachable under escrow, what a lease still holds is spent even
        // past its age: it is debited in the store, and admin changes cannot be read anyway.
        let escrow_degraded = self.policy.on_error == OnError::Escrow
            && self.health.degraded_in(self.consumer_part(consumer));
        let wants_lease =
            match leases
                .lock()
                .take(&key, tokens, self.clock.now_ms(), escrow_degraded)
            {
                Take::Admitted(admission) => {
                    return Ok(Reserved {
                        admission,
                        tokens,
                        cost_nano: 0,
                        place: Placement::Shared,
                        end: ReservationEnd::None,
                        team: None,
                        charge_team: None,
                    });
                }
                Take::Miss { ask: wants } => wants,
            };
        let r = self.reserve_direct(ask).await;
        if let Ok(res) = &r
            && res.place == Placement::Shared
        {
            leases.lock().admitted(consumer, &res.admission);
        }
        // A busy consumer asks for a lease: after an admission, or when the store was too slow
        // for this request (a lease is reserved with the background deadline: slow is not down).
        let may_lease = match &r {
            Ok(res) => res.place == Placement::Shared,
            Err(Error::StoreUnavailable) => self.policy.on_error == OnError::Escrow,
            Err(_) => false,
        };
        if wants_lease {
            if may_lease {
                self.clone().acquire_lease(key, require_record);
            } else {
                leases.lock().asked(&key, None);
            }
        }
        r
    }

    /// Reserves a lease in the background.
    fn acquire_lease(self: Arc<Self>, key: Key, require_record: bool) {
        tokio::spawn(async move {
            let Some(leases) = &self.leases else { return };
            let size = leases.lock().size(&key);
            tracing::debug!(consumer = %key.0, size, "asking for a lease");
            let mut granted = None;
            if size > 0 {
                let id = tollgate_quota::new_reservation_id();
                let req = ReserveRequest {
                    consumer: &key.0,
                    model: &key.1,
                    tokens: size,
                    defaults: &self.policy.defaults,
                    require_record,
                    id,
                    background: true,
                    cost_nano: 0,
                };
                match self.store.reserve(&req).await {
                    Ok(Decision::Admitted(a)) if a.budget.is_some() => {
                        // A consumer with a budget is never served from a lease (its requests'
                        // money must be reserved one by one): give the slice back at once.
                        leases.lock().admitted(&key.0, &a);
                        let slice = Lease {
                            id,
                            model: key.1.clone(),
                            left: size,
                            expires_ms: 0,
                            admission: a,
                        };
                        if let Err(kept) = self.return_leases(vec![(key.0.clone(), slice)]).await {
                            leases.lock().put_back(kept);
                        }
                    }
                    Ok(Decision::Admitted(a)) => {
                        leases.lock().admitted(&key.0, &a);
                        granted = Some(Lease {
                            id,
                            model: key.1.clone(),
                            left: size,
                            expires_ms: self.clock.now_ms() + LEASE_MS,
                            admission: a,
                        });
                    }
                    Ok(d) => {
                        tracing::debug!(consumer = %key.0, size, decision = ?d, "lease refused");
                        // What the store said stands for this replica's next requests too.
                        self.remember(&key.0, &d);
                    }
                    Err(e) => {
                        tracing::debug!(consumer = %key.0, size, error = %e, "lease not granted");
                        self.abandon(&key.0, id);
                    }
                }
            }
            let old = leases.lock().asked(&key, granted);
            if let Some(old) = old
                && let Err(kept) = self.return_leases(vec![(key.0, old)]).await
            {
                leases.lock().put_back(kept);
            }
        });
    }

    /// Returns what expired leases (all of them with `all`) did not use. Leases the store does
    /// not take back are kept: under escrow they are what this replica may still spend.
    pub async fn sweep_leases(&self, all: bool) {
        self.sweep_team_leases(all).await;
        let Some(leases) = &self.leases else { return };
        let expired = leases.lock().expired(self.clock.now_ms(), all);
        if let Err(kept) = self.return_leases(expired).await
            && !all
        {
            leases.lock().put_back(kept);
        }
    }

    /// Gives the unused part of leases back to the store (one settle batch, retried with its
    /// id); on failure hands the leases back.
    async fn return_leases(
        &self,
        leases: Vec<(String, Lease)>,
    ) -> Result<(), Vec<(String, Lease)>> {
        if leases.is_empty() {
            return Ok(());
        }
        // Spent leases settle too: the store forgets their records.
        let batch: Vec<Settlement> = leases
            .iter()
            .map(|(consumer, l)| Settlement {
                consumer: consumer.clone(),
                end: ReservationEnd::Settled {
                    id: l.id,
                    retried: false,
                },
                reserved: l.left,
                actual: 0,
                window: l.admission.window,
                tpm: l.admission.tpm,
                usage: None,
                money: Default::default(),
            })
            .collect();
        if self.settle_returned(&batch).await {
            return Ok(());
        }
        // Unreturned lease tokens only make the consumer wait longer; nothing is over-admitted.
        tracing::debug!(
            leases = batch.len(),
            "could not return unused lease tokens yet"
        );
        Err(leases)
    }

    /// Settles returned leases or slices as one batch, tried three times with the same id (the
    /// store applies a batch once); whether the store took it.
    pub(super) async fn settle_returned(&self, batch: &[Settlement]) -> bool {
        let id = tollgate_quota::new_batch_id();
        for _ in 0..3 {
            if self.store.settle(id, batch).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// One reserve with the hot deadline, sent once more (same id) when it is not answered
    /// within half of it; the first answer wins. Returns the decision and whether it was sent
    /// twice.
    async fn hedged(
        &self,
        req: &ReserveRequest<'_>,
    ) -> Result<(Decision, bool), tollgate_quota::Error> {
        let first = self.store.reserve(req);
        tokio::pin!(first);
        let first_err = tokio::select! {
            r = &mut first => match r {
                Ok(d) => return Ok((d, false)),
                Err(e) => Some(e),
            },
            _ = tokio::time::sleep(self.policy.timeout / 2) => None,
        };
        let second = self.store.reserve(req);
        tokio::pin!(second);
        if first_err.is_some() {
            return second.await.map(|d| (d, true));
        }
        tokio::select! {
            r = &mut first => match r {
                Ok(d) => Ok((d, true)),
                Err(_) => second.await.map(|d| (d, true)),
            },
            r = &mut second => match r {
                Ok(d) => Ok((d, true)),
                Err(_) => first.await.map(|d| (d, true)),
            },
        }
    }

    /// Debits `tokens` for the consumer with one store call, or says why not.
    async fn reserve_direct(&self, ask: &Ask<'_>) -> Result<Reserved, Error> {
        let Ask {
            consumer,
            model,
            tokens,
            cost_nano,
            require_record,
        } = *ask;
        let req = ReserveRequest {
            consumer,
            model,
            tokens,
            defaults: &self.policy.defaults,
            require_record,
            id: tollgate_quota::new_reservation_id(),
            background: false,
            cost_nano,
        };
        let mut shared = None;
        let part = self.consumer_part(consumer);
        if self.try_shared(part) {
            match self.hedged(&req).await {
                Ok((d, retried)) => {
                    self.mark(part, false, "reserve", None);
                    shared = Some((d, retried));
                }
                Err(e) => {
                    self.mark(part, true, "reserve", Some(&e));
                    // It may still run when the store wakes: have it refunded.
                    self.abandon(consumer, req.id);
                }
            }
        }
        let Some((decision, retried)) = shared else {
            return self.degraded_reserve(&req).await;
        };
        if decision == Decision::UnknownConsumer && self.seeds.record(consumer).is_some() {
            // A configured consumer the store lost (it restarted empty): seed it, ask again.
            let again = ReserveRequest {
                id: tollgate_quota::new_reservation_id(),
                ..req.clone()
            };
            match self.seeds.restore_consumer(&self.store, consumer).await {
                Ok(_) => match self.hedged(&again).await {
                    Ok((d, r)) => return self.decided(d, r, &again, tokens),
                    Err(e) => {
                        self.mark(part, true, "reserve", Some(&e));
                        self.abandon(consumer, again.id);
                        return self.degraded_reserve(&again).await;
                    }
                },
                Err(e) => {
                    self.mark(part, true, "seeding", Some(&e));
                    return Err(Error::StoreUnavailable);
                }
            }
        }
        self.decided(decision, retried, &req, tokens)
    }

    /// The outcome of a reservation the store decided.
    fn decided(
        &self,
        decision: Decision,
        retried: bool,
        req: &ReserveRequest<'_>,
        tokens: u64,
    ) -> Result<Reserved, Error> {
        let (consumer, model) = (req.consumer, req.model);
        match decision {
            Decision::Admitted(admission) => {
                self.learn(consumer, &admission);
                self.refusals.admitted(consumer);
                Ok(Reserved {
                    admission,
                    tokens,
                    cost_nano: req.cost_nano,
                    place: Placement::Shared,
                    end: ReservationEnd::Settled {
                        id: req.id,
                        retried,
                    },
                    team: None,
                    charge_team: None,
                })
            }
            other => {
                self.remember(consumer, &other);
                refusal(other, consumer, model, &self.policy.currency)
            }
        }
    }

    /// Remembers a refusal that will stand for a moment (a spent quota, a disabled consumer).
    fn remember(&self, consumer: &str, d: &Decision) {
        let now = self.clock.now_ms();
        match d {
            Decision::QuotaExceeded {
                retry_after_ms,
                remaining_quota,
            } => self
                .refusals
                .quota(consumer, *remaining_quota, *retry_after_ms, now),
            Decision::Disabled => self.refusals.disabled(consumer, now),
            _ => {}
        }
    }

    /// A reservation while the store is unreachable, as `store.on_error` says.
    async fn degraded_reserve(&self, req: &ReserveRequest<'_>) -> Result<Reserved, Error> {
        let (decision, place) = match self.policy.on_error {
            OnError::Escrow | OnError::FailClosed => return Err(Error::StoreUnavailable),
            OnError::FailOpen => {
                let admission = Admission::unlimited(String::new());
                return Ok(Reserved {
                    admission,
                    tokens: req.tokens,
                    cost_nano: 0,
                    place: Placement::Nowhere,
                    end: ReservationEnd::None,
                    team: None,
                    charge_team: None,
                });
            }
            OnError::Local => {
                let n = self.replicas().max(1) as u64;
                let d = &self.policy.defaults;
                let defaults = LimitDefaults {
                    tpm: d.tpm.map(|v| v.div_ceil(n)),
                    quota: d.quota.map(|v| v.div_ceil(n)),
                    quota_period: d.quota_period,
                };
                let local_req = ReserveRequest {
                    defaults: &defaults,
                    ..req.clone()
                };
                let d = self
                    .local
                    .reserve(&local_req)
                    .await
                    .map_err(|_| Error::StoreUnavailable)?;
                (d, Placement::Local)
            }
        };
        match decision {
            Decision::Admitted(admission) => Ok(Reserved {
                admission,
                tokens: req.tokens,
                cost_nano: req.cost_nano,
                place,
                end: ReservationEnd::None,
                team: None,
                charge_team: None,
            }),
            other => refusal(other, req.consumer, req.model, &self.policy.currency),
        }
    }
}

/// The error for a store's refusal.
fn refusal(
    d: Decision,
    consumer: &str,
    model: &str,
    currency: &Arc<str>,
) -> Result<Reserved, Error> {
    Err(match d {
        Decision::RateLimited { retry_after_ms, .. } => Error::RateLimited { retry_after_ms },
        Decision::QuotaExceeded { retry_after_ms, .. } => Error::QuotaExceeded { retry_after_ms },
        Decision::BudgetExceeded(r) => budget_error(BudgetScope::Consumer, consumer, &r, currency),
        Decision::ModelNotAllowed => Error::ModelNotAllowed(model.to_string()),
        Decision::Disabled => Error::ConsumerDisabled,
        Decision::UnknownConsumer => Error::Unauthenticated,
        // Our own id was abandoned before the store saw it: as if the store had not answered.
        Decision::Cancelled => Error::StoreUnavailable,
        Decision::Admitted(_) => Error::Internal("an admission treated as a refusal".into()),
    })
}

/// The 403 of a spent budget.
pub(super) fn budget_error(
    scope: BudgetScope,
    id: &str,
    r: &BudgetRefusal,
    currency: &Arc<str>,
) -> Error {
    Error::BudgetExceeded {
        scope: scope.as_str(),
        id: id.to_string(),
        limit: units_from_nano(r.limit_nano as i64),
        currency: currency.clone(),
        period: r.period.as_str(),
        retry_after_ms: r.retry_after_ms,
    }
}
