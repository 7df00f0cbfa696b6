//! `lb daemon`: load the datapath, then keep the kernel maps equal to what the source
//! describes, until SIGINT/SIGTERM.

use std::{
    collections::{BTreeMap, BTreeSet},
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

/// A file written in place (no rename) is re-read when its writer closes it; if the
/// writer keeps it open (or writes through mmap), this long after its last write.
const UNCLOSED_WRITE_GRACE: Duration = Duration::from_millis(200);

/// What a file-system event asks for.
enum Trigger {
    /// These files are complete (closed after writing, renamed into place, removed).
    Ready(Vec<PathBuf>),
    /// These files are being written; wait for them to be closed.
    Writing(Vec<PathBuf>),
    /// Something we cannot narrow down (a directory moved, events were lost).
    Rescan,
}

fn classify(event: notify::Event) -> Option<Trigger> {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    if event.need_rescan() {
        return Some(Trigger::Rescan);
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            Some(Trigger::Ready(event.paths))
        }
        // Opens and reads (ours included).
        EventKind::Access(_) => None,
        EventKind::Create(CreateKind::Folder) => Some(Trigger::Rescan),
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_)) => {
            Some(Trigger::Writing(event.paths))
        }
        EventKind::Modify(ModifyKind::Metadata(_)) => None,
        EventKind::Modify(_) | EventKind::Remove(_) => Some(Trigger::Ready(event.paths)),
        EventKind::Any | EventKind::Other => Some(Trigger::Rescan),
    }
}

struct Controller {
    source: ManifestDir,
    model: Model,
    reconciler: Reconciler,
    maps: KernelMaps,
}

impl Controller {
    /// Reads what changed in the folder (only `paths`, or everything) and applies it
    /// to the kernel.
    fn sync(&mut self, paths: Option<&BTreeSet<PathBuf>>) {
        let started = Instant::now();
        let scanned = match paths {
            Some(paths) => self.source.scan_paths(paths),
            None => self.source.scan(),
        };
        let changes = match scanned {
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

/// Hands memory freed after a large sync (parse buffers, batch vectors) back to the
/// kernel; glibc keeps it otherwise, and operators read RSS.
fn release_freed_memory() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
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

    // Watch before the first read: a change made while the initial sync runs (or right
    // after "ready") is then seen as an event, not left to the periodic rescan.
    let (tx, mut events) = mpsc::unbounded_channel::<Trigger>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let trigger = match event {
            Ok(event) => classify(event),
            Err(_) => Some(Trigger::Rescan),
        };
        if let Some(trigger) = trigger {
            let _ = tx.send(trigger);
        }
    })
    .context("creating the file watcher")?;
    notify::Watcher::watch(
        &mut watcher,
        &options.manifests,
        notify::RecursiveMode::Recursive,
    )
    .with_context(|| format!("watching {}", options.manifests.display()))?;

    // Initial sync: read everything, then make the kernel match (adopting pinned state).
    let started = Instant::now();
    let changes = controller.source.scan()?;
    for problem in &changes.problems {
        warn!("{problem}");
    }
    controller.apply_source_changes(changes);
    report(&controller.model.recompute());
    controller.resync();
    release_freed_memory();
    info!(
        services = controller.model.service_count(),
        endpoint_slices = controller.model.slice_count(),
        frontends = controller.reconciler.frontend_count(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        manifests = %options.manifests.display(),
        "ready"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut rescan = tokio::time::interval(options.rescan_interval);
    rescan.tick().await;
    // Files being written in place, and when they were last written.
    let mut writing: BTreeMap<PathBuf, Instant> = BTreeMap::new();
    loop {
        let grace_deadline = writing
            .values()
            .min()
            .map(|last| tokio::time::Instant::from_std(*last + UNCLOSED_WRITE_GRACE));
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            Some(first) = events.recv() => {
                // Take every event already queued, then sync once.
                let mut ready = BTreeSet::new();
                let mut full = false;
                let mut next = Some(first);
                while let Some(trigger) = next {
                    match trigger {
                        Trigger::Ready(paths) => {
                            for path in paths {
                                writing.remove(&path);
                                ready.insert(path);
                            }
                        }
                        Trigger::Writing(paths) => {
                            for path in paths {
                                writing.insert(path, Instant::now());
                            }
                        }
                        Trigger::Rescan => full = true,
                    }
                    next = events.try_recv().ok();
                }
                if full {
                    debug!("manifest folder changed: full rescan");
                    controller.sync(None);
                } else if !ready.is_empty() {
                    debug!(files = ready.len(), "manifest files changed");
                    controller.sync(Some(&ready));
                }
            }
            _ = async { tokio::time::sleep_until(grace_deadline.unwrap()).await }, if grace_deadline.is_some() => {
                let now = Instant::now();
                let due: BTreeSet<PathBuf> = writing
                    .iter()
                    .filter(|(_, last)| now >= **last + UNCLOSED_WRITE_GRACE)
                    .map(|(path, _)| path.clone())
                    .collect();
                writing.retain(|path, _| !due.contains(path));
                controller.sync(Some(&due));
            }
            _ = rescan.tick() => controller.sync(None),
        }
    }
    drop(watcher);
    drop(controller);
    datapath.shutdown(options.keep_pinned)
}
