//! Validated, compact forms of the Kubernetes objects the model reads: what a Service,
//! an EndpointSlice and this node's Node say that matters to a service proxy, and
//! nothing else (no managedFields, no unused annotations), so memory follows the size
//! of the datapath, not of the API objects.
//!
//! Validation collects every problem of an object at once, so one log line tells an
//! operator everything to fix.

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Serialize;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the proxy that owns a Service (kube-proxy skips Services carrying it).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Annotation the EndpointSlice controller sets to when the change that caused the
/// slice's last update happened (kube-proxy's network programming latency starts there).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Annotation asking for topology-aware routing (and its deprecated spelling).
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
/// The node label holding its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Annotation form of `loadBalancerSourceRanges`, honoured when the field is empty.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// Default and largest `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

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

/// Namespace and name of a Kubernetes object. Shared strings: the model, the
/// reconciler and the sources key a dozen maps by object, and a cloned key costs two
/// reference counts instead of two allocations.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// An address prefix (`loadBalancerSourceRanges`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> u128 {
            match ip.to_canonical() {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
                IpAddr::V6(v6) => u128::from(v6),
            }
        };
        if self.addr.to_canonical().is_ipv4() != ip.to_canonical().is_ipv4() {
            return false;
        }
        // IPv4 sits in the top 32 bits, so the prefix length masks both families.
        let width = u32::from(self.prefix);
        if width == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - width);
        bits(self.addr) & mask == bits(ip) & mask
    }
}

/// Why `ip` can be neither a Service's address nor a pod's: it means this host, no
/// host, or a group of hosts, so translating it would capture traffic every process
/// of the node sends to itself or to its link.
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_multicast() {
        return Some("a multicast address");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        _ => None,
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
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
    /// Set for NodePort and LoadBalancer Services (allocated by the API server, or
    /// spelled out in a manifest).
    pub node_port: Option<u16>,
}

/// A validated Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: ObjectRef,
    pub service_type: ServiceType,
    /// Empty for headless and ExternalName Services (they get no frontend).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (those not in `ipMode: Proxy`).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (or its annotation); empty = everyone.
    pub source_ranges: Vec<Cidr>,
    /// `sessionAffinity: ClientIP` with its timeout in seconds; `None` = no affinity.
    pub affinity_timeout: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (only meaningful for externally reachable types).
    pub external_local: bool,
    pub health_check_node_port: Option<u16>,
    /// `spec.trafficDistribution` or the topology-mode annotation, for display: the
    /// EndpointSlice controller turns it into hints, and hints decide (as in kube-proxy).
    pub traffic_distribution: Option<String>,
    /// `metadata.creationTimestamp` (Unix seconds): the older of two Services wanting
    /// one address wins it, the same way before and after a restart.
    pub created: Option<i64>,
}

impl ServiceSpec {
    /// Whether traffic from outside the node can reach it (node ports, LB and external IPs).
    pub fn externally_reachable(&self) -> bool {
        matches!(
            self.service_type,
            ServiceType::NodePort | ServiceType::LoadBalancer
        ) || !self.external_ips.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressType {
    Ipv4,
    Ipv6,
}

impl AddressType {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::Ipv4 } else { Self::Ipv6 }
    }
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
    /// Shared with every endpoint placed alike ([`Placement::interned`]).
    pub placement: Arc<Placement>,
}

/// Where an endpoint runs and the topology hints it carries. A million endpoints name
/// a few hundred nodes and zones, so each distinct placement is held once: 32 bytes
/// an endpoint instead of about 150.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Placement {
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones[].name`; empty = no zone hints.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`; empty = no node hints.
    pub node_hints: Vec<String>,
}

/// The placements in use, each once.
static PLACEMENTS: Mutex<Option<Interned>> = Mutex::new(None);

#[derive(Default)]
struct Interned {
    set: HashSet<Arc<Placement>>,
    /// Size after the last sweep of placements no endpoint holds any more.
    swept: usize,
}

