//! The node's auth state, shared by every core: the store (changed only by applied log records),
//! the immutable snapshot the request path checks against, a generation counter that moves on
//! every change, and this member's tokens (simple ones in a table, or a JWT signer/verifier).
//!
//! The request path never locks: each core keeps an [`AuthView`] (generation + `Arc` of the
//! snapshot) and refreshes it only when the counter moved, so a request costs one atomic load
//! (and, with auth disabled, a bool). The mutexes are taken by auth changes, by a core's first
//! request after a change, and by token checks a core has not cached (see `server::auth`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use super::error::AuthError;
use super::jwt::JwtTokens;
use super::snapshot::AuthSnapshot;
use super::store::{AuthOp, AuthReply, AuthStore};
use super::token::SimpleTokens;

/// Shared auth state of one node (one `Arc` for all cores).
#[derive(Debug)]
pub struct SharedAuth {
    generation: AtomicU64,
    store: Mutex<AuthStore>,
    snapshot: Mutex<Arc<AuthSnapshot>>,
    tokens: Mutex<SimpleTokens>,
    /// Set once at start with `--auth-token jwt,…`; then it issues and verifies every token.
    jwt: OnceLock<Arc<JwtTokens>>,
}

/// Who a token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub user: String,
    /// The auth revision a JWT was issued at; `None` for a simple token, which (as in etcd)
    /// stands for the store's current revision.
    pub revision: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SharedAuth {
    pub fn new(store: AuthStore) -> SharedAuth {
        SharedAuth {
            generation: AtomicU64::new(1),
            snapshot: Mutex::new(store.snapshot()),
            store: Mutex::new(store),
            tokens: Mutex::new(SimpleTokens::default()),
            jwt: OnceLock::new(),
        }
    }

    /// Serves JWT tokens instead of simple ones (`--auth-token jwt,…`); the first call wins.
    pub fn set_jwt(&self, jwt: Arc<JwtTokens>) {
        let _ = self.jwt.set(jwt);
    }

    /// Sets the simple tokens' TTL (`--auth-token-ttl`); existing tokens are dropped if it
    /// changes.
    pub fn set_token_ttl(&self, ttl: Duration) {
        let mut tokens = lock(&self.tokens);
        if tokens.ttl() != ttl {
            *tokens = SimpleTokens::new(ttl);
        }
    }

    /// Moves on every change of the store; a core refreshes its view when it differs.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<AuthSnapshot> {
        lock(&self.snapshot).clone()
    }

    /// Reads the store (auth reads: UserGet, RoleList, …).
    pub fn read<R>(&self, f: impl FnOnce(&AuthStore) -> R) -> R {
        f(&lock(&self.store))
    }

    /// The store's bytes (`AuthStore::encode`), for a checkpoint.
    pub fn encode(&self) -> Vec<u8> {
        lock(&self.store).encode()
    }

    /// What applying `op` would give, without changing anything: the new store and the reply.
    /// The leader logs an op only if this succeeds, then [`SharedAuth::commit`]s the store in
    /// the same step as the proposal.
    pub fn try_apply(&self, op: &AuthOp) -> Result<(AuthStore, AuthReply), AuthError> {
        let mut next = lock(&self.store).clone();
        let reply = next.apply(op)?;
        Ok((next, reply))
    }

    /// Installs the store `try_apply` computed for `op` (logged meanwhile).
    pub fn commit(&self, op: &AuthOp, next: AuthStore) {
        let mut store = lock(&self.store);
        let changed = *store != next;
        *store = next;
        if changed {
            self.publish(&store, Some(op));
        }
    }

    /// Applies a logged op (WAL replay, a follower's committed entries). A logged op was
    /// validated against the same state, so an error changes nothing and is ignored.
    pub fn apply(&self, op: &AuthOp) {
        let mut store = lock(&self.store);
        let before = store.revision();
        let was_enabled = store.enabled();
        if store.apply(op).is_ok() && (store.revision() != before || store.enabled() != was_enabled)
        {
            self.publish(&store, Some(op));
        }
    }

    /// Replaces the whole store (a checkpoint loaded by a rebuild or a snapshot install).
    pub fn reset(&self, next: AuthStore) {
        let mut store = lock(&self.store);
        if *store != next {
            *store = next;
            lock(&self.tokens).clear();
            self.publish(&store, None);
        }
    }

    fn publish(&self, store: &AuthStore, op: Option<&AuthOp>) {
        match op {
            Some(AuthOp::UserDelete { name }) | Some(AuthOp::UserChangePassword { name, .. }) => {
                lock(&self.tokens).invalidate_user(name)
            }
            Some(AuthOp::AuthDisable) => lock(&self.tokens).clear(),
            _ => {}
        }
        *lock(&self.snapshot) = store.snapshot();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Issues a token for `user`, authenticated at auth `revision`.
    pub fn issue_token(&self, user: &str, revision: u64) -> Result<String, AuthError> {
        match self.jwt.get() {
            Some(jwt) => jwt.issue(user, revision, unix_now()),
            None => lock(&self.tokens).issue(user, revision, Instant::now()),
        }
    }

    /// Who a live token names (renewing a simple one), or `invalid auth token`.
    pub fn lookup_token(&self, token: &str) -> Result<TokenInfo, AuthError> {
        match self.jwt.get() {
            Some(jwt) => jwt
                .verify(token, unix_now())
                .map(|(user, revision)| TokenInfo {
                    user,
                    revision: Some(revision),
                }),
            None => lock(&self.tokens)
                .lookup(token, Instant::now())
                .map(|(user, _)| TokenInfo {
                    user,
                    revision: None,
                }),
        }
    }

    /// Drops expired tokens (called periodically).
    pub fn purge_tokens(&self) -> usize {
        lock(&self.tokens).purge_expired(Instant::now())
    }
}

