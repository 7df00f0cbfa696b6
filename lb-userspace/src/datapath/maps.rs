//! Typed handles on the pinned maps, the kernel implementation of [`MapSet`], and a
//! consistent read-back of the tables for `lb list` and for adopting state on restart.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray},
};
use lb_common::{
    Backend, FrontendName, FrontendStats, MAX_BACKENDS, MAX_FRONTENDS, SERVICE_MAP_SIZE,
    SOCK_REVNAT_SIZE, ServiceKey, ServiceValue, SockRevKey, SockRevValue, map_names, stat,
};
use tracing::warn;

use crate::{
    reconcile::{GoneBackend, MapSet},
    sockets::{TrackedSocket, sockets_of_gone},
};

pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    stats: PerCpuArray<MapData, u64>,
    frontend_stats: Array<MapData, FrontendStats>,
    backend_stats: Array<MapData, u64>,
    frontend_names: HashMap<MapData, u32, FrontendName>,
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
    /// Number of live reverse-translation entries.
    pub sock_revnat_entries: usize,
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
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            services: take_map(ebpf, map_names::SERVICES)?.try_into()?,
            backends: take_map(ebpf, map_names::BACKENDS)?.try_into()?,
            sock_revnat: take_map(ebpf, map_names::SOCK_REVNAT)?.try_into()?,
            stats: take_map(ebpf, map_names::STATS)?.try_into()?,
            frontend_stats: take_map(ebpf, map_names::FRONTEND_STATS)?.try_into()?,
            backend_stats: take_map(ebpf, map_names::BACKEND_STATS)?.try_into()?,
            frontend_names: take_map(ebpf, map_names::FRONTEND_NAMES)?.try_into()?,
        })
    }

    /// Opens the maps pinned by a running (or kept) daemon.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            services: open_pinned(pin_dir, map_names::SERVICES)?.try_into()?,
            backends: open_pinned(pin_dir, map_names::BACKENDS)?.try_into()?,
            sock_revnat: open_pinned(pin_dir, map_names::SOCK_REVNAT)?.try_into()?,
            stats: open_pinned(pin_dir, map_names::STATS)?.try_into()?,
            frontend_stats: open_pinned(pin_dir, map_names::FRONTEND_STATS)?.try_into()?,
            backend_stats: open_pinned(pin_dir, map_names::BACKEND_STATS)?.try_into()?,
            frontend_names: open_pinned(pin_dir, map_names::FRONTEND_NAMES)?.try_into()?,
        })
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

    /// Removes the reverse-translation entries of sockets translated to backends that
    /// left their frontend, and returns those sockets (to be terminated).
    pub fn take_sockets_of(&mut self, gone: &[GoneBackend]) -> Result<Vec<TrackedSocket>> {
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let entries = collect_entries(self.sock_revnat.iter())?;
        let selected = sockets_of_gone(&entries, gone);
        for (key, _) in &selected {
            ignore_missing(self.sock_revnat.remove(key))?;
        }
        Ok(selected.into_iter().map(|(_, socket)| socket).collect())
    }

    /// Reads every table. Entries can change while we iterate (the daemon keeps
    /// writing); each entry is read atomically, the whole is best effort.
    pub fn snapshot(&self) -> Result<MapSnapshot> {
        let mut frontends: BTreeMap<ServiceKey, (ServiceValue, BTreeMap<u16, u32>)> =
            BTreeMap::new();
        let mut slots: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        for entry in self.services.iter() {
            let (key, value) = match entry {
                Ok(kv) => kv,
                // Deleted between get_next_key and lookup.
                Err(MapError::KeyNotFound) => continue,
                Err(err) => return Err(err.into()),
            };
            if key.slot == 0 {
                frontends.entry(key).or_default().0 = value;
            } else {
                slots.push((key, value));
            }
        }
        let mut orphan_slots = Vec::new();
        for (key, value) in slots {
            let frontend_key = ServiceKey { slot: 0, ..key };
            match frontends.get_mut(&frontend_key) {
                Some((_, by_slot)) => {
                    by_slot.insert(key.slot, value.backend_id);
                }
                None => orphan_slots.push(key),
            }
        }

        let mut backends = BTreeMap::new();
        for entry in self.backends.iter() {
            let (id, backend) = match entry {
                Ok(kv) => kv,
                Err(MapError::KeyNotFound) => continue,
                Err(err) => return Err(err.into()),
            };
            let connections = self.backend_stats.get(&id, 0).unwrap_or(0);
            backends.insert(
                id,
                SnapshotBackend {
                    backend,
                    connections,
                },
            );
        }

        let frontends = frontends
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
                let name = self
                    .frontend_names
                    .get(&value.svc_id, 0)
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default();
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

        let stats = (0..stat::COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0)
            })
            .collect();
        let sock_revnat_entries = self.sock_revnat.keys().filter(Result::is_ok).count();

        Ok(MapSnapshot {
            frontends,
            backends,
            stats,
            orphan_slots,
            sock_revnat_entries,
        })
    }
}

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

