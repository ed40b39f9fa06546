//! etcd's JSON gateway (`POST /v3/kv/range` …): JSON in and out with protobuf's JSON mapping and
//! proto field names, as etcd's grpc-gateway does (int64 as strings, bytes as base64). Requests are
//! translated to the gRPC messages and served by the same code as gRPC calls.

use std::rc::Rc;
use std::sync::OnceLock;

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::body::Incoming;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use super::auth::Caller;
use super::grpc::{Code, GrpcBody, Status};
use super::Ctx;

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::proto::DESCRIPTORS)
            .expect("descriptors built from our protos")
    })
}

/// Gateway path → (gRPC method, request message, response message).
fn route(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match path {
        "/v3/kv/range" => ("/etcdserverpb.KV/Range", "RangeRequest", "RangeResponse"),
        "/v3/kv/put" => ("/etcdserverpb.KV/Put", "PutRequest", "PutResponse"),
        "/v3/kv/deleterange" => (
            "/etcdserverpb.KV/DeleteRange",
            "DeleteRangeRequest",
            "DeleteRangeResponse",
        ),
        "/v3/kv/txn" => ("/etcdserverpb.KV/Txn", "TxnRequest", "TxnResponse"),
        p if p.starts_with("/v3/auth/") => return auth_route(p),
        "/v3/kv/compaction" => (
            "/etcdserverpb.KV/Compact",
            "CompactionRequest",
            "CompactionResponse",
        ),
        "/v3/maintenance/status" => (
            "/etcdserverpb.Maintenance/Status",
            "StatusRequest",
            "StatusResponse",
        ),
        "/v3/cluster/member/list" => (
            "/etcdserverpb.Cluster/MemberList",
            "MemberListRequest",
            "MemberListResponse",
        ),
        "/v3/lease/grant" => (
            "/etcdserverpb.Lease/LeaseGrant",
            "LeaseGrantRequest",
            "LeaseGrantResponse",
        ),
        "/v3/lease/revoke" | "/v3/kv/lease/revoke" => (
            "/etcdserverpb.Lease/LeaseRevoke",
            "LeaseRevokeRequest",
            "LeaseRevokeResponse",
        ),
        "/v3/lease/timetolive" | "/v3/kv/lease/timetolive" => (
            "/etcdserverpb.Lease/LeaseTimeToLive",
            "LeaseTimeToLiveRequest",
            "LeaseTimeToLiveResponse",
        ),
        "/v3/lease/leases" | "/v3/kv/lease/leases" => (
            "/etcdserverpb.Lease/LeaseLeases",
            "LeaseLeasesRequest",
            "LeaseLeasesResponse",
        ),
        // A streaming call behind etcd's gateway: one request, one `{"result": …}` answer.
        "/v3/lease/keepalive" => (
            super::lease::KEEP_ALIVE_ONCE,
            "LeaseKeepAliveRequest",
            "LeaseKeepAliveResponse",
        ),
        "/v3/lock/lock" => (
            super::lock::LOCK,
            "v3lockpb.LockRequest",
            "v3lockpb.LockResponse",
        ),
        "/v3/lock/unlock" => (
            super::lock::UNLOCK,
            "v3lockpb.UnlockRequest",
            "v3lockpb.UnlockResponse",
        ),
        "/v3/election/campaign" => (
            "/v3electionpb.Election/Campaign",
            "v3electionpb.CampaignRequest",
            "v3electionpb.CampaignResponse",
        ),
        "/v3/election/proclaim" => (
            "/v3electionpb.Election/Proclaim",
            "v3electionpb.ProclaimRequest",
            "v3electionpb.ProclaimResponse",
        ),
        "/v3/election/leader" => (
            "/v3electionpb.Election/Leader",
            "v3electionpb.LeaderRequest",
            "v3electionpb.LeaderResponse",
        ),
        "/v3/election/resign" => (
            "/v3electionpb.Election/Resign",
            "v3electionpb.ResignRequest",
            "v3electionpb.ResignResponse",
        ),
        _ => return None,
    })
}

