//! The `spindle` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use spindle::db::{Options, Partitioner};
use spindle::server::ServerConfig;

/// The process allocator: the server allocates and frees per request (hyper's streams, h2 frames,
/// request futures), and glibc's malloc spent about a sixth of the server's CPU doing so
/// (docs/benchmarks.md, "Allocator"). The library leaves the choice to its embedder.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's purge delay (`mi_option_purge_delay` in v2's `mimalloc.h`; the crate has no
/// constant for it), in milliseconds.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc only returns a thread's freed memory to the OS when that thread allocates again, so
/// what recovery freed stayed resident on an idle restarted server (1M keys: 250 MiB with the
/// default purge delay, 201 MiB opening with no delay, 162 MiB opening with no delay and
/// collecting each core's heap once recovered, as glibc's 163 MiB). Serving goes back to the
/// delay in force before (mimalloc's default, or `MIMALLOC_PURGE_DELAY`): purging at once made
/// reused buffers fault their pages back in (watch fan-out spent 20% more CPU).
fn purge_delay() -> std::ffi::c_long {
    // SAFETY: reads one of mimalloc's process-wide options.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

fn set_purge_delay(ms: std::ffi::c_long) {
    // SAFETY: sets one of mimalloc's process-wide options; any value is valid for this option.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms) };
}

/// Each core runs this once its shards are recovered (`Options::after_recovery`).
fn return_freed_memory() {
    // SAFETY: mimalloc's collection of the calling thread's heap; no pointers are involved.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// How long a stopping server waits for requests in flight (a lock or a campaign may wait
/// longer; it is cut off then).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "spindle",
    version,
    about = "An etcd-compatible, thread-per-core key-value store"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open (or create) a data dir and run the node.
    Serve(Box<ServeArgs>),
    /// Load generator for any etcd v3 endpoint (spindle or etcd).
    Bench(Box<BenchArgs>),
    /// etcd 3.4 snapshot files (what `etcdctl snapshot save` writes from spindle or etcd).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// etcd's gRPC proxy (`start`), optionally confining clients to a key prefix.
    #[command(name = "grpc-proxy", subcommand)]
    GrpcProxy(GrpcProxyCommand),
    /// etcd's L4 TCP gateway (`start`).
    #[command(subcommand)]
    Gateway(GatewayCommand),
}

#[derive(Subcommand)]
enum GrpcProxyCommand {
    /// Serve the etcd v3 gRPC API in front of a cluster.
    Start(GrpcProxyArgs),
}

#[derive(clap::Args)]
struct GrpcProxyArgs {
    /// Cluster endpoints (host:port or URLs), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// Where the proxy listens (host:port).
    #[arg(long, default_value = "127.0.0.1:23790")]
    listen_addr: String,
    /// Key prefix every client key is confined to.
    #[arg(long, default_value = "")]
    namespace: String,
    /// The proxy's client URL, reported by MemberList as the only member.
    #[arg(long)]
    advertise_client_url: Option<String>,
    /// Client certificate toward the cluster.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key toward the cluster.
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA bundle that signed the cluster's certificates.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Accept any certificate from the cluster.
    #[arg(long)]
    insecure_skip_tls_verify: bool,
}

#[derive(Subcommand)]
enum GatewayCommand {
    /// Splice TCP connections to a live endpoint.
    Start {
        /// Cluster endpoints (host:port), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
        endpoints: Vec<String>,
        /// Where the gateway listens (host:port).
        #[arg(long, default_value = "127.0.0.1:23790")]
        listen_addr: String,
        /// How long an endpoint that refused a connection is left out.
        #[arg(long, default_value = "1m0s", value_parser = spindle::proxy::tcp::parse_duration)]
        retry_delay: std::time::Duration,
    },
}

fn grpc_proxy(cmd: GrpcProxyCommand) -> Result<(), String> {
    let GrpcProxyCommand::Start(a) = cmd;
    spindle::proxy::run(spindle::proxy::ProxyConfig {
        endpoints: a.endpoints,
        listen_addr: a.listen_addr,
        namespace: a.namespace,
        advertise_client_url: a.advertise_client_url,
        cert: a.cert,
        key: a.key,
        cacert: a.cacert,
        insecure_skip_tls_verify: a.insecure_skip_tls_verify,
    })
    .map_err(|e| e.to_string())
}

fn gateway(cmd: GatewayCommand) -> Result<(), String> {
    let GatewayCommand::Start {
        endpoints,
        listen_addr,
        retry_delay,
    } = cmd;
    spindle::proxy::tcp::run(&endpoints, &listen_addr, retry_delay).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Hash, revision, total keys and total size of a snapshot, as `etcdctl snapshot status`.
    Status {
        file: PathBuf,
        /// Output format: simple, table or json.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Write a new data dir holding a snapshot's store (revisions, history, compaction, leases,
    /// auth) for `spindle serve`, as `etcdctl snapshot restore` does for etcd.
    Restore(Box<RestoreArgs>),
}

#[derive(clap::Args)]
struct RestoreArgs {
    file: PathBuf,
    /// The data dir to create (it must not exist, or be empty).
    #[arg(long)]
    data_dir: PathBuf,
    /// Do not check the sha256 trailer (and accept a bare bbolt file without one).
    #[arg(long)]
    skip_hash_check: bool,
    /// Shards of the new data dir (default: the available cores, as `spindle serve`).
    #[arg(long)]
    shards: Option<u32>,
    /// Key-to-shard mapping of the new data dir: directory-crc32 or key-crc32.
    #[arg(long, default_value = "directory-crc32")]
    partitioner: String,
    /// Human-readable name of the restored member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Initial cluster configuration NAME=PEER_URL,...; without it (or with only this member)
    /// the data dir is a single node's.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Cluster token: member and cluster ids derive from it and the peer URLs.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// This member's peer URLs.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
}

fn snapshot(cmd: SnapshotCommand) -> Result<(), String> {
    match cmd {
        SnapshotCommand::Status { file, write_out } => {
            let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let st = spindle::snapshot::status(&bytes)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            match write_out.as_str() {
                "simple" => println!("{}", st.simple()),
                "table" => print!("{}", st.table()),
                "json" => println!("{}", st.json()),
                other => {
                    return Err(format!(
                        "unknown output format {other:?} (simple, table, json)"
                    ))
                }
            }
            Ok(())
        }
        SnapshotCommand::Restore(a) => {
            let bytes = std::fs::read(&a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
            let partitioner = Partitioner::from_name(&a.partitioner)
                .ok_or_else(|| format!("unknown partitioner {:?}", a.partitioner))?;
            let shards = a.shards.unwrap_or_else(|| Options::default().cores as u32);
            let cluster = a.initial_cluster.map(|ic| spindle::restore::ClusterFlags {
                name: a.name.clone(),
                initial_cluster: ic,
                token: a.initial_cluster_token.clone(),
                advertise_peer_urls: a
                    .initial_advertise_peer_urls
                    .split(',')
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
                    .collect(),
            });
            let opts = spindle::restore::Options {
                shards,
                partitioner,
                skip_hash_check: a.skip_hash_check,
                cluster,
            };
            let s = spindle::restore::restore(&bytes, &a.data_dir, &opts)
                .map_err(|e| format!("{}: {e}", a.file.display()))?;
            println!(
                "restored {} into {}: revision {}, compacted at {}, {} keys ({} revisions), {} \
                 leases, {} users, {} roles, {} shards; member {:x} of cluster {:x}",
                a.file.display(),
                a.data_dir.display(),
                s.revision,
                s.compact_revision,
                s.keys,
                s.events,
                s.leases,
                s.users,
                s.roles,
                shards,
                s.member_id,
                s.cluster_id
            );
            Ok(())
        }
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(subcommand)]
    workload: BenchWorkload,
    /// Endpoints (comma-separated host:port or http://host:port).
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// HTTP/2 connections in total.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Concurrent clients in total (multiplexed over the connections).
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Requests in total (default 10000 unless --duration is given).
    #[arg(long, global = true)]
    total: Option<u64>,
    /// Run for this many seconds instead of a request count.
    #[arg(long, global = true)]
    duration: Option<f64>,
    /// Open-loop rate in requests/s over all clients (0 = closed loop).
    #[arg(long, global = true, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, global = true, default_value_t = 8)]
    key_size: usize,
    #[arg(long, global = true, default_value_t = 8)]
    val_size: usize,
    #[arg(long, global = true, default_value_t = 1)]
    key_space_size: u64,
    #[arg(long, global = true)]
    sequential_keys: bool,
    /// Range and txn-mixed: do not write the key space first (it is already loaded).
    #[arg(long, global = true)]
    no_preload: bool,
    /// Seconds at the start whose requests are not measured.
    #[arg(long, global = true, default_value_t = 0.0)]
    warmup: f64,
    /// Load-generator executors (threads).
    #[arg(long, global = true, default_value_t = 1)]
    cores: usize,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Also write the full latency histogram (HdrHistogram V2 encoding) to this file.
    #[arg(long, global = true)]
    hdr_out: Option<PathBuf>,
    /// Measure the generator itself: serve an in-process endpoint that answers every call
    /// with an empty response, and run the workload against it.
    #[arg(long, global = true)]
    self_check: bool,
    /// Authenticate every connection as this user, `NAME:PASSWORD` (etcdctl's form), for a
    /// server with auth enabled.
    #[arg(long, global = true)]
    user: Option<String>,
    /// CA certificate (PEM) that `https://` endpoints' certificates are verified against.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) to present to `https://` endpoints, with --key.
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// Accept any server certificate on `https://` endpoints (e.g. --auto-tls servers).
    #[arg(long, global = true)]
    insecure_skip_tls_verify: bool,
}

#[derive(Subcommand, Clone, Copy)]
enum BenchWorkload {
    /// Puts.
    Put,
    /// Ranges (linearizable unless --consistency s).
    Range {
        /// l (linearizable) or s (serializable).
        #[arg(long, default_value = "l")]
        consistency: char,
        /// Read a prefix (limit 100) instead of one key.
        #[arg(long)]
        prefix: bool,
    },
    /// Txns of --txn-ops puts.
    TxnPut {
        #[arg(long, default_value_t = 1)]
        txn_ops: usize,
    },
    /// Txns reading or writing one key, --rw-ratio reads per write.
    TxnMixed {
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
    },
    /// The embedded engine directly, no network.
    Mvcc,
    /// Watch fan-out and delivery latency: --watchers streams watch every key while the
    /// clients put; ops are events delivered, latency is put sent to event received.
    Watch {
        #[arg(long, default_value_t = 16)]
        watchers: usize,
    },
    /// Put-to-event latency: like `watch` with fewer watchers; pace the puts with --rate.
    WatchLatency {
        #[arg(long, default_value_t = 10)]
        watchers: usize,
    },
    /// Lease renewals: each client keeps one lease alive over its own stream.
    LeaseKeepalive,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, default_value = "spindle-data")]
    data_dir: PathBuf,
    /// Human-readable name of this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// URLs to listen on for client traffic (comma-separated; https:// ones are served with
    /// --cert-file and --key-file).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    listen_client_urls: String,
    /// Path to the client server TLS cert file (PEM), for https:// client URLs.
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// Path to the client server TLS key file (PEM).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Path to the client server TLS trusted CA cert file (PEM): client certificates must be
    /// signed by one of its CAs.
    #[arg(long)]
    trusted_ca_file: Option<PathBuf>,
    /// Enable client cert authentication: TLS clients must present a certificate signed by a
    /// trusted CA, and with auth enabled its Common Name is the user of calls without a token.
    #[arg(long)]
    client_cert_auth: bool,
    /// Client TLS using a self-signed certificate made at start (under DATA_DIR/fixtures/client)
    /// when https:// client URLs are listed without --cert-file and --key-file.
    #[arg(long)]
    auto_tls: bool,
    /// Path to the peer TLS cert file (PEM), for https:// peer URLs: served to members that dial
    /// this one and presented when dialing them.
    #[arg(long)]
    peer_cert_file: Option<PathBuf>,
    /// Path to the peer TLS key file (PEM).
    #[arg(long)]
    peer_key_file: Option<PathBuf>,
    /// Path to the peer TLS trusted CA file (PEM): the certificates of the members this one
    /// dials, and of those dialing it under --peer-client-cert-auth, must be signed by its CAs.
    #[arg(long)]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Enable peer client cert authentication: members dialing this one must present a
    /// certificate signed by a CA of --peer-trusted-ca-file.
    #[arg(long)]
    peer_client_cert_auth: bool,
    /// Peer TLS using self-signed certificates made at start (under DATA_DIR/fixtures/peer)
    /// when https:// peer URLs are listed without --peer-cert-file and --peer-key-file; peer
    /// certificates are then not verified.
    #[arg(long)]
    peer_auto_tls: bool,
    /// Client URLs advertised to clients (member list); default: the listen URLs.
    #[arg(long)]
    advertise_client_urls: Option<String>,
    /// This member's peer URLs, as the other members reach it.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping: NAME=PEER_URL,... Without it (or with
    /// only this member) spindle runs as a single node. Ignored once the data dir exists.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// "new" to bootstrap a cluster; "existing" to join a running one.
    #[arg(long, default_value = "new")]
    initial_cluster_state: String,
    /// Cluster token: member and cluster ids derive from it and the peer URLs.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// URLs to listen on for peer traffic (one is used; https:// ones speak TLS with the --peer-*
    /// TLS flags).
    #[arg(long, default_value = "http://localhost:2380")]
    listen_peer_urls: String,
    /// Time between heartbeats, in milliseconds (also the Raft tick).
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Time without a leader before a member campaigns, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Executors to run, one per core; default: all available cores.
    #[arg(long)]
    cores: Option<usize>,
    /// Shards for a new data dir (default: --cores). Fixed once the data dir exists.
    #[arg(long)]
    shards: Option<u32>,
    /// Key-to-shard mapping for a new data dir: directory-crc32 or key-crc32.
    #[arg(long, default_value = "directory-crc32")]
    partitioner: String,
    /// Largest request the server accepts, as etcd's flag.
    #[arg(long, default_value_t = 1536 * 1024)]
    max_request_bytes: usize,
    /// Refuse writes that would take the store (Status' dbSize) past this many bytes and raise
    /// the NOSPACE alarm, as etcd's flag: 0 = etcd's default of 2 GiB, negative = no quota.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    quota_backend_bytes: i64,
    /// How often the leader checks that every member's data hashes as its own (Go duration,
    /// etcd's flag); 0 = never. A mismatch raises the CORRUPT alarm, which stops all writes.
    #[arg(long, default_value = "0s")]
    experimental_corrupt_check_time: String,
    /// Before serving clients, compare this member's data hash with every other member's at
    /// the same revision, and refuse to run on a mismatch (etcd's flag).
    #[arg(long)]
    experimental_initial_corrupt_check: bool,
    /// How often idle watches created with progress_notify hear they are current (Go duration).
    #[arg(long, default_value = "10m")]
    experimental_watch_progress_notify_interval: String,
    /// Auth token kind (etcd's flag): `simple`, or
    /// `jwt,sign-method=RS256,priv-key=PATH[,pub-key=PATH][,ttl=5m]`.
    #[arg(long, default_value = "simple")]
    auth_token: String,
    /// Seconds a simple auth token lives after its last use (etcd's flag).
    #[arg(long, default_value_t = 300)]
    auth_token_ttl: u64,
    /// bcrypt cost for hashing new passwords (etcd's flag; out of range falls back to 10).
    #[arg(long, default_value_t = 10)]
    bcrypt_cost: u32,
    /// Size of each preallocated WAL segment, in MiB.
    #[arg(long, default_value_t = 64)]
    wal_segment_mb: u64,
    /// Log entries per shard between checkpoints (etcd's flag): the WAL and Raft's in-memory log
    /// stay bounded by it, and a member that falls further behind catches up from a checkpoint.
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Automatic compaction: "periodic" (retention is a duration such as 1h or 30m) or "revision"
    /// (retention is a number of revisions to keep).
    #[arg(long, default_value = "periodic")]
    auto_compaction_mode: String,
    /// Retention for automatic compaction; 0 disables it.
    #[arg(long, default_value = "0")]
    auto_compaction_retention: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // glommio logs its failed poll-ring probe as an error once per core; the failure is on
    // purpose (see `wal::Wal::open`), so that one target stays quiet unless asked for.
    let mut directives = cli.log_level.clone();
    if !directives.contains("glommio") {
        directives.push_str(",glommio::reactor=off");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => match serve(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spindle: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Snapshot(cmd) => match snapshot(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spindle snapshot: {e}");
                ExitCode::FAILURE
            }
        },
        Command::GrpcProxy(cmd) => match grpc_proxy(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spindle grpc-proxy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Gateway(cmd) => match gateway(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spindle gateway: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match bench(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spindle bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Blocks SIGINT and SIGTERM in this thread and every thread started after it, so that the main
/// thread can wait for them with `sigwait` and shut down cleanly.
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` was initialized by block_shutdown_signals.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// The cluster a member's flags describe; `None` for a single node (no `--initial-cluster`, or
/// one that lists only this member).
fn cluster_options(
    args: &ServeArgs,
    advertised: &[String],
) -> Result<Option<spindle::db::ClusterOptions>, spindle::Error> {
    let invalid = |m: String| spindle::Error::InvalidArgument(m);
    let Some(initial) = args.initial_cluster.as_deref() else {
        return Ok(None);
    };
    let members =
        spindle::cluster::parse_initial_cluster(initial).map_err(|e| invalid(e.to_string()))?;
    if members.len() < 2 {
        return Ok(None);
    }
    let new_cluster = match args.initial_cluster_state.as_str() {
        "new" => true,
        "existing" => false,
        other => {
            return Err(invalid(format!(
                "--initial-cluster-state must be new or existing, not {other:?}"
            )))
        }
    };
    let listen = args
        .listen_peer_urls
        .split(',')
        .map(str::trim)
        .find(|u| !u.is_empty())
        .ok_or_else(|| invalid("--listen-peer-urls is empty".into()))?;
    let listen_peer = spindle::cluster::url_authority(listen)
        .map_err(|e| invalid(e.to_string()))?
        .to_string();
    if args.heartbeat_interval == 0 || args.election_timeout < 5 * args.heartbeat_interval {
        // etcd's rule: the election timeout must be at least 5 heartbeats.
        return Err(invalid(format!(
            "--election-timeout[{}ms] should be at least 5 times as --heartbeat-interval[{}ms]",
            args.election_timeout, args.heartbeat_interval
        )));
    }
    let split = |s: &str| {
        s.split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect::<Vec<String>>()
    };
    let mut others: Vec<String> = members.values().flatten().cloned().collect();
    others.extend(advertised.iter().cloned());
    let peer_tls = spindle::tls::peer_tls(
        spindle::tls::TlsFiles {
            side: spindle::tls::Side::Peer,
            cert_file: args.peer_cert_file.clone(),
            key_file: args.peer_key_file.clone(),
            trusted_ca_file: args.peer_trusted_ca_file.clone(),
            client_cert_auth: args.peer_client_cert_auth,
            self_signed: false,
        },
        args.peer_auto_tls,
        &args.data_dir.join("fixtures").join("peer"),
        &split(&args.listen_peer_urls),
        &others,
    )?;
    Ok(Some(spindle::db::ClusterOptions {
        name: args.name.clone(),
        initial_cluster: initial.to_string(),
        token: args.initial_cluster_token.clone(),
        new_cluster,
        advertise_peer_urls: advertised.to_vec(),
        listen_peer,
        heartbeat: std::time::Duration::from_millis(args.heartbeat_interval),
        election: std::time::Duration::from_millis(args.election_timeout),
        client_urls: Vec::new(),
        peer_tls,
    }))
}

/// The JWT signer/verifier `--auth-token jwt,…` asks for (`None` for simple tokens); bad
/// options or keys refuse the start, naming the option.
fn jwt_tokens(
    flag: &str,
) -> Result<Option<std::sync::Arc<spindle::auth::JwtTokens>>, spindle::Error> {
    let invalid = |e: spindle::auth::TokenOptError| spindle::Error::InvalidArgument(e.to_string());
    match spindle::auth::parse_auth_token(flag).map_err(invalid)? {
        spindle::auth::TokenKind::Simple => Ok(None),
        spindle::auth::TokenKind::Jwt(opts) => {
            if !opts.unknown.is_empty() {
                tracing::warn!(options = ?opts.unknown, "unknown --auth-token jwt options ignored");
            }
            Ok(Some(std::sync::Arc::new(opts.load().map_err(invalid)?)))
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), spindle::Error> {
    let invalid = |m: String| spindle::Error::InvalidArgument(m);
    let mut opts = Options::default();
    if let Some(c) = args.cores {
        opts.cores = c;
    }
    opts.shards = args.shards;
    opts.partitioner = Partitioner::from_name(&args.partitioner)
        .ok_or_else(|| invalid(format!("unknown partitioner {:?}", args.partitioner)))?;
    opts.wal_segment_size = args.wal_segment_mb.max(1) << 20;
    opts.checkpoint_every = args.snapshot_count;
    let compaction = spindle::server::compaction::Policy::parse(
        &args.auto_compaction_mode,
        &args.auto_compaction_retention,
    )?;
    let listen = spindle::server::parse_listen_urls(&args.listen_client_urls)?;
    let mut tls_files = spindle::server::tls::TlsFiles {
        cert_file: args.cert_file.clone(),
        key_file: args.key_file.clone(),
        trusted_ca_file: args.trusted_ca_file.clone(),
        client_cert_auth: args.client_cert_auth,
        ..Default::default()
    };
    // As etcd: the files are read at start, and a bad one stops the server there.
    let tls = if listen.https.is_empty() {
        if args.cert_file.is_some() || args.key_file.is_some() {
            tracing::warn!("no https:// client URL: --cert-file and --key-file are ignored");
        }
        None
    } else {
        if args.auto_tls {
            let listen_urls: Vec<String> = args
                .listen_client_urls
                .split(',')
                .map(|u| u.trim().to_string())
                .collect();
            let fixtures = args.data_dir.join("fixtures").join("client");
            spindle::tls::client_auto_tls(&mut tls_files, &fixtures, &listen_urls)?;
        }
        Some(spindle::server::tls::server_config(&tls_files)?)
    };
    let split = |s: &str| {
        s.split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect::<Vec<String>>()
    };
    opts.cluster = cluster_options(&args, &split(&args.initial_advertise_peer_urls))?;
    let cfg = ServerConfig {
        name: args.name,
        listen: listen.http,
        listen_tls: listen.https,
        tls,
        client_cert_auth: args.client_cert_auth,
        advertise_client_urls: split(
            args.advertise_client_urls
                .as_deref()
                .unwrap_or(&args.listen_client_urls),
        ),
        advertise_peer_urls: split(&args.initial_advertise_peer_urls),
        max_request_bytes: args.max_request_bytes,
        quota_backend_bytes: args.quota_backend_bytes,
        initial_corrupt_check: args.experimental_initial_corrupt_check,
        corrupt_check_time: spindle::server::compaction::parse_go_duration(
            &args.experimental_corrupt_check_time,
        )
        .ok_or_else(|| {
            invalid(format!(
                "bad --experimental-corrupt-check-time {:?}",
                args.experimental_corrupt_check_time
            ))
        })
        .map(|d| (!d.is_zero()).then_some(d))?,
        watch_progress_notify_interval: spindle::server::compaction::parse_go_duration(
            &args.experimental_watch_progress_notify_interval,
        )
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            invalid(format!(
                "bad --experimental-watch-progress-notify-interval {:?}",
                args.experimental_watch_progress_notify_interval
            ))
        })?,
        auth_token_ttl: std::time::Duration::from_secs(args.auth_token_ttl.max(1)),
        bcrypt_cost: args.bcrypt_cost,
        jwt: jwt_tokens(&args.auth_token)?,
    };
    if let Some(c) = opts.cluster.as_mut() {
        c.client_urls = cfg.advertise_client_urls.clone();
    }
    let opts_is_cluster = opts.cluster.is_some();
    let signals = block_shutdown_signals();
    let started = std::time::Instant::now();
    opts.after_recovery = Some(return_freed_memory);
    let serving_purge_delay = purge_delay();
    set_purge_delay(0);
    let server = spindle::server::start(&args.data_dir, opts, cfg.clone())?;
    set_purge_delay(serving_purge_delay);
    let db = server.db.clone();
    let status = db.status()?;
    if opts_is_cluster {
        tracing::info!(
            data_dir = %args.data_dir.display(),
            shards = status.shards,
            cores = status.cores,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store opened; its log is applied as the cluster confirms it committed"
        );
    } else {
        tracing::info!(
            data_dir = %args.data_dir.display(),
            revision = status.revision,
            keys = status.keys,
            shards = status.shards,
            cores = status.cores,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store opened and recovered"
        );
    }
    tracing::info!(urls = ?cfg.advertise_client_urls, "ready to serve client requests");
    let compactor = compaction.map(|p| spindle::server::compaction::spawn(db.clone(), p));
    // A member removed from its cluster stops, as etcd's do: the watcher wakes the signal wait.
    let removed = Arc::new(AtomicBool::new(false));
    if opts_is_cluster {
        let (db, removed) = (db.clone(), removed.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if db.is_removed() {
                removed.store(true, Ordering::SeqCst);
                // SAFETY: signalling our own process; SIGTERM is blocked and awaited by sigwait.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                return;
            }
        });
    }
    let sig = wait_for_signal(&signals);
    tracing::info!(
        signal = sig,
        "shutting down: flushing and closing the store"
    );
    if let Some(c) = compactor {
        c.stop();
    }
    // Requests in flight are answered first (a member removed through its own endpoint
    // answers the removal before it stops, as etcd's do); new ones get `server stopped`.
    drop(db);
    server.shutdown(SHUTDOWN_GRACE);
    tracing::info!("store closed cleanly");
    if removed.load(Ordering::SeqCst) {
        tracing::error!("the member has been permanently removed from the cluster");
        std::process::exit(1);
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<(), String> {
    use spindle::bench::{BenchConfig, Workload};
    let workload = match a.workload {
        BenchWorkload::Put => Workload::Put,
        BenchWorkload::Range {
            consistency,
            prefix,
        } => Workload::Range {
            serializable: consistency == 's',
            prefix,
        },
        BenchWorkload::TxnPut { txn_ops } => Workload::TxnPut { ops: txn_ops },
        BenchWorkload::Mvcc => Workload::Mvcc,
        BenchWorkload::Watch { watchers } => Workload::Watch { watchers },
        BenchWorkload::LeaseKeepalive => Workload::LeaseKeepAlive,
        BenchWorkload::WatchLatency { watchers } => Workload::Watch { watchers },
        BenchWorkload::TxnMixed { rw_ratio } => Workload::TxnMixed {
            read_ratio: rw_ratio.max(0.0),
        },
    };
    let duration = a.duration.map(std::time::Duration::from_secs_f64);
    let mut endpoints: Vec<String> = a
        .endpoints
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let _noop = if a.self_check {
        let noop = spindle::bench::noop::start(a.cores.max(1))?;
        endpoints = vec![noop.endpoint()];
        Some(noop)
    } else {
        None
    };
    let cfg = BenchConfig {
        workload,
        endpoints,
        conns: a.conns.max(1),
        clients: a.clients.max(1),
        total: a.total.or(if duration.is_some() {
            None
        } else {
            Some(10_000)
        }),
        duration,
        rate: (a.rate > 0.0).then_some(a.rate),
        key_size: a.key_size.max(1),
        val_size: a.val_size,
        key_space_size: a.key_space_size.max(1),
        sequential_keys: a.sequential_keys,
        preload: !a.no_preload,
        warmup: std::time::Duration::from_secs_f64(a.warmup.max(0.0)),
        cores: a.cores.max(1),
        data_dir: None,
        tls: if a.endpoints.contains("https://") {
            let cert_key = a.cert.as_deref().zip(a.key.as_deref());
            let cfg = spindle::tls::dial_config(
                a.cacert.as_deref(),
                cert_key,
                a.insecure_skip_tls_verify,
            )
            .map_err(|e| e.to_string())?;
            Some(std::sync::Arc::new(cfg))
        } else {
            None
        },
        user: match &a.user {
            None => None,
            Some(u) => match u.split_once(':') {
                Some((name, password)) => Some((name.to_string(), password.to_string())),
                None => return Err(format!("--user {u}: expected NAME:PASSWORD")),
            },
        },
    };
    let report = spindle::bench::run(cfg)?;
    if let Some(path) = &a.hdr_out {
        report.write_hdr(path)?;
    }
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.summary());
    }
    Ok(())
}
