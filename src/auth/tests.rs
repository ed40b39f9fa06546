use std::time::{Duration, Instant};

use super::error::code;
use super::*;
use crate::proto::authpb;
use crate::proto::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthUserAddRequest, AuthUserChangePasswordRequest,
};

/// bcrypt's minimum cost keeps the tests fast; the format is the same.
const COST: u32 = 4;

fn s(x: &str) -> String {
    x.to_string()
}

fn user_add(name: &str) -> AuthOp {
    AuthOp::UserAdd {
        name: s(name),
        password_hash: PasswordHash::default(),
        no_password: true,
    }
}

fn grant_role(user: &str, role: &str) -> AuthOp {
    AuthOp::UserGrantRole {
        user: s(user),
        role: s(role),
    }
}

fn grant(role: &str, perm: PermType, key: &str, end: &[u8]) -> AuthOp {
    AuthOp::RoleGrantPermission {
        name: s(role),
        perm: Grant::new(perm, key.as_bytes(), end),
    }
}

/// A store with `root` (role root) and auth on.
fn enabled_store() -> AuthStore {
    let mut st = AuthStore::new();
    st.apply(&user_add("root")).unwrap();
    st.apply(&grant_role("root", ROOT_ROLE)).unwrap();
    st.apply(&AuthOp::AuthEnable).unwrap();
    st
}

#[test]
fn messages_and_codes_are_etcds() {
    use AuthError::*;
    let table: &[(AuthError, &str, u32)] = &[
        (RootUserNotExist, "etcdserver: root user does not exist", 9),
        (
            RootRoleNotExist,
            "etcdserver: root user does not have root role",
            9,
        ),
        (UserAlreadyExist, "etcdserver: user name already exists", 9),
        (UserEmpty, "etcdserver: user name is empty", 3),
        (UserNotFound, "etcdserver: user name not found", 9),
        (RoleAlreadyExist, "etcdserver: role name already exists", 9),
        (RoleNotFound, "etcdserver: role name not found", 9),
        (RoleEmpty, "etcdserver: role name is empty", 3),
        (
            AuthFailed,
            "etcdserver: authentication failed, invalid user ID or password",
            3,
        ),
        (PermissionDenied, "etcdserver: permission denied", 7),
        (
            RoleNotGranted,
            "etcdserver: role is not granted to the user",
            9,
        ),
        (
            PermissionNotGranted,
            "etcdserver: permission is not granted to the role",
            9,
        ),
        (
            AuthNotEnabled,
            "etcdserver: authentication is not enabled",
            9,
        ),
        (InvalidAuthToken, "etcdserver: invalid auth token", 16),
        (InvalidAuthMgmt, "etcdserver: invalid auth management", 3),
        (
            AuthOldRevision,
            "etcdserver: revision of auth store is old",
            3,
        ),
        (PermissionNotGiven, "etcdserver: permission not given", 3),
    ];
    for (e, msg, c) in table {
        assert_eq!(e.message(), *msg);
        assert_eq!(e.code(), *c, "{msg}");
    }
    // spindle's own server-side failures are Internal (13).
    assert_eq!(AuthError::TokenGeneration.code(), 13);
    assert_eq!(AuthError::Hash.code(), 13);
    assert_eq!(AuthError::PermissionDenied.code(), code::PERMISSION_DENIED);
    assert_eq!(AuthError::InvalidAuthToken.code(), code::UNAUTHENTICATED);
}

#[test]
fn new_store_is_disabled_at_revision_one() {
    let st = AuthStore::new();
    assert!(!st.enabled());
    assert_eq!(st.revision(), 1);
    assert_eq!(st.user_list(), Vec::<String>::new());
    assert_eq!(st.role_list(), Vec::<String>::new());
}

