//! etcd 3.4's auth (users, roles, key-range permissions, simple tokens) as a pure core: no IO,
//! no clock, no server wiring.
//!
//! - `store`: the replicated state and `apply` for every admin call, deterministic per log op;
//! - `codec`: bytes of an op (a log record) and of the store (a checkpoint);
//! - `snapshot`: the immutable, `Arc`-shared view the request path checks permissions against;
//! - `password`: bcrypt hashing, done before an op is logged;
//! - `token`: etcd's simple tokens with their TTL, and the stale-revision rule;
//! - `jwt`: etcd's JWT tokens (`--auth-token jwt,…`), verifiable on every member;
//! - `shared`: the node's state shared by every core, and each core's lock-free view of it.

mod codec;
pub mod error;
pub mod jwt;
pub mod password;
pub mod shared;
pub mod snapshot;
pub mod store;
pub mod token;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use error::{AuthError, DecodeError};
pub use jwt::{parse_auth_token, JwtTokens, TokenKind, TokenOptError};
pub use password::{hash_password, verify_password, PasswordHash, DEFAULT_BCRYPT_COST};
pub use shared::{AuthView, SharedAuth, TokenInfo};
pub use snapshot::{AuthSnapshot, Perm};
pub use store::{
    prefix_end, AuthOp, AuthReply, AuthStore, Grant, PermType, Role, User, ROOT_ROLE, ROOT_USER,
};
pub use token::{check_auth_revision, SimpleTokens, DEFAULT_TOKEN_TTL};
