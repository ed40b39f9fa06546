//! etcd 3.4's Auth service and the permission checks of every other call.
//!
//! - **Who calls.** A client's token travels in the `token` gRPC metadata header (or
//!   `authorization`, grpc-gateway's name for it, which etcd also reads). [`identify`] resolves
//!   it once per call (per stream for Watch). With auth disabled this is one atomic load and a
//!   bool: each core keeps an [`AuthView`] of the node's state and refreshes it only when the
//!   shared generation counter moved. Tokens a core has resolved are cached on the core for up
//!   to a second (then looked up, and so renewed, in the member's token table again); the cache
//!   is dropped whenever the auth state changes (a deleted user, a new password and a disable
//!   all invalidate tokens).
//! - **What is checked** ([`check`]), with etcd 3.4's rules: Range reads its range; Put writes
//!   its key (and reads it with `prev_kv`; a put with a lease also needs write on every key the
//!   lease holds); DeleteRange writes its range (reads it with `prev_kv`); Txn every compare
//!   (read) and every op, nested txns included; Watch creation reads its range (refused as a
//!   cancelled watch, as etcd does); LeaseRevoke writes every attached key. The Auth admin
//!   calls, Defragment, Hash, HashKV, Snapshot and member changes need role `root` (UserGet of
//!   oneself and RoleGet of a role one holds excepted; the maintenance calls answer with etcd's
//!   raw `auth: …` errors, code Unknown, as etcd's maintenance server does); the Lock/Election
//!   services need `root` too (stricter than etcd, see the design doc). Status, MemberList,
//!   Alarm, MoveLeader, Compact, LeaseTimeToLive (keys included) and lease grants and
//!   keep-alives are not checked, as in etcd 3.4 (an invalid token is still refused).
//! - **Passwords** are hashed and checked with bcrypt on glommio's blocking thread pool, never
//!   on the executor.
//! - **Clusters.** The member a client talks to resolves the token and checks permissions
//!   against its own applied auth state, then serves or relays the call; relayed calls are not
//!   checked again (the peer transport carries no metadata). Tokens are per member: a token
//!   works only on the member that issued it. JWT tokens (`--auth-token jwt,…`) carry their
//!   user, auth revision and expiry, signed: every member holding the key verifies them, and a
//!   token issued before the auth state last changed is refused on key access with `revision of
//!   auth store is old`, as in etcd.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::grpc::{Code, Status};
use super::{enc, one, Ctx};
use crate::auth::{AuthError, AuthOp, AuthReply, AuthView, Perm, SharedAuth, TokenInfo};
use crate::proto::etcdserverpb as pb;

/// How long a core trusts a token it resolved before asking the member's table again (which
/// renews the token's TTL).
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

/// Tokens a core caches at most (bounded memory with many clients; a miss costs one lookup).
const TOKEN_CACHE_MAX: usize = 4096;

/// One core's auth state: its view of the node's snapshot and the tokens it resolved.
pub(super) struct CoreAuth {
    view: RefCell<AuthView>,
    tokens: RefCell<HashMap<String, (TokenInfo, Instant)>>,
    bcrypt_cost: u32,
}