#[test]
fn enable_needs_root_user_with_root_role() {
    let mut st = AuthStore::new();
    assert_eq!(
        st.apply(&AuthOp::AuthEnable),
        Err(AuthError::RootUserNotExist)
    );
    st.apply(&user_add("root")).unwrap();
    assert_eq!(
        st.apply(&AuthOp::AuthEnable),
        Err(AuthError::RootRoleNotExist)
    );
    // Role root need not exist as a role to be granted.
    st.apply(&grant_role("root", ROOT_ROLE)).unwrap();
    let rev = st.revision();
    assert_eq!(st.apply(&AuthOp::AuthEnable), Ok(AuthReply::Done));
    assert!(st.enabled());
    assert_eq!(st.revision(), rev + 1);
    // Enabling again is accepted and changes nothing.
    assert_eq!(st.apply(&AuthOp::AuthEnable), Ok(AuthReply::Done));
    assert_eq!(st.revision(), rev + 1);
}

#[test]
fn disable_bumps_once_and_is_idempotent() {
    let mut st = enabled_store();
    let rev = st.revision();
    assert_eq!(st.apply(&AuthOp::AuthDisable), Ok(AuthReply::Done));
    assert!(!st.enabled());
    assert_eq!(st.revision(), rev + 1);
    assert_eq!(st.apply(&AuthOp::AuthDisable), Ok(AuthReply::Done));
    assert_eq!(st.revision(), rev + 1);
}

#[test]
fn user_add_get_list_delete() {
    let mut st = AuthStore::new();
    assert_eq!(st.apply(&user_add("")), Err(AuthError::UserEmpty));
    st.apply(&user_add("bob")).unwrap();
    st.apply(&user_add("alice")).unwrap();
    assert_eq!(st.revision(), 3);
    assert_eq!(st.apply(&user_add("bob")), Err(AuthError::UserAlreadyExist));
    assert_eq!(st.revision(), 3, "a failed op changes nothing");
    assert_eq!(
        st.apply(&AuthOp::UserList),
        Ok(AuthReply::Users(vec![s("alice"), s("bob")]))
    );
    assert_eq!(
        st.apply(&AuthOp::UserGet { name: s("bob") }),
        Ok(AuthReply::UserRoles(vec![]))
    );
    assert_eq!(
        st.apply(&AuthOp::UserGet { name: s("carol") }),
        Err(AuthError::UserNotFound)
    );
    assert_eq!(st.revision(), 3, "reads do not bump");
    st.apply(&AuthOp::UserDelete { name: s("bob") }).unwrap();
    assert_eq!(st.revision(), 4);
    assert_eq!(
        st.apply(&AuthOp::UserDelete { name: s("bob") }),
        Err(AuthError::UserNotFound)
    );
    assert_eq!(st.user_list(), vec![s("alice")]);
}

#[test]
fn user_add_prepares_hash_or_no_password() {
    let req = AuthUserAddRequest {
        name: s("u"),
        password: s("secret"),
        options: None,
    };
    let op = AuthOp::user_add(&req, COST).unwrap();
    let AuthOp::UserAdd {
        password_hash,
        no_password,
        ..
    } = &op
    else {
        panic!("{op:?}")
    };
    assert!(!no_password);
    assert!(password_hash.as_bytes().starts_with(b"$2a$04$"));
    assert!(verify_password(password_hash, b"secret"));
    assert!(!verify_password(password_hash, b"Secret"));

    let req = AuthUserAddRequest {
        name: s("np"),
        password: s("ignored"),
        options: Some(authpb::UserAddOptions { no_password: true }),
    };
    let op = AuthOp::user_add(&req, COST).unwrap();
    assert_eq!(
        op,
        AuthOp::UserAdd {
            name: s("np"),
            password_hash: PasswordHash::default(),
            no_password: true
        }
    );
    let mut st = AuthStore::new();
    st.apply(&op).unwrap();
    assert!(st.user("np").unwrap().no_password);
}

