//! `lb daemon`: load the datapath, then keep the kernel maps equal to what the source
//! describes, until SIGINT/SIGTERM.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{Datapath, DatapathOptions, KernelMaps},
    manifests::{Kind, ManifestDir, Object, SourceChanges},
    model::{Changes, Model, Protocol},
    reconcile::{GoneBackend, Reconciler},
    sockets,
};

#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub manifests: PathBuf,
    pub datapath: DatapathOptions,
    pub keep_pinned: bool,
    /// How often the folder is rescanned even without a file-system event (a safety
    /// net for missed inotify events; unchanged files are not re-read).
    pub rescan_interval: Duration,
}

/// Events from the file watcher are bunched for this long: editors write a file in
/// several steps, and one sync per save is enough.
const DEBOUNCE: Duration = Duration::from_millis(25);

struct Controller {
    source: ManifestDir,
    model: Model,
    reconciler: Reconciler,
    maps: KernelMaps,
}

impl Controller {
    /// Reads what changed in the folder and applies it to the kernel.
    fn sync(&mut self) {
        let started = Instant::now();
        let changes = match self.source.scan() {
            Ok(changes) => changes,
            Err(err) => {
                // The folder vanished or became unreadable: keep serving the last state.
                warn!("{err:#}; keeping the current services");
                return;
            }
        };
        for problem in &changes.problems {
            warn!("{problem}");
        }
        if changes.is_empty() {
            return;
        }
        self.apply_source_changes(changes);
        let frontend_changes = self.model.recompute();
        report(&frontend_changes);
        if frontend_changes.frontends.is_empty() {
            return;
        }
        match self
            .reconciler
            .apply(&mut self.maps, &frontend_changes.frontends)
        {
            Ok(stats) => {
                info!(
                    changed_frontends = frontend_changes.frontends.len(),
                    map_writes = stats.writes(),
                    frontends = self.reconciler.frontend_count(),
                    backends = self.reconciler.backend_count(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "services updated"
                );
                self.terminate_gone(&stats.gone);
            }
            Err(err) => {
                error!(
                    "updating the kernel maps failed: {err:#}; resynchronising from the kernel's state"
                );
                self.resync();
            }
        }
    }

    /// Ends sockets still connected to backends that left their Service (after the maps
    /// changed, so clients that reconnect get a live backend).
    fn terminate_gone(&mut self, gone: &[GoneBackend]) {
        if gone.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self
            .maps
            .take_sockets_of(gone)
            .and_then(|sockets| Ok((sockets.len(), sockets::terminate(&sockets)?)));
        match result {
            Ok((tracked, report)) => info!(
                removed_backends = gone.len(),
                tracked_sockets = tracked,
                destroyed = report.destroyed,
                namespaces_searched = report.namespaces,
                elapsed_us = started.elapsed().as_micros() as u64,
                "terminated sockets of removed backends"
            ),
            Err(err) => warn!("terminating sockets of removed backends failed: {err:#}"),
        }
    }

    fn apply_source_changes(&mut self, changes: SourceChanges) {
        for object in changes.upserted {
            match object {
                Object::Service(spec) => self.model.upsert_service(spec),
                Object::Slice(spec) => self.model.upsert_slice(spec),
            }
        }
        for (kind, id) in changes.removed {
            match kind {
                Kind::Service => self.model.remove_service(&id),
                Kind::EndpointSlice => self.model.remove_slice(&id),
            }
        }
    }

    /// Rebuilds the reconciler from what the kernel holds and writes the differences.
    /// Used at start-up (adopting maps pinned by a previous run) and after a failed
    /// write.
    fn resync(&mut self) {
        let started = Instant::now();
        let result = self
            .maps
            .raw_entries()
            .and_then(|(services, backends, names)| {
                self.reconciler = Reconciler::adopt(services, backends, names);
                let changes = self.reconciler.diff_all(self.model.frontends());
                self.reconciler.apply(&mut self.maps, &changes)
            });
        match result {
            Ok(stats) => {
                info!(
                    frontends = self.reconciler.frontend_count(),
                    backends = self.reconciler.backend_count(),
                    map_writes = stats.writes(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "kernel maps synchronised"
                );
                self.terminate_gone(&stats.gone);
            }
            Err(err) => error!(
                "resynchronising the kernel maps failed: {err:#}; will retry on the next change"
            ),
        }
    }
}

/// Logs what the model could not apply, and protocols the socket hooks may not cover.
fn report(changes: &Changes) {
    for conflict in &changes.conflicts {
        warn!("{conflict}");
    }
    for frontend in changes.frontends.values().flatten() {
        if frontend.key.protocol == Protocol::Sctp {
            warn!(
                "Service {}: {} is programmed, but SCTP is not balanced by the socket hooks \
                 (verified for TCP and UDP only); SCTP clients reach the ClusterIP untranslated",
                frontend.service, frontend.key
            );
        }
    }
}

pub async fn run(options: DaemonOptions) -> Result<()> {
    // Check the source before touching the kernel: a typo in the path should not leave
    // an empty datapath attached.
    let source = ManifestDir::new(&options.manifests)?;
    let mut datapath = Datapath::load(options.datapath.clone())?;
    datapath.start_logger();
    let maps = datapath.take_maps()?;

    let mut controller = Controller {
        source,
        model: Model::default(),
        reconciler: Reconciler::new(),
        maps,
    };

    // Initial sync: read everything, then make the kernel match (adopting pinned state).
    let started = Instant::now();
    let changes = controller.source.scan()?;
    for problem in &changes.problems {
        warn!("{problem}");
    }
    controller.apply_source_changes(changes);
    report(&controller.model.recompute());
    controller.resync();
    info!(
        services = controller.model.service_count(),
        endpoint_slices = controller.model.slice_count(),
        frontends = controller.reconciler.frontend_count(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        manifests = %options.manifests.display(),
        "ready"
    );

    let (tx, mut events) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .context("creating the file watcher")?;
    notify::Watcher::watch(
        &mut watcher,
        &options.manifests,
        notify::RecursiveMode::Recursive,
    )
    .with_context(|| format!("watching {}", options.manifests.display()))?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut rescan = tokio::time::interval(options.rescan_interval);
    rescan.tick().await;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            Some(()) = events.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
                debug!("manifest folder changed");
                controller.sync();
            }
            _ = rescan.tick() => controller.sync(),
        }
    }
    drop(watcher);
    drop(controller);
    datapath.shutdown(options.keep_pinned)
}
