//! The store's tests: prepare, finalize and abort, visibility, indexes, dropped tables, and
//! the flushes and merges into column segments.

use super::*;

/// The table the tests write to.
fn t() -> TableRef {
    TableRef::new(5, "d", "t")
}

fn key(seq: u64) -> BatchKey {
    BatchKey {
        pipeline_id: 1,
        task_id: 2,
        epoch: 3,
        seq,
    }
}

/// Opens a store again right after the last handle was dropped: sled's background threads
/// may hold the directory's lock for a moment longer (a process that restarts finds it free).
fn reopen(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(StoreError::Sled(sled::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::Other
                    && e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot reopen the store: {e}"),
        }
    }
}

/// Prepares batch `seq` of table d.t with `rows` (partition, JSON row).
async fn prepare(s: &Store, seq: u64, rows: &[(u32, &str)]) {
    let rows: Vec<(u32, String)> = rows.iter().map(|(p, r)| (*p, r.to_string())).collect();
    s.prepare(key(seq), &t(), &rows).await.unwrap();
}

/// Table columns from the catalog's JSON.
fn columns(json: &str) -> Vec<common::catalog::tables::TableColumn> {
    serde_json::from_str(json).unwrap()
}

/// Tells the store its table has one BIGINT column `n` (what flushes write).
fn one_bigint_column(s: &Store, table: &TableRef) {
    s.note_columns(
        table,
        &columns(r#"[{"name":"n","ty":"BigInt","nullable":true,"computed":null}]"#),
    )
    .unwrap();
}

/// Tells the store d.t has one JSON column `record`.
fn one_json_column(s: &Store) {
    s.note_columns(
        &t(),
        &columns(r#"[{"name":"record","ty":"Json","nullable":true,"computed":null}]"#),
    )
    .unwrap();
}

/// The rows of d.t a reader sees now: in segments, and in the row segment above them.
fn visible_rows(s: &Store) -> (Vec<i64>, Vec<String>) {
    let snap = s.table_snapshot(&t());
    let mut in_segments = Vec::new();
    for (path, _) in Store::snapshot_segments(&snap) {
        let seg = segments::file::Segment::open(&path).unwrap();
        let groups = seg.row_groups(None);
        for b in seg.read(&["n"], groups, 1 << 20, 8192, None).unwrap() {
            let b = b.unwrap();
            let col = b
                .column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap();
            in_segments.extend(col.iter().flatten());
        }
    }
    let mut tail = Vec::new();
    s.for_each_tail_row(&t(), &snap, |r| {
        tail.push(String::from_utf8(r.to_vec()).unwrap());
        Ok(true)
    })
    .unwrap();
    in_segments.sort_unstable();
    tail.sort();
    (in_segments, tail)
}

#[tokio::test]
async fn a_flush_moves_committed_rows_into_a_segment_and_leaves_prepared_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    one_bigint_column(&s, &t());
    prepare(&s, 1, &[(0, "[1]"), (0, "[2]"), (1, "[3]")]).await;
    s.finalize(key(1)).unwrap();
    prepare(&s, 2, &[(0, "[4]")]).await; // still prepared: stays in the row segment
    prepare(&s, 3, &[(0, "[5]")]).await;
    s.finalize(key(3)).unwrap(); // committed, but above a prepared batch
    assert_eq!(s.flush_segments(1).unwrap(), 2, "partitions 0 and 1");
    assert_eq!(visible_rows(&s), (vec![1, 2, 3], vec!["[5]".to_string()]));
    s.finalize(key(2)).unwrap();
    assert_eq!(
        visible_rows(&s).1,
        vec!["[4]".to_string(), "[5]".to_string()]
    );
    assert_eq!(s.flush_segments(2).unwrap(), 1);
    assert_eq!(visible_rows(&s), (vec![1, 2, 3, 4, 5], vec![]));
    assert_eq!(s.flush_segments(1).unwrap(), 0, "nothing left to flush");
    // A reader that started before a flush keeps reading the rows where it found them.
    prepare(&s, 4, &[(1, "[6]")]).await;
    s.finalize(key(4)).unwrap();
    let before = s.table_snapshot(&t());
    assert_eq!(s.flush_segments(1).unwrap(), 1);
    let mut tail = Vec::new();
    s.for_each_tail_row(&t(), &before, |r| {
        tail.push(r.to_vec());
        Ok(true)
    })
    .unwrap();
    assert_eq!(
        tail,
        vec![b"[6]".to_vec()],
        "still in the row segment for the old reader"
    );
    drop(before);
    s.clean_up().unwrap();
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(visible_rows(&s), (vec![1, 2, 3, 4, 5, 6], vec![]));
    assert_eq!(
        s.scan(&t()).unwrap(),
        Vec::<String>::new(),
        "the row segment is empty"
    );
}

#[tokio::test]
async fn small_segments_merge_into_one_and_a_reader_keeps_the_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    one_bigint_column(&s, &t());
    let mut reader = None;
    for i in 0..8u64 {
        prepare(&s, i + 1, &[(0, &format!("[{i}]"))]).await;
        s.finalize(key(i + 1)).unwrap();
        if i == 7 {
            reader = Some(s.table_snapshot(&t()));
        }
        s.flush_segments(1).unwrap();
    }
    let segments = |s: &Store| Store::snapshot_segments(&s.table_snapshot(&t()));
    assert_eq!(segments(&s).len(), 1, "eight small segments became one");
    assert_eq!(visible_rows(&s).0, (0..8).collect::<Vec<i64>>());
    // The reader from before the merge still finds its files.
    let old = reader.take().unwrap();
    for (path, _) in Store::snapshot_segments(&old) {
        assert!(
            path.exists(),
            "{} went while a reader held it",
            path.display()
        );
    }
    drop(old);
    s.clean_up().unwrap();
    let parts = s.manifests();
    let pdir = &parts[0].dir;
    let on_disk = std::fs::read_dir(pdir).unwrap().count();
    assert_eq!(on_disk, 2, "the merged segment and the manifest");
}

