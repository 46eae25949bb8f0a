use super::super::Policy;
use super::*;
use crate::clock::ManualClock;
use std::time::Duration;
use tollgate_quota::{
    AnyStore, Budget, BudgetAction, ConsumerRecord, LimitDefaults, MemoryStore, Period, TeamRecord,
};

const UNIT: u64 = 1_000_000_000;

fn team(id: &str, units: u64) -> TeamRecord {
    TeamRecord {
        id: id.into(),
        budget: Some(Budget {
            limit_nano: units * UNIT,
            period: Period::Month,
            action: BudgetAction::Block,
        }),
    }
}

/// Limits over a memory store with consumer `app` (team `fin`, quota 1000 tokens) and teams
/// `fin` (3 units) and `ops` (100 units).
async fn limits() -> (Arc<Limits>, MemoryStore, Arc<ManualClock>) {
    let store = MemoryStore::new();
    let rec = ConsumerRecord {
        id: "app".into(),
        team: "fin".into(),
        quota: Some(1_000),
        ..ConsumerRecord::default()
    };
    store.put_consumer(&rec).await.unwrap();
    store.put_team(&team("fin", 3)).await.unwrap();
    store.put_team(&team("ops", 100)).await.unwrap();
    let policy = Policy {
        on_error: OnError::Escrow,
        defaults: LimitDefaults::default(),
        timeout: Duration::from_millis(50),
        max_degraded_ms: 30_000,
        currency: "EUR".into(),
    };
    let clock = ManualClock::at(1_000_000);
    let l = Limits::with_clock(
        AnyStore::Memory(store.clone()),
        policy,
        vec![],
        clock.clone(),
    );
    (l, store, clock)
}

async fn settle_compensations(l: &Limits, store: &MemoryStore) {
    let batch = l.take_abandoned();
    store
        .settle(tollgate_quota::new_batch_id(), &batch)
        .await
        .unwrap();
}

/// What app asks for: `tokens` at `cost_nano`, with a record required.
fn ask(tokens: u64, cost_nano: u64) -> Ask<'static> {
    Ask {
        consumer: "app",
        model: "m",
        tokens,
        cost_nano,
        require_record: true,
    }
}

/// What the store says the team has spent in its current window (nano-units).
async fn team_spent(store: &MemoryStore, team: &str) -> i64 {
    store
        .spend(BudgetScope::Team, team)
        .await
        .unwrap()
        .expect("the team has a budget record")
        .1
}

async fn quota_left(l: &Arc<Limits>) -> i64 {
    let r = l.reserve(ask(0, 0), Some("ops")).await.unwrap();
    r.admission.remaining_quota.unwrap()
}

/// The team refuses: 403 for the team, and the consumer's tokens come back (compensation);
/// the team's spend never passes its budget.
#[tokio::test]
async fn a_team_refusal_refunds_the_consumer() {
    let (l, store, _) = limits().await;
    let r = l.reserve(ask(100, 2 * UNIT), None).await.unwrap();
    assert_eq!(r.team.as_ref().map(|t| t.team.as_str()), Some("fin"));
    assert_eq!(r.team.as_ref().unwrap().budget.spent_nano, 2 * UNIT as i64);
    let e = l.reserve(ask(100, 2 * UNIT), None).await.unwrap_err();
    assert!(
        matches!(&e, Error::BudgetExceeded { scope: "team", id, .. } if id == "fin"),
        "{e:?}"
    );
    settle_compensations(&l, &store).await;
    assert_eq!(
        quota_left(&l).await,
        900,
        "the refused request's tokens came back"
    );
    assert_eq!(team_spent(&store, "fin").await, 2 * UNIT as i64);
}

/// The consumer refuses (quota spent) while the team step ran alongside: the team's debit is
/// refunded.
#[tokio::test]
async fn a_consumer_refusal_refunds_the_team() {
    let (l, store, _) = limits().await;
    // This replica learns app's team, so the next steps go at once.
    l.reserve(ask(10, UNIT / 10), None).await.unwrap();
    let e = l.reserve(ask(5_000, UNIT), None).await.unwrap_err();
    assert!(matches!(e, Error::QuotaExceeded { .. }), "{e:?}");
    settle_compensations(&l, &store).await;
    assert_eq!(
        team_spent(&store, "fin").await,
        (UNIT / 10) as i64,
        "the team step of the refused request was refunded"
    );
}

/// A wrong guess of the team (the consumer moved) is undone, and the right team is charged.
#[tokio::test]
async fn a_wrong_team_guess_is_undone() {
    let (l, store, _) = limits().await;
    l.reserve(ask(10, UNIT), None).await.unwrap();
    let moved = ConsumerRecord {
        id: "app".into(),
        team: "ops".into(),
        quota: Some(1_000),
        ..ConsumerRecord::default()
    };
    store.put_consumer(&moved).await.unwrap();
    let r = l.reserve(ask(10, UNIT), None).await.unwrap();
    assert_eq!(r.team.as_ref().map(|t| t.team.as_str()), Some("ops"));
    settle_compensations(&l, &store).await;
    assert_eq!(
        team_spent(&store, "fin").await,
        UNIT as i64,
        "the guessed team's debit was refunded"
    );
    assert_eq!(team_spent(&store, "ops").await, UNIT as i64);
}

/// A team without a budget is skipped for a second, then asked again (a new budget applies).
#[tokio::test]
async fn teams_without_a_budget_are_skipped_for_a_second() {
    let (l, store, clock) = limits().await;
    store
        .put_team(&TeamRecord {
            id: "fin".into(),
            budget: None,
        })
        .await
        .unwrap();
    assert!(l.reserve(ask(1, UNIT), None).await.unwrap().team.is_none());
    store.put_team(&team("fin", 3)).await.unwrap();
    assert!(
        l.reserve(ask(1, UNIT), None).await.unwrap().team.is_none(),
        "skipped within a second"
    );
    clock.advance(TEAM_CACHE_MS);
    assert!(l.reserve(ask(1, UNIT), None).await.unwrap().team.is_some());
}
