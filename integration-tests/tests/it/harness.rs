//! Test harness: real `aggregator` and `leaf` processes on loopback ports, driven by the real
//! `mariadb` command-line client. Every wait has a deadline; processes are killed by the PID
//! we started, and all of them are killed when the cluster is dropped.

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Directory holding the built `aggregator` and `leaf` binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SHARDLINE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/it-<hash> -> target/<profile>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --bins) or set SHARDLINE_BIN_DIR",
        path.display()
    );
    path
}

/// The ports this process hands out: below the kernel's ephemeral range, so an outgoing
/// connection (of any process) never takes the port of a node that is down for a restart, and
/// from one counter, so two nodes never get the same port.
fn port_range() -> std::ops::Range<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.max(12000);
    (high - 10000)..high
}

/// A loopback port no other node of this test process was given, free when handed out. Not
/// `bind(0)`: the kernel may hand the same ephemeral port out again at once, and a restarted
/// node would race every outgoing connection for its own port.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range = port_range();
    let span = u32::from(range.end - range.start);
    // Processes that run one after another start at different places in the range.
    let offset = std::process::id() % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = range.start + ((offset + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {range:?}");
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The outcome of a statement run with the `mariadb` client.
#[derive(Debug)]
pub struct Output {
    pub rows: Vec<Vec<String>>,
}

/// The real `mariadb` client for `sql` on an aggregator (batch mode, no column names).
pub fn mysql_command(port: u16, password: &str, sql: &str) -> Command {
    let mut cmd = Command::new("mariadb");
    cmd.args([
        "-h127.0.0.1",
        &format!("-P{port}"),
        "-uroot",
        "--batch",
        "--skip-column-names",
    ])
    .arg("--connect-timeout=3")
    .args(["-e", sql])
    .env("MYSQL_PWD", password)
    .stdin(Stdio::null());
    cmd
}

/// Runs SQL with the real `mariadb` client (batch mode, no column names).
pub fn mysql(port: u16, password: &str, sql: &str) -> Result<Output> {
    let out = mysql_command(port, password, sql)
        .output()
        .context("running the mariadb client (apt-get install mariadb-client)")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(String::from).collect())
        .collect();
    Ok(Output { rows })
}

/// One node process and how to start it again.
pub struct Node {
    pub name: String,
    args: Vec<String>,
    program: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info,raft=warn,sled=warn,h2=warn,tower=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) an environment variable for the node's next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.into(), v.into()));
        }
    }

    /// The value of a flag this node was started with (e.g. `--listen`).
    pub fn arg(&self, flag: &str) -> Option<&str> {
        let at = self.args.iter().position(|a| a == flag)?;
        self.args.get(at + 1).map(String::as_str)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("{} did not stop within 10s of SIGTERM", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        let i = self
            .args
            .iter()
            .position(|a| a == "--data-dir")
            .expect("data dir arg");
        PathBuf::from(&self.args[i + 1])
    }
}

/// Sends a signal by name (`TERM`, `STOP`, `CONT`) with `kill(1)`.
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !st.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// How to build a cluster.
#[derive(Clone)]
pub struct ClusterSpec {
    pub aggregators: usize,
    pub leaves: usize,
    pub password: String,
    /// Extra flags for every aggregator.
    pub aggregator_args: Vec<String>,
    /// Extra environment for every leaf (e.g. the Kinesis endpoint).
    pub leaf_env: Vec<(String, String)>,
    /// Extra environment for every aggregator (fault injection).
    pub aggregator_env: Vec<(String, String)>,
    /// Serve /metrics on every node.
    pub metrics: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            aggregators: 3,
            leaves: 2,
            password: String::new(),
            aggregator_args: vec![],
            leaf_env: vec![],
            aggregator_env: vec![],
            metrics: false,
        }
    }
}

