//! The catalog's commands, applied: placement, leaves, variables, batches, tables, requests.
use super::pipelines::BatchCommit;
use super::*;

fn with_leaves(n: u64) -> Catalog {
    let mut c = Catalog::default();
    for i in 0..n {
        c.apply(Command::RegisterLeaf {
            address: format!("127.0.0.1:{}", 9000 + i),
            now_ms: 1,
            holding: None,
        })
        .unwrap();
    }
    c
}

fn create(name: &str, partitions: Option<u32>) -> Command {
    Command::CreateDatabase {
        name: name.into(),
        partitions,
        if_not_exists: false,
        now_ms: 2,
    }
}

#[test]
fn database_placement_round_robins_over_online_leaves() {
    let mut c = with_leaves(2);
    c.apply(create("d", None)).unwrap();
    let leaves: Vec<u64> = c.databases["d"]
        .partitions
        .iter()
        .map(|p| p.leaf.0)
        .collect();
    assert_eq!(leaves, vec![1, 2, 1, 2]);
    c.apply(Command::SetLeafOnline {
        id: LeafId(2),
        online: false,
        now_ms: 3,
    })
    .unwrap();
    c.apply(create("e", Some(3))).unwrap();
    assert!(c.databases["e"]
        .partitions
        .iter()
        .all(|p| p.leaf == LeafId(1)));
}

#[test]
fn database_errors() {
    let mut c = Catalog::default();
    assert!(matches!(
        c.apply(create("d", None)),
        Err(Error::NoLeavesOnline { .. })
    ));
    let mut c = with_leaves(1);
    c.apply(create("d", Some(1))).unwrap();
    assert!(matches!(
        c.apply(create("d", None)),
        Err(Error::DatabaseExists { .. })
    ));
    assert!(matches!(
        c.apply(create("information_schema", None)),
        Err(Error::DatabaseExists { .. })
    ));
    assert!(matches!(
        c.apply(create("big", Some(MAX_PARTITIONS + 1))),
        Err(Error::InvalidPartitionCount { .. })
    ));
    let again = Command::CreateDatabase {
        name: "d".into(),
        partitions: None,
        if_not_exists: true,
        now_ms: 3,
    };
    assert_eq!(c.apply(again), Ok(Output::Unchanged));
    assert_eq!(
        c.apply(Command::DropDatabase {
            name: "x".into(),
            if_exists: true
        }),
        Ok(Output::Unchanged)
    );
    assert!(matches!(
        c.apply(Command::DropDatabase {
            name: "x".into(),
            if_exists: false
        }),
        Err(Error::DatabaseNotFound { .. })
    ));
}

#[test]
fn leaf_reregistration_keeps_its_id() {
    let mut c = with_leaves(2);
    let again = c
        .apply(Command::RegisterLeaf {
            address: "127.0.0.1:9001".into(),
            now_ms: 5,
            holding: None,
        })
        .unwrap();
    assert_eq!(again, Output::Leaf(LeafId(2)));
    assert_eq!(c.leaves.len(), 2);
}

#[test]
fn variables_validate_on_apply() {
    let mut c = Catalog::default();
    assert!(!c.feature_enabled("kafka_connect_enabled"));
    c.apply(Command::SetVariable {
        name: "experimental_features_config".into(),
        value: "kafka_connect_enabled=true".into(),
    })
    .unwrap();
    assert!(c.feature_enabled("kafka_connect_enabled"));
    assert!(c
        .apply(Command::SetVariable {
            name: "version".into(),
            value: "9".into()
        })
        .is_err());
    assert!(c
        .apply(Command::SetVariable {
            name: "no_such".into(),
            value: "9".into()
        })
        .is_err());
    let json = serde_json::to_string(&c).unwrap();
    let back: Catalog = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
}

fn pipeline_catalog() -> Catalog {
    let mut c = with_leaves(1);
    c.apply(Command::SetVariable {
        name: "experimental_features_config".into(),
        value: "kafka_connect_enabled=true".into(),
    })
    .unwrap();
    c.apply(create("d", Some(1))).unwrap();
    let def = PipelineDef {
        database: "d".into(),
        name: "p".into(),
        connector: "kafka-connector".into(),
        config: serde_json::Map::new(),
        credentials: "{}".into(),
        table: "p".into(),
        inferred: true,
        batch_interval_ms: None,
        max_retries: None,
        stop_on_error: None,
    };
    c.apply(Command::CreatePipeline {
        def,
        or_replace: false,
        if_not_exists: false,
        now_ms: 3,
    })
    .unwrap();
    c.apply(Command::StartPipeline {
        database: "d".into(),
        name: "p".into(),
        tasks: vec![BTreeMap::new()],
        if_not_running: false,
        now_ms: 4,
    })
    .unwrap();
    c
}

