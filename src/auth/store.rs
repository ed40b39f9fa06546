//! The replicated auth state and etcd 3.4's semantics for every admin call.
//!
//! `AuthStore::apply` is a pure function of the store and a logged `AuthOp`: anything
//! non-deterministic (bcrypt's salt, request validation) happens before the op is built, so
//! every replica that applies the same log reaches the same state.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::proto::authpb;
use crate::proto::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthUserAddRequest, AuthUserChangePasswordRequest,
};

use super::error::AuthError;
use super::password::{hash_password, PasswordHash};
use super::snapshot::AuthSnapshot;

/// The user that may always enable auth and is never locked out while auth is on.
pub const ROOT_USER: &str = "root";
/// The role that grants everything; it need not exist as a role to be granted (as in etcd).
pub const ROOT_ROLE: &str = "root";

/// A role's permission type (etcd's `authpb.Permission.Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

impl PermType {
    pub fn from_proto(t: i32) -> Option<PermType> {
        match authpb::permission::Type::try_from(t).ok()? {
            authpb::permission::Type::Read => Some(PermType::Read),
            authpb::permission::Type::Write => Some(PermType::Write),
            authpb::permission::Type::Readwrite => Some(PermType::ReadWrite),
        }
    }

    pub fn to_proto(self) -> i32 {
        match self {
            PermType::Read => authpb::permission::Type::Read as i32,
            PermType::Write => authpb::permission::Type::Write as i32,
            PermType::ReadWrite => authpb::permission::Type::Readwrite as i32,
        }
    }
}

/// One permission of a role over `[key, range_end)`: an empty `range_end` is the single key,
/// `"\0"` means every key from `key` on (etcd's from-key; a prefix is `[p, prefix_end(p))`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub perm: PermType,
}

impl Grant {
    pub fn new(perm: PermType, key: impl Into<Vec<u8>>, range_end: impl Into<Vec<u8>>) -> Grant {
        Grant {
            key: key.into(),
            range_end: range_end.into(),
            perm,
        }
    }

    pub fn to_proto(&self) -> authpb::Permission {
        authpb::Permission {
            perm_type: self.perm.to_proto(),
            key: self.key.clone().into(),
            range_end: self.range_end.clone().into(),
        }
    }

    /// `None` when the type is not one etcd knows.
    pub fn from_proto(p: &authpb::Permission) -> Option<Grant> {
        Some(Grant::new(
            PermType::from_proto(p.perm_type)?,
            p.key.to_vec(),
            p.range_end.to_vec(),
        ))
    }
}

/// The range end that makes `[prefix, end)` exactly the keys starting with `prefix` (clientv3's
/// `GetPrefixRangeEnd`): the prefix with its last byte below 0xff incremented, or `"\0"`
/// (every key) when there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(b) = end.last_mut() {
                *b = last + 1;
            }
            return end;
        }
        end.pop();
    }
    vec![0]
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    /// bcrypt hash (`$2a$…`), empty for a user added with `no_password`.
    pub password: PasswordHash,
    /// Sorted and unique, as etcd keeps them.
    pub roles: Vec<String>,
    /// Added with `options.no_password`: can never authenticate with a password.
    pub no_password: bool,
}

impl User {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles
            .binary_search_by(|r| r.as_str().cmp(role))
            .is_ok()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Role {
    /// Sorted by (key, range_end), at most one per (key, range_end).
    pub perms: Vec<Grant>,
}

/// A logged auth command: already validated and, for passwords, already hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthOp {
    AuthEnable,
    AuthDisable,
    UserAdd {
        name: String,
        /// bcrypt hash; empty when `no_password`.
        password_hash: PasswordHash,
        no_password: bool,
    },
    UserGet {
        name: String,
    },
    UserList,
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: PasswordHash,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        name: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleGet {
        role: String,
    },
    RoleList,
    RoleDelete {
        role: String,
    },
    RoleGrantPermission {
        name: String,
        perm: Grant,
    },
    RoleRevokePermission {
        role: String,
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
}

impl AuthOp {
    /// UserAdd as it is logged: the password hashed here, once, on the member that received
    /// the request (bcrypt salts randomly, so hashing at apply time would diverge replicas).
    pub fn user_add(req: &AuthUserAddRequest, bcrypt_cost: u32) -> Result<AuthOp, AuthError> {
        let no_password = req.options.is_some_and(|o| o.no_password);
        if req.name.is_empty() {
            // Fails at apply with etcd's error; not worth a bcrypt round.
            return Ok(AuthOp::UserAdd {
                name: String::new(),
                password_hash: PasswordHash::default(),
                no_password,
            });
        }
        let password_hash = if no_password {
            PasswordHash::default()
        } else {
            hash_password(req.password.as_bytes(), bcrypt_cost)?
        };
        Ok(AuthOp::UserAdd {
            name: req.name.clone(),
            password_hash,
            no_password,
        })
    }

