//! `lb daemon`: load the datapath, then keep the kernel maps equal to what the source
//! describes, until SIGINT/SIGTERM.
//!
//! Threads: the tokio runtime serves signals, the health and metrics endpoints and the
//! Kubernetes watchers; the manifest source reads files on a thread of its own; the
//! sync (model, reconciler, map writes, socket termination) runs on the controller
//! thread. So a long sync never delays a signal or a health probe.

mod controller;
mod healthcheck;
mod http;
mod metrics;
mod slots;
pub mod status;
pub mod workloads;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use self::{controller::Controller, http::Health, metrics::Metrics};
use crate::{
    datapath::{self, Datapath, DatapathOptions},
    privileges, source,
};

#[derive(Debug, Clone)]
pub enum SourceOptions {
    /// A folder of manifests, rescanned every `rescan_interval` as a safety net.
    Manifests {
        dir: PathBuf,
        rescan_interval: Duration,
    },
    /// The Kubernetes API (kubeconfig file, else `$KUBECONFIG`, else in-cluster).
    Kubernetes { kubeconfig: Option<PathBuf> },
}

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub source: SourceOptions,
    pub datapath: DatapathOptions,
    /// Remove the datapath on a graceful exit (the default keeps it serving).
    pub detach_on_exit: bool,
    pub node_name: String,
    pub health_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub health_timeout: Duration,
    /// `--node-port-range`.
    pub node_ports: (u16, u16),
    /// `--external-ip-cidrs`.
    pub external_ip_cidrs: Option<Vec<crate::model::spec::Cidr>>,
    /// `--max-frontends-per-service`.
    pub frontends_per_service: usize,
    /// `--max-maglev-memory`, in bytes.
    pub maglev_bytes: u64,
    /// `--conntrack-*`: how long tracked external flows may stay idle.
    pub ct_timeouts: crate::datapath::flows::CtTimeouts,
    /// `--workload-detection`, `--packet-runtime-classes`.
    pub workload_detection: crate::model::workloads::Detection,
}

/// How long a shutdown waits for the sync to reach a stopping point.
const STOP_GRACE: Duration = Duration::from_millis(900);

pub async fn run(options: DaemonOptions) -> Result<()> {
    // Check everything that can be wrong with the configuration before touching the
    // kernel: a typo should not leave a half-made datapath behind.
    let (client, api_addresses) = match &options.source {
        SourceOptions::Kubernetes { kubeconfig } => {
            let (client, api) = source::kube::client(kubeconfig.as_deref()).await?;
            (Some(client), api)
        }
        SourceOptions::Manifests { dir, .. } => {
            source::manifests::ManifestDir::new(dir)?;
            (None, Vec::new())
        }
    };
    let health = Arc::new(Health::new(options.health_timeout));
    if let Some(addr) = options.health_addr {
        http::serve_health(http::bind("health", addr).await?, health.clone())?;
    }
    let metrics_listener = match options.metrics_addr {
        Some(addr) => Some(http::bind("metrics", addr).await?),
        None => None,
    };

    let mut datapath = Datapath::load(options.datapath.clone())?;
    datapath.start_logger();
    let maps = datapath.take_maps()?;

    let (sink, events) = std::sync::mpsc::sync_channel(crate::source::SINK_BATCHES);
    // The Kubernetes watchers are tasks on the runtime; the manifest source is a
    // thread of its own, started below once this thread has shed its privileges.
    let mut manifest_sink = None;
    let api = match (&options.source, client) {
        (SourceOptions::Manifests { .. }, _) => {
            manifest_sink = Some(sink);
            None
        }
        (SourceOptions::Kubernetes { .. }, Some(client)) => {
            info!(node = %options.node_name, "watching the Kubernetes API");
            Some(source::kube::spawn(client, sink, &options.node_name))
        }
        (SourceOptions::Kubernetes { .. }, None) => unreachable!("client built above"),
    };
    let metrics = Arc::new(Metrics::new().with_live(
        &options.datapath.pin_dir,
        &datapath.capacities(),
        Some(datapath.features()),
        api,
    ));
    if let Some(listener) = metrics_listener {
        http::serve_metrics(listener, metrics.clone(), health.clone())?;
    }

    let source_name = match &options.source {
        SourceOptions::Manifests { dir, .. } => format!("manifests {}", dir.display()),
        SourceOptions::Kubernetes { .. } => "kubernetes".to_string(),
    };
    let board = status::StatusBoard::new(&options.node_name, &source_name);
    board.set_features(datapath.features().clone());
    status::serve(&options.datapath.pin_dir, board.clone()).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut controller = Controller::new(
        maps,
        datapath,
        options.datapath.capacities.limits(),
        options.node_name.clone(),
        controller::Outputs {
            health,
            metrics,
            board,
        },
        controller::ExternalOptions {
            runtime: tokio::runtime::Handle::current(),
            node_ports: options.node_ports,
            external_ip_cidrs: options.external_ip_cidrs.clone(),
            api_addresses,
            frontends_per_service: options.frontends_per_service,
            maglev_bytes: options.maglev_bytes,
            ct_timeouts: options.ct_timeouts,
        },
        stop.clone(),
    )
    .with_workloads(workloads::Workloads::new(
        options.node_name.clone(),
        options.datapath.cgroup.clone(),
        datapath::cgroup2_root().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup")),
        options.workload_detection.clone(),
    ));
    controller.node_expected = matches!(options.source, SourceOptions::Kubernetes { .. });
    let sync = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || {
            privileges::limit_thread(privileges::SYNC);
            controller.run(events)
        })
        .context("starting the sync thread")?;
    // Loading is done: this thread (and any it starts) needs no more than CAP_BPF.
    privileges::limit_thread(privileges::OTHER);
    if let (
        Some(sink),
        SourceOptions::Manifests {
            dir,
            rescan_interval,
        },
    ) = (manifest_sink, &options.source)
    {
        source::manifests::spawn(dir.clone(), *rescan_interval, sink)?;
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let watch_sync = async {
        while !sync.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received"),
        _ = sigint.recv() => info!("SIGINT received"),
        _ = watch_sync => warn!("the sources stopped; shutting down"),
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + STOP_GRACE;
    while !sync.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !sync.is_finished() {
        // In the middle of one kernel call: the maps are consistent at every step, and
        // the datapath stays attached through its pinned links.
        warn!("the sync did not reach a stopping point in time; exiting anyway");
        if options.detach_on_exit {
            datapath::cleanup(&options.datapath.pin_dir, options.datapath.netns.as_deref())?;
        }
        status::remove(&options.datapath.pin_dir);
        return Ok(());
    }
    let datapath = sync
        .join()
        .map_err(|_| anyhow::anyhow!("the sync thread panicked"))?;
    let result = datapath.shutdown(options.detach_on_exit);
    status::remove(&options.datapath.pin_dir);
    result
}
