//! Service behaviours that upstream's specs check with agnhost (its test server, run
//! for real by the kubelet stand-in): ports of sidecar containers, UDP from an endpoint
//! to its own Service, large requests over HTTP and UDP, on a real control plane.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context as _, Result, ensure};
use libtest_mimic::Trial;

use crate::{
    cluster::{Cluster, shared_control_plane, trial},
    external::AGNHOST,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "agnhost::restartable_init_container_ports_are_served",
            restartable_init_container_ports_are_served,
        ),
        trial(
            "agnhost::udp_http_and_large_requests_from_pods_and_endpoints",
            udp_http_and_large_requests_from_pods_and_endpoints,
        ),
        trial(
            "agnhost::endpoints_in_several_slices_written_by_hand",
            endpoints_in_several_slices_written_by_hand,
        ),
    ]
}

/// Services without a selector whose EndpointSlices a user writes (upstream's
/// "multiple endpoint IPs / multiple ports specified in multiple EndpointSlices"),
/// for two agnhost pods: one port whose two endpoints sit in two slices reaches both
/// pods; two named ports, each in a slice of its own naming a different pod, reach
/// each its own pod, on the target port its slice gives.
fn endpoints_in_several_slices_written_by_hand() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let _daemon = cluster.daemon(0, &[])?;
    let pod = |name: &str, port: u16| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: by-hand}}}}
spec:
  containers:
  - name: netexec
    image: {AGNHOST}
    args: [netexec, --http-port={port}, --udp-port=-1]
---
"#
        )
    };
    cluster.apply(&format!("{}{}", pod("one", 8090), pod("two", 8091)))?;
    let names = cluster.wait_ready("app=by-hand", 2)?;
    let ips = crate::kube::pod_ips_of(&cluster, "app=by-hand", &names)?;
    let ip_of = |pod: &str| -> Result<String> {
        names
            .iter()
            .zip(&ips)
            .find(|(name, _)| *name == pod)
            .map(|(_, ip)| ip.clone())
            .with_context(|| format!("the address of pod {pod}"))
    };
    let (one, two) = (ip_of("one")?, ip_of("two")?);
    let slice = |name: &str, service: &str, ip: &str, port_name: &str, port: u16| {
        format!(
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  labels: {{kubernetes.io/service-name: {service}, endpointslice.kubernetes.io/managed-by: lb.test}}
addressType: IPv4
endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]
ports: [{{name: {port_name}, port: {port}, protocol: TCP}}]
---
"#
        )
    };
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: multi-ip}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: multi-port}}
spec:
  ports: [{{name: a, port: 80}}, {{name: b, port: 81}}]
---
{}{}{}{}"#,
        slice("multi-ip-1", "multi-ip", &one, "http", 8090),
        slice("multi-ip-2", "multi-ip", &two, "http", 8091),
        slice("multi-port-a", "multi-port", &one, "a", 8090),
        slice("multi-port-b", "multi-port", &two, "b", 8091),
    ))?;
    cluster.run_client("client")?;
    let reached = |service: &str, port: u16, want: &[&str]| -> Result<()> {
        let vip = cluster.cluster_ip(service)?;
        let url = format!("http://{vip}:{port}/hostname");
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let seen = cluster.wait(
            &format!("{service}:{port} reaching {want:?}"),
            Duration::from_secs(30),
            || {
                let seen = (0..20)
                    .map(|_| curl(&cluster, "client", &url))
                    .collect::<Result<BTreeSet<_>>>()?;
                Ok((seen == want).then_some(seen))
            },
        )?;
        eprintln!("{service}:{port}: {seen:?}");
        Ok(())
    };
    reached("multi-ip", 80, &["one", "two"])?;
    reached("multi-port", 80, &["one"])?;
    reached("multi-port", 81, &["two"])?;
    Ok(())
}

/// A pod whose server is a sidecar (a restartable init container: agnhost netexec on
/// port 80, named `http`) and whose main container only pauses, behind two Services:
/// one by port number, one by port name. The EndpointSlice controller finds the port
/// on the sidecar; a client pod reaches the server through both ClusterIPs (upstream's
/// "ports exposed by restartable init containers", numbered and named).
fn restartable_init_container_ports_are_served() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let _daemon = cluster.daemon(0, &[])?;
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: sidecar, labels: {{app: sidecar}}}}
spec:
  initContainers:
  - name: server
    image: {AGNHOST}
    restartPolicy: Always
    args: [netexec, --http-port=80, --udp-port=-1]
    ports: [{{name: http, containerPort: 80}}]
  containers:
  - name: main
    image: {AGNHOST}
    args: [pause]
