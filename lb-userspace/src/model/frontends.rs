//! From one Service and its EndpointSlices to the frontends the datapath serves.
//!
//! One frontend per (address, port, protocol, scope):
//! - every ClusterIP (both families for dual-stack Services), internal scope (the
//!   socket hooks);
//! - for NodePort and LoadBalancer Services, every node address of the Service's
//!   families at the node port, in both scopes: internal for connections made on this
//!   node, external for packets arriving from elsewhere (the TC path);
//! - every external IP and load-balancer ingress IP at the Service port, in both
//!   scopes.
//!
//! Internal traffic follows `internalTrafficPolicy`, external traffic
//! `externalTrafficPolicy` (as kube-proxy does, pods reaching an external address of a
//! Local-policy Service are served by the internal endpoint set rather than dropped).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::Serialize;

use super::{
    endpoints::{Candidate, Exclusion, Topology, categorize, exclusion},
    spec::{AddressType, Cidr, ObjectRef, Protocol, ServiceSpec, ServiceType, SliceSpec},
};

/// Which hooks a frontend is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Connections made on this node (cgroup socket hooks).
    Internal,
    /// Packets arriving from other machines (TC).
    External,
}

impl Scope {
    /// `ServiceKey::scope` in the kernel maps.
    pub fn number(self) -> u8 {
        match self {
            Self::Internal => lb_common::SCOPE_INTERNAL,
            Self::External => lb_common::SCOPE_EXTERNAL,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::SCOPE_INTERNAL => Some(Self::Internal),
            lb_common::SCOPE_EXTERNAL => Some(Self::External),
            _ => None,
        }
    }
}

/// What the datapath matches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl FrontendKey {
    #[cfg(test)]
    pub fn internal(ip: IpAddr, port: u16, protocol: Protocol) -> Self {
        Self {
            ip,
            port,
            protocol,
            scope: Scope::Internal,
        }
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol)?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol)?,
        }
        if self.scope == Scope::External {
            f.write_str(" (external)")?;
        }
        Ok(())
    }
}

/// Which Service address a frontend stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// A pod address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

/// One frontend as the datapath should serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub service: ObjectRef,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    pub kind: FrontendKind,
    /// Sorted, without duplicates.
    pub backends: Vec<BackendAddr>,
    /// Which of `backends` run on this node.
    pub local: LocalMask,
    /// Endpoints still listed for this port but not chosen, and why. Connections to
    /// them are left to drain; only sockets to endpoints that are gone altogether are
    /// terminated.
    pub excluded: Vec<(BackendAddr, Exclusion)>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// The backend set follows a Local traffic policy.
    pub local_policy: bool,
    /// Topology narrowing in effect (never for Local policy).
    pub topology: Topology,
    /// Allowed client prefixes (LoadBalancer frontends, external scope); empty = all.
    pub source_ranges: Vec<Cidr>,
    /// The Service's creationTimestamp (Unix seconds): when the maps cannot hold every
    /// frontend, ClusterIPs are admitted first, then older Services.
    pub created: Option<i64>,
}

impl Frontend {
    /// Admission order when capacity is short: ClusterIPs, then older Services (a
    /// Service without a timestamp, from a manifest, counts as newest), then key.
    pub fn admission_rank(&self) -> (bool, i64) {
        (
            self.kind != FrontendKind::ClusterIp,
            self.created.unwrap_or(i64::MAX),
        )
    }

    pub fn is_local(&self, backend: &BackendAddr) -> bool {
        self.backends
            .binary_search(backend)
            .is_ok_and(|at| self.local.contains(at))
    }

    /// The backends that run on this node.
    pub fn local_backends(&self) -> impl Iterator<Item = &BackendAddr> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(at, _)| self.local.contains(*at))
            .map(|(_, b)| b)
    }
}

/// Which of a frontend's backends run on this node: bit `i` stands for `backends[i]`.
/// (A second list of addresses cost 20 bytes a backend: 20 MB at a million.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalMask(Vec<u64>);

impl LocalMask {
    /// The mask of `backends` for which `local` holds.
    pub fn of(backends: &[BackendAddr], local: impl Fn(&BackendAddr) -> bool) -> Self {
        let mut words = Vec::new();
        for (at, backend) in backends.iter().enumerate() {
            if local(backend) {
                if words.len() <= at / 64 {
                    words.resize(at / 64 + 1, 0);
                }
                words[at / 64] |= 1 << (at % 64);
            }
        }
        words.shrink_to_fit();
        Self(words)
    }

    /// Every one of `count` backends.
    #[cfg(test)]
    pub fn all(count: usize) -> Self {
        let mut words = vec![u64::MAX; count.div_ceil(64)];
        if !count.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last = (1 << (count % 64)) - 1;
        }
        Self(words)
    }

    pub fn contains(&self, at: usize) -> bool {
        self.0
            .get(at / 64)
            .is_some_and(|w| w & (1 << (at % 64)) != 0)
    }
}

