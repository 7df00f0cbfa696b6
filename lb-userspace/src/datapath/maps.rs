//! Typed handles on the pinned maps, the kernel implementation of [`MapSet`], and a
//! consistent read-back of the tables for `lb list` and for adopting state on restart.

use std::{
    collections::BTreeMap,
    mem::size_of,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, HashOfMaps, Map, MapData, MapError, PerCpuArray},
};
use lb_common::{
    Addr, AffinityMember, Backend, CtKey, CtValue, FrontendName, FrontendStats, MAGLEV_TABLE_FLAGS,
    MapDef, ServiceKey, ServiceValue, SockRevKey, SockRevValue, SourceRangeKey, map_names, maps,
    stat,
};
use tracing::debug;

use super::batch;

use super::sockets::{TrackedSocket, sockets_of_gone};
use crate::reconcile::{GoneBackend, KernelState, MapDump, MapSet};

pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    sock_revnat_fd: OwnedFd,
    /// `LB_SOCK_LOCAL`, for sock_diag dumps of per-socket storage.
    sock_local_fd: OwnedFd,
    pub sockets: SocketTable,
    stats: PerCpuArray<MapData, u64>,
    frontend_stats: Array<MapData, FrontendStats>,
    backend_stats: Array<MapData, u64>,
    frontend_names: HashMap<MapData, u32, FrontendName>,
    affinity_members: HashMap<MapData, AffinityMember, u32>,
    maglev: HashOfMaps<MapData, u32>,
    /// `LB_MAGLEV` again, for batched installs and deletes, and whether the kernel
    /// batches a map of maps.
    maglev_fd: OwnedFd,
    maglev_batch_ops: bool,
    source_ranges: OwnedFd,
    node_addrs: Array<MapData, Addr>,
    workloads: HashMap<MapData, u64, u32>,
    workload_count: Array<MapData, u32>,
    pod_interfaces: HashMap<MapData, u32, u32>,
    ct: OwnedFd,
    ct_established: OwnedFd,
    /// Entries of the Maglev tables this daemon writes.
    pub maglev_size: u32,
    fds: MapFds,
    /// Cleared once the kernel refuses a batch operation.
    batch_ops: bool,
}

/// Which map remembers translated sockets, and its size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SocketTable {
    /// `LB_SOCK_REVNAT_LRU` (kernels without `cgroup/sock_release`) rather than
    /// `LB_SOCK_REVNAT`.
    pub legacy: bool,
    pub capacity: u32,
}

impl SocketTable {
    pub fn map_name(&self) -> &'static str {
        if self.legacy {
            map_names::SOCK_REVNAT_LRU
        } else {
            map_names::SOCK_REVNAT
        }
    }
}

/// What the kernel tables hold right now.
#[derive(Debug, Default, Clone)]
pub struct MapSnapshot {
    pub frontends: Vec<SnapshotFrontend>,
    /// Backend id -> backend.
    pub backends: BTreeMap<u32, SnapshotBackend>,
    /// Global counters summed over CPUs, indexed by `lb_common::stat`.
    pub stats: Vec<u64>,
    /// Slot entries whose frontend is missing (left over by an interrupted update).
    pub orphan_slots: Vec<ServiceKey>,
    /// Backends no frontend's slots point at (drift; the daemon's next resync removes
    /// them).
    pub unreferenced_backends: Vec<u32>,
    /// Number of live reverse-translation entries.
    pub sock_revnat_entries: usize,
    pub sockets: SocketTable,
}

