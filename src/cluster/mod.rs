//! Cluster membership, IO-free: parsing etcd's bootstrap flags, deriving member and cluster ids
//! the way etcd does, and the membership record a data dir keeps.
//!
//! Ids must match etcd's for the same flags, because operators compare `etcdctl member list`
//! output across tools and scripts pass ids around: a founding member's id is the first 8 bytes
//! (big-endian) of SHA-1 over its sorted peer URLs concatenated with the cluster token; the
//! cluster id is the same over the sorted member ids' big-endian bytes. A member added at run
//! time also mixes in the time of the addition, so re-adding the same URLs yields a new id.

use std::collections::BTreeMap;
use std::fmt;

use sha1::{Digest, Sha1};

use crate::raft::ConfChange;

/// etcd's default `--initial-cluster-token`.
pub const DEFAULT_TOKEN: &str = "etcd-cluster";

/// Why cluster flags or a stored membership were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("--initial-cluster: {entry:?} is not NAME=URL")]
    MalformedEntry { entry: String },
    #[error("--initial-cluster: URL {url:?} is not http://host:port or https://host:port")]
    BadUrl { url: String },
    #[error("--initial-cluster has no member named {name:?} (it names {names})")]
    NotInCluster { name: String, names: String },
    #[error("--initial-cluster lists peer URL {url} twice")]
    DuplicateUrl { url: String },
    #[error(
        "--initial-advertise-peer-urls {advertised} do not match --initial-cluster's URLs for \
         {name} ({listed})"
    )]
    AdvertiseMismatch {
        name: String,
        advertised: String,
        listed: String,
    },
    #[error("membership record: {0}")]
    Corrupt(String),
}

/// Why peer URLs given to MemberAdd or MemberUpdate were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerUrlError {
    Invalid,
    Exists,
}

/// One member as every node records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: u64,
    /// Empty until the member has started and published itself (etcd shows such members as
    /// "unstarted").
    pub name: String,
    pub peer_urls: Vec<String>,
    #[serde(default)]
    pub client_urls: Vec<String>,
    #[serde(default)]
    pub is_learner: bool,
}

/// The cluster as a data dir records it: its id and members by id.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    pub cluster_id: u64,
    pub token: String,
    pub members: BTreeMap<u64, Member>,
}

/// A hex member or cluster id as etcd prints them.
pub struct Hex(pub u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// etcd's member id: SHA-1 over the sorted peer URLs, the cluster token and (for members added
/// at run time) the Unix time of the addition.
pub fn member_id(peer_urls: &[String], token: &str, added_at_unix: Option<u64>) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    let mut h = Sha1::new();
    for u in urls {
        h.update(u.as_bytes());
    }
    h.update(token.as_bytes());
    if let Some(t) = added_at_unix {
        h.update(t.to_string().as_bytes());
    }
    first_u64(&h.finalize())
}

/// etcd's cluster id: SHA-1 over the sorted member ids, big-endian.
pub fn cluster_id(member_ids: impl IntoIterator<Item = u64>) -> u64 {
    let mut ids: Vec<u64> = member_ids.into_iter().collect();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    first_u64(&h.finalize())
}

fn first_u64(digest: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

/// Checks that `url` is `http://host:port` or `https://host:port` and returns `host:port`.
pub fn url_authority(url: &str) -> Result<&str, ClusterError> {
    let bad = || ClusterError::BadUrl {
        url: url.to_string(),
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || rest.contains('/') || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(rest)
}

/// Whether peers reach `url` over TLS (`https://`).
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("https://")
}

/// `--initial-cluster`: `name=url[,name=url...]`, a name listed once per peer URL.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<String, Vec<String>>, ClusterError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, url) = entry
            .split_once('=')
            .filter(|(n, u)| !n.is_empty() && !u.is_empty())
            .ok_or_else(|| ClusterError::MalformedEntry {
                entry: entry.to_string(),
            })?;
        url_authority(url)?;
        if !seen.insert(url.to_string()) {
            return Err(ClusterError::DuplicateUrl {
                url: url.to_string(),
            });
        }
        out.entry(name.to_string())
            .or_default()
            .push(url.to_string());
    }
    Ok(out)
}

