//! `--auto-compaction-mode` / `--auto-compaction-retention`, as etcd's flags.
//!
//! - periodic: keep `retention` of history. The current revision is sampled every
//!   `retention / 10` (at least every second); once a sample is `retention` old, compact to it.
//! - revision: keep the last `retention` revisions. Checked every second (etcd checks every five
//!   minutes; checking more often costs one atomic read).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::Db;
use crate::error::Error;
use crate::kv::CompactionRequest;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Periodic(Duration),
    Revision(i64),
}

impl Policy {
    /// `None` when retention is 0 (disabled, etcd's default).
    pub fn parse(mode: &str, retention: &str) -> Result<Option<Policy>, Error> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!("--auto-compaction-retention {retention:?}: {why}"))
        };
        let r = retention.trim();
        match mode {
            "periodic" => {
                let d = parse_duration(r)
                    .ok_or_else(|| bad("expected a duration like 1h, 30m, 10s or hours"))?;
                Ok((!d.is_zero()).then_some(Policy::Periodic(d)))
            }
            "revision" => {
                let n: i64 = r
                    .parse()
                    .map_err(|_| bad("expected a number of revisions"))?;
                Ok((n > 0).then_some(Policy::Revision(n)))
            }
            other => Err(Error::InvalidArgument(format!(
                "--auto-compaction-mode {other:?}: expected periodic or revision"
            ))),
        }
    }
}

/// etcd accepts a bare integer as hours, or a Go-style duration (`1h30m`, `90s`).
fn parse_duration(s: &str) -> Option<Duration> {
    if let Ok(h) = s.parse::<u64>() {
        return Some(Duration::from_secs(h * 3600));
    }
    parse_go_duration(s)
}

/// A Go-style duration (`1h30m`, `90s`, `250ms`), as etcd's duration flags take.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            0.001
        } else {
            match c {
                'h' => 3600.0,
                'm' => 60.0,
                's' => 1.0,
                _ => return None,
            }
        };
        total += num.parse::<f64>().ok()? * unit;
        num.clear();
    }
    num.is_empty().then(|| Duration::from_secs_f64(total))
}

pub struct Compactor {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Compactor {
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.handle.join();
    }
}

pub fn spawn(db: Db, policy: Policy) -> Compactor {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || run(db, policy, &flag));
    Compactor { stop, handle }
}

fn run(db: Db, policy: Policy, stop: &AtomicBool) {
    let tick = match policy {
        Policy::Periodic(r) => (r / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)),
        Policy::Revision(_) => Duration::from_secs(1),
    };
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut last_compacted = 0;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        let now = Instant::now();
        let rev = db.revision();
        let target = match policy {
            Policy::Revision(keep) => rev - keep,
            Policy::Periodic(retention) => {
                samples.push_back((now, rev));
                let mut target = 0;
                while let Some(&(t, r)) = samples.front() {
                    if now.duration_since(t) < retention {
                        break;
                    }
                    target = r;
                    samples.pop_front();
                }
                target
            }
        };
        if target > last_compacted && target > 0 {
            match db.compact(CompactionRequest {
                revision: target,
                physical: false,
            }) {
                Ok(_) => {
                    tracing::info!(revision = target, "auto-compaction done");
                    last_compacted = target;
                }
                Err(Error::Compacted) => last_compacted = target,
                Err(e) => tracing::warn!(revision = target, error = %e, "auto-compaction failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcd_style_retention() {
        assert_eq!(Policy::parse("periodic", "0").unwrap(), None);
        assert_eq!(
            Policy::parse("periodic", "1").unwrap(),
            Some(Policy::Periodic(Duration::from_secs(3600)))
        );
        assert_eq!(
            Policy::parse("periodic", "1h30m").unwrap(),
            Some(Policy::Periodic(Duration::from_secs(5400)))
        );
        assert_eq!(
            Policy::parse("periodic", "500ms").unwrap(),
            Some(Policy::Periodic(Duration::from_millis(500)))
        );
        assert_eq!(
            Policy::parse("revision", "1000").unwrap(),
            Some(Policy::Revision(1000))
        );
        assert!(Policy::parse("revision", "1h").is_err());
        assert!(Policy::parse("weekly", "1").is_err());
    }

    #[test]
    fn revision_mode_keeps_the_last_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(
            dir.path(),
            crate::Options {
                cores: 1,
                pin: false,
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..30 {
            db.put(crate::kv::PutRequest::new("k", i.to_string()))
                .unwrap();
        }
        let c = spawn(db.clone(), Policy::Revision(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        while db.status().unwrap().compact_revision != 21 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        c.stop();
        assert_eq!(
            db.status().unwrap().compact_revision,
            21,
            "31 revisions (etcd starts at 1), keep 10"
        );
        db.close();
    }
}
