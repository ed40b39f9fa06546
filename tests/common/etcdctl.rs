//! `etcdctl` (API v3) against one or more endpoints.

use std::process::{Command, Stdio};

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
