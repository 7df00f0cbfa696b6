//! The service model: Kubernetes Services and EndpointSlices in, the frontends the
//! datapath must serve out. Pure: no kernel, no I/O, so every rule is unit-tested.
//!
//! Semantics follow kube-proxy:
//! - one frontend per (ClusterIP, port, protocol) of a Service (per family for
//!   dual-stack Services);
//! - its backends are the ready endpoints of the Service's EndpointSlices (matched by the
//!   `kubernetes.io/service-name` label) for the slice port that carries the Service
//!   port's name and protocol; when no endpoint is ready, serving terminating endpoints
//!   are used (graceful termination), and with none of those the frontend exists with no
//!   backends so connections are refused at once;
//! - headless (`clusterIP: None`) and `ExternalName` Services have no frontend;
//! - a ClusterIP:port claimed by two Services goes to the one that had it first; the
//!   other is reported.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Serialize;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes protocol field (default TCP).
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::IPPROTO_TCP,
            Self::Udp => lb_common::IPPROTO_UDP,
            Self::Sctp => lb_common::IPPROTO_SCTP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::IPPROTO_TCP => Some(Self::Tcp),
            lb_common::IPPROTO_UDP => Some(Self::Udp),
            lb_common::IPPROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// Namespace and name of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the datapath matches on: a ClusterIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
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
    /// Sorted, without duplicates.
    pub backends: Vec<BackendAddr>,
    /// Endpoints still listed for this port but not chosen (not ready, or terminating
    /// while others are ready). Connections to them are left to drain; only sockets to
    /// endpoints that are gone altogether are terminated.
    pub retained: Vec<BackendAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
}

/// A validated Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: ObjectRef,
    /// Empty for headless and ExternalName Services (they get no frontend).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    Ipv4,
    Ipv6,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The endpoint's first address: like kube-proxy, only it is used (Kubernetes
    /// treats all of an endpoint's addresses as fungible).
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A validated EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub id: ObjectRef,
    pub service: ObjectRef,
    /// `None` for FQDN slices, which kube-proxy ignores.
    pub address_type: Option<AddressType>,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

fn port_number(value: i32, what: &str) -> Result<u16, String> {
    if (1..=65535).contains(&value) {
        Ok(value as u16)
    } else {
        Err(format!("{what} {value} is out of range (1-65535)"))
    }
}

/// An IANA service name as Kubernetes validates it (RFC 6335): 1-15 characters of
/// lowercase letters, digits and '-', at least one letter, no leading/trailing or
/// double '-'.
fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn object_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<ObjectRef, String> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| "metadata.name is missing".to_string())?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    Ok(ObjectRef { namespace, name })
}

