//! Plans kept per statement shape, logical and physical: the statements that share one, the
//! ones that cannot, and their answers (`aggregator/src/sql/plans.rs`, `params.rs`).

use super::{cluster, counters, load_datagen, measured};
use crate::harness::Cluster;
use crate::pipelines::{datagen_config, setup};
use anyhow::Result;

/// What [`plan_counts`] counted from `before` to `after`.
fn since(before: (f64, f64, f64), after: (f64, f64, f64)) -> (f64, f64, f64) {
    (after.0 - before.0, after.1 - before.1, after.2 - before.2)
}

/// SELECTs the first aggregator planned from a kept plan, planned in full, and (of the
/// first) ran from a kept physical plan.
fn plan_counts(c: &Cluster) -> Result<(f64, f64, f64)> {
    let [reused, built, physical] = counters(
        &c.metrics_ports[..1],
        [
            "shardline_select_plans_reused_total",
            "shardline_select_plans_built_total",
            "shardline_select_physical_plans_reused_total",
        ],
    )?;
    Ok((reused, built, physical))
}

#[test]
fn statements_that_differ_in_literals_reuse_one_plan() -> Result<()> {
    // Rows stay in the row segment, where an index answers a point filter by itself.
    let (c, m) = cluster(vec![
        ("SHARDLINE_SEGMENT_ROWS".into(), "1000000".into()),
        ("SHARDLINE_FLUSH_INTERVAL_MS".into(), "3600000".into()),
    ])?;
    setup(&c, m, "pc")?;
    let per_task = 2_000usize;
    load_datagen(&c, m, "pc", &datagen_config(per_task))?;
    let one = |sql: &str| -> Result<String> { Ok(c.sql(m, sql)?.rows[0][0].clone()) };
    let point = |v: &str| {
        format!("SELECT COUNT(*) FROM pc.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') = {v}")
    };

    // The first statement of a shape is planned; the others bind their values into its plan
    // and get their own answers.
    let start = plan_counts(&c)?;
    for (seq, expected) in [
        ("5", "2"),
        ("17", "2"),
        ("1999", "2"),
        ("2000", "0"),
        ("-3", "0"),
    ] {
        assert_eq!(one(&point(seq))?, expected, "seq = {seq}");
    }
    let after = plan_counts(&c)?;
    // `-3` is an expression (a minus and a literal), so its own shape. The reused ones ran
    // the shape's physical plan, their values bound in the leaves' fragments.
    assert_eq!(
        since(start, after),
        (3.0, 2.0, 3.0),
        "(reused, built, physical)"
    );
    // Strings, IN lists and ranges alike; each shape planned once.
    let msg = one("SELECT JSON_EXTRACT_STRING(record, 'msg') FROM pc.gen LIMIT 1")?;
    let by_msg = |m: &str| {
        format!("SELECT COUNT(*) FROM pc.gen WHERE JSON_EXTRACT_STRING(record, 'msg') = '{m}'")
    };
    assert_eq!(one(&by_msg(&msg))?, (2 * per_task).to_string());
    assert_eq!(one(&by_msg("no such message"))?, "0");
    let range = |a: u32, b: u32| {
        format!("SELECT COUNT(*) FROM pc.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') BETWEEN {a} AND {b} AND JSON_EXTRACT_BIGINT(record, 'task') IN (0, 7)")
    };
    assert_eq!(one(&range(0, 9))?, "10");
    assert_eq!(one(&range(100, 299))?, "200");
    // A function whose value changes, and a session variable, are planned every time.
    let volatile = "SELECT COUNT(*) FROM pc.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') = 1 AND now() IS NOT NULL";
    let variable = "SELECT COUNT(*) FROM pc.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') < @@pipelines_batch_interval";
    for _ in 0..2 {
        assert_eq!(one(volatile)?, "2");
        assert_eq!(one(variable)?, "200");
    }
    let before = after;
    let after = plan_counts(&c)?;
    assert_eq!(
        since(before, after),
        (2.0, 7.0, 2.0),
        "(reused, built, physical)"
    );

    // A value the aggregator itself compares against (HAVING, above the merged aggregate)
    // keeps the logical plan only: the physical one would have a parameter it cannot bind.
    let having = |n: usize| {
        format!("SELECT JSON_EXTRACT_BIGINT(record, 'task') AS task, COUNT(*) FROM pc.gen GROUP BY 1 HAVING COUNT(*) > {n} ORDER BY 1")
    };
    let before = after;
    assert_eq!(c.sql(m, &having(per_task - 1))?.rows.len(), 2);
    assert_eq!(c.sql(m, &having(per_task))?.rows.len(), 0);
    let after = plan_counts(&c)?;
    assert_eq!(
        since(before, after),
        (1.0, 1.0, 0.0),
        "(reused, built, physical)"
    );

    // A top-k (ORDER BY ... LIMIT) keeps its physical plan too, and each statement of the
    // shape gets its own rows (no sort or limit state carried over from the one before).
    let top = |v: usize| {
        format!("SELECT JSON_EXTRACT_BIGINT(record, 'seq') AS s FROM pc.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') > {v} ORDER BY s LIMIT 3")
    };
    let before = plan_counts(&c)?;
    for v in [10usize, 1500, 20, 1996] {
        let got: Vec<String> = c
            .sql(m, &top(v))?
            .rows
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        let want: Vec<String> = [v + 1, v + 1, v + 2]
            .into_iter()
            .filter(|s| *s < per_task)
            .map(|s| s.to_string())
            .collect();
        assert_eq!(got, want, "seq > {v}");
    }
    let after = plan_counts(&c)?;
    assert_eq!(
        since(before, after),
        (3.0, 1.0, 3.0),
        "(reused, built, physical)"
    );

    // One kept physical plan serves statements running at once (each runs its own copy):
    // every answer is its own statement's.
    let grouped = |v: usize| {
        format!("SELECT JSON_EXTRACT_BIGINT(record, 'task') AS task, COUNT(*) FROM pc.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') < {v} GROUP BY 1 ORDER BY 1")
    };
    let before = after;
    std::thread::scope(|s| -> Result<()> {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let grouped = &grouped;
                let c = &c;
                s.spawn(move || -> Result<()> {
                    for i in 0..8 {
                        let v = 1 + t * 100 + i * 7;
                        let rows = c.sql(m, &grouped(v))?.rows;
                        let want: Vec<Vec<String>> = (0..2)
                            .map(|task| vec![task.to_string(), v.to_string()])
                            .collect();
                        anyhow::ensure!(rows == want, "seq < {v}: {rows:?}");
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        }
        Ok(())
    })?;
    let after = plan_counts(&c)?;
    // The clients' first statements may each miss the shape (planned at once), never more.
    let (_, built, physical) = since(before, after);
    assert!(
        (1.0..=4.0).contains(&built) && physical == 32.0 - built,
        "built {built}, physical {physical}"
    );

    // information_schema follows every catalog change, also those that keep the plans
    // (a pipeline's state and batches).
    let state = "SELECT STATE FROM information_schema.PIPELINES WHERE DATABASE_NAME = 'pc' AND PIPELINE_NAME = 'gen'";
    assert_eq!(one(state)?, "Stopped");
    c.sql(m, "USE pc; START PIPELINE gen")?;
    assert_eq!(one(state)?, "Running");
    c.sql(m, "USE pc; STOP PIPELINE gen")?;
    assert_eq!(one(state)?, "Stopped");
    let before = plan_counts(&c)?;
    assert_eq!(one(&point("6"))?, "2");
    let after = plan_counts(&c)?;
    assert_eq!(
        after.0 - before.0,
        1.0,
        "the pipeline's runs kept the plans"
    );

    // A new column (a change to the tables) starts over with plans that know it; an index on
    // it narrows the scan of a kept plan as it does the first one's: each reads its 2 rows.
    c.sql(m, "USE pc; ALTER TABLE gen ADD COLUMN seq AS JSON_EXTRACT_BIGINT(record, 'seq') PERSISTED BIGINT")?;
    c.sql(m, "USE pc; CREATE INDEX idx_seq ON gen (seq)")?;
    let before = plan_counts(&c)?;
    for seq in ["7", "8", "1500"] {
        let (rows, w) = measured(
            &c,
            m,
            &format!("SELECT COUNT(*), SUM(seq) FROM pc.gen WHERE seq = {seq}"),
        )?;
        let twice = (2 * seq.parse::<u64>()?).to_string();
        assert_eq!(rows, vec![vec!["2".to_string(), twice]], "seq = {seq}");
        assert_eq!(w.scanned, 2.0, "seq = {seq} read {w:?}");
    }
    let after = plan_counts(&c)?;
    // An index range is worked out from the values while planning: the logical plan is
    // kept, not the physical one.
    assert_eq!(
        since(before, after),
        (2.0, 1.0, 0.0),
        "(reused, built, physical)"
    );
    Ok(())
}