impl MapSet for KernelMaps {
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .insert(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id)).with_context(|| format!("deleting backend {id}"))
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services
            .insert(key, value, 0)
            .with_context(|| format!("writing service entry {key:?}"))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        ignore_missing(self.services.remove(key))
            .with_context(|| format!("deleting service entry {key:?}"))
    }

    fn reset_frontend_stats(&mut self, svc_id: u32) -> Result<()> {
        self.frontend_stats
            .set(svc_id, FrontendStats::default(), 0)
            .with_context(|| format!("resetting counters of frontend {svc_id}"))
    }

    fn reset_backend_stats(&mut self, backend_id: u32) -> Result<()> {
        self.backend_stats
            .set(backend_id, 0, 0)
            .with_context(|| format!("resetting counters of backend {backend_id}"))
    }

    fn put_frontend_name(&mut self, svc_id: u32, name: &str) -> Result<()> {
        self.frontend_names
            .insert(svc_id, FrontendName::new(name), 0)
            .with_context(|| format!("naming frontend {svc_id}"))
    }

    fn delete_frontend_name(&mut self, svc_id: u32) -> Result<()> {
        ignore_missing(self.frontend_names.remove(&svc_id))
            .with_context(|| format!("deleting name of frontend {svc_id}"))
    }
}

/// The maps the object declares, as the kernel describes them once created. A pin left
/// by another build with a different layout cannot be adopted: it is removed (the
/// daemon then rebuilds the tables from its source) rather than misread.
fn expected_maps() -> [(&'static str, MapType, usize, usize, u32); 7] {
    use std::mem::size_of;
    [
        (
            map_names::SERVICES,
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            SERVICE_MAP_SIZE,
        ),
        (
            map_names::BACKENDS,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<Backend>(),
            MAX_BACKENDS,
        ),
        (
            map_names::SOCK_REVNAT,
            MapType::LruHash,
            size_of::<SockRevKey>(),
            size_of::<SockRevValue>(),
            SOCK_REVNAT_SIZE,
        ),
        (
            map_names::STATS,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
            stat::COUNT,
        ),
        (
            map_names::FRONTEND_STATS,
            MapType::Array,
            size_of::<u32>(),
            size_of::<FrontendStats>(),
            MAX_FRONTENDS,
        ),
        (
            map_names::BACKEND_STATS,
            MapType::Array,
            size_of::<u32>(),
            size_of::<u64>(),
            MAX_BACKENDS,
        ),
        (
            map_names::FRONTEND_NAMES,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<FrontendName>(),
            MAX_FRONTENDS,
        ),
    ]
}

pub fn drop_incompatible_pins(pin_dir: &Path) -> Result<()> {
    for (name, map_type, key_size, value_size, max_entries) in expected_maps() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let compatible = match MapInfo::from_pin(&path) {
            Ok(info) => {
                info.map_type().ok() == Some(map_type)
                    && info.key_size() as usize == key_size
                    && info.value_size() as usize == value_size
                    && info.max_entries() == max_entries
            }
            Err(_) => false,
        };
        if !compatible {
            warn!(
                map = %path.display(),
                "pinned map has a different layout (left by another version); replacing it"
            );
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}