impl ServiceSpec {
    /// Validates a Service. `Err` lists every problem found.
    pub fn from_k8s(service: &Service) -> Result<Self, Vec<String>> {
        let id = object_ref(&service.metadata).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        let Some(spec) = &service.spec else {
            return Err(vec!["spec is missing".into()]);
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        match service_type {
            "ClusterIP" | "NodePort" | "LoadBalancer" => {}
            "ExternalName" => {
                return Ok(Self {
                    id,
                    cluster_ips: Vec::new(),
                    ports: Vec::new(),
                });
            }
            other => errors.push(format!(
                "spec.type {other:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
            )),
        }

        let mut cluster_ips = Vec::new();
        let listed: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), single) if !ips.is_empty() => {
                if let Some(single) = single
                    && !single.is_empty()
                    && single != &ips[0]
                {
                    errors.push(format!(
                        "spec.clusterIP {single:?} differs from spec.clusterIPs[0] {:?}",
                        ips[0]
                    ));
                }
                ips.iter().map(String::as_str).collect()
            }
            (_, Some(single)) if !single.is_empty() => vec![single.as_str()],
            _ => {
                errors.push(
                    "spec.clusterIP is missing: the manifest source has no IP allocator, \
                     so every Service needs its ClusterIP written out (or \"None\" for a \
                     headless Service)"
                        .into(),
                );
                Vec::new()
            }
        };
        let headless = listed.first() == Some(&"None");
        if !headless {
            for (i, ip) in listed.iter().enumerate() {
                match ip.parse::<IpAddr>() {
                    Ok(ip) if ip.is_unspecified() => {
                        errors.push(format!("spec.clusterIPs[{i}] {ip} is unspecified"))
                    }
                    Ok(ip) => cluster_ips.push(ip),
                    Err(_) => {
                        errors.push(format!("spec.clusterIPs[{i}] {ip:?} is not an IP address"))
                    }
                }
            }
            if cluster_ips.len() == 2 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4() {
                errors.push("spec.clusterIPs holds two addresses of the same family".into());
            }
            if cluster_ips.len() > 2 {
                errors.push("spec.clusterIPs holds more than two addresses".into());
            }
        }

        let mut ports = Vec::new();
        let declared = spec.ports.as_deref().unwrap_or_default();
        if declared.is_empty() && !headless {
            errors.push("spec.ports is empty".into());
        }
        let mut seen_names = BTreeSet::new();
        let mut seen_ports = BTreeSet::new();
        for (i, port) in declared.iter().enumerate() {
            let what = format!("spec.ports[{i}]");
            let name = port.name.clone().unwrap_or_default();
            if declared.len() > 1 && name.is_empty() {
                errors.push(format!(
                    "{what}.name is required when a Service has several ports"
                ));
            }
            if !seen_names.insert(name.clone()) && !name.is_empty() {
                errors.push(format!("{what}.name {name:?} is used twice"));
            }
            let number = match port_number(port.port, &format!("{what}.port")) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let protocol = match Protocol::parse(port.protocol.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(format!("{what}: {e}"));
                    continue;
                }
            };
            if !seen_ports.insert((number, protocol)) {
                errors.push(format!(
                    "{what}: port {number}/{protocol} is declared twice"
                ));
            }
            let target_port = match &port.target_port {
                None => TargetPort::Number(number),
                Some(IntOrString::Int(n)) => match port_number(*n, &format!("{what}.targetPort")) {
                    Ok(n) => TargetPort::Number(n),
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                },
                Some(IntOrString::String(s)) => {
                    // YAML `targetPort: "8080"` is a number written as a string.
                    if let Ok(n) = s.parse::<i32>() {
                        match port_number(n, &format!("{what}.targetPort")) {
                            Ok(n) => TargetPort::Number(n),
                            Err(e) => {
                                errors.push(e);
                                continue;
                            }
                        }
                    } else if valid_port_name(s) {
                        TargetPort::Name(s.clone())
                    } else {
                        errors.push(format!(
                            "{what}.targetPort {s:?} is neither a port number nor a valid port name"
                        ));
                        continue;
                    }
                }
            };
            ports.push(ServicePortSpec {
                name,
                port: number,
                protocol,
                target_port,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            id,
            cluster_ips,
            ports,
        })
    }
}