    /// UserChangePassword as it is logged, with the new password hashed.
    pub fn user_change_password(
        req: &AuthUserChangePasswordRequest,
        bcrypt_cost: u32,
    ) -> Result<AuthOp, AuthError> {
        Ok(AuthOp::UserChangePassword {
            name: req.name.clone(),
            password_hash: hash_password(req.password.as_bytes(), bcrypt_cost)?,
        })
    }

    /// RoleGrantPermission as it is logged; a request without a (known) permission is refused
    /// before it reaches the log.
    pub fn role_grant_permission(
        req: &AuthRoleGrantPermissionRequest,
    ) -> Result<AuthOp, AuthError> {
        let perm = req.perm.as_ref().ok_or(AuthError::PermissionNotGiven)?;
        let perm = Grant::from_proto(perm).ok_or(AuthError::PermissionNotGiven)?;
        Ok(AuthOp::RoleGrantPermission {
            name: req.name.clone(),
            perm,
        })
    }

    /// Whether applying the op can change the store (reads need not be logged to be correct,
    /// though etcd logs them to make them linearizable).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            AuthOp::UserGet { .. } | AuthOp::UserList | AuthOp::RoleGet { .. } | AuthOp::RoleList
        )
    }
}

/// What an applied op answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthReply {
    /// A change (or an accepted no-op such as enabling twice).
    Done,
    /// UserGet: the user's roles, sorted.
    UserRoles(Vec<String>),
    /// UserList: every user name, sorted.
    Users(Vec<String>),
    /// RoleList: every role name, sorted.
    Roles(Vec<String>),
    /// RoleGet: the role's permissions, sorted by key.
    RolePerms(Vec<Grant>),
}

/// The replicated auth state: users, roles, the enabled flag and the auth revision, which goes
/// up by one on every change so a token or request stamped with it can be recognised as stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthStore {
    pub(crate) enabled: bool,
    pub(crate) revision: u64,
    pub(crate) users: BTreeMap<String, User>,
    pub(crate) roles: BTreeMap<String, Role>,
}

impl Default for AuthStore {
    fn default() -> Self {
        AuthStore::new()
    }
}

