//! The request path's view of the auth state: immutable, shared behind an `Arc`, rebuilt after
//! each change, so a permission check takes no lock and does no work per role.
//!
//! Each user's grants are folded, per permission, into sorted, disjoint, non-touching half-open
//! intervals. A request range is allowed iff the union of those intervals covers it, and since
//! touching intervals are merged, the union covers `[a, b)` iff the single interval starting at
//! or before `a` (found by binary search) reaches `b`.

use std::collections::HashMap;

use super::error::AuthError;
use super::password::{verify_password, PasswordHash};
use super::store::{AuthStore, PermType, ROOT_ROLE};

/// What a request needs: reads need READ or READWRITE, writes WRITE or READWRITE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Perm {
    Read,
    Write,
}

/// An interval's end: a key (exclusive) or past every key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum End {
    Key(Vec<u8>),
    Inf,
}

/// The keys `[key, range_end)` denote in etcd's encoding: empty `range_end` → the key alone
/// (`[key, key+"\0")`), `"\0"` → every key from `key` on. `None` for an empty range.
pub(crate) fn interval(key: &[u8], range_end: &[u8]) -> Option<(Vec<u8>, End)> {
    if range_end.is_empty() {
        let mut next = key.to_vec();
        next.push(0);
        Some((key.to_vec(), End::Key(next)))
    } else if range_end == [0] {
        Some((key.to_vec(), End::Inf))
    } else if range_end > key {
        Some((key.to_vec(), End::Key(range_end.to_vec())))
    } else {
        None
    }
}

/// Sorted, disjoint, non-touching half-open intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Intervals(Vec<(Vec<u8>, End)>);

impl Intervals {
    pub(crate) fn from_unsorted(mut v: Vec<(Vec<u8>, End)>) -> Intervals {
        v.sort();
        let mut out: Vec<(Vec<u8>, End)> = Vec::with_capacity(v.len());
        for (start, end) in v {
            if let Some((_, last_end)) = out.last_mut() {
                let touches = match last_end {
                    End::Inf => true,
                    End::Key(k) => start.as_slice() <= k.as_slice(),
                };
                if touches {
                    if end > *last_end {
                        *last_end = end;
                    }
                    continue;
                }
            }
            out.push((start, end));
        }
        Intervals(out)
    }

    /// Whether the union covers the request `[key, range_end)`, read as etcd encodes it, without
    /// allocating. A request whose range is empty or inverted (`range_end <= key`) selects
    /// nothing; it is checked as its start key, so it can never probe outside what the user may
    /// access. A single key `k` is `[k, k+"\0")`, and an end `e` reaches `k+"\0"` iff `e > k`.
    pub(crate) fn covers(&self, key: &[u8], range_end: &[u8]) -> bool {
        let i = self.0.partition_point(|(s, _)| s.as_slice() <= key);
        let Some((_, end)) = i.checked_sub(1).and_then(|j| self.0.get(j)) else {
            return false;
        };
        let End::Key(end) = end else {
            return true;
        };
        let end = end.as_slice();
        if range_end == [0] {
            false
        } else if range_end.is_empty() || range_end <= key {
            end > key
        } else {
            end >= range_end
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Clone, Debug)]
struct UserView {
    root: bool,
    read: Intervals,
    write: Intervals,
    password: PasswordHash,
    no_password: bool,
}

/// An immutable view of one auth revision, for permission checks and password checks.
#[derive(Clone, Debug)]
pub struct AuthSnapshot {
    enabled: bool,
    revision: u64,
    users: HashMap<String, UserView>,
}

impl AuthSnapshot {
    pub(crate) fn build(store: &AuthStore) -> AuthSnapshot {
        let mut users = HashMap::with_capacity(store.users.len());
        for (name, u) in &store.users {
            let mut read = Vec::new();
            let mut write = Vec::new();
            for role in &u.roles {
                // A granted role that does not exist as a role (only `root` can be) adds nothing.
                let Some(r) = store.roles.get(role) else {
                    continue;
                };
                for g in &r.perms {
                    // etcd 3.4 reads an empty begin key as +infinity, so a grant starting at ""
                    // grants nothing there (etcdctl sends "\0" for an empty prefix or from-key,
                    // etcd PR #8514); spindle is not more permissive than etcd.
                    if g.key.is_empty() {
                        continue;
                    }
                    let Some(ivl) = interval(&g.key, &g.range_end) else {
                        continue;
                    };
                    match g.perm {
                        PermType::Read => read.push(ivl),
                        PermType::Write => write.push(ivl),
                        PermType::ReadWrite => {
                            read.push(ivl.clone());
                            write.push(ivl);
                        }
                    }
                }
            }
            users.insert(
                name.clone(),
                UserView {
                    root: u.has_role(ROOT_ROLE),
                    read: Intervals::from_unsorted(read),
                    write: Intervals::from_unsorted(write),
                    password: u.password.clone(),
                    no_password: u.no_password,
                },
            );
        }
        AuthSnapshot {
            enabled: store.enabled,
            revision: store.revision,
            users,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// etcd's `isOpPermitted`: may `user` read (or write) `[key, range_end)`? With auth off
    /// everything is allowed; no user → `user name is empty` (etcd's answer to a request
    /// without a token); an unknown user → `permission denied`; role `root` → allowed; the empty
    /// key is never granted to anyone else.
    pub fn check(
        &self,
        user: &str,
        key: &[u8],
        range_end: &[u8],
        perm: Perm,
    ) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        let u = self.users.get(user).ok_or(AuthError::PermissionDenied)?;
        if u.root {
            return Ok(());
        }
        if key.is_empty() {
            // Unreachable through etcd's KV validation (`key is not provided`); denied as etcd's
            // interval tree would.
            return Err(AuthError::PermissionDenied);
        }
        let ivls = match perm {
            Perm::Read => &u.read,
            Perm::Write => &u.write,
        };
        if ivls.covers(key, range_end) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// etcd's `IsAdminPermitted`, for the Auth admin calls and anything else that needs role
    /// `root`: allowed with auth off; else no user → `user name is empty`, unknown user →
    /// `user name not found`, without role `root` → `permission denied`.
    pub fn check_admin(&self, user: &str) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        let u = self.users.get(user).ok_or(AuthError::UserNotFound)?;
        if u.root {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    pub fn is_admin(&self, user: &str) -> bool {
        self.check_admin(user).is_ok()
    }

    /// etcd's `CheckPassword`, run before an Authenticate is logged: the auth revision the
    /// token will carry, or `authentication failed` for an unknown user, a `no_password` user or
    /// a wrong password (one message for all, so names cannot be probed).
    pub fn check_password(&self, user: &str, password: &[u8]) -> Result<u64, AuthError> {
        if !self.enabled {
            return Err(AuthError::AuthNotEnabled);
        }
        let u = self.users.get(user).ok_or(AuthError::AuthFailed)?;
        if u.no_password || !verify_password(&u.password, password) {
            return Err(AuthError::AuthFailed);
        }
        Ok(self.revision)
    }

    /// The staleness rule: a request authorised at auth revision `rev` must not apply after the
    /// auth state moved on (see `token::check_auth_revision`).
    pub fn check_revision(&self, rev: u64) -> Result<(), AuthError> {
        super::token::check_auth_revision(rev, self.revision)
    }
}
