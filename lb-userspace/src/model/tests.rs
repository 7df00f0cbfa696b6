use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use std::net::IpAddr;

use super::{
    endpoints::{Exclusion, Topology},
    frontends::FrontendKind,
    spec::{Cidr, ServiceType},
    *,
};

fn service(yaml: &str) -> ServiceSpec {
    let parsed: Service = crate::source::manifests::from_yaml(yaml).expect("valid Service YAML");
    ServiceSpec::from_k8s(&parsed)
        .expect("a valid Service")
        .expect("served by this proxy")
}

fn service_errors(yaml: &str) -> String {
    let parsed: Service = crate::source::manifests::from_yaml(yaml).expect("valid Service YAML");
    ServiceSpec::from_k8s(&parsed).unwrap_err().join("\n")
}

fn slice(yaml: &str) -> SliceSpec {
    let parsed: EndpointSlice =
        crate::source::manifests::from_yaml(yaml).expect("valid EndpointSlice YAML");
    SliceSpec::from_k8s(&parsed)
        .expect("a valid slice")
        .expect("read by this proxy")
}

fn redis_service() -> ServiceSpec {
    service(
        "apiVersion: v1\nkind: Service\nmetadata: {name: redis-master, namespace: pods}\n\
         spec:\n  clusterIP: 10.96.0.100\n  ports: [{port: 6379, targetPort: 6379}]\n",
    )
}

/// An endpoint line for [`redis_slice`]: address, optional conditions and topology.
fn redis_slice(name: &str, endpoints: &[&str]) -> SliceSpec {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: pods\n  \
         labels: {{kubernetes.io/service-name: redis-master}}\naddressType: IPv4\nports: [{{port: 6379, protocol: TCP}}]\nendpoints:\n"
    );
    if endpoints.is_empty() {
        yaml = yaml.replace("endpoints:\n", "endpoints: []\n");
    }
    for ep in endpoints {
        yaml.push_str(&format!("- {ep}\n"));
    }
    slice(&yaml)
}

fn backend(ip: &str, port: u16) -> BackendAddr {
    BackendAddr {
        ip: ip.parse().unwrap(),
        port,
    }
}

fn node(name: &str, zone: Option<&str>, addresses: &[&str]) -> NodeContext {
    NodeContext {
        name: name.into(),
        zone: zone.map(str::to_string),
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        node_port_range: None,
        ..Default::default()
    }
}

fn frontends_of(svc: &ServiceSpec, slices: &[&SliceSpec]) -> Vec<Frontend> {
    service_frontends(svc, slices, &NodeContext::default())
}

#[test]
fn ready_endpoints_become_backends() {
    let s = redis_slice(
        "redis-abc",
        &[
            "addresses: [10.244.1.11]",
            "{addresses: [10.244.1.12], conditions: {ready: true}}",
            "{addresses: [10.244.1.13], conditions: {ready: false, serving: false}}",
        ],
    );
    let fe = frontends_of(&redis_service(), &[&s]);
    assert_eq!(fe.len(), 1);
    assert_eq!(fe[0].key.to_string(), "10.96.0.100:6379/TCP");
    assert_eq!(fe[0].kind, FrontendKind::ClusterIp);
    assert_eq!(
        fe[0].backends,
        vec![backend("10.244.1.11", 6379), backend("10.244.1.12", 6379)]
    );
    assert_eq!(
        fe[0].excluded,
        vec![(backend("10.244.1.13", 6379), Exclusion::NotReady)]
    );
}

#[test]
fn terminating_endpoints_are_a_fallback_only() {
    let only_terminating = redis_slice(
        "s",
        &[
            "{addresses: [10.244.1.11], conditions: {ready: false, serving: true, terminating: true}}",
            "{addresses: [10.244.1.12], conditions: {ready: false, serving: false, terminating: true}}",
        ],
    );
    assert_eq!(
        frontends_of(&redis_service(), &[&only_terminating])[0].backends,
        vec![backend("10.244.1.11", 6379)]
    );
    let mixed = redis_slice(
        "s",
        &[
            "{addresses: [10.244.1.11], conditions: {ready: false, serving: true, terminating: true}}",
            "{addresses: [10.244.1.12], conditions: {ready: true}}",
        ],
    );
    let fe = &frontends_of(&redis_service(), &[&mixed])[0];
    assert_eq!(fe.backends, vec![backend("10.244.1.12", 6379)]);
    // The terminating one is still listed: its connections may drain.
    assert_eq!(
        fe.excluded,
        vec![(backend("10.244.1.11", 6379), Exclusion::Terminating)]
    );
}

#[test]
fn an_address_in_two_slices_keeps_its_ready_listing() {
    let a = redis_slice(
        "a",
        &["{addresses: [10.244.1.11], conditions: {ready: false, serving: false}}"],
    );
    let b = redis_slice("b", &["addresses: [10.244.1.11]"]);
    let fe = &frontends_of(&redis_service(), &[&a, &b])[0];
    assert_eq!(fe.backends, vec![backend("10.244.1.11", 6379)]);
    assert!(fe.excluded.is_empty());
}

