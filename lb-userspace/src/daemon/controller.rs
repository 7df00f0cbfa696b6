//! The sync loop, on a thread of its own: source events in, kernel maps out.
//!
//! - Nothing is programmed until every watched kind has listed once (kube-proxy's
//!   `isInitialized`): the first sync then adopts what the kernel holds (state pinned
//!   by a previous run) and writes only the differences, and only after it succeeded
//!   are the cgroup links pointed at this build's programs.
//! - Every later sync recomputes only what changed. A failed sync is retried with
//!   backoff (not only on the next change) as a full resync from the kernel's state.
//! - Work is split into chunks with a stop check between them, so SIGTERM is honoured
//!   within a second even during a sync of hundreds of thousands of Services; every
//!   chunk is written make-before-break, so stopping between chunks (or being killed
//!   in one) leaves the kernel consistent.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, anyhow};
use lb_common::stat;
use tracing::{debug, error, info, warn};

use super::{
    healthcheck::HealthCheckServers, http::Health, metrics::Metrics, status::StatusBoard,
    workloads::Workloads,
};
use crate::{
    datapath::{
        Datapath, KernelMaps,
        flows::{self, CtTimeouts, Removal},
        sockets,
    },
    model::{
        Changes, Frontend, FrontendKey, FrontendKind, Model, NodeContext, NodeSpec, Protocol, Scope,
    },
    reconcile::{ApplyStats, GoneBackend, Limits, MapDump as _, Reconciler},
    source::{Event, Kind, Object},
    warnings::Summary,
};

/// A chunk (written between stop checks) ends at this many frontend changes, or at
/// this many map entries they write (a frontend and one slot per backend): big enough
/// that a large sync writes its batches on every core (see `datapath::batch`), small
/// enough to bound the chunk's working memory and a SIGTERM's wait (about 0.1 s).
const CHUNK: usize = 4096;
const CHUNK_ENTRIES: usize = 65_536;
/// Retry delays after a failed sync.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Frontends the kernel may refuse one by one in a sync before the rest of the sync's
/// upserts are deferred untried (isolating each refusal reads every map back).
const REFUSALS_PER_SYNC: usize = 16;

/// Where the controller reports what it does.
pub struct Outputs {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub board: StatusBoard,
}

/// What the controller needs for node ports, external and load-balancer IPs.
pub struct ExternalOptions {
    /// Runs the health-check node port servers.
    pub runtime: tokio::runtime::Handle,
    /// `--node-port-range`.
    pub node_ports: (u16, u16),
    /// `--external-ip-cidrs`.
    pub external_ip_cidrs: Option<Vec<crate::model::spec::Cidr>>,
    /// Where this daemon reaches the API server.
    pub api_addresses: Vec<std::net::IpAddr>,
    /// `--max-frontends-per-service`.
    pub frontends_per_service: usize,
    /// `--max-maglev-memory`, in bytes.
    pub maglev_bytes: u64,
    /// `--conntrack-*`.
    pub ct_timeouts: CtTimeouts,
}

