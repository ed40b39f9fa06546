//! Child processes a test starts: free ports for them, running one to completion and checking
//! it, reading its output line by line, signalling it and waiting for it to exit. Only children
//! this test started are ever signalled, each by its own pid.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `n` distinct free ports on 127.0.0.1, never one this test binary handed out before.
///
/// A port is free only until someone binds it: the kernel may give a just-released port to the
/// next `bind(0)`, so two servers a test starts one after the other could be handed the same port
/// (one server's peer port, the other's client port). Remembering every port handed out in this
/// process rules that out between the servers of one binary.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::new();
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("bound address").port();
        if handed.insert(port) {
            ports.push(port);
        }
        held.push(l);
    }
    ports
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd` to completion and asserts that it succeeded, showing its stderr if not.
pub fn output_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    out
}

/// Runs `cmd` (which must succeed) and parses its stdout as one JSON document.
pub fn json_output(cmd: &mut Command) -> serde_json::Value {
    let out = output_ok(cmd);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: not JSON: {}", text(&out.stdout)))
}

/// A child this test started, killed (by its own pid) and reaped when dropped.
pub struct Kill(Option<Child>);

impl Kill {
    pub fn new(child: Child) -> Kill {
        Kill(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until dropped")
    }

    /// Kills the child and returns what it printed on the streams that were piped.
    pub fn kill_and_output(mut self) -> Output {
        let mut child = self.0.take().expect("child present until dropped");
        let _ = child.kill();
        child.wait_with_output().expect("reap child")
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `cmd` with its stdout piped; the child is killed when the guard drops.
pub fn spawn_piped(cmd: &mut Command) -> Kill {
    let child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {:?}: {e}", cmd.get_program()));
    Kill::new(child)
}

/// [`spawn_piped`], with the lines the child prints delivered as they come.
pub fn spawn_lines(cmd: &mut Command) -> (Kill, flume::Receiver<String>) {
    let mut child = spawn_piped(cmd);
    let lines = lines_of(child.child());
    (child, lines)
}

/// Lines a child prints on its (piped) stdout, delivered as they come; the channel closes when
/// the child closes its stdout.
pub fn lines_of(child: &mut Child) -> flume::Receiver<String> {
    let (tx, rx) = flume::unbounded();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next line from [`lines_of`], waiting up to 10 s; `what` names the child in the panic.
pub fn next_line(rx: &flume::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no output from {what}"))
}

/// Sends `sig` to a child this test started.
pub fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Waits up to `timeout` for a child to exit and returns its status.
pub fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait for child") {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