---
apiVersion: v1
kind: Service
metadata: {{name: by-number}}
spec:
  selector: {{app: sidecar}}
  ports: [{{port: 8080, targetPort: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: by-name}}
spec:
  selector: {{app: sidecar}}
  ports: [{{port: 8081, targetPort: http}}]
"#
    ))?;
    cluster.wait_ready("app=sidecar", 1)?;
    cluster.run_client("client")?;
    for (service, port) in [("by-number", "8080"), ("by-name", "8081")] {
        let vip = cluster.cluster_ip(service)?;
        let url = format!("http://{vip}:{port}/hostname");
        cluster.wait(
            &format!("{service} served by the sidecar"),
            Duration::from_secs(30),
            || Ok((curl(&cluster, "client", &url)? == "sidecar").then_some(())),
        )?;
    }
    Ok(())
}

/// Two agnhost netexec endpoints behind a NodePort Service with a UDP and an HTTP
/// port. From one of the endpoints (upstream's "endpoint-Service" checks) and from
/// another pod ("pod-Service"): UDP and HTTP through the ClusterIP and through the
/// node ports on the node's address reach both endpoints (the endpoint itself
/// included); from the other pod, a 2 000-byte UDP datagram comes back whole (upstream's
/// "large requests: udp", which needs more than one fragment's worth on small MTUs),
/// and an HTTP request with a 2 000-byte URL is answered through the ClusterIP
/// ("large requests: http").
fn udp_http_and_large_requests_from_pods_and_endpoints() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let _daemon = cluster.daemon(0, &[])?;
    let node_ip = cluster.nodes[0].net().ipv4.to_string();
    cluster.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: netexec}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: netexec}}}}
  template:
    metadata: {{labels: {{app: netexec}}}}
    spec:
      containers:
      - name: netexec
        image: {AGNHOST}
        args: [netexec, --http-port=8080, --udp-port=8081]
        ports: [{{containerPort: 8080}}, {{containerPort: 8081, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: netexec}}
spec:
  type: NodePort
  selector: {{app: netexec}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: udp, port: 90, targetPort: 8081, protocol: UDP}}
"#
    ))?;
    let pods = cluster.wait_ready("app=netexec", 2)?;
    let vip = cluster.cluster_ip("netexec")?;
    let node_port = |name: &str| -> Result<String> {
        let jsonpath = format!("jsonpath={{.spec.ports[?(@.name==\"{name}\")].nodePort}}");
        Ok(cluster
            .kubectl(&["get", "service", "netexec", "-o", &jsonpath])?
            .trim()
            .to_string())
    };
    let (http_node_port, udp_node_port) = (node_port("http")?, node_port("udp")?);
    let want: BTreeSet<String> = pods.iter().cloned().collect();
    let paths = [
        ("UDP", vip.as_str(), "90"),
        ("UDP", node_ip.as_str(), udp_node_port.as_str()),
        ("HTTP", vip.as_str(), "80"),
        ("HTTP", node_ip.as_str(), http_node_port.as_str()),
    ];
    // From an endpoint ("endpoint-Service") and from another pod ("pod-Service").
    cluster.run_client("client")?;
    let from_endpoint = &pods[0];
    for from in [from_endpoint.as_str(), "client"] {
        for (protocol, host, port) in paths {
            // Each request from a new socket: a new choice of endpoint.
            let ask = || match protocol {
                "UDP" => udp_request(&cluster, from, host, port, "hostname"),
                _ => curl(&cluster, from, &format!("http://{host}:{port}/hostname")),
            };
            let reached = cluster.wait(
                &format!("{protocol} from {from} via {host}:{port} reaching both endpoints"),
                Duration::from_secs(30),
                || {
                    let seen = (0..20).map(|_| ask()).collect::<Result<BTreeSet<_>>>()?;
                    Ok((seen == want).then_some(seen))
                },
            )?;
            eprintln!("{protocol} from {from} via {host}:{port}: {reached:?}");
        }
    }
    let message = "42".repeat(1000);
    let echoed = udp_request(&cluster, "client", &vip, "90", &format!("echo {message}"))?;
    ensure!(
        echoed == message,
        "a 2 000-byte datagram came back as {} bytes",
        echoed.len()
    );
    let answer = curl(
        &cluster,
        "client",
        &format!("http://{vip}/echo?msg={message}"),
    )?;
    ensure!(
        answer == message,
        "a 2 000-byte URL was answered with {} bytes",
        answer.len()
    );
    Ok(())
}

/// `curl -s` from pod `pod`: the body, trimmed (empty on failure).
fn curl(cluster: &Cluster, pod: &str, url: &str) -> Result<String> {
    let out = cluster.exec(pod, &["curl", "-s", "--max-time", "3", url])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One UDP request from pod `pod` (a new socket) to `host:port`: the answer, or
/// "timeout" after a second.
fn udp_request(
    cluster: &Cluster,
    pod: &str,
    host: &str,
    port: &str,
    request: &str,
) -> Result<String> {
    let script = format!(
        r#"import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
u.sendto(sys.argv[1].encode(), ('{host}', {port}))
try: print(u.recvfrom(65536)[0].decode())
except socket.timeout: print('timeout')
"#
    );
    let out = cluster.exec(pod, &["python3", "-c", &script, request])?;
    ensure!(
        out.status.success(),
        "UDP request from {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
