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

use anyhow::{Context as _, Result, bail};
use lb_common::{
    BACKEND_F_LOCAL, Backend, MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND, MAX_FRONTENDS,
    SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, addr_from_ip,
    addr_to_ip, port_from_net, port_to_net,
};

use crate::model::{BackendAddr, Frontend, FrontendKey, Protocol, Scope};

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
        Self {
            flags,
            affinity_timeout: frontend.affinity_timeout.unwrap_or(0),
        }
    }
}

/// Round-robin id allocator over `1..limit`.
#[derive(Debug)]
struct IdAllocator {
    used: Vec<bool>,
    next: u32,
    in_use: u32,
}

impl IdAllocator {
    fn new(limit: u32) -> Self {
        Self {
            used: vec![false; limit as usize],
            next: 1,
            in_use: 0,
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        let limit = self.used.len() as u32;
        if self.in_use + 1 >= limit {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if id + 1 >= limit { 1 } else { id + 1 };
            if !self.used[id as usize] {
                self.used[id as usize] = true;
                self.in_use += 1;
                return Some(id);
            }
        }
    }

    /// Marks an id found in the kernel as taken. Returns false if it is out of range or
    /// already taken.
    fn claim(&mut self, id: u32) -> bool {
        match self.used.get_mut(id as usize) {
            Some(slot) if id != 0 && !*slot => {
                *slot = true;
                self.in_use += 1;
                self.next = self.next.max(id + 1) % self.used.len() as u32;
                self.next = self.next.max(1);
                true
            }
            _ => false,
        }
    }

    fn release(&mut self, id: u32) {
        if let Some(slot) = self.used.get_mut(id as usize)
            && *slot
        {
            *slot = false;
            self.in_use -= 1;
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
}

#[derive(Debug, Clone, Copy)]
struct BackendEntry {
    id: u32,
    refs: usize,
}

/// A backend that left a frontend altogether (not merely unready): sockets translated
/// to it for that frontend should be terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoneBackend {
    pub svc_id: u32,
    pub backend: BackendIdentity,
}

/// What one [`Reconciler::apply`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub gone: Vec<GoneBackend>,
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub slots_written: usize,
    pub slots_deleted: usize,
    pub backends_written: usize,
    pub backends_deleted: usize,
}

impl ApplyStats {
    /// Adds another apply's stats (chunked syncs).
    pub fn absorb(&mut self, other: ApplyStats) {
        self.gone.extend(other.gone);
        self.frontends_written += other.frontends_written;
        self.frontends_deleted += other.frontends_deleted;
        self.slots_written += other.slots_written;
        self.slots_deleted += other.slots_deleted;
        self.backends_written += other.backends_written;
        self.backends_deleted += other.backends_deleted;
    }

    pub fn writes(&self) -> usize {
        self.frontends_written
            + self.frontends_deleted
            + self.slots_written
            + self.slots_deleted
            + self.backends_written
            + self.backends_deleted
    }
}

/// What the kernel holds, as far as the reconciler knows.
#[derive(Debug)]
pub struct Reconciler {
    frontends: BTreeMap<FrontendKey, Programmed>,
    backends: HashMap<BackendIdentity, BackendEntry>,
    backend_by_id: HashMap<u32, BackendIdentity>,
    svc_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// Entries found in the kernel that nothing references (cleaned on next apply).
    garbage_slots: Vec<ServiceKey>,
    garbage_backends: Vec<u32>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
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

/// Stable slot layout: survivors keep their slot, additions fill holes then append, and
/// a shrink moves trailing backends into holes.
fn layout(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let old_set: BTreeSet<u32> = old.iter().copied().collect();
    let mut additions = wanted.iter().copied().filter(|id| !old_set.contains(id));
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|id| wanted_set.contains(id).then_some(*id))
        .collect();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = additions.next();
    }
    slots.extend(additions.map(Some));
    // Compact: drop trailing holes, then move the last backend into the first hole.
    loop {
        while slots.last() == Some(&None) {
            slots.pop();
        }
        match slots.iter().position(Option::is_none) {
            Some(hole) => {
                let last = slots.pop().flatten();
                slots[hole] = last;
            }
            None => break,
        }
    }
    slots.into_iter().flatten().collect()
}