#[derive(Debug, Clone)]
pub struct SnapshotFrontend {
    /// Slot 0 key.
    pub key: ServiceKey,
    pub value: ServiceValue,
    /// Backend id of slots 1..; `None` where a slot is missing.
    pub slots: Vec<Option<u32>>,
    /// Slot entries beyond `count` (stale, left by an interrupted shrink).
    pub extra_slots: Vec<u16>,
    pub stats: FrontendStats,
    /// `namespace/service:port` as the daemon named it.
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct SnapshotBackend {
    pub backend: Backend,
    pub connections: u64,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl KernelMaps {
    /// Frontend `svc_id`'s Maglev table as the kernel holds it (its first `len`
    /// entries), read one entry at a time.
    #[cfg(test)]
    pub fn maglev_table(&self, svc_id: u32, len: u32) -> Result<Option<Vec<u32>>> {
        // A map of maps answers a lookup from user space with the inner map's id.
        let Some(id) = batch::lookup_one::<u32, u32>(self.maglev_fd.as_fd(), &svc_id)? else {
            return Ok(None);
        };
        let inner = MapData::from_id(id)?;
        let fd = inner.fd().as_fd();
        (0..len)
            .map(|i| batch::lookup_one::<u32, u32>(fd, &i)?.context("a table entry"))
            .collect::<Result<Vec<u32>>>()
            .map(Some)
    }
    pub fn take(ebpf: &mut Ebpf, capacities: &super::Capacities) -> Result<Self> {
        let sockets = SocketTable {
            legacy: capacities.legacy_sockets,
            capacity: capacities.sockets,
        };
        Self::from_maps(sockets, |name| take_map(ebpf, name))
    }

    /// Opens the maps pinned by a running (or kept) daemon.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let dir = super::pins::readable_dir(pin_dir)?;
        let entries = |name: &str| {
            aya::maps::MapInfo::from_pin(dir.join(name))
                .map(|info| info.max_entries())
                .with_context(|| format!("opening {}", dir.join(name).display()))
        };
        // The map not in use holds one entry.
        let lru = entries(map_names::SOCK_REVNAT_LRU)?;
        let sockets = if lru > 1 {
            SocketTable {
                legacy: true,
                capacity: lru,
            }
        } else {
            SocketTable {
                legacy: false,
                capacity: entries(map_names::SOCK_REVNAT)?,
            }
        };
        Self::from_maps(sockets, |name| open_pinned(&dir, name))
    }

    fn from_maps(sockets: SocketTable, mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        let services = get(map_names::SERVICES)?;
        let backends = get(map_names::BACKENDS)?;
        let frontend_stats = get(map_names::FRONTEND_STATS)?;
        let backend_stats = get(map_names::BACKEND_STATS)?;
        let frontend_names = get(map_names::FRONTEND_NAMES)?;
        let affinity_members = get(map_names::AFFINITY_MEMBERS)?;
        let sock_revnat = get(sockets.map_name())?;
        let sock_local = get(map_names::SOCK_LOCAL)?;
        let maglev = match get(map_names::MAGLEV)? {
            Map::HashOfMaps(data) => data,
            _ => anyhow::bail!("{} is not a hash of maps", map_names::MAGLEV),
        };
        let maglev_fd = maglev.fd().as_fd().try_clone_to_owned()?;
        let source_ranges = match get(map_names::SOURCE_RANGES)? {
            Map::LpmTrie(data) => data.fd().as_fd().try_clone_to_owned()?,
            _ => anyhow::bail!("{} is not an LPM trie", map_names::SOURCE_RANGES),
        };
        let ct = dup_fd(&get(map_names::CT)?)?;
        let ct_established = dup_fd(&get(map_names::CT_ESTABLISHED)?)?;
        let fds = MapFds {
            services: dup_fd(&services)?,
            backends: dup_fd(&backends)?,
            frontend_stats: dup_fd(&frontend_stats)?,
            backend_stats: dup_fd(&backend_stats)?,
            frontend_names: dup_fd(&frontend_names)?,
            affinity_members: dup_fd(&affinity_members)?,
        };
        Ok(Self {
            affinity_members: affinity_members.try_into()?,
            services: services.try_into()?,
            backends: backends.try_into()?,
            sock_revnat_fd: dup_fd(&sock_revnat)?,
            sock_revnat: sock_revnat.try_into()?,
            sock_local_fd: dup_fd(&sock_local)?,
            sockets,
            stats: get(map_names::STATS)?.try_into()?,
            frontend_stats: frontend_stats.try_into()?,
            backend_stats: backend_stats.try_into()?,
            frontend_names: frontend_names.try_into()?,
            maglev: HashOfMaps::try_from(Map::HashOfMaps(maglev))?,
            maglev_fd,
            maglev_batch_ops: true,
            source_ranges,
            node_addrs: get(map_names::NODE_ADDRS)?.try_into()?,
            workloads: get(map_names::WORKLOADS)?.try_into()?,
            workload_count: get(map_names::WORKLOAD_COUNT)?.try_into()?,
            pod_interfaces: get(map_names::POD_INTERFACES)?.try_into()?,
            ct,
            ct_established,
            maglev_size: lb_common::DEFAULT_MAGLEV_TABLE_SIZE,
            fds,
            batch_ops: true,
        })
    }

    /// Every LB_AFFINITY_MEMBERS entry.
    pub fn affinity_members(&self) -> Result<Vec<AffinityMember>> {
        let entries: Vec<(AffinityMember, u32)> =
            match batch::lookup_all(self.fds.affinity_members.as_fd()) {
                Ok(entries) => entries,
                Err(err) if batch::unsupported(&err) => {
                    collect_entries(self.affinity_members.iter())?
                }
                Err(err) => return Err(err).context("reading LB_AFFINITY_MEMBERS"),
            };
        Ok(entries.into_iter().map(|(member, _)| member).collect())
    }

    /// Every reverse-translation entry: batched reads where the kernel has them.
    pub fn sock_revnat_entries(&self) -> Result<Vec<(SockRevKey, SockRevValue)>> {
        match batch::lookup_all(self.sock_revnat_fd.as_fd()) {
            Ok(entries) => Ok(entries),
            Err(err) if batch::unsupported(&err) => collect_entries(self.sock_revnat.iter()),
            Err(err) => Err(err).context("reading the socket map"),
        }
    }

    /// The per-socket storage map, for sock_diag requests.
    pub fn sock_local_fd(&self) -> BorrowedFd<'_> {
        self.sock_local_fd.as_fd()
    }

