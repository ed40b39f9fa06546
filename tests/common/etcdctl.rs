//! `etcdctl` (API v3) against one or more endpoints.

use std::io::Write;
use std::process::{Child, Command, Stdio};

use super::process::text;

/// `etcdctl ARGS` against `endpoints` (`host:port`, comma-separated for several), with dial and
/// command timeouts (later `--dial-timeout`/`--command-timeout` flags in `args` override them)
/// and no stdin.
pub fn command(endpoints: &str, args: &[&str]) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(["--dial-timeout=3s", "--command-timeout=10s"])
        .args(args)
        .stdin(Stdio::null());
    c
}

/// What one etcdctl run produced.
#[derive(Debug)]
pub struct Ctl {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `etcdctl ARGS` against `endpoints` to completion.
pub fn run(endpoints: &str, args: &[&str]) -> Ctl {
    let out = command(endpoints, args)
        .output()
        .expect("run etcdctl (Debian's etcd-client; tools/test installs it)");
    Ctl {
        ok: out.status.success(),
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// Starts the etcdctl command `cmd` with its output captured and `stdin` (if any) written to
/// its standard input, which is then closed.
pub fn spawn_with_input(mut cmd: Command, stdin: Option<&str>) -> Child {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl (Debian's etcd-client; tools/test installs it)");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .expect("write etcdctl's stdin");
    }
    child
}

/// Runs `etcdctl ARGS` against `endpoints` to completion with `input` on its standard input
/// (`etcdctl txn` reads its compares and ops there).
pub fn run_with_input(endpoints: &str, args: &[&str], input: &str) -> Ctl {
    let out = spawn_with_input(command(endpoints, args), Some(input))
        .wait_with_output()
        .expect("wait for etcdctl");
    Ctl {
        ok: out.status.success(),
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// The failure as etcdctl reports it on stderr: the error of its client's JSON log line
/// (`log: …`; the rest of that line names the endpoint) and its other lines (`Error: …`).
pub fn error_lines(stderr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
                    out.push(format!("log: {e}"));
                }
                continue;
            }
        }
        out.push(line.to_string());
    }
    out
}