/// A running cluster of real processes in a temporary directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub aggregators: Vec<Node>,
    pub leaves: Vec<Node>,
    pub mysql_ports: Vec<u16>,
    pub password: String,
    /// /metrics ports: aggregators first, then leaves (when `ClusterSpec::metrics`).
    pub metrics_ports: Vec<u16>,
    /// Keep the node logs when dropped, as after a panic (see [`Cluster::failed`]).
    keep_logs: AtomicBool,
}

impl Cluster {
    pub fn start(spec: ClusterSpec) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("shardline-it-").tempdir()?;
        let grpc: Vec<u16> = (0..spec.aggregators).map(|_| free_port()).collect();
        let mysql_ports: Vec<u16> = (0..spec.aggregators).map(|_| free_port()).collect();
        let peers = grpc
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let agg_addrs = grpc
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut metrics_ports = Vec::new();
        let mut metrics_args = || -> Vec<String> {
            if !spec.metrics {
                return vec![];
            }
            let port = free_port();
            metrics_ports.push(port);
            vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")]
        };
        let mut aggregators = Vec::new();
        for i in 0..spec.aggregators {
            let name = format!("aggregator-{}", i + 1);
            let mut args: Vec<String> = vec![
                "--node-id".into(),
                (i + 1).to_string(),
                "--peers".into(),
                peers.clone(),
                "--grpc-listen".into(),
                format!("127.0.0.1:{}", grpc[i]),
                "--mysql-listen".into(),
                format!("127.0.0.1:{}", mysql_ports[i]),
                "--data-dir".into(),
                dir.path().join(&name).to_string_lossy().into(),
                "--root-password".into(),
                spec.password.clone(),
            ];
            args.extend(spec.aggregator_args.iter().cloned());
            args.extend(metrics_args());
            aggregators.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                args,
                program: binary("aggregator"),
                env: spec.aggregator_env.clone(),
                child: None,
            });
        }
        let mut leaves = Vec::new();
        for i in 0..spec.leaves {
            let name = format!("leaf-{}", i + 1);
            let mut args: Vec<String> = vec![
                "--listen".into(),
                format!("127.0.0.1:{}", free_port()),
                "--aggregators".into(),
                agg_addrs.clone(),
                "--data-dir".into(),
                dir.path().join(&name).to_string_lossy().into(),
            ];
            args.extend(metrics_args());
            leaves.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                args,
                program: binary("leaf"),
                env: spec.leaf_env.clone(),
                child: None,
            });
        }
        let mut cluster = Self {
            dir,
            aggregators,
            leaves,
            mysql_ports,
            password: spec.password,
            metrics_ports,
            keep_logs: Default::default(),
        };
        for n in cluster
            .aggregators
            .iter_mut()
            .chain(cluster.leaves.iter_mut())
        {
            n.spawn()?;
        }
        Ok(cluster)
    }

    /// Marks the test as failed without a panic (it returns an `Err`): the node logs are kept
    /// and their tails printed when the cluster is dropped.
    pub fn failed(&self) {
        self.keep_logs.store(true, Ordering::Relaxed);
    }

    /// A new aggregator process under Raft id `node_id` (not started), with a new data
    /// directory and ports, listing the running members and itself as its peers: the second
    /// half of replacing a member (ADD AGGREGATOR makes it a member first). Returns its index.
    pub fn add_aggregator(&mut self, node_id: u64) -> Result<usize> {
        let grpc = free_port();
        let mysql_port = free_port();
        let mut peers: Vec<String> = self
            .aggregators
            .iter()
            .filter(|a| a.child.is_some())
            .map(|a| {
                format!(
                    "{}={}",
                    a.arg("--node-id").unwrap_or("0"),
                    a.arg("--grpc-listen").unwrap_or("")
                )
            })
            .collect();
        peers.push(format!("{node_id}=127.0.0.1:{grpc}"));
        let name = format!("aggregator-{node_id}");
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            node_id.to_string(),
            "--peers".into(),
            peers.join(","),
            "--grpc-listen".into(),
            format!("127.0.0.1:{grpc}"),
            "--mysql-listen".into(),
            format!("127.0.0.1:{mysql_port}"),
            "--data-dir".into(),
            self.dir.path().join(&name).to_string_lossy().into(),
            "--root-password".into(),
            self.password.clone(),
        ];
        let template = &self.aggregators[0];
        let skip = [
            "--node-id",
            "--peers",
            "--grpc-listen",
            "--mysql-listen",
            "--data-dir",
            "--root-password",
        ];
        let mut rest = template.args.iter();
        while let Some(flag) = rest.next() {
            let value = rest.next();
            if !skip.contains(&flag.as_str()) && flag != "--metrics-listen" {
                args.push(flag.clone());
                args.extend(value.cloned());
            }
        }
        self.aggregators.push(Node {
            log: self.dir.path().join(format!("{name}.log")),
            name,
            args,
            program: binary("aggregator"),
            env: template.env.clone(),
            child: None,
        });
        self.mysql_ports.push(mysql_port);
        Ok(self.aggregators.len() - 1)
    }

    /// Replaces member `old` (an index; its process must be gone) the documented way, through
    /// aggregator `via`: REMOVE AGGREGATOR, ADD AGGREGATOR under the next id, the new node
    /// started with a new data directory. Returns the new node's index.
    pub fn replace_aggregator(&mut self, via: usize, old: usize) -> Result<usize> {
        let old_id = self.aggregators[old]
            .arg("--node-id")
            .unwrap_or("0")
            .to_string();
        self.sql(via, &format!("REMOVE AGGREGATOR {old_id}"))?;
        let new_id = self.aggregators.len() as u64 + 1;
        let new = self.add_aggregator(new_id)?;
        let grpc = self.aggregators[new]
            .arg("--grpc-listen")
            .unwrap_or_default()
            .to_string();
        self.sql(via, &format!("ADD AGGREGATOR {new_id} '{grpc}'"))?;
        self.aggregators[new].start()?;
        Ok(new)
    }

    /// Points aggregator `i`'s `--peers` at the aggregators running now and itself, as an
    /// operator's config would after members were replaced (its original peers may be gone).
    pub fn refresh_peers(&mut self, i: usize) {
        let peers: Vec<String> = self
            .aggregators
            .iter()
            .enumerate()
            .filter(|(j, a)| *j == i || a.child.is_some())
            .map(|(_, a)| {
                format!(
                    "{}={}",
                    a.arg("--node-id").unwrap_or("0"),
                    a.arg("--grpc-listen").unwrap_or("")
                )
            })
            .collect();
        let node = &mut self.aggregators[i];
        if let Some(at) = node.args.iter().position(|a| a == "--peers") {
            node.args[at + 1] = peers.join(",");
        }
    }

    /// Waits for node `i`'s process to exit on its own; returns its exit code.
    pub fn wait_for_exit(&mut self, i: usize, timeout: Duration) -> Result<Option<i32>> {
        let node = &mut self.aggregators[i];
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = node.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    node.child = None;
                    return Ok(status.code());
                }
            } else {
                bail!("{} is not running", node.name);
            }
            if Instant::now() > deadline {
                bail!("{} still runs after {timeout:?}", node.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The leaves' /metrics ports (aggregators added later serve no metrics).
    pub fn leaf_metrics_ports(&self) -> &[u16] {
        &self.metrics_ports[self.metrics_ports.len() - self.leaves.len()..]
    }

    /// Runs SQL on aggregator `i` (0-based).
    pub fn sql(&self, i: usize, sql: &str) -> Result<Output> {
        mysql(self.mysql_ports[i], &self.password, sql)
    }

    /// `SHOW AGGREGATORS` on aggregator `i`: the master's node id, if any.
    pub fn master_seen_by(&self, i: usize) -> Option<usize> {
        let out = self.sql(i, "SHOW AGGREGATORS").ok()?;
        out.rows
            .iter()
            .find(|r| r.get(5).map(String::as_str) == Some("1"))
            .and_then(|r| r.get(6)?.parse().ok())
    }

    /// Waits until every running aggregator names the same master, and returns its index.
    pub fn wait_for_master(&mut self, timeout: Duration) -> Result<usize> {
        let running: Vec<usize> = (0..self.aggregators.len())
            .filter(|i| self.aggregators[*i].is_running())
            .collect();
        let this = &*self;
        wait_for(
            "a master agreed on by every running aggregator",
            timeout,
            || {
                let seen: Vec<Option<usize>> =
                    running.iter().map(|i| this.master_seen_by(*i)).collect();
                let first = seen.first().copied().flatten()?;
                (seen.iter().all(|s| *s == Some(first)) && running.contains(&(first - 1)))
                    .then_some(first - 1)
            },
        )
        .inspect_err(|_| self.failed())
    }

    /// Leaf states from `SHOW LEAVES` on aggregator `i`: (port, state).
    pub fn leaf_states(&self, i: usize) -> Result<Vec<(String, String)>> {
        Ok(self
            .sql(i, "SHOW LEAVES")?
            .rows
            .into_iter()
            .map(|r| (r[1].clone(), r[5].clone()))
            .collect())
    }

    pub fn wait_for_leaves_online(&self, via: usize, n: usize, timeout: Duration) -> Result<()> {
        wait_for(&format!("{n} online leaves"), timeout, || {
            let states = self.leaf_states(via).ok()?;
            (states.iter().filter(|(_, s)| s == "online").count() == n).then_some(())
        })
        .inspect_err(|_| self.failed())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.aggregators.iter_mut().chain(self.leaves.iter_mut()) {
            n.kill();
        }
        if self.keep_logs.load(Ordering::Relaxed)
            || std::thread::panicking()
            || std::env::var_os("SHARDLINE_IT_KEEP").is_some()
        {
            // Keep the logs of a failed test for inspection.
            let path = self.dir.path().to_path_buf();
            eprintln!("test failed; node logs kept in {}", path.display());
            for n in self.aggregators.iter().chain(self.leaves.iter()) {
                let text = n.log_text();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {} (last lines)", n.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
            let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
        }
    }
}

/// `GET /metrics` from a node: the Prometheus text.
pub fn scrape(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// The sum of every sample of a metric family in Prometheus text.
pub fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter(|l| l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A Kinesis emulator process on a free loopback port: moto_server (the independent peer)
/// or our kinesis-sim.
pub struct Moto {
    pub endpoint: String,
    child: Child,
}

impl Moto {
    /// moto_server from the project's venv.
    pub fn start() -> Result<Self> {
        let program = std::env::var("SHARDLINE_MOTO")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server")
            });
        assert!(
            program.exists(),
            "{} not found: run scripts/setup.sh (or set SHARDLINE_MOTO)",
            program.display()
        );
        let port = free_port();
        Self::spawn(
            Command::new(program).args(["-H", "127.0.0.1", "-p", &port.to_string()]),
            port,
        )
    }

    /// Our simulator, with extra flags (limits are on by default).
    pub fn sim(args: &[&str]) -> Result<Self> {
        let port = free_port();
        let mut cmd = Command::new(binary("kinesis-sim"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args);
        Self::spawn(&mut cmd, port)
    }

    fn spawn(cmd: &mut Command, port: u16) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_for(
            "the Kinesis emulator to listen",
            Duration::from_secs(30),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        )?;
        Ok(Self { endpoint, child })
    }

    /// The environment a leaf needs to reach it through the standard AWS variables.
    pub fn leaf_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL_KINESIS".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ]
    }

    pub fn client(&self) -> aws_sdk_kinesis::Client {
        common::connect::kinesis::sdk_client(
            Some(&self.endpoint),
            "us-east-1",
            "test",
            "test",
            None,
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