#[test]
fn no_slices_means_a_frontend_without_backends() {
    let fe = frontends_of(&redis_service(), &[]);
    assert_eq!(fe.len(), 1);
    assert!(fe[0].backends.is_empty());
}

#[test]
fn multi_port_service_matches_slice_ports_by_name_and_protocol() {
    let svc = service(
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
    );
    let s = slice(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kube-dns-x, namespace: kube-system, labels: {kubernetes.io/service-name: kube-dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}, {name: metrics, port: 9153}]
endpoints: [{addresses: [10.244.1.20]}]
"#,
    );
    let got: Vec<(String, u16)> = frontends_of(&svc, &[&s])
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
    let svc = service(
        "apiVersion: v1\nkind: Service\nmetadata: {name: test-svc, namespace: pods}\n\
         spec:\n  clusterIP: 10.96.0.80\n  ports: [{port: 80, targetPort: web-port}]\n",
    );
    assert_eq!(
        svc.ports[0].target_port,
        spec::TargetPort::Name("web-port".into())
    );
    let header = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n";
    // Kubernetes-style: slice ports carry the Service port's name ("").
    let a = slice(&format!(
        "{header}metadata: {{name: a, namespace: pods, labels: {{kubernetes.io/service-name: test-svc}}}}\n\
         ports: [{{name: \"\", port: 8080}}]\nendpoints: [{{addresses: [10.244.1.31]}}]\n"
    ));
    // Hand-written style: slice ports named after the target port.
    let b = slice(&format!(
        "{header}metadata: {{name: b, namespace: pods, labels: {{kubernetes.io/service-name: test-svc}}}}\n\
         ports: [{{name: web-port, port: 9090}}]\nendpoints: [{{addresses: [10.244.1.32]}}]\n"
    ));
    assert_eq!(
        frontends_of(&svc, &[&a, &b])[0].backends,
        vec![backend("10.244.1.31", 8080), backend("10.244.1.32", 9090)]
    );
}

#[test]
fn dual_stack_service_gets_a_frontend_per_family() {
    let svc = service(
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
    );
    let header = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nports: [{port: 8080}]\n";
    let v4 = slice(&format!(
        "{header}metadata: {{name: v4, namespace: pods, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [10.244.1.40]}}]\n"
    ));
    let v6 = slice(&format!(
        "{header}metadata: {{name: v6, namespace: pods, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv6\nendpoints: [{{addresses: [\"fd00:244::40\"]}}]\n"
    ));
    let fe = frontends_of(&svc, &[&v4, &v6]);
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
        assert!(frontends_of(&service(yaml), &[]).is_empty(), "{yaml}");
    }
}

#[test]
fn services_and_slices_of_other_proxies_and_headless_ones_are_ignored() {
    let owned_elsewhere: Service = crate::source::manifests::from_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x, labels: {service.kubernetes.io/service-proxy-name: other}}\n\
         spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}",
    )
    .unwrap();
    assert_eq!(ServiceSpec::from_k8s(&owned_elsewhere), Ok(None));
    assert!(
        spec::service_ignored(&owned_elsewhere.metadata)
            .unwrap()
            .contains("another proxy serves it")
    );
    // kube-proxy hides a Service labelled headless too, though it has a ClusterIP.
    let marked_headless: Service = crate::source::manifests::from_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x, labels: {service.kubernetes.io/headless: \"\"}}\n\
         spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}",
    )
    .unwrap();
    assert_eq!(ServiceSpec::from_k8s(&marked_headless), Ok(None));
    assert!(spec::service_ignored(&marked_headless.metadata).is_some());
    for labels in [
        "{kubernetes.io/service-name: x, service.kubernetes.io/headless: \"\"}",
        "{kubernetes.io/service-name: x, service.kubernetes.io/service-proxy-name: other}",
        "{}",
    ] {
        let parsed: EndpointSlice = crate::source::manifests::from_yaml(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, labels: {labels}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [10.244.1.1]}}]\n"
        ))
        .unwrap();
        assert_eq!(SliceSpec::from_k8s(&parsed), Ok(None), "{labels}");
        assert!(spec::slice_ignored(&parsed.metadata).is_some());
    }
}

#[test]
fn invalid_services_list_every_problem() {
    let text = service_errors(
        r#"
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  clusterIP: 10.96.0.300
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 90000}}
  internalTrafficPolicy: Nearby
  loadBalancerSourceRanges: [10.0.0.0/33]
  ports:
  - {name: a, port: 70000}
  - {name: b, port: 53, protocol: ICMP}
  - {port: 80, targetPort: "Not_A_Name"}
  - {name: d, port: 81, nodePort: 30001}
"#,
    );
    for needle in [
        "\"10.96.0.300\" is not an IP address",
        "spec.ports[0].port 70000 is out of range",
        "unknown protocol \"ICMP\"",
        "spec.ports[2].name is required",
        "neither a port number nor a valid port name",
        "timeoutSeconds 90000 is out of range (1-86400)",
        "spec.internalTrafficPolicy \"Nearby\"",
        "loadBalancerSourceRanges[0]: \"10.0.0.0/33\" has an invalid prefix length",
        "spec.ports[3].nodePort is set but spec.type is ClusterIP",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn missing_cluster_ip_is_explained() {
    let text = service_errors(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 80}]}",
    );
    assert!(text.contains("no IP allocator"), "{text}");
}

