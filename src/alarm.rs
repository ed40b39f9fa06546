//! Alarms, as etcd keeps them in its `alarm` bucket: which member raised which alarm.
//!
//! An alarm is raised or disarmed through shard 0's log (`EntryKind::Alarm`), so every member
//! applies the same changes in the same order, replays them at restart and carries the set in
//! shard 0's checkpoint. The set is tiny; the flags give the request path a lock-free check.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// etcd's `AlarmType` numbers (`NONE` = 0 means "any" in a query).
pub const NOSPACE: i32 = 1;
pub const CORRUPT: i32 = 2;

/// etcd's name of an alarm type, as `etcdctl` and Status errors print it.
pub fn name(alarm: i32) -> &'static str {
    match alarm {
        NOSPACE => "NOSPACE",
        CORRUPT => "CORRUPT",
        _ => "NONE",
    }
}

/// One raised alarm: the member it is about and its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Alarm {
    pub member: u64,
    pub alarm: i32,
}

/// A change of the alarm set, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlarmOp {
    /// Raise (`true`) or disarm.
    pub activate: bool,
    pub alarm: Alarm,
}

#[derive(Debug, PartialEq, Eq)]
pub enum AlarmError {
    /// A logged op or a checkpoint's set that does not decode (length, action byte).
    Malformed(&'static str),
}

const OP_LEN: usize = 13;

impl AlarmOp {
    /// `action:u8 | member:u64 | alarm:i32`, little endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(OP_LEN);
        b.push(u8::from(self.activate));
        b.extend_from_slice(&self.alarm.member.to_le_bytes());
        b.extend_from_slice(&self.alarm.alarm.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<AlarmOp, AlarmError> {
        if b.len() != OP_LEN {
            return Err(AlarmError::Malformed("alarm op length"));
        }
        let activate = match b[0] {
            0 => false,
            1 => true,
            _ => return Err(AlarmError::Malformed("alarm op action")),
        };
        let (member, alarm) = split(&b[1..]);
        Ok(AlarmOp {
            activate,
            alarm: Alarm { member, alarm },
        })
    }
}

/// `member:u64 | alarm:i32` from a 12-byte slice.
fn split(b: &[u8]) -> (u64, i32) {
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[..8]);
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[8..12]);
    (u64::from_le_bytes(m), i32::from_le_bytes(a))
}

/// The raised alarms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Alarms(BTreeSet<Alarm>);

impl Alarms {
    /// Applies `op`; returns the alarm it raised or disarmed, `None` when it changed nothing
    /// (etcd answers such a request with no alarm).
    pub fn apply(&mut self, op: &AlarmOp) -> Option<Alarm> {
        let changed = if op.activate {
            self.0.insert(op.alarm)
        } else {
            self.0.remove(&op.alarm)
        };
        changed.then_some(op.alarm)
    }

    /// Raised alarms of type `alarm` (every type for 0), by member.
    pub fn list(&self, alarm: i32) -> Vec<Alarm> {
        self.0
            .iter()
            .filter(|a| alarm == 0 || a.alarm == alarm)
            .copied()
            .collect()
    }

    pub fn has(&self, alarm: i32) -> bool {
        self.0.iter().any(|a| a.alarm == alarm)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `count:u32 | (member:u64 | alarm:i32)*`, little endian (a checkpoint's extras).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 + 12 * self.0.len());
        b.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for a in &self.0 {
            b.extend_from_slice(&a.member.to_le_bytes());
            b.extend_from_slice(&a.alarm.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Alarms, AlarmError> {
        if b.is_empty() {
            return Ok(Alarms::default());
        }
        let Some((n, rest)) = b.split_first_chunk::<4>() else {
            return Err(AlarmError::Malformed("alarm set count"));
        };
        let n = u32::from_le_bytes(*n) as usize;
        if rest.len() != n.saturating_mul(12) {
            return Err(AlarmError::Malformed("alarm set length"));
        }
        Ok(Alarms(
            rest.chunks_exact(12)
                .map(|c| {
                    let (member, alarm) = split(c);
                    Alarm { member, alarm }
                })
                .collect(),
        ))
    }
}

/// The node's alarm set, shared by every core; the flags mirror it for the request path.
#[derive(Debug, Default)]
pub struct SharedAlarms {
    set: Mutex<Alarms>,
    nospace: AtomicBool,
    corrupt: AtomicBool,
}

impl SharedAlarms {
    pub fn new(set: Alarms) -> SharedAlarms {
        let s = SharedAlarms::default();
        s.reset(set);
        s
    }

    fn lock(&self) -> MutexGuard<'_, Alarms> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, set: &Alarms) {
        self.nospace.store(set.has(NOSPACE), Ordering::Release);
        self.corrupt.store(set.has(CORRUPT), Ordering::Release);
    }

    pub fn apply(&self, op: &AlarmOp) -> Option<Alarm> {
        let mut set = self.lock();
        let changed = set.apply(op);
        self.publish(&set);
        changed
    }

    /// Replaces the set (a checkpoint loaded or installed).
    pub fn reset(&self, next: Alarms) {
        let mut set = self.lock();
        *set = next;
        self.publish(&set);
    }

    pub fn get(&self) -> Alarms {
        self.lock().clone()
    }

    /// Some member's NOSPACE alarm is raised.
    pub fn nospace(&self) -> bool {
        self.nospace.load(Ordering::Acquire)
    }

    /// Some member's CORRUPT alarm is raised.
    pub fn corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_and_sets_roundtrip_and_apply_idempotently() {
        let op = AlarmOp {
            activate: true,
            alarm: Alarm {
                member: 0x8e9e05c52164694d,
                alarm: NOSPACE,
            },
        };
        assert_eq!(AlarmOp::decode(&op.encode()), Ok(op));
        assert!(AlarmOp::decode(&[2; OP_LEN]).is_err());
        assert!(AlarmOp::decode(&[1; 3]).is_err());
        let mut set = Alarms::default();
        assert_eq!(set.apply(&op), Some(op.alarm));
        assert_eq!(set.apply(&op), None);
        assert!(set.has(NOSPACE) && !set.has(CORRUPT));
        let back = Alarms::decode(&set.encode()).unwrap();
        assert_eq!(back, set);
        assert_eq!(Alarms::decode(&[]).unwrap(), Alarms::default());
        assert!(Alarms::decode(&[1, 0, 0, 0, 9]).is_err());
        let off = AlarmOp {
            activate: false,
            ..op
        };
        assert_eq!(set.apply(&off), Some(op.alarm));
        assert!(set.is_empty());
        let shared = SharedAlarms::new(back);
        assert!(shared.nospace() && !shared.corrupt());
        shared.apply(&off);
        assert!(!shared.nospace());
    }
}
