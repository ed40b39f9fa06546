//! Bytes of auth ops (log records) and of the whole auth store (checkpoints).
//!
//! Both are protobuf (prost), reusing etcd's `authpb.User`/`Role`/`Permission` for users and
//! roles. Encoding is deterministic: fields in tag order, users and roles in name order,
//! permissions sorted. Decoding validates everything the store relies on (UTF-8 names, known
//! permission types, no duplicates) and returns a typed error, never panics.

use std::collections::BTreeMap;

use prost::Message;

use crate::proto::authpb;

use super::error::DecodeError;
use super::store::{AuthOp, AuthStore, Grant, Role, User};

/// One logged op. A flat message: each kind uses the fields it needs and leaves the rest at
/// their defaults (which protobuf does not encode).
#[derive(Clone, PartialEq, Message)]
struct OpRecord {
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "3")]
    role: String,
    #[prost(bytes = "vec", tag = "4")]
    password_hash: Vec<u8>,
    #[prost(bool, tag = "5")]
    no_password: bool,
    #[prost(message, optional, tag = "6")]
    perm: Option<authpb::Permission>,
    #[prost(bytes = "vec", tag = "7")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    range_end: Vec<u8>,
}

/// The whole store.
#[derive(Clone, PartialEq, Message)]
struct StoreRecord {
    #[prost(uint32, tag = "1")]
    version: u32,
    #[prost(bool, tag = "2")]
    enabled: bool,
    #[prost(uint64, tag = "3")]
    revision: u64,
    #[prost(message, repeated, tag = "4")]
    users: Vec<authpb::User>,
    #[prost(message, repeated, tag = "5")]
    roles: Vec<authpb::Role>,
}

const STORE_VERSION: u32 = 1;

// Op kinds. Never renumber: they are in logs on disk.
const AUTH_ENABLE: u32 = 1;
const AUTH_DISABLE: u32 = 2;
const USER_ADD: u32 = 3;
const USER_GET: u32 = 4;
const USER_LIST: u32 = 5;
const USER_DELETE: u32 = 6;
const USER_CHANGE_PASSWORD: u32 = 7;
const USER_GRANT_ROLE: u32 = 8;
const USER_REVOKE_ROLE: u32 = 9;
const ROLE_ADD: u32 = 10;
const ROLE_GET: u32 = 11;
const ROLE_LIST: u32 = 12;
const ROLE_DELETE: u32 = 13;
const ROLE_GRANT_PERMISSION: u32 = 14;
const ROLE_REVOKE_PERMISSION: u32 = 15;

fn rec(kind: u32) -> OpRecord {
    OpRecord {
        kind,
        ..OpRecord::default()
    }
}

impl AuthOp {
    /// The op's log record.
    pub fn encode(&self) -> Vec<u8> {
        let r = match self {
            AuthOp::AuthEnable => rec(AUTH_ENABLE),
            AuthOp::AuthDisable => rec(AUTH_DISABLE),
            AuthOp::UserAdd {
                name,
                password_hash,
                no_password,
            } => OpRecord {
                name: name.clone(),
                password_hash: password_hash.as_bytes().to_vec(),
                no_password: *no_password,
                ..rec(USER_ADD)
            },
            AuthOp::UserGet { name } => OpRecord {
                name: name.clone(),
                ..rec(USER_GET)
            },
            AuthOp::UserList => rec(USER_LIST),
            AuthOp::UserDelete { name } => OpRecord {
                name: name.clone(),
                ..rec(USER_DELETE)
            },
            AuthOp::UserChangePassword {
                name,
                password_hash,
            } => OpRecord {
                name: name.clone(),
                password_hash: password_hash.as_bytes().to_vec(),
                ..rec(USER_CHANGE_PASSWORD)
            },
            AuthOp::UserGrantRole { user, role } => OpRecord {
                name: user.clone(),
                role: role.clone(),
                ..rec(USER_GRANT_ROLE)
            },
            AuthOp::UserRevokeRole { name, role } => OpRecord {
                name: name.clone(),
                role: role.clone(),
                ..rec(USER_REVOKE_ROLE)
            },
            AuthOp::RoleAdd { name } => OpRecord {
                role: name.clone(),
                ..rec(ROLE_ADD)
            },
            AuthOp::RoleGet { role } => OpRecord {
                role: role.clone(),
                ..rec(ROLE_GET)
            },
            AuthOp::RoleList => rec(ROLE_LIST),
            AuthOp::RoleDelete { role } => OpRecord {
                role: role.clone(),
                ..rec(ROLE_DELETE)
            },
            AuthOp::RoleGrantPermission { name, perm } => OpRecord {
                role: name.clone(),
                perm: Some(perm.to_proto()),
                ..rec(ROLE_GRANT_PERMISSION)
            },
            AuthOp::RoleRevokePermission {
                role,
                key,
                range_end,
            } => OpRecord {
                role: role.clone(),
                key: key.clone(),
                range_end: range_end.clone(),
                ..rec(ROLE_REVOKE_PERMISSION)
            },
        };
        r.encode_to_vec()
    }