#[test]
fn slices_are_validated() {
    let parsed: EndpointSlice = crate::source::manifests::from_yaml(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, labels: {kubernetes.io/service-name: svc}}
addressType: IPv4
ports: [{port: 0}]
endpoints:
- addresses: [10.244.1.1]
- addresses: ["fd00::1", nonsense]
"#,
    )
    .unwrap();
    let errors = SliceSpec::from_k8s(&parsed).unwrap_err().join("\n");
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
}

#[test]
fn the_fields_the_semantics_need_are_kept() {
    let svc = service(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: pods
  annotations: {service.kubernetes.io/topology-mode: Auto}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.90
  externalIPs: [192.0.2.10]
  sessionAffinity: ClientIP
  internalTrafficPolicy: Local
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{port: 80, targetPort: 8080, nodePort: 30002}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.7}, {ip: 198.51.100.8, ipMode: Proxy}, {hostname: lb.example}]
"#,
    );
    assert_eq!(svc.service_type, ServiceType::LoadBalancer);
    assert_eq!(svc.affinity_timeout, Some(spec::DEFAULT_AFFINITY_TIMEOUT));
    assert!(svc.internal_local && svc.external_local);
    assert_eq!(svc.health_check_node_port, Some(32000));
    assert_eq!(svc.ports[0].node_port, Some(30002));
    assert_eq!(
        svc.external_ips,
        vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        svc.load_balancer_ips,
        vec!["198.51.100.7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        svc.source_ranges,
        vec![Cidr::parse("203.0.113.0/24").unwrap()]
    );
    assert_eq!(
        svc.traffic_distribution.as_deref(),
        Some("topology-mode=Auto")
    );

    let s = slice(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  namespace: pods
  labels: {kubernetes.io/service-name: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: "2026-12-01T10:00:00Z"}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.40]
  nodeName: node-a
  zone: zone-a
  hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}
"#,
    );
    let ep = &s.endpoints[0].placement;
    assert_eq!(ep.node_name.as_deref(), Some("node-a"));
    assert_eq!(ep.zone.as_deref(), Some("zone-a"));
    assert_eq!(ep.zone_hints, vec!["zone-a"]);
    assert_eq!(ep.node_hints, vec!["node-a"]);
    let trigger = s.trigger_time.expect("trigger time parsed");
    assert_eq!(
        trigger
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        1_796_119_200
    );

    let parsed_node: Node = crate::source::manifests::from_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\n\
         status: {addresses: [{type: InternalIP, address: 10.253.0.2}, {type: Hostname, address: node-a}]}\n",
    )
    .unwrap();
    let n = NodeSpec::from_k8s(&parsed_node).unwrap();
    assert_eq!(n.name, "node-a");
    assert_eq!(n.zone.as_deref(), Some("zone-a"));
    assert_eq!(n.addresses, vec!["10.253.0.2".parse::<IpAddr>().unwrap()]);
}

#[test]
fn cidrs_parse_with_and_without_prefix() {
    let net = Cidr::parse("10.1.2.0/23").unwrap();
    assert_eq!((net.addr.to_string(), net.prefix), ("10.1.2.0".into(), 23));
    assert_eq!(Cidr::parse("fd00::/8").unwrap().prefix, 8);
    assert_eq!(Cidr::parse("10.0.0.1").unwrap().prefix, 32);
    assert!(Cidr::parse("fd00::/129").is_err());
    assert!(Cidr::parse("nonsense/8").is_err());
}

fn web_service(extra_spec: &str) -> ServiceSpec {
    service(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: pods}}\n\
         spec:\n  clusterIP: 10.96.0.90\n  ports: [{{port: 80, targetPort: 8080, nodePort: 30002}}]\n{extra_spec}"
    ))
}

fn web_slice(endpoints: &[(&str, &str, &str)]) -> SliceSpec {
    // (address, nodeName, conditions)
    let mut yaml = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-x, namespace: pods, \
         labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n",
    );
    for (ip, node_name, conditions) in endpoints {
        yaml.push_str(&format!(
            "- {{addresses: [{ip}], nodeName: {node_name}, conditions: {conditions}}}\n"
        ));
    }
    slice(&yaml)
}

