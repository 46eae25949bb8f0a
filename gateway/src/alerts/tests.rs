use super::*;
use tollgate_quota::BudgetAction;

fn alerts(extra: &str) -> (Alerts, mpsc::Receiver<Event>) {
    let config = Config::from_toml(&format!(
        "[pricing]\ncurrency = \"EUR\"\n[[alerts]]\nurl = \"http://127.0.0.1:9/hook\"\n{extra}"
    ))
    .unwrap();
    let (a, rx) = Alerts::from_config(&config).unwrap();
    (a, rx.unwrap())
}

fn use_at(spent: i64) -> BudgetUse {
    BudgetUse {
        limit_nano: 100,
        spent_nano: spent,
        window: 1_000_000,
        window_end: 1_003_600,
        period: Period::Day,
        action: BudgetAction::Block,
    }
}

fn drain(rx: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// Each threshold is queued once per window on a replica, in order, however many requests
/// cross it; a jump queues every threshold it crossed; a new window starts over.
#[test]
fn thresholds_queue_once_per_window() {
    let (a, mut rx) = alerts("thresholds = [0.8, 0.5, 1.0]");
    a.budget(BudgetScope::Team, "fin", "fin", "app", &use_at(40));
    assert!(drain(&mut rx).is_empty(), "below every threshold");
    a.budget(BudgetScope::Team, "fin", "fin", "app", &use_at(55));
    a.budget(BudgetScope::Team, "fin", "fin", "app", &use_at(60));
    let got = drain(&mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["threshold"], 0.5);
    assert_eq!(
        got[0]
            .claim
            .as_deref()
            .map(|c| c.split(':').skip(1).collect::<Vec<_>>().join(":")),
        Some("budget:team:fin:0.5:1003600".to_string())
    );
    assert!(
        got[0].body["text"]
            .as_str()
            .unwrap()
            .contains("team fin has used 50% of its budget (0.00 of 0.00 EUR per day)")
    );
    a.budget(BudgetScope::Team, "fin", "fin", "app", &use_at(120));
    let got: Vec<f64> = drain(&mut rx)
        .iter()
        .map(|e| e.body["threshold"].as_f64().unwrap())
        .collect();
    assert_eq!(got, vec![0.8, 1.0]);
    a.budget(BudgetScope::Team, "fin", "fin", "app", &use_at(130));
    assert!(drain(&mut rx).is_empty());
    let next = BudgetUse {
        window_end: 1_007_200,
        ..use_at(90)
    };
    a.budget(BudgetScope::Team, "fin", "fin", "app", &next);
    assert_eq!(drain(&mut rx).len(), 2, "a new window fires again");
}

/// Scopes: an alert for some teams or consumers hears only them; circuit and store events go
/// only to alerts without scopes; an alert's `events` filter applies.
#[test]
fn scopes_and_events() {
    let (a, mut rx) = alerts("teams = [\"fin\"]\nconsumers = [\"solo\"]\nthresholds = [0.5]");
    a.budget(BudgetScope::Team, "ops", "ops", "app", &use_at(90));
    assert!(drain(&mut rx).is_empty(), "another team");
    a.budget(BudgetScope::Consumer, "app", "fin", "app", &use_at(90));
    assert_eq!(drain(&mut rx).len(), 1, "a consumer of the team");
    a.quota("solo", "ops", 1000, 100, Period::Month, 1_000_000);
    assert_eq!(drain(&mut rx).len(), 1, "the named consumer");
    a.circuit_opened("ptu", 3, 30_000);
    a.store_degraded("r1", "escrow");
    assert!(
        drain(&mut rx).is_empty(),
        "platform events skip scoped alerts"
    );

    let (a, mut rx) = alerts("events = [\"circuit\"]");
    a.budget(BudgetScope::Team, "fin", "fin", "app", &use_at(90));
    a.circuit_opened("ptu", 3, 30_000);
    let got = drain(&mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0]
            .claim
            .as_deref()
            .map(|c| c.ends_with(":circuit:ptu:3")),
        Some(true)
    );
}

/// A refusal's window end is the same on every replica despite skew and answer time.
#[test]
fn refusal_windows_agree() {
    let end = 1_764_547_200; // 2025-12-01T00:00:00Z
    for (now_ms, retry) in [
        (end * 1000 - 5_000_000, 5_000_000),
        (end * 1000 - 5_000_000 + 900, 5_000_000),
        (end * 1000 - 5_000_000 - 1_700, 5_000_000),
    ] {
        assert_eq!(window_end_after(now_ms, retry), end);
    }
}

/// A webhook URL from the environment is required, and never shows in errors.
#[test]
fn url_env_must_be_set() {
    let config =
        Config::from_toml("[[alerts]]\nurl_env = \"TOLLGATE_TEST_SURELY_UNSET_HOOK\"\n").unwrap();
    let e = Alerts::from_config(&config).err().unwrap().to_string();
    assert!(e.contains("alerts[0].url_env"), "{e}");
}
