"""Measures puts/s and gets/s of a Kinesis endpoint with boto3 (one client, one process).

Usage: kinesis_bench.py ENDPOINT [SECONDS]. Prints one line per figure. Records are 100 bytes,
PutRecords calls carry 500 records, GetRecords calls drain with Limit 10000."""
import sys
import time

import boto3
import botocore

endpoint = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
k = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test", config=botocore.config.Config(retries={"max_attempts": 1}))
name = f"bench-{int(time.time() * 1000)}"
k.create_stream(StreamName=name, ShardCount=4)
time.sleep(0.5)
payload = b"x" * 100
put = 0
start = time.time()
while time.time() - start < seconds:
    r = k.put_records(StreamName=name, Records=[{"Data": payload, "PartitionKey": f"k{put + i}"} for i in range(500)])
    put += 500 - r["FailedRecordCount"]
put_rate = put / (time.time() - start)
got = 0
start = time.time()
for shard in k.list_shards(StreamName=name)["Shards"]:
    it = k.get_shard_iterator(StreamName=name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    while it:
        r = k.get_records(ShardIterator=it, Limit=10000)
        got += len(r["Records"])
        if not r["Records"]:
            break
        it = r.get("NextShardIterator")
get_rate = got / (time.time() - start)
print(f"{endpoint}: puts/s {put_rate:.0f} ({put} records in {seconds:.0f}s, 4 shards, PutRecords x500)")
print(f"{endpoint}: gets/s {get_rate:.0f} ({got} records drained, GetRecords Limit 10000)")
