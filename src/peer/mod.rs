//! Peer traffic between cluster members: the wire format (`codec`, pure) and the per-core TCP
//! transport on glommio (`transport`). Raft messages of every shard group between two nodes share
//! one connection per core and one frame per round.

pub mod codec;
#[allow(clippy::all, unused_imports, dead_code, deprecated, non_camel_case_types, non_snake_case)]
#[rustfmt::skip]
mod peer_generated;
pub mod transport;

pub use codec::{CodecError, Hello, Join, PeerMsg, ReadStamp, PROTOCOL_VERSION};
pub use transport::{
    check_hello, request_membership, Handler, Inbound, PeerConfig, PeerInfo, PeerTls, Transport,
};