    /// Parses a log record written by `encode`.
    pub fn decode(bytes: &[u8]) -> Result<AuthOp, DecodeError> {
        let r = OpRecord::decode(bytes)?;
        Ok(match r.kind {
            AUTH_ENABLE => AuthOp::AuthEnable,
            AUTH_DISABLE => AuthOp::AuthDisable,
            USER_ADD => AuthOp::UserAdd {
                name: r.name,
                password_hash: r.password_hash.into(),
                no_password: r.no_password,
            },
            USER_GET => AuthOp::UserGet { name: r.name },
            USER_LIST => AuthOp::UserList,
            USER_DELETE => AuthOp::UserDelete { name: r.name },
            USER_CHANGE_PASSWORD => AuthOp::UserChangePassword {
                name: r.name,
                password_hash: r.password_hash.into(),
            },
            USER_GRANT_ROLE => AuthOp::UserGrantRole {
                user: r.name,
                role: r.role,
            },
            USER_REVOKE_ROLE => AuthOp::UserRevokeRole {
                name: r.name,
                role: r.role,
            },
            ROLE_ADD => AuthOp::RoleAdd { name: r.role },
            ROLE_GET => AuthOp::RoleGet { role: r.role },
            ROLE_LIST => AuthOp::RoleList,
            ROLE_DELETE => AuthOp::RoleDelete { role: r.role },
            ROLE_GRANT_PERMISSION => {
                let p = r
                    .perm
                    .ok_or_else(|| DecodeError::Malformed("grant without permission".into()))?;
                let perm =
                    Grant::from_proto(&p).ok_or(DecodeError::UnknownPermType(p.perm_type))?;
                AuthOp::RoleGrantPermission { name: r.role, perm }
            }
            ROLE_REVOKE_PERMISSION => AuthOp::RoleRevokePermission {
                role: r.role,
                key: r.key,
                range_end: r.range_end,
            },
            other => return Err(DecodeError::UnknownOp(other)),
        })
    }
}

fn utf8(b: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::NotUtf8)
}

/// A user as etcd stores it (`authpb.User`, in its `authUsers` bucket).
fn user_proto(name: &str, u: &User) -> authpb::User {
    authpb::User {
        name: name.as_bytes().to_vec().into(),
        password: u.password.as_bytes().to_vec().into(),
        roles: u.roles.clone(),
        options: Some(authpb::UserAddOptions {
            no_password: u.no_password,
        }),
    }
}

/// A role as etcd stores it (`authpb.Role`, in its `authRoles` bucket).
fn role_proto(name: &str, r: &Role) -> authpb::Role {
    authpb::Role {
        name: name.as_bytes().to_vec().into(),
        key_permission: r.perms.iter().map(Grant::to_proto).collect(),
    }
}

impl AuthStore {
    /// The users as etcd's backend holds them: name, encoded `authpb.User`; by name.
    pub fn etcd_users(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.users
            .iter()
            .map(|(n, u)| (n.as_bytes().to_vec(), user_proto(n, u).encode_to_vec()))
            .collect()
    }

    /// The roles as etcd's backend holds them: name, encoded `authpb.Role`; by name.
    pub fn etcd_roles(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.roles
            .iter()
            .map(|(n, r)| (n.as_bytes().to_vec(), role_proto(n, r).encode_to_vec()))
            .collect()
    }

    /// The store etcd's backend describes: its `authEnabled` flag, `authRevision`, and the
    /// `authUsers`/`authRoles` buckets (name → encoded `authpb.User`/`authpb.Role`).
    pub fn from_etcd(
        enabled: bool,
        revision: u64,
        users: &[(Vec<u8>, Vec<u8>)],
        roles: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<AuthStore, DecodeError> {
        let users = users
            .iter()
            .map(|(_, v)| authpb::User::decode(v.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        let roles = roles
            .iter()
            .map(|(_, v)| authpb::Role::decode(v.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        let record = StoreRecord {
            version: STORE_VERSION,
            enabled,
            revision,
            users,
            roles,
        };
        AuthStore::decode(&record.encode_to_vec())
    }

    /// The whole store, for a checkpoint.
    pub fn encode(&self) -> Vec<u8> {
        let users = self.users.iter().map(|(n, u)| user_proto(n, u)).collect();
        let roles = self.roles.iter().map(|(n, r)| role_proto(n, r)).collect();
        StoreRecord {
            version: STORE_VERSION,
            enabled: self.enabled,
            revision: self.revision,
            users,
            roles,
        }
        .encode_to_vec()
    }

    /// Parses a checkpoint written by `encode`. Lists are re-sorted, so the result is a store
    /// `apply` could have built; duplicates are refused rather than silently merged.
    pub fn decode(bytes: &[u8]) -> Result<AuthStore, DecodeError> {
        let r = StoreRecord::decode(bytes)?;
        if r.version != STORE_VERSION {
            return Err(DecodeError::Version(r.version));
        }
        let mut users = BTreeMap::new();
        for u in r.users {
            let name = utf8(&u.name)?;
            let mut roles = u.roles;
            roles.sort();
            if roles.windows(2).any(|w| w[0] == w[1]) {
                return Err(DecodeError::Duplicate("role of a user"));
            }
            let user = User {
                password: u.password.to_vec().into(),
                roles,
                no_password: u.options.is_some_and(|o| o.no_password),
            };
            if users.insert(name, user).is_some() {
                return Err(DecodeError::Duplicate("user"));
            }
        }
        let mut roles = BTreeMap::new();
        for role in r.roles {
            let name = utf8(&role.name)?;
            let mut perms = role
                .key_permission
                .iter()
                .map(|p| Grant::from_proto(p).ok_or(DecodeError::UnknownPermType(p.perm_type)))
                .collect::<Result<Vec<Grant>, DecodeError>>()?;
            perms.sort();
            if perms
                .windows(2)
                .any(|w| (&w[0].key, &w[0].range_end) == (&w[1].key, &w[1].range_end))
            {
                return Err(DecodeError::Duplicate("permission of a role"));
            }
            if roles.insert(name, Role { perms }).is_some() {
                return Err(DecodeError::Duplicate("role"));
            }
        }
        Ok(AuthStore {
            enabled: r.enabled,
            revision: r.revision,
            users,
            roles,
        })
    }
}