#[test]
fn node_ports_are_served_on_every_node_address_in_both_scopes() {
    let svc = web_service("  type: NodePort\n  externalTrafficPolicy: Local\n");
    let s = web_slice(&[
        ("10.244.1.11", "node-a", "{ready: true}"),
        ("10.244.2.11", "node-b", "{ready: true}"),
    ]);
    let here = node("node-a", None, &["10.253.0.2", "fd00:253::2"]);
    let fe = service_frontends(&svc, &[&s], &here);
    let keys: Vec<String> = fe.iter().map(|f| f.key.to_string()).collect();
    assert_eq!(
        keys,
        vec![
            "10.96.0.90:80/TCP",
            "10.253.0.2:30002/TCP",
            "10.253.0.2:30002/TCP (external)"
        ],
        "IPv4 Service: node ports on IPv4 node addresses only"
    );
    // Cluster IP and pods reaching the node port: every endpoint (internal policy is
    // Cluster); packets from outside: only this node's (external policy Local).
    assert_eq!(fe[0].backends.len(), 2);
    assert_eq!(fe[1].backends.len(), 2);
    assert_eq!(fe[2].backends, vec![backend("10.244.1.11", 8080)]);
    assert!(fe[2].local_policy);
    assert_eq!(
        fe[2].excluded,
        vec![(backend("10.244.2.11", 8080), Exclusion::NotLocal)]
    );
    assert_eq!(
        fe[0].local_backends().collect::<Vec<_>>(),
        vec![&backend("10.244.1.11", 8080)]
    );
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints() {
    let svc = web_service("  type: NodePort\n  internalTrafficPolicy: Local\n");
    let here = node("node-a", None, &[]);
    let both = web_slice(&[
        ("10.244.1.11", "node-a", "{ready: true}"),
        ("10.244.2.11", "node-b", "{ready: true}"),
    ]);
    let fe = &service_frontends(&svc, &[&both], &here)[0];
    assert_eq!(fe.backends, vec![backend("10.244.1.11", 8080)]);
    // None local: no backends (refused), even though node-b has some.
    let remote_only = web_slice(&[("10.244.2.11", "node-b", "{ready: true}")]);
    assert!(
        service_frontends(&svc, &[&remote_only], &here)[0]
            .backends
            .is_empty()
    );
    // The only local endpoint is terminating: it is still used.
    let terminating = web_slice(&[
        (
            "10.244.1.11",
            "node-a",
            "{ready: false, serving: true, terminating: true}",
        ),
        ("10.244.2.11", "node-b", "{ready: true}"),
    ]);
    assert_eq!(
        service_frontends(&svc, &[&terminating], &here)[0].backends,
        vec![backend("10.244.1.11", 8080)]
    );
}

#[test]
fn zone_hints_keep_traffic_in_the_nodes_zone() {
    let svc = web_service("  type: NodePort\n  trafficDistribution: PreferClose\n");
    let hinted = |zone_a: &str| {
        slice(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-x, namespace: pods, \
             labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n\
             - {{addresses: [10.244.1.11], nodeName: node-a, zone: {zone_a}, hints: {{forZones: [{{name: {zone_a}}}]}}}}\n\
             - {{addresses: [10.244.2.11], nodeName: node-b, zone: zone-b, hints: {{forZones: [{{name: zone-b}}]}}}}\n"
        ))
    };
    let here = node("node-a", Some("zone-a"), &[]);
    let in_zone = hinted("zone-a");
    let fe = &service_frontends(&svc, &[&in_zone], &here)[0];
    assert_eq!(fe.backends, vec![backend("10.244.1.11", 8080)]);
    assert_eq!(fe.topology, Topology::PreferSameZone);
    assert_eq!(
        fe.excluded,
        vec![(backend("10.244.2.11", 8080), Exclusion::OtherZone)]
    );
    // No hint covers zone-a: spread over all.
    let elsewhere = hinted("zone-c");
    let fe = &service_frontends(&svc, &[&elsewhere], &here)[0];
    assert_eq!(fe.backends.len(), 2);
    assert_eq!(fe.topology, Topology::Any);
}

#[test]
fn external_and_load_balancer_ips_and_source_ranges() {
    let svc = service(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: pods}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.90
  externalIPs: [192.0.2.10]
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{port: 80, targetPort: 8080, nodePort: 30002}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}
"#,
    );
    let fe = service_frontends(&svc, &[], &node("node-a", None, &["10.253.0.2"]));
    let listed: Vec<(String, FrontendKind, usize)> = fe
        .iter()
        .map(|f| (f.key.to_string(), f.kind, f.source_ranges.len()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("10.96.0.90:80/TCP".into(), FrontendKind::ClusterIp, 0),
            ("10.253.0.2:30002/TCP".into(), FrontendKind::NodePort, 0),
            (
                "10.253.0.2:30002/TCP (external)".into(),
                FrontendKind::NodePort,
                0
            ),
            ("192.0.2.10:80/TCP".into(), FrontendKind::ExternalIp, 0),
            (
                "192.0.2.10:80/TCP (external)".into(),
                FrontendKind::ExternalIp,
                0
            ),
            ("198.51.100.7:80/TCP".into(), FrontendKind::LoadBalancer, 0),
            (
                "198.51.100.7:80/TCP (external)".into(),
                FrontendKind::LoadBalancer,
                1
            ),
        ]
    );
}