impl CoreAuth {
    pub(super) fn new(shared: &SharedAuth, bcrypt_cost: u32) -> CoreAuth {
        CoreAuth {
            view: RefCell::new(AuthView::new(shared)),
            tokens: RefCell::default(),
            bcrypt_cost,
        }
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// Auth was disabled when the call arrived: nothing is checked.
    Unchecked,
    /// No token.
    Anonymous,
    User(String),
    /// A valid JWT issued at an auth revision older than the store's: key permission checks
    /// fail with `revision of auth store is old` (the client re-authenticates), admin checks
    /// still go by the name, as in etcd.
    Stale(String),
    /// A token this member does not know (expired, from before a restart, from another
    /// member), or a JWT that does not verify.
    InvalidToken,
}

impl Caller {
    fn name(&self) -> &str {
        match self {
            Caller::User(u) | Caller::Stale(u) => u,
            _ => "",
        }
    }
}

fn status(e: AuthError) -> Status {
    Status::new(Code::from_wire(e.code()), e.message())
}

/// The caller of a request with these headers (see the module doc for the cost). `cert_user` is
/// the Common Name of the client's verified TLS certificate: with `--client-cert-auth` it names
/// the user when the call carries no token, as in etcd 3.4.
pub(crate) fn identify(ctx: &Ctx, headers: &http::HeaderMap, cert_user: Option<&str>) -> Caller {
    let token = headers
        .get("token")
        .or_else(|| headers.get("authorization"))
        .and_then(|v| v.to_str().ok());
    identify_token(ctx, token, cert_user)
}

/// The caller of a JSON gateway request: etcd's gateway passes on only the `Authorization`
/// header (the bare token, no `Bearer`), never a `token` header.
pub(crate) fn identify_gateway(ctx: &Ctx, headers: &http::HeaderMap) -> Caller {
    let token = headers.get("authorization").and_then(|v| v.to_str().ok());
    identify_token(ctx, token, None)
}

fn identify_token(ctx: &Ctx, token: Option<&str>, cert_user: Option<&str>) -> Caller {
    let shared = ctx.db.auth();
    let enabled = {
        let mut view = ctx.auth.view.borrow_mut();
        if view.refresh(shared) {
            ctx.auth.tokens.borrow_mut().clear();
        }
        view.snapshot().enabled()
    };
    if !enabled {
        return Caller::Unchecked;
    }
    let Some(token) = token else {
        return match cert_user {
            Some(cn) if ctx.cfg.client_cert_auth => Caller::User(cn.to_string()),
            _ => Caller::Anonymous,
        };
    };
    let now = Instant::now();
    if let Some((info, at)) = ctx.auth.tokens.borrow().get(token) {
        if now.duration_since(*at) < TOKEN_RECHECK {
            return caller_of(ctx, info);
        }
    }
    match shared.lookup_token(token) {
        Ok(info) => {
            let mut cache = ctx.auth.tokens.borrow_mut();
            if cache.len() >= TOKEN_CACHE_MAX {
                // Entries past their recheck time would be looked up again anyway.
                cache.retain(|_, (_, at)| now.duration_since(*at) < TOKEN_RECHECK);
                if cache.len() >= TOKEN_CACHE_MAX {
                    cache.clear();
                }
            }
            let caller = caller_of(ctx, &info);
            cache.insert(token.to_string(), (info, now));
            caller
        }
        Err(_) => {
            ctx.auth.tokens.borrow_mut().remove(token);
            Caller::InvalidToken
        }
    }
}

/// The caller a resolved token names: a JWT from an older auth revision is stale (etcd's
/// `revision of auth store is old` on key access).
fn caller_of(ctx: &Ctx, info: &TokenInfo) -> Caller {
    let current = ctx.auth.view.borrow().snapshot().revision();
    match info.revision {
        Some(rev) if rev < current => Caller::Stale(info.user.clone()),
        _ => Caller::User(info.user.clone()),
    }
}

/// A permission check against this core's current view.
fn perm(ctx: &Ctx, caller: &Caller, key: &[u8], range_end: &[u8], p: Perm) -> Result<(), Status> {
    if matches!(caller, Caller::Stale(_)) {
        return Err(status(AuthError::AuthOldRevision));
    }
    ctx.auth
        .view
        .borrow()
        .snapshot()
        .check(caller.name(), key, range_end, p)
        .map_err(status)
}

fn admin(ctx: &Ctx, caller: &Caller) -> Result<(), Status> {
    ctx.auth
        .view
        .borrow()
        .snapshot()
        .check_admin(caller.name())
        .map_err(status)
}

fn is_root(ctx: &Ctx, caller: &Caller) -> bool {
    ctx.auth.view.borrow().snapshot().is_admin(caller.name())
}

/// Watch creation: may the caller read the range? etcd answers a refusal with a cancelled
/// watch whose reason is the gRPC error's text.
pub(crate) fn watch_permitted(ctx: &Ctx, caller: &Caller, key: &[u8], range_end: &[u8]) -> bool {
    match caller {
        Caller::Unchecked => true,
        Caller::InvalidToken => false,
        _ => perm(ctx, caller, key, range_end, Perm::Read).is_ok(),
    }
}

/// etcd's cancel reason for a watch the caller may not read.
pub(crate) const WATCH_DENIED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

fn decode<M: prost::Message + Default>(msgs: &[Bytes]) -> Option<M> {
    msgs.first().and_then(|m| M::decode(m.clone()).ok())
}

/// Write permission on every key attached to `lease` (etcd's `checkLeasePuts`).
async fn lease_keys(ctx: &Ctx, caller: &Caller, lease: i64, p: Perm) -> Result<(), Status> {
    if lease == 0 || (matches!(caller, Caller::User(_)) && is_root(ctx, caller)) {
        return Ok(());
    }
    let Ok(ttl) = ctx.db.lease_time_to_live(lease, true).await else {
        // An unknown lease: the call itself answers.
        return Ok(());
    };
    for k in &ttl.keys {
        perm(ctx, caller, k, &[], p)?;
    }
    Ok(())
}

fn txn_ops(ctx: &Ctx, caller: &Caller, t: &pb::TxnRequest) -> Result<(), Status> {
    use pb::request_op::Request as R;
    for c in &t.compare {
        perm(ctx, caller, &c.key, &c.range_end, Perm::Read)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(R::RequestRange(r)) => perm(ctx, caller, &r.key, &r.range_end, Perm::Read)?,
            Some(R::RequestPut(p)) => {
                perm(ctx, caller, &p.key, &[], Perm::Write)?;
                if p.prev_kv {
                    perm(ctx, caller, &p.key, &[], Perm::Read)?;
                }
            }
            Some(R::RequestDeleteRange(d)) => {
                if d.prev_kv {
                    perm(ctx, caller, &d.key, &d.range_end, Perm::Read)?;
                }
                perm(ctx, caller, &d.key, &d.range_end, Perm::Write)?;
            }
            // etcd 3.4 does not look into nested txns; spindle does (never more permissive).
            Some(R::RequestTxn(n)) => txn_ops(ctx, caller, n)?,
            None => {}
        }
    }
    Ok(())
}