fn commit(epoch: u64, seq: u64, from: Option<&str>, to: &str) -> Command {
    Command::CommitBatch(BatchCommit {
        pipeline_id: 1,
        task_id: 0,
        epoch,
        seq,
        offsets: vec![pipelines::OffsetUpdate {
            key: "k".into(),
            from: from.map(|f| serde_json::json!(f)),
            to: serde_json::json!(to),
            finished: false,
            continues: vec![],
        }],
        start_ms: 0,
        extractor_wait_ms: 0,
        batch_time_ms: 0,
        rows: 1,
        bytes: 1,
        num_partitions: 1,
    })
}

fn stop_and_drop(c: &mut Catalog) {
    c.apply(Command::StopPipeline {
        database: "d".into(),
        name: "p".into(),
        if_running: false,
        now_ms: 5,
    })
    .unwrap();
    c.apply(Command::DropPipeline {
        database: "d".into(),
        name: "p".into(),
        if_exists: false,
    })
    .unwrap();
}

#[test]
fn a_committed_batch_is_known_until_its_leaf_confirms_whatever_the_pipeline_does() {
    let mut c = pipeline_catalog();
    let epoch = match c
        .apply(Command::AssignTask {
            pipeline_id: 1,
            task_id: 0,
            leaf: Some(LeafId(1)),
        })
        .unwrap()
    {
        Output::Epoch(e) => e,
        other => panic!("{other:?}"),
    };
    // Two batches of one epoch commit; the first is not yet visible on its leaf.
    assert_eq!(c.apply(commit(epoch, 5, None, "a")), Ok(Output::Batch(1)));
    assert_eq!(
        c.apply(commit(epoch, 6, Some("a"), "b")),
        Ok(Output::Batch(2))
    );
    let first = BatchRef {
        pipeline_id: 1,
        task_id: 0,
        epoch,
        seq: 5,
    };
    assert_eq!(
        c.committed_batch(&first),
        Some(1),
        "not only the epoch's last"
    );
    // Stopped, then dropped: still committed, and a retried commit gets its old answer.
    stop_and_drop(&mut c);
    assert_eq!(c.committed_batch(&first), Some(1));
    assert_eq!(c.apply(commit(epoch, 5, None, "a")), Ok(Output::Batch(1)));
    // The catalog survives a snapshot with them.
    let json = serde_json::to_string(&c).unwrap();
    let back: Catalog = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    // Confirmed visible: forgotten.
    c.apply(Command::BatchesFinalized {
        batches: vec![first],
    })
    .unwrap();
    assert_eq!(c.committed_batch(&first), None);
    assert_eq!(c.unfinalized.len(), 1);
    // Its leaf registers again: a process that still holds the batch keeps it; a
    // re-registration that says nothing keeps it; one that holds nothing (a wiped disk) does
    // not.
    let second = BatchRef { seq: 6, ..first };
    let register = |holding| Command::RegisterLeaf {
        address: "127.0.0.1:9000".into(),
        now_ms: 9,
        holding,
    };
    c.apply(register(Some(vec![second]))).unwrap();
    c.apply(register(None)).unwrap();
    assert_eq!(c.committed_batch(&second), Some(2));
    c.apply(register(Some(vec![]))).unwrap();
    assert_eq!(c.committed_batch(&second), None);
}

#[test]
fn tables_get_ids_that_are_never_reused() {
    let mut c = pipeline_catalog();
    let first = c.table("d", "p").unwrap().id;
    assert!(first > 0);
    let live = c.live_tables();
    assert_eq!(live.tables, vec![(first, "d".to_string(), "p".to_string())]);
    stop_and_drop(&mut c);
    c.apply(Command::DropTable {
        database: "d".into(),
        name: "p".into(),
        if_exists: false,
    })
    .unwrap();
    let dropped = c.live_tables();
    assert!(dropped.tables.is_empty());
    assert!(dropped.generation > live.generation);
    c.apply(Command::CreateTable {
        table: Table::kafka_connect_static("d", "p", 6),
        if_not_exists: false,
    })
    .unwrap();
    let again = c.table("d", "p").unwrap().id;
    assert!(again > first, "a new table under an old name gets a new id");
    let before = c.live_tables().generation;
    c.apply(Command::DropDatabase {
        name: "d".into(),
        if_exists: false,
    })
    .unwrap();
    let after = c.live_tables();
    assert!(after.tables.is_empty() && after.generation > before);
    assert_eq!(after.high, again);
}

