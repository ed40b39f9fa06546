//! Property tests: decoding never panics, encodings round-trip, every change moves the revision
//! by one, and the snapshot's interval check agrees with a naive model of etcd's rules.

use proptest::prelude::*;

use super::*;

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["", "root", "a", "b", "c"]).prop_map(str::to_string)
}

fn role_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["", "root", "r1", "r2", "r3"]).prop_map(str::to_string)
}

/// Keys over a tiny alphabet with the edge bytes, so ranges collide often.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', 0xff]), 0..=3)
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(vec![]), Just(vec![0u8]), key()]
}

fn perm_type() -> impl Strategy<Value = PermType> {
    prop::sample::select(vec![PermType::Read, PermType::Write, PermType::ReadWrite])
}

fn op() -> impl Strategy<Value = AuthOp> {
    prop_oneof![
        Just(AuthOp::AuthEnable),
        Just(AuthOp::AuthDisable),
        (name(), any::<bool>()).prop_map(|(name, no_password)| AuthOp::UserAdd {
            name,
            password_hash: if no_password { vec![] } else { b"h".to_vec() }.into(),
            no_password,
        }),
        name().prop_map(|name| AuthOp::UserGet { name }),
        Just(AuthOp::UserList),
        name().prop_map(|name| AuthOp::UserDelete { name }),
        (name(), key()).prop_map(|(name, hash)| AuthOp::UserChangePassword {
            name,
            password_hash: hash.into(),
        }),
        (name(), role_name()).prop_map(|(user, role)| AuthOp::UserGrantRole { user, role }),
        (name(), role_name()).prop_map(|(name, role)| AuthOp::UserRevokeRole { name, role }),
        role_name().prop_map(|name| AuthOp::RoleAdd { name }),
        role_name().prop_map(|role| AuthOp::RoleGet { role }),
        Just(AuthOp::RoleList),
        role_name().prop_map(|role| AuthOp::RoleDelete { role }),
        (role_name(), perm_type(), key(), range_end()).prop_map(|(name, p, k, e)| {
            AuthOp::RoleGrantPermission {
                name,
                perm: Grant::new(p, k, e),
            }
        }),
        (role_name(), key(), range_end()).prop_map(|(role, key, range_end)| {
            AuthOp::RoleRevokePermission {
                role,
                key,
                range_end,
            }
        }),
    ]
}

/// Ops weighted towards building state: users, roles and grants.
fn building_op() -> impl Strategy<Value = AuthOp> {
    prop_oneof![
        3 => (role_name(), perm_type(), key(), range_end()).prop_map(|(name, p, k, e)| {
            AuthOp::RoleGrantPermission { name, perm: Grant::new(p, k, e) }
        }),
        2 => (name(), role_name()).prop_map(|(user, role)| AuthOp::UserGrantRole { user, role }),
        1 => role_name().prop_map(|name| AuthOp::RoleAdd { name }),
        1 => name().prop_map(|name| AuthOp::UserAdd {
            name,
            password_hash: PasswordHash::default(),
            no_password: true,
        }),
        1 => op(),
    ]
}

/// A range's end in the model: `None` is past every key.
type ModelEnd = Option<Vec<u8>>;

fn succ(k: &[u8]) -> Vec<u8> {
    let mut v = k.to_vec();
    v.push(0);
    v
}

/// etcd's encoding of a range, read literally.
fn model_range(key: &[u8], end: &[u8]) -> Option<(Vec<u8>, ModelEnd)> {
    if end.is_empty() {
        Some((key.to_vec(), Some(succ(key))))
    } else if end == [0] {
        Some((key.to_vec(), None))
    } else if end > key {
        Some((key.to_vec(), Some(end.to_vec())))
    } else {
        None
    }
}

fn lt(p: &[u8], e: &ModelEnd) -> bool {
    match e {
        None => true,
        Some(e) => p < e.as_slice(),
    }
}

/// Naive coverage: walk from the request's start, jumping to the furthest end of any grant
/// that contains the current point, straight over the raw (unmerged) grants.
fn model_covers(grants: &[(Vec<u8>, ModelEnd)], start: &[u8], end: &ModelEnd) -> bool {
    let mut p = start.to_vec();
    loop {
        let mut best: Option<ModelEnd> = None;
        for (s, e) in grants {
            if s.as_slice() <= p.as_slice() && lt(&p, e) {
                best = match best {
                    None => Some(e.clone()),
                    Some(None) => Some(None),
                    Some(Some(b)) => match e {
                        None => Some(None),
                        Some(x) => Some(Some(if *x > b { x.clone() } else { b })),
                    },
                };
            }
        }
        match best {
            None => return false,
            Some(None) => return true,
            Some(Some(b)) => {
                if !lt(&b, end) {
                    return true;
                }
                p = b;
            }
        }
    }
}