#[tokio::test]
async fn prepared_rows_are_invisible_until_finalized_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    prepare(&s, 1, &[(0, "[1]"), (1, "[2]")]).await;
    prepare(&s, 2, &[(0, "[3]")]).await;
    assert!(s.scan(&t()).unwrap().is_empty());
    assert_eq!(s.count(&t()).unwrap(), 0, "count sees what scan sees");
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.prepared_batches().unwrap(), vec![key(1), key(2)]);
    assert_eq!(s.finalize(key(1)).unwrap(), 2);
    assert_eq!(s.finalize(key(1)).unwrap(), 0, "finalize is idempotent");
    s.abort(key(2)).unwrap();
    let mut rows = s.scan(&t()).unwrap();
    rows.sort();
    assert_eq!(rows, vec!["[1]", "[2]"]);
    assert_eq!(s.count(&t()).unwrap(), 2);
    assert_eq!(s.count(&TableRef::new(99, "d", "nope")).unwrap(), 0);
    assert!(s.prepared_batches().unwrap().is_empty());
}

#[tokio::test]
async fn a_reader_sees_neither_prepared_rows_nor_rows_newer_than_itself() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    prepare(&s, 1, &[(0, "[1]")]).await;
    s.finalize(key(1)).unwrap();
    let before = s.visibility(&t());
    prepare(&s, 2, &[(0, "[2]"), (3, "[3]")]).await;
    s.finalize(key(2)).unwrap();
    let tree = s.table(&t()).unwrap().unwrap();
    let seen: Vec<_> = tree
        .iter()
        .keys()
        .map(|k| k.unwrap())
        .filter(|k| before.visible(k))
        .collect();
    assert_eq!(
        seen.len(),
        1,
        "rows finalized after a reader started are not its"
    );
    assert_eq!(s.scan(&t()).unwrap().len(), 3);
}

#[tokio::test]
async fn aborting_deletes_the_rows_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    prepare(&s, 1, &[(0, "[1]"), (1, "[2]")]).await;
    prepare(&s, 2, &[(0, "[3]"), (1, "[4]")]).await;
    s.abort(key(1)).unwrap();
    s.abort(key(1)).unwrap();
    assert_eq!(
        s.finalize(key(1)).unwrap(),
        0,
        "an aborted batch stays aborted"
    );
    assert!(s.scan(&t()).unwrap().is_empty());
    drop(s);
    let s = reopen(dir.path());
    assert!(
        s.scan(&t()).unwrap().is_empty(),
        "still hidden after reopen"
    );
    assert_eq!(s.finalize(key(2)).unwrap(), 2);
    let mut rows = s.scan(&t()).unwrap();
    rows.sort();
    assert_eq!(rows, vec!["[3]", "[4]"]);
    assert_eq!(s.table(&t()).unwrap().unwrap().len(), 2);
}

