//! What each mode is configured with, for N services of three endpoints each: the
//! manifests `lb` reads, the rules kube-proxy's iptables mode writes (same chain shapes:
//! KUBE-SERVICES -> KUBE-SVC-* with `statistic --mode random` -> KUBE-SEP-* DNAT), and
//! a haproxy configuration standing in for kube-proxy's old userspace mode.
//!
//! Only the target service (in the middle of the table) points at the real servers;
//! the others point at addresses that exist nowhere, so tables have realistic sizes.

use std::{fmt::Write as _, net::Ipv4Addr};

/// The pod CIDR (kube-proxy's --cluster-cidr).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The port every benchmark service exposes (the real servers are redis).
pub const SERVICE_PORT: u16 = 6379;
/// The iperf3 service's ClusterIP (outside the range services are numbered in).
pub const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 253);
pub const IPERF_PORT: u16 = 5201;
/// A ClusterIP with `sessionAffinity: ClientIP` in front of the three servers.
pub const AFFINITY_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 252);
/// Where haproxy listens, in the node namespace.
pub const PROXY_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);
/// The node's address on the client's side: node ports are dialled there.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
/// The Node object's name in the benchmark's manifests.
pub const NODE_NAME: &str = "bench-node";
/// The node port in front of the three servers, and the iperf3 one.
pub const NODE_PORT: u16 = 32767;
pub const IPERF_NODE_PORT: u16 = 32766;
/// Node ports of the other NodePort Services: the rest of the default range.
const FILLER_NODE_PORTS: usize = 2766;

/// A NodePort Service, the same for `lb` and for the iptables rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePortService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub node_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

/// The NodePort Services at `services` Services: as many as the default node-port
/// range holds (one per Service up to 2766, all pointing at addresses that exist
/// nowhere), with the one in front of the real servers in the middle of the node-port
/// table, and the iperf3 one. Their ClusterIPs are outside the range of [`vip`].
pub fn node_port_services(services: usize, servers: &[Ipv4Addr]) -> Vec<NodePortService> {
    let fillers = services.clamp(1, FILLER_NODE_PORTS);
    let mut list: Vec<NodePortService> = (0..fillers)
        .map(|k| NodePortService {
            name: format!("np-{k}"),
            vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 110, 0, 1)) + k as u32),
            port: SERVICE_PORT,
            node_port: 30000 + k as u16,
            endpoints: (0..3)
                .map(|j| {
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 127, 0, 1)) + (k * 3 + j) as u32)
                })
                .collect(),
        })
        .collect();
    list.insert(
        fillers / 2,
        NodePortService {
            name: "nodeport".into(),
            vip: Ipv4Addr::new(10, 111, 255, 250),
            port: SERVICE_PORT,
            node_port: NODE_PORT,
            endpoints: servers.to_vec(),
        },
    );
    list.push(NodePortService {
        name: "iperf-nodeport".into(),
        vip: Ipv4Addr::new(10, 111, 255, 249),
        port: IPERF_PORT,
        node_port: IPERF_NODE_PORT,
        endpoints: servers[..1].to_vec(),
    });
    list
}

/// `lb`'s manifests for [`node_port_services`], and the Node they are served on (its
/// pods, the servers, run on it).
pub fn node_port_manifests(node_ports: &[NodePortService]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{NODE_IP}\"}}]\n"
    );
    for np in node_ports {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: bench}}\nspec:\n  type: NodePort\n  clusterIP: {}\n  ports: [{{port: {}, targetPort: {}, nodePort: {}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: {}}}\naddressType: IPv4\nports: [{{port: {}, protocol: TCP}}]\nendpoints:\n",
            np.name, np.vip, np.port, np.port, np.node_port, np.name, np.name, np.port
        );
        for ep in &np.endpoints {
            let _ = writeln!(out, "- addresses: [\"{ep}\"]\n  nodeName: {NODE_NAME}");
        }
    }
    out
}

/// ClusterIP of service `i` (10.96.0.1 upwards).
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// The index of the service the clients use: the middle of the table.
pub fn target_index(services: usize) -> usize {
    services / 2
}

/// Endpoint `j` (of `per_service`) of service `i`: the real servers for the target,
/// distinct addresses that exist nowhere otherwise.
pub fn endpoint(
    i: usize,
    j: usize,
    per_service: usize,
    services: usize,
    servers: &[Ipv4Addr],
) -> Ipv4Addr {
    if i == target_index(services) {
        servers[j % servers.len()]
    } else {
        // From 10.128.0.1: up to 8 million endpoints stay inside 10.128.0.0/9.
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * per_service + j) as u32)
    }
}

/// A 16-character chain suffix, like kube-proxy's base32 hash.
fn chain_id(kind: &str, i: usize, j: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{kind}/{i}/{j}").bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016X}")
}