impl Membership {
    /// The membership every founding member derives from the same `--initial-cluster` and
    /// token; `me` must be one of its names and advertise exactly its URLs.
    pub fn bootstrap(
        initial_cluster: &str,
        token: &str,
        me: &str,
        advertised: &[String],
    ) -> Result<(Membership, u64), ClusterError> {
        let named = parse_initial_cluster(initial_cluster)?;
        let Some(mine) = named.get(me) else {
            return Err(ClusterError::NotInCluster {
                name: me.to_string(),
                names: named.keys().cloned().collect::<Vec<_>>().join(","),
            });
        };
        let mut a = advertised.to_vec();
        let mut l = mine.clone();
        a.sort();
        l.sort();
        if a != l {
            return Err(ClusterError::AdvertiseMismatch {
                name: me.to_string(),
                advertised: advertised.join(","),
                listed: mine.join(","),
            });
        }
        let mut members = BTreeMap::new();
        let mut my_id = 0;
        for (name, urls) in &named {
            let id = member_id(urls, token, None);
            if name == me {
                my_id = id;
            }
            members.insert(
                id,
                Member {
                    id,
                    // Names are known from the flags, but etcd lists a peer as unstarted until
                    // it has published itself; spindle fills names in from the flags at once.
                    name: name.clone(),
                    peer_urls: urls.clone(),
                    client_urls: Vec::new(),
                    is_learner: false,
                },
            );
        }
        let membership = Membership {
            cluster_id: cluster_id(members.keys().copied()),
            token: token.to_string(),
            members,
        };
        Ok((membership, my_id))
    }

    pub fn encode(&self) -> Vec<u8> {
        // serde_json cannot fail on these plain types.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Membership, ClusterError> {
        serde_json::from_slice(bytes).map_err(|e| ClusterError::Corrupt(e.to_string()))
    }

