//! The `spindle` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spindle::db::{Db, Options};
use spindle::partition::Partitioner;

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
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, default_value = "spindle-data")]
    data_dir: PathBuf,
    /// Executors to run, one per core; default: all available cores.
    #[arg(long)]
    cores: Option<usize>,
    /// Shards for a new data dir (default: --cores). Fixed once the data dir exists.
    #[arg(long)]
    shards: Option<u32>,
    /// Key-to-shard mapping for a new data dir: directory-crc32 or key-crc32.
    #[arg(long, default_value = "directory-crc32")]
    partitioner: String,
    /// Size of each preallocated WAL segment, in MiB.
    #[arg(long, default_value_t = 64)]
    wal_segment_mb: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spindle: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(args: ServeArgs) -> Result<(), spindle::Error> {
    let mut opts = Options::default();
    if let Some(c) = args.cores {
        opts.cores = c;
    }
    opts.shards = args.shards;
    opts.partitioner = Partitioner::from_name(&args.partitioner).ok_or_else(|| {
        spindle::Error::InvalidArgument(format!("unknown partitioner {:?}", args.partitioner))
    })?;
    opts.wal_segment_size = args.wal_segment_mb.max(1) << 20;
    let started = std::time::Instant::now();
    let db = Db::open(&args.data_dir, opts)?;
    let status = db.status()?;
    tracing::info!(
        data_dir = %args.data_dir.display(),
        revision = status.revision,
        keys = status.keys,
        shards = status.shards,
        cores = status.cores,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store opened and recovered"
    );
    // The etcd v3 gRPC API is the next milestone; until it lands the node does not listen, and it
    // says so instead of pretending to serve.
    tracing::warn!("the etcd v3 gRPC API is not implemented yet: nothing is listening; use spindle::Db to embed the engine");
    db.close();
    tracing::info!("store closed cleanly");
    Ok(())
}