impl SliceSpec {
    /// Validates an EndpointSlice. `Ok(None)` for a slice that belongs to no Service
    /// (no `kubernetes.io/service-name` label): kube-proxy ignores those too.
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Option<Self>, Vec<String>> {
        let id = object_ref(&slice.metadata).map_err(|e| vec![e])?;
        let Some(service_name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|n| !n.is_empty())
        else {
            return Ok(None);
        };
        let service = ObjectRef::new(id.namespace.clone(), service_name.clone());
        let mut errors = Vec::new();
        let address_type = match slice.address_type.as_str() {
            "IPv4" => Some(AddressType::Ipv4),
            "IPv6" => Some(AddressType::Ipv6),
            "FQDN" => None,
            other => {
                errors.push(format!(
                    "addressType {other:?} is not one of IPv4, IPv6, FQDN"
                ));
                None
            }
        };
        let mut ports = Vec::new();
        for (i, port) in slice
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let what = format!("ports[{i}]");
            let Some(number) = port.port else {
                // A nil port means "all ports"; only meaningful for headless Services.
                continue;
            };
            let number = match port_number(number, &format!("{what}.port")) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            match Protocol::parse(port.protocol.as_deref()) {
                Ok(protocol) => ports.push(SlicePort {
                    name: port.name.clone().unwrap_or_default(),
                    port: number,
                    protocol,
                }),
                Err(e) => errors.push(format!("{what}: {e}")),
            }
        }
        let mut endpoints = Vec::new();
        if let Some(address_type) = address_type {
            for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
                let mut addresses = Vec::new();
                for (j, address) in endpoint.addresses.iter().enumerate() {
                    match address.parse::<IpAddr>() {
                        Ok(ip) if ip.is_ipv4() == (address_type == AddressType::Ipv4) => {
                            addresses.push(ip)
                        }
                        Ok(ip) => errors.push(format!(
                            "endpoints[{i}].addresses[{j}] {ip} does not match addressType {}",
                            slice.address_type
                        )),
                        Err(_) => errors.push(format!(
                            "endpoints[{i}].addresses[{j}] {address:?} is not an IP address"
                        )),
                    }
                }
                let Some(&address) = addresses.first() else {
                    if endpoint.addresses.is_empty() {
                        errors.push(format!("endpoints[{i}].addresses is empty"));
                    }
                    continue;
                };
                let conditions = endpoint.conditions.clone().unwrap_or_default();
                // Kubernetes: a nil `ready` means ready; nil `serving` follows `ready`.
                let ready = conditions.ready.unwrap_or(true);
                endpoints.push(SliceEndpoint {
                    address,
                    ready,
                    serving: conditions.serving.unwrap_or(ready),
                    terminating: conditions.terminating.unwrap_or(false),
                });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Some(Self {
            id,
            service,
            address_type,
            ports,
            endpoints,
        }))
    }

    /// The slice port that serves `service_port`: Kubernetes names slice ports after
    /// the Service port; hand-written slices may instead use the target port's name.
    fn port_for(&self, service_port: &ServicePortSpec) -> Option<u16> {
        let by_service_name = self
            .ports
            .iter()
            .find(|p| p.name == service_port.name && p.protocol == service_port.protocol);
        let by_target_name = || match &service_port.target_port {
            TargetPort::Name(target) => self
                .ports
                .iter()
                .find(|p| &p.name == target && p.protocol == service_port.protocol),
            TargetPort::Number(_) => None,
        };
        by_service_name.or_else(by_target_name).map(|p| p.port)
    }
}

/// Computes the frontends of one Service from its slices (any order).
pub fn service_frontends(service: &ServiceSpec, slices: &[&SliceSpec]) -> Vec<Frontend> {
    let mut frontends = Vec::new();
    for &cluster_ip in &service.cluster_ips {
        let family = if cluster_ip.is_ipv4() {
            AddressType::Ipv4
        } else {
            AddressType::Ipv6
        };
        for port in &service.ports {
            let mut ready = BTreeSet::new();
            let mut terminating = BTreeSet::new();
            let mut listed = BTreeSet::new();
            for slice in slices.iter().filter(|s| s.address_type == Some(family)) {
                let Some(target) = slice.port_for(port) else {
                    continue;
                };
                for endpoint in &slice.endpoints {
                    let backend = BackendAddr {
                        ip: endpoint.address,
                        port: target,
                    };
                    listed.insert(backend);
                    let set = if endpoint.ready {
                        &mut ready
                    } else if endpoint.serving && endpoint.terminating {
                        &mut terminating
                    } else {
                        continue;
                    };
                    set.insert(backend);
                }
            }
            let chosen = if ready.is_empty() { terminating } else { ready };
            let retained = listed.difference(&chosen).copied().collect();
            frontends.push(Frontend {
                key: FrontendKey {
                    ip: cluster_ip,
                    port: port.port,
                    protocol: port.protocol,
                },
                service: service.id.clone(),
                port_name: port.name.clone(),
                backends: chosen.into_iter().collect(),
                retained,
            });
        }
    }
    frontends
}

/// A problem to report about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub service: ObjectRef,
    pub key: FrontendKey,
    pub owner: ObjectRef,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Service {}: {} is already served by Service {}; this port is skipped until that changes",
            self.service, self.key, self.owner
        )
    }
}

