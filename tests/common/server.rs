//! A server process a test starts: `spindle serve` or a real etcd 3.4, on free 127.0.0.1 ports in
//! a fresh temp dir, waited for until it serves, stopped (SIGTERM) or killed (SIGKILL) by its own
//! pid, and restarted on the same data dir and ports. Killed when dropped; a failing test prints
//! the tail of its log.
//!
//! [`Server::start`] starts a single-member server. A multi-member cluster allocates every
//! member's [`Ports`] first, builds the bootstrap flags naming them all, spawns each member with
//! [`Server::spawn_on`] and then waits for each with [`Server::wait_ready`].

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::process::{free_ports, json_output, signal, wait_exit};
use super::{etcd, etcdctl};

/// The `spindle` binary under test.
pub const SPINDLE: &str = env!("CARGO_BIN_EXE_spindle");

/// How long a server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which server a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Spindle,
    /// etcd 3.4 from Debian's etcd-server package (`tools/test` installs it).
    Etcd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Spindle => "spindle",
            Kind::Etcd => "etcd",
        }
    }
}

/// The ports one member listens on.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub client: u16,
    /// etcd's peer port; reserved for spindle too, for its peer URL once it talks to peers.
    pub peer: u16,
}

impl Ports {
    /// Ports for `n` members, all distinct and free.
    pub fn free(n: usize) -> Vec<Ports> {
        free_ports(2 * n)
            .chunks(2)
            .map(|p| Ports {
                client: p[0],
                peer: p[1],
            })
            .collect()
    }

    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer)
    }
}

/// A server process this test started.
pub struct Server {
    pub kind: Kind,
    pub ports: Ports,
    /// Client port, as `ports.client`.
    pub port: u16,
    dir: tempfile::TempDir,
    /// Everything after the executable, as given to every start.
    args: Vec<String>,
    child: Option<Child>,
    /// Starts so far; each start logs to its own file.
    starts: u32,
}

impl Server {
    /// A single-member spindle with `extra` flags.
    pub fn spindle(extra: &[&str]) -> Server {
        Server::start(Kind::Spindle, extra)
    }

    /// A single-member etcd with `extra` flags.
    pub fn etcd(extra: &[&str]) -> Server {
        Server::start(Kind::Etcd, extra)
    }

    /// A single-member server of `kind` with `extra` flags (appended to the defaults), started
    /// and ready.
    pub fn start(kind: Kind, extra: &[&str]) -> Server {
        let mut s = Server::spawn(kind, extra);
        s.wait_ready();
        s
    }

    /// As [`Server::start`] without waiting for readiness, so that several servers can come up
    /// side by side; [`Server::wait_ready`] before use.
    pub fn spawn(kind: Kind, extra: &[&str]) -> Server {
        let ports = Ports::free(1)[0];
        let mut args: Vec<String> = match kind {
            Kind::Spindle => vec![],
            Kind::Etcd => etcd::single_member_args(&ports),
        };
        args.extend(extra.iter().map(|a| a.to_string()));
        Server::spawn_on(kind, ports, &args)
    }

    /// A server of `kind` on `ports` in a fresh temp dir, with `args` after the defaults (data
    /// dir, client and peer URLs, and for spindle two cores), started but not yet waited for:
    /// the members of a cluster become ready only together.
    pub fn spawn_on(kind: Kind, ports: Ports, args: &[String]) -> Server {
        Server::spawn_prepared(kind, ports, args, |_| {})
    }