    /// A global counter summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Every service entry, backend and frontend name, as [`crate::reconcile::Reconciler::adopt`]
    /// takes them.
    #[allow(clippy::type_complexity)]
    pub fn raw_entries(
        &self,
    ) -> Result<(
        Vec<(ServiceKey, ServiceValue)>,
        Vec<(u32, Backend)>,
        Vec<(u32, String)>,
    )> {
        let services = collect_entries(self.services.iter())?;
        let backends = collect_entries(self.backends.iter())?;
        let names = collect_entries(self.frontend_names.iter())?
            .into_iter()
            .map(|(id, name)| (id, name.as_str().to_string()))
            .collect();
        Ok((services, backends, names))
    }

    /// Frontend ids that have a Maglev table, and every source-range entry (adoption).
    pub fn external_entries(&self) -> Result<(Vec<u32>, Vec<SourceRangeKey>)> {
        let tables = self.maglev.keys().collect::<Result<Vec<u32>, MapError>>()?;
        let mut ranges = Vec::new();
        let mut key: Option<SourceRangeKey> = None;
        while let Some(next) =
            batch::next_key::<SourceRangeKey>(self.source_ranges.as_fd(), key.as_ref())?
        {
            ranges.push(next);
            key = Some(next);
        }
        Ok((tables, ranges))
    }

    /// The node's SNAT source addresses (an address of each family, or none).
    pub fn set_node_addrs(&mut self, v4: Option<Addr>, v6: Option<Addr>) -> Result<()> {
        self.node_addrs.set(0, v4.unwrap_or_default(), 0)?;
        self.node_addrs.set(1, v6.unwrap_or_default(), 0)?;
        Ok(())
    }

    /// Pods the socket hooks leave alone: cgroup id -> mode.
    pub fn workloads(&self) -> Result<BTreeMap<u64, u32>> {
        self.workloads
            .iter()
            .map(|entry| entry.map_err(Into::into))
            .collect()
    }

