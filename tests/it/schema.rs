//! gz-schema on the real Kaggle fixture rows.

use crate::support;

#[test]
fn real_fixture_rows_satisfy_every_equality() {
    let path = support::fixtures().join("kaggle-mini/training_solutions_rev1.csv");
    let sol = gz_schema::read_solutions(&path).expect("read fixture");
    assert_eq!(sol.len(), 3);
    assert_eq!(sol.ids, vec![100008, 100023, 100053]);
    for i in 0..sol.len() {
        let v = gz_schema::check_row(sol.row(i), gz_schema::DEFAULT_TOLERANCE);
        assert!(v.is_empty(), "row {}: {:?}", sol.ids[i], v);
    }
}
