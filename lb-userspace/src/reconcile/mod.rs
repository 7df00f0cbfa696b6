//! Turns desired frontends into ordered map writes.
//!
//! Only what changed is written (O(changes), not O(services)), in make-before-break
//! order so a `connect()` racing an update always finds a complete path:
//! 1. new backends are written to `LB_BACKENDS`;
//! 2. for each changed frontend, backend slots are written, then the frontend entry
//!    with its new count;
//! 3. slots beyond a shrunk count, and removed frontends (frontend entry first), are
//!    deleted;
//! 4. backends no longer referenced by any slot are deleted.
//!
//! External-scope frontends (node ports, external and load-balancer IPs for packets
//! from other machines) also get a Maglev table in `LB_MAGLEV`, written after their
//! backends and before their frontend entry, and replaced whole when their backend set
//! changes; their `loadBalancerSourceRanges` go to `LB_SOURCE_RANGES` (added before
//! the frontend entry, removed after).
//!
//! Frontends with session affinity also list their backends in `LB_AFFINITY_MEMBERS`
//! (written with the slots, deleted with them), so a client's remembered backend is
//! used only while it still serves the frontend.
//!
//! Slots are stable: a surviving backend keeps its slot, new backends fill holes, and a
//! shrink moves the last backends into the holes. One backend change is therefore one or
//! two slot writes, whatever the service size.
//!
//! Ids are handed out round-robin, so an id freed now is reused only after every other
//! id has been: a program that read an id just before it was freed never sees it point
//! at an unrelated backend.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use lb_common::{
    AffinityMember, BACKEND_F_LOCAL, Backend, DEFAULT_MAGLEV_TABLE_SIZE, MAX_BACKENDS_PER_FRONTEND,
    SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue,
    SourceRangeKey, addr_from_ip, addr_to_ip, maps, port_from_net, port_to_net,
};

use self::{
    backends::{BackendEntry, BackendTable},
    ids::IdAllocator,
    layout::layout,
};
use crate::model::{BackendAddr, Frontend, FrontendKey, FrontendKind, Protocol, Scope};

mod backends;
mod ids;
mod layout;
pub mod maglev;

/// The map operations the reconciler needs; the kernel maps implement it, and so does
/// an in-memory map set in tests. Each call is a batch applied element by element, in
/// order (a concurrent reader sees a prefix of it): the kernel uses one
/// `BPF_MAP_*_BATCH` syscall per call where it can.
pub trait MapSet {
    fn put_backends(&mut self, entries: &[(u32, Backend)]) -> Result<()>;
    fn delete_backends(&mut self, ids: &[u32]) -> Result<()>;
    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()>;
    fn delete_services(&mut self, keys: &[ServiceKey]) -> Result<()>;
    fn reset_frontend_stats(&mut self, svc_ids: &[u32]) -> Result<()>;
    fn reset_backend_stats(&mut self, backend_ids: &[u32]) -> Result<()>;
    /// Names frontends for operators (`lb list`, `bpftool`); the datapath ignores them.
    fn put_frontend_names(&mut self, names: &[(u32, String)]) -> Result<()>;
    fn delete_frontend_names(&mut self, svc_ids: &[u32]) -> Result<()>;
    fn put_affinity_members(&mut self, members: &[AffinityMember]) -> Result<()>;
    fn delete_affinity_members(&mut self, members: &[AffinityMember]) -> Result<()>;
    /// Replaces these frontends' Maglev tables (entries are backend ids), each at once.
    fn put_maglev(&mut self, tables: &[(u32, Vec<u32>)]) -> Result<()>;
    fn delete_maglev(&mut self, svc_ids: &[u32]) -> Result<()>;
    fn put_source_ranges(&mut self, keys: &[SourceRangeKey]) -> Result<()>;
    fn delete_source_ranges(&mut self, keys: &[SourceRangeKey]) -> Result<()>;
}

/// Everything the maps hold that the reconciler keeps track of.
#[derive(Debug, Default)]
pub struct KernelState {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, Backend)>,
    pub names: Vec<(u32, String)>,
    pub members: Vec<AffinityMember>,
    /// Frontend ids that have a Maglev table.
    pub tables: Vec<u32>,
    pub ranges: Vec<SourceRangeKey>,
}

/// Reads back what the maps hold: after a failed write the reconciler's view is
/// rebuilt from it.
pub trait MapDump {
    fn dump(&self) -> Result<KernelState>;
}

/// The `LB_SOURCE_RANGES` entries of frontend `svc_id`.
fn wanted_ranges(svc_id: u32, frontend: &Frontend) -> BTreeSet<SourceRangeKey> {
    frontend
        .source_ranges
        .iter()
        .map(|cidr| {
            // IPv4 prefixes are stored mapped: 96 bits of ::ffff:0:0/96 come first.
            let bits = match cidr.addr {
                std::net::IpAddr::V4(_) => 96 + u32::from(cidr.prefix),
                std::net::IpAddr::V6(_) => u32::from(cidr.prefix),
            };
            SourceRangeKey {
                prefix_len: 32 + bits,
                svc_id_be: svc_id.to_be(),
                addr: addr_from_ip(cidr.addr),
            }
        })
        .collect()
}

/// How a frontend is named in `LB_FRONTEND_NAMES`: `namespace/service:port`.
pub fn frontend_name(frontend: &Frontend) -> String {
    if frontend.port_name.is_empty() {
        format!("{}:{}", frontend.service, frontend.key.port)
    } else {
        format!("{}:{}", frontend.service, frontend.port_name)
    }
}

/// A backend as the kernel identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendIdentity {
    pub addr: BackendAddr,
    pub protocol: Protocol,
}

impl BackendIdentity {
    fn to_map_value(self, local: bool) -> Backend {
        Backend {
            addr: addr_from_ip(self.addr.ip),
            port: port_to_net(self.addr.port),
            proto: self.protocol.number(),
            flags: if local { BACKEND_F_LOCAL } else { 0 },
            _pad: 0,
        }
    }
}

/// The frontend entry's attributes besides its count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrontendAttrs {
    pub flags: u16,
    pub affinity_timeout: u32,
}