    /// Makes `LB_WORKLOADS` hold exactly `wanted`. The count the hooks check first is
    /// raised before entries are added and lowered after they are removed, so no
    /// entry is ever skipped.
    pub fn set_workloads(&mut self, wanted: &BTreeMap<u64, u32>) -> Result<()> {
        let current = self.workloads()?;
        let before = current.len() as u32;
        let after = wanted.len() as u32;
        self.workload_count.set(0, before.max(after), 0)?;
        for (id, mode) in wanted {
            if current.get(id) != Some(mode) {
                self.workloads
                    .insert(id, mode, 0)
                    .with_context(|| format!("{} cgroup {id}", map_names::WORKLOADS))?;
            }
        }
        for id in current.keys().filter(|id| !wanted.contains_key(id)) {
            ignore_missing(self.workloads.remove(id))
                .with_context(|| format!("{} cgroup {id}", map_names::WORKLOADS))?;
        }
        self.workload_count.set(0, after, 0)?;
        Ok(())
    }

    /// The packet-mode pods' host-side interfaces (ifindexes).
    pub fn pod_interfaces(&self) -> Result<std::collections::BTreeSet<u32>> {
        self.pod_interfaces
            .keys()
            .map(|key| key.map_err(Into::into))
            .collect()
    }

    /// Adds `ifindex` to, or removes it from, `LB_POD_INTERFACES`.
    pub fn set_pod_interface(&mut self, ifindex: u32, packet: bool) -> Result<()> {
        let result = if packet {
            self.pod_interfaces.insert(ifindex, 1, 0)
        } else {
            ignore_missing(self.pod_interfaces.remove(&ifindex))
        };
        result.with_context(|| format!("{} ifindex {ifindex}", map_names::POD_INTERFACES))
    }