#[tokio::test]
async fn an_index_built_over_prepared_rows_shows_them_only_once_finalized() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    prepare(&s, 1, &[(0, "[5]"), (0, "[6]")]).await;
    prepare(&s, 2, &[(0, "[7]")]).await;
    s.finalize(key(2)).unwrap();
    let columns = &columns(r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#);
    assert_eq!(s.build_index(&t(), "i", 0, columns).unwrap(), 1);
    let all = Range {
        lower: None,
        upper: None,
    };
    assert_eq!(
        s.scan_index(&t(), "i", &all, &s.table_snapshot(&t()))
            .unwrap()
            .unwrap(),
        vec!["[7]"]
    );
    s.finalize(key(1)).unwrap();
    let mut rows = s
        .scan_index(&t(), "i", &all, &s.table_snapshot(&t()))
        .unwrap()
        .unwrap();
    rows.sort();
    assert_eq!(rows, vec!["[5]", "[6]", "[7]"]);
}

#[tokio::test]
async fn a_batch_staged_by_an_earlier_version_is_finalized_by_copy() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let k = key(9).bytes();
    let mut sk = k.to_vec();
    sk.extend_from_slice(&row_key(2, 0));
    s.staging.insert(sk, "[42]").unwrap(); // ids of earlier runs are below `high`
    s.prepared
        .insert(k, r#"{"database":"d","table":"t","rows":1}"#)
        .unwrap();
    let legacy = TableRef::new(0, "d", "t");
    assert!(s.scan(&legacy).unwrap().is_empty());
    assert_eq!(s.finalize(key(9)).unwrap(), 1);
    assert_eq!(s.scan(&legacy).unwrap(), vec!["[42]"]);
    assert!(s.staging.is_empty());
    // Its row id is 0, the first id there is: a flush takes it into a segment, and readers
    // find it there (not left behind, not read twice).
    one_bigint_column(&s, &legacy);
    assert_eq!(s.flush_segments(1).unwrap(), 1);
    assert!(s.scan(&legacy).unwrap().is_empty());
    let snap = s.table_snapshot(&legacy);
    let segments = Store::snapshot_segments(&snap);
    assert_eq!(segments.iter().map(|(_, m)| m.rows).sum::<u64>(), 1);
    assert_eq!(segments[0].1.first_row_id, 0);
}