/// What the model knows of the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    pub zone: Option<String>,
    /// Addresses node ports are served on.
    pub addresses: Vec<IpAddr>,
    /// Node ports served (`--node-port-range`); `None`: any.
    pub node_port_range: Option<(u16, u16)>,
    /// Where external and load-balancer IPs may be (`--external-ip-cidrs`); `None`:
    /// anywhere not reserved.
    pub external_ip_cidrs: Option<Vec<crate::model::spec::Cidr>>,
    /// Addresses no external or load-balancer IP may take: the API server's (its
    /// endpoints and the address this daemon dials).
    pub reserved: Vec<IpAddr>,
    /// The other nodes' addresses, with their names (sorted): no external or
    /// load-balancer IP may take them either (their kubelets, their node ports).
    pub other_nodes: Vec<(IpAddr, String)>,
}

/// Why `spec`'s node ports cannot be served here, if they cannot: no address of this
/// node is known (from manifests without a Node object of its name, say), so they
/// are served neither to other machines nor to this node's own connections.
pub fn unserved_node_ports(spec: &ServiceSpec, node: &NodeContext) -> Option<String> {
    if !node.addresses.is_empty()
        || !matches!(
            spec.service_type,
            ServiceType::NodePort | ServiceType::LoadBalancer
        )
    {
        return None;
    }
    let ports: Vec<String> = spec
        .ports
        .iter()
        .filter_map(|p| p.node_port.filter(|&n| node.serves_node_port(n)))
        .map(|n| n.to_string())
        .collect();
    if ports.is_empty() {
        return None;
    }
    Some(format!(
        "node port {} is not served: no address of node {:?} is known (the source has no \
         Node object of that name with addresses; add one, or check --node-name)",
        ports.join(", "),
        node.name
    ))
}

impl NodeContext {
    /// Whether `port` is in the node-port range.
    pub fn serves_node_port(&self, port: u16) -> bool {
        self.node_port_range
            .is_none_or(|(min, max)| (min..=max).contains(&port))
    }
}

/// Why an external or load-balancer IP is not served, if it is not. A Service's
/// `externalIPs` and load-balancer status are written by whoever may create Services,
/// so they may not take this node's own addresses (its node ports aside), another
/// node's, the API server's, or anything outside `--external-ip-cidrs`. Addresses that are never a
/// host's (loopback, ...) are refused when the Service is read.
pub fn external_address_refusal(ip: IpAddr, node: &NodeContext) -> Option<String> {
    if node.addresses.contains(&ip) {
        return Some("it is this node's own address".into());
    }
    if node.reserved.contains(&ip) {
        return Some("it is an address of the API server".into());
    }
    if let Some((_, name)) = node.other_nodes.iter().find(|(a, _)| *a == ip) {
        return Some(format!("it is an address of node {name}"));
    }
    match &node.external_ip_cidrs {
        Some(cidrs) if !cidrs.iter().any(|c| c.contains(ip)) => Some(format!(
            "it is outside --external-ip-cidrs {}",
            cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )),
        _ => None,
    }
}

/// One endpoint of one Service port, merged over the Service's slices.
struct PortEndpoint<'a> {
    addr: BackendAddr,
    candidate: Candidate<'a>,
}

/// The backend sets of one (family, port) of a Service.
struct Sets {
    internal: Selection,
    /// For node ports, external and load-balancer IPs.
    external: Selection,
    /// For pods reaching those addresses from inside (internal scope).
    internal_for_external: Selection,
}

#[derive(Clone)]
struct Selection {
    backends: Vec<BackendAddr>,
    excluded: Vec<(BackendAddr, Exclusion)>,
    local_policy: bool,
    topology: Topology,
}

fn endpoints_of<'a>(
    slices: &[&'a SliceSpec],
    family: AddressType,
    port: &super::spec::ServicePortSpec,
    node: &NodeContext,
) -> Vec<PortEndpoint<'a>> {
    // Slices arrive in name order; an address listed twice keeps its ready entry (as
    // kube-proxy's endpoint cache does during slice churn).
    let mut merged: BTreeMap<BackendAddr, PortEndpoint<'a>> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.address_type == Some(family)) {
        let Some(target) = slice.port_for(port) else {
            continue;
        };
        for ep in &slice.endpoints {
            let addr = BackendAddr {
                ip: ep.address,
                port: target,
            };
            let candidate = Candidate {
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                local: !node.name.is_empty()
                    && ep.placement.node_name.as_deref() == Some(node.name.as_str()),
                zone_hints: &ep.placement.zone_hints,
                node_hints: &ep.placement.node_hints,
            };
            match merged.get(&addr) {
                Some(existing) if existing.candidate.ready || !candidate.ready => {}
                _ => {
                    merged.insert(addr, PortEndpoint { addr, candidate });
                }
            }
        }
    }
    merged.into_values().collect()
}