/// iptables-restore input reproducing kube-proxy's iptables mode for `services`
/// services with `endpoints` endpoints each.
/// With kube-proxy's node-port rules for `node_ports` (their ClusterIP rules come
/// after the `services` ones; KUBE-NODEPORTS -> KUBE-EXT-* -> KUBE-SVC-*).
pub fn iptables_rules(
    services: usize,
    endpoints: usize,
    servers: &[Ipv4Addr],
    node_ports: &[NodePortService],
) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    chains.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let mut service_rules = String::new();
    for i in 0..services {
        let svc = format!("KUBE-SVC-{}", chain_id("svc", i, 0));
        let vip = vip(i);
        let name = format!("bench/svc-{i}:redis");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            service_rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j KUBE-MARK-MASQ"
        );
        for j in 0..endpoints {
            let sep = format!("KUBE-SEP-{}", chain_id("sep", i, j));
            let ep = endpoint(i, j, endpoints, services, servers);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let remaining = endpoints - j;
            if remaining > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {ep}:{SERVICE_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {ep}:{SERVICE_PORT}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}:{SERVICE_PORT}"
            );
        }
    }
    let mut node_port_rules = String::new();
    for (k, np) in node_ports.iter().enumerate() {
        let svc = format!("KUBE-SVC-{}", chain_id("npsvc", k, 0));
        let ext = format!("KUBE-EXT-{}", chain_id("npsvc", k, 0));
        let name = format!("bench/{}:p", np.name);
        let (vip, port) = (np.vip, np.port);
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{ext} - [0:0]");
        let _ = writeln!(
            service_rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {svc}"
        );
        let _ = writeln!(
            node_port_rules,
            "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{name}\" -m tcp --dport {} -j {ext}",
            np.node_port
        );
        let _ = writeln!(
            rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
        );
        let count = np.endpoints.len();
        for (j, ep) in np.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_id("npsep", k, j));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let remaining = count - j;
            let pick = if remaining > 1 {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / remaining as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {ep}:{port}\"{pick} -j {sep}\n-A {sep} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}:{port}"
            );
        }
    }
    // kube-proxy appends the nodeports jump after the service rules.
    service_rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    service_rules.push_str(&node_port_rules);
    format!("{chains}{rules}{service_rules}COMMIT\n")
}

pub fn service_manifest(
    out: &mut String,
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    endpoints: &[Ipv4Addr],
) {
    service_manifest_with(out, name, vip, port, endpoints, "");
}

/// [`service_manifest`] with extra lines in the Service's spec.
pub fn service_manifest_with(
    out: &mut String,
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    endpoints: &[Ipv4Addr],
    extra_spec: &str,
) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: {port}, targetPort: {port}}}]\n{extra_spec}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{port: {port}, protocol: TCP}}]\nendpoints:\n"
    );
    // Every pod runs on the benchmark's one node.
    for ep in endpoints {
        let _ = writeln!(out, "- addresses: [\"{ep}\"]\n  nodeName: {NODE_NAME}");
    }
}

/// The manifests `lb daemon` serves: the same services as the iptables rules.
pub fn manifests(services: usize, endpoints: usize, servers: &[Ipv4Addr]) -> String {
    let mut out = String::with_capacity(services * (300 + endpoints * 30));
    for i in 0..services {
        let eps: Vec<Ipv4Addr> = (0..endpoints)
            .map(|j| endpoint(i, j, endpoints, services, servers))
            .collect();
        service_manifest(&mut out, &format!("svc-{i}"), vip(i), SERVICE_PORT, &eps);
    }
    out
}

/// The iperf3 service: one endpoint, the first server.
pub fn iperf_manifest(servers: &[Ipv4Addr]) -> String {
    let mut out = String::new();
    service_manifest(&mut out, "iperf", IPERF_VIP, IPERF_PORT, &servers[..1]);
    out
}

/// The session-affinity service: the three servers, ClientIP affinity (every
/// connection of the benchmark's one client namespace reaches one of them).
pub fn affinity_manifest(servers: &[Ipv4Addr]) -> String {
    let mut out = String::new();
    service_manifest_with(
        &mut out,
        "affinity",
        AFFINITY_VIP,
        SERVICE_PORT,
        servers,
        "  sessionAffinity: ClientIP\n",
    );
    out
}

/// The packet-mode client pod as lb reads it from manifests: its mode, its cgroup and
/// its address (how lb finds its interface).
pub fn packet_pod_manifest(cgroup: &std::path::Path, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: packet-client\n  namespace: bench\n  \
         annotations:\n    lb.dev/mode: packet\n    lb.dev/cgroup: {}\nspec:\n  containers: \
         [{{name: client}}]\nstatus:\n  podIPs: [{{ip: {ip}}}]\n",
        cgroup.display()
    )
}