impl Placement {
    /// The shared copy of `self`.
    pub fn interned(self) -> Arc<Placement> {
        let mut guard = PLACEMENTS.lock().unwrap_or_else(|e| e.into_inner());
        let interned = guard.get_or_insert_with(Interned::default);
        if let Some(shared) = interned.set.get(&self) {
            return shared.clone();
        }
        // Amortized: sweep once the set has doubled since the last sweep, so nodes
        // that came and went do not pile up.
        if interned.set.len() >= 2 * interned.swept.max(512) {
            interned.set.retain(|p| Arc::strong_count(p) > 1);
            interned.swept = interned.set.len();
        }
        let shared = Arc::new(self);
        interned.set.insert(shared.clone());
        shared
    }
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
    /// `endpoints.kubernetes.io/last-change-trigger-time`.
    pub trigger_time: Option<SystemTime>,
}

/// What the model needs of this node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeSpec {
    pub name: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// InternalIP and ExternalIP addresses from the Node's status.
    pub addresses: Vec<IpAddr>,
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

/// Namespace and name; cluster-scoped objects (Node) have no namespace.
pub fn object_ref(meta: &ObjectMeta, namespaced: bool) -> Result<ObjectRef, String> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| "metadata.name is missing".to_string())?;
    let namespace = if namespaced {
        meta.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string())
    } else {
        String::new()
    };
    Ok(ObjectRef::new(namespace, name))
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Why kube-proxy would not serve this Service or read this EndpointSlice, if so:
/// another proxy owns it, or it is marked headless. kube-proxy filters Services and
/// slices alike by both labels (the EndpointSlice controller puts the headless one
/// on slices of headless Services; on a Service it hides a ClusterIP from proxies).
pub fn service_ignored(meta: &ObjectMeta) -> Option<String> {
    if let Some(proxy) = label(meta, SERVICE_PROXY_NAME_LABEL) {
        return Some(format!(
            "has label {SERVICE_PROXY_NAME_LABEL}={proxy:?}: another proxy serves it; ignored"
        ));
    }
    label(meta, HEADLESS_LABEL)
        .map(|_| format!("has label {HEADLESS_LABEL}: proxies leave it to DNS; ignored"))
}

/// Why kube-proxy would not read this EndpointSlice, if so.
pub fn slice_ignored(meta: &ObjectMeta) -> Option<String> {
    if let Some(why) = service_ignored(meta) {
        return Some(why);
    }
    match label(meta, SERVICE_NAME_LABEL) {
        Some(name) if !name.is_empty() => None,
        _ => Some(format!(
            "has no {SERVICE_NAME_LABEL} label, so it belongs to no Service; ignored"
        )),
    }
}

fn parse_ips(values: &[String], what: &str, errors: &mut Vec<String>) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for (i, value) in values.iter().enumerate() {
        match value.parse::<IpAddr>() {
            Ok(ip) if special_address(ip).is_some() => errors.push(format!(
                "{what}[{i}] {ip} is {}, never a Service address",
                special_address(ip).unwrap_or_default()
            )),
            // An IPv4-mapped IPv6 address is its IPv4 twin, in the kernel's keys too.
            Ok(ip) => ips.push(ip.to_canonical()),
            Err(_) => errors.push(format!("{what}[{i}] {value:?} is not an IP address")),
        }
    }
    ips
}