impl AuthStore {
    /// An empty, disabled store. Its revision starts at 1, as etcd's does (0 means "no auth
    /// info" in etcd's permission checks).
    pub fn new() -> AuthStore {
        AuthStore {
            enabled: false,
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    pub fn users(&self) -> impl Iterator<Item = (&String, &User)> {
        self.users.iter()
    }

    pub fn roles(&self) -> impl Iterator<Item = (&String, &Role)> {
        self.roles.iter()
    }

    /// The immutable view the request path checks against; rebuild it after each change.
    pub fn snapshot(&self) -> Arc<AuthSnapshot> {
        Arc::new(AuthSnapshot::build(self))
    }

    fn commit(&mut self) -> Result<AuthReply, AuthError> {
        self.revision += 1;
        Ok(AuthReply::Done)
    }

    /// Applies one logged op with etcd 3.4's checks, in etcd's order. A failed op changes
    /// nothing; a successful change bumps the revision once; reads and accepted no-ops (enable
    /// twice, disable twice, granting a role already held) leave it.
    pub fn apply(&mut self, op: &AuthOp) -> Result<AuthReply, AuthError> {
        match op {
            AuthOp::AuthEnable => self.auth_enable(),
            AuthOp::AuthDisable => {
                if !self.enabled {
                    return Ok(AuthReply::Done);
                }
                self.enabled = false;
                self.commit()
            }
            AuthOp::UserAdd {
                name,
                password_hash,
                no_password,
            } => {
                if name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                let user = User {
                    password: if *no_password {
                        PasswordHash::default()
                    } else {
                        password_hash.clone()
                    },
                    roles: Vec::new(),
                    no_password: *no_password,
                };
                self.users.insert(name.clone(), user);
                self.commit()
            }
            AuthOp::UserGet { name } => self.user_get(name).map(AuthReply::UserRoles),
            AuthOp::UserList => Ok(AuthReply::Users(self.user_list())),
            AuthOp::UserDelete { name } => {
                if self.enabled && name == ROOT_USER {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                if self.users.remove(name).is_none() {
                    return Err(AuthError::UserNotFound);
                }
                self.commit()
            }
            AuthOp::UserChangePassword {
                name,
                password_hash,
            } => {
                let user = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
                // etcd keeps `no_password`: such a user still cannot authenticate.
                user.password = password_hash.clone();
                self.commit()
            }
            AuthOp::UserGrantRole { user, role } => {
                if !self.users.contains_key(user) {
                    return Err(AuthError::UserNotFound);
                }
                if role != ROOT_ROLE && !self.roles.contains_key(role) {
                    return Err(AuthError::RoleNotFound);
                }
                let u = self.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
                match u.roles.binary_search(role) {
                    Ok(_) => Ok(AuthReply::Done),
                    Err(at) => {
                        u.roles.insert(at, role.clone());
                        self.commit()
                    }
                }
            }
            AuthOp::UserRevokeRole { name, role } => {
                if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                let u = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
                let at = u
                    .roles
                    .binary_search(role)
                    .map_err(|_| AuthError::RoleNotGranted)?;
                u.roles.remove(at);
                self.commit()
            }
            AuthOp::RoleAdd { name } => {
                if name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                self.roles.insert(name.clone(), Role::default());
                self.commit()
            }
            AuthOp::RoleGet { role } => self.role_get(role).map(AuthReply::RolePerms),
            AuthOp::RoleList => Ok(AuthReply::Roles(self.role_list())),
            AuthOp::RoleDelete { role } => {
                if self.enabled && role == ROOT_ROLE {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                if self.roles.remove(role).is_none() {
                    return Err(AuthError::RoleNotFound);
                }
                // etcd 3.4 drops the role from every user, so a later role of the same name
                // does not silently regain them.
                for u in self.users.values_mut() {
                    if let Ok(at) = u.roles.binary_search(role) {
                        u.roles.remove(at);
                    }
                }
                self.commit()
            }
            AuthOp::RoleGrantPermission { name, perm } => {
                let r = self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)?;
                match r
                    .perms
                    .binary_search_by(|p| (&p.key, &p.range_end).cmp(&(&perm.key, &perm.range_end)))
                {
                    // The same range granted again replaces the type (etcd updates in place).
                    Ok(at) => r.perms[at].perm = perm.perm,
                    Err(at) => r.perms.insert(at, perm.clone()),
                }
                self.commit()
            }
            AuthOp::RoleRevokePermission {
                role,
                key,
                range_end,
            } => {
                let r = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
                let at = r
                    .perms
                    .binary_search_by(|p| (&p.key, &p.range_end).cmp(&(key, range_end)))
                    .map_err(|_| AuthError::PermissionNotGranted)?;
                r.perms.remove(at);
                self.commit()
            }
        }
    }

    fn auth_enable(&mut self) -> Result<AuthReply, AuthError> {
        if self.enabled {
            return Ok(AuthReply::Done);
        }
        let root = self
            .users
            .get(ROOT_USER)
            .ok_or(AuthError::RootUserNotExist)?;
        if !root.has_role(ROOT_ROLE) {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        // etcd 3.4 does not bump the revision here; spindle does, so that the revision alone
        // tells whether a snapshot is current. No token can predate it: none exist while off.
        self.commit()
    }

    pub fn user_get(&self, name: &str) -> Result<Vec<String>, AuthError> {
        self.users
            .get(name)
            .map(|u| u.roles.clone())
            .ok_or(AuthError::UserNotFound)
    }

    pub fn user_list(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_get(&self, role: &str) -> Result<Vec<Grant>, AuthError> {
        self.roles
            .get(role)
            .map(|r| r.perms.clone())
            .ok_or(AuthError::RoleNotFound)
    }

    pub fn role_list(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }
}