    #[cfg(test)]
    pub fn ct_fd(&self) -> BorrowedFd<'_> {
        self.ct.as_fd()
    }

    /// The keys of the established table alone.
    #[cfg(test)]
    pub fn ct_established_keys(&self) -> Vec<CtKey> {
        batch::lookup_all::<CtKey, CtValue>(self.ct_established.as_fd())
            .unwrap()
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    }

    /// Every tracked external flow (`lb ct list`): the established table's entries,
    /// then the new flows' (an entry caught in both while it moves counts once, as the
    /// programs see it: the established one).
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let (mut entries, new) = self.ct_tables()?;
        entries.extend(new);
        Ok(entries)
    }

    /// The tracked entries by table: (established, new flows), each key once.
    pub fn ct_tables(&self) -> Result<(CtEntries, CtEntries)> {
        let established = batch::lookup_all::<CtKey, CtValue>(self.ct_established.as_fd())?;
        let keys: std::collections::HashSet<CtKey> =
            established.iter().map(|(key, _)| *key).collect();
        let new = batch::lookup_all::<CtKey, CtValue>(self.ct.as_fd())?
            .into_iter()
            .filter(|(key, _)| !keys.contains(key))
            .collect();
        Ok((established, new))
    }

    /// The entry the programs use for `key`: the established table's first.
    fn ct_lookup(&self, key: &CtKey) -> Result<Option<CtValue>> {
        match batch::lookup_one::<CtKey, CtValue>(self.ct_established.as_fd(), key)? {
            Some(value) => Ok(Some(value)),
            None => Ok(batch::lookup_one::<CtKey, CtValue>(self.ct.as_fd(), key)?),
        }
    }

    /// Removes `flow`'s entries from both tables; with `only_if_idle`, not if either
    /// was seen again since `flow` was read (the programs keep using entries while we
    /// decide). Returns whether they were removed.
    pub fn remove_flow(&self, flow: &super::flows::Flow, only_if_idle: bool) -> Result<bool> {
        let entries = flow.forward.iter().chain(flow.reply.iter());
        if only_if_idle {
            for (key, value) in entries.clone() {
                let now = self.ct_lookup(key)?;
                if now.is_some_and(|now| now.last_seen_ns != value.last_seen_ns) {
                    return Ok(false);
                }
            }
        }
        for (key, _) in entries {
            for table in [self.ct_established.as_fd(), self.ct.as_fd()] {
                match batch::delete_one(table, key) {
                    Err(err) if err.raw_os_error() != Some(libc::ENOENT) => {
                        return Err(err.into());
                    }
                    _ => {}
                }
            }
        }
        Ok(true)
    }

    /// Removes the reverse-translation entries of sockets translated to backends that
    /// left their frontend, and returns those sockets (to be terminated).
    pub fn take_sockets_of(&mut self, gone: &[GoneBackend]) -> Result<Vec<TrackedSocket>> {
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let entries = self.sock_revnat_entries()?;
        let selected = sockets_of_gone(&entries, gone);
        for (key, _) in &selected {
            ignore_missing(self.sock_revnat.remove(key))?;
        }
        Ok(selected.into_iter().map(|(_, socket)| socket).collect())
    }

    /// Reads every table. Entries can change while we iterate (the daemon keeps
    /// writing); each entry is read atomically, the whole is best effort.
    pub fn snapshot(&self) -> Result<MapSnapshot> {
        let (services, backends, names) = self.raw_entries()?;
        let names: std::collections::HashMap<u32, String> = names.into_iter().collect();
        let mut frontends: BTreeMap<ServiceKey, (ServiceValue, BTreeMap<u16, u32>)> =
            BTreeMap::new();
        let (heads, slots): (Vec<_>, Vec<_>) =
            services.into_iter().partition(|(key, _)| key.slot == 0);
        for (key, value) in heads {
            frontends.entry(key).or_default().0 = value;
        }
        let mut orphan_slots = Vec::new();
        for (key, value) in slots {
            match frontends.get_mut(&ServiceKey { slot: 0, ..key }) {
                Some((_, by_slot)) => {
                    by_slot.insert(key.slot, value.backend_id);
                }
                None => orphan_slots.push(key),
            }
        }
        let backends: BTreeMap<u32, SnapshotBackend> = backends
            .into_iter()
            .map(|(id, backend)| {
                let connections = self.backend_stats.get(&id, 0).unwrap_or(0);
                (
                    id,
                    SnapshotBackend {
                        backend,
                        connections,
                    },
                )
            })
            .collect();

        let frontends: Vec<SnapshotFrontend> = frontends
            .into_iter()
            .map(|(key, (value, by_slot))| {
                let count = value.count;
                let slots = (1..=count)
                    .map(|slot| by_slot.get(&slot).copied())
                    .collect();
                let extra_slots = by_slot.range(count + 1..).map(|(slot, _)| *slot).collect();
                let stats = self
                    .frontend_stats
                    .get(&value.svc_id, 0)
                    .unwrap_or_default();
                let name = names.get(&value.svc_id).cloned().unwrap_or_default();
                SnapshotFrontend {
                    key,
                    value,
                    slots,
                    extra_slots,
                    stats,
                    name,
                }
            })
            .collect();

        let stats = (0..stat::COUNT).map(|i| self.stat(i)).collect();
        let sock_revnat_entries = self.sock_revnat_entries()?.len();
        let referenced: std::collections::BTreeSet<u32> = frontends
            .iter()
            .flat_map(|f: &SnapshotFrontend| f.slots.iter().flatten().copied())
            .collect();
        let unreferenced_backends = backends
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();

        Ok(MapSnapshot {
            frontends,
            backends,
            stats,
            orphan_slots,
            unreferenced_backends,
            sock_revnat_entries,
            sockets: self.sockets,
        })
    }
}

/// Entries of a connection-tracking table.
pub type CtEntries = Vec<(CtKey, CtValue)>;