impl ServiceSpec {
    /// Validates a Service. `Ok(None)` for a Service another proxy owns; `Err` lists
    /// every problem found.
    pub fn from_k8s(service: &Service) -> Result<Option<Self>, Vec<String>> {
        let id = object_ref(&service.metadata, true).map_err(|e| vec![e])?;
        if service_ignored(&service.metadata).is_some() {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let Some(spec) = &service.spec else {
            return Err(vec!["spec is missing".into()]);
        };
        let service_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
            "ClusterIP" => ServiceType::ClusterIP,
            "NodePort" => ServiceType::NodePort,
            "LoadBalancer" => ServiceType::LoadBalancer,
            "ExternalName" => ServiceType::ExternalName,
            other => {
                errors.push(format!(
                    "spec.type {other:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
                ));
                ServiceType::ClusterIP
            }
        };
        let mut this = Self {
            id,
            service_type,
            cluster_ips: Vec::new(),
            ports: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            affinity_timeout: None,
            internal_local: false,
            external_local: false,
            health_check_node_port: None,
            traffic_distribution: None,
            created: service
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
        };
        if service_type == ServiceType::ExternalName {
            // A DNS alias: nothing for a proxy to do.
            return if errors.is_empty() {
                Ok(Some(this))
            } else {
                Err(errors)
            };
        }

        let listed: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
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
                ips.clone()
            }
            (_, Some(single)) if !single.is_empty() => vec![single.clone()],
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
        let headless = listed.first().map(String::as_str) == Some("None");
        if !headless {
            this.cluster_ips = parse_ips(&listed, "spec.clusterIPs", &mut errors);
            let ips = &this.cluster_ips;
            if ips.len() == 2 && ips[0].is_ipv4() == ips[1].is_ipv4() {
                errors.push("spec.clusterIPs holds two addresses of the same family".into());
            }
            if ips.len() > 2 {
                errors.push("spec.clusterIPs holds more than two addresses".into());
            }
        }

        let declared = spec.ports.as_deref().unwrap_or_default();
        if declared.is_empty() && !headless {
            errors.push("spec.ports is empty".into());
        }
        let mut seen_names = BTreeSet::new();
        let mut seen_ports = BTreeSet::new();
        for (i, port) in declared.iter().enumerate() {
            if let Some(parsed) = Self::port(
                i,
                port,
                declared.len(),
                &mut seen_names,
                &mut seen_ports,
                &mut errors,
            ) {
                if parsed.node_port.is_some() && service_type == ServiceType::ClusterIP {
                    errors.push(format!(
                        "spec.ports[{i}].nodePort is set but spec.type is ClusterIP (use NodePort or LoadBalancer)"
                    ));
                }
                this.ports.push(parsed);
            }
        }