/// Why a sync ended early.
#[derive(Debug)]
enum SyncError {
    Stopped,
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for SyncError {
    fn from(err: anyhow::Error) -> Self {
        Self::Failed(err)
    }
}

pub struct Controller {
    pub model: Model,
    pub reconciler: Reconciler,
    limits: Limits,
    pub maps: KernelMaps,
    pub datapath: Datapath,
    pub node_name: String,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    board: StatusBoard,
    pub stop: Arc<AtomicBool>,
    /// Kinds the source announces; the first sync waits for all of them.
    pub kinds: BTreeSet<Kind>,
    /// The source always has this node's Node object (Kubernetes; a folder of
    /// manifests may leave it out): warn when it has not.
    pub node_expected: bool,
    /// External-scope frontends already reported as not served from outside.
    external_reported: BTreeSet<FrontendKey>,
    node: Option<Arc<NodeSpec>>,
    /// Every other Node the source has, by name: their addresses are reserved.
    other_nodes: BTreeMap<String, Arc<NodeSpec>>,
    node_ports: (u16, u16),
    /// `--external-ip-cidrs`.
    external_ip_cidrs: Option<Vec<crate::model::spec::Cidr>>,
    /// Where this daemon reaches the API server (reserved from external IPs).
    api_addresses: Vec<std::net::IpAddr>,
    /// Services already warned about a node port outside `--node-port-range`.
    out_of_range_reported: BTreeSet<crate::model::ObjectRef>,
    health_checks: HealthCheckServers,
    listed: BTreeSet<Kind>,
    initialized: bool,
    /// Set after a failed sync: the next one rebuilds the reconciler from the kernel.
    full_sync_needed: bool,
    retry_delay: Duration,
    retry_at: Option<Instant>,
    /// When to try again the frontends the kernel refused, and the backoff after.
    refused_retry_at: Option<Instant>,
    refused_retry_delay: Duration,
    /// When the controller started (the `ready` line reports the time since).
    created: Instant,
    /// Trigger times of slice changes not yet in the kernel.
    triggers: Vec<SystemTime>,
    /// `stat::REVNAT_FULL` when last reported.
    revnat_full_seen: u64,
    last_socket_check: Instant,
    /// When to try again the interfaces whose TC programs failed to attach.
    tc_retry_at: Option<Instant>,
    ct_timeouts: CtTimeouts,
    /// When the tracked flows are next collected.
    flow_gc_at: Instant,
    /// This node's pods' load-balancing modes.
    workloads: Option<Workloads>,
}

impl Controller {
    pub fn new(
        maps: KernelMaps,
        datapath: Datapath,
        mut limits: Limits,
        node_name: String,
        outputs: Outputs,
        external: ExternalOptions,
        stop: Arc<AtomicBool>,
    ) -> Self {
        limits.maglev_bytes = external.maglev_bytes;
        let Outputs {
            health,
            metrics,
            board,
        } = outputs;
        let revnat_full_seen = maps.stat(stat::REVNAT_FULL);
        let health_checks =
            HealthCheckServers::new(external.runtime, datapath.netns().map(Into::into));
        Self {
            node_ports: external.node_ports,
            external_ip_cidrs: external.external_ip_cidrs,
            api_addresses: external.api_addresses,
            out_of_range_reported: BTreeSet::new(),
            health_checks,
            revnat_full_seen,
            last_socket_check: Instant::now(),
            tc_retry_at: None,
            ct_timeouts: external.ct_timeouts,
            flow_gc_at: Instant::now() + external.ct_timeouts.collection_interval(),
            model: {
                let mut model = Model::default();
                model.set_frontend_cap(external.frontends_per_service);
                model
            },
            reconciler: Reconciler::new(limits).with_maglev_size(maps.maglev_size),
            limits,
            maps,
            datapath,
            node_name,
            health,
            metrics,
            board,
            stop,
            kinds: Kind::SERVICES.into_iter().collect(),
            node_expected: false,
            external_reported: BTreeSet::new(),
            node: None,
            other_nodes: BTreeMap::new(),
            listed: BTreeSet::new(),
            initialized: false,
            full_sync_needed: true,
            retry_delay: RETRY_FIRST,
            refused_retry_at: None,
            refused_retry_delay: RETRY_FIRST,
            retry_at: None,
            created: Instant::now(),
            triggers: Vec::new(),
            workloads: None,
        }
    }