/// Collects a map iteration, skipping entries deleted while we iterated.
fn collect_entries<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    for entry in iter {
        match entry {
            Ok(kv) => out.push(kv),
            Err(MapError::KeyNotFound) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Ok(out)
}

/// Deleting what is already gone is success: the reconciler's deletes are idempotent.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

impl KernelMaps {
    /// One batch syscall where the kernel has them, element by element otherwise.
    fn put_batch<K: Pod + Sync, V: Pod + Sync>(
        &mut self,
        which: MapFdKind,
        entries: &[(K, V)],
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let fd = self.checked_fd(which, size_of::<K>(), Some(size_of::<V>()))?;
        let what = || format!("writing {} entries to {which:?}", entries.len());
        match batched(self.batch_ops, || batch::update(fd, entries), what)? {
            Batch::Done => return Ok(()),
            Batch::Unavailable => self.batch_ops = false,
        }
        for (key, value) in entries {
            self.put_one(which, key, value)?;
        }
        Ok(())
    }

    fn delete_batch<K: Pod + Sync>(&mut self, which: MapFdKind, keys: &[K]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.checked_fd(which, size_of::<K>(), None)?;
        let what = || format!("deleting {} entries from {which:?}", keys.len());
        match batched(self.batch_ops, || batch::delete(self.fd(which), keys), what)? {
            Batch::Done => return Ok(()),
            Batch::Unavailable => self.batch_ops = false,
        }
        for key in keys {
            self.delete_one(which, key)?;
        }
        Ok(())
    }

    /// The map's descriptor, after checking that `K` and `V` are its key and value
    /// types' sizes: the raw batch calls trust the sizes, so a mismatch would make the
    /// kernel read past the buffers.
    /// (`value_size` is `None` for deletes.)
    fn checked_fd(
        &self,
        which: MapFdKind,
        key_size: usize,
        value_size: Option<usize>,
    ) -> Result<BorrowedFd<'_>> {
        let def = which.def();
        let value_size = value_size.unwrap_or(def.value_size as usize);
        if key_size != def.key_size as usize || value_size != def.value_size as usize {
            anyhow::bail!(
                "{}: {key_size}-byte keys and {value_size}-byte values used on a map of {} and {}",
                def.name,
                def.key_size,
                def.value_size
            );
        }
        Ok(self.fd(which))
    }

    fn fd(&self, which: MapFdKind) -> BorrowedFd<'_> {
        match which {
            MapFdKind::Services => self.fds.services.as_fd(),
            MapFdKind::Backends => self.fds.backends.as_fd(),
            MapFdKind::FrontendStats => self.fds.frontend_stats.as_fd(),
            MapFdKind::BackendStats => self.fds.backend_stats.as_fd(),
            MapFdKind::FrontendNames => self.fds.frontend_names.as_fd(),
            MapFdKind::AffinityMembers => self.fds.affinity_members.as_fd(),
        }
    }

    /// Single-element fallback through the syscall aya would make.
    fn put_one<K: Pod, V: Pod>(&mut self, which: MapFdKind, key: &K, value: &V) -> Result<()> {
        batch::update_one(
            self.checked_fd(which, size_of::<K>(), Some(size_of::<V>()))?,
            key,
            value,
        )
        .with_context(|| format!("writing an entry to {which:?}"))
    }

    fn delete_one<K: Pod>(&mut self, which: MapFdKind, key: &K) -> Result<()> {
        match batch::delete_one(self.checked_fd(which, size_of::<K>(), None)?, key) {
            Err(err) if err.raw_os_error() != Some(libc::ENOENT) => {
                Err(err).with_context(|| format!("deleting an entry from {which:?}"))
            }
            _ => Ok(()),
        }
    }
}

/// Which map a raw batch operation targets.
#[derive(Debug, Clone, Copy)]
enum MapFdKind {
    Services,
    Backends,
    FrontendStats,
    BackendStats,
    FrontendNames,
    AffinityMembers,
}

impl MapFdKind {
    fn def(self) -> &'static MapDef {
        match self {
            Self::Services => &maps::SERVICES,
            Self::Backends => &maps::BACKENDS,
            Self::FrontendStats => &maps::FRONTEND_STATS,
            Self::BackendStats => &maps::BACKEND_STATS,
            Self::FrontendNames => &maps::FRONTEND_NAMES,
            Self::AffinityMembers => &maps::AFFINITY_MEMBERS,
        }
    }
}

/// Duplicated descriptors of the maps the reconciler writes (aya's typed maps do not
/// lend theirs out), used for batch operations.
struct MapFds {
    services: OwnedFd,
    backends: OwnedFd,
    frontend_stats: OwnedFd,
    backend_stats: OwnedFd,
    frontend_names: OwnedFd,
    affinity_members: OwnedFd,
}

