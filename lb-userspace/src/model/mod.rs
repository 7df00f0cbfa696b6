//! The service model: Kubernetes Services, EndpointSlices and this node's Node in, the
//! frontends the datapath must serve out. Pure: no kernel, no I/O, so every rule is
//! unit-tested.
//!
//! Semantics follow kube-proxy (see [`frontends`] and [`endpoints`]). An address:port
//! claimed by two Services goes by a fixed rule ([`claim_rank`]), never by arrival
//! order, so a daemon decides the same way before and after a restart: a ClusterIP
//! beats an external IP, load-balancer IP or node port on the same address (a tenant's
//! `externalIPs` cannot take another Service's ClusterIP), then the older Service
//! wins, then the first by namespace/name. The loser is reported, and takes over when
//! the winner lets go.
//!
//! Work is incremental and linear: only Services whose objects changed are
//! recomputed, and conflicts are indexed by frontend key both ways (key -> waiting
//! Services, Service -> keys it waits for), so one change costs work proportional to
//! that Service, whatever the size of the table.

pub mod endpoints;
pub mod frontends;
mod small_set;
pub mod spec;
pub mod workloads;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::Arc,
    time::SystemTime,
};

use self::small_set::SmallSet;
pub use self::{
    endpoints::{Exclusion, Topology},
    frontends::{
        BackendAddr, Frontend, FrontendKey, FrontendKind, NodeContext, Scope, service_frontends,
    },
    spec::{NodeSpec, ObjectRef, Protocol, ServiceSpec, SliceSpec},
};

/// A ClusterIP:port (or other frontend) wanted by a Service while another holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub service: ObjectRef,
    pub key: FrontendKey,
    pub owner: ObjectRef,
    /// Why the owner wins.
    pub reason: &'static str,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Service {}: {} is served by Service {} ({}); this port is skipped until that changes",
            self.service, self.key, self.owner, self.reason
        )
    }
}

/// The order in which Services win a contested frontend key: lower wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ClaimRank {
    /// 0 for a ClusterIP, 1 for an address outside the Service's own allocation.
    kind: u8,
    /// Creation time (unknown ones last).
    created: i64,
    service: ObjectRef,
}

fn claim_rank(frontend: &Frontend, spec: Option<&ServiceSpec>) -> ClaimRank {
    ClaimRank {
        kind: u8::from(frontend.kind != FrontendKind::ClusterIp),
        created: spec.and_then(|s| s.created).unwrap_or(i64::MAX),
        service: frontend.service.clone(),
    }
}

/// Why `winner` beats `loser`, for the report.
fn claim_reason(winner: &ClaimRank, loser: &ClaimRank) -> &'static str {
    if winner.kind != loser.kind {
        "a ClusterIP wins over an external, load-balancer or node address"
    } else if winner.created != loser.created {
        "the older Service wins"
    } else {
        "the first by namespace/name wins"
    }
}

/// An external or load-balancer IP of a Service that is not served, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub service: ObjectRef,
    pub address: std::net::IpAddr,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Service {}: external address {} is not served: {}",
            self.service, self.address, self.reason
        )
    }
}

/// A Service that wants more frontends than one Service may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capped {
    pub service: ObjectRef,
    pub wanted: usize,
    pub cap: usize,
}

impl fmt::Display for Capped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Service {} wants {} frontends (ports x addresses x scopes), more than \
             --max-frontends-per-service {}: only {} are served, its ClusterIPs first",
            self.service, self.wanted, self.cap, self.cap
        )
    }
}

/// Frontends one Service may have by default: far above what real Services use (ten
/// ports on a dual-stack LoadBalancer with two node addresses is under 200), far below
/// what fills the maps for everyone.
pub const DEFAULT_FRONTENDS_PER_SERVICE: usize = 1024;

/// A Service's health-check node port (`externalTrafficPolicy: Local`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectRef,
    /// Ready endpoints on this node.
    pub local_endpoints: usize,
}