#[test]
fn model_reports_only_what_changed() {
    let mut model = Model::default();
    model.upsert_service(Arc::new(redis_service()));
    let s = redis_slice("redis-abc", &["addresses: [10.244.1.11]"]);
    model.upsert_slice(Arc::new(s.clone()));
    let changes = model.recompute();
    assert_eq!(changes.frontends.len(), 1);
    assert_eq!((changes.service_changes, changes.slice_changes), (1, 1));
    // Same objects again: nothing to do.
    model.upsert_service(Arc::new(redis_service()));
    model.upsert_slice(Arc::new(s.clone()));
    let changes = model.recompute();
    assert!(changes.frontends.is_empty());
    assert_eq!((changes.service_changes, changes.slice_changes), (0, 0));
    // An endpoint moves: one changed frontend with the new backend.
    model.upsert_slice(Arc::new(redis_slice(
        "redis-abc",
        &["addresses: [10.244.1.99]"],
    )));
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
fn duplicate_cluster_ip_port_goes_to_the_older_service_until_it_leaves() {
    let mut model = Model::default();
    let mut incumbent = redis_service();
    incumbent.created = Some(1_000);
    model.upsert_service(Arc::new(incumbent));
    model.recompute();
    let mut impostor = redis_service();
    impostor.id = ObjectRef::new("pods", "aaa-first-alphabetically");
    impostor.created = Some(2_000);
    model.upsert_service(Arc::new(impostor.clone()));
    let changes = model.recompute();
    assert!(changes.frontends.is_empty());
    assert_eq!(changes.conflicts.len(), 1);
    assert_eq!(
        changes.conflicts[0].owner,
        ObjectRef::new("pods", "redis-master")
    );
    assert_eq!(changes.conflicts[0].reason, "the older Service wins");
    assert_eq!(
        &*model.frontends().values().next().unwrap().service.name,
        "redis-master"
    );
    // The incumbent leaves: the waiting Service takes over in the same recompute.
    model.remove_service(&ObjectRef::new("pods", "redis-master"));
    let changes = model.recompute();
    assert_eq!(changes.frontends.len(), 1);
    let fe = changes.frontends.values().next().unwrap().as_ref().unwrap();
    assert_eq!(fe.service, impostor.id);
    // A waiter that changed its mind no longer waits.
    let mut second = redis_service();
    second.id = ObjectRef::new("pods", "second");
    second.created = Some(3_000);
    model.upsert_service(Arc::new(second.clone()));
    model.recompute();
    second.cluster_ips = vec!["10.96.0.101".parse().unwrap()];
    model.upsert_service(Arc::new(second));
    let changes = model.recompute();
    assert!(changes.conflicts.is_empty());
    assert!(model.waiting.is_empty() && model.waits.is_empty());
}

/// Who wins does not depend on who arrived first (or on a restart's listing order):
/// the older Service, then namespace/name.
#[test]
fn the_winner_of_a_contested_address_does_not_depend_on_arrival_order() {
    let named = |name: &str, created: Option<i64>| {
        let mut spec = redis_service();
        spec.id = ObjectRef::new("pods", name);
        spec.created = created;
        Arc::new(spec)
    };
    for (a, b, winner) in [
        (named("zz-old", Some(1)), named("aa-new", Some(2)), "zz-old"),
        (named("bb", None), named("aa", None), "aa"),
        (named("bb", Some(5)), named("aa", Some(5)), "aa"),
    ] {
        for order in [[&a, &b], [&b, &a]] {
            let mut model = Model::default();
            // One at a time (a running daemon) and both at once (a restart).
            model.upsert_service(order[0].clone());
            model.recompute();
            model.upsert_service(order[1].clone());
            model.recompute();
            let mut restarted = Model::default();
            restarted.upsert_service(order[1].clone());
            restarted.upsert_service(order[0].clone());
            restarted.recompute();
            for m in [&model, &restarted] {
                let owners: Vec<&str> = m.frontends().values().map(|f| &*f.service.name).collect();
                assert_eq!(owners, vec![winner], "order {:?}", order.map(|s| &s.id));
            }
        }
    }
}

/// A tenant's Service with `externalIPs: [<kube-dns's ClusterIP>]` never takes the
/// ClusterIP's frontend, even when it is older and sorts first, and an IPv4-mapped
/// IPv6 spelling of the address is the same address.
#[test]
fn an_external_ip_never_takes_another_services_cluster_ip() {
    let dns = |yaml_extra: &str| {
        service(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system, creationTimestamp: \"2024-01-02T00:00:00Z\"}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: dns, port: 53, protocol: UDP}}]\n{yaml_extra}"
        ))
    };
    for external in ["10.96.0.10", "::ffff:10.96.0.10"] {
        let hijack = service(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: hijack, namespace: a, creationTimestamp: \"2020-01-01T00:00:00Z\"}}\nspec:\n  clusterIP: 10.96.7.7\n  externalIPs: [\"{external}\"]\n  ports: [{{port: 53, protocol: UDP}}]\n"
        ));
        assert_eq!(
            hijack.external_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        for hijack_first in [true, false] {
            let mut model = Model::default();
            let (first, second) = if hijack_first {
                (Arc::new(hijack.clone()), Arc::new(dns("")))
            } else {
                (Arc::new(dns("")), Arc::new(hijack.clone()))
            };
            model.upsert_service(first);
            model.recompute();
            model.upsert_service(second);
            let changes = model.recompute();
            let key = FrontendKey::internal("10.96.0.10".parse().unwrap(), 53, Protocol::Udp);
            assert_eq!(&*model.frontends()[&key].service.name, "kube-dns");
            assert_eq!(model.frontends()[&key].kind, FrontendKind::ClusterIp);
            let conflict = changes
                .conflicts
                .iter()
                .find(|c| c.key == key)
                .expect("the hijack is reported");
            assert_eq!(&*conflict.service.name, "hijack");
            assert!(conflict.reason.contains("ClusterIP wins"), "{conflict}");
        }
    }
}

