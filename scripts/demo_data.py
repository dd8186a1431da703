"""Creates the demo Kinesis stream and puts the spec's records into it (boto3)."""
import json
import os
import sys
import time

import boto3

endpoint = os.environ.get("AWS_ENDPOINT_URL_KINESIS") or os.environ.get("AWS_ENDPOINT_URL")
stream = sys.argv[1] if len(sys.argv) > 1 else "kinesis-data-stream"
k = boto3.client("kinesis", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"),
                 aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                 aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))
if stream not in k.list_streams()["StreamNames"]:
    k.create_stream(StreamName=stream, ShardCount=1)
    for _ in range(50):
        if k.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            break
        time.sleep(0.1)
records = [(1, "first", "user-a"), (2, "second", "user-b"), (3, "third", "user-a"),
           (4, "fourth", "user-c"), (5, "fifth", "user-b")]
for seq, msg, key in records:
    data = json.dumps({"seq": seq, "msg": msg}, separators=(",", ":")).encode()
    r = k.put_record(StreamName=stream, Data=data, PartitionKey=key)
    print(f"   put seq={seq} key={key} -> {r['ShardId']} {r['SequenceNumber']}")