    /// Keeps this node's pods' load-balancing modes (without, every pod is balanced
    /// by the socket hooks and Pod events are ignored).
    pub fn with_workloads(mut self, workloads: Workloads) -> Self {
        self.workloads = Some(workloads);
        self
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Runs until the sources close or the stop flag is set; returns the datapath so
    /// the caller can shut it down.
    pub fn run(mut self, events: Receiver<Vec<Event>>) -> Datapath {
        self.model.set_node(self.node_context());
        loop {
            let wait = self
                .retry_at
                .into_iter()
                .chain(self.workloads.as_ref().and_then(Workloads::due_at))
                .min()
                .map_or(Duration::from_secs(3600), |at| {
                    at.saturating_duration_since(Instant::now())
                })
                // Wake regularly to notice the stop flag.
                .min(Duration::from_millis(200));
            match events.recv_timeout(wait) {
                Ok(batch) => {
                    let started = Instant::now();
                    let mut count = batch.len();
                    self.absorb(batch);
                    while !self.stopping()
                        && let Ok(batch) = events.try_recv()
                    {
                        count += batch.len();
                        self.absorb(batch);
                    }
                    debug!(
                        events = count,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "source events absorbed"
                    );
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.stopping() {
                break;
            }
            self.sync_workloads();
            self.watch_socket_map();
            if Instant::now() >= self.flow_gc_at {
                self.collect_flows();
                self.flow_gc_at = Instant::now() + self.ct_timeouts.collection_interval();
            }
            if self.tc_retry_at.is_some_and(|at| Instant::now() >= at) {
                self.datapath.retry_tc();
                self.publish_tc();
            }
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            self.sync();
            if self.stopping() {
                break;
            }
        }
        // The process is about to exit: tearing down the model and the reconciler
        // (hundreds of thousands of objects) would only delay it.
        std::mem::forget(self.model);
        std::mem::forget(self.reconciler);
        self.datapath
    }

    /// Removes the tracked external flows that were idle past their state's timeout,
    /// or whose frontend, source range or backend is gone (kube-proxy's conntrack
    /// cleanup: the next UDP datagram picks a live backend). Only against a reconciler
    /// in step with the kernel: before the first sync every flow would look orphaned.
    fn collect_flows(&mut self) {
        if !self.initialized || self.full_sync_needed {
            return;
        }
        let entries = match self.maps.ct_entries() {
            Ok(entries) => entries,
            Err(err) => {
                warn!("reading the tracked flows for expiry failed: {err:#}");
                return;
            }
        };
        if entries.is_empty() {
            return;
        }
        let started = Instant::now();
        let now = flows::monotonic_ns();
        let check = self.reconciler.flow_check();
        let mut removed: BTreeMap<Removal, u64> = BTreeMap::new();
        let mut kept = 0usize;
        for flow in flows::pair_up(entries) {
            let (Some(value), Some(client), Some(backend)) =
                (flow.value(), flow.client(), flow.backend())
            else {
                continue;
            };
            let reason = check
                .stale(value.svc_id, &client, value.backend_id, backend)
                .or_else(|| {
                    flow.expired(now, &self.ct_timeouts)
                        .then_some(Removal::Expired)
                });
            let Some(reason) = reason else {
                kept += 1;
                continue;
            };
            match self.maps.remove_flow(&flow, reason == Removal::Expired) {
                Ok(true) => *removed.entry(reason).or_default() += 1,
                Ok(false) => kept += 1,
                Err(err) => {
                    warn!("removing a tracked flow failed: {err:#}");
                    break;
                }
            }
        }
        if !removed.is_empty() {
            self.metrics.count_flow_removals(&removed);
            debug!(
                ?removed,
                kept,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "tracked external flows collected"
            );
        }
    }

    /// Writes the pods' modes when they changed (or cgroups awaited appeared).
    fn sync_workloads(&mut self) {
        let Some(workloads) = self.workloads.as_mut() else {
            return;
        };
        if workloads.due_at().is_none_or(|at| at > Instant::now()) {
            return;
        }
        let mut kernel = super::workloads::Kernel {
            maps: &mut self.maps,
            datapath: &mut self.datapath,
        };
        if let Err(err) = workloads.sync(&mut kernel) {
            error!("writing the pods' load-balancing modes (retrying): {err:#}");
        }
        self.metrics
            .sizes
            .set_workloads(&workloads.counts(), workloads.waiting());
        self.board.set_workloads(workloads.status());
    }

    fn node_context(&self) -> NodeContext {
        NodeContext {
            name: self.node_name.clone(),
            zone: self.node.as_ref().and_then(|n| n.zone.clone()),
            addresses: self
                .node
                .as_ref()
                .map(|n| n.addresses.clone())
                .unwrap_or_default(),
            node_port_range: Some(self.node_ports),
            external_ip_cidrs: self.external_ip_cidrs.clone(),
            reserved: self.api_addresses.clone(),
            other_nodes: {
                let mut addresses: Vec<(std::net::IpAddr, String)> = self
                    .other_nodes
                    .values()
                    .flat_map(|n| n.addresses.iter().map(|a| (*a, n.name.clone())))
                    .collect();
                addresses.sort();
                addresses
            },
        }
    }

    /// Writes the node's SNAT source addresses (its first address of each family).
    fn write_node_addrs(&mut self) -> Result<()> {
        let addresses = self.node_context().addresses;
        let first = |v6: bool| {
            addresses
                .iter()
                .find(|a| a.is_ipv6() == v6)
                .map(|a| lb_common::addr_from_ip(*a))
        };
        self.maps.set_node_addrs(first(false), first(true))
    }

    /// Warns once per Service about node ports this node does not serve.
    fn check_node_ports(&mut self, spec: &crate::model::ServiceSpec) {
        let (min, max) = self.node_ports;
        let outside: Vec<u16> = spec
            .ports
            .iter()
            .filter_map(|p| p.node_port)
            .filter(|p| !(min..=max).contains(p))
            .collect();
        if outside.is_empty() {
            self.out_of_range_reported.remove(&spec.id);
        } else if self.out_of_range_reported.insert(spec.id.clone()) {
            warn!(
                "Service {}: nodePort {outside:?} is outside --node-port-range {min}-{max}: not served",
                spec.id
            );
        }
    }

    fn absorb(&mut self, batch: Vec<Event>) {
        let mut node_changed = false;
        let mut others_changed = false;
        for (i, event) in batch.into_iter().enumerate() {
            // A huge batch (a first list) must not hold up a shutdown.
            if i % 1024 == 1023 && self.stopping() {
                return;
            }
            match event {
                Event::Upsert(Object::Service(spec)) => {
                    self.check_node_ports(&spec);
                    self.model.upsert_service(spec)
                }
                Event::Upsert(Object::Slice(spec)) => self.model.upsert_slice(spec),
                Event::Upsert(Object::Node(spec)) => {
                    if spec.name == self.node_name {
                        if self.node.as_ref() != Some(&spec) {
                            self.node = Some(spec);
                            node_changed = true;
                        }
                    } else if self.other_nodes.get(&spec.name).map(|n| &n.addresses)
                        != Some(&spec.addresses)
                    {
                        self.other_nodes.insert(spec.name.clone(), spec);
                        others_changed = true;
                    }
                }
                Event::Upsert(Object::Pod(spec)) => {
                    if let Some(w) = &mut self.workloads {
                        w.upsert_pod(spec)
                    }
                }
                Event::Upsert(Object::Namespace(spec)) => {
                    if let Some(w) = &mut self.workloads {
                        w.upsert_namespace(&spec)
                    }
                }
                Event::Remove(Kind::Pod, id) => {
                    if let Some(w) = &mut self.workloads {
                        w.remove_pod(&id)
                    }
                }
                Event::Remove(Kind::Namespace, id) => {
                    if let Some(w) = &mut self.workloads {
                        w.remove_namespace(&id.name)
                    }
                }
                Event::Remove(Kind::Service, id) => self.model.remove_service(&id),
                Event::Remove(Kind::EndpointSlice, id) => self.model.remove_slice(&id),
                Event::Remove(Kind::Node, id) => {
                    if *id.name == *self.node_name {
                        node_changed |= self.node.take().is_some();
                    } else {
                        others_changed |= self.other_nodes.remove(&*id.name).is_some();
                    }
                }
                Event::Listed(kind) => {
                    if let Some(w) = &mut self.workloads {
                        w.listed(kind);
                    }
                    if self.listed.insert(kind) && self.kinds.is_subset(&self.listed) {
                        debug!("every kind has been listed: programming the datapath");
                    }
                }
            }
        }
        if others_changed && !node_changed {
            self.model.set_node(self.node_context());
        }
        if node_changed {
            if let Some(node) = &self.node {
                info!(node = %node.name, zone = node.zone.as_deref().unwrap_or(""), addresses = ?node.addresses, "this node's Node object");
            }
            self.model.set_node(self.node_context());
            if let Err(err) = self.write_node_addrs() {
                error!("writing the node's addresses for SNAT: {err:#}");
            }
        }
        if self.model.pending() > 0 {
            self.health.queued();
        }
    }

    fn sync(&mut self) {
        if !self.kinds.is_subset(&self.listed) {
            return;
        }
        if self.initialized
            && !self.full_sync_needed
            && self.model.pending() == 0
            && !self.refused_retry_due()
        {
            return;
        }
        let started = Instant::now();
        let full = !self.initialized || self.full_sync_needed;
        let result = if full {
            self.full_sync()
        } else {
            self.incremental_sync()
        };
        match result {
            Ok(stats) => {
                self.succeeded(started, full, stats);
                self.health_checks.sync(self.model.health_checks());
            }
            Err(SyncError::Stopped) => {
                info!(
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "sync interrupted by shutdown; the kernel maps are consistent"
                );
            }
            Err(SyncError::Failed(err)) => {
                self.metrics.sync_failures.inc();
                self.full_sync_needed = true;
                let delay = self.retry_delay;
                self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
                self.retry_at = Some(Instant::now() + delay);
                error!(
                    retry_in_ms = delay.as_millis() as u64,
                    "syncing the kernel maps failed: {err:#}; will resynchronise from the kernel's state"
                );
            }
        }
    }

    fn succeeded(&mut self, started: Instant, full: bool, stats: ApplyStats) {
        let elapsed = started.elapsed();
        self.full_sync_needed = false;
        self.retry_at = None;
        self.retry_delay = RETRY_FIRST;
        self.health.synced(started);
        self.metrics.syncs.inc();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        self.metrics.map_writes.inc_by(stats.writes() as u64);
        self.metrics.last_sync.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let now = SystemTime::now();
        for trigger in self.triggers.drain(..) {
            if let Ok(latency) = now.duration_since(trigger) {
                self.metrics
                    .programming_latency
                    .observe(latency.as_secs_f64());
            }
        }
        let sizes = &self.metrics.sizes;
        sizes
            .frontends
            .store(self.reconciler.frontend_count() as u64, Ordering::Relaxed);
        sizes
            .backends
            .store(self.reconciler.backend_count() as u64, Ordering::Relaxed);
        sizes.service_entries.store(
            self.reconciler.service_entry_count() as u64,
            Ordering::Relaxed,
        );
        if full {
            info!(
                frontends = self.reconciler.frontend_count(),
                backends = self.reconciler.backend_count(),
                map_writes = stats.writes(),
                elapsed_us = elapsed.as_micros() as u64,
                "kernel maps synchronised"
            );
        } else {
            info!(
                map_writes = stats.writes(),
                frontends = self.reconciler.frontend_count(),
                backends = self.reconciler.backend_count(),
                elapsed_us = elapsed.as_micros() as u64,
                "services updated"
            );
        }
        sizes.unprogrammed.store(
            self.reconciler.unprogrammed().len() as u64,
            Ordering::Relaxed,
        );
        self.report_capacity(&stats);
        self.schedule_refused_retry(&stats);
        self.terminate_gone(&stats.gone);
        // Flows whose backend left, whose frontend went or whose source ranges
        // shrank: collected at once (the next UDP datagram must find a live backend).
        if !stats.gone.is_empty() || stats.tables_deleted > 0 || stats.ranges_deleted > 0 {
            self.flow_gc_at = Instant::now();
        }
        if !self.initialized {
            self.initialized = true;
            self.health.set_ready();
            self.board.set_ready();
            release_freed_memory();
            info!(
                services = self.model.service_count(),
                endpoint_slices = self.model.slice_count(),
                frontends = self.reconciler.frontend_count(),
                elapsed_ms = self.created.elapsed().as_millis() as u64,
                "ready"
            );
            if self.node_expected && self.node.is_none() {
                // A misnamed node is otherwise silent: local endpoints still come from
                // the endpoints' nodeName, but zones and node addresses are unknown.
                warn!(
                    node = %self.node_name,
                    "no Node object of this name in the source: topology hints are ignored and \
                     node-port addresses are unknown (endpoints count as local by their \
                     nodeName); check --node-name"
                );
            }
        } else if stats.writes() > 10_000 {
            release_freed_memory();
        }
    }

    /// Recomputes what changed and reports it.
    fn recompute(&mut self) -> Result<Changes, SyncError> {
        let stop = self.stop.clone();
        let changes = self.model.recompute_until(&|| stop.load(Ordering::SeqCst));
        self.metrics
            .service_changes
            .inc_by(changes.service_changes as u64);
        self.metrics
            .endpoint_changes
            .inc_by(changes.slice_changes as u64);
        self.triggers.extend(changes.triggers.iter().copied());
        let external_served = !self.datapath.devices().is_empty();
        report(&changes, &mut self.external_reported, external_served);
        self.board.set_unserved(self.model.unserved());
        if changes.interrupted {
            return Err(SyncError::Stopped);
        }
        Ok(changes)
    }

    fn incremental_sync(&mut self) -> Result<ApplyStats, SyncError> {
        let changes = self.recompute()?;
        let mut frontends = changes.frontends.clone();
        if self.refused_retry_due() {
            // A later change of the same frontend (in `frontends`) supersedes its retry.
            for (key, frontend) in self.reconciler.refused() {
                frontends.entry(key).or_insert(Some(frontend));
            }
        }
        let result = self.apply_chunked(frontends.clone());
        self.board
            .update(&frontends, self.reconciler.unprogrammed());
        result
    }

    fn refused_retry_due(&self) -> bool {
        self.refused_retry_at.is_some_and(|at| Instant::now() >= at)
    }

    /// Schedules the next try of the frontends the kernel refused, backing off while
    /// it keeps refusing.
    fn schedule_refused_retry(&mut self, stats: &ApplyStats) {
        if !self.reconciler.has_refused() {
            self.refused_retry_at = None;
            self.refused_retry_delay = RETRY_FIRST;
            return;
        }
        if !stats.refused.is_empty() || self.refused_retry_at.is_none() {
            let delay = self.refused_retry_delay;
            self.refused_retry_delay = (delay * 2).min(RETRY_MAX);
            self.refused_retry_at = Some(Instant::now() + delay);
        }
    }

    /// Rebuilds the reconciler from the kernel's maps and writes what differs from the
    /// model; then (first time) points the datapath's links at this build's programs.
    fn full_sync(&mut self) -> Result<ApplyStats, SyncError> {
        if !self.datapath.is_active() {
            let addresses = self.node_context().addresses;
            // Not finding the interfaces costs the TC path only, never the sockets'.
            let devices = match self.datapath.resolve_devices(&addresses) {
                Ok(devices) => devices.to_vec(),
                Err(err) => {
                    warn!("cannot tell the interfaces for traffic from other machines: {err:#}");
                    Vec::new()
                }
            };
            if devices.is_empty() {
                // Each external frontend is warned about as it appears (`report`).
                info!(
                    "no interface for traffic from other machines (none holds one of the node's \
                     addresses {addresses:?}; see --devices): node ports, external and \
                     load-balancer IPs are served to connections made on this node only"
                );
            } else {
                info!(
                    ?devices,
                    "node ports, external and load-balancer IPs are served on these interfaces"
                );
            }
        }
        self.write_node_addrs()?;
        self.recompute()?;
        self.reconciler =
            Reconciler::from_state(self.limits, self.maps.maglev_size, self.maps.dump()?);
        let diff = self.reconciler.diff_all(self.model.frontends());
        let stats = self.apply_chunked(diff);
        let everything: BTreeMap<FrontendKey, Option<Arc<Frontend>>> = self
            .model
            .frontends()
            .iter()
            .map(|(key, frontend)| (*key, Some(frontend.clone())))
            .collect();
        self.board
            .reset(&everything, self.reconciler.unprogrammed());
        let stats = stats?;
        if !self.datapath.is_active() {
            self.datapath.activate().map_err(SyncError::Failed)?;
            self.publish_tc();
        }
        Ok(stats)
    }

    /// Shows how the TC programs are attached per interface (lb list, metrics) and
    /// schedules another try for the interfaces where attaching failed.
    fn publish_tc(&mut self) {
        let devices = self.datapath.tc_devices();
        let failed = devices.iter().filter(|d| d.error.is_some()).count();
        let sizes = &self.metrics.sizes;
        sizes
            .tc_devices_failed
            .store(failed as u64, Ordering::Relaxed);
        sizes
            .tc_devices_attached
            .store((devices.len() - failed) as u64, Ordering::Relaxed);
        self.board.set_tc_devices(devices);
        self.tc_retry_at = (failed > 0).then(|| Instant::now() + self.datapath.tc_retry());
    }

    /// Applies changes in chunks (removals first, so space frees before additions),
    /// checking the stop flag between chunks; then, if space was freed, tries again
    /// the frontends that did not fit before.
    fn apply_chunked(
        &mut self,
        changes: BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
    ) -> Result<ApplyStats, SyncError> {
        let mut refusals_left = REFUSALS_PER_SYNC;
        let mut stats = self.apply_chunks(changes, &mut refusals_left)?;
        if stats.freed_space() && !self.reconciler.unprogrammed().is_empty() {
            let retry = self.apply_chunks(self.reconciler.pending(), &mut refusals_left)?;
            stats.absorb(retry);
        }
        Ok(stats)
    }

    fn apply_chunks(
        &mut self,
        changes: BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
        refusals_left: &mut usize,
    ) -> Result<ApplyStats, SyncError> {
        let mut total = ApplyStats::default();
        let (removals, mut upserts): (Vec<_>, Vec<_>) = changes
            .into_iter()
            .partition(|(_, change)| change.is_none());
        // Chunks in admission order too (see Reconciler::apply): a ClusterIP or an older
        // Service never loses space to a frontend of a later chunk.
        upserts.sort_by_key(|(key, change)| (change.as_ref().map(|f| f.admission_rank()), *key));
        let mut all = removals;
        all.extend(upserts);
        let count = all.len();
        let mut done = 0;
        let mut rest = all.into_iter().peekable();
        while rest.peek().is_some() {
            if self.stopping() {
                return Err(SyncError::Stopped);
            }
            let mut chunk = BTreeMap::new();
            let mut entries = 0;
            while chunk.len() < CHUNK && entries < CHUNK_ENTRIES {
                let Some((key, change)) = rest.next() else {
                    break;
                };
                entries += 1 + change.as_ref().map_or(0, |f| f.backends.len());
                chunk.insert(key, change);
            }
            let stats = self
                .reconciler
                .apply_isolating(&mut self.maps, &chunk, refusals_left)
                .map_err(|err| SyncError::Failed(anyhow!(err)))?;
            done += chunk.len();
            if done < count {
                debug!(done, count, "frontend changes written so far");
            }
            total.absorb(stats);
        }
        Ok(total)
    }

    /// Says which frontends did not fit the maps (and which fit now).
    fn report_capacity(&self, stats: &ApplyStats) {
        let mut summary = Summary::default();
        let unprogrammed = self.reconciler.unprogrammed();
        if let Some(err) = &stats.retried_after {
            warn!(
                "a map write failed: {err}; the maps were read back and the writes retried \
                 (frontends the kernel still refused are listed by Service)"
            );
        }
        let refusals: BTreeMap<&FrontendKey, &str> = stats
            .refused
            .iter()
            .map(|(key, why)| (key, why.as_str()))
            .collect();
        for (key, shortage) in &stats.unprogrammed {
            let Some((frontend, _)) = unprogrammed.get(key) else {
                continue;
            };
            let what = if self.reconciler.is_programmed(key) {
                "update not programmed (the previous version keeps serving)"
            } else {
                "not programmed"
            };
            let (shape, why) = match refusals.get(key) {
                Some(why) => (
                    "kernel",
                    format!("the kernel refused its writes: {why}; retried with backoff"),
                ),
                None => (
                    "capacity",
                    format!("{shortage}; retried when space frees up"),
                ),
            };
            summary.warn(
                Some(shape),
                &format!("Service {}: {key}: {what}: {why}", frontend.service),
            );
        }
        summary.finish();
        if !stats.now_programmed.is_empty() {
            info!(
                frontends = stats.now_programmed.len(),
                still_waiting = unprogrammed.len(),
                "frontends that did not fit are programmed now"
            );
        }
    }

    /// Ends sockets still connected to backends that left their Service (after the maps
    /// changed, so clients that reconnect get a live backend).
    fn terminate_gone(&mut self, gone: &[GoneBackend]) {
        if gone.is_empty() {
            return;
        }
        let started = Instant::now();
        // Sockets whose translation did not fit in the socket map are found through
        // their own storage, which costs a search of every namespace: only while some
        // are open.
        let overflowed_open = self.overflowed_open();
        let result = self.maps.take_sockets_of(gone).and_then(|tracked| {
            let overflowed = (overflowed_open > 0).then(|| sockets::Overflowed {
                storage_map: self.maps.sock_local_fd(),
                gone,
            });
            Ok((tracked.len(), sockets::terminate(&tracked, overflowed)?))
        });
        match result {
            Ok((tracked, report)) => {
                self.metrics
                    .sockets_destroyed
                    .inc_by(report.destroyed as u64);
                info!(
                    removed_backends = gone.len(),
                    tracked_sockets = tracked,
                    overflowed_open,
                    destroyed = report.destroyed,
                    destroyed_overflowed = report.destroyed_overflowed,
                    namespaces_searched = report.namespaces,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "terminated sockets of removed backends"
                );
            }
            Err(err) => warn!("terminating sockets of removed backends failed: {err:#}"),
        }
    }
}

impl Controller {
    /// Open sockets whose translation is kept in their own storage because the socket
    /// map was full.
    fn overflowed_open(&self) -> u64 {
        self.maps
            .stat(stat::OVERFLOWED_SOCKETS)
            .saturating_sub(self.maps.stat(stat::OVERFLOWED_RELEASED))
    }

    /// Reports translations the socket map had no room for since the last check.
    fn watch_socket_map(&mut self) {
        if self.last_socket_check.elapsed() < SOCKET_CHECK_INTERVAL {
            return;
        }
        self.last_socket_check = Instant::now();
        let full = self.maps.stat(stat::REVNAT_FULL);
        if full > self.revnat_full_seen {
            let table = self.maps.sockets;
            warn!(
                map = table.map_name(),
                capacity = table.capacity,
                translations = full - self.revnat_full_seen,
                overflowed_open = self.overflowed_open(),
                "the socket map is full (--max-sockets {}): connections were translated but \
                 kept in their sockets' own storage instead; replies still translate, and \
                 their termination when a backend leaves needs a slower search of every \
                 namespace. Raise --max-sockets",
                table.capacity
            );
            self.revnat_full_seen = full;
        }
    }
}

/// How often the socket map is checked for overflow.
const SOCKET_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Hands memory freed after a large sync (parse buffers, batch vectors) back to the
/// kernel; glibc keeps it otherwise, and operators read RSS.
fn release_freed_memory() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Logs what the model could not apply, and what the datapath does not serve yet
/// (once per frontend: `reported` remembers them), summarising floods.
fn report(changes: &Changes, reported: &mut BTreeSet<FrontendKey>, external_served: bool) {
    let mut summary = Summary::default();
    for (key, frontend) in &changes.frontends {
        let Some(frontend) = frontend else {
            reported.remove(key);
            continue;
        };
        if key.scope == Scope::External && !external_served && reported.insert(*key) {
            summary.warn(
                Some("external"),
                &format!(
                    "Service {}: {} {} is served to connections made on this node only: \
                     traffic arriving from other machines is not balanced (no interface for it, \
                     see --devices)",
                    frontend.service,
                    match frontend.kind {
                        FrontendKind::NodePort => "node port",
                        FrontendKind::LoadBalancer => "load-balancer IP",
                        FrontendKind::ExternalIp | FrontendKind::ClusterIp => "external IP",
                    },
                    FrontendKey {
                        scope: Scope::Internal,
                        ..*key
                    }
                ),
            );
        }
    }
    for conflict in &changes.conflicts {
        summary.warn(Some("conflict"), &conflict.to_string());
    }
    for refusal in &changes.refused {
        summary.warn(Some("external-address"), &refusal.to_string());
    }
    for capped in &changes.capped {
        summary.warn(Some("frontends-per-service"), &capped.to_string());
    }
    for (service, why) in &changes.unserved {
        summary.warn(Some("node-port"), &format!("Service {service}: {why}"));
    }
    for frontend in changes.frontends.values().flatten() {
        if frontend.key.protocol == Protocol::Sctp {
            summary.warn(
                Some("sctp"),
                &format!(
                    "Service {}: {} is programmed and SCTP connects are translated like TCP, \
                     but SCTP balancing is untested (only TCP and UDP are verified)",
                    frontend.service, frontend.key
                ),
            );
        }
    }
    summary.finish();
}