#[test]
fn change_password_keeps_roles_and_options() {
    let mut st = AuthStore::new();
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    st.apply(&user_add("u")).unwrap();
    st.apply(&grant_role("u", "r")).unwrap();
    let req = AuthUserChangePasswordRequest {
        name: s("u"),
        password: s("new"),
    };
    let op = AuthOp::user_change_password(&req, COST).unwrap();
    let rev = st.revision();
    st.apply(&op).unwrap();
    assert_eq!(st.revision(), rev + 1);
    let u = st.user("u").unwrap();
    assert!(verify_password(&u.password, b"new"));
    assert_eq!(u.roles, vec![s("r")]);
    assert!(u.no_password, "etcd keeps the option");
    let missing = AuthOp::UserChangePassword {
        name: s("x"),
        password_hash: PasswordHash::default(),
    };
    assert_eq!(st.apply(&missing), Err(AuthError::UserNotFound));
}

#[test]
fn grant_and_revoke_roles() {
    let mut st = AuthStore::new();
    st.apply(&user_add("u")).unwrap();
    st.apply(&AuthOp::RoleAdd { name: s("b") }).unwrap();
    st.apply(&AuthOp::RoleAdd { name: s("a") }).unwrap();
    assert_eq!(
        st.apply(&grant_role("x", "a")),
        Err(AuthError::UserNotFound)
    );
    assert_eq!(
        st.apply(&grant_role("u", "zz")),
        Err(AuthError::RoleNotFound)
    );
    st.apply(&grant_role("u", "b")).unwrap();
    st.apply(&grant_role("u", "a")).unwrap();
    let rev = st.revision();
    // Granting again is accepted without a change.
    assert_eq!(st.apply(&grant_role("u", "a")), Ok(AuthReply::Done));
    assert_eq!(st.revision(), rev);
    assert_eq!(st.user_get("u"), Ok(vec![s("a"), s("b")]));

    let revoke = |name: &str, role: &str| AuthOp::UserRevokeRole {
        name: s(name),
        role: s(role),
    };
    assert_eq!(st.apply(&revoke("x", "a")), Err(AuthError::UserNotFound));
    assert_eq!(st.apply(&revoke("u", "c")), Err(AuthError::RoleNotGranted));
    st.apply(&revoke("u", "a")).unwrap();
    assert_eq!(st.revision(), rev + 1);
    assert_eq!(st.user_get("u"), Ok(vec![s("b")]));
}

#[test]
fn role_add_get_list_delete_drops_grants() {
    let mut st = AuthStore::new();
    assert_eq!(
        st.apply(&AuthOp::RoleAdd { name: s("") }),
        Err(AuthError::RoleEmpty)
    );
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    assert_eq!(
        st.apply(&AuthOp::RoleAdd { name: s("r") }),
        Err(AuthError::RoleAlreadyExist)
    );
    st.apply(&AuthOp::RoleAdd { name: s("q") }).unwrap();
    assert_eq!(
        st.apply(&AuthOp::RoleList),
        Ok(AuthReply::Roles(vec![s("q"), s("r")]))
    );
    assert_eq!(
        st.apply(&AuthOp::RoleGet { role: s("r") }),
        Ok(AuthReply::RolePerms(vec![]))
    );
    assert_eq!(
        st.apply(&AuthOp::RoleGet { role: s("z") }),
        Err(AuthError::RoleNotFound)
    );
    st.apply(&user_add("u")).unwrap();
    st.apply(&grant_role("u", "r")).unwrap();
    st.apply(&grant_role("u", "q")).unwrap();
    st.apply(&AuthOp::RoleDelete { role: s("r") }).unwrap();
    assert_eq!(st.user_get("u"), Ok(vec![s("q")]));
    assert_eq!(
        st.apply(&AuthOp::RoleDelete { role: s("r") }),
        Err(AuthError::RoleNotFound)
    );
    // Re-adding the role does not give it back to the user.
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    assert_eq!(st.user_get("u"), Ok(vec![s("q")]));
}

#[test]
fn deleting_a_user_drops_its_grants() {
    let mut st = AuthStore::new();
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    st.apply(&user_add("u")).unwrap();
    st.apply(&grant_role("u", "r")).unwrap();
    st.apply(&AuthOp::UserDelete { name: s("u") }).unwrap();
    st.apply(&user_add("u")).unwrap();
    assert_eq!(st.user_get("u"), Ok(vec![]));
}