/// The quadratic case of the past: many Services waiting on taken keys. One change
/// must cost the same whether 100 or 5 000 Services wait.
#[test]
fn work_per_change_does_not_grow_with_the_number_of_conflicts() {
    let cost_of_one_change = |services: usize| {
        let mut model = Model::default();
        for i in 0..services {
            let mut owner = redis_service();
            owner.id = ObjectRef::new("pods", format!("owner-{i}"));
            owner.cluster_ips = vec![
                format!("10.96.{}.{}", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
            ];
            let mut dup = owner.clone();
            dup.id = ObjectRef::new("pods", format!("dup-{i}"));
            model.upsert_service(Arc::new(owner));
            model.upsert_service(Arc::new(dup));
        }
        let changes = model.recompute();
        assert_eq!(changes.conflicts.len(), services);
        let before = model.work();
        // One endpoint change of one owner, and one duplicate changing its port.
        model.upsert_slice(Arc::new(redis_slice(
            "redis-x",
            &["addresses: [10.244.1.11]"],
        )));
        let mut moved = redis_service();
        moved.id = ObjectRef::new("pods", "dup-7");
        moved.cluster_ips = vec!["10.96.0.8".parse().unwrap()];
        moved.ports[0].port = 6380;
        model.upsert_service(Arc::new(moved));
        model.recompute();
        model.work() - before
    };
    let small = cost_of_one_change(100);
    let large = cost_of_one_change(5_000);
    assert_eq!(small, large, "work per change grew with the table");
}

#[test]
fn slice_moving_between_services_updates_both() {
    let mut model = Model::default();
    model.upsert_service(Arc::new(redis_service()));
    let mut other = redis_service();
    other.id = ObjectRef::new("pods", "other");
    other.cluster_ips = vec!["10.96.0.101".parse().unwrap()];
    model.upsert_service(Arc::new(other));
    model.upsert_slice(Arc::new(redis_slice("s", &["addresses: [10.244.1.11]"])));
    model.recompute();
    let mut moved = redis_slice("s", &["addresses: [10.244.1.11]"]);
    moved.service = ObjectRef::new("pods", "other");
    model.upsert_slice(Arc::new(moved));
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

#[test]
fn node_changes_recompute_locality_and_health_checks() {
    let mut model = Model::default();
    let svc = web_service(
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
    );
    model.upsert_service(Arc::new(svc));
    model.upsert_slice(Arc::new(web_slice(&[
        ("10.244.1.11", "node-a", "{ready: true}"),
        (
            "10.244.1.12",
            "node-a",
            "{ready: false, serving: true, terminating: true}",
        ),
        ("10.244.2.11", "node-b", "{ready: true}"),
    ])));
    model.set_node(node("node-a", None, &["10.253.0.2"]));
    model.recompute();
    assert_eq!(model.health_checks()[&32000].local_endpoints, 1);
    // The daemon learns it is node-b: everything is recomputed.
    model.set_node(node("node-b", None, &["10.253.0.3"]));
    let changes = model.recompute();
    assert!(
        changes
            .frontends
            .keys()
            .any(|k| k.ip.to_string() == "10.253.0.3")
    );
    assert_eq!(
        changes.frontends.get(&FrontendKey {
            ip: "10.253.0.2".parse().unwrap(),
            port: 30002,
            protocol: Protocol::Tcp,
            scope: Scope::External
        }),
        Some(&None)
    );
    assert_eq!(model.health_checks()[&32000].local_endpoints, 1);
    model.remove_service(&ObjectRef::new("pods", "web"));
    model.recompute();
    assert!(model.health_checks().is_empty());
}

#[test]
fn recompute_stops_when_asked_and_resumes() {
    let mut model = Model::default();
    for i in 0..1000 {
        let mut svc = redis_service();
        svc.id = ObjectRef::new("pods", format!("svc-{i}"));
        svc.cluster_ips = vec![
            format!("10.97.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
        ];
        model.upsert_service(Arc::new(svc));
    }
    let first = model.recompute_until(&|| true);
    assert!(first.interrupted);
    assert!(first.frontends.len() < 1000 && model.pending() > 0);
    let rest = model.recompute();
    assert_eq!(first.frontends.len() + rest.frontends.len(), 1000);
    assert_eq!(model.pending(), 0);
}

/// Addresses that mean this host, no host or a group are never a Service's or a pod's.
#[test]
fn special_addresses_are_refused_as_services_and_endpoints() {
    for (field, value) in [
        ("clusterIP", "127.0.0.1"),
        ("clusterIP", "169.254.1.1"),
        ("clusterIP", "0.0.0.0"),
        ("clusterIP", "224.0.0.1"),
        ("clusterIP", "::1"),
        ("clusterIP", "fe80::1"),
    ] {
        let errors = service_errors(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: pods}}\nspec:\n  {field}: \"{value}\"\n  ports: [{{port: 80}}]\n"
        ));
        assert!(
            errors.contains("never a Service address"),
            "{value}: {errors}"
        );
    }
    let errors = service_errors(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: pods}\nspec:\n  clusterIP: 10.96.0.5\n  externalIPs: [127.0.0.53]\n  ports: [{port: 53}]\n",
    );
    assert!(
        errors.contains("spec.externalIPs[0] 127.0.0.53 is a loopback address"),
        "{errors}"
    );
    let parsed: EndpointSlice = crate::source::manifests::from_yaml(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x, namespace: pods, labels: {kubernetes.io/service-name: redis-master}}\naddressType: IPv4\nports: [{port: 6379}]\nendpoints:\n- addresses: [0.0.0.0]\n",
    )
    .unwrap();
    let errors = SliceSpec::from_k8s(&parsed).unwrap_err().join("\n");
    assert!(
        errors.contains("0.0.0.0 is unspecified, never a pod"),
        "{errors}"
    );
}