/// etcd 3.4's `/v3/auth/*` routes (its rpc.proto HTTP annotations).
fn auth_route(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match path {
        "/v3/auth/enable" => (
            "/etcdserverpb.Auth/AuthEnable",
            "AuthEnableRequest",
            "AuthEnableResponse",
        ),
        "/v3/auth/disable" => (
            "/etcdserverpb.Auth/AuthDisable",
            "AuthDisableRequest",
            "AuthDisableResponse",
        ),
        "/v3/auth/user/add" => (
            "/etcdserverpb.Auth/UserAdd",
            "AuthUserAddRequest",
            "AuthUserAddResponse",
        ),
        "/v3/auth/user/get" => (
            "/etcdserverpb.Auth/UserGet",
            "AuthUserGetRequest",
            "AuthUserGetResponse",
        ),
        "/v3/auth/user/list" => (
            "/etcdserverpb.Auth/UserList",
            "AuthUserListRequest",
            "AuthUserListResponse",
        ),
        "/v3/auth/user/delete" => (
            "/etcdserverpb.Auth/UserDelete",
            "AuthUserDeleteRequest",
            "AuthUserDeleteResponse",
        ),
        "/v3/auth/user/changepw" => (
            "/etcdserverpb.Auth/UserChangePassword",
            "AuthUserChangePasswordRequest",
            "AuthUserChangePasswordResponse",
        ),
        "/v3/auth/user/grant" => (
            "/etcdserverpb.Auth/UserGrantRole",
            "AuthUserGrantRoleRequest",
            "AuthUserGrantRoleResponse",
        ),
        "/v3/auth/user/revoke" => (
            "/etcdserverpb.Auth/UserRevokeRole",
            "AuthUserRevokeRoleRequest",
            "AuthUserRevokeRoleResponse",
        ),
        "/v3/auth/role/add" => (
            "/etcdserverpb.Auth/RoleAdd",
            "AuthRoleAddRequest",
            "AuthRoleAddResponse",
        ),
        "/v3/auth/role/get" => (
            "/etcdserverpb.Auth/RoleGet",
            "AuthRoleGetRequest",
            "AuthRoleGetResponse",
        ),
        "/v3/auth/role/list" => (
            "/etcdserverpb.Auth/RoleList",
            "AuthRoleListRequest",
            "AuthRoleListResponse",
        ),
        "/v3/auth/role/delete" => (
            "/etcdserverpb.Auth/RoleDelete",
            "AuthRoleDeleteRequest",
            "AuthRoleDeleteResponse",
        ),
        "/v3/auth/role/grant" => (
            "/etcdserverpb.Auth/RoleGrantPermission",
            "AuthRoleGrantPermissionRequest",
            "AuthRoleGrantPermissionResponse",
        ),
        "/v3/auth/role/revoke" => (
            "/etcdserverpb.Auth/RoleRevokePermission",
            "AuthRoleRevokePermissionRequest",
            "AuthRoleRevokePermissionResponse",
        ),
        "/v3/auth/authenticate" => (
            "/etcdserverpb.Auth/Authenticate",
            "AuthenticateRequest",
            "AuthenticateResponse",
        ),
        _ => return None,
    })
}

fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json(status: StatusCode, body: String) -> Response<GrpcBody> {
    super::plain_owned(status, "application/json", body)
}

fn error(s: &Status) -> Response<GrpcBody> {
    let body =
        serde_json::json!({ "error": s.message, "code": s.code as i32, "message": s.message });
    json(http_status(s.code), body.to_string())
}

pub(super) async fn handle(
    ctx: &Rc<Ctx>,
    path: &str,
    body: Incoming,
    caller: Caller,
) -> Response<GrpcBody> {
    if path == "/v3/watch" {
        return watch(ctx, body, caller).await;
    }
    if path == "/v3/election/observe" {
        let method = "/v3electionpb.Election/Observe";
        if let Err(s) = super::auth::check(ctx, &caller, method, &[]).await {
            return error(&s);
        }
        return observe(ctx, body).await;
    }
    let Some((method, req_name, resp_name)) = route(path) else {
        return json(
            StatusCode::NOT_FOUND,
            "{\"error\":\"Not Found\",\"code\":5}".into(),
        );
    };
    match translate(ctx, method, req_name, resp_name, body, &caller).await {
        // grpc-gateway wraps each message of a streaming call.
        Ok(text) if method == super::lease::KEEP_ALIVE_ONCE => {
            json(StatusCode::OK, format!("{{\"result\":{text}}}"))
        }
        Ok(text) => json(StatusCode::OK, text),
        Err(s) => error(&s),
    }
}

async fn translate(
    ctx: &Rc<Ctx>,
    method: &str,
    req_name: &str,
    resp_name: &str,
    body: Incoming,
    caller: &Caller,
) -> Result<String, Status> {
    let encoded = json_request(ctx, body, req_name).await?;
    super::auth::check(ctx, caller, method, std::slice::from_ref(&encoded)).await?;
    let resp = super::call_anywhere(ctx, method, vec![encoded], None, super::Hop::Client).await?;
    to_json(resp_name, resp)
}