/// Maintenance calls etcd's maintenance server refuses to all but `root` itself.
const MAINTENANCE_ADMIN: [&str; 4] = [
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
];

/// An auth error as etcd's auth package words it, where etcd returns it without converting it
/// to its gRPC error (the maintenance server): code Unknown, `auth: …`.
fn raw_status(e: AuthError) -> Status {
    let text = match e {
        AuthError::UserNotFound => "user not found".to_string(),
        e => {
            let m = e.message();
            m.strip_prefix("etcdserver: ").unwrap_or(&m).to_string()
        }
    };
    Status::new(Code::Unknown, format!("auth: {text}"))
}

/// Whether the caller may make this unary call (or open this stream); see the module doc.
pub(crate) async fn check(
    ctx: &Ctx,
    caller: &Caller,
    path: &str,
    msgs: &[Bytes],
) -> Result<(), Status> {
    if *caller == Caller::Unchecked {
        return Ok(());
    }
    match path {
        // Not checked by etcd, whatever the token.
        "/etcdserverpb.Maintenance/Status"
        | "/etcdserverpb.Cluster/MemberList"
        | "/etcdserverpb.Auth/Authenticate" => return Ok(()),
        _ => {}
    }
    if MAINTENANCE_ADMIN.contains(&path) {
        // etcd's maintenance server checks these itself and returns the auth package's own
        // errors, which reach clients as Unknown.
        let checked = match caller {
            Caller::InvalidToken => Err(AuthError::InvalidAuthToken),
            _ => ctx.auth.view.borrow().snapshot().check_admin(caller.name()),
        };
        return checked.map_err(raw_status);
    }
    if *caller == Caller::InvalidToken {
        return Err(status(AuthError::InvalidAuthToken));
    }
    match path {
        "/etcdserverpb.KV/Range" => {
            if let Some(r) = decode::<pb::RangeRequest>(msgs) {
                perm(ctx, caller, &r.key, &r.range_end, Perm::Read)?;
            }
        }
        "/etcdserverpb.KV/Put" => {
            if let Some(p) = decode::<pb::PutRequest>(msgs) {
                perm(ctx, caller, &p.key, &[], Perm::Write)?;
                if p.prev_kv {
                    perm(ctx, caller, &p.key, &[], Perm::Read)?;
                }
                lease_keys(ctx, caller, p.lease, Perm::Write).await?;
            }
        }
        "/etcdserverpb.KV/DeleteRange" => {
            if let Some(d) = decode::<pb::DeleteRangeRequest>(msgs) {
                perm(ctx, caller, &d.key, &d.range_end, Perm::Write)?;
                if d.prev_kv {
                    perm(ctx, caller, &d.key, &d.range_end, Perm::Read)?;
                }
            }
        }
        "/etcdserverpb.KV/Txn" => {
            if let Some(t) = decode::<pb::TxnRequest>(msgs) {
                txn_ops(ctx, caller, &t)?;
            }
        }
        "/etcdserverpb.Lease/LeaseRevoke" => {
            if let Some(r) = decode::<pb::LeaseRevokeRequest>(msgs) {
                lease_keys(ctx, caller, r.id, Perm::Write).await?;
            }
        }
        "/etcdserverpb.Auth/UserGet" => {
            let name = decode::<pb::AuthUserGetRequest>(msgs).map(|r| r.name);
            if name.as_deref() != Some(caller.name()) || caller.name().is_empty() {
                admin(ctx, caller)?;
            }
        }
        "/etcdserverpb.Auth/RoleGet" => {
            let role = decode::<pb::AuthRoleGetRequest>(msgs).map(|r| r.role);
            let holds = role.is_some_and(|role| {
                ctx.db
                    .auth()
                    .read(|s| s.user(caller.name()).is_some_and(|u| u.has_role(&role)))
            });
            if !holds {
                admin(ctx, caller)?;
            }
        }
        p if p.starts_with("/etcdserverpb.Auth/")
            || p.starts_with("/v3lockpb.Lock/")
            || p.starts_with("/v3electionpb.Election/")
            || matches!(
                p,
                "/etcdserverpb.Cluster/MemberAdd"
                    | "/etcdserverpb.Cluster/MemberRemove"
                    | "/etcdserverpb.Cluster/MemberUpdate"
                    | "/etcdserverpb.Cluster/MemberPromote"
            ) =>
        {
            admin(ctx, caller)?
        }
        _ => {}
    }
    Ok(())
}