/// haproxy in TCP mode on the node: a userspace proxy hop for the target service.
pub fn haproxy_config(servers: &[Ipv4Addr]) -> String {
    let mut cfg = String::from(
        "global\n  maxconn 8000\n  nbthread 1\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n",
    );
    let _ = writeln!(
        cfg,
        "frontend target\n  bind {PROXY_VIP}:{SERVICE_PORT}\n  default_backend endpoints\n"
    );
    cfg.push_str("backend endpoints\n  balance roundrobin\n");
    for (i, server) in servers.iter().enumerate() {
        let _ = writeln!(cfg, "  server s{i} {server}:{SERVICE_PORT}");
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVERS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(10, 244, 1, 11),
        Ipv4Addr::new(10, 244, 1, 12),
        Ipv4Addr::new(10, 244, 1, 13),
    ];

    #[test]
    fn vips_and_endpoints_are_distinct_and_target_is_real() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(vip(30_000), Ipv4Addr::new(10, 96, 117, 49));
        assert_eq!(target_index(10_000), 5_000);
        assert_eq!(endpoint(5_000, 1, 3, 10_000, &SERVERS), SERVERS[1]);
        assert_ne!(
            endpoint(4_999, 1, 3, 10_000, &SERVERS),
            endpoint(5_001, 1, 3, 10_000, &SERVERS)
        );
        // Ten endpoints per service never collide with the next service's.
        assert_ne!(
            endpoint(1, 9, 10, 100, &SERVERS),
            endpoint(2, 0, 10, 100, &SERVERS)
        );
    }

    #[test]
    fn iptables_rules_have_kube_proxys_shape() {
        let rules = iptables_rules(3, 3, &SERVERS, &[]);
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
        assert_eq!(rules.matches("-A KUBE-SERVICES -d ").count(), 3);
        assert_eq!(
            rules
                .matches("--mode random --probability 0.33333333333")
                .count(),
            3
        );
        assert_eq!(
            rules
                .matches("--mode random --probability 0.50000000000")
                .count(),
            3
        );
        assert_eq!(
            rules.matches("-j DNAT --to-destination 10.244.1.1").count(),
            3,
            "only the target hits real servers"
        );
        // Every chain that is jumped to is declared.
        for line in rules.lines().filter(|l| l.starts_with("-A ")) {
            if let Some(target) = line
                .split(" -j ")
                .nth(1)
                .map(|t| t.split_whitespace().next().unwrap())
                && target.starts_with("KUBE-")
            {
                assert!(
                    rules.contains(&format!(":{target} - [0:0]")),
                    "{target} undeclared"
                );
            }
        }
    }

    #[test]
    fn node_ports_are_the_same_for_lb_and_iptables() {
        let node_ports = node_port_services(10_000, &SERVERS);
        assert_eq!(node_ports.len(), FILLER_NODE_PORTS + 2);
        let target = node_ports
            .iter()
            .position(|np| np.node_port == NODE_PORT)
            .unwrap();
        assert_eq!(target, FILLER_NODE_PORTS / 2, "in the middle of the chain");
        let mut ports: Vec<u16> = node_ports.iter().map(|np| np.node_port).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), node_ports.len());
        assert!(ports.iter().all(|p| (30000..=32767).contains(p)));
        let rules = iptables_rules(3, 3, &SERVERS, &node_ports);
        assert_eq!(
            rules.matches("-A KUBE-NODEPORTS ").count(),
            node_ports.len()
        );
        assert!(rules.contains("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"));
        assert_eq!(rules.matches(":KUBE-NODEPORTS - [0:0]").count(), 1);
        for target in rules
            .lines()
            .filter_map(|l| l.split(" -j ").nth(1)?.split_whitespace().next())
            .filter(|t| t.starts_with("KUBE-"))
        {
            assert!(
                rules.contains(&format!(":{target} - [0:0]")),
                "{target} undeclared"
            );
        }
        let manifests = node_port_manifests(&node_ports);
        assert_eq!(
            manifests.matches("  type: NodePort\n").count(),
            node_ports.len()
        );
        assert!(manifests.contains(&format!("nodePort: {NODE_PORT}}}")));
        assert!(manifests.starts_with("apiVersion: v1\nkind: Node\n"));
    }

    #[test]
    fn manifests_hold_every_service() {
        let text = manifests(4, 3, &SERVERS);
        assert_eq!(text.matches("kind: Service\n").count(), 4);
        assert_eq!(text.matches("- addresses: [").count(), 12);
        assert!(text.contains("clusterIP: 10.96.0.3\n"));
        assert!(iperf_manifest(&SERVERS).contains(&format!("clusterIP: {IPERF_VIP}")));
        let affinity = affinity_manifest(&SERVERS);
        assert!(affinity.contains("]\n  sessionAffinity: ClientIP\n---\n"));
        assert_eq!(affinity.matches("- addresses: [").count(), 3);
    }
}