/// Wall-clock time since the Unix epoch (JWT `exp` is wall-clock, unlike simple tokens' TTL).
fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// One core's view of the shared state: refreshed only when the generation moved.
#[derive(Debug)]
pub struct AuthView {
    generation: u64,
    snapshot: Arc<AuthSnapshot>,
}

impl AuthView {
    pub fn new(shared: &SharedAuth) -> AuthView {
        AuthView {
            generation: shared.generation(),
            snapshot: shared.snapshot(),
        }
    }

    /// The current snapshot: one atomic load unless the state changed since the last call.
    /// Returns whether it was refreshed (a core's token cache is dropped then).
    pub fn refresh(&mut self, shared: &SharedAuth) -> bool {
        let g = shared.generation();
        if g == self.generation {
            return false;
        }
        // Read the generation before the snapshot: a change in between leaves a newer snapshot
        // under an older number, which the next call refreshes again.
        self.snapshot = shared.snapshot();
        self.generation = g;
        true
    }

    pub fn snapshot(&self) -> &Arc<AuthSnapshot> {
        &self.snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::PasswordHash;

    fn add(name: &str) -> AuthOp {
        AuthOp::UserAdd {
            name: name.into(),
            password_hash: PasswordHash::default(),
            no_password: true,
        }
    }

    #[test]
    fn views_follow_changes_and_tokens_die_with_their_user() {
        let shared = SharedAuth::new(AuthStore::new());
        let mut view = AuthView::new(&shared);
        assert!(!view.refresh(&shared));
        let (next, _) = shared.try_apply(&add("u")).unwrap();
        shared.commit(&add("u"), next);
        assert!(view.refresh(&shared));
        assert!(!view.refresh(&shared));
        let t = shared.issue_token("u", 2).unwrap();
        assert_eq!(shared.lookup_token(&t).unwrap().user, "u");
        shared.apply(&AuthOp::UserDelete { name: "u".into() });
        assert_eq!(shared.lookup_token(&t), Err(AuthError::InvalidAuthToken));
        assert!(view.refresh(&shared));
        // A failed op changes nothing and does not move the generation.
        let g = shared.generation();
        shared.apply(&AuthOp::UserDelete { name: "u".into() });
        assert_eq!(shared.generation(), g);
        assert!(shared
            .try_apply(&AuthOp::UserDelete { name: "u".into() })
            .is_err());
    }
}