#[tokio::test]
async fn row_groups_hold_many_rows_per_entry_and_every_reader_sees_rows() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let texts: Vec<String> = (0..600).map(|i| format!("[{i}]")).collect();
    let rows: Vec<(u32, &str)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (u32::from(i >= 300), t.as_str()))
        .collect();
    prepare(&s, 1, &rows).await;
    let tree = s.table(&t()).unwrap().unwrap();
    assert_eq!(tree.len(), 4, "256 + 44 rows in each of two partitions");
    assert_eq!(s.count(&t()).unwrap(), 0);
    s.finalize(key(1)).unwrap();
    let numbers = |rows: Vec<String>| -> Vec<i64> {
        let mut v: Vec<i64> = rows
            .iter()
            .map(|r| serde_json::from_str::<Vec<i64>>(r).unwrap()[0])
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(numbers(s.scan(&t()).unwrap()), (0..600).collect::<Vec<_>>());
    assert_eq!(s.count(&t()).unwrap(), 600);

    // Index lookups find single rows inside groups, across a group boundary too.
    let columns = &columns(r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#);
    assert_eq!(s.build_index(&t(), "i", 0, columns).unwrap(), 600);
    let range = |lo: i64, hi: i64| Range {
        lower: Some((serde_json::json!(lo), true)),
        upper: Some((serde_json::json!(hi), true)),
    };
    let found = |lo, hi| {
        numbers(
            s.scan_index(&t(), "i", &range(lo, hi), &s.table_snapshot(&t()))
                .unwrap()
                .unwrap(),
        )
    };
    assert_eq!(found(255, 257), vec![255, 256, 257]);
    assert_eq!(found(299, 300), vec![299, 300]);
    assert_eq!(found(599, 700), vec![599]);

    // A grouped batch that aborts leaves nothing behind.
    let more: Vec<(u32, &str)> = (0..300).map(|_| (0, "[-1]")).collect();
    prepare(&s, 2, &more).await;
    s.abort(key(2)).unwrap();
    assert_eq!(tree.len(), 4);
    assert_eq!(s.count(&t()).unwrap(), 600);

    // Backfill rewrites whole groups.
    let width = 2;
    let changed = s
        .backfill(&t(), |r| r.push(serde_json::json!(0)), width)
        .unwrap();
    assert_eq!(changed, 600);
    assert_eq!(tree.len(), 4);
    assert!(s.scan(&t()).unwrap().iter().all(|r| r.ends_with(",0]")));
    assert_eq!(found(256, 256), vec![256]);
    drop((s, tree));
    let s = reopen(dir.path());
    assert_eq!(s.count(&t()).unwrap(), 600, "after reopen");
}

#[tokio::test]
async fn a_dropped_table_leaves_nothing_and_a_new_one_of_its_name_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    prepare(&s, 1, &[(0, "[1]"), (1, "[2]")]).await;
    s.finalize(key(1)).unwrap();
    let columns = &columns(r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#);
    s.build_index(&t(), "i", 0, columns).unwrap();
    prepare(&s, 2, &[(0, "[3]")]).await; // still prepared when the table goes
    let other = TableRef::new(6, "d", "other");
    s.prepare(key(3), &other, &[(0, "[9]".to_string())])
        .await
        .unwrap();
    s.finalize(key(3)).unwrap();
    assert_eq!(s.stored_tables(), vec![5, 6]);

    // Table 5 was dropped; 6 lives; 7 is newer than the view.
    let view = LiveView {
        generation: 2,
        high: 6,
        ids: [6].into(),
        legacy: Default::default(),
    };
    let dropped = s.retain_tables(view).unwrap();
    assert_eq!(dropped.len(), 2, "rows and index: {dropped:?}");
    assert_eq!(s.tables_generation(), 2);
    assert_eq!(s.stored_tables(), vec![6]);
    assert!(s.prepared_batches().unwrap().is_empty());
    assert!(s.indexes.is_empty());
    assert_eq!(s.count(&other).unwrap(), 1);
    assert_eq!(s.finalize(key(2)).unwrap(), 0, "its batch went with it");
    assert!(matches!(
        s.prepare(key(4), &t(), &[(0, "[4]".to_string())]).await,
        Err(StoreError::TableDropped { .. })
    ));
    assert!(s.prepared_batches().unwrap().is_empty());

    // The same name again, under a new id: empty.
    let again = TableRef::new(7, "d", "t");
    assert_eq!(s.count(&again).unwrap(), 0);
    s.prepare(key(5), &again, &[(0, "[5]".to_string())])
        .await
        .unwrap();
    s.finalize(key(5)).unwrap();
    assert_eq!(s.scan(&again).unwrap(), vec!["[5]"]);
}

/// Flushes one segment per record of d.t (one JSON column `record`), eight in all, which
/// merge into one; returns the merged segment's rows and sub-columns (path, rows present).
async fn merged_json_segments(records: &[String]) -> (u64, Vec<(String, u64)>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    one_json_column(&s);
    for (i, r) in records.iter().enumerate() {
        let row = serde_json::json!([r]).to_string();
        prepare(&s, i as u64 + 1, &[(0, row.as_str())]).await;
        s.finalize(key(i as u64 + 1)).unwrap();
        s.flush_segments(1).unwrap();
    }
    let parts = s.manifests();
    let segments = &parts[0].manifest.segments;
    assert_eq!(segments.len(), 1, "the segments merged: {segments:?}");
    let subs = segments[0]
        .json
        .iter()
        .map(|c| (c.path.join("."), c.present))
        .collect();
    (segments[0].rows, subs)
}

#[tokio::test]
async fn a_merge_of_segments_with_the_same_sub_columns_keeps_them_and_their_counts() {
    let records: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"seq":{i},"msg":"m{i}"}}"#))
        .collect();
    let (rows, mut subs) = merged_json_segments(&records).await;
    subs.sort();
    assert_eq!(rows, 8);
    assert_eq!(subs, vec![("msg".to_string(), 8), ("seq".to_string(), 8)]);
}