impl FrontendAttrs {
    pub fn of(frontend: &Frontend) -> Self {
        let mut flags = 0;
        if frontend.affinity_timeout.is_some() {
            flags |= SVC_F_AFFINITY;
        }
        if frontend.local_policy {
            flags |= SVC_F_LOCAL;
        }
        if !frontend.source_ranges.is_empty() {
            flags |= SVC_F_SOURCE_RANGES;
        }
        if frontend.kind == FrontendKind::NodePort {
            flags |= SVC_F_NODE_PORT;
        }
        Self {
            flags,
            affinity_timeout: frontend.affinity_timeout.unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Programmed {
    svc_id: u32,
    name: String,
    attrs: FrontendAttrs,
    /// Backends taken out of rotation but still listed (terminating, unready): their
    /// sockets drain, and are terminated once the endpoint disappears.
    draining: BTreeSet<BackendAddr>,
    /// Backend id per slot (slot i + 1). 0 marks a slot that must be rewritten.
    slots: Vec<u32>,
    /// External scope: the backend ids (in backend address order) the frontend's Maglev
    /// table was built from by this process; `None`: no table, or not known to be
    /// current (adopted), so it is rewritten.
    table_for: Option<Vec<u32>>,
    /// `LB_SOURCE_RANGES` entries written for it.
    ranges: BTreeSet<SourceRangeKey>,
}

/// A backend that left a frontend altogether (not merely unready): sockets translated
/// to it for that frontend should be terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoneBackend {
    pub svc_id: u32,
    pub backend: BackendIdentity,
}

/// What an apply has admitted so far, and what the kernel held when it started.
#[derive(Debug, Default)]
struct Budget {
    frontend_ids: usize,
    service_entries: usize,
    /// LB_SOURCE_RANGES entries held, and admitted by this apply.
    ranges_held: usize,
    ranges: usize,
    /// Maglev tables held, and admitted by this apply.
    tables_held: usize,
    tables: usize,
}

/// What one [`Reconciler::apply`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub gone: Vec<GoneBackend>,
    /// Frontends (or updates of them) that did not fit, and why.
    pub unprogrammed: Vec<(FrontendKey, Shortage)>,
    /// Frontends that had not fit before and are programmed now.
    pub now_programmed: Vec<FrontendKey>,
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub slots_written: usize,
    pub slots_deleted: usize,
    pub backends_written: usize,
    pub backends_deleted: usize,
    pub members_written: usize,
    pub members_deleted: usize,
    /// Maglev tables written (each replaced whole).
    pub tables_written: usize,
    /// Maglev tables and source ranges deleted (of removed frontends, or garbage).
    pub tables_deleted: usize,
    pub ranges_deleted: usize,
    /// Frontends whose writes the kernel refused, with its error; they are skipped
    /// (listed in `unprogrammed` too) and the rest of the apply goes on.
    pub refused: Vec<(FrontendKey, String)>,
    /// A write failed and succeeded after the maps were read back (or the changes were
    /// applied one by one): the first error.
    pub retried_after: Option<String>,
}

impl ApplyStats {
    /// Adds another apply's stats (chunked syncs).
    pub fn absorb(&mut self, other: ApplyStats) {
        self.gone.extend(other.gone);
        self.unprogrammed.extend(other.unprogrammed);
        self.now_programmed.extend(other.now_programmed);
        self.frontends_written += other.frontends_written;
        self.frontends_deleted += other.frontends_deleted;
        self.slots_written += other.slots_written;
        self.slots_deleted += other.slots_deleted;
        self.backends_written += other.backends_written;
        self.backends_deleted += other.backends_deleted;
        self.members_written += other.members_written;
        self.members_deleted += other.members_deleted;
        self.tables_written += other.tables_written;
        self.tables_deleted += other.tables_deleted;
        self.ranges_deleted += other.ranges_deleted;
        self.refused.extend(other.refused);
        if self.retried_after.is_none() {
            self.retried_after = other.retried_after;
        }
    }

    /// Whether anything was deleted (space for frontends that did not fit).
    pub fn freed_space(&self) -> bool {
        self.frontends_deleted
            + self.slots_deleted
            + self.backends_deleted
            + self.tables_deleted
            + self.ranges_deleted
            > 0
    }

    pub fn writes(&self) -> usize {
        self.frontends_written
            + self.frontends_deleted
            + self.slots_written
            + self.slots_deleted
            + self.backends_written
            + self.backends_deleted
            + self.members_written
            + self.members_deleted
            + self.tables_written
            + self.tables_deleted
            + self.ranges_deleted
    }
}

/// What the kernel holds, as far as the reconciler knows.
#[derive(Debug)]
pub struct Reconciler {
    limits: Limits,
    // Boxed: a B-tree node holds eleven values, half of them empty after in-order
    // inserts, and a Programmed is 136 bytes.
    frontends: BTreeMap<FrontendKey, Box<Programmed>>,
    backends: BackendTable,
    svc_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// LB_SERVICES entries in use (frontend entries plus slots).
    service_entries: usize,
    /// Frontends that did not fit, with what they lacked; retried by
    /// [`Reconciler::pending`] once space frees up.
    unprogrammed: BTreeMap<FrontendKey, (Arc<Frontend>, Shortage)>,
    /// Entries found in the kernel that nothing references (cleaned on next apply).
    garbage_slots: Vec<ServiceKey>,
    garbage_backends: Vec<u32>,
    /// LB_AFFINITY_MEMBERS as the kernel holds it.
    members: BTreeSet<AffinityMember>,
    garbage_members: Vec<AffinityMember>,
    /// Entries of every Maglev table.
    maglev_size: u32,
    /// Maglev tables and source ranges found in the kernel for no adopted frontend.
    garbage_tables: Vec<u32>,
    garbage_ranges: Vec<SourceRangeKey>,
}

/// Checks tracked external flows against what is programmed ([`Reconciler::flow_check`]).
pub struct FlowCheck<'a> {
    frontends: HashMap<u32, &'a Programmed>,
    backends: &'a BackendTable,
}

