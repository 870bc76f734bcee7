//! The state machine on a clock the tests move by hand.

use serde_json::json;

use super::*;

const SEC: i64 = 1000;

fn states(t: &[Transition]) -> Vec<(&str, AlertState, i64)> {
    t.iter().map(|t| (t.key.as_str(), t.state, t.at)).collect()
}

fn low(qty: i64) -> Option<Value> {
    Some(json!({ "sku": "SKU-1", "qty": qty }))
}

#[test]
fn pending_then_firing_after_for_then_resolved_after_keep_firing_for() {
    let mut t = Tracker::new(Timers {
        for_ms: 60 * SEC,
        keep_firing_for_ms: 30 * SEC,
    });
    assert!(t.observe("k", low(3), 0).is_empty());
    assert_eq!(t.status()[0].state, AlertState::Pending);
    assert_eq!(t.next_deadline(), Some(60 * SEC));
    // Still in the predicate with a new row: no news before FOR runs out.
    assert!(t.observe("k", low(2), 30 * SEC).is_empty());
    assert!(t.tick(59 * SEC).is_empty());
    let fired = t.tick(61 * SEC);
    assert_eq!(states(&fired), [("k", AlertState::Firing, 60 * SEC)]);
    assert_eq!(fired[0].row, low(2).unwrap());
    assert_eq!(fired[0].since, 0);
    assert!(t.tick(10_000 * SEC).is_empty(), "fires once");
    assert_eq!(t.next_deadline(), None);

    // Leaves: keeps firing for 30 s, then resolved, and forgotten.
    assert!(t.observe("k", None, 100 * SEC).is_empty());
    assert_eq!(t.status()[0].state, AlertState::Firing);
    assert_eq!(t.next_deadline(), Some(130 * SEC));
    let resolved = t.tick(130 * SEC);
    assert_eq!(states(&resolved), [("k", AlertState::Resolved, 130 * SEC)]);
    assert!(t.status().is_empty());
}

#[test]
fn flapping_inside_for_says_nothing() {
    let mut t = Tracker::new(Timers {
        for_ms: 60 * SEC,
        keep_firing_for_ms: 0,
    });
    let mut said = Vec::new();
    for i in 0..20 {
        let now = i * 20 * SEC;
        let row = if i % 2 == 0 { low(1) } else { None };
        said.extend(t.observe("k", row, now));
        said.extend(t.tick(now + 10 * SEC));
    }
    assert!(said.is_empty(), "{said:?}");
    // A row that stays in past FOR does fire; the clock restarted when it entered.
    assert!(t.observe("k", low(1), 1000 * SEC).is_empty());
    assert_eq!(
        states(&t.tick(1060 * SEC)),
        [("k", AlertState::Firing, 1060 * SEC)]
    );
}

#[test]
fn back_in_before_keep_firing_for_ends_goes_on_firing() {
    let mut t = Tracker::new(Timers {
        for_ms: 0,
        keep_firing_for_ms: 60 * SEC,
    });
    assert_eq!(
        states(&t.observe("k", low(1), 0)),
        [("k", AlertState::Firing, 0)]
    );
    assert!(t.observe("k", None, 10 * SEC).is_empty());
    assert!(t.observe("k", low(1), 50 * SEC).is_empty());
    assert!(
        t.tick(200 * SEC).is_empty(),
        "neither resolved nor fired again"
    );
    // With no KEEP FIRING FOR, leaving resolves at once.
    let mut t = Tracker::new(Timers::default());
    t.observe("k", low(1), 0);
    assert_eq!(
        states(&t.observe("k", None, 5 * SEC)),
        [("k", AlertState::Resolved, 5 * SEC)]
    );
}

#[test]
fn keys_are_independent() {
    let mut t = Tracker::new(Timers {
        for_ms: 10 * SEC,
        keep_firing_for_ms: 0,
    });
    t.observe("a", low(1), 0);
    t.observe("b", low(1), 5 * SEC);
    assert_eq!(
        states(&t.tick(10 * SEC)),
        [("a", AlertState::Firing, 10 * SEC)]
    );
    assert_eq!(t.next_deadline(), Some(15 * SEC));
    assert_eq!(
        states(&t.tick(15 * SEC)),
        [("b", AlertState::Firing, 15 * SEC)]
    );
    assert_eq!(
        states(&t.observe("a", None, 20 * SEC)),
        [("a", AlertState::Resolved, 20 * SEC)]
    );
    assert_eq!(t.status().len(), 1);
}

#[test]
fn a_restart_while_firing_does_not_fire_again() {
    let mut t = Tracker::new(Timers {
        for_ms: 10 * SEC,
        keep_firing_for_ms: 0,
    });
    t.observe("firing", low(1), 0);
    t.observe("pending", low(1), 8 * SEC);
    t.observe("gone", low(1), 0);
    assert_eq!(t.tick(11 * SEC).len(), 2);
    // Saved and loaded, as across a restart.
    let saved = serde_json::to_string(&t).unwrap();
    let mut back: Tracker = serde_json::from_str(&saved).unwrap();
    assert_eq!(back, t);
    // At start the view's rows: "firing" and "pending" still match, "gone" does not,
    // "new" has entered.
    let now = 30 * SEC;
    let rows = BTreeMap::from([
        ("firing".to_owned(), json!({"qty": 1})),
        ("pending".to_owned(), json!({"qty": 1})),
        ("new".to_owned(), json!({"qty": 1})),
    ]);
    let said = back.reconcile(rows, now);
    let mut said = states(&said);
    said.sort_by_key(|s| s.0);
    // "pending" ran out its FOR while the server was down; "gone" resolved; "firing"
    // says nothing; "new" waits its FOR.
    assert_eq!(
        said,
        [
            ("gone", AlertState::Resolved, now),
            ("pending", AlertState::Firing, 18 * SEC)
        ]
    );
    let status: Vec<(String, AlertState)> = back
        .status()
        .into_iter()
        .map(|s| (s.key, s.state))
        .collect();
    assert_eq!(
        status,
        [
            ("firing".to_owned(), AlertState::Firing),
            ("new".to_owned(), AlertState::Pending),
            ("pending".to_owned(), AlertState::Firing),
        ]
    );
}