fn dup_fd(map: &Map) -> Result<OwnedFd> {
    let data = match map {
        Map::HashMap(data)
        | Map::Array(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::SkStorage(data)
        | Map::HashOfMaps(data)
        | Map::LpmTrie(data) => data,
        _ => anyhow::bail!("unexpected map type"),
    };
    Ok(data.fd().as_fd().try_clone_to_owned()?)
}

impl MapDump for KernelMaps {
    fn dump(&self) -> Result<KernelState> {
        let (services, backends, names) = self.raw_entries()?;
        let members = self.affinity_members()?;
        let (tables, ranges) = self.external_entries()?;
        Ok(KernelState {
            services,
            backends,
            names,
            members,
            tables,
            ranges,
        })
    }
}

/// Writes `values` into a `BPF_F_MMAPABLE` array of as many `u32` entries through a
/// shared mapping, where an update per entry cost about 10 ms per table of 16 381.
/// An array's elements are 8-byte aligned: entry `i` is the first 4 bytes of the 8 at
/// `8 * i`.
fn fill_mapped_array(fd: BorrowedFd<'_>, values: &[u32]) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    const STRIDE: usize = 8;
    let bytes = values.len() * STRIDE;
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: a fresh shared mapping of the map's memory (the kernel rounds the array
    // up to whole pages, so `bytes` is inside it); every write is inside `bytes`;
    // unmapped before returning, nothing else refers to it.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the array");
        }
        let base = at.cast::<u8>();
        for (i, value) in values.iter().enumerate() {
            base.add(i * STRIDE).cast::<u32>().write_unaligned(*value);
        }
        libc::munmap(at, bytes);
    }
    Ok(())
}

/// How a batched map operation went when it did not fail.
enum Batch {
    Done,
    /// The kernel takes no batches for this map: the caller goes one entry at a time
    /// (and remembers it).
    Unavailable,
}

/// Runs one batched map operation where batches are `enabled`; any error other than
/// "unsupported" is returned with `what` was being done.
fn batched(
    enabled: bool,
    operation: impl FnOnce() -> std::io::Result<()>,
    what: impl Fn() -> String,
) -> Result<Batch> {
    if !enabled {
        return Ok(Batch::Unavailable);
    }
    match operation() {
        Ok(()) => Ok(Batch::Done),
        Err(err) if batch::unsupported(&err) => {
            debug!(
                "batched map operations unavailable ({err}) {}: one entry at a time",
                what()
            );
            Ok(Batch::Unavailable)
        }
        Err(err) => Err(err).with_context(what),
    }
}

/// Maglev tables created and installed together: one grace period per group.
const MAGLEV_INSTALL_GROUP: usize = 256;

impl KernelMaps {
    fn install_maglev_group(&mut self, tables: &[(u32, Vec<u32>)]) -> Result<()> {
        let mut inner = Vec::with_capacity(tables.len());
        for (svc_id, table) in tables {
            let def = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
                size_of::<u32>() as u32,
                size_of::<u32>() as u32,
                table.len() as u32,
                MAGLEV_TABLE_FLAGS,
            );
            let map =
                MapData::create(def, "lb_maglev_table", None).context("creating a Maglev table")?;
            fill_mapped_array(map.fd().as_fd(), table)
                .with_context(|| format!("filling the Maglev table of frontend {svc_id}"))?;
            inner.push((*svc_id, map));
        }
        let entries: Vec<(u32, u32)> = inner
            .iter()
            .map(|(svc_id, map)| {
                use std::os::fd::AsRawFd as _;
                (*svc_id, map.fd().as_fd().as_raw_fd() as u32)
            })
            .collect();
        let install = || batch::update(self.maglev_fd.as_fd(), &entries);
        let what = || format!("installing {} Maglev tables", tables.len());
        match batched(self.maglev_batch_ops, install, what)? {
            Batch::Done => return Ok(()),
            Batch::Unavailable => self.maglev_batch_ops = false,
        }
        for (svc_id, map) in &inner {
            self.maglev
                .insert(svc_id, map, 0)
                .with_context(|| format!("installing the Maglev table of frontend {svc_id}"))?;
        }
        Ok(())
    }
}

impl MapSet for KernelMaps {
    fn put_backends(&mut self, entries: &[(u32, Backend)]) -> Result<()> {
        self.put_batch(MapFdKind::Backends, entries)
    }

