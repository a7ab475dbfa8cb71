//! Budgets' unit tests.

use super::*;

fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// A day and a minute budget on route 0 ("chat"), 100/minute per token.
fn budgets() -> Budgets {
    let limit = |text| BudgetLimit::parse(text).expect("valid budget");
    Budgets::new(
        vec![("chat".to_owned(), vec![limit("1_000/day")])],
        vec![limit("100/minute")],
        vec!["APP".to_owned()],
    )
}

#[test]
fn budgets_parse_with_their_window() {
    assert_eq!(
        BudgetLimit::parse("2000000/day"),
        Ok(BudgetLimit {
            tokens: 2_000_000,
            window: Window::Day
        })
    );
    assert_eq!(
        BudgetLimit::parse(" 50_000 / Minute ").map(|b| b.to_string()),
        Ok("50000/minute".to_owned())
    );
    assert!(BudgetLimit::parse("1_000_000_000_000/day").is_ok());
    for bad in [
        "2000000",
        "0/day",
        "-5/day",
        "10/week",
        "many/day",
        "1.5/h",
        "1_000_000_000_001/day",
        "100000000000000/day",
    ] {
        assert!(BudgetLimit::parse(bad).is_err(), "{bad}");
    }
}

fn estimate(output: u64) -> Estimate {
    Estimate { prompt: 0, output }
}

/// Reserves `reserve`, then settles `spent` (the local store calls back
/// at once).
async fn spend(
    budgets: &Arc<Budgets>,
    token: Option<&str>,
    reserve: u64,
    spent: u64,
    now: u64,
) -> Vec<Overshoot> {
    let reservation = budgets
        .reserve(0, token, estimate(reserve), at(now))
        .await
        .expect("admitted")
        .expect("budgeted");
    let seen = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&seen);
    reservation.settle(spent, at(now), move |over| {
        *sink.lock().expect("lock") = Some(over);
    });
    let over = seen.lock().expect("lock").take();
    over.expect("the local store settles at once")
}

async fn admits(budgets: &Arc<Budgets>, token: Option<&str>, now: u64) -> bool {
    budgets
        .reserve(0, token, estimate(1), at(now))
        .await
        .is_ok()
}

#[tokio::test]
async fn a_used_up_budget_refuses_until_its_window_ends() {
    let budgets = Arc::new(budgets());
    // 20 s into a minute (and into a day).
    let now = 86_400 * 20_000 + 20;
    assert!(admits(&budgets, Some("APP"), now).await);
    assert!(spend(&budgets, Some("APP"), 50, 99, now).await.is_empty());
    assert!(admits(&budgets, Some("APP"), now).await);
    // The stream that crosses the budget is charged whole; 30 beyond it.
    assert_eq!(
        spend(&budgets, Some("APP"), 1, 31, now + 1).await,
        vec![Overshoot {
            account: Account::AccessToken("APP".to_owned()),
            tokens: 30
        }]
    );
    let Err(Refused::Exhausted(refused)) = budgets
        .reserve(0, Some("APP"), estimate(1), at(now + 1))
        .await
    else {
        panic!("the token's budget is used up");
    };
    assert_eq!(refused.budget, "access token APP: 100/minute");
    assert_eq!(refused.retry_after, Duration::from_secs(39));
    // Another token, and requests without one, only meet the route's budget.
    assert!(admits(&budgets, Some("OTHER"), now + 1).await);
    assert!(admits(&budgets, None, now + 1).await);
    // The next minute frees the token's budget; the day still counts 130.
    assert!(admits(&budgets, Some("APP"), now + 40).await);
    let report = budgets.report(at(now + 40)).await;
    assert_eq!(report["budgets"][0]["spent"], 130);
    assert_eq!(report["budgets"][1]["spent"], 0);
}

#[tokio::test]
async fn reservations_in_flight_count_and_what_is_dropped_is_given_back() {
    let budgets = Arc::new(budgets());
    let now = 86_400 * 20_000 + 20;
    let reserve = |output| budgets.reserve(0, Some("APP"), estimate(output), at(now));
    // 60 + the 40 left of 100/minute: the third finds nothing left.
    let first = reserve(60).await.expect("fits").expect("held");
    let second = reserve(60).await.expect("the rest").expect("held");
    assert!(matches!(reserve(1).await, Err(Refused::Exhausted(_))));
    // A request that never reached the upstream gives its share back.
    drop(second);
    let third = reserve(10).await.expect("room again").expect("held");
    first.settle(5, at(now), |_| {});
    third.settle(5, at(now), |_| {});
    assert_eq!(budgets.report(at(now)).await["budgets"][1]["spent"], 10);
}

#[test]
fn overshoot_is_what_lies_beyond_the_budget() {
    let limit = BudgetLimit::parse("100/day").expect("budget");
    let account = || Account::Route("r".to_owned());
    let beyond = |total, charged| overshoot(account(), limit, total, charged).map(|o| o.tokens);
    assert_eq!(beyond(99, 99), None);
    assert_eq!(beyond(100, 1), None);
    assert_eq!(beyond(130, 31), Some(30));
    assert_eq!(beyond(150, 20), Some(20), "already used up: all of it");
}

#[tokio::test]
async fn the_state_survives_a_restart_within_its_window_only() {
    let budgets = Arc::new(budgets());
    let now = 86_400 * 20_000 + 20;
    spend(&budgets, Some("APP"), 60, 60, now).await;
    let state = budgets.state_if_changed().expect("changed");
    assert!(budgets.state_if_changed().is_none(), "written once");

    let restarted = self::budgets();
    assert_eq!(restarted.restore(&state, at(now + 5)), Ok(2));
    assert_eq!(
        restarted.report(at(now + 5)).await["budgets"][1]["spent"],
        60
    );
    // A minute later only the day's count is still current.
    let later = self::budgets();
    assert_eq!(later.restore(&state, at(now + 60)), Ok(1));

    for corrupt in [
        "",
        "{",
        "{\"version\":1}",
        "{\"version\":9,\"accounts\":[]}",
    ] {
        assert!(
            self::budgets().restore(corrupt, at(now)).is_err(),
            "{corrupt}"
        );
    }
}