impl Reconciler {
    pub fn new() -> Self {
        Self {
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            backend_by_id: HashMap::new(),
            svc_ids: IdAllocator::new(MAX_FRONTENDS),
            backend_ids: IdAllocator::new(MAX_BACKENDS),
            garbage_slots: Vec::new(),
            garbage_backends: Vec::new(),
        }
    }

    /// Builds the reconciler's view from what the kernel maps hold (state pinned by a
    /// previous run), so the first sync after a restart only writes differences and live
    /// connections are never disturbed.
    pub fn adopt(
        entries: impl IntoIterator<Item = (ServiceKey, ServiceValue)>,
        backends: impl IntoIterator<Item = (u32, Backend)>,
        names: impl IntoIterator<Item = (u32, String)>,
    ) -> Self {
        let mut this = Self::new();
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
        for (id, backend) in backends {
            let protocol = Protocol::from_number(backend.proto);
            match protocol {
                Some(protocol) if this.backend_ids.claim(id) => {
                    let identity = BackendIdentity {
                        addr: BackendAddr {
                            ip: addr_to_ip(&backend.addr),
                            port: port_from_net(backend.port),
                        },
                        protocol,
                    };
                    known_backends.insert(id, identity);
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
            for slot in 1..=value.count {
                let id = frontend_slots.get(&slot).copied().unwrap_or(0);
                // A slot pointing at an unknown backend is rewritten on the next apply.
                programmed.push(if known_backends.contains_key(&id) {
                    id
                } else {
                    0
                });
            }
            for (&slot, _) in frontend_slots.range(value.count + 1..) {
                this.garbage_slots.push(ServiceKey { slot, ..key });
            }
            for &id in programmed.iter().filter(|id| **id != 0) {
                let identity = known_backends[&id];
                this.backends
                    .entry(identity)
                    .or_insert(BackendEntry { id, refs: 0 })
                    .refs += 1;
                this.backend_by_id.insert(id, identity);
            }
            this.frontends.insert(
                frontend_key,
                Programmed {
                    svc_id: value.svc_id,
                    name: names.get(&value.svc_id).cloned().unwrap_or_default(),
                    attrs: FrontendAttrs {
                        flags: value.flags,
                        affinity_timeout: value.affinity_timeout,
                    },
                    draining: BTreeSet::new(),
                    slots: programmed,
                },
            );
        }
        // Slots whose frontend is gone.
        for (key, by_slot) in slots {
            this.garbage_slots
                .extend(by_slot.keys().map(|slot| ServiceKey { slot: *slot, ..key }));
        }
        for (id, identity) in known_backends {
            if !this.backend_by_id.contains_key(&id) {
                let _ = identity;
                this.garbage_backends.push(id);
                this.backend_ids.release(id);
            }
        }
        this
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
        self.frontends.values().map(|p| 1 + p.slots.len()).sum()
    }

    /// The backend identities currently programmed for a frontend, in slot order.
    pub fn programmed_backends(&self, key: &FrontendKey) -> Option<Vec<BackendIdentity>> {
        self.frontends.get(key).map(|p| {
            p.slots
                .iter()
                .filter_map(|id| self.backend_by_id.get(id).copied())
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

    /// Applies frontend changes (`None` = remove) in make-before-break order. After an
    /// error the kernel is still consistent for readers, but this reconciler's view is
    /// not: rebuild it with [`Reconciler::adopt`].
    pub fn apply<M: MapSet>(
        &mut self,
        maps: &mut M,
        changes: &BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();

        // Phase 1: every backend a changed frontend wants exists in the kernel.
        let mut wanted_ids: BTreeMap<FrontendKey, Vec<u32>> = BTreeMap::new();
        let mut new_backends: Vec<(u32, Backend)> = Vec::new();
        for (key, change) in changes {
            let Some(frontend) = change else { continue };
            if frontend.backends.len() > MAX_BACKENDS_PER_FRONTEND as usize {
                bail!(
                    "Service {}: {} has {} backends, more than the {} one frontend can hold",
                    frontend.service,
                    key,
                    frontend.backends.len(),
                    MAX_BACKENDS_PER_FRONTEND
                );
            }
            let mut ids = Vec::with_capacity(frontend.backends.len());
            for addr in &frontend.backends {
                let identity = BackendIdentity {
                    addr: *addr,
                    protocol: key.protocol,
                };
                let id = match self.backends.get_mut(&identity) {
                    Some(entry) => {
                        entry.refs += 1;
                        entry.id
                    }
                    None => {
                        let id = self
                            .backend_ids
                            .allocate()
                            .context("out of backend ids: LB_BACKENDS is full")?;
                        new_backends.push((id, identity.to_map_value(frontend.is_local(addr))));
                        self.backends.insert(identity, BackendEntry { id, refs: 1 });
                        self.backend_by_id.insert(id, identity);
                        id
                    }
                };
                ids.push(id);
            }
            wanted_ids.insert(*key, ids);
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
        for (key, ids) in &wanted_ids {
            let (svc_id, old_slots, old_name, old_draining, old_attrs, is_new) =
                match self.frontends.get(key) {
                    Some(p) => (
                        p.svc_id,
                        p.slots.clone(),
                        p.name.clone(),
                        p.draining.clone(),
                        Some(p.attrs),
                        false,
                    ),
                    None => {
                        let id = self
                            .svc_ids
                            .allocate()
                            .context("out of frontend ids: too many frontends")?;
                        new_svc_ids.push(id);
                        (id, Vec::new(), String::new(), BTreeSet::new(), None, true)
                    }
                };
            let frontend = changes[key]
                .as_ref()
                .expect("wanted_ids holds upserts only");
            let name = frontend_name(frontend);
            if name != old_name {
                names.push((svc_id, name.clone()));
            }
            let new_slots = layout(&old_slots, ids);
            // Backends that may still have sockets: in rotation before, or draining.
            let mut known: BTreeSet<BackendAddr> = old_slots
                .iter()
                .filter_map(|id| self.backend_by_id.get(id).map(|b| b.addr))
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
            let attrs = FrontendAttrs::of(frontend);
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
            released.extend(old_slots.iter().copied().filter(|id| *id != 0));
            self.frontends.insert(
                *key,
                Programmed {
                    svc_id,
                    name,
                    attrs,
                    draining,
                    slots: new_slots,
                },
            );
        }
        maps.reset_frontend_stats(&new_svc_ids)?;
        maps.put_frontend_names(&names)?;
        maps.put_services(&slot_writes)?;
        maps.put_services(&frontend_writes)?;
        stats.slots_written += slot_writes.len();
        stats.frontends_written += frontend_writes.len();

        // Phase 3: break what is no longer reachable: slots beyond a shrunk count and
        // the entries of removed frontends first, then the slots of removed frontends.
        let mut first_deletes = shrunk_slots;
        stats.slots_deleted += first_deletes.len();
        let mut removed_slots: Vec<ServiceKey> = std::mem::take(&mut self.garbage_slots);
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
            removed_slots
                .extend((1..=programmed.slots.len()).map(|slot| service_key(key, slot as u16)));
            let in_rotation = programmed
                .slots
                .iter()
                .filter_map(|id| self.backend_by_id.get(id).map(|b| b.addr));
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
            removed_ids.push(programmed.svc_id);
        }
        stats.slots_deleted += removed_slots.len();
        maps.delete_services(&first_deletes)?;
        maps.delete_services(&removed_slots)?;
        maps.delete_frontend_names(&removed_ids)?;
        for id in removed_ids {
            self.svc_ids.release(id);
        }

        // Phase 4: backends nothing points at any more.
        let mut dead_backends = std::mem::take(&mut self.garbage_backends);
        for id in released {
            let Some(identity) = self.backend_by_id.get(&id).copied() else {
                continue;
            };
            let entry = self
                .backends
                .get_mut(&identity)
                .expect("backend_by_id and backends agree");
            entry.refs -= 1;
            if entry.refs == 0 {
                dead_backends.push(id);
                self.backends.remove(&identity);
                self.backend_by_id.remove(&id);
                self.backend_ids.release(id);
            }
        }
        maps.delete_backends(&dead_backends)?;
        stats.backends_deleted += dead_backends.len();
        Ok(stats)
    }
}

#[cfg(test)]
pub mod memory {
    //! An in-memory map set that checks, after every single operation, the invariant a
    //! concurrent `connect()` relies on: every frontend's slots 1..=count exist and point
    //! at existing backends.

    use std::collections::{BTreeMap, HashMap};

    use anyhow::{Result, bail};
    use lb_common::{Backend, ServiceKey, ServiceValue};

    use super::MapSet;

    #[derive(Debug, Default)]
    pub struct MemoryMaps {
        pub services: BTreeMap<ServiceKey, ServiceValue>,
        pub backends: HashMap<u32, Backend>,
        pub names: HashMap<u32, String>,
        /// Every operation, in order, for assertions on ordering and write counts.
        pub log: Vec<String>,
        /// Fail the n-th put (to test error handling).
        pub fail_put_at: Option<usize>,
        puts: usize,
    }

    impl MemoryMaps {
        /// The backends a connect() to `frontend` can reach right now.
        pub fn reachable(&self, frontend: &ServiceKey) -> Vec<Backend> {
            let Some(value) = self.services.get(frontend) else {
                return Vec::new();
            };
            (1..=value.count)
                .map(|slot| {
                    let slot_value = self.services[&ServiceKey { slot, ..*frontend }];
                    self.backends[&slot_value.backend_id]
                })
                .collect()
        }

        fn check_invariant(&self, after: &str) {
            for (key, value) in self.services.iter().filter(|(k, _)| k.slot == 0) {
                for slot in 1..=value.count {
                    let slot_key = ServiceKey { slot, ..*key };
                    let Some(slot_value) = self.services.get(&slot_key) else {
                        panic!(
                            "after {after}: frontend {key:?} count {} but slot {slot} missing",
                            value.count
                        );
                    };
                    assert!(
                        self.backends.contains_key(&slot_value.backend_id),
                        "after {after}: slot {slot_key:?} points at missing backend {}",
                        slot_value.backend_id
                    );
                }
            }
        }

        fn put(&mut self) -> Result<()> {
            self.puts += 1;
            if self.fail_put_at == Some(self.puts) {
                bail!("injected failure at put {}", self.puts);
            }
            Ok(())
        }
    }

    impl MemoryMaps {
        fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
            self.put()?;
            self.backends.insert(id, *backend);
            let op = format!("put_backend {id}");
            self.check_invariant(&op);
            self.log.push(op);
            Ok(())
        }

        fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
            self.put()?;
            self.services.insert(*key, *value);
            let op = if key.slot == 0 {
                format!("put_frontend count={}", value.count)
            } else {
                format!("put_slot {}={}", key.slot, value.backend_id)
            };
            self.check_invariant(&op);
            self.log.push(op);
            Ok(())
        }
    }

    /// Element by element, checking the invariant after each: the kernel applies a
    /// batch the same way, so readers can observe any prefix.
    impl MapSet for MemoryMaps {
        fn put_backends(&mut self, entries: &[(u32, Backend)]) -> Result<()> {
            entries
                .iter()
                .try_for_each(|(id, b)| self.put_backend(*id, b))
        }

        fn delete_backends(&mut self, ids: &[u32]) -> Result<()> {
            for id in ids {
                self.backends.remove(id);
                let op = format!("delete_backend {id}");
                self.check_invariant(&op);
                self.log.push(op);
            }
            Ok(())
        }

        fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
            entries.iter().try_for_each(|(k, v)| self.put_service(k, v))
        }

        fn delete_services(&mut self, keys: &[ServiceKey]) -> Result<()> {
            for key in keys {
                self.services.remove(key);
                let op = if key.slot == 0 {
                    "delete_frontend".to_string()
                } else {
                    format!("delete_slot {}", key.slot)
                };
                self.check_invariant(&op);
                self.log.push(op);
            }
            Ok(())
        }

        fn reset_frontend_stats(&mut self, _svc_ids: &[u32]) -> Result<()> {
            Ok(())
        }

        fn reset_backend_stats(&mut self, _backend_ids: &[u32]) -> Result<()> {
            Ok(())
        }

        fn put_frontend_names(&mut self, names: &[(u32, String)]) -> Result<()> {
            for (svc_id, name) in names {
                self.names.insert(*svc_id, name.clone());
            }
            Ok(())
        }

        fn delete_frontend_names(&mut self, svc_ids: &[u32]) -> Result<()> {
            for svc_id in svc_ids {
                self.names.remove(svc_id);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::{memory::MemoryMaps, *};
    use crate::model::{
        ObjectRef,
        endpoints::{Exclusion, Topology},
        frontends::FrontendKind,
    };

    fn fkey(ip: &str, port: u16) -> FrontendKey {
        FrontendKey::internal(ip.parse().unwrap(), port, Protocol::Tcp)
    }

    fn frontend(key: FrontendKey, backends: &[&str]) -> Frontend {
        Frontend {
            key,
            service: ObjectRef::new("pods", "redis-master"),
            port_name: String::new(),
            kind: FrontendKind::ClusterIp,
            backends: backends
                .iter()
                .map(|ip| BackendAddr {
                    ip: ip.parse().unwrap(),
                    port: 6379,
                })
                .collect(),
            local_backends: Vec::new(),
            excluded: Vec::new(),
            affinity_timeout: None,
            local_policy: false,
            topology: Topology::Any,
            source_ranges: Vec::new(),
        }
    }

    fn change(f: Frontend) -> BTreeMap<FrontendKey, Option<Arc<Frontend>>> {
        BTreeMap::from([(f.key, Some(Arc::new(f)))])
    }

    /// A frontend programmed with `backends`, with the operation log cleared.
    fn programmed(backends: &[&str]) -> (MemoryMaps, Reconciler, FrontendKey) {
        let mut maps = MemoryMaps::default();
        let mut rec = Reconciler::new();
        let key = fkey("10.96.0.100", 6379);
        rec.apply(&mut maps, &change(frontend(key, backends)))
            .unwrap();
        maps.log.clear();
        (maps, rec, key)
    }

    /// What a restarted daemon builds from the maps.
    fn adopt(maps: &MemoryMaps) -> Reconciler {
        Reconciler::adopt(
            maps.services.iter().map(|(k, v)| (*k, *v)),
            maps.backends.iter().map(|(k, v)| (*k, *v)),
            maps.names.iter().map(|(k, v)| (*k, v.clone())),
        )
    }

    fn gone_ips(stats: &ApplyStats) -> Vec<String> {
        stats
            .gone
            .iter()
            .map(|g| g.backend.addr.ip.to_string())
            .collect()
    }

    fn reachable_ips(maps: &MemoryMaps, key: &FrontendKey) -> BTreeSet<IpAddr> {
        maps.reachable(&service_key(key, 0))
            .iter()
            .map(|b| addr_to_ip(&b.addr))
            .collect()
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn layout_is_stable() {
        assert_eq!(layout(&[], &[1, 2, 3]), vec![1, 2, 3]);
        // Remove the middle one: the last moves into its slot.
        assert_eq!(layout(&[1, 2, 3], &[1, 3]), vec![1, 3]);
        // Replace one: the new one takes the hole.
        assert_eq!(layout(&[1, 2, 3], &[1, 3, 4]), vec![1, 4, 3]);
        // Remove the last: nothing moves.
        assert_eq!(layout(&[1, 2, 3], &[1, 2]), vec![1, 2]);
        assert_eq!(layout(&[1, 2, 3, 4], &[4]), vec![4]);
        assert_eq!(layout(&[1, 2], &[]), Vec::<u32>::new());
    }

    #[test]
    fn first_sync_writes_backends_then_slots_then_frontend() {
        let mut maps = MemoryMaps::default();
        let mut rec = Reconciler::new();
        let key = fkey("10.96.0.100", 6379);
        let stats = rec
            .apply(
                &mut maps,
                &change(frontend(
                    key,
                    &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
                )),
            )
            .unwrap();
        assert_eq!(
            maps.log,
            vec![
                "put_backend 1",
                "put_backend 2",
                "put_backend 3",
                "put_slot 1=1",
                "put_slot 2=2",
                "put_slot 3=3",
                "put_frontend count=3"
            ]
        );
        assert_eq!(stats.writes(), 7);
        assert_eq!(
            reachable_ips(&maps, &key),
            ips(&["10.244.1.11", "10.244.1.12", "10.244.1.13"])
        );
    }

    #[test]
    fn pod_restart_with_new_ip_rewrites_one_slot() {
        let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]);
        // redis-2 restarts as 10.244.1.22.
        let stats = rec
            .apply(
                &mut maps,
                &change(frontend(
                    key,
                    &["10.244.1.11", "10.244.1.22", "10.244.1.13"],
                )),
            )
            .unwrap();
        assert_eq!(
            maps.log,
            vec!["put_backend 4", "put_slot 2=4", "delete_backend 2"]
        );
        assert_eq!(stats.writes(), 3);
        assert_eq!(
            reachable_ips(&maps, &key),
            ips(&["10.244.1.11", "10.244.1.22", "10.244.1.13"])
        );
        // The old pod is gone: its sockets are to be terminated.
        assert_eq!(gone_ips(&stats), vec!["10.244.1.12"]);
    }

    #[test]
    fn scale_down_to_zero_and_back() {
        let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]);
        rec.apply(&mut maps, &change(frontend(key, &["10.244.1.13"])))
            .unwrap();
        // Count shrinks before the slots go; then the unreferenced backends go.
        assert_eq!(
            maps.log,
            vec![
                "put_slot 1=3",
                "put_frontend count=1",
                "delete_slot 2",
                "delete_slot 3",
                "delete_backend 1",
                "delete_backend 2"
            ]
        );
        maps.log.clear();
        rec.apply(&mut maps, &change(frontend(key, &[]))).unwrap();
        assert_eq!(
            maps.log,
            vec!["put_frontend count=0", "delete_slot 1", "delete_backend 3"]
        );
        // The frontend stays, with no backends: connect() is refused.
        assert_eq!(maps.services[&service_key(&key, 0)].count, 0);
        rec.apply(&mut maps, &change(frontend(key, &["10.244.1.14"])))
            .unwrap();
        assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.14"]));
    }

    #[test]
    fn removing_a_frontend_deletes_the_entry_first_and_frees_ids() {
        let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12"]);
        rec.apply(&mut maps, &BTreeMap::from([(key, None)]))
            .unwrap();
        assert_eq!(
            maps.log,
            vec![
                "delete_frontend",
                "delete_slot 1",
                "delete_slot 2",
                "delete_backend 1",
                "delete_backend 2"
            ]
        );
        assert!(maps.services.is_empty() && maps.backends.is_empty());
        assert_eq!(rec.frontend_count(), 0);
        assert_eq!(rec.backend_count(), 0);
    }

    #[test]
    fn retained_endpoints_are_not_gone() {
        let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12"]);
        // .12 turns terminating: unselected but still listed, so it drains.
        let mut draining = frontend(key, &["10.244.1.11"]);
        draining.excluded = vec![(
            BackendAddr {
                ip: "10.244.1.12".parse().unwrap(),
                port: 6379,
            },
            Exclusion::Terminating,
        )];
        let stats = rec.apply(&mut maps, &change(draining)).unwrap();
        assert!(stats.gone.is_empty(), "{:?}", stats.gone);
        assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.11"]));
        // Then the pod disappears from the slice: now its sockets must go.
        let stats = rec
            .apply(&mut maps, &change(frontend(key, &["10.244.1.11"])))
            .unwrap();
        assert_eq!(gone_ips(&stats), vec!["10.244.1.12"]);
        // Removing the whole frontend reports every backend it had.
        let stats = rec
            .apply(&mut maps, &BTreeMap::from([(key, None)]))
            .unwrap();
        assert_eq!(stats.gone.len(), 1);
    }

    #[test]
    fn backends_shared_between_frontends_live_until_the_last_user_goes() {
        let mut maps = MemoryMaps::default();
        let mut rec = Reconciler::new();
        let a = fkey("10.96.0.100", 6379);
        let b = fkey("10.96.0.101", 6379);
        let mut both = change(frontend(a, &["10.244.1.11"]));
        both.insert(b, Some(Arc::new(frontend(b, &["10.244.1.11"]))));
        rec.apply(&mut maps, &both).unwrap();
        assert_eq!(
            maps.backends.len(),
            1,
            "one backend entry shared by two frontends"
        );
        rec.apply(&mut maps, &BTreeMap::from([(a, None)])).unwrap();
        assert_eq!(maps.backends.len(), 1);
        assert_eq!(reachable_ips(&maps, &b), ips(&["10.244.1.11"]));
        rec.apply(&mut maps, &BTreeMap::from([(b, None)])).unwrap();
        assert!(maps.backends.is_empty());
    }

    #[test]
    fn ids_are_not_reused_immediately() {
        let mut alloc = IdAllocator::new(8);
        let a = alloc.allocate().unwrap();
        alloc.release(a);
        let b = alloc.allocate().unwrap();
        assert_ne!(a, b);
        let rest: Vec<u32> = (0..5).map(|_| alloc.allocate().unwrap()).collect();
        assert_eq!(rest, vec![3, 4, 5, 6, 7]);
        // Only once every other id was used does the freed one come back.
        assert_eq!(alloc.allocate(), Some(a));
        assert_eq!(alloc.allocate(), None, "ids 1..8 are all taken");
    }

    #[test]
    fn adopting_kernel_state_writes_nothing_when_it_matches() {
        let mut maps = MemoryMaps::default();
        let mut rec = Reconciler::new();
        let key = fkey("10.96.0.100", 6379);
        let desired = frontend(key, &["10.244.1.11", "10.244.1.12"]);
        rec.apply(&mut maps, &change(desired.clone())).unwrap();

        // A restarted daemon adopts the maps: identical desired state means no writes.
        let mut adopted = adopt(&maps);
        let desired_all = BTreeMap::from([(key, Arc::new(desired.clone()))]);
        assert!(adopted.diff_all(&desired_all).is_empty());
        maps.log.clear();
        // A change after adoption reuses the adopted ids.
        let changed = frontend(key, &["10.244.1.11", "10.244.1.13"]);
        adopted.apply(&mut maps, &change(changed)).unwrap();
        assert_eq!(
            maps.log,
            vec!["put_backend 3", "put_slot 2=3", "delete_backend 2"]
        );
    }

    #[test]
    fn adoption_cleans_leftovers_of_an_interrupted_update() {
        let (mut maps, _, key) = programmed(&["10.244.1.11", "10.244.1.12"]);
        // Simulate a crash mid-shrink: count already 1, slot 2 and backend 2 left behind,
        // plus an orphan slot of a frontend that no longer exists.
        maps.services.get_mut(&service_key(&key, 0)).unwrap().count = 1;
        let orphan = service_key(&fkey("10.96.0.200", 80), 1);
        maps.services.insert(
            orphan,
            ServiceValue {
                backend_id: 1,
                svc_id: 9,
                ..Default::default()
            },
        );
        let mut adopted = adopt(&maps);
        let desired = BTreeMap::from([(key, Arc::new(frontend(key, &["10.244.1.11"])))]);
        let changes = adopted.diff_all(&desired);
        assert!(changes.is_empty(), "slot 1 is intact: {changes:?}");
        adopted.apply(&mut maps, &changes).unwrap();
        assert!(!maps.services.contains_key(&service_key(&key, 2)));
        assert!(!maps.services.contains_key(&orphan));
        assert!(!maps.backends.contains_key(&2));
        assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.11"]));
    }

    #[test]
    fn diff_all_removes_what_is_not_desired() {
        let mut maps = MemoryMaps::default();
        let mut rec = Reconciler::new();
        let a = fkey("10.96.0.100", 6379);
        rec.apply(&mut maps, &change(frontend(a, &["10.244.1.11"])))
            .unwrap();
        let changes = rec.diff_all(&BTreeMap::new());
        assert_eq!(changes, BTreeMap::from([(a, None)]));
    }

    #[test]
    fn a_failed_write_leaves_the_kernel_consistent() {
        let mut maps = MemoryMaps::default();
        let mut rec = Reconciler::new();
        let key = fkey("10.96.0.100", 6379);
        rec.apply(&mut maps, &change(frontend(key, &["10.244.1.11"])))
            .unwrap();
        // The second backend write of the next update fails; the invariant checks in
        // MemoryMaps prove no connect could have seen a dangling slot.
        maps.fail_put_at = Some(4);
        let err = rec
            .apply(
                &mut maps,
                &change(frontend(
                    key,
                    &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
                )),
            )
            .unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.11"]));
        // A resync from the kernel's state converges.
        let mut resynced = adopt(&maps);
        let desired = BTreeMap::from([(
            key,
            Arc::new(frontend(
                key,
                &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
            )),
        )]);
        let changes = resynced.diff_all(&desired);
        resynced.apply(&mut maps, &changes).unwrap();
        assert_eq!(
            reachable_ips(&maps, &key),
            ips(&["10.244.1.11", "10.244.1.12", "10.244.1.13"])
        );
        assert_eq!(
            maps.backends.len(),
            3,
            "the half-written backend was collected"
        );
    }

    #[test]
    fn many_random_updates_keep_the_invariant() {
        // A deterministic pseudo-random walk over backend sets for a few frontends;
        // MemoryMaps asserts the connect() invariant after every single operation.
        let mut maps = MemoryMaps::default();
        let mut rec = Reconciler::new();
        let keys: Vec<FrontendKey> = (0..4)
            .map(|i| fkey(&format!("10.96.0.{}", 10 + i), 80))
            .collect();
        let mut seed: u64 = 0x1234_5678;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..400 {
            let key = keys[(next() % 4) as usize];
            let change = if next() % 10 == 0 {
                None
            } else {
                let n = next() % 6;
                let pool: Vec<String> = (0..n)
                    .map(|_| format!("10.244.1.{}", next() % 12 + 1))
                    .collect();
                let refs: Vec<&str> = pool.iter().map(String::as_str).collect();
                let mut f = frontend(key, &refs);
                f.backends.sort();
                f.backends.dedup();
                Some(f)
            };
            let expected: BTreeSet<IpAddr> = change
                .as_ref()
                .map(|f| f.backends.iter().map(|b| b.ip).collect())
                .unwrap_or_default();
            rec.apply(&mut maps, &BTreeMap::from([(key, change.map(Arc::new))]))
                .unwrap();
            assert_eq!(reachable_ips(&maps, &key), expected);
        }
        // No leaked backends: every backend in the map is referenced by some slot.
        let referenced: BTreeSet<u32> = maps
            .services
            .iter()
            .filter(|(k, _)| k.slot > 0)
            .map(|(_, v)| v.backend_id)
            .collect();
        assert_eq!(referenced, maps.backends.keys().copied().collect());
    }
}