    /// Voting members' ids.
    pub fn voters(&self) -> impl Iterator<Item = u64> + '_ {
        self.members
            .values()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
    }

    pub fn learners(&self) -> impl Iterator<Item = u64> + '_ {
        self.members.values().filter(|m| m.is_learner).map(|m| m.id)
    }

    /// Applies a committed change of shard 0's group, the group that carries membership.
    /// `context` is the member's record as the proposer attached it (empty for removals).
    /// Re-applying a change (a restarted member replays its log over the membership it saved)
    /// ends in the same membership.
    pub fn apply_change(&mut self, cc: &ConfChange, context: &[u8]) {
        let record = serde_json::from_slice::<Member>(context)
            .ok()
            .filter(|m| m.id == cc.node());
        match *cc {
            ConfChange::Remove(id) => {
                self.members.remove(&id);
            }
            ConfChange::AddVoter(id)
            | ConfChange::AddLearner(id)
            | ConfChange::PromoteLearner(id)
            | ConfChange::Update(id) => {
                let m = self.members.entry(id).or_insert_with(|| Member {
                    id,
                    name: String::new(),
                    peer_urls: Vec::new(),
                    client_urls: Vec::new(),
                    // Only an addition creates a record; a learner it is unless added as voter.
                    is_learner: !matches!(cc, ConfChange::AddVoter(_)),
                });
                if let Some(r) = record {
                    m.peer_urls = r.peer_urls;
                    if !r.name.is_empty() {
                        m.name = r.name;
                    }
                    if !r.client_urls.is_empty() {
                        m.client_urls = r.client_urls;
                    }
                }
                // The same rule as Raft's own membership (`ConfState::apply`).
                if matches!(cc, ConfChange::AddVoter(_) | ConfChange::PromoteLearner(_)) {
                    m.is_learner = false;
                }
            }
        }
    }

    /// Checks peer URLs for a new member (`except` = None) or for member `except` changing
    /// its own: each must be `http://host:port` or `https://host:port`, and none may belong to another member.
    pub fn check_peer_urls(
        &self,
        urls: &[String],
        except: Option<u64>,
    ) -> Result<(), PeerUrlError> {
        if urls.is_empty() || urls.iter().any(|u| url_authority(u).is_err()) {
            return Err(PeerUrlError::Invalid);
        }
        let taken = self
            .members
            .values()
            .filter(|m| Some(m.id) != except)
            .any(|m| m.peer_urls.iter().any(|u| urls.contains(u)));
        if taken {
            return Err(PeerUrlError::Exists);
        }
        Ok(())
    }

    /// The first peer URL's `host:port` of member `id`.
    pub fn peer_addr(&self, id: u64) -> Option<&str> {
        self.peer_url(id).and_then(|u| url_authority(u).ok())
    }

    /// The first well-formed peer URL of member `id`: what its peers dial (TLS for `https://`).
    pub fn peer_url(&self, id: u64) -> Option<&str> {
        let m = self.members.get(&id)?;
        m.peer_urls
            .iter()
            .find(|u| url_authority(u).is_ok())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn member_id_sorts_urls_and_mixes_in_token_and_time() {
        let a = member_id(&urls(&["http://b:2", "http://a:1"]), "t", None);
        assert_eq!(
            a,
            member_id(&urls(&["http://a:1", "http://b:2"]), "t", None)
        );
        assert_ne!(
            a,
            member_id(&urls(&["http://a:1", "http://b:2"]), "u", None)
        );
        assert_ne!(
            a,
            member_id(&urls(&["http://a:1", "http://b:2"]), "t", Some(1))
        );
        // SHA-1("http://a:1" "http://b:2" "t"), first 8 bytes big-endian.
        let mut h = Sha1::new();
        h.update(b"http://a:1http://b:2t");
        assert_eq!(a, first_u64(&h.finalize()));
    }

    #[test]
    fn changes_apply_in_log_order_and_replay_to_the_same_membership() {
        let ic = "n1=http://127.0.0.1:1,n2=http://127.0.0.1:2,n3=http://127.0.0.1:3";
        let (base, _) =
            Membership::bootstrap(ic, "t", "n1", &urls(&["http://127.0.0.1:1"])).unwrap();
        let new = Member {
            id: 44,
            name: String::new(),
            peer_urls: urls(&["http://127.0.0.1:4"]),
            client_urls: Vec::new(),
            is_learner: true,
        };
        let ctx = serde_json::to_vec(&new).unwrap();
        let victim = *base.members.keys().next().unwrap();
        let mut moved = new.clone();
        moved.peer_urls = urls(&["http://127.0.0.1:5"]);
        let log: Vec<(ConfChange, Vec<u8>)> = vec![
            (ConfChange::AddLearner(44), ctx.clone()),
            (ConfChange::PromoteLearner(44), Vec::new()),
            (ConfChange::Update(44), serde_json::to_vec(&moved).unwrap()),
            (ConfChange::Remove(victim), Vec::new()),
        ];
        let mut m = base.clone();
        assert_eq!(
            m.check_peer_urls(&urls(&["http://127.0.0.1:4"]), None),
            Ok(())
        );
        m.apply_change(&log[0].0, &log[0].1);
        assert!(m.members[&44].is_learner);
        assert_eq!(
            m.check_peer_urls(&urls(&["http://127.0.0.1:4"]), None),
            Err(PeerUrlError::Exists)
        );
        assert_eq!(
            m.check_peer_urls(&urls(&["http://127.0.0.1:4"]), Some(44)),
            Ok(())
        );
        assert_eq!(
            m.check_peer_urls(&urls(&["127.0.0.1:4"]), None),
            Err(PeerUrlError::Invalid)
        );
        for (cc, ctx) in &log[1..] {
            m.apply_change(cc, ctx);
        }
        assert!(!m.members[&44].is_learner);
        assert_eq!(m.members[&44].peer_urls, urls(&["http://127.0.0.1:5"]));
        assert!(!m.members.contains_key(&victim));
        assert_eq!(m.voters().count(), 3);
        // A restarted member replays its whole log over the membership it saved.
        let mut again = m.clone();
        for (cc, ctx) in &log {
            again.apply_change(cc, ctx);
        }
        assert_eq!(again, m);
    }

    #[test]
    fn cluster_id_ignores_member_order() {
        assert_eq!(cluster_id([3, 1, 2]), cluster_id([1, 2, 3]));
        assert_ne!(cluster_id([1, 2]), cluster_id([1, 2, 3]));
    }

    #[test]
    fn bootstrap_checks_flags() {
        let ic = "n1=http://127.0.0.1:2380,n2=http://127.0.0.1:2381,n3=http://127.0.0.1:2382";
        let (m, me) =
            Membership::bootstrap(ic, "tok", "n2", &urls(&["http://127.0.0.1:2381"])).unwrap();
        assert_eq!(m.members.len(), 3);
        assert_eq!(m.members[&me].name, "n2");
        assert_eq!(m.peer_addr(me), Some("127.0.0.1:2381"));
        assert_eq!(Membership::decode(&m.encode()).unwrap(), m);
        let (m2, _) =
            Membership::bootstrap(ic, "tok", "n1", &urls(&["http://127.0.0.1:2380"])).unwrap();
        assert_eq!(
            m.cluster_id, m2.cluster_id,
            "every founder derives the same id"
        );

        assert!(matches!(
            Membership::bootstrap(ic, "tok", "n4", &urls(&["http://127.0.0.1:2390"])),
            Err(ClusterError::NotInCluster { .. })
        ));
        assert!(matches!(
            Membership::bootstrap(ic, "tok", "n1", &urls(&["http://127.0.0.1:9"])),
            Err(ClusterError::AdvertiseMismatch { .. })
        ));
        assert!(matches!(
            parse_initial_cluster("n1"),
            Err(ClusterError::MalformedEntry { .. })
        ));
        assert!(matches!(
            parse_initial_cluster("n1=ftp://x:1"),
            Err(ClusterError::BadUrl { .. })
        ));
        assert_eq!(url_authority("https://x:1"), Ok("x:1"));
        assert!(is_tls_url("https://x:1") && !is_tls_url("http://x:1"));
        assert!(matches!(
            parse_initial_cluster("n1=http://x:1,n2=http://x:1"),
            Err(ClusterError::DuplicateUrl { .. })
        ));
    }
}