        this.external_ips = parse_ips(
            spec.external_ips.as_deref().unwrap_or_default(),
            "spec.externalIPs",
            &mut errors,
        );
        if service_type == ServiceType::LoadBalancer {
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_deref())
                .unwrap_or_default();
            for (i, entry) in ingress.iter().enumerate() {
                // ipMode Proxy: the load balancer proxies, packets arrive for the node.
                if entry.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                if let Some(ip) = &entry.ip {
                    this.load_balancer_ips.extend(parse_ips(
                        std::slice::from_ref(ip),
                        &format!("status.loadBalancer.ingress[{i}].ip"),
                        &mut errors,
                    ));
                }
            }
        }
        let ranges: Vec<String> = match spec.load_balancer_source_ranges.as_deref() {
            Some(ranges) if !ranges.is_empty() => ranges.to_vec(),
            _ => annotation(&service.metadata, SOURCE_RANGES_ANNOTATION)
                .map(|a| {
                    a.split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        };
        for (i, range) in ranges.iter().enumerate() {
            match Cidr::parse(range) {
                Ok(cidr) => this.source_ranges.push(cidr),
                Err(e) => errors.push(format!("spec.loadBalancerSourceRanges[{i}]: {e}")),
            }
        }

        match spec.session_affinity.as_deref().unwrap_or("None") {
            "None" => {}
            "ClientIP" => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
                if !(1..=MAX_AFFINITY_TIMEOUT as i32).contains(&timeout) {
                    errors.push(format!(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds {timeout} is out of range (1-{MAX_AFFINITY_TIMEOUT})"
                    ));
                } else {
                    this.affinity_timeout = Some(timeout as u32);
                }
            }
            other => errors.push(format!(
                "spec.sessionAffinity {other:?} is not one of None, ClientIP"
            )),
        }
        this.internal_local = match spec.internal_traffic_policy.as_deref().unwrap_or("Cluster") {
            "Cluster" => false,
            "Local" => true,
            other => {
                errors.push(format!(
                    "spec.internalTrafficPolicy {other:?} is not one of Cluster, Local"
                ));
                false
            }
        };
        this.external_local = match spec.external_traffic_policy.as_deref().unwrap_or("Cluster") {
            // "Global" is the pre-1.22 spelling of Cluster.
            "Cluster" | "Global" => false,
            "Local" => true,
            other => {
                errors.push(format!(
                    "spec.externalTrafficPolicy {other:?} is not one of Cluster, Local"
                ));
                false
            }
        };
        if let Some(port) = spec.health_check_node_port.filter(|p| *p != 0) {
            match port_number(port, "spec.healthCheckNodePort") {
                Ok(port) => this.health_check_node_port = Some(port),
                Err(e) => errors.push(e),
            }
        }
        this.traffic_distribution = spec.traffic_distribution.clone().or_else(|| {
            annotation(&service.metadata, TOPOLOGY_MODE_ANNOTATION)
                .or_else(|| annotation(&service.metadata, TOPOLOGY_HINTS_ANNOTATION))
                .filter(|mode| !mode.eq_ignore_ascii_case("disabled"))
                .map(|mode| format!("topology-mode={mode}"))
        });

        if errors.is_empty() {
            // Held for the object's life: no spare capacity (a Vec starts at four).
            this.cluster_ips.shrink_to_fit();
            this.ports.shrink_to_fit();
            this.external_ips.shrink_to_fit();
            this.load_balancer_ips.shrink_to_fit();
            this.source_ranges.shrink_to_fit();
            Ok(Some(this))
        } else {
            Err(errors)
        }
    }

    fn port(
        i: usize,
        port: &k8s_openapi::api::core::v1::ServicePort,
        count: usize,
        seen_names: &mut BTreeSet<String>,
        seen_ports: &mut BTreeSet<(u16, Protocol)>,
        errors: &mut Vec<String>,
    ) -> Option<ServicePortSpec> {
        let what = format!("spec.ports[{i}]");
        let name = port.name.clone().unwrap_or_default();
        if count > 1 && name.is_empty() {
            errors.push(format!(
                "{what}.name is required when a Service has several ports"
            ));
        }
        if !seen_names.insert(name.clone()) && !name.is_empty() {
            errors.push(format!("{what}.name {name:?} is used twice"));
        }
        let number = port_number(port.port, &format!("{what}.port"))
            .map_err(|e| errors.push(e))
            .ok()?;
        let protocol = Protocol::parse(port.protocol.as_deref())
            .map_err(|e| errors.push(format!("{what}: {e}")))
            .ok()?;
        if !seen_ports.insert((number, protocol)) {
            errors.push(format!(
                "{what}: port {number}/{protocol} is declared twice"
            ));
        }
        let node_port = match port.node_port.filter(|p| *p != 0) {
            Some(p) => Some(
                port_number(p, &format!("{what}.nodePort"))
                    .map_err(|e| errors.push(e))
                    .ok()?,
            ),
            None => None,
        };
        let target_port = match &port.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => TargetPort::Number(
                port_number(*n, &format!("{what}.targetPort"))
                    .map_err(|e| errors.push(e))
                    .ok()?,
            ),
            // YAML `targetPort: "8080"` is a number written as a string.
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(
                    port_number(n, &format!("{what}.targetPort"))
                        .map_err(|e| errors.push(e))
                        .ok()?,
                ),
                Err(_) if valid_port_name(s) => TargetPort::Name(s.clone()),
                Err(_) => {
                    errors.push(format!(
                        "{what}.targetPort {s:?} is neither a port number nor a valid port name"
                    ));
                    return None;
                }
            },
        };
        Some(ServicePortSpec {
            name,
            port: number,
            protocol,
            target_port,
            node_port,
        })
    }
}

/// Parses an RFC 3339 timestamp as Kubernetes writes it.
fn parse_time(text: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = text.parse().ok()?;
    let nanos = ts.as_nanosecond();
    if nanos < 0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64))
}