#[tokio::test]
async fn a_merge_of_segments_with_other_sub_columns_infers_them_again() {
    // Five rows have `a`, three `b`: merged, only `a` is in at least half of the rows.
    let records: Vec<String> = (0..8)
        .map(|i| {
            if i < 5 {
                format!(r#"{{"a":{i}}}"#)
            } else {
                r#"{"b":"x"}"#.to_string()
            }
        })
        .collect();
    let (rows, subs) = merged_json_segments(&records).await;
    assert_eq!(rows, 8);
    assert_eq!(subs, vec![("a".to_string(), 5)]);
}

/// Flushes `records` of d.t (one JSON column `record`), loaded as one batch, into one segment;
/// returns its rows, its sub-columns (path, rows present) and the sub-columns its file holds.
async fn flushed_json_segment(records: &[String]) -> (u64, Vec<(String, u64)>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    one_json_column(&s);
    let rows: Vec<String> = records
        .iter()
        .map(|r| serde_json::json!([r]).to_string())
        .collect();
    let rows: Vec<(u32, &str)> = rows.iter().map(|r| (0, r.as_str())).collect();
    prepare(&s, 1, &rows).await;
    s.finalize(key(1)).unwrap();
    assert_eq!(s.flush_segments(1).unwrap(), 1);
    let snap = s.table_snapshot(&t());
    let files = Store::snapshot_segments(&snap);
    assert_eq!(files.len(), 1);
    let file = segments::file::Segment::open(&files[0].0).unwrap();
    let mut in_file: Vec<String> = segments::json::file_sub_columns(file.schema())
        .into_keys()
        .map(|(_, path, _)| path.join("."))
        .collect();
    in_file.sort();
    let parts = s.manifests();
    let segment = &parts[0].manifest.segments[0];
    let mut subs: Vec<(String, u64)> = segment
        .json
        .iter()
        .map(|c| (c.path.join("."), c.present))
        .collect();
    subs.sort();
    (segment.rows, subs, in_file)
}

#[tokio::test]
async fn a_flush_counts_sub_column_values_over_every_row() {
    // More rows than the first batch the sub-columns are guessed from.
    let records: Vec<String> = (0..10_000)
        .map(|i| {
            if i < 8_192 {
                format!(r#"{{"seq":{i},"early":"x"}}"#)
            } else {
                format!(r#"{{"seq":{i}}}"#)
            }
        })
        .collect();
    let (rows, subs, in_file) = flushed_json_segment(&records).await;
    assert_eq!(rows, 10_000);
    assert_eq!(
        subs,
        vec![("early".to_string(), 8_192), ("seq".to_string(), 10_000)]
    );
    assert_eq!(in_file, vec!["early".to_string(), "seq".to_string()]);
}

#[tokio::test]
async fn a_flush_whose_later_rows_do_not_fit_the_first_ones_infers_from_all() {
    // `v` is an integer in the first rows and a string later: no sub-column holds it exactly.
    // `late` is in half of all the rows but in too few of the first ones to be guessed.
    let records: Vec<String> = (0..10_000)
        .map(|i| {
            let v = if i < 9_000 {
                i.to_string()
            } else {
                format!("\"s{i}\"")
            };
            if i >= 5_000 {
                format!(r#"{{"seq":{i},"v":{v},"late":{i}}}"#)
            } else {
                format!(r#"{{"seq":{i},"v":{v}}}"#)
            }
        })
        .collect();
    let (rows, subs, in_file) = flushed_json_segment(&records).await;
    assert_eq!(rows, 10_000);
    assert_eq!(
        subs,
        vec![("late".to_string(), 5_000), ("seq".to_string(), 10_000)],
        "the sub-columns of all the rows, not of the first ones"
    );
    assert_eq!(
        in_file,
        vec!["late".to_string(), "seq".to_string()],
        "the file holds exactly those"
    );
}
