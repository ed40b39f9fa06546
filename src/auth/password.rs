//! Password hashing with bcrypt, in etcd's `$2a$` format so hashes move between the two.
//!
//! Hashing is slow on purpose (cost 10 takes tens of milliseconds) and salted randomly, so it
//! runs once on the member that received the request, before the op is logged.

use std::fmt;

use super::error::AuthError;

/// A bcrypt hash. Its `Debug` does not print it: hashes end up in logged ops and stores, and a
/// leaked hash can be attacked offline.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PasswordHash(Vec<u8>);

impl PasswordHash {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for PasswordHash {
    fn from(v: Vec<u8>) -> Self {
        PasswordHash(v)
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PasswordHash(<{} bytes>)", self.0.len())
    }
}

/// etcd's `--bcrypt-cost` default (Go's `bcrypt.DefaultCost`).
pub const DEFAULT_BCRYPT_COST: u32 = 10;
/// bcrypt's own bounds.
pub const MIN_BCRYPT_COST: u32 = 4;
pub const MAX_BCRYPT_COST: u32 = 31;

/// The cost actually used: like etcd, an out-of-range `--bcrypt-cost` falls back to the default.
pub fn effective_bcrypt_cost(cost: u32) -> u32 {
    if (MIN_BCRYPT_COST..=MAX_BCRYPT_COST).contains(&cost) {
        cost
    } else {
        DEFAULT_BCRYPT_COST
    }
}

/// Hashes `password` with a fresh random salt. Passwords longer than 72 bytes are cut at 72, as
/// etcd 3.4's bcrypt does, so a hash made by either verifies on the other.
pub fn hash_password(password: &[u8], cost: u32) -> Result<PasswordHash, AuthError> {
    let parts = bcrypt::hash_with_result(password, cost).map_err(|_| AuthError::Hash)?;
    Ok(PasswordHash(
        parts.format_for_version(bcrypt::Version::TwoA).into_bytes(),
    ))
}

/// Whether `password` matches `hash` (the crate compares in constant time). A malformed or
/// empty hash matches nothing.
pub fn verify_password(hash: &PasswordHash, password: &[u8]) -> bool {
    let Ok(hash) = std::str::from_utf8(&hash.0) else {
        return false;
    };
    bcrypt::verify(password, hash).unwrap_or(false)
}