#[test]
fn root_is_protected_only_while_enabled() {
    let mut st = enabled_store();
    st.apply(&AuthOp::RoleAdd { name: s("root") }).unwrap();
    let rev = st.revision();
    let del_user = AuthOp::UserDelete { name: s("root") };
    let del_role = AuthOp::RoleDelete { role: s("root") };
    let revoke = AuthOp::UserRevokeRole {
        name: s("root"),
        role: s("root"),
    };
    assert_eq!(st.apply(&del_user), Err(AuthError::InvalidAuthMgmt));
    assert_eq!(st.apply(&del_role), Err(AuthError::InvalidAuthMgmt));
    assert_eq!(st.apply(&revoke), Err(AuthError::InvalidAuthMgmt));
    assert_eq!(st.revision(), rev);
    // Checked before existence, as etcd does.
    let mut bare = enabled_store();
    assert_eq!(bare.apply(&del_role), Err(AuthError::InvalidAuthMgmt));

    st.apply(&AuthOp::AuthDisable).unwrap();
    st.apply(&revoke).unwrap();
    st.apply(&del_role).unwrap();
    st.apply(&del_user).unwrap();
    assert_eq!(
        st.apply(&AuthOp::AuthEnable),
        Err(AuthError::RootUserNotExist)
    );
}

#[test]
fn grant_permission_updates_in_place_and_sorts() {
    let mut st = AuthStore::new();
    assert_eq!(
        st.apply(&grant("r", PermType::Read, "a", b"")),
        Err(AuthError::RoleNotFound)
    );
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    st.apply(&grant("r", PermType::Read, "k", b"")).unwrap();
    st.apply(&grant("r", PermType::Write, "a", b"b")).unwrap();
    st.apply(&grant("r", PermType::Read, "a", b"\0")).unwrap();
    let rev = st.revision();
    // Same range again: the type is replaced, the revision still moves (etcd's behaviour).
    st.apply(&grant("r", PermType::ReadWrite, "k", b""))
        .unwrap();
    assert_eq!(st.revision(), rev + 1);
    assert_eq!(
        st.role_get("r").unwrap(),
        vec![
            Grant::new(PermType::Read, "a", b"\0".to_vec()),
            Grant::new(PermType::Write, "a", "b"),
            Grant::new(PermType::ReadWrite, "k", ""),
        ]
    );
}

#[test]
fn revoke_permission_needs_exact_range() {
    let mut st = AuthStore::new();
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    st.apply(&grant("r", PermType::Read, "a", b"c")).unwrap();
    let revoke = |role: &str, key: &str, end: &str| AuthOp::RoleRevokePermission {
        role: s(role),
        key: key.into(),
        range_end: end.into(),
    };
    assert_eq!(
        st.apply(&revoke("x", "a", "c")),
        Err(AuthError::RoleNotFound)
    );
    assert_eq!(
        st.apply(&revoke("r", "a", "b")),
        Err(AuthError::PermissionNotGranted)
    );
    assert_eq!(
        st.apply(&revoke("r", "a", "")),
        Err(AuthError::PermissionNotGranted)
    );
    st.apply(&revoke("r", "a", "c")).unwrap();
    assert_eq!(st.role_get("r"), Ok(vec![]));
}

#[test]
fn grant_request_without_permission_is_refused() {
    let req = AuthRoleGrantPermissionRequest {
        name: s("r"),
        perm: None,
    };
    assert_eq!(
        AuthOp::role_grant_permission(&req),
        Err(AuthError::PermissionNotGiven)
    );
    let req = AuthRoleGrantPermissionRequest {
        name: s("r"),
        perm: Some(authpb::Permission {
            perm_type: 7,
            key: "a".into(),
            range_end: "".into(),
        }),
    };
    assert_eq!(
        AuthOp::role_grant_permission(&req),
        Err(AuthError::PermissionNotGiven)
    );
    let req = AuthRoleGrantPermissionRequest {
        name: s("r"),
        perm: Some(authpb::Permission {
            perm_type: 2,
            key: "a".into(),
            range_end: "b".into(),
        }),
    };
    assert_eq!(
        AuthOp::role_grant_permission(&req),
        Ok(grant("r", PermType::ReadWrite, "a", b"b"))
    );
}