/// The whole desired state, updated incrementally.
#[derive(Debug, Default)]
pub struct Model {
    // Shared with the source that parsed them: one copy of every object in memory.
    services: HashMap<ObjectRef, Arc<ServiceSpec>>,
    slices: HashMap<ObjectRef, Arc<SliceSpec>>,
    slices_by_service: HashMap<ObjectRef, SmallSet<ObjectRef>>,
    frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
    /// Keys each Service holds.
    owned: HashMap<ObjectRef, SmallSet<FrontendKey>>,
    /// Services that want a key another Service holds, and the reverse index.
    waiting: HashMap<FrontendKey, BTreeSet<ObjectRef>>,
    waits: HashMap<ObjectRef, BTreeSet<FrontendKey>>,
    health_checks: BTreeMap<u16, HealthCheck>,
    dirty: BTreeSet<ObjectRef>,
    /// What the daemon says of its node.
    node: NodeContext,
    /// The API server's endpoints (the `default/kubernetes` Service's slices).
    api_endpoints: Vec<std::net::IpAddr>,
    api_changed: bool,
    /// `node` with the API server's endpoints reserved: what Services are computed with.
    effective: NodeContext,
    /// At most this many frontends per Service; `None`: [`DEFAULT_FRONTENDS_PER_SERVICE`].
    frontend_cap: Option<usize>,
    /// Slices changed since the last recompute with their trigger times, for the
    /// network programming latency metric.
    triggers: Vec<SystemTime>,
    service_changes: usize,
    slice_changes: usize,
    /// Work done (Services recomputed, frontends and waiters touched): a measure of
    /// cost that tests can bound, unlike time.
    work: u64,
    /// What each Service asks that this node cannot serve, and why.
    unserved: BTreeMap<ObjectRef, String>,
}

/// The outcome of [`Model::recompute`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Frontends added or changed (`Some`) or removed (`None`).
    pub frontends: BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
    /// Conflicts found (reported, not applied).
    pub conflicts: Vec<Conflict>,
    /// External and load-balancer IPs refused by policy (reported).
    pub refused: Vec<Refusal>,
    /// Services cut down to the per-Service frontend cap (reported).
    pub capped: Vec<Capped>,
    /// Services with something this node cannot serve, newly found (reported once;
    /// [`Model::unserved`] has all of them).
    pub unserved: Vec<(ObjectRef, String)>,
    /// Service and EndpointSlice objects changed (added, updated, removed) since the
    /// last recompute.
    pub service_changes: usize,
    pub slice_changes: usize,
    /// Trigger times of the slice changes included (see `TRIGGER_TIME_ANNOTATION`).
    pub triggers: Vec<SystemTime>,
    /// The recompute stopped early (shutdown); the rest stays dirty.
    pub interrupted: bool,
}

/// The Service whose endpoints are the API server's.
fn api_service() -> ObjectRef {
    ObjectRef::new("default", "kubernetes")
}

/// Services recomputed between checks of the stop condition.
const STOP_CHECK_EVERY: usize = 256;

impl Model {
    pub fn frontends(&self) -> &BTreeMap<FrontendKey, Arc<Frontend>> {
        &self.frontends
    }

    /// What Services ask that this node cannot serve, and why (`lb list`).
    pub fn unserved(&self) -> &BTreeMap<ObjectRef, String> {
        &self.unserved
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Health-check node ports of Local-policy Services, by port.
    #[allow(dead_code)] // served by the health-check node ports (TC path)
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
    }

    /// Work done so far (see the field).
    #[cfg(test)]
    pub fn work(&self) -> u64 {
        self.work
    }