    /// As [`Server::spawn_on`], with `prepare` given the data dir's path (not yet created)
    /// before the server starts: a test lays down a restored data dir there.
    pub fn spawn_prepared(
        kind: Kind,
        ports: Ports,
        args: &[String],
        prepare: impl FnOnce(&Path),
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        prepare(&data);
        let mut all = match kind {
            Kind::Spindle => spindle_args(&ports),
            Kind::Etcd => etcd::args(&ports),
        };
        all.extend(["--data-dir".to_string(), data.to_str().unwrap().to_string()]);
        all.extend(args.iter().cloned());
        let mut s = Server {
            kind,
            ports,
            port: ports.client,
            dir,
            args: all,
            child: None,
            starts: 0,
        };
        s.launch();
        s
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// `127.0.0.1:PORT`, as clients and `etcdctl --endpoints` take it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The temp dir the server lives in (its data dir and logs are inside).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The log of the current (or last) start.
    pub fn log_path(&self) -> PathBuf {
        self.dir()
            .join(format!("{}.{}.log", self.name(), self.starts))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `n` lines of [`Server::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    fn child(&self) -> &Child {
        self.child.as_ref().expect("the server is not running")
    }

    /// Panics, with the log's tail, if the server has exited.
    pub fn assert_alive(&mut self) {
        let name = self.name();
        let child = self.child.as_mut().expect("the server is not running");
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{name} exited ({status}); last log lines:\n{}",
                self.log_tail(30)
            );
        }
    }

    /// Starts the stopped server again (same flags, ports and data dir, a new log file) and
    /// waits until it is ready.
    pub fn restart(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Starts the stopped server again with `extra` arguments added (kept for later restarts),
    /// without waiting for it to serve.
    pub fn relaunch_with(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|a| a.to_string()));
        self.launch();
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name());
        self.starts += 1;
        self.child = Some(spawn_logged(self.kind, &self.args, &self.log_path()));
    }

    /// Waits until the server serves clients: spindle has logged that it is ready, etcd passes
    /// `etcdctl endpoint health`. Panics, with the log's tail, if it exits or takes too long.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.ready() {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{} not ready in {READY_TIMEOUT:?}; last log lines:\n{}",
                self.name(),
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ready(&self) -> bool {
        match self.kind {
            // Ready means the log says so: a connect alone can reach a core that is listening
            // while another core still fails to bind.
            Kind::Spindle => {
                let ready = self.log().contains("ready to serve client requests");
                if ready {
                    assert!(
                        TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
                        "spindle logged readiness but does not accept connections"
                    );
                }
                ready
            }
            Kind::Etcd => etcd::healthy(&self.endpoint()),
        }
    }

    /// SIGTERM; waits up to 10 s for the exit and returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let name = self.name();
        let child = self.child.as_mut().expect("the server is not running");
        signal(child, libc::SIGTERM);
        // Still ours until it has exited: a panic here leaves it to Drop to kill.
        let status = wait_exit(child, Duration::from_secs(10), name);
        self.child = None;
        status
    }

    /// Waits up to `timeout` for the server to exit by itself and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name();
        let child = self.child.as_mut().expect("the server is not running");
        let status = wait_exit(child, timeout, name);
        self.child = None;
        status
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `etcdctl` against this server (see [`etcdctl::command`]).
    pub fn etcdctl_cmd(&self, args: &[&str]) -> Command {
        etcdctl::command(&self.endpoint(), args)
    }

    /// Runs `etcdctl` against this server.
    pub fn etcdctl(&self, args: &[&str]) -> etcdctl::Ctl {
        etcdctl::run(&self.endpoint(), args)
    }

    /// `etcdctl args` against this server, which must succeed: its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(out.ok, "etcdctl {args:?}: {}", out.stderr);
        out.stdout
    }

    /// The same with `-w json`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-w", "json"]);
        serde_json::from_str(&self.ctl(&all)).expect("etcdctl -w json printed JSON")
    }
}

/// Starts `kind` with `args`, its standard output and error going to a new file at `log`.
pub fn spawn_logged(kind: Kind, args: &[String], log: &std::path::Path) -> std::process::Child {
    let log = File::create(log).expect("create the server log");
    let program = match kind {
        Kind::Spindle => SPINDLE,
        Kind::Etcd => "etcd",
    };
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("start {program} (tools/test installs etcd from etcd-server): {e}")
        })
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // The server's own log is the first thing to read when a test fails.
            eprintln!(
                "--- {} log (last 100 lines) ---\n{}",
                self.name(),
                self.log_tail(100)
            );
        }
    }
}

fn spindle_args(ports: &Ports) -> Vec<String> {
    ["serve", "--listen-client-urls", &ports.client_url()]
        .into_iter()
        .chain(["--cores", "2"])
        .map(str::to_string)
        .collect()
}

/// Runs `spindle bench ARGS` (which must succeed) and returns its `--json` report.
pub fn bench(args: &[&str]) -> serde_json::Value {
    json_output(Command::new(SPINDLE).arg("bench").args(args))
}
