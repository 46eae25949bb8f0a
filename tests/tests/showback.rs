//! Showback people look at: a PTU's monthly price allocated to the teams that used it (to the
//! cent, prorated for part of a month), and the HTML report rendered by a real browser
//! (headless Chromium) holding the teams and the totals of the JSON report.

use serde_json::Value;
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{Harness, Running, chat};

/// Today (UTC) as YYYY-MM-DD, and the first and last day of this month.
fn this_month() -> (String, String, String, u32) {
    use chrono::{Datelike, NaiveDate, Utc};
    let today = Utc::now().date_naive();
    let first = today.with_day(1).unwrap();
    let next = if today.month() == 12 {
        NaiveDate::from_ymd_opt(today.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(today.year(), today.month() + 1, 1)
    }
    .unwrap();
    let last = next.pred_opt().unwrap();
    let f = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
    (f(today), f(first), f(last), last.day())
}

/// A PTU (20,000 a month, 300k TPM) at priority 1 and a PAYG at 2; teams `red` and `blue`
/// send 6 and 3 requests.
async fn scenario() -> Running {
    let h = Harness::new()
        .redis()
        .backend(
            "ptu",
            MockOpts::default(),
            "priority = 1\nmonthly_cost = 20000.0\ncapacity_tpm = 300000\nprice = { input_per_1m = 1.0, output_per_1m = 4.0 }",
        )
        .backend(
            "payg",
            MockOpts::default(),
            "priority = 2\napi = \"openai\"\nprice = { input_per_1m = 2.5, output_per_1m = 10.0 }",
        )
        .consumer("red-app", "team = \"red\"")
        .consumer("blue-app", "team = \"blue\"")
        .start()
        .await
        .unwrap();
    for (who, n) in [("red-app", 6), ("blue-app", 3)] {
        for i in 0..n {
            let r = h.chat(who, chat(30 + i)).await;
            assert_eq!(r.status(), 200);
            let _ = r.bytes().await;
        }
    }
    h
}

/// Waits until the usage totals hold `requests` requests (settle runs off the request path).
async fn settled(h: &Running, requests: u64) -> Value {
    let ok = tollgate_tests::eventually(std::time::Duration::from_secs(10), || async {
        h.usage("team").unwrap()["total"]["requests"] == requests
    })
    .await;
    assert!(ok, "{}", h.usage("team").unwrap());
    h.usage("team").unwrap()
}

fn ptu_report(h: &Running, since: &str, until: &str) -> Value {
    let out = h
        .usage_args(&[
            "--since", since, "--until", until, "--by", "ptu", "--format", "json",
        ])
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

/// For the whole month the teams' parts sum to `monthly_cost` to the cent and follow their
/// token shares; for one day the PTU costs that day's part of the month. Utilization is the
/// tokens served against `capacity_tpm` over the period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptu_cost_is_allocated_by_token_share() {
    let h = scenario().await;
    let teams = settled(&h, 9).await;
    let tokens_of = |team: &str| {
        let row = teams["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["team"] == team)
            .unwrap();
        row["input_tokens"].as_u64().unwrap() + row["output_tokens"].as_u64().unwrap()
    };
    let (red, blue) = (tokens_of("red"), tokens_of("blue"));
    let served = h.mock("ptu").stats().await.unwrap();
    assert_eq!(red + blue, served.total_tokens, "only the PTU served");

    let (today, first, last, days_in_month) = this_month();
    let month = ptu_report(&h, &first, &last);
    let ptu = &month["ptus"][0];
    assert_eq!(ptu["backend"], "ptu");
    assert_eq!(ptu["period_cost_cents"], 2_000_000);
    let parts: Vec<(String, u64, u64)> = ptu["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["team"].as_str().unwrap().to_string(),
                t["tokens"].as_u64().unwrap(),
                t["cost_cents"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        parts.iter().map(|p| p.2).sum::<u64>(),
        2_000_000,
        "{parts:?}"
    );
    for (team, tokens, cents) in &parts {
        let want = if team == "red" { red } else { blue };
        assert_eq!(*tokens, want, "{team}");
        let exact = 2_000_000.0 * want as f64 / (red + blue) as f64;
        assert!(
            (*cents as f64 - exact).abs() <= 1.0,
            "{team}: {cents} vs {exact}"
        );
    }
    let capacity = 300_000u64 * 1440 * days_in_month as u64;
    assert_eq!(ptu["capacity_tokens"], capacity);
    let util = ptu["utilization"].as_f64().unwrap();
    assert!((util - (red + blue) as f64 / capacity as f64).abs() < 1e-12);

    let day = ptu_report(&h, &today, &today);
    let want = (2_000_000.0 / days_in_month as f64).round() as u64;
    assert_eq!(day["ptus"][0]["period_cost_cents"], want);
    let day_parts: u64 = day["ptus"][0]["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["cost_cents"].as_u64().unwrap())
        .sum();
    assert_eq!(day_parts, want);
    // CSV carries the same allocation.
    let csv = h
        .usage_args(&[
            "--since", &first, "--until", &last, "--by", "ptu", "--format", "csv",
        ])
        .unwrap();
    let cents: u64 = csv
        .lines()
        .skip(1)
        .map(|l| {
            let cost = l.rsplit(',').next().unwrap();
            let (units, frac) = cost.split_once('.').unwrap();
            units.parse::<u64>().unwrap() * 100 + frac.parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(cents, 2_000_000, "{csv}");
}

/// The HTML report, opened in headless Chromium: the rendered page names every team and shows
/// the JSON report's total cost, tokens and requests, the PTU's allocation, and a screenshot
/// of it is not blank. It loads nothing from the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_report_renders_in_a_browser() {
    let h = scenario().await;
    let teams = settled(&h, 9).await;
    let (_, first, last, _) = this_month();
    let html = h
        .usage_args(&["--since", &first, "--until", &last, "--format", "html"])
        .unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<script"),
        "the report must be self-contained"
    );
    let r = render(&html).await;
    let dom = r["dom"].as_str().unwrap();
    for team in ["red", "blue"] {
        assert!(
            dom.contains(&format!("data-team=\"{team}\"")),
            "{team} missing"
        );
    }
    let total = &teams["total"];
    let tokens = total["input_tokens"].as_u64().unwrap() + total["output_tokens"].as_u64().unwrap();
    for (id, want) in [
        (
            "total-cost",
            total["cost_exact"].as_str().unwrap().to_string(),
        ),
        ("total-tokens", tokens.to_string()),
        ("total-requests", total["requests"].to_string()),
    ] {
        assert!(
            dom.contains(&format!("id=\"{id}\" data-exact=\"{want}\">"))
                || dom.contains(&format!("<b id=\"{id}\">{want}</b>")),
            "{id} should read {want}"
        );
    }
    assert!(
        dom.contains("<p>20000.00 for ") && dom.contains("class=\"ptu-allocation\""),
        "the PTU's month and its allocation"
    );
    assert!(dom.contains("id=\"spend-per-day\""));
    assert!(r["colors"].as_u64().unwrap() > 5, "a blank screenshot: {r}");
    assert!(r["ink"].as_f64().unwrap() > 0.01, "a blank screenshot: {r}");
}

/// `html` rendered in headless Chromium: the DOM after layout, and the screenshot's colours
/// and ink (see `tests/python/render_page.py`).
async fn render(html: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, html).unwrap();
    let png = dir.path().join("report.png");
    let out = tollgate_tests::pyenv::run_script(
        "render_page.py",
        vec![page.display().to_string(), png.display().to_string()],
    )
    .await
    .unwrap();
    serde_json::from_str(&out).unwrap()
}

/// With team budgets, an answer cache and the `user` dimension, the rendered page holds each
/// team's budget burn-down with the JSON report's budget and spend (and its projection, which
/// moves with the clock between the two runs, within a percent), the cache's savings equal to
/// the JSON report's, and the top users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_report_shows_budgets_savings_and_users() {
    let h = Harness::new()
        .redis()
        .backend(
            "payg",
            MockOpts::default(),
            "price = { input_per_1m = 2.5, output_per_1m = 10.0 }",
        )
        .consumer("red-app", "team = \"red\"")
        .consumer("blue-app", "team = \"blue\"")
        .config(
            "[[teams]]\nid = \"red\"\nbudget = 1000.0\nbudget_period = \"month\"\n\
             [[teams]]\nid = \"blue\"\nbudget = 5.0\nbudget_period = \"week\"\n\
             [[cache]]\nname = \"faq\"\nttl_s = 600\n\
             [telemetry]\ndimensions = [\"body:user\"]\n",
        )
        .start()
        .await
        .unwrap();
    for (who, user, n) in [
        ("red-app", "alice", 40),
        ("red-app", "bob", 41),
        ("blue-app", "carol", 42),
    ] {
        let r = h
            .chat(who, chat(n).set("user", serde_json::json!(user)))
            .await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    // The same question again until the cache answers it (its answer is stored off the path).
    let again = chat(42).set("user", serde_json::json!("carol"));
    let mut sent = 3;
    let hit = tollgate_tests::eventually(std::time::Duration::from_secs(10), || {
        sent += 1;
        let again = again.clone();
        let h = &h;
        async move {
            let r = h.chat("blue-app", again).await;
            let hit = r
                .headers()
                .get("x-tollgate-cache")
                .is_some_and(|v| v == "hit");
            let _ = r.bytes().await;
            hit
        }
    })
    .await;
    assert!(hit, "the cache never answered");
    let report = settled(&h, sent).await;
    let total = &report["total"];
    let saved_tokens = total["saved_tokens"].as_u64().unwrap();
    assert!(saved_tokens > 0, "{report}");
    let budgets = report["budgets"]
        .as_array()
        .expect("budgets in the JSON report");

    let html = h
        .usage_args(&[
            "--since",
            "2000-01-01",
            "--until",
            "2999-12-31",
            "--format",
            "html",
        ])
        .unwrap();
    let r = render(&html).await;
    let dom = r["dom"].as_str().unwrap();
    for b in budgets.iter().filter(|b| b["scope"] == "team") {
        let id = b["id"].as_str().unwrap();
        let head = format!(
            "data-team=\"{id}\" data-budget=\"{}\" data-spent=\"{}\" data-projected=\"",
            b["budget"], b["spent"]
        );
        let at = dom.find(&head).unwrap_or_else(|| panic!("{head} missing"));
        let rest = &dom[at + head.len()..];
        let shown: f64 = rest[..rest.find('"').unwrap()].parse().unwrap();
        let want = b["projected"].as_f64().unwrap();
        assert!(
            (shown - want).abs() <= want.abs() * 0.01 + 0.01,
            "{id}: projected {shown} vs {want}"
        );
        assert!(shown >= b["spent"].as_f64().unwrap());
    }
    assert!(dom.contains("data-team=\"red\" data-budget=\"1000.0\""));
    assert!(dom.contains(&format!("<b id=\"saved-tokens\">{saved_tokens}</b>")));
    assert!(
        dom.contains(&format!(
            "id=\"saved-cost\" data-exact=\"{}\"",
            total["saved_cost_exact"].as_str().unwrap()
        )),
        "saved cost"
    );
    for user in ["alice", "bob", "carol"] {
        assert!(dom.contains(&format!("data-user=\"{user}\"")), "{user}");
    }
    assert!(r["ink"].as_f64().unwrap() > 0.01, "a blank screenshot: {r}");
    // CSV carries the same budgets.
    let csv = h.usage_every_day("team", &["--format", "csv"]).unwrap();
    let red = csv
        .lines()
        .find(|l| l.starts_with("team,red,"))
        .expect("red's budget row");
    let red_json = budgets.iter().find(|b| b["id"] == "red").unwrap();
    assert!(
        red.contains(&format!(",{},{},", red_json["budget"], red_json["spent"])),
        "{red}"
    );
}