#[test]
fn prefix_end_matches_clientv3() {
    assert_eq!(prefix_end(b"a"), b"b");
    assert_eq!(prefix_end(b"a\xff"), b"b");
    assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    assert_eq!(prefix_end(b""), b"\0");
}

/// A store where `u` has role `r` with the given grants, auth on.
fn snap_with(grants: &[(PermType, &str, &[u8])]) -> std::sync::Arc<AuthSnapshot> {
    let mut st = enabled_store();
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    for (p, k, e) in grants {
        st.apply(&grant("r", *p, k, e)).unwrap();
    }
    st.apply(&user_add("u")).unwrap();
    st.apply(&grant_role("u", "r")).unwrap();
    st.snapshot()
}

#[test]
fn check_single_key_range_prefix_and_from_key() {
    let pfx = prefix_end(b"p/");
    let sn = snap_with(&[
        (PermType::Read, "k", b""),
        (PermType::Write, "a", b"c"),
        (PermType::ReadWrite, "p/", &pfx),
        (PermType::Read, "x", b"\0"),
    ]);
    let ok = |k: &str, e: &[u8], p| sn.check("u", k.as_bytes(), e, p).is_ok();
    // single key grant
    assert!(ok("k", b"", Perm::Read));
    assert!(!ok("k", b"", Perm::Write));
    assert!(!ok("k0", b"", Perm::Read));
    assert!(ok("k", b"k\0", Perm::Read), "[k, k\\0) is the key alone");
    assert!(!ok("k", b"l", Perm::Read));
    // range grant
    assert!(ok("a", b"", Perm::Write));
    assert!(ok("bzzz", b"", Perm::Write));
    assert!(!ok("c", b"", Perm::Write));
    assert!(ok("a", b"c", Perm::Write));
    assert!(!ok("a", b"c\0", Perm::Write));
    assert!(!ok("a", b"", Perm::Read));
    // prefix, READWRITE counts for both
    assert!(ok("p/", &pfx, Perm::Read));
    assert!(ok("p/q", b"", Perm::Write));
    assert!(!ok("p", b"", Perm::Read));
    assert!(!ok("p/", b"\0", Perm::Read));
    // from-key
    assert!(ok("x", b"\0", Perm::Read));
    assert!(ok("y", b"\0", Perm::Read));
    assert!(ok("zzzz", b"", Perm::Read));
    assert!(!ok("w", b"\0", Perm::Read));
    assert!(!ok("x", b"\0", Perm::Write));
    // empty or inverted request ranges are checked as their start key
    assert!(ok("k", b"a", Perm::Read));
    assert!(!ok("j", b"a", Perm::Read));
}