impl FlowCheck<'_> {
    /// Why a flow of frontend `svc_id` from `client`, sent to backend `backend_id` at
    /// `backend` (address, port in network order), must go now, if it must.
    pub fn stale(
        &self,
        svc_id: u32,
        client: &lb_common::Addr,
        backend_id: u32,
        backend: (lb_common::Addr, u16),
    ) -> Option<crate::datapath::flows::Removal> {
        use crate::datapath::flows::{Removal, prefix_contains};
        let Some(programmed) = self.frontends.get(&svc_id) else {
            return Some(Removal::FrontendGone);
        };
        if !programmed.ranges.is_empty()
            && !programmed
                .ranges
                .iter()
                .any(|r| prefix_contains(&r.addr, r.prefix_len.saturating_sub(32), client))
        {
            return Some(Removal::SourceRange);
        }
        let is =
            |b: &BackendAddr| addr_from_ip(b.ip) == backend.0 && port_to_net(b.port) == backend.1;
        // Draining (terminating, unready): its flows go on until it is gone; its id
        // may have been freed meanwhile.
        if programmed.draining.iter().any(is) {
            return None;
        }
        // In rotation, under the same id.
        let serving = programmed.slots.contains(&backend_id)
            && self
                .backends
                .identity(backend_id)
                .is_some_and(|b| is(&b.addr));
        (!serving).then_some(Removal::BackendGone)
    }
}

/// The members an affinity frontend's slots call for (none without affinity).
fn wanted_members(svc_id: u32, attrs: &FrontendAttrs, slots: &[u32]) -> BTreeSet<AffinityMember> {
    if attrs.flags & SVC_F_AFFINITY == 0 {
        return BTreeSet::new();
    }
    slots
        .iter()
        .filter(|id| **id != 0)
        .map(|&backend_id| AffinityMember { svc_id, backend_id })
        .collect()
}

/// How much the kernel maps hold (their `max_entries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Frontend ids are `1..frontends` (LB_FRONTEND_STATS has this many entries).
    pub frontends: u32,
    /// Backend ids are `1..backends`.
    pub backends: u32,
    /// LB_SERVICES entries.
    pub service_entries: u32,
    /// LB_SOURCE_RANGES entries.
    pub source_ranges: u32,
    /// Kernel memory all Maglev tables together may take (`--max-maglev-memory`).
    pub maglev_bytes: u64,
}

/// Default of `--max-maglev-memory`: 8192 tables of the default size (64 KiB each).
pub const DEFAULT_MAGLEV_BYTES: u64 = 1024 << 20;

/// Kernel memory per Maglev table entry: an array stores its elements 8 bytes apart,
/// so a `u32` entry takes 8 (a table of the default 16 381 entries, 128 KiB).
pub const MAGLEV_ENTRY_BYTES: u64 = 8;

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Id 0 is unused: the default flags' N ids need N + 1 entries.
            frontends: maps::DEFAULT_FRONTENDS + 1,
            backends: maps::DEFAULT_BACKENDS + 1,
            service_entries: maps::DEFAULT_SERVICE_ENTRIES,
            source_ranges: maps::DEFAULT_FRONTENDS + 1,
            maglev_bytes: DEFAULT_MAGLEV_BYTES,
        }
    }
}

/// What a frontend that could not be programmed lacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shortage {
    /// No frontend id left (`--max-frontends`).
    Frontends,
    /// Not enough backend ids for its new backends (`--max-backends`).
    Backends,
    /// LB_SERVICES cannot hold its slots (`--max-service-entries`).
    ServiceEntries,
    /// More backends than one frontend can address (65 535).
    TooManyBackends,
    /// LB_SOURCE_RANGES cannot hold its `loadBalancerSourceRanges`.
    SourceRanges,
    /// Its Maglev table would take the Maglev tables past `--max-maglev-memory`.
    MaglevMemory,
    /// An IPv4-mapped IPv6 address: the kernel keys it as its IPv4 twin, so it could
    /// overwrite that frontend (the sources write addresses canonically; this guards
    /// the kernel against any other caller).
    AliasedAddress,
    /// The kernel refused its writes (out of memory, say): skipped, retried later.
    KernelRefused,
}

impl std::fmt::Display for Shortage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Frontends => "no frontend id left (raise --max-frontends)",
            Self::Backends => "not enough backend ids for its backends (raise --max-backends)",
            Self::ServiceEntries => "LB_SERVICES is full (raise --max-service-entries)",
            Self::TooManyBackends => "more backends than one frontend can hold (65 535)",
            Self::SourceRanges => {
                "LB_SOURCE_RANGES cannot hold its loadBalancerSourceRanges (raise --max-frontends)"
            }
            Self::MaglevMemory => {
                "its Maglev table would pass --max-maglev-memory (raise it, or lower \
                 --maglev-table-size)"
            }
            Self::AliasedAddress => {
                "an IPv4-mapped IPv6 address, which the kernel keys as its IPv4 twin"
            }
            Self::KernelRefused => {
                "the kernel refused its map writes (the error is logged); retried with backoff"
            }
        })
    }
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

pub fn service_key(key: &FrontendKey, slot: u16) -> ServiceKey {
    ServiceKey::new(
        addr_from_ip(key.ip),
        port_to_net(key.port),
        key.protocol.number(),
        key.scope.number(),
        slot,
    )
}