/// Runs `f` on glommio's blocking thread pool (bcrypt costs tens of milliseconds of CPU).
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(f).await
}

/// A follower that knows the leader relays the change before spending a bcrypt round on it (the
/// leader hashes the password itself); without a known leader the change waits for one as
/// writes do.
fn hash_here(ctx: &Ctx) -> Result<(), Status> {
    let leader = ctx.db.leader();
    if ctx.db.is_cluster_member() && leader != 0 && leader != ctx.member_id {
        return Err(crate::error::Error::NotLeader.into());
    }
    Ok(())
}

/// Logs an auth change on the leader (a follower's `not leader` is forwarded by the caller).
async fn change(ctx: &Ctx, op: AuthOp) -> Result<AuthReply, Status> {
    ctx.db.auth_change(op).await?.map_err(status)
}

/// The Auth service (`/etcdserverpb.Auth/*`), once [`check`] allowed the call.
pub(super) async fn call(ctx: &Rc<Ctx>, path: &str, msgs: Vec<Bytes>) -> Result<Bytes, Status> {
    let h = || Some(ctx.header(ctx.db.revision()));
    let method = path.strip_prefix("/etcdserverpb.Auth/").unwrap_or(path);
    match method {
        "AuthEnable" => {
            let _: pb::AuthEnableRequest = one(msgs)?;
            change(ctx, AuthOp::AuthEnable).await?;
            Ok(enc(&pb::AuthEnableResponse { header: h() }))
        }
        "AuthDisable" => {
            let _: pb::AuthDisableRequest = one(msgs)?;
            change(ctx, AuthOp::AuthDisable).await?;
            Ok(enc(&pb::AuthDisableResponse { header: h() }))
        }
        "Authenticate" => {
            let req: pb::AuthenticateRequest = one(msgs)?;
            let snap = ctx.db.auth().snapshot();
            let name = req.name.clone();
            let rev =
                blocking(move || snap.check_password(&req.name, req.password.as_bytes())).await;
            let rev = rev.map_err(status)?;
            let token = ctx.db.auth().issue_token(&name, rev).map_err(status)?;
            Ok(enc(&pb::AuthenticateResponse { header: h(), token }))
        }
        "UserAdd" => {
            let req: pb::AuthUserAddRequest = one(msgs)?;
            hash_here(ctx)?;
            let cost = ctx.auth.bcrypt_cost;
            let op = blocking(move || AuthOp::user_add(&req, cost))
                .await
                .map_err(status)?;
            change(ctx, op).await?;
            Ok(enc(&pb::AuthUserAddResponse { header: h() }))
        }
        "UserGet" => {
            let req: pb::AuthUserGetRequest = one(msgs)?;
            let roles = ctx
                .db
                .auth()
                .read(|s| s.user_get(&req.name))
                .map_err(status)?;
            Ok(enc(&pb::AuthUserGetResponse { header: h(), roles }))
        }
        "UserList" => {
            let _: pb::AuthUserListRequest = one(msgs)?;
            let users = ctx.db.auth().read(|s| s.user_list());
            Ok(enc(&pb::AuthUserListResponse { header: h(), users }))
        }
        "UserDelete" => {
            let req: pb::AuthUserDeleteRequest = one(msgs)?;
            change(ctx, AuthOp::UserDelete { name: req.name }).await?;
            Ok(enc(&pb::AuthUserDeleteResponse { header: h() }))
        }
        "UserChangePassword" => {
            let req: pb::AuthUserChangePasswordRequest = one(msgs)?;
            hash_here(ctx)?;
            let cost = ctx.auth.bcrypt_cost;
            let op = blocking(move || AuthOp::user_change_password(&req, cost))
                .await
                .map_err(status)?;
            change(ctx, op).await?;
            Ok(enc(&pb::AuthUserChangePasswordResponse { header: h() }))
        }
        "UserGrantRole" => {
            let req: pb::AuthUserGrantRoleRequest = one(msgs)?;
            let op = AuthOp::UserGrantRole {
                user: req.user,
                role: req.role,
            };
            change(ctx, op).await?;
            Ok(enc(&pb::AuthUserGrantRoleResponse { header: h() }))
        }
        "UserRevokeRole" => {
            let req: pb::AuthUserRevokeRoleRequest = one(msgs)?;
            let op = AuthOp::UserRevokeRole {
                name: req.name,
                role: req.role,
            };
            change(ctx, op).await?;
            Ok(enc(&pb::AuthUserRevokeRoleResponse { header: h() }))
        }
        "RoleAdd" => {
            let req: pb::AuthRoleAddRequest = one(msgs)?;
            change(ctx, AuthOp::RoleAdd { name: req.name }).await?;
            Ok(enc(&pb::AuthRoleAddResponse { header: h() }))
        }
        "RoleGet" => {
            let req: pb::AuthRoleGetRequest = one(msgs)?;
            let perms = ctx
                .db
                .auth()
                .read(|s| s.role_get(&req.role))
                .map_err(status)?;
            Ok(enc(&pb::AuthRoleGetResponse {
                header: h(),
                perm: perms.iter().map(|g| g.to_proto()).collect(),
            }))
        }
        "RoleList" => {
            let _: pb::AuthRoleListRequest = one(msgs)?;
            let roles = ctx.db.auth().read(|s| s.role_list());
            Ok(enc(&pb::AuthRoleListResponse { header: h(), roles }))
        }
        "RoleDelete" => {
            let req: pb::AuthRoleDeleteRequest = one(msgs)?;
            change(ctx, AuthOp::RoleDelete { role: req.role }).await?;
            Ok(enc(&pb::AuthRoleDeleteResponse { header: h() }))
        }
        "RoleGrantPermission" => {
            let req: pb::AuthRoleGrantPermissionRequest = one(msgs)?;
            let op = AuthOp::role_grant_permission(&req).map_err(status)?;
            change(ctx, op).await?;
            Ok(enc(&pb::AuthRoleGrantPermissionResponse { header: h() }))
        }
        "RoleRevokePermission" => {
            let req: pb::AuthRoleRevokePermissionRequest = one(msgs)?;
            let op = AuthOp::RoleRevokePermission {
                role: req.role,
                key: req.key.to_vec(),
                range_end: req.range_end.to_vec(),
            };
            change(ctx, op).await?;
            Ok(enc(&pb::AuthRoleRevokePermissionResponse { header: h() }))
        }
        _ => Err(Status::unimplemented(path)),
    }
}

/// Drops expired tokens every `ttl` (lookups expire lazily; this bounds memory). Runs on core
/// 0 until the store closes.
pub(super) async fn purge_loop(ctx: Rc<Ctx>, every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
        if ctx
            .drain
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        ctx.db.auth().purge_tokens();
    }
}