#[test]
fn a_request_applies_once_however_often_it_is_proposed() {
    let mut c = with_leaves(1);
    let request = |id| Command::Request {
        id,
        command: Box::new(create("d", Some(1))),
    };
    assert_eq!(c.apply(request(7)), Ok(Output::Done));
    assert_eq!(
        c.apply(request(7)),
        Ok(Output::Done),
        "the first outcome again"
    );
    assert!(matches!(
        c.apply(request(8)),
        Err(Error::DatabaseExists { .. })
    ));
    // After a snapshot, too.
    let mut back: Catalog = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back.apply(request(7)), Ok(Output::Done));
    // Bounded: the oldest outcomes go.
    for id in 100..100 + REQUESTS_TO_KEEP as u64 {
        c.apply(Command::Request {
            id,
            command: Box::new(Command::SetVariable {
                name: "pipelines_batch_interval".into(),
                value: "100".into(),
            }),
        })
        .unwrap();
    }
    assert_eq!(c.requests.len(), REQUESTS_TO_KEEP);
    assert!(matches!(
        c.apply(request(7)),
        Err(Error::DatabaseExists { .. })
    ));
}

#[test]
fn members_join_once_and_removed_ids_never_return() {
    let mut c = Catalog::default();
    let join = |node| Command::JoinMember { node: NodeId(node) };
    assert_eq!(c.apply(join(1)), Err(Error::ClusterNotInitialized));
    let members: BTreeMap<NodeId, String> = [
        (NodeId(1), "a:1".to_string()),
        (NodeId(2), "b:2".to_string()),
    ]
    .into();
    let init = |id: &str| Command::InitCluster {
        cluster_id: id.into(),
        members: members.clone(),
    };
    c.apply(init("c1")).unwrap();
    // Only the first master's identity counts.
    assert_eq!(c.apply(init("c2")), Ok(Output::Unchanged));
    assert_eq!(c.cluster_id.as_deref(), Some("c1"));
    // The members the cluster was created with have joined: a wiped one is refused.
    assert_eq!(
        c.apply(join(2)),
        Err(Error::MemberAlreadyJoined { node: 2 })
    );
    assert_eq!(c.apply(join(3)), Err(Error::NotAMember { node: 3 }));
    let add = |node, addr: &str| Command::AddMember {
        node: NodeId(node),
        grpc_address: addr.into(),
    };
    assert_eq!(
        c.check_member_change(&add(3, "b:2")),
        Err(Error::MemberAddressInUse {
            address: "b:2".into(),
            node: 2
        })
    );
    assert_eq!(
        c.check_member_change(&add(2, "c:3")),
        Err(Error::MemberExists { node: 2 })
    );
    c.check_member_change(&add(3, "c:3")).unwrap();
    c.apply(add(3, "c:3")).unwrap();
    assert_eq!(c.apply(join(3)), Ok(Output::Cluster("c1".into())));
    assert_eq!(
        c.apply(join(3)),
        Err(Error::MemberAlreadyJoined { node: 3 })
    );
    // A join retried under its request id gets its first outcome.
    c.apply(add(4, "d:4")).unwrap();
    let request = Command::Request {
        id: 7,
        command: Box::new(join(4)),
    };
    assert_eq!(c.apply(request.clone()), Ok(Output::Cluster("c1".into())));
    assert_eq!(c.apply(request), Ok(Output::Cluster("c1".into())));

    let remove = |node| Command::RemoveMember { node: NodeId(node) };
    c.check_member_change(&remove(2)).unwrap();
    c.apply(remove(2)).unwrap();
    assert!(!c.members.contains_key(&NodeId(2)));
    assert_eq!(
        c.check_member_change(&add(2, "e:5")),
        Err(Error::MemberRemoved { node: 2 })
    );
    assert_eq!(c.apply(join(2)), Err(Error::MemberRemoved { node: 2 }));
    assert_eq!(
        c.check_member_change(&remove(2)),
        Err(Error::NotAMember { node: 2 })
    );
    for n in [1, 3] {
        c.apply(remove(n)).unwrap();
    }
    assert_eq!(
        c.check_member_change(&remove(4)),
        Err(Error::LastMember { node: 4 })
    );
    // Membership commands are Raft configuration changes, also inside a request.
    let wrapped = Command::Request {
        id: 9,
        command: Box::new(remove(4)),
    };
    assert_eq!(
        wrapped.member_change(),
        Some(MemberChange::Remove(NodeId(4)))
    );
    assert_eq!(join(4).member_change(), None);
}

#[test]
fn a_pipelines_progress_does_not_change_what_queries_plan_against() {
    let progress = Command::BatchesFinalized { batches: vec![] };
    assert!(!progress.changes_tables());
    assert!(!Command::Request {
        id: 1,
        command: Box::new(progress)
    }
    .changes_tables());
    assert!(create("db", None).changes_tables());
    assert!(Command::Request {
        id: 2,
        command: Box::new(create("db", None))
    }
    .changes_tables());
    assert!(Command::SetLeafOnline {
        id: LeafId(1),
        online: false,
        now_ms: 1
    }
    .changes_tables());
}
