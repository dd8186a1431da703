"""A local cluster started with deploy/local/up.sh (the operator's path), shared by the tests."""
import os
import shutil
import sys
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import ports  # noqa: E402  (scripts/ports.py, shared with the benchmark)


def _free_base(count):
    """A base port with `count` free ports after it (scripts/ports.py)."""
    return ports.free_base(count)


class LocalCluster:
    def __init__(self, emulator="sim"):
        self.data_dir = tempfile.mkdtemp(prefix="shardline-py-")
        self.env = dict(os.environ)
        self.env.update(
            AGGREGATORS="3",
            LEAVES="2",
            DATA_DIR=self.data_dir,
            MYSQL_PORT=str(_free_base(3)),
            AGG_GRPC_PORT=str(_free_base(3)),
            LEAF_PORT=str(_free_base(2)),
            KINESIS_PORT=str(_free_base(1)),
            KINESIS_EMULATOR=emulator,
            READY_TIMEOUT="60",
        )
        bin_dir = os.environ.get("SHARDLINE_BIN_DIR")
        if bin_dir:
            self.env["BIN_DIR"] = bin_dir
        self.ports = [int(self.env["MYSQL_PORT"]) + i for i in range(3)]

    def up(self):
        return subprocess.run(
            ["bash", str(REPO / "deploy/local/up.sh")],
            env=self.env, capture_output=True, text=True, timeout=600, check=True,
        ).stdout

    def down(self):
        return subprocess.run(
            ["bash", str(REPO / "deploy/local/down.sh")],
            env=self.env, capture_output=True, text=True, timeout=120, check=True,
        ).stdout

    def pid(self, node):
        return int(Path(self.data_dir, "pids", f"{node}.pid").read_text().strip())

    def mariadb(self, sql, port=None, password="", check=True):
        """Runs SQL with the mariadb CLI in table mode, as a person would."""
        return subprocess.run(
            ["mariadb", "-h127.0.0.1", f"-P{port or self.ports[0]}", "-uroot", "--table", "-e", sql],
            env={**self.env, "MYSQL_PWD": password},
            capture_output=True, text=True, timeout=30, check=check,
        )


def _run(emulator):
    c = LocalCluster(emulator)
    c.up()
    yield c
    try:
        c.down()
    finally:
        shutil.rmtree(c.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    yield from _run("sim")


@pytest.fixture(scope="module")
def moto_cluster():
    """A cluster whose Kinesis is moto_server, the independent implementation."""
    yield from _run("moto")