/// The whole desired state, updated incrementally: only Services whose objects changed
/// are recomputed.
#[derive(Debug, Default)]
pub struct Model {
    // Shared with the source that parsed them: one copy of every object in memory.
    services: BTreeMap<ObjectRef, Arc<ServiceSpec>>,
    slices: BTreeMap<ObjectRef, Arc<SliceSpec>>,
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<ObjectRef>>,
    frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
    owned: BTreeMap<ObjectRef, BTreeSet<FrontendKey>>,
    /// Services that want a key another Service holds.
    waiting: BTreeMap<FrontendKey, BTreeSet<ObjectRef>>,
    dirty: BTreeSet<ObjectRef>,
}

/// The outcome of [`Model::recompute`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Frontends added or changed (`Some`) or removed (`None`).
    pub frontends: BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
    /// ClusterIP:port conflicts found (reported, not applied).
    pub conflicts: Vec<Conflict>,
}

impl Model {
    pub fn frontends(&self) -> &BTreeMap<FrontendKey, Arc<Frontend>> {
        &self.frontends
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    pub fn upsert_service(&mut self, spec: Arc<ServiceSpec>) {
        if self.services.get(&spec.id) != Some(&spec) {
            self.dirty.insert(spec.id.clone());
            self.services.insert(spec.id.clone(), spec);
        }
    }

    pub fn remove_service(&mut self, id: &ObjectRef) {
        if self.services.remove(id).is_some() {
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
            self.unlink_slice(id, &service);
        }
    }

    fn unlink_slice(&mut self, id: &ObjectRef, service: &ObjectRef) {
        self.slices.remove(id);
        if let Some(set) = self.slices_by_service.get_mut(service) {
            set.remove(id);
            if set.is_empty() {
                self.slices_by_service.remove(service);
            }
        }
        self.dirty.insert(service.clone());
    }

    /// Recomputes every Service touched since the last call.
    pub fn recompute(&mut self) -> Changes {
        let mut changes = Changes::default();
        let mut queue: BTreeSet<ObjectRef> = std::mem::take(&mut self.dirty);
        // A released key can unblock a waiting Service, which is then recomputed too.
        // Each round only removes waiters, so this terminates.
        while let Some(id) = queue.pop_first() {
            let wanted = match self.services.get(&id) {
                Some(spec) => {
                    let slices: Vec<&SliceSpec> = self
                        .slices_by_service
                        .get(&id)
                        .into_iter()
                        .flatten()
                        .filter_map(|s| self.slices.get(s).map(|s| s.as_ref()))
                        .collect();
                    service_frontends(spec, &slices)
                }
                None => Vec::new(),
            };
            let wanted_keys: BTreeSet<FrontendKey> = wanted.iter().map(|f| f.key).collect();

            // Drop frontends this Service no longer declares, and its stale waits.
            let previously = self.owned.remove(&id).unwrap_or_default();
            for key in previously.difference(&wanted_keys) {
                self.frontends.remove(key);
                changes.frontends.insert(*key, None);
                if let Some(waiters) = self.waiting.remove(key) {
                    queue.extend(waiters);
                }
            }
            self.waiting.retain(|key, waiters| {
                if !wanted_keys.contains(key) {
                    waiters.remove(&id);
                }
                !waiters.is_empty()
            });

            let mut owned = BTreeSet::new();
            for frontend in wanted {
                let key = frontend.key;
                match self.frontends.get(&key) {
                    Some(existing) if existing.service != id => {
                        changes.conflicts.push(Conflict {
                            service: id.clone(),
                            key,
                            owner: existing.service.clone(),
                        });
                        self.waiting.entry(key).or_default().insert(id.clone());
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
        changes
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn service_yaml(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("valid Service YAML")
    }

    /// (address, ready, serving, terminating)
    type TestEndpoint<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

    fn redis_service() -> ServiceSpec {
        ServiceSpec::from_k8s(&service_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: redis-master, namespace: pods}
spec:
  clusterIP: 10.96.0.100
  ports: [{port: 6379, targetPort: 6379}]
"#,
        ))
        .unwrap()
    }

    fn slice(
        name: &str,
        service: &str,
        ports: &[(&str, i32, &str)],
        endpoints: &[TestEndpoint],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("pods".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..Default::default()
            },
            address_type: if endpoints.first().is_some_and(|e| e.0.contains(':')) {
                "IPv6"
            } else {
                "IPv4"
            }
            .into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, proto)| EndpointPort {
                        name: Some(name.to_string()),
                        port: Some(*port),
                        protocol: Some(proto.to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(ip, ready, serving, terminating)| Endpoint {
                        addresses: vec![ip.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: *serving,
                            terminating: *terminating,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn slice_spec(s: EndpointSlice) -> SliceSpec {
        SliceSpec::from_k8s(&s).unwrap().unwrap()
    }

    fn backend(ip: &str, port: u16) -> BackendAddr {
        BackendAddr {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn ready_endpoints_become_backends() {
        let svc = redis_service();
        let s = slice_spec(slice(
            "redis-abc",
            "redis-master",
            &[("", 6379, "TCP")],
            &[
                ("10.244.1.11", None, None, None),
                ("10.244.1.12", Some(true), None, None),
                ("10.244.1.13", Some(false), Some(false), None),
            ],
        ));
        let fe = service_frontends(&svc, &[&s]);
        assert_eq!(fe.len(), 1);
        assert_eq!(fe[0].key.to_string(), "10.96.0.100:6379/TCP");
        assert_eq!(
            fe[0].backends,
            vec![backend("10.244.1.11", 6379), backend("10.244.1.12", 6379)]
        );
    }

    #[test]
    fn terminating_endpoints_are_a_fallback_only() {
        let svc = redis_service();
        let only_terminating = slice_spec(slice(
            "s",
            "redis-master",
            &[("", 6379, "TCP")],
            &[
                ("10.244.1.11", Some(false), Some(true), Some(true)),
                ("10.244.1.12", Some(false), Some(false), Some(true)),
            ],
        ));
        assert_eq!(
            service_frontends(&svc, &[&only_terminating])[0].backends,
            vec![backend("10.244.1.11", 6379)]
        );
        let mixed = slice_spec(slice(
            "s",
            "redis-master",
            &[("", 6379, "TCP")],
            &[
                ("10.244.1.11", Some(false), Some(true), Some(true)),
                ("10.244.1.12", Some(true), None, None),
            ],
        ));
        let fe = &service_frontends(&svc, &[&mixed])[0];
        assert_eq!(fe.backends, vec![backend("10.244.1.12", 6379)]);
        // The terminating one is still listed: its connections may drain.
        assert_eq!(fe.retained, vec![backend("10.244.1.11", 6379)]);
    }

    #[test]
    fn no_slices_means_a_frontend_without_backends() {
        let fe = service_frontends(&redis_service(), &[]);
        assert_eq!(fe.len(), 1);
        assert!(fe[0].backends.is_empty());
    }

    #[test]
    fn multi_port_service_matches_slice_ports_by_name_and_protocol() {
        let svc = ServiceSpec::from_k8s(&service_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
  - {name: metrics, port: 9153, protocol: TCP, targetPort: 9153}
"#,
        ))
        .unwrap();
        let mut s = slice(
            "kube-dns-x",
            "kube-dns",
            &[
                ("dns", 5353, "UDP"),
                ("dns-tcp", 5354, "TCP"),
                ("metrics", 9153, "TCP"),
            ],
            &[("10.244.1.20", None, None, None)],
        );
        s.metadata.namespace = Some("kube-system".into());
        let s = slice_spec(s);
        let fe = service_frontends(&svc, &[&s]);
        let got: Vec<(String, u16)> = fe
            .iter()
            .map(|f| (f.key.to_string(), f.backends[0].port))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.96.0.10:53/UDP".to_string(), 5353),
                ("10.96.0.10:53/TCP".to_string(), 5354),
                ("10.96.0.10:9153/TCP".to_string(), 9153),
            ]
        );
    }

    #[test]
    fn named_target_port_resolves_per_slice() {
        // test-svc from the seed: targetPort is a name; two pods serve it on different
        // numbers, so Kubernetes writes two slices.
        let svc = ServiceSpec::from_k8s(&service_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: test-svc, namespace: pods}
spec:
  clusterIP: 10.96.0.80
  ports: [{port: 80, targetPort: web-port}]
"#,
        ))
        .unwrap();
        assert_eq!(
            svc.ports[0].target_port,
            TargetPort::Name("web-port".into())
        );
        // Kubernetes-style: slice ports carry the Service port's name ("").
        let a = slice_spec(slice(
            "test-svc-a",
            "test-svc",
            &[("", 8080, "TCP")],
            &[("10.244.1.31", None, None, None)],
        ));
        // Hand-written style: slice ports named after the target port.
        let b = slice_spec(slice(
            "test-svc-b",
            "test-svc",
            &[("web-port", 9090, "TCP")],
            &[("10.244.1.32", None, None, None)],
        ));
        let fe = service_frontends(&svc, &[&a, &b]);
        assert_eq!(
            fe[0].backends,
            vec![backend("10.244.1.31", 8080), backend("10.244.1.32", 9090)]
        );
    }

    #[test]
    fn dual_stack_service_gets_a_frontend_per_family() {
        let svc = ServiceSpec::from_k8s(&service_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: pods}
spec:
  clusterIP: 10.96.0.90
  clusterIPs: [10.96.0.90, "fd00:96::90"]
  ipFamilies: [IPv4, IPv6]
  ports: [{port: 80, targetPort: 8080}]
"#,
        ))
        .unwrap();
        let v4 = slice_spec(slice(
            "web-v4",
            "web",
            &[("", 8080, "TCP")],
            &[("10.244.1.40", None, None, None)],
        ));
        let v6 = slice_spec(slice(
            "web-v6",
            "web",
            &[("", 8080, "TCP")],
            &[("fd00:244::40", None, None, None)],
        ));
        let fe = service_frontends(&svc, &[&v4, &v6]);
        assert_eq!(fe.len(), 2);
        assert_eq!(fe[0].backends, vec![backend("10.244.1.40", 8080)]);
        assert_eq!(fe[1].key.to_string(), "[fd00:96::90]:80/TCP");
        assert_eq!(fe[1].backends, vec![backend("fd00:244::40", 8080)]);
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontends() {
        for yaml in [
            "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}",
            "apiVersion: v1\nkind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: example.com}",
        ] {
            let svc = ServiceSpec::from_k8s(&service_yaml(yaml)).unwrap();
            assert!(service_frontends(&svc, &[]).is_empty(), "{yaml}");
        }
    }

    #[test]
    fn invalid_services_list_every_problem() {
        let svc = service_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  clusterIP: 10.96.0.300
  ports:
  - {name: a, port: 70000}
  - {name: b, port: 53, protocol: ICMP}
  - {port: 80, targetPort: "Not_A_Name"}
"#,
        );
        let errors = ServiceSpec::from_k8s(&svc).unwrap_err();
        let text = errors.join("\n");
        assert!(
            text.contains("\"10.96.0.300\" is not an IP address"),
            "{text}"
        );
        assert!(
            text.contains("spec.ports[0].port 70000 is out of range"),
            "{text}"
        );
        assert!(text.contains("unknown protocol \"ICMP\""), "{text}");
        assert!(text.contains("spec.ports[2].name is required"), "{text}");
        assert!(
            text.contains("neither a port number nor a valid port name"),
            "{text}"
        );
    }

    #[test]
    fn missing_cluster_ip_is_explained() {
        let svc = service_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 80}]}",
        );
        let errors = ServiceSpec::from_k8s(&svc).unwrap_err();
        assert!(errors[0].contains("no IP allocator"), "{errors:?}");
    }

    #[test]
    fn slices_are_validated() {
        let mut s = slice(
            "s",
            "svc",
            &[("", 0, "TCP")],
            &[("10.244.1.1", None, None, None)],
        );
        s.endpoints.as_mut().unwrap().push(Endpoint {
            addresses: vec!["fd00::1".into(), "nonsense".into()],
            ..Default::default()
        });
        let errors = SliceSpec::from_k8s(&s).unwrap_err().join("\n");
        assert!(
            errors.contains("ports[0].port 0 is out of range"),
            "{errors}"
        );
        assert!(
            errors.contains("fd00::1 does not match addressType IPv4"),
            "{errors}"
        );
        assert!(
            errors.contains("\"nonsense\" is not an IP address"),
            "{errors}"
        );
        // No service-name label: not ours, silently ignored like kube-proxy does.
        let mut unowned = slice("s", "svc", &[("", 80, "TCP")], &[]);
        unowned.metadata.labels = None;
        assert_eq!(SliceSpec::from_k8s(&unowned).unwrap(), None);
    }

    #[test]
    fn model_reports_only_what_changed() {
        let mut model = Model::default();
        model.upsert_service(Arc::new(redis_service()));
        let s = slice_spec(slice(
            "redis-abc",
            "redis-master",
            &[("", 6379, "TCP")],
            &[("10.244.1.11", None, None, None)],
        ));
        model.upsert_slice(Arc::new(s.clone()));
        let changes = model.recompute();
        assert_eq!(changes.frontends.len(), 1);
        // Same objects again: nothing to do.
        model.upsert_service(Arc::new(redis_service()));
        model.upsert_slice(Arc::new(s.clone()));
        assert!(model.recompute().frontends.is_empty());
        // An endpoint moves: one changed frontend with the new backend.
        let moved = slice_spec(slice(
            "redis-abc",
            "redis-master",
            &[("", 6379, "TCP")],
            &[("10.244.1.99", None, None, None)],
        ));
        model.upsert_slice(Arc::new(moved));
        let changes = model.recompute();
        let fe = changes.frontends.values().next().unwrap().as_ref().unwrap();
        assert_eq!(fe.backends, vec![backend("10.244.1.99", 6379)]);
        // The Service goes: its frontend is removed.
        model.remove_service(&ObjectRef::new("pods", "redis-master"));
        let changes = model.recompute();
        assert_eq!(changes.frontends.values().collect::<Vec<_>>(), vec![&None]);
        assert!(model.frontends().is_empty());
    }

    #[test]
    fn duplicate_cluster_ip_port_keeps_the_incumbent_until_it_leaves() {
        let mut model = Model::default();
        model.upsert_service(Arc::new(redis_service()));
        model.recompute();
        let mut impostor = redis_service();
        impostor.id = ObjectRef::new("pods", "aaa-first-alphabetically");
        model.upsert_service(Arc::new(impostor.clone()));
        let changes = model.recompute();
        assert!(changes.frontends.is_empty());
        assert_eq!(changes.conflicts.len(), 1);
        assert_eq!(
            changes.conflicts[0].owner,
            ObjectRef::new("pods", "redis-master")
        );
        assert_eq!(
            model.frontends().values().next().unwrap().service.name,
            "redis-master"
        );
        // The incumbent leaves: the waiting Service takes over in the same recompute.
        model.remove_service(&ObjectRef::new("pods", "redis-master"));
        let changes = model.recompute();
        assert_eq!(changes.frontends.len(), 1);
        let fe = changes.frontends.values().next().unwrap().as_ref().unwrap();
        assert_eq!(fe.service, impostor.id);
    }

    #[test]
    fn slice_moving_between_services_updates_both() {
        let mut model = Model::default();
        model.upsert_service(Arc::new(redis_service()));
        let mut other = redis_service();
        other.id = ObjectRef::new("pods", "other");
        other.cluster_ips = vec!["10.96.0.101".parse().unwrap()];
        model.upsert_service(Arc::new(other));
        model.upsert_slice(Arc::new(slice_spec(slice(
            "s",
            "redis-master",
            &[("", 6379, "TCP")],
            &[("10.244.1.11", None, None, None)],
        ))));
        model.recompute();
        model.upsert_slice(Arc::new(slice_spec(slice(
            "s",
            "other",
            &[("", 6379, "TCP")],
            &[("10.244.1.11", None, None, None)],
        ))));
        let changes = model.recompute();
        let by_ip: BTreeMap<String, usize> = changes
            .frontends
            .iter()
            .map(|(k, f)| (k.ip.to_string(), f.as_ref().unwrap().backends.len()))
            .collect();
        assert_eq!(
            by_ip,
            BTreeMap::from([("10.96.0.100".into(), 0), ("10.96.0.101".into(), 1)])
        );
    }
}