#[test]
fn empty_key_grants_nothing_as_in_etcd() {
    // etcdctl's `--prefix ''` / `--from-key ''` send key "\0", range_end "\0": every key.
    let sn = snap_with(&[(PermType::Read, "\0", b"\0")]);
    assert_eq!(sn.check("u", b"\0", b"\0", Perm::Read), Ok(()));
    assert_eq!(sn.check("u", b"anything", b"", Perm::Read), Ok(()));
    // A raw grant starting at "" is etcd 3.4's +infinity: it grants nothing.
    let sn = snap_with(&[(PermType::Read, "", b"\0"), (PermType::Read, "", b"z")]);
    assert_eq!(
        sn.check("u", b"a", b"", Perm::Read),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(
        sn.check("u", b"", b"", Perm::Read),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(sn.check("root", b"", b"", Perm::Read), Ok(()));
}

#[test]
fn check_union_of_grants_across_roles() {
    let mut st = enabled_store();
    for r in ["r1", "r2"] {
        st.apply(&AuthOp::RoleAdd { name: s(r) }).unwrap();
    }
    st.apply(&grant("r1", PermType::Read, "a", b"c")).unwrap();
    st.apply(&grant("r2", PermType::ReadWrite, "c", b"e"))
        .unwrap();
    st.apply(&user_add("u")).unwrap();
    st.apply(&grant_role("u", "r1")).unwrap();
    let sn = st.snapshot();
    assert_eq!(
        sn.check("u", b"a", b"e", Perm::Read),
        Err(AuthError::PermissionDenied)
    );
    st.apply(&grant_role("u", "r2")).unwrap();
    let sn = st.snapshot();
    assert_eq!(sn.check("u", b"a", b"e", Perm::Read), Ok(()));
    assert_eq!(
        sn.check("u", b"a", b"e", Perm::Write),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(sn.check("u", b"c", b"e", Perm::Write), Ok(()));
}

#[test]
fn check_users_root_and_disabled() {
    let mut st = enabled_store();
    st.apply(&user_add("u")).unwrap();
    let sn = st.snapshot();
    assert!(sn.enabled());
    assert_eq!(sn.revision(), st.revision());
    assert_eq!(sn.check("root", b"any", b"\0", Perm::Write), Ok(()));
    assert_eq!(
        sn.check("u", b"a", b"", Perm::Read),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(
        sn.check("ghost", b"a", b"", Perm::Read),
        Err(AuthError::PermissionDenied)
    );
    assert_eq!(
        sn.check("", b"a", b"", Perm::Read),
        Err(AuthError::UserEmpty)
    );
    assert!(sn.is_admin("root"));
    assert!(!sn.is_admin("u"));
    assert_eq!(sn.check_admin("u"), Err(AuthError::PermissionDenied));
    assert_eq!(sn.check_admin("ghost"), Err(AuthError::UserNotFound));
    assert_eq!(sn.check_admin(""), Err(AuthError::UserEmpty));
    // Any user with role root is an admin.
    st.apply(&grant_role("u", ROOT_ROLE)).unwrap();
    assert!(st.snapshot().is_admin("u"));

    st.apply(&AuthOp::AuthDisable).unwrap();
    let sn = st.snapshot();
    assert!(!sn.enabled());
    assert_eq!(sn.check("", b"a", b"", Perm::Write), Ok(()));
    assert_eq!(sn.check("ghost", b"a", b"", Perm::Write), Ok(()));
    assert!(sn.is_admin(""));
}

#[test]
fn snapshot_merges_touching_intervals() {
    let sn_store = {
        let mut st = AuthStore::new();
        st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
        st.apply(&grant("r", PermType::Read, "a", b"b")).unwrap();
        st.apply(&grant("r", PermType::Read, "b", b"c")).unwrap();
        st.apply(&grant("r", PermType::Read, "c", b"")).unwrap();
        st.apply(&grant("r", PermType::Read, "e", b"f")).unwrap();
        st.apply(&user_add("u")).unwrap();
        st.apply(&grant_role("u", "r")).unwrap();
        st
    };
    let mut ivls = Vec::new();
    for g in &sn_store.role("r").unwrap().perms {
        ivls.extend(snapshot::interval(&g.key, &g.range_end));
    }
    let merged = snapshot::Intervals::from_unsorted(ivls);
    assert_eq!(merged.len(), 2, "{merged:?}");
}

#[test]
fn check_password_rules() {
    let mut st = enabled_store();
    let req = AuthUserAddRequest {
        name: s("u"),
        password: s("pw"),
        options: None,
    };
    st.apply(&AuthOp::user_add(&req, COST).unwrap()).unwrap();
    let sn = st.snapshot();
    assert_eq!(sn.check_password("u", b"pw"), Ok(st.revision()));
    assert_eq!(sn.check_password("u", b"px"), Err(AuthError::AuthFailed));
    assert_eq!(
        sn.check_password("ghost", b"pw"),
        Err(AuthError::AuthFailed)
    );
    // root was added with no_password in these tests: it can never log in with a password.
    assert_eq!(sn.check_password("root", b""), Err(AuthError::AuthFailed));
    st.apply(&AuthOp::AuthDisable).unwrap();
    assert_eq!(
        st.snapshot().check_password("u", b"pw"),
        Err(AuthError::AuthNotEnabled)
    );
}

#[test]
fn password_hash_format_and_bad_input() {
    let h = hash_password(b"x", COST).unwrap();
    assert_eq!(h.as_bytes().len(), 60);
    assert!(h.as_bytes().starts_with(b"$2a$04$"));
    assert_eq!(
        format!("{h:?}"),
        "PasswordHash(<60 bytes>)",
        "never printed"
    );
    assert_ne!(h, hash_password(b"x", COST).unwrap(), "salted");
    assert!(verify_password(&h, b"x"));
    assert!(!verify_password(&PasswordHash::default(), b""));
    assert!(!verify_password(&b"garbage".to_vec().into(), b"x"));
    assert!(!verify_password(&vec![0xff, 0xfe].into(), b"x"));
    assert_eq!(hash_password(b"x", 3), Err(AuthError::Hash));
    assert_eq!(password::effective_bcrypt_cost(3), DEFAULT_BCRYPT_COST);
    assert_eq!(password::effective_bcrypt_cost(12), 12);
}

#[test]
fn tokens_format_ttl_and_touch() {
    let t0 = Instant::now();
    let mut tk = SimpleTokens::new(Duration::from_secs(300));
    let a = tk.issue("u", 7, t0).unwrap();
    let (letters, index) = a.split_once('.').unwrap();
    assert_eq!(letters.len(), 16);
    assert!(letters.bytes().all(|b| b.is_ascii_alphabetic()));
    assert_eq!(index, "1");
    let b = tk.issue("u", 7, t0).unwrap();
    assert_ne!(a, b);
    assert!(b.ends_with(".2"));
    let c = tk.issue_at("v", 8, 41, t0).unwrap();
    assert!(c.ends_with(".41"));
    assert!(tk.issue("v", 8, t0).unwrap().ends_with(".42"));

    assert_eq!(tk.lookup(&a, t0), Ok((s("u"), 7)));
    assert_eq!(tk.lookup("nope.1", t0), Err(AuthError::InvalidAuthToken));
    // Using a token renews it: used at 299 s, it is still valid at 598 s.
    let t299 = t0 + Duration::from_secs(299);
    assert!(tk.lookup(&a, t299).is_ok());
    assert!(tk.lookup(&a, t299 + Duration::from_secs(299)).is_ok());
    // An unused token expires at its TTL.
    assert_eq!(
        tk.lookup(&b, t0 + Duration::from_secs(300)),
        Err(AuthError::InvalidAuthToken)
    );
    assert_eq!(
        tk.lookup(&b, t0),
        Err(AuthError::InvalidAuthToken),
        "an expired token is gone"
    );
}

#[test]
fn tokens_invalidate_clear_purge() {
    let t0 = Instant::now();
    let mut tk = SimpleTokens::default();
    assert_eq!(tk.ttl(), DEFAULT_TOKEN_TTL);
    let a = tk.issue("u", 1, t0).unwrap();
    let b = tk.issue("v", 1, t0).unwrap();
    tk.invalidate_user("u");
    assert_eq!(tk.lookup(&a, t0), Err(AuthError::InvalidAuthToken));
    assert!(tk.lookup(&b, t0).is_ok());
    let _c = tk.issue("w", 1, t0 + Duration::from_secs(200)).unwrap();
    assert_eq!(tk.purge_expired(t0 + Duration::from_secs(400)), 1);
    assert_eq!(tk.len(), 1);
    tk.clear();
    assert!(tk.is_empty());
}

#[test]
fn stale_revision_rule() {
    assert_eq!(check_auth_revision(5, 5), Ok(()));
    assert_eq!(check_auth_revision(6, 5), Ok(()));
    assert_eq!(check_auth_revision(4, 5), Err(AuthError::AuthOldRevision));
    assert_eq!(check_auth_revision(0, 5), Err(AuthError::UserEmpty));
    let st = enabled_store();
    let sn = st.snapshot();
    assert_eq!(
        sn.check_revision(st.revision() - 1),
        Err(AuthError::AuthOldRevision)
    );
    assert_eq!(sn.check_revision(st.revision()), Ok(()));
}

#[test]
fn every_op_round_trips() {
    let ops = vec![
        AuthOp::AuthEnable,
        AuthOp::AuthDisable,
        AuthOp::UserAdd {
            name: s("u"),
            password_hash: b"$2a$04$x".to_vec().into(),
            no_password: false,
        },
        user_add("np"),
        AuthOp::UserGet { name: s("u") },
        AuthOp::UserList,
        AuthOp::UserDelete { name: s("u") },
        AuthOp::UserChangePassword {
            name: s("u"),
            password_hash: b"h".to_vec().into(),
        },
        grant_role("u", "r"),
        AuthOp::UserRevokeRole {
            name: s("u"),
            role: s("r"),
        },
        AuthOp::RoleAdd { name: s("r") },
        AuthOp::RoleGet { role: s("r") },
        AuthOp::RoleList,
        AuthOp::RoleDelete { role: s("r") },
        grant("r", PermType::Read, "a", b"\0"),
        grant("r", PermType::Write, "", b""),
        AuthOp::RoleRevokePermission {
            role: s("r"),
            key: b"a".to_vec(),
            range_end: b"b".to_vec(),
        },
    ];
    for op in ops {
        let bytes = op.encode();
        assert_eq!(AuthOp::decode(&bytes), Ok(op.clone()));
        assert_eq!(bytes, op.encode(), "deterministic");
    }
}

#[test]
fn op_decode_errors_are_typed() {
    assert!(matches!(
        AuthOp::decode(&[0x08, 99]),
        Err(DecodeError::UnknownOp(99))
    ));
    assert!(matches!(
        AuthOp::decode(&[]),
        Err(DecodeError::UnknownOp(0))
    ));
    assert!(matches!(
        AuthOp::decode(&[0x08, 14]),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        AuthOp::decode(&[0xff]),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn store_round_trips_and_rejects_bad_checkpoints() {
    let mut st = enabled_store();
    st.apply(&AuthOp::RoleAdd { name: s("r") }).unwrap();
    st.apply(&grant("r", PermType::ReadWrite, "a", b"z"))
        .unwrap();
    st.apply(&user_add("u")).unwrap();
    st.apply(&grant_role("u", "r")).unwrap();
    let bytes = st.encode();
    let back = AuthStore::decode(&bytes).unwrap();
    assert_eq!(back, st);
    assert_eq!(back.encode(), bytes);
    assert_eq!(
        AuthStore::decode(&AuthStore::new().encode()),
        Ok(AuthStore::new())
    );

    // version 0 (an empty message) is not a checkpoint
    assert!(matches!(
        AuthStore::decode(&[]),
        Err(DecodeError::Version(0))
    ));
    // a duplicate user
    let mut dup = bytes.clone();
    let user = authpb::User {
        name: "u".into(),
        ..Default::default()
    };
    dup.push(0x22); // field 4, length-delimited
    let enc = prost::Message::encode_to_vec(&user);
    dup.push(enc.len() as u8);
    dup.extend(enc);
    assert!(matches!(
        AuthStore::decode(&dup),
        Err(DecodeError::Duplicate("user"))
    ));
    // a name that is not UTF-8
    let mut bad = bytes.clone();
    let user = authpb::User {
        name: vec![0xff].into(),
        ..Default::default()
    };
    let enc = prost::Message::encode_to_vec(&user);
    bad.push(0x22);
    bad.push(enc.len() as u8);
    bad.extend(enc);
    assert!(matches!(AuthStore::decode(&bad), Err(DecodeError::NotUtf8)));
}
