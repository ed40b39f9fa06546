//! Auth errors with etcd 3.4's exact messages and gRPC codes, because clients (etcdctl, clientv3)
//! match on the message text and the code.

/// gRPC status codes etcd uses for auth errors.
pub mod code {
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const INTERNAL: u32 = 13;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// An auth failure. `message()` is etcd's text (`rpctypes.ErrGRPC*`), `code()` its gRPC code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Deleting user or role `root`, or revoking role `root` from user `root`, while auth is on.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// The request was authorised against an older auth revision than the store's now.
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// A grant without a permission (etcd 3.4 would crash on it; 3.5's message is used).
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// The OS random source failed while minting a token; nothing was issued.
    #[error("etcdserver: failed to generate auth token")]
    TokenGeneration,
    /// Authenticate on a member started with only a JWT `pub-key`: it verifies tokens but
    /// cannot sign them (etcd's error, which reaches clients as code Unknown).
    #[error("auth: token signing attempted with verify-only key")]
    VerifyOnlyKey,
    /// bcrypt refused the input (cost out of range); nothing was hashed.
    #[error("etcdserver: failed to hash password")]
    Hash,
}

impl AuthError {
    /// etcd's message, exactly as its gRPC status carries it.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The gRPC status code etcd returns with this error.
    pub fn code(&self) -> u32 {
        use AuthError::*;
        match self {
            UserEmpty | RoleEmpty | AuthFailed | InvalidAuthMgmt | AuthOldRevision
            | PermissionNotGiven => code::INVALID_ARGUMENT,
            PermissionDenied => code::PERMISSION_DENIED,
            InvalidAuthToken => code::UNAUTHENTICATED,
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound
            | RoleAlreadyExist | RoleNotFound | RoleNotGranted | PermissionNotGranted
            | AuthNotEnabled => code::FAILED_PRECONDITION,
            // A server-side failure, not the client's fault.
            TokenGeneration | Hash => code::INTERNAL,
            VerifyOnlyKey => code::UNKNOWN,
        }
    }
}

/// Bytes that are not a valid encoded auth op or auth store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("auth: malformed record: {0}")]
    Malformed(String),
    #[error("auth: unknown op kind {0}")]
    UnknownOp(u32),
    #[error("auth: unknown permission type {0}")]
    UnknownPermType(i32),
    #[error("auth: name is not valid UTF-8")]
    NotUtf8,
    #[error("auth: duplicate {0}")]
    Duplicate(&'static str),
    #[error("auth: unsupported format version {0}")]
    Version(u32),
}

impl From<prost::DecodeError> for DecodeError {
    fn from(e: prost::DecodeError) -> Self {
        DecodeError::Malformed(e.to_string())
    }
}