impl SliceSpec {
    /// Validates an EndpointSlice. `Ok(None)` for a slice kube-proxy would not read
    /// (no Service label, headless, owned by another proxy).
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Option<Self>, Vec<String>> {
        let id = object_ref(&slice.metadata, true).map_err(|e| vec![e])?;
        if slice_ignored(&slice.metadata).is_some() {
            return Ok(None);
        }
        let service_name = label(&slice.metadata, SERVICE_NAME_LABEL).unwrap_or_default();
        let service = ObjectRef::new(id.namespace.clone(), service_name);
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
            // A nil port means "all ports"; only meaningful for headless Services.
            let Some(number) = port.port else { continue };
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
        // Sized once: a slice holds up to 100 endpoints and the model keeps every one.
        let mut endpoints = Vec::with_capacity(slice.endpoints.as_ref().map_or(0, Vec::len));
        if let Some(address_type) = address_type {
            for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
                let mut address = None;
                for (j, text) in endpoint.addresses.iter().enumerate() {
                    match text.parse::<IpAddr>() {
                        Ok(ip) if special_address(ip).is_some() => errors.push(format!(
                            "endpoints[{i}].addresses[{j}] {ip} is {}, never a pod",
                            special_address(ip).unwrap_or_default()
                        )),
                        Ok(ip) if AddressType::of(&ip) == address_type => {
                            address = address.or(Some(ip));
                        }
                        Ok(ip) => errors.push(format!(
                            "endpoints[{i}].addresses[{j}] {ip} does not match addressType {}",
                            slice.address_type
                        )),
                        Err(_) => errors.push(format!(
                            "endpoints[{i}].addresses[{j}] {text:?} is not an IP address"
                        )),
                    }
                }
                let Some(address) = address else {
                    if endpoint.addresses.is_empty() {
                        errors.push(format!("endpoints[{i}].addresses is empty"));
                    }
                    continue;
                };
                let conditions = endpoint.conditions.clone().unwrap_or_default();
                // Kubernetes: a nil `ready` means ready; nil `serving` follows `ready`.
                let ready = conditions.ready.unwrap_or(true);
                let hints = endpoint.hints.as_ref();
                endpoints.push(SliceEndpoint {
                    address,
                    ready,
                    serving: conditions.serving.unwrap_or(ready),
                    terminating: conditions.terminating.unwrap_or(false),
                    placement: Placement {
                        node_name: endpoint.node_name.clone().filter(|n| !n.is_empty()),
                        zone: endpoint.zone.clone().filter(|z| !z.is_empty()),
                        zone_hints: hints
                            .and_then(|h| h.for_zones.as_ref())
                            .map(|z| z.iter().map(|z| z.name.clone()).collect())
                            .unwrap_or_default(),
                        node_hints: hints
                            .and_then(|h| h.for_nodes.as_ref())
                            .map(|n| n.iter().map(|n| n.name.clone()).collect())
                            .unwrap_or_default(),
                    }
                    .interned(),
                });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        ports.shrink_to_fit();
        endpoints.shrink_to_fit();
        Ok(Some(Self {
            id,
            service,
            address_type,
            ports,
            endpoints,
            trigger_time: annotation(&slice.metadata, TRIGGER_TIME_ANNOTATION).and_then(parse_time),
        }))
    }

    /// The slice port that serves `service_port`: Kubernetes names slice ports after
    /// the Service port; hand-written slices may instead use the target port's name.
    pub fn port_for(&self, service_port: &ServicePortSpec) -> Option<u16> {
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

impl NodeSpec {
    pub fn from_k8s(node: &Node) -> Result<Self, Vec<String>> {
        let id = object_ref(&node.metadata, false).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        let mut addresses = Vec::new();
        for (i, address) in node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if !matches!(address.type_.as_str(), "InternalIP" | "ExternalIP") {
                continue;
            }
            match address.address.parse::<IpAddr>() {
                Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
                Ok(_) => {}
                Err(_) => errors.push(format!(
                    "status.addresses[{i}] {:?} is not an IP address",
                    address.address
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            name: id.name.to_string(),
            zone: label(&node.metadata, ZONE_LABEL).map(str::to_string),
            addresses,
        })
    }
}