/// Reads one JSON request (an empty body is `{}`) and encodes it as the protobuf message
/// `req_name`, refused when larger than a gRPC request may be.
async fn json_request(ctx: &Ctx, body: Incoming, req_name: &str) -> Result<Bytes, Status> {
    let limit = ctx.cfg.max_request_bytes + super::GRPC_OVERHEAD_BYTES;
    // JSON (base64 values) is larger than the message it encodes; the message size is what
    // counts, as behind etcd's gateway.
    let bytes = super::read_body(body, 4 * limit).await?;
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let req = DynamicMessage::deserialize(descriptor(req_name)?, &mut de)
        .map_err(|e| Status::new(Code::InvalidArgument, format!("invalid JSON request: {e}")))?;
    let encoded = Bytes::from(prost::Message::encode_to_vec(&req));
    if encoded.len() > limit {
        return Err(super::grpc::too_large(encoded.len(), limit));
    }
    Ok(encoded)
}

/// A streaming gateway answer: each frame from `rx` is one `{"result": …}` line.
pub(super) fn json_stream(rx: flume::Receiver<http_body::Frame<Bytes>>) -> Response<GrpcBody> {
    let mut resp = Response::new(GrpcBody::Stream(Box::pin(rx.into_stream())));
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `POST /v3/election/observe`: one JSON LeaderRequest; the leaders stream back.
async fn observe(ctx: &Rc<Ctx>, body: Incoming) -> Response<GrpcBody> {
    let parsed = async {
        let encoded = json_request(ctx, body, "v3electionpb.LeaderRequest").await?;
        prost::Message::decode(encoded).map_err(|e| Status::new(Code::Internal, e.to_string()))
    };
    match parsed.await {
        Ok(req) => super::election::observe_json(ctx.clone(), req),
        Err(s) => error(&s),
    }
}

/// Bare names are etcdserverpb's; the lock and election messages come qualified.
fn descriptor(name: &str) -> Result<prost_reflect::MessageDescriptor, Status> {
    let full = if name.contains('.') {
        name.to_string()
    } else {
        format!("etcdserverpb.{name}")
    };
    pool()
        .get_message_by_name(&full)
        .ok_or_else(|| Status::new(Code::Internal, format!("no descriptor for {name}")))
}

/// An encoded `etcdserverpb` message as the gateway's JSON.
pub(super) fn to_json(name: &str, encoded: Bytes) -> Result<String, Status> {
    let msg = DynamicMessage::decode(descriptor(name)?, encoded)
        .map_err(|e| Status::new(Code::Internal, format!("response decoding: {e}")))?;
    let mut out = serde_json::Serializer::new(Vec::new());
    msg.serialize_with_options(
        &mut out,
        &SerializeOptions::new().use_proto_field_name(true),
    )
    .map_err(|e| Status::new(Code::Internal, format!("response encoding: {e}")))?;
    String::from_utf8(out.into_inner()).map_err(|e| Status::new(Code::Internal, e.to_string()))
}

/// `POST /v3/watch`: the body holds one or more JSON WatchRequests; the answer streams.
async fn watch(ctx: &Rc<Ctx>, body: Incoming, caller: Caller) -> Response<GrpcBody> {
    let limit = ctx.cfg.max_request_bytes + super::GRPC_OVERHEAD_BYTES;
    let parsed = async {
        let bytes = super::read_body(body, 4 * limit).await?;
        let desc = descriptor("WatchRequest")?;
        let bad = |e: &dyn std::fmt::Display| {
            Status::new(Code::InvalidArgument, format!("invalid JSON request: {e}"))
        };
        let mut reqs = Vec::new();
        for doc in serde_json::Deserializer::from_slice(&bytes).into_iter::<serde_json::Value>() {
            let doc = doc.map_err(|e| bad(&e))?;
            let msg = DynamicMessage::deserialize(desc.clone(), doc).map_err(|e| bad(&e))?;
            let req: crate::proto::etcdserverpb::WatchRequest =
                prost::Message::decode(Bytes::from(prost::Message::encode_to_vec(&msg)))
                    .map_err(|e| Status::new(Code::Internal, e.to_string()))?;
            reqs.push(req);
        }
        Ok::<_, Status>(reqs)
    };
    match parsed.await {
        Ok(reqs) => super::watch::serve_json(ctx.clone(), reqs, caller),
        Err(s) => error(&s),
    }
}