impl Reconciler {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            frontends: BTreeMap::new(),
            backends: BackendTable::default(),
            svc_ids: IdAllocator::new(limits.frontends),
            backend_ids: IdAllocator::new(limits.backends),
            service_entries: 0,
            unprogrammed: BTreeMap::new(),
            garbage_slots: Vec::new(),
            garbage_backends: Vec::new(),
            members: BTreeSet::new(),
            garbage_members: Vec::new(),
            maglev_size: DEFAULT_MAGLEV_TABLE_SIZE,
            garbage_tables: Vec::new(),
            garbage_ranges: Vec::new(),
        }
    }

    /// Sets the Maglev table size (a prime; `--maglev-table-size`). Tables are rewritten
    /// when their frontend next changes, and all after adoption.
    pub fn with_maglev_size(mut self, size: u32) -> Self {
        self.maglev_size = size;
        self
    }

    /// Takes note of the Maglev tables (frontend ids) and source ranges the kernel
    /// holds, after [`Reconciler::adopt`]: those of adopted frontends are kept (tables
    /// are rewritten anyway), the rest is deleted on the next apply.
    pub fn adopt_external(
        &mut self,
        tables: impl IntoIterator<Item = u32>,
        ranges: impl IntoIterator<Item = SourceRangeKey>,
    ) {
        let mut by_id: HashMap<u32, FrontendKey> = HashMap::new();
        for (key, programmed) in &self.frontends {
            by_id.insert(programmed.svc_id, *key);
        }
        for svc_id in tables {
            if !by_id.contains_key(&svc_id) {
                self.garbage_tables.push(svc_id);
            }
        }
        for range in ranges {
            match by_id.get(&u32::from_be(range.svc_id_be)) {
                Some(key) => {
                    if let Some(programmed) = self.frontends.get_mut(key) {
                        programmed.ranges.insert(range);
                    }
                }
                None => self.garbage_ranges.push(range),
            }
        }
    }

    /// [`Reconciler::adopt`] and [`Reconciler::adopt_external`] of a whole dump.
    pub fn from_state(limits: Limits, maglev_size: u32, state: KernelState) -> Self {
        let mut this = Self::adopt(
            limits,
            state.services,
            state.backends,
            state.names,
            state.members,
        )
        .with_maglev_size(maglev_size);
        this.adopt_external(state.tables, state.ranges);
        this
    }

    /// Rebuilds this view from the kernel's maps after a failed apply of `changes`,
    /// keeping what the kernel cannot tell: the frontends waiting for space, the
    /// backends draining, and which Maglev tables are current (but not those of
    /// `changes`, whose writes may have been cut short).
    fn rebuild<M: MapDump>(
        &mut self,
        maps: &M,
        changes: &BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
    ) -> Result<()> {
        let state = maps
            .dump()
            .context("reading the maps back after a failed write")?;
        let mut rebuilt = Self::from_state(self.limits, self.maglev_size, state);
        rebuilt.unprogrammed = std::mem::take(&mut self.unprogrammed);
        for (key, programmed) in &mut rebuilt.frontends {
            let Some(old) = self.frontends.get_mut(key) else {
                continue;
            };
            if old.svc_id != programmed.svc_id {
                continue;
            }
            programmed.draining = std::mem::take(&mut old.draining);
            if !changes.contains_key(key) {
                programmed.table_for = old.table_for.take();
            }
        }
        *self = rebuilt;
        Ok(())
    }

    /// The members the kernel holds for frontend `svc_id`.
    fn members_of(&self, svc_id: u32) -> BTreeSet<AffinityMember> {
        let range = AffinityMember {
            svc_id,
            backend_id: 0,
        }..=AffinityMember {
            svc_id,
            backend_id: u32::MAX,
        };
        self.members.range(range).copied().collect()
    }

    /// Frontends that did not fit the maps, and what they lacked.
    pub fn unprogrammed(&self) -> &BTreeMap<FrontendKey, (Arc<Frontend>, Shortage)> {
        &self.unprogrammed
    }

    /// The frontends the kernel refused, to try again.
    pub fn refused(&self) -> impl Iterator<Item = (FrontendKey, Arc<Frontend>)> + '_ {
        self.unprogrammed
            .iter()
            .filter(|(_, (_, shortage))| *shortage == Shortage::KernelRefused)
            .map(|(key, (frontend, _))| (*key, frontend.clone()))
    }

    pub fn has_refused(&self) -> bool {
        self.refused().next().is_some()
    }

    /// What tracked flows are checked against: the frontends programmed, by id
    /// (external scope for flows from other machines, internal for packet-mode pods').
    pub fn flow_check(&self) -> FlowCheck<'_> {
        FlowCheck {
            frontends: self
                .frontends
                .values()
                .map(|programmed| (programmed.svc_id, &**programmed))
                .collect(),
            backends: &self.backends,
        }
    }

    /// The frontends that did not fit, as changes to try again (after space freed
    /// up). Those the kernel refused have their own retry, with backoff.
    pub fn pending(&self) -> BTreeMap<FrontendKey, Option<Arc<Frontend>>> {
        self.unprogrammed
            .iter()
            .filter(|(_, (_, shortage))| *shortage != Shortage::KernelRefused)
            .map(|(key, (frontend, _))| (*key, Some(frontend.clone())))
            .collect()
    }

    /// Builds the reconciler's view from what the kernel maps hold (state pinned by a
    /// previous run), so the first sync after a restart only writes differences and live
    /// connections are never disturbed.
    pub fn adopt(
        limits: Limits,
        entries: impl IntoIterator<Item = (ServiceKey, ServiceValue)>,
        backends: impl IntoIterator<Item = (u32, Backend)>,
        names: impl IntoIterator<Item = (u32, String)>,
        members: impl IntoIterator<Item = AffinityMember>,
    ) -> Self {
        let mut this = Self::new(limits);
        let names: HashMap<u32, String> = names.into_iter().collect();
        let mut frontend_values = BTreeMap::new();
        let mut slots: BTreeMap<ServiceKey, BTreeMap<u16, u32>> = BTreeMap::new();
        for (key, value) in entries {
            if key.slot == 0 {
                frontend_values.insert(key, value);
            } else {
                slots
                    .entry(ServiceKey { slot: 0, ..key })
                    .or_default()
                    .insert(key.slot, value.backend_id);
            }
        }
        let mut known_backends = HashMap::new();
        let mut local_of = HashMap::new();
        for (id, backend) in backends {
            // Every id found stays claimed until its entry is deleted (garbage too):
            // handing it out again first would let the garbage deletion remove the
            // new backend that reused it.
            let claimed = this.backend_ids.claim(id);
            match Protocol::from_number(backend.proto) {
                Some(protocol) if claimed => {
                    let identity = BackendIdentity {
                        addr: BackendAddr {
                            ip: addr_to_ip(&backend.addr),
                            port: port_from_net(backend.port),
                        },
                        protocol,
                    };
                    known_backends.insert(id, identity);
                    local_of.insert(id, backend.flags & BACKEND_F_LOCAL != 0);
                }
                _ => this.garbage_backends.push(id),
            }
        }
        for (key, value) in frontend_values {
            let protocol = Protocol::from_number(key.proto);
            let scope = Scope::from_number(key.scope);
            let frontend_slots = slots.remove(&key).unwrap_or_default();
            let Some((protocol, scope)) = protocol
                .zip(scope)
                .filter(|_| this.svc_ids.claim(value.svc_id))
            else {
                this.garbage_slots.push(key);
                this.garbage_slots.extend(
                    frontend_slots
                        .keys()
                        .map(|slot| ServiceKey { slot: *slot, ..key }),
                );
                continue;
            };
            let frontend_key = FrontendKey {
                ip: addr_to_ip(&key.addr),
                port: port_from_net(key.port),
                protocol,
                scope,
            };
            let mut programmed = Vec::with_capacity(value.count as usize);
            let mut seen = BTreeSet::new();
            for slot in 1..=value.count {
                let id = frontend_slots.get(&slot).copied().unwrap_or(0);
                // A slot pointing at an unknown backend, or at one an earlier slot
                // already holds (an interrupted shrink moves a backend before it clears
                // its old slot), is rewritten on the next apply.
                programmed.push(if known_backends.contains_key(&id) && seen.insert(id) {
                    id
                } else {
                    0
                });
            }
            for (&slot, _) in frontend_slots.range(value.count + 1..) {
                this.garbage_slots.push(ServiceKey { slot, ..key });
            }
            for id in programmed.iter_mut().filter(|id| **id != 0) {
                let mut entry = this.backends.get_or_insert(
                    known_backends[id],
                    BackendEntry {
                        id: *id,
                        refs: 0,
                        local: local_of.get(id).copied().unwrap_or(false),
                    },
                );
                if entry.id() == *id {
                    *entry.refs_mut() += 1;
                } else {
                    // Another id holds the same backend: this slot is rewritten, and
                    // its id, never adopted, deleted as garbage.
                    *id = 0;
                }
            }
            this.frontends.insert(
                frontend_key,
                Box::new(Programmed {
                    svc_id: value.svc_id,
                    name: names.get(&value.svc_id).cloned().unwrap_or_default(),
                    attrs: FrontendAttrs {
                        flags: value.flags,
                        affinity_timeout: value.affinity_timeout,
                    },
                    draining: BTreeSet::new(),
                    slots: programmed,
                    table_for: None,
                    ranges: BTreeSet::new(),
                }),
            );
        }
        // Slots whose frontend is gone.
        for (key, by_slot) in slots {
            this.garbage_slots
                .extend(by_slot.keys().map(|slot| ServiceKey { slot: *slot, ..key }));
        }
        for id in known_backends.keys() {
            if !this.backends.contains_id(*id) {
                this.garbage_backends.push(*id);
            }
        }
        this.service_entries = this
            .frontends
            .values()
            .map(|p| 1 + p.slots.len())
            .sum::<usize>()
            + this.garbage_slots.len();
        // Members an adopted frontend's slots call for are kept; the rest is garbage.
        // Missing ones make diff_all rewrite their frontend.
        let wanted: BTreeSet<AffinityMember> = this
            .frontends
            .values()
            .flat_map(|p| wanted_members(p.svc_id, &p.attrs, &p.slots))
            .collect();
        for member in members {
            if wanted.contains(&member) {
                this.members.insert(member);
            } else {
                this.garbage_members.push(member);
            }
        }
        this
    }

    /// Whether the LB_SERVICES entry `key` belongs to a programmed frontend (its entry
    /// or one of its current slots).
    fn holds(&self, key: &ServiceKey) -> bool {
        let (Some(protocol), Some(scope)) = (
            Protocol::from_number(key.proto),
            Scope::from_number(key.scope),
        ) else {
            return false;
        };
        let frontend = FrontendKey {
            ip: addr_to_ip(&key.addr),
            port: port_from_net(key.port),
            protocol,
            scope,
        };
        self.frontends
            .get(&frontend)
            .is_some_and(|p| key.slot as usize <= p.slots.len())
    }

    /// Whether `key` has a version in the kernel.
    pub fn is_programmed(&self, key: &FrontendKey) -> bool {
        self.frontends.contains_key(key)
    }

    /// Number of frontends programmed.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Number of distinct backends programmed.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Entries of LB_SERVICES in use (frontend entries plus their slots).
    pub fn service_entry_count(&self) -> usize {
        self.service_entries
    }

    /// The backend identities currently programmed for a frontend, in slot order.
    pub fn programmed_backends(&self, key: &FrontendKey) -> Option<Vec<BackendIdentity>> {
        self.frontends.get(key).map(|p| {
            p.slots
                .iter()
                .filter_map(|id| self.backends.identity(*id))
                .collect()
        })
    }

    /// Changes needed to make the kernel match `desired` exactly (used after adopting
    /// kernel state, and for a full resync).
    pub fn diff_all(
        &self,
        desired: &BTreeMap<FrontendKey, Arc<Frontend>>,
    ) -> BTreeMap<FrontendKey, Option<Arc<Frontend>>> {
        let mut changes = BTreeMap::new();
        for (key, frontend) in desired {
            let same = self.programmed_backends(key).is_some_and(|programmed| {
                let programmed: BTreeSet<BackendAddr> = programmed.iter().map(|b| b.addr).collect();
                let wanted: BTreeSet<BackendAddr> = frontend.backends.iter().copied().collect();
                let current = &self.frontends[key];
                programmed == wanted
                    && current.slots.iter().all(|id| *id != 0)
                    && current.name == frontend_name(frontend)
                    && current.attrs == FrontendAttrs::of(frontend)
                    && self.members_of(current.svc_id)
                        == wanted_members(current.svc_id, &current.attrs, &current.slots)
                    && (key.scope == Scope::Internal
                        || frontend.backends.is_empty()
                        || current.table_for.is_some())
                    && current.ranges == wanted_ranges(current.svc_id, frontend)
            });
            if !same {
                changes.insert(*key, Some(frontend.clone()));
            }
        }
        for key in self.frontends.keys() {
            if !desired.contains_key(key) {
                changes.insert(*key, None);
            }
        }
        changes
    }

    /// Whether `frontend` fits, counting what this apply already admitted (deletions
    /// only free space after the apply, so they are not counted).
    fn admit(
        &self,
        key: &FrontendKey,
        frontend: &Frontend,
        budget: &mut Budget,
    ) -> Result<(), Shortage> {
        if key.ip.to_canonical() != key.ip {
            return Err(Shortage::AliasedAddress);
        }
        if frontend.backends.len() > MAX_BACKENDS_PER_FRONTEND as usize {
            return Err(Shortage::TooManyBackends);
        }
        let old = self.frontends.get(key);
        let is_new = old.is_none();
        if is_new && self.svc_ids.available() as usize <= budget.frontend_ids {
            return Err(Shortage::Frontends);
        }
        let new_backends = frontend
            .backends
            .iter()
            .filter(|addr| {
                !self.backends.contains(&BackendIdentity {
                    addr: **addr,
                    protocol: key.protocol,
                })
            })
            .count();
        // New backends are allocated right after admission, so `available` is current.
        if new_backends > self.backend_ids.available() as usize {
            return Err(Shortage::Backends);
        }
        let entries_after = usize::from(is_new) + frontend.backends.len();
        let entries_before = old.map_or(0, |p| p.slots.len());
        let growth = entries_after.saturating_sub(entries_before);
        if self.service_entries + budget.service_entries + growth
            > self.limits.service_entries as usize
        {
            return Err(Shortage::ServiceEntries);
        }
        let range_growth = frontend
            .source_ranges
            .len()
            .saturating_sub(old.map_or(0, |p| p.ranges.len()));
        if budget.ranges_held + budget.ranges + range_growth > self.limits.source_ranges as usize {
            return Err(Shortage::SourceRanges);
        }
        // A new external frontend brings a table (an update replaces its own).
        let table_growth = usize::from(is_new && key.scope == Scope::External);
        let table_bytes = u64::from(self.maglev_size) * MAGLEV_ENTRY_BYTES;
        if (budget.tables_held + budget.tables + table_growth) as u64 * table_bytes
            > self.limits.maglev_bytes
        {
            return Err(Shortage::MaglevMemory);
        }
        budget.ranges += range_growth;
        budget.tables += table_growth;
        budget.service_entries += growth;
        budget.frontend_ids += usize::from(is_new);
        Ok(())
    }

    /// [`Reconciler::apply`], but a frontend whose writes the kernel refuses is skipped
    /// and reported (in `refused` and `unprogrammed`) instead of failing the rest.
    ///
    /// After a failed apply the view is rebuilt from the kernel and the whole set tried
    /// again once (another writer may have made the view stale; the rebuild accounts
    /// for what it left). If that fails too, each change is applied alone, rebuilding
    /// after each failure. `refusals_left` bounds those rebuilds (each reads every map):
    /// once it is spent, the upserts still untried are deferred as refused, untried.
    /// A removal the kernel refuses, or maps that cannot be read back, fail the apply.
    pub fn apply_isolating<M: MapSet + MapDump>(
        &mut self,
        maps: &mut M,
        changes: &BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
        refusals_left: &mut usize,
    ) -> Result<ApplyStats> {
        let first = match self.apply(maps, changes) {
            Ok(stats) => return Ok(stats),
            Err(err) => err,
        };
        self.rebuild(maps, changes)?;
        match self.apply(maps, changes) {
            Ok(mut stats) => {
                stats.retried_after = Some(format!("{first:#}"));
                return Ok(stats);
            }
            Err(_) => self.rebuild(maps, changes)?,
        }
        let mut stats = ApplyStats {
            retried_after: Some(format!("{first:#}")),
            ..ApplyStats::default()
        };
        let mut order: Vec<(&FrontendKey, &Option<Arc<Frontend>>)> = changes.iter().collect();
        order.sort_by_key(|(key, change)| (change.as_ref().map(|f| f.admission_rank()), **key));
        for (key, change) in order {
            let single = BTreeMap::from([(*key, change.clone())]);
            if *refusals_left == 0
                && let Some(frontend) = change
            {
                self.refuse(
                    &mut stats,
                    key,
                    frontend,
                    "not tried: too many refusals in this sync",
                );
                continue;
            }
            match self.apply(maps, &single) {
                Ok(applied) => stats.absorb(applied),
                Err(err) => {
                    self.rebuild(maps, &single)?;
                    let Some(frontend) = change else {
                        return Err(err.context(format!("removing frontend {key}")));
                    };
                    *refusals_left = refusals_left.saturating_sub(1);
                    self.refuse(&mut stats, key, frontend, &format!("{err:#}"));
                }
            }
        }
        if !stats.refused.is_empty() {
            // What a refused frontend's writes left behind (found by the rebuild).
            stats.absorb(self.apply(maps, &BTreeMap::new())?);
        }
        Ok(stats)
    }

    fn refuse(
        &mut self,
        stats: &mut ApplyStats,
        key: &FrontendKey,
        frontend: &Arc<Frontend>,
        why: &str,
    ) {
        self.unprogrammed
            .insert(*key, (frontend.clone(), Shortage::KernelRefused));
        stats.unprogrammed.push((*key, Shortage::KernelRefused));
        stats.refused.push((*key, why.to_string()));
    }

    /// Applies frontend changes (`None` = remove) in make-before-break order. After an
    /// error the kernel is still consistent for readers, but this reconciler's view is
    /// not: rebuild it with [`Reconciler::adopt`].
    pub fn apply<M: MapSet>(
        &mut self,
        maps: &mut M,
        changes: &BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();

        // Phase 1: admission (a frontend is programmed entirely or not at all, and an
        // update that does not fit leaves the previous version serving), then every
        // backend an admitted frontend wants exists in the kernel.
        let mut wanted_ids: BTreeMap<FrontendKey, Vec<u32>> = BTreeMap::new();
        let mut new_backends: Vec<(u32, Backend)> = Vec::new();
        // Backends whose locality changed (an endpoint's nodeName learnt late).
        let mut relocated: Vec<(u32, Backend)> = Vec::new();
        // Deletions free space only once this apply has written them. What is held is
        // counted only when this apply may add to it (an endpoint change of ClusterIPs
        // stays O(changes)).
        let upserts = || changes.values().flatten();
        let mut budget = Budget::default();
        if upserts().any(|f| !f.source_ranges.is_empty()) {
            budget.ranges_held = self.garbage_ranges.len()
                + self
                    .frontends
                    .values()
                    .map(|p| p.ranges.len())
                    .sum::<usize>();
        }
        if upserts().any(|f| f.key.scope == Scope::External) {
            budget.tables_held = self.garbage_tables.len()
                + self
                    .frontends
                    .keys()
                    .filter(|k| k.scope == Scope::External)
                    .count();
        }
        // Removals, then ClusterIPs, then older Services, so that when space is short
        // the same frontends win whatever their keys (and after every restart).
        let mut order: Vec<(&FrontendKey, &Option<Arc<Frontend>>)> = changes.iter().collect();
        order.sort_by_key(|(key, change)| (change.as_ref().map(|f| f.admission_rank()), **key));
        for (key, change) in order {
            let Some(frontend) = change else {
                self.unprogrammed.remove(key);
                continue;
            };
            if let Err(shortage) = self.admit(key, frontend, &mut budget) {
                self.unprogrammed.insert(*key, (frontend.clone(), shortage));
                stats.unprogrammed.push((*key, shortage));
                continue;
            }
            if self.unprogrammed.remove(key).is_some() {
                stats.now_programmed.push(*key);
            }
            let mut ids = Vec::with_capacity(frontend.backends.len());
            for addr in &frontend.backends {
                let identity = BackendIdentity {
                    addr: *addr,
                    protocol: key.protocol,
                };
                let local = frontend.is_local(addr);
                let id = match self.backends.get_mut(&identity) {
                    Some(mut entry) => {
                        *entry.refs_mut() += 1;
                        if entry.local() != local {
                            entry.set_local(local);
                            relocated.push((entry.id(), identity.to_map_value(local)));
                        }
                        entry.id()
                    }
                    None => {
                        // Invariant breaches are errors, never panics: the caller
                        // rebuilds this view from the kernel (adopt) and retries.
                        let id = self
                            .backend_ids
                            .allocate()
                            .context("reconciler invariant: admission counted the backend ids")?;
                        new_backends.push((id, identity.to_map_value(local)));
                        self.backends
                            .get_or_insert(identity, BackendEntry { id, refs: 1, local });
                        id
                    }
                };
                ids.push(id);
            }
            wanted_ids.insert(*key, ids);
        }
        if !relocated.is_empty() {
            maps.put_backends(&relocated)?;
            stats.backends_written += relocated.len();
        }
        if !new_backends.is_empty() {
            let ids: Vec<u32> = new_backends.iter().map(|(id, _)| *id).collect();
            maps.reset_backend_stats(&ids)?;
            maps.put_backends(&new_backends)?;
            stats.backends_written += new_backends.len();
        }

        // Phase 2: slots, then the frontend entries that make them reachable.
        let mut released: Vec<u32> = Vec::new();
        let mut slot_writes: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        let mut frontend_writes: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        let mut shrunk_slots: Vec<ServiceKey> = Vec::new();
        let mut new_svc_ids: Vec<u32> = Vec::new();
        let mut names: Vec<(u32, String)> = Vec::new();
        let mut member_puts: Vec<AffinityMember> = Vec::new();
        let mut member_deletes: Vec<AffinityMember> = Vec::new();
        let mut table_writes: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut table_deletes: Vec<u32> = std::mem::take(&mut self.garbage_tables);
        let mut range_puts: Vec<SourceRangeKey> = Vec::new();
        let mut range_deletes: Vec<SourceRangeKey> = std::mem::take(&mut self.garbage_ranges);
        for (key, ids) in &wanted_ids {
            let (
                svc_id,
                old_slots,
                old_name,
                old_draining,
                old_attrs,
                is_new,
                old_table,
                old_ranges,
            ) = match self.frontends.get(key) {
                Some(p) => (
                    p.svc_id,
                    p.slots.clone(),
                    p.name.clone(),
                    p.draining.clone(),
                    Some(p.attrs),
                    false,
                    p.table_for.clone(),
                    p.ranges.clone(),
                ),
                None => {
                    let id = self
                        .svc_ids
                        .allocate()
                        .context("reconciler invariant: admission counted the frontend ids")?;
                    new_svc_ids.push(id);
                    (
                        id,
                        Vec::new(),
                        String::new(),
                        BTreeSet::new(),
                        None,
                        true,
                        None,
                        BTreeSet::new(),
                    )
                }
            };
            let frontend = changes
                .get(key)
                .and_then(Option::as_ref)
                .context("reconciler invariant: wanted_ids holds upserts only")?;
            let name = frontend_name(frontend);
            if name != old_name {
                names.push((svc_id, name.clone()));
            }
            let new_slots = layout(&old_slots, ids);
            // Backends that may still have sockets: in rotation before, or draining.
            let mut known: BTreeSet<BackendAddr> = old_slots
                .iter()
                .filter_map(|id| self.backends.identity(*id).map(|b| b.addr))
                .collect();
            known.extend(old_draining);
            let in_rotation: BTreeSet<BackendAddr> = frontend.backends.iter().copied().collect();
            let retained: BTreeSet<BackendAddr> =
                frontend.excluded.iter().map(|(addr, _)| *addr).collect();
            let mut draining = BTreeSet::new();
            for addr in known {
                if retained.contains(&addr) {
                    draining.insert(addr);
                } else if !in_rotation.contains(&addr) {
                    stats.gone.push(GoneBackend {
                        svc_id,
                        backend: BackendIdentity {
                            addr,
                            protocol: key.protocol,
                        },
                    });
                }
            }
            for (i, &backend_id) in new_slots.iter().enumerate() {
                if old_slots.get(i) != Some(&backend_id) {
                    slot_writes.push((
                        service_key(key, i as u16 + 1),
                        ServiceValue {
                            backend_id,
                            svc_id,
                            ..Default::default()
                        },
                    ));
                }
            }
            // `ids` follows `frontend.backends`, which is sorted by address.
            let table_for = if key.scope == Scope::External && !ids.is_empty() {
                if old_table.as_ref() != Some(ids) {
                    let table = maglev::table(&frontend.backends, self.maglev_size)
                        .into_iter()
                        .map(|i| ids[i as usize])
                        .collect();
                    table_writes.push((svc_id, table));
                }
                Some(ids.clone())
            } else {
                if old_table.is_some() {
                    table_deletes.push(svc_id);
                }
                None
            };
            let ranges = wanted_ranges(svc_id, frontend);
            range_puts.extend(ranges.difference(&old_ranges));
            range_deletes.extend(old_ranges.difference(&ranges));
            let attrs = FrontendAttrs::of(frontend);
            let members = wanted_members(svc_id, &attrs, &new_slots);
            let current_members = self.members_of(svc_id);
            member_puts.extend(members.difference(&current_members));
            member_deletes.extend(current_members.difference(&members));
            self.members.extend(members.iter().copied());
            for member in current_members.difference(&members) {
                self.members.remove(member);
            }
            if is_new || new_slots.len() != old_slots.len() || old_attrs != Some(attrs) {
                frontend_writes.push((
                    service_key(key, 0),
                    ServiceValue {
                        svc_id,
                        count: new_slots.len() as u16,
                        flags: attrs.flags,
                        affinity_timeout: attrs.affinity_timeout,
                        ..Default::default()
                    },
                ));
            }
            shrunk_slots.extend(
                (new_slots.len() + 1..=old_slots.len()).map(|slot| service_key(key, slot as u16)),
            );
            self.service_entries =
                self.service_entries + usize::from(is_new) + new_slots.len() - old_slots.len();
            released.extend(old_slots.iter().copied().filter(|id| *id != 0));
            self.frontends.insert(
                *key,
                Box::new(Programmed {
                    svc_id,
                    name,
                    attrs,
                    draining,
                    slots: new_slots,
                    table_for,
                    ranges,
                }),
            );
        }
        maps.reset_frontend_stats(&new_svc_ids)?;
        // Tables and source ranges before the frontend entry that makes them used.
        maps.put_maglev(&table_writes)?;
        stats.tables_written += table_writes.len();
        maps.put_source_ranges(&range_puts)?;
        maps.put_frontend_names(&names)?;
        maps.put_services(&slot_writes)?;
        // Members before the frontend entry makes new slots reachable: a client given a
        // new backend then finds it listed (were it not, it would only choose again).
        maps.put_affinity_members(&member_puts)?;
        stats.members_written += member_puts.len();
        maps.put_services(&frontend_writes)?;
        stats.slots_written += slot_writes.len();
        stats.frontends_written += frontend_writes.len();

        // Phase 3: break what is no longer reachable: slots beyond a shrunk count and
        // the entries of removed frontends first, then the slots of removed frontends.
        let mut first_deletes = shrunk_slots;
        stats.slots_deleted += first_deletes.len();
        // Adopted garbage, except entries this apply wrote again (a slot left by an
        // interrupted update that now belongs to its frontend's new layout): those are
        // live, and counted with their frontend.
        let garbage = std::mem::take(&mut self.garbage_slots);
        self.service_entries -= garbage.len();
        let mut removed_slots: Vec<ServiceKey> =
            garbage.into_iter().filter(|key| !self.holds(key)).collect();
        let mut removed_ids: Vec<u32> = Vec::new();
        for (key, change) in changes {
            if change.is_some() {
                continue;
            }
            let Some(programmed) = self.frontends.remove(key) else {
                continue;
            };
            first_deletes.push(service_key(key, 0));
            stats.frontends_deleted += 1;
            self.service_entries -= 1 + programmed.slots.len();
            removed_slots
                .extend((1..=programmed.slots.len()).map(|slot| service_key(key, slot as u16)));
            let in_rotation = programmed
                .slots
                .iter()
                .filter_map(|id| self.backends.identity(*id).map(|b| b.addr));
            let known: BTreeSet<BackendAddr> = in_rotation
                .chain(programmed.draining.iter().copied())
                .collect();
            stats.gone.extend(known.into_iter().map(|addr| GoneBackend {
                svc_id: programmed.svc_id,
                backend: BackendIdentity {
                    addr,
                    protocol: key.protocol,
                },
            }));
            released.extend(programmed.slots.iter().copied().filter(|id| *id != 0));
            let members = self.members_of(programmed.svc_id);
            for member in &members {
                self.members.remove(member);
            }
            member_deletes.extend(members);
            // Also when not known to this process (adopted, never rewritten).
            if key.scope == Scope::External {
                table_deletes.push(programmed.svc_id);
            }
            range_deletes.extend(programmed.ranges.iter().copied());
            removed_ids.push(programmed.svc_id);
        }
        stats.slots_deleted += removed_slots.len();
        maps.delete_services(&first_deletes)?;
        maps.delete_services(&removed_slots)?;
        // Adopted garbage, except members this apply wants again.
        let garbage_members = std::mem::take(&mut self.garbage_members);
        member_deletes.extend(
            garbage_members
                .into_iter()
                .filter(|member| !self.members.contains(member)),
        );
        maps.delete_affinity_members(&member_deletes)?;
        stats.members_deleted += member_deletes.len();
        maps.delete_maglev(&table_deletes)?;
        stats.tables_deleted += table_deletes.len();
        maps.delete_source_ranges(&range_deletes)?;
        stats.ranges_deleted += range_deletes.len();
        maps.delete_frontend_names(&removed_ids)?;
        for id in removed_ids {
            self.svc_ids.release(id);
        }

        // Phase 4: backends nothing points at any more (adopted garbage keeps its id
        // until deleted).
        let garbage_backends = std::mem::take(&mut self.garbage_backends);
        let mut dead_backends = garbage_backends.clone();
        for id in released {
            let Some(mut entry) = self.backends.get_by_id_mut(id) else {
                continue;
            };
            *entry.refs_mut() -= 1;
            if *entry.refs_mut() == 0 {
                dead_backends.push(id);
                self.backends.remove_id(id);
                self.backend_ids.release(id);
            }
        }
        maps.delete_backends(&dead_backends)?;
        for id in garbage_backends {
            self.backend_ids.release(id);
        }
        stats.backends_deleted += dead_backends.len();
        Ok(stats)
    }
}

#[cfg(any(test, fuzzing))]
pub mod memory;
#[cfg(test)]
mod tests;