#[test]
fn cidrs_contain_what_they_should() {
    let cidr = |s: &str| Cidr::parse(s).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(cidr("203.0.113.0/24").contains(ip("203.0.113.9")));
    assert!(!cidr("203.0.113.0/24").contains(ip("203.0.114.9")));
    assert!(cidr("203.0.113.0/24").contains(ip("::ffff:203.0.113.9")));
    assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
    assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
    assert!(cidr("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
    assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
    assert!(cidr("10.1.2.3").contains(ip("10.1.2.3")));
    assert!(!cidr("10.1.2.3").contains(ip("10.1.2.4")));
}

/// External and load-balancer IPs never take this node's address, another node's, the
/// API server's
/// (its endpoints as the `default/kubernetes` slices list them, or the address the
/// daemon dials), or an address outside `--external-ip-cidrs`; each refusal is
/// reported with the Service and the reason, and the Service's other addresses serve.
#[test]
fn external_addresses_follow_the_policy() {
    let svc = |ips: &str| {
        Arc::new(service(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: claim, namespace: tenant}}\nspec:\n  clusterIP: 10.96.0.77\n  externalIPs: [{ips}]\n  ports: [{{port: 6443}}]\n"
        )))
    };
    let external_ips = |model: &Model| -> Vec<String> {
        let mut ips: Vec<String> = model
            .frontends()
            .values()
            .filter(|f| f.kind == FrontendKind::ExternalIp && f.key.scope == Scope::Internal)
            .map(|f| f.key.ip.to_string())
            .collect();
        ips.sort();
        ips
    };
    let mut model = Model::default();
    let mut here = node("node-a", None, &["10.253.0.2"]);
    here.reserved = vec!["192.0.2.10".parse().unwrap()];
    here.other_nodes = vec![("10.253.0.3".parse().unwrap(), "node-b".into())];
    model.set_node(here.clone());
    model.upsert_service(svc(
        "10.253.0.2, 10.253.0.3, 192.0.2.10, 192.0.2.11, 198.51.100.7",
    ));
    let changes = model.recompute();
    assert_eq!(external_ips(&model), ["192.0.2.11", "198.51.100.7"]);
    let reasons: Vec<String> = changes.refused.iter().map(ToString::to_string).collect();
    assert_eq!(
        reasons,
        [
            "Service tenant/claim: external address 10.253.0.2 is not served: it is this node's own address",
            "Service tenant/claim: external address 10.253.0.3 is not served: it is an address of node node-b",
            "Service tenant/claim: external address 192.0.2.10 is not served: it is an address of the API server",
        ]
    );
    // The API server's endpoints, from its own Service's slices.
    model.upsert_slice(Arc::new(slice(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: kubernetes, namespace: default, labels: {kubernetes.io/service-name: kubernetes}}\naddressType: IPv4\nports: [{name: https, port: 6443}]\nendpoints:\n- addresses: [192.0.2.11]\n",
    )));
    let changes = model.recompute();
    assert_eq!(external_ips(&model), ["198.51.100.7"]);
    assert!(
        changes
            .refused
            .iter()
            .any(|r| r.address.to_string() == "192.0.2.11" && r.reason.contains("API server")),
        "{:?}",
        changes.refused
    );
    // --external-ip-cidrs.
    here.external_ip_cidrs = Some(vec![Cidr::parse("203.0.113.0/24").unwrap()]);
    model.set_node(here);
    let changes = model.recompute();
    assert!(external_ips(&model).is_empty());
    assert!(
        changes
            .refused
            .iter()
            .any(|r| r.address.to_string() == "198.51.100.7"
                && r.reason == "it is outside --external-ip-cidrs 203.0.113.0/24"),
        "{:?}",
        changes.refused
    );
    // The ClusterIP still serves.
    assert!(
        model
            .frontends()
            .values()
            .any(|f| f.kind == FrontendKind::ClusterIp)
    );
}

