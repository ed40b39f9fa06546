//! etcd's simple tokens: `<16 random letters>.<index>`, held in memory by the member that issued
//! them (they are not replicated), each expiring `ttl` after its last use.
//!
//! Time is an argument (`now`), never read here, so expiry is tested without sleeping. The
//! letters come from the OS random source: a token is a bearer credential and must not be
//! guessable.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::error::AuthError;

/// etcd's `--auth-token-ttl` default.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// etcd's simple token prefix length.
pub const TOKEN_LETTERS: usize = 16;

const LETTERS: &[u8; 52] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

#[derive(Clone, Debug)]
struct Entry {
    user: String,
    revision: u64,
    expires: Instant,
}

/// Issued tokens and their expiry.
#[derive(Debug)]
pub struct SimpleTokens {
    ttl: Duration,
    tokens: HashMap<String, Entry>,
    next_index: u64,
}

impl Default for SimpleTokens {
    fn default() -> Self {
        SimpleTokens::new(DEFAULT_TOKEN_TTL)
    }
}

impl SimpleTokens {
    pub fn new(ttl: Duration) -> SimpleTokens {
        SimpleTokens {
            ttl,
            tokens: HashMap::new(),
            next_index: 1,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a token for `user`, authenticated at auth `revision`, numbered by an internal
    /// counter (see `issue_at` to number it by the log index, as etcd does).
    pub fn issue(&mut self, user: &str, revision: u64, now: Instant) -> Result<String, AuthError> {
        let index = self.next_index;
        self.issue_at(user, revision, index, now)
    }

    /// Issues a token whose suffix is `index` (etcd uses the Raft index of the Authenticate
    /// entry, which makes tokens unique across a member's restarts).
    pub fn issue_at(
        &mut self,
        user: &str,
        revision: u64,
        index: u64,
        now: Instant,
    ) -> Result<String, AuthError> {
        self.next_index = self.next_index.max(index.saturating_add(1));
        loop {
            let token = format!("{}.{}", random_letters()?, index);
            if self.tokens.contains_key(&token) {
                continue; // 52^16 makes this practically unreachable; never reuse a token.
            }
            self.tokens.insert(
                token.clone(),
                Entry {
                    user: user.to_string(),
                    revision,
                    expires: now + self.ttl,
                },
            );
            return Ok(token);
        }
    }

    /// The user and auth revision of a live token; using it renews its TTL (etcd's
    /// `resetSimpleToken`). Unknown or expired → `invalid auth token`.
    pub fn lookup(&mut self, token: &str, now: Instant) -> Result<(String, u64), AuthError> {
        let Some(e) = self.tokens.get_mut(token) else {
            return Err(AuthError::InvalidAuthToken);
        };
        if e.expires <= now {
            self.tokens.remove(token);
            return Err(AuthError::InvalidAuthToken);
        }
        e.expires = now + self.ttl;
        Ok((e.user.clone(), e.revision))
    }

    /// Drops every token of `user` (etcd does this when the user is deleted or its password
    /// changes).
    pub fn invalidate_user(&mut self, user: &str) {
        self.tokens.retain(|_, e| e.user != user);
    }

    /// Drops every token (auth disabled).
    pub fn clear(&mut self) {
        self.tokens.clear();
    }

    /// Drops expired tokens; returns how many. Lookups expire lazily; this bounds memory.
    pub fn purge_expired(&mut self, now: Instant) -> usize {
        let before = self.tokens.len();
        self.tokens.retain(|_, e| e.expires > now);
        before - self.tokens.len()
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// 16 letters drawn uniformly from a-zA-Z (rejection sampling keeps the draw unbiased).
fn random_letters() -> Result<String, AuthError> {
    let mut out = String::with_capacity(TOKEN_LETTERS);
    let mut buf = [0u8; 32];
    while out.len() < TOKEN_LETTERS {
        getrandom::fill(&mut buf).map_err(|_| AuthError::TokenGeneration)?;
        for &b in &buf {
            // 208 = 4 × 52: bytes at or above it would favour the first letters.
            if b < 208 && out.len() < TOKEN_LETTERS {
                out.push(char::from(LETTERS[usize::from(b % 52)]));
            }
        }
    }
    Ok(out)
}

/// etcd's staleness rule: a request authorised at auth revision `request_rev` fails with
/// `revision of auth store is old` once the store is past it, so a permission revoked between
/// the check and the apply is not bypassed. Revision 0 means no auth info at all.
pub fn check_auth_revision(request_rev: u64, store_rev: u64) -> Result<(), AuthError> {
    if request_rev == 0 {
        return Err(AuthError::UserEmpty);
    }
    if request_rev < store_rev {
        return Err(AuthError::AuthOldRevision);
    }
    Ok(())
}
