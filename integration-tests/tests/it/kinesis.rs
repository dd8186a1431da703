//! The Kinesis conformance checks, driven by the real aws-sdk-kinesis, against kinesis-sim and
//! moto_server (the boto3 side lives in python/test_kinesis_conformance.py). Behaviours moto
//! lacks are skipped by name for moto only.

use crate::harness::Moto;
use anyhow::Result;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_kinesis::Client;
use std::time::Duration;

const MOTO_LACKS: &[&str] = &[
    "closed_shard_ends",
    "writes_skip_closed_shards",
    "realistic_sequence_numbers",
];

async fn read_all(k: &Client, stream: &str, shard: &str) -> Result<(Vec<String>, Option<String>)> {
    let mut it = k
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await?
        .shard_iterator
        .unwrap_or_default();
    let mut seqs = Vec::new();
    for _ in 0..20 {
        let r = loop {
            match k.get_records().shard_iterator(&it).send().await {
                Ok(r) => break r,
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_provisioned_throughput_exceeded_exception()) =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let empty = r.records().is_empty();
        seqs.extend(r.records().iter().map(|x| x.sequence_number().to_string()));
        match r.next_shard_iterator() {
            Some(next) if !empty => it = next.to_string(),
            next => return Ok((seqs, next.map(String::from))),
        }
    }
    Ok((seqs, Some(it)))
}

async fn conformance(k: &Client, moto: bool) -> Result<()> {
    let skip = |what: &str| moto && MOTO_LACKS.contains(&what);
    k.create_stream()
        .stream_name("rs")
        .shard_count(1)
        .send()
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = k
        .describe_stream()
        .stream_name("missing")
        .send()
        .await
        .expect_err("missing stream");
    assert!(err
        .as_service_error()
        .is_some_and(|e| e.is_resource_not_found_exception()));
    let mut put = Vec::new();
    for i in 0..5 {
        let r = k
            .put_record()
            .stream_name("rs")
            .partition_key(format!("k{i}"))
            .data(Blob::new(format!("r{i}")))
            .send()
            .await?;
        put.push(r.sequence_number().to_string());
    }
    if !skip("realistic_sequence_numbers") {
        assert!(put.iter().all(|s| s.len() == 56), "{put:?}");
    }
    let (got, _) = read_all(k, "rs", "shardId-000000000000").await?;
    assert_eq!(got, put);
    let after = k
        .get_shard_iterator()
        .stream_name("rs")
        .shard_id("shardId-000000000000")
        .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
        .starting_sequence_number(&put[2])
        .send()
        .await?;
    let r = k
        .get_records()
        .shard_iterator(after.shard_iterator().unwrap_or_default())
        .send()
        .await?;
    let seqs: Vec<&str> = r.records().iter().map(|x| x.sequence_number()).collect();
    assert_eq!(
        seqs,
        put[3..].iter().map(String::as_str).collect::<Vec<_>>()
    );
    k.split_shard()
        .stream_name("rs")
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await?;
    let shards = k.list_shards().stream_name("rs").send().await?;
    let parent = shards
        .shards()
        .iter()
        .find(|s| s.shard_id() == "shardId-000000000000")
        .expect("parent");
    assert!(parent
        .sequence_number_range()
        .and_then(|r| r.ending_sequence_number())
        .is_some());
    assert_eq!(
        shards
            .shards()
            .iter()
            .filter(|s| s.parent_shard_id() == Some("shardId-000000000000"))
            .count(),
        2
    );
    if !skip("closed_shard_ends") {
        let (_, next) = read_all(k, "rs", "shardId-000000000000").await?;
        assert_eq!(next, None, "a drained closed shard has no next iterator");
    }
    if !skip("writes_skip_closed_shards") {
        for i in 0..20 {
            let r = k
                .put_record()
                .stream_name("rs")
                .partition_key(format!("x{i}"))
                .data(Blob::new("x"))
                .send()
                .await?;
            assert_ne!(r.shard_id(), "shardId-000000000000");
        }
    }
    Ok(())
}

#[test]
fn the_rust_sdk_conformance_suite_on_kinesis_sim() -> Result<()> {
    let sim = Moto::sim(&[])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(conformance(&sim.client(), false))
}

#[test]
fn the_rust_sdk_conformance_suite_on_moto() -> Result<()> {
    let moto = Moto::start()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(conformance(&moto.client(), true))
}