    /// Services with changes not yet recomputed.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// Caps the frontends of one Service (`--max-frontends-per-service`), so that one
    /// Service cannot take the capacity every other Service needs.
    pub fn set_frontend_cap(&mut self, cap: usize) {
        if Some(cap) != self.frontend_cap {
            self.frontend_cap = Some(cap);
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// This node's name, zone and addresses: locality, topology and node ports of
    /// every Service depend on them, so a change recomputes all.
    pub fn set_node(&mut self, node: NodeContext) {
        if node != self.node {
            self.node = node;
            self.refresh_effective();
        }
    }

    /// The node context Services are computed with; a change recomputes all.
    fn refresh_effective(&mut self) {
        let mut effective = self.node.clone();
        effective.reserved.extend(&self.api_endpoints);
        effective.reserved.sort();
        effective.reserved.dedup();
        if effective != self.effective {
            self.effective = effective;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// Reads the API server's endpoints again after its slices changed.
    fn refresh_api_endpoints(&mut self) {
        self.api_changed = false;
        let mut addresses: Vec<std::net::IpAddr> = self
            .slices_of(&api_service())
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| e.address))
            .collect();
        addresses.sort();
        addresses.dedup();
        if addresses != self.api_endpoints {
            self.api_endpoints = addresses;
            self.refresh_effective();
        }
    }

    pub fn upsert_service(&mut self, spec: Arc<ServiceSpec>) {
        if self.services.get(&spec.id) != Some(&spec) {
            self.service_changes += 1;
            self.dirty.insert(spec.id.clone());
            self.services.insert(spec.id.clone(), spec);
        }
    }

    pub fn remove_service(&mut self, id: &ObjectRef) {
        if self.services.remove(id).is_some() {
            self.service_changes += 1;
            self.dirty.insert(id.clone());
        }
    }

    pub fn upsert_slice(&mut self, spec: Arc<SliceSpec>) {
        if self.slices.get(&spec.id) == Some(&spec) {
            return;
        }
        if let Some(old) = self.slices.get(&spec.id)
            && old.service != spec.service
        {
            let old_service = old.service.clone();
            self.unlink_slice(&spec.id, &old_service);
        }
        if let Some(trigger) = spec.trigger_time {
            self.triggers.push(trigger);
        }
        self.slice_changes += 1;
        self.api_changed |= spec.service == api_service();
        self.dirty.insert(spec.service.clone());
        self.slices_by_service
            .entry(spec.service.clone())
            .or_default()
            .insert(spec.id.clone());
        self.slices.insert(spec.id.clone(), spec);
    }

    pub fn remove_slice(&mut self, id: &ObjectRef) {
        if let Some(old) = self.slices.get(id) {
            let service = old.service.clone();
            self.slice_changes += 1;
            self.unlink_slice(id, &service);
        }
    }

    fn unlink_slice(&mut self, id: &ObjectRef, service: &ObjectRef) {
        self.api_changed |= *service == api_service();
        self.slices.remove(id);
        if let Some(set) = self.slices_by_service.get_mut(service) {
            set.remove(id);
            if set.is_empty() {
                self.slices_by_service.remove(service);
            }
        }
        self.dirty.insert(service.clone());
    }

    fn slices_of(&self, id: &ObjectRef) -> Vec<&SliceSpec> {
        self.slices_by_service
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|s| self.slices.get(s).map(|s| s.as_ref()))
            .collect()
    }

    /// Recomputes every Service touched since the last call.
    #[cfg(test)]
    pub fn recompute(&mut self) -> Changes {
        self.recompute_until(&|| false)
    }

    /// Like [`Model::recompute`], but checks `stop` every few hundred Services and
    /// returns early (leaving the rest dirty) when it says so.
    pub fn recompute_until(&mut self, stop: &dyn Fn() -> bool) -> Changes {
        let mut changes = Changes {
            triggers: std::mem::take(&mut self.triggers),
            service_changes: std::mem::take(&mut self.service_changes),
            slice_changes: std::mem::take(&mut self.slice_changes),
            ..Default::default()
        };
        if self.api_changed {
            self.refresh_api_endpoints();
        }
        let mut done = 0;
        // A released key can unblock a waiting Service, which is then recomputed too.
        while let Some(id) = self.dirty.pop_first() {
            done += 1;
            if done % STOP_CHECK_EVERY == 0 && stop() {
                self.dirty.insert(id);
                changes.interrupted = true;
                break;
            }
            self.recompute_service(&id, &mut changes);
        }
        changes
    }

    fn recompute_service(&mut self, id: &ObjectRef, changes: &mut Changes) {
        self.work += 1;
        let spec = self.services.get(id).cloned();
        let mut wanted = match &spec {
            Some(spec) => service_frontends(spec, &self.slices_of(id), &self.effective),
            None => Vec::new(),
        };
        let cap = self.frontend_cap.unwrap_or(DEFAULT_FRONTENDS_PER_SERVICE);
        if wanted.len() > cap {
            changes.capped.push(Capped {
                service: id.clone(),
                wanted: wanted.len(),
                cap,
            });
            // ClusterIPs first (a stable sort keeps the rest in their order).
            wanted.sort_by_key(|f| f.kind != FrontendKind::ClusterIp);
            wanted.truncate(cap);
        }
        match spec
            .as_deref()
            .and_then(|s| frontends::unserved_node_ports(s, &self.effective))
        {
            Some(why) => {
                if self.unserved.get(id) != Some(&why) {
                    self.unserved.insert(id.clone(), why.clone());
                    changes.unserved.push((id.clone(), why));
                }
            }
            None => {
                self.unserved.remove(id);
            }
        }
        if let Some(spec) = &spec {
            for &address in spec.external_ips.iter().chain(&spec.load_balancer_ips) {
                if let Some(reason) = frontends::external_address_refusal(address, &self.effective)
                {
                    changes.refused.push(Refusal {
                        service: id.clone(),
                        address,
                        reason,
                    });
                }
            }
        }
        self.work += wanted.len() as u64;

        self.health_checks.retain(|_, hc| &hc.service != id);
        if let Some(spec) = &spec
            && spec.external_local
            && spec.externally_reachable()
            && let Some(port) = spec.health_check_node_port
        {
            let local_endpoints =
                frontends::local_ready_endpoints(&self.slices_of(id), &self.effective);
            self.health_checks.insert(
                port,
                HealthCheck {
                    service: id.clone(),
                    local_endpoints,
                },
            );
        }

        // Forget this Service's old waits: they are recomputed below.
        for key in self.waits.remove(id).unwrap_or_default() {
            self.work += 1;
            if let Some(waiters) = self.waiting.get_mut(&key) {
                waiters.remove(id);
                if waiters.is_empty() {
                    self.waiting.remove(&key);
                }
            }
        }

        let wanted_keys: BTreeSet<FrontendKey> = wanted.iter().map(|f| f.key).collect();
        let previously = self.owned.remove(id).unwrap_or_default();
        for key in previously.iter().filter(|k| !wanted_keys.contains(k)) {
            self.work += 1;
            self.frontends.remove(key);
            changes.frontends.insert(*key, None);
            // Whoever waited for this key gets another chance.
            if let Some(waiters) = self.waiting.get(key) {
                self.work += waiters.len() as u64;
                self.dirty.extend(waiters.iter().cloned());
            }
        }

        let mut owned = SmallSet::default();
        for frontend in wanted {
            let key = frontend.key;
            match self.frontends.get(&key) {
                Some(existing) if existing.service != *id => {
                    let holder = existing.service.clone();
                    let held = claim_rank(existing, self.services.get(&holder).map(|s| &**s));
                    let wanted = claim_rank(&frontend, spec.as_deref());
                    let (loser, winner) = if wanted < held {
                        // Take it over: the holder waits for it from now on.
                        if let Some(keys) = self.owned.get_mut(&holder) {
                            keys.remove(&key);
                            if keys.is_empty() {
                                self.owned.remove(&holder);
                            }
                        }
                        owned.insert(key);
                        let frontend = Arc::new(frontend);
                        changes.frontends.insert(key, Some(frontend.clone()));
                        self.frontends.insert(key, frontend);
                        (holder, (id.clone(), claim_reason(&wanted, &held)))
                    } else {
                        (id.clone(), (holder, claim_reason(&held, &wanted)))
                    };
                    changes.conflicts.push(Conflict {
                        service: loser.clone(),
                        key,
                        owner: winner.0,
                        reason: winner.1,
                    });
                    self.waiting.entry(key).or_default().insert(loser.clone());
                    self.waits.entry(loser).or_default().insert(key);
                }
                Some(existing) if **existing == frontend => {
                    owned.insert(key);
                }
                _ => {
                    owned.insert(key);
                    let frontend = Arc::new(frontend);
                    changes.frontends.insert(key, Some(frontend.clone()));
                    self.frontends.insert(key, frontend);
                }
            }
        }
        if !owned.is_empty() {
            self.owned.insert(id.clone(), owned);
        }
    }
}

#[cfg(test)]
mod tests;