    fn delete_backends(&mut self, ids: &[u32]) -> Result<()> {
        self.delete_batch(MapFdKind::Backends, ids)
    }

    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
        self.put_batch(MapFdKind::Services, entries)
    }

    fn delete_services(&mut self, keys: &[ServiceKey]) -> Result<()> {
        self.delete_batch(MapFdKind::Services, keys)
    }

    fn reset_frontend_stats(&mut self, svc_ids: &[u32]) -> Result<()> {
        let zeros: Vec<(u32, FrontendStats)> = svc_ids
            .iter()
            .map(|id| (*id, FrontendStats::default()))
            .collect();
        self.put_batch(MapFdKind::FrontendStats, &zeros)
    }

    fn reset_backend_stats(&mut self, backend_ids: &[u32]) -> Result<()> {
        let zeros: Vec<(u32, u64)> = backend_ids.iter().map(|id| (*id, 0)).collect();
        self.put_batch(MapFdKind::BackendStats, &zeros)
    }

    fn put_frontend_names(&mut self, names: &[(u32, String)]) -> Result<()> {
        let entries: Vec<(u32, FrontendName)> = names
            .iter()
            .map(|(id, name)| (*id, FrontendName::new(name)))
            .collect();
        self.put_batch(MapFdKind::FrontendNames, &entries)
    }

    fn delete_frontend_names(&mut self, svc_ids: &[u32]) -> Result<()> {
        self.delete_batch(MapFdKind::FrontendNames, svc_ids)
    }

    fn put_affinity_members(&mut self, members: &[AffinityMember]) -> Result<()> {
        let entries: Vec<(AffinityMember, u32)> = members.iter().map(|m| (*m, 1)).collect();
        self.put_batch(MapFdKind::AffinityMembers, &entries)
    }

    fn delete_affinity_members(&mut self, members: &[AffinityMember]) -> Result<()> {
        self.delete_batch(MapFdKind::AffinityMembers, members)
    }

    fn put_maglev(&mut self, tables: &[(u32, Vec<u32>)]) -> Result<()> {
        // New tables, filled, then swapped in by batched updates: a reader sees a
        // frontend's old table or its new one. Every update of a map of maps waits for
        // an RCU grace period (programs must stop using the old table), about 5 ms
        // here: one update per table made 2 766 NodePort Services take 27 s to sync.
        // Groups bound the descriptors held at once (a soft limit of 1 024 is common).
        for group in tables.chunks(MAGLEV_INSTALL_GROUP) {
            self.install_maglev_group(group)?;
        }
        Ok(())
    }

    fn delete_maglev(&mut self, svc_ids: &[u32]) -> Result<()> {
        if svc_ids.is_empty() {
            return Ok(());
        }
        // Batched for the same reason as installs: one grace period, not one per table.
        let delete = || batch::delete(self.maglev_fd.as_fd(), svc_ids);
        let what = || format!("deleting {} Maglev tables", svc_ids.len());
        match batched(self.maglev_batch_ops, delete, what)? {
            Batch::Done => return Ok(()),
            Batch::Unavailable => self.maglev_batch_ops = false,
        }
        for svc_id in svc_ids {
            match self.maglev.remove(svc_id) {
                Ok(()) => {}
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(err))
                    if err.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("deleting the Maglev table of frontend {svc_id}")
                    });
                }
            }
        }
        Ok(())
    }

    fn put_source_ranges(&mut self, keys: &[SourceRangeKey]) -> Result<()> {
        for key in keys {
            batch::update_one(self.source_ranges.as_fd(), key, &1u32)
                .context("writing a loadBalancerSourceRanges entry")?;
        }
        Ok(())
    }

    fn delete_source_ranges(&mut self, keys: &[SourceRangeKey]) -> Result<()> {
        for key in keys {
            if let Err(err) = batch::delete_one(self.source_ranges.as_fd(), key)
                && err.raw_os_error() != Some(libc::ENOENT)
            {
                return Err(err).context("deleting a loadBalancerSourceRanges entry");
            }
        }
        Ok(())
    }
}