fn select(
    endpoints: &[PortEndpoint],
    chosen: &[usize],
    local_policy: bool,
    topology: Topology,
    node: &NodeContext,
) -> Selection {
    let mut backends: Vec<BackendAddr> = chosen.iter().map(|&i| endpoints[i].addr).collect();
    backends.sort();
    let excluded = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| !chosen.contains(i))
        .map(|(_, ep)| {
            let why = exclusion(
                &ep.candidate,
                local_policy,
                topology,
                &node.name,
                node.zone.as_deref(),
            );
            (ep.addr, why)
        })
        .collect();
    Selection {
        backends,
        excluded,
        local_policy,
        topology: if local_policy {
            Topology::Any
        } else {
            topology
        },
    }
}

fn sets(service: &ServiceSpec, endpoints: &[PortEndpoint], node: &NodeContext) -> Sets {
    let candidates: Vec<Candidate> = endpoints.iter().map(|e| e.candidate).collect();
    let categorized = categorize(&candidates, &node.name, node.zone.as_deref());
    let cluster = select(
        endpoints,
        &categorized.cluster,
        false,
        categorized.topology,
        node,
    );
    let local = select(
        endpoints,
        &categorized.local,
        true,
        categorized.topology,
        node,
    );
    let internal = if service.internal_local {
        local.clone()
    } else {
        cluster.clone()
    };
    let (external, internal_for_external) = if service.external_local {
        (local, internal.clone())
    } else {
        (cluster.clone(), cluster)
    };
    Sets {
        internal,
        external,
        internal_for_external,
    }
}

/// Computes the frontends of one Service from its slices (any order).
pub fn service_frontends(
    service: &ServiceSpec,
    slices: &[&SliceSpec],
    node: &NodeContext,
) -> Vec<Frontend> {
    let mut frontends = Vec::new();
    for &cluster_ip in &service.cluster_ips {
        let family = AddressType::of(&cluster_ip);
        for port in &service.ports {
            let endpoints = endpoints_of(slices, family, port, node);
            // In address order, as `endpoints` are.
            let local_backends: Vec<BackendAddr> = endpoints
                .iter()
                .filter(|e| e.candidate.local)
                .map(|e| e.addr)
                .collect();
            let sets = sets(service, &endpoints, node);
            let make = |ip: IpAddr,
                        port_number: u16,
                        scope: Scope,
                        kind: FrontendKind,
                        selection: &Selection| {
                Frontend {
                    key: FrontendKey {
                        ip,
                        port: port_number,
                        protocol: port.protocol,
                        scope,
                    },
                    service: service.id.clone(),
                    port_name: port.name.clone(),
                    kind,
                    local: LocalMask::of(&selection.backends, |b| {
                        local_backends.binary_search(b).is_ok()
                    }),
                    backends: selection.backends.clone(),
                    excluded: selection.excluded.clone(),
                    affinity_timeout: service.affinity_timeout,
                    created: service.created,
                    local_policy: selection.local_policy,
                    topology: selection.topology,
                    source_ranges: if kind == FrontendKind::LoadBalancer && scope == Scope::External
                    {
                        service.source_ranges.clone()
                    } else {
                        Vec::new()
                    },
                }
            };
            frontends.push(make(
                cluster_ip,
                port.port,
                Scope::Internal,
                FrontendKind::ClusterIp,
                &sets.internal,
            ));

            let mut external_addresses: Vec<(IpAddr, u16, FrontendKind)> = Vec::new();
            if matches!(
                service.service_type,
                ServiceType::NodePort | ServiceType::LoadBalancer
            ) && let Some(node_port) = port.node_port
                && node.serves_node_port(node_port)
            {
                for &address in node
                    .addresses
                    .iter()
                    .filter(|a| AddressType::of(a) == family)
                {
                    external_addresses.push((address, node_port, FrontendKind::NodePort));
                }
            }
            let allowed = |a: &&IpAddr| {
                AddressType::of(a) == family && external_address_refusal(**a, node).is_none()
            };
            for &ip in service.external_ips.iter().filter(allowed) {
                external_addresses.push((ip, port.port, FrontendKind::ExternalIp));
            }
            for &ip in service.load_balancer_ips.iter().filter(allowed) {
                external_addresses.push((ip, port.port, FrontendKind::LoadBalancer));
            }
            for (ip, port_number, kind) in external_addresses {
                frontends.push(make(
                    ip,
                    port_number,
                    Scope::Internal,
                    kind,
                    &sets.internal_for_external,
                ));
                frontends.push(make(ip, port_number, Scope::External, kind, &sets.external));
            }
        }
    }
    // An address may be listed twice (an external IP that is also a node address):
    // the first listing wins, as the conflict rule between Services does.
    let mut seen = std::collections::BTreeSet::new();
    frontends.retain(|f| seen.insert(f.key));
    frontends
}

/// Ready endpoints of a Service on this node, for its health-check node port
/// (kube-proxy's service health server reports the same count).
pub fn local_ready_endpoints(slices: &[&SliceSpec], node: &NodeContext) -> usize {
    let mut addresses = std::collections::BTreeSet::new();
    for slice in slices {
        for ep in &slice.endpoints {
            if ep.ready
                && !node.name.is_empty()
                && ep.placement.node_name.as_deref() == Some(node.name.as_str())
            {
                addresses.insert(ep.address);
            }
        }
    }
    addresses.len()
}
