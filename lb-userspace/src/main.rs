//! `lb`: an eBPF Kubernetes service load balancer (a kube-proxy replacement).

mod daemon;
mod datapath;
mod list;
mod manifests;
mod model;
mod reconcile;
mod sockets;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::datapath::DatapathOptions;

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(name = "lb", version, about = "eBPF Kubernetes service load balancer")]
struct Cli {
    /// Log filter (tracing env-filter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath and serve the Services described by a folder of manifests.
    Daemon {
        /// Folder of v1 Service and discovery.k8s.io/v1 EndpointSlice YAML manifests,
        /// watched for changes.
        #[arg(long, value_name = "DIR")]
        manifests: PathBuf,
        /// cgroup2 directory to attach to: its processes and all below it are balanced
        /// [default: the cgroup2 root, from /proc/self/mountinfo]
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// bpffs directory for pinned maps and links.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// On exit, leave the programs attached and the maps pinned so connections keep
        /// being balanced until the next `lb daemon` adopts them.
        #[arg(long)]
        keep_pinned: bool,
        /// Seconds between safety-net rescans of the folder.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        rescan_interval: u64,
    },
    /// Print the live service table from the pinned maps.
    List {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// One JSON object per frontend.
        #[arg(long)]
        json: bool,
    },
    /// Detach a datapath left pinned (--keep-pinned) and remove its pins.
    Cleanup {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn init_logging(level: &str) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Daemon {
            manifests,
            cgroup,
            pin_dir,
            keep_pinned,
            rescan_interval,
        } => {
            let cgroup = match cgroup {
                Some(path) => path,
                None => datapath::cgroup2_root()?,
            };
            let options = daemon::DaemonOptions {
                manifests,
                datapath: DatapathOptions { cgroup, pin_dir },
                keep_pinned,
                rescan_interval: Duration::from_secs(rescan_interval.max(1)),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(daemon::run(options))
        }
        Command::List { pin_dir, json } => list::run(&pin_dir, json),
        Command::Cleanup { pin_dir } => {
            datapath::check_root()?;
            datapath::cleanup(&pin_dir)?;
            eprintln!("removed the datapath pinned at {}", pin_dir.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `lb list | head`: the reader went away, nothing is wrong.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(err) => {
            // One line: the reason and its causes.
            eprintln!("lb: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
