use super::*;
use tollgate_quota::UsageCounts;

fn row(day: u32, team: &str, backend: &str, input: u64, output: u64) -> UsageRow {
    UsageRow {
        day,
        consumer: format!("{team}-app"),
        team: team.into(),
        model: "gpt-4o".into(),
        backend: backend.into(),
        counts: UsageCounts {
            input,
            output,
            requests: 1,
            ..Default::default()
        },
    }
}

fn period(since: u32, until: u32) -> Period {
    Period { since, until }
}

fn spec(monthly_cost: f64, capacity_tpm: Option<u64>) -> PtuSpec {
    PtuSpec {
        backend: "ptu".into(),
        monthly_cost,
        capacity_tpm,
    }
}

/// A whole month: the teams' parts sum to `monthly_cost` to the cent and follow the token
/// shares (each within a cent of its exact share); PAYG rows do not count.
#[test]
fn whole_month_sums_to_the_cent() {
    let rows = vec![
        row(20261101, "a", "ptu", 1_000_000, 0),
        row(20261115, "b", "ptu", 1_500_000, 500_000),
        row(20261130, "c", "ptu", 333_333, 0),
        row(20261110, "a", "payg", 9_999_999, 0),
    ];
    let r = &allocate(
        &[spec(20_000.0, Some(300_000))],
        &rows,
        period(20261101, 20261130),
    )[0];
    assert_eq!(r.period_cost_cents, 2_000_000);
    assert_eq!(r.tokens, 3_333_333);
    assert_eq!(r.teams.iter().map(|t| t.cost_cents).sum::<u64>(), 2_000_000);
    for t in &r.teams {
        let exact = 2_000_000.0 * t.tokens as f64 / 3_333_333.0;
        assert!(
            (t.cost_cents as f64 - exact).abs() <= 1.0,
            "{t:?} vs {exact}"
        );
    }
    assert_eq!(r.teams[1].team, "b");
    assert_eq!(r.teams[1].cost_cents, 1_200_000);
    // 300k TPM over 30 days.
    assert_eq!(r.capacity_tokens, Some(300_000 * 30 * 1440));
    let u = r.utilization.unwrap();
    assert!((u - 3_333_333.0 / 12_960_000_000.0).abs() < 1e-12);
}

/// Part of a month costs its days' part; a period across two months takes each month's
/// daily rate (February's days cost more than March's).
#[test]
fn prorated_by_days() {
    assert_eq!(period_cost_cents(20_000.0, 20261101, 20261110), 666_667);
    assert_eq!(period_cost_cents(3_100.0, 20260301, 20260301), 10_000);
    // 2 days of February 2026 (28 days) + 3 of March (31 days).
    let want = (2.0 * 280_000.0 / 28.0 + 3.0 * 280_000.0 / 31.0_f64).round() as u64;
    assert_eq!(period_cost_cents(2_800.0, 20260227, 20260303), want);
    // A year is twelve monthly costs.
    assert_eq!(period_cost_cents(1_000.0, 20260101, 20261231), 1_200_000);
    let rows = vec![row(20261105, "a", "ptu", 10, 0)];
    let r = &allocate(&[spec(20_000.0, None)], &rows, period(20261101, 20261110))[0];
    assert_eq!(r.days, 10);
    assert_eq!(r.teams[0].cost_cents, 666_667);
    assert_eq!(r.utilization, None);
}

/// Remainders go where the most was cut off; an idle PTU allocates nothing.
#[test]
fn split_is_exact() {
    assert_eq!(split_cents(100, &[1, 1, 1]), vec![34, 33, 33]);
    assert_eq!(split_cents(10, &[0, 5]), vec![0, 10]);
    assert_eq!(split_cents(7, &[]), Vec::<u64>::new());
    let r = &allocate(&[spec(500.0, Some(10))], &[], period(20261101, 20261130))[0];
    assert_eq!((r.tokens, r.teams.len()), (0, 0));
    assert_eq!(r.utilization, Some(0.0));
    assert_eq!(fmt_cents(2_000_000), "20000.00");
    assert_eq!(fmt_cents(5), "0.05");
}
