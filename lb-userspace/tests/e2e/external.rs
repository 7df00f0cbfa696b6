//! Node ports, external IPs and load-balancer IPs reached from inside the node (the
//! socket hooks serve them; traffic from other machines needs the TC datapath, which
//! does not exist yet), and a pod chosen as the backend of its own Service (hairpin),
//! on a real control plane with the daemon on node A.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Result, ensure};
use libtest_mimic::Trial;

use crate::{
    cluster::{Cluster, shared_control_plane, trial},
    kube::{pod_ips_of, whoami_at},
};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "external::node_port_lb_and_external_ips_from_the_node",
        node_port_lb_and_external_ips_from_the_node,
    )]
}

/// Addresses in the blackholed service range, so a connection the hooks failed to
/// rewrite fails inside the sandbox.
const EXTERNAL_IP: &str = "10.111.254.10";
const LB_IP: &str = "10.111.254.11";

/// The seed's `kubectl expose --type=NodePort`, and a LoadBalancer Service with an
/// external IP and an ingress IP: a pod on node A reaches each through node A's address
/// at the node port, the external IP and the load-balancer IP; a backend pod reaching
/// its own Service answers itself.
fn node_port_lb_and_external_ips_from_the_node() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_a = cluster.nodes[0].name.clone();
    let node_a_ip = cluster.nodes[0].net().ipv4.to_string();
    let daemon = cluster.daemon(0, &[])?;
    cluster.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: redis}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: redis}}}}
  template:
    metadata: {{labels: {{app: redis}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node_a}}}
      containers: [{{name: redis, image: redis, ports: [{{containerPort: 6379}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{role: client}}}}
spec:
  nodeName: {node_a}
  containers: [{{name: sleep, image: busybox, command: [sleep, infinity]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: redis-lb}}
spec:
  type: LoadBalancer
  selector: {{app: redis}}
  externalIPs: [{EXTERNAL_IP}]
  ports: [{{port: 6379}}]
"#
    ))?;
    cluster.kubectl(&[
        "expose",
        "deployment",
        "redis",
        "--type=NodePort",
        "--port=6379",
        "--name=redis-np",
    ])?;
    cluster.kubectl(&[
        "patch",
        "service",
        "redis-lb",
        "--subresource=status",
        "-p",
        &format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{LB_IP}"}}]}}}}}}"#),
    ])?;
    let names = cluster.wait_ready("app=redis", 2)?;
    let ips = pod_ips_of(&cluster, "app=redis", &names)?;
    cluster.wait_ready("role=client", 1)?;
    let node_port = cluster.kubectl(&[
        "get",
        "service",
        "redis-np",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ])?;
    let node_port = node_port.trim().to_string();
    ensure!(node_port.parse::<u16>().is_ok(), "nodePort {node_port:?}");

    // Every address is programmed with both backends, in both scopes.
    let want: BTreeSet<String> = ips.iter().map(|ip| format!("{ip}:6379")).collect();
    for (address, port) in [
        (node_a_ip.as_str(), node_port.as_str()),
        (EXTERNAL_IP, "6379"),
        (LB_IP, "6379"),
    ] {
        let port: u16 = port.parse()?;
        cluster.wait(
            &format!("{address}:{port} programmed"),
            Duration::from_secs(20),
            || {
                let listed = daemon.list()?;
                let scopes: BTreeSet<String> = listed
                    .iter()
                    .filter(|fe| fe["address"] == address && fe["port"] == port)
                    .filter(|fe| {
                        let backends: BTreeSet<String> = fe["backends"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|b| {
                                format!("{}:{}", b["address"].as_str().unwrap_or(""), b["port"])
                            })
                            .collect();
                        backends == want
                    })
                    .filter_map(|fe| fe["scope"].as_str().map(str::to_string))
                    .collect();
                Ok((scopes.len() == 2).then_some(()))
            },
        )?;
    }

    for (address, port) in [
        (node_a_ip.as_str(), node_port.as_str()),
        (EXTERNAL_IP, "6379"),
        (LB_IP, "6379"),
    ] {
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            let who = whoami_at(&cluster, "web", address, port)?;
            ensure!(names.contains(&who), "{address}:{port} answered {who:?}");
            seen.insert(who);
        }
        ensure!(seen.len() == 2, "{address}:{port} reached only {seen:?}");
    }

    // Hairpin: a backend pod dialling its own Service may be chosen itself, and answers.
    let cluster_ip = cluster.cluster_ip("redis-np")?;
    let mut answers = BTreeSet::new();
    for _ in 0..20 {
        let who = whoami_at(&cluster, &names[0], &cluster_ip, "6379")?;
        ensure!(names.contains(&who), "hairpin answered {who:?}");
        answers.insert(who);
    }
    ensure!(
        answers.contains(&names[0]),
        "{} never reached itself through its Service: {answers:?}",
        names[0]
    );

    // The operator is told these addresses are not served from other machines yet.
    let log = daemon.log_text();
    for what in [
        format!(
            "node port {node_a_ip}:{node_port}/TCP is served to connections made on this node only"
        ),
        format!("external IP {EXTERNAL_IP}:6379/TCP is served"),
        format!("load-balancer IP {LB_IP}:6379/TCP is served"),
    ] {
        ensure!(log.contains(&what), "no line {what:?} in:\n{log}");
    }
    Ok(())
}