/// One Service cannot take everyone's capacity: past the per-Service cap only the
/// first frontends are served, its ClusterIPs first, and the cut is reported.
#[test]
fn a_service_is_cut_to_the_per_service_frontend_cap() {
    let ports: Vec<String> = (1..=3)
        .map(|p| format!("{{name: p{p}, port: {p}}}"))
        .collect();
    let svc = service(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: wide, namespace: tenant}}\nspec:\n  clusterIP: 10.96.0.44\n  externalIPs: [198.51.100.1, 198.51.100.2, 198.51.100.3, 198.51.100.4]\n  ports: [{}]\n",
        ports.join(", ")
    ));
    let mut model = Model::default();
    model.upsert_service(Arc::new(svc.clone()));
    model.recompute();
    // 3 ports x (1 ClusterIP + 4 external IPs x 2 scopes).
    assert_eq!(model.frontends().len(), 27);
    model.set_frontend_cap(5);
    let changes = model.recompute();
    assert_eq!(model.frontends().len(), 5);
    let cluster_ips = model
        .frontends()
        .values()
        .filter(|f| f.kind == FrontendKind::ClusterIp)
        .count();
    assert_eq!(cluster_ips, 3, "every ClusterIP kept");
    assert_eq!(
        changes.capped,
        vec![Capped {
            service: svc.id.clone(),
            wanted: 27,
            cap: 5
        }]
    );
    assert!(
        changes.capped[0]
            .to_string()
            .contains("--max-frontends-per-service 5")
    );
}

#[test]
fn node_ports_without_a_node_address_are_reported_once_and_cleared() {
    let mut model = Model::default();
    model.set_node(node("node-a", None, &[]));
    model.upsert_service(Arc::new(web_service("  type: NodePort\n")));
    model.upsert_service(Arc::new(redis_service()));
    let changes = model.recompute();
    let web = ObjectRef::new("pods", "web");
    assert_eq!(changes.unserved.len(), 1, "{:?}", changes.unserved);
    let (service, why) = &changes.unserved[0];
    assert_eq!(service, &web);
    assert!(
        why.contains("node port 30002 is not served: no address of node \"node-a\" is known"),
        "{why}"
    );
    assert_eq!(model.unserved().len(), 1);
    // Recomputed for another reason: still unserved, not reported again.
    model.upsert_service(Arc::new(web_service(
        "  type: NodePort\n  sessionAffinity: ClientIP\n",
    )));
    assert!(model.recompute().unserved.is_empty());
    assert_eq!(model.unserved().len(), 1);
    // The Node's address arrives: served, the note goes.
    model.set_node(node("node-a", None, &["10.253.0.2"]));
    let changes = model.recompute();
    assert!(changes.unserved.is_empty());
    assert!(model.unserved().is_empty());
    assert!(
        model
            .frontends()
            .keys()
            .any(|k| k.to_string() == "10.253.0.2:30002/TCP (external)")
    );
}

/// Endpoints placed alike share one placement, across slices; placements no endpoint
/// holds any more are swept as new ones arrive.
#[test]
fn endpoint_placements_are_shared_and_swept() {
    let on_node = |name: &str, node: &str| {
        slice(&format!(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: pods, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- addresses: [10.244.1.40]
  nodeName: {node}
- addresses: [10.244.1.41]
  nodeName: {node}
"#
        ))
    };
    let a = on_node("a", "placement-test-node");
    let b = on_node("b", "placement-test-node");
    let shared = &a.endpoints[0].placement;
    assert!(Arc::ptr_eq(shared, &a.endpoints[1].placement));
    assert!(Arc::ptr_eq(shared, &b.endpoints[0].placement));
    // A placement dropped by its last endpoint is gone after enough new ones.
    let weak = Arc::downgrade(&on_node("c", "placement-test-gone").endpoints[0].placement);
    for i in 0..2048 {
        spec::Placement {
            node_name: Some(format!("placement-test-{i}")),
            ..Default::default()
        }
        .interned();
    }
    assert!(weak.upgrade().is_none(), "an unused placement was kept");
    assert!(Arc::ptr_eq(
        shared,
        &on_node("d", "placement-test-node").endpoints[0].placement
    ));
}

#[test]
fn local_masks_cover_any_number_of_backends() {
    use frontends::LocalMask;
    let backends: Vec<BackendAddr> = (0..130u32)
        .map(|i| BackendAddr {
            ip: std::net::Ipv4Addr::from(0x0af4_0000 + i).into(),
            port: 80,
        })
        .collect();
    let index = |b: &BackendAddr| match b.ip {
        IpAddr::V4(ip) => u32::from(ip) - 0x0af4_0000,
        IpAddr::V6(_) => unreachable!(),
    };
    let mask = LocalMask::of(&backends, |b| index(b) % 3 == 0 || index(b) == 129);
    for at in 0..140 {
        assert_eq!(
            mask.contains(at),
            at < 130 && (at % 3 == 0 || at == 129),
            "{at}"
        );
    }
    assert_eq!(LocalMask::of(&backends, |_| false), LocalMask::default());
    let all = LocalMask::all(130);
    assert!((0..130).all(|at| all.contains(at)) && !all.contains(130));
}
