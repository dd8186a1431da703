"""pymysql and the mariadb CLI against a cluster from deploy/local/up.sh."""
import os
import signal
import time

import pymysql
import pytest


def connect(cluster, i=0, **kw):
    return pymysql.connect(host="127.0.0.1", port=cluster.ports[i], user="root", password="",
                           connect_timeout=5, autocommit=True, **kw)


def rows(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def test_pymysql_runs_the_foundation_statements(cluster):
    conn = connect(cluster, 1)
    assert rows(conn, "SELECT 1") == ((1,),)
    assert rows(conn, "SELECT @@version_comment LIMIT 1")[0][0].startswith("Shardline")
    rows(conn, "SET NAMES utf8mb4")
    rows(conn, "SET autocommit = 1")
    rows(conn, 'SET GLOBAL experimental_features_config = "kafka_connect_enabled=true"')
    assert rows(conn, "SHOW VARIABLES LIKE 'experimental_features_config'") == (
        ("experimental_features_config", "kafka_connect_enabled=true"),)
    assert rows(conn, "SELECT @@experimental_features_config") == (("kafka_connect_enabled=true",),)
    rows(conn, "CREATE DATABASE IF NOT EXISTS pydb PARTITIONS 4")
    assert ("pydb",) in rows(conn, "SHOW DATABASES")
    rows(conn, "USE pydb")
    assert rows(conn, "SELECT DATABASE()") == (("pydb",),)
    parts = rows(conn, "SHOW PARTITIONS ON pydb")
    assert [p[0] for p in parts] == [0, 1, 2, 3]
    assert len({p[2] for p in parts}) == 2, "partitions spread over both leaves"
    rows(conn, "SET GLOBAL pipelines_extractor_batch_size = 10000")
    assert rows(conn, "SELECT @@global.pipelines_extractor_batch_size") == ((10000,),)
    leaves = rows(conn, "SHOW LEAVES")
    assert [l[5] for l in leaves] == ["online", "online"]
    aggs = rows(conn, "SHOW AGGREGATORS")
    assert sum(a[5] for a in aggs) == 1
    # Every aggregator sees the same.
    for i in range(3):
        other = connect(cluster, i)
        assert rows(other, "SHOW VARIABLES LIKE 'experimental_features_config'")[0][1] == \
            "kafka_connect_enabled=true"
        theirs = rows(other, "SHOW AGGREGATORS")
        # Same members, addresses, states and master (connection counts and latency vary).
        assert [(a[0], a[1], a[2], a[5], a[6]) for a in theirs] == \
            [(a[0], a[1], a[2], a[5], a[6]) for a in aggs]
    rows(conn, "DROP DATABASE pydb")
    assert ("pydb",) not in rows(conn, "SHOW DATABASES")


@pytest.mark.parametrize("sql,code", [
    ("SELEC 1", 1064),
    ("SET GLOBAL no_such_thing = 1", 1193),
    ("USE nowhere", 1049),
    ("SET GLOBAL experimental_features_config = 'kafka_connect_enabled=maybe'", 1231),
])
def test_pymysql_gets_mysql_errors(cluster, sql, code):
    conn = connect(cluster)
    with pytest.raises(pymysql.MySQLError) as e:
        rows(conn, sql)
    assert e.value.args[0] == code
    assert rows(conn, "SELECT 1") == ((1,),)  # the connection keeps working


def test_mariadb_cli_prints_the_spec_output(cluster):
    cluster.mariadb('SET GLOBAL experimental_features_config = "kafka_connect_enabled=true"')
    out = cluster.mariadb("SHOW VARIABLES LIKE 'experimental_features_config'").stdout
    assert "| Variable_name                | Value                      |" in out
    assert "| experimental_features_config | kafka_connect_enabled=true |" in out
    err = cluster.mariadb("SHOW NONSENSE", check=False)
    assert err.returncode != 0 and "ERROR 1064" in err.stderr


def test_up_sh_brings_back_a_killed_leaf(cluster):
    os.kill(cluster.pid("leaf-1"), signal.SIGKILL)
    deadline = time.time() + 10
    conn = connect(cluster)
    while time.time() < deadline:
        if "offline" in [l[5] for l in rows(conn, "SHOW LEAVES")]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("killed leaf never showed offline")
    out = cluster.up()
    assert "leaf-1 started" in out
    assert "aggregator-1 already running" in out
    assert [l[5] for l in rows(conn, "SHOW LEAVES")] == ["online", "online"]


def test_down_then_up_restarts_the_same_cluster(cluster):
    conn = connect(cluster)
    rows(conn, "SET GLOBAL pipelines_batch_interval = 4321")
    rows(conn, "CREATE DATABASE IF NOT EXISTS survives")
    conn.close()
    cluster.down()
    cluster.up()
    conn = connect(cluster, 2)
    assert rows(conn, "SHOW GLOBAL VARIABLES LIKE 'pipelines_batch_interval'") == (
        ("pipelines_batch_interval", "4321"),)
    assert ("survives",) in rows(conn, "SHOW DATABASES")