fn model_check(
    st: &AuthStore,
    user: &str,
    key: &[u8],
    end: &[u8],
    perm: Perm,
) -> Result<(), AuthError> {
    if !st.enabled() {
        return Ok(());
    }
    if user.is_empty() {
        return Err(AuthError::UserEmpty);
    }
    let Some(u) = st.user(user) else {
        return Err(AuthError::PermissionDenied);
    };
    if u.roles.iter().any(|r| r == ROOT_ROLE) {
        return Ok(());
    }
    let mut grants = Vec::new();
    for r in &u.roles {
        for g in st.role(r).map(|r| r.perms.as_slice()).unwrap_or(&[]) {
            let applies = match perm {
                Perm::Read => g.perm != PermType::Write,
                Perm::Write => g.perm != PermType::Read,
            };
            if applies && !g.key.is_empty() {
                grants.extend(model_range(&g.key, &g.range_end));
            }
        }
    }
    if key.is_empty() {
        return Err(AuthError::PermissionDenied);
    }
    let (start, stop) = model_range(key, end).unwrap_or_else(|| (key.to_vec(), Some(succ(key))));
    if model_covers(&grants, &start, &stop) {
        Ok(())
    } else {
        Err(AuthError::PermissionDenied)
    }
}

/// The store without its revision, to see whether an op changed anything.
fn state(st: &AuthStore) -> AuthStore {
    let mut s = st.clone();
    s.revision = 0;
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = AuthOp::decode(&bytes);
        let _ = AuthStore::decode(&bytes);
    }

    #[test]
    fn ops_round_trip(op in op()) {
        let bytes = op.encode();
        prop_assert_eq!(AuthOp::decode(&bytes), Ok(op.clone()));
        prop_assert_eq!(op.encode(), bytes);
    }

    #[test]
    fn replicas_agree_and_revision_tracks_changes(ops in prop::collection::vec(op(), 0..40)) {
        let mut a = AuthStore::new();
        let mut b = AuthStore::new();
        for op in &ops {
            let before = a.clone();
            let res = a.apply(op);
            // A replica applying the logged bytes reaches the same state and answer.
            let logged = AuthOp::decode(&op.encode()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(b.apply(&logged), res.clone());
            prop_assert_eq!(&a, &b);
            if res.is_err() || !op.is_write() {
                prop_assert_eq!(&a, &before);
            } else if state(&a) != state(&before) {
                prop_assert_eq!(a.revision(), before.revision() + 1);
            } else {
                // etcd still bumps on a rewrite to the same value (same hash, same grant type).
                prop_assert!(a.revision() - before.revision() <= 1);
            }
        }
        let bytes = a.encode();
        let back = AuthStore::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &a);
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn snapshot_check_matches_model(
        ops in prop::collection::vec(building_op(), 0..30),
        enable in any::<bool>(),
        reqs in prop::collection::vec(
            (name(), key(), range_end(), prop::sample::select(vec![Perm::Read, Perm::Write])),
            1..20,
        ),
    ) {
        // Users and roles exist up front, so most random grants land somewhere.
        let mut st = AuthStore::new();
        for n in ["a", "b", "c"] {
            let _ = st.apply(&AuthOp::UserAdd { name: n.into(), password_hash: PasswordHash::default(), no_password: true });
        }
        for r in ["r1", "r2", "r3"] {
            let _ = st.apply(&AuthOp::RoleAdd { name: r.into() });
        }
        for op in &ops {
            let _ = st.apply(op);
        }
        if enable {
            let _ = st.apply(&AuthOp::UserAdd { name: "root".into(), password_hash: PasswordHash::default(), no_password: true });
            let _ = st.apply(&AuthOp::UserGrantRole { user: "root".into(), role: ROOT_ROLE.into() });
            let _ = st.apply(&AuthOp::AuthEnable);
        }
        let snap = st.snapshot();
        prop_assert_eq!(snap.enabled(), st.enabled());
        prop_assert_eq!(snap.revision(), st.revision());
        for (user, key, end, perm) in &reqs {
            prop_assert_eq!(
                snap.check(user, key, end, *perm),
                model_check(&st, user, key, end, *perm),
                "user {:?} key {:?} end {:?} perm {:?} store {:?}", user, key, end, perm, st
            );
        }
    }
}
