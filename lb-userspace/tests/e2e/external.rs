//! Node ports, external IPs and load-balancer IPs, on a real control plane:
//! - reached from inside node A (the socket hooks serve them), and a pod chosen as the
//!   backend of its own Service (hairpin);
//! - reached from an outside client that only sees the nodes' addresses (the TC
//!   programs on each node's uplink): spread over both nodes' pods, the same backend
//!   from either node (Maglev), externalTrafficPolicy Local with its health-check node
//!   port, UDP, external IPs and loadBalancerSourceRanges.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_testbed::{Pod, output_with_timeout, world::World};
use libtest_mimic::Trial;

use crate::{
    cluster::{Cluster, shared_control_plane, trial},
    kube::{pod_ips_of, whoami, whoami_at},
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "external::ipv6_node_ports_from_manifests",
            ipv6_node_ports_from_manifests,
        ),
        trial(
            "external::node_port_lb_and_external_ips_from_the_node",
            node_port_lb_and_external_ips_from_the_node,
        ),
        trial(
            "external::node_ports_from_other_machines",
            node_ports_from_other_machines,
        ),
        trial(
            "external::rolling_updates_behind_node_ports_fail_no_connection",
            rolling_updates_behind_node_ports_fail_no_connection,
        ),
        trial(
            "external::terminating_endpoints_serve_outside_clients_while_the_health_check_fails",
            terminating_endpoints_serve_outside_clients_while_the_health_check_fails,
        ),
        trial(
            "external::node_port_edits_in_place_are_followed_from_outside",
            node_port_edits_in_place_are_followed_from_outside,
        ),
        trial(
            "external::dns_node_port_edits_over_tcp_and_udp_from_outside",
            dns_node_port_edits_over_tcp_and_udp_from_outside,
        ),
        trial(
            "external::session_affinity_from_outside_is_the_same_on_both_nodes",
            session_affinity_from_outside_is_the_same_on_both_nodes,
        ),
        trial(
            "external::tracked_flows_expire_follow_their_backend_and_empty_node_ports_refuse",
            tracked_flows_expire_follow_their_backend_and_empty_node_ports_refuse,
        ),
        trial(
            "external::udp_flow_follows_a_target_port_change_from_outside",
            udp_flow_follows_a_target_port_change_from_outside,
        ),
        trial(
            "external::type_changes_through_external_name_are_followed",
            type_changes_through_external_name_are_followed,
        ),
    ]
}

/// Upstream's agnhost image: the kubelet stand-in runs the real program.
pub(crate) const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.63.0";

/// A UDP NodePort Service's targetPort changes from 80 to 81 while an outside client
/// sends a datagram every 100 ms from one source port through node A to a pod on node
/// B that serves both ports (two agnhost netexec containers, each answering
/// `serverport` with its own port). kube-proxy deletes the conntrack entries of the
/// removed endpoint; lb flushes its tracked UDP flows: the same flow reaches port 81
/// soon after the change, although port 80 still answers and the flow never idles
/// (without the flush it would stay on 80 for as long as it lives).
fn udp_flow_follows_a_target_port_change_from_outside() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_b = cluster.nodes[1].name.clone();
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    let daemon_a = cluster.daemon(0, &[])?;
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: udp-server, labels: {{app: udp-server}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node_b}}}
  containers:
  - name: udp80
    image: {AGNHOST}
    args: [netexec, --http-port=8080, --udp-port=80]
    ports: [{{containerPort: 80, protocol: UDP}}]
  - name: udp81
    image: {AGNHOST}
    args: [netexec, --http-port=8081, --udp-port=81]
    ports: [{{containerPort: 81, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: udp-target}}
spec:
  type: NodePort
  selector: {{app: udp-server}}
  ports: [{{port: 80, targetPort: 80, protocol: UDP}}]
"#
    ))?;
    cluster.wait_ready("app=udp-server", 1)?;
    let pod_ip = pod_ip_of(&cluster, "app=udp-server", "udp-server")?;
    let np = node_port_of(&cluster, "udp-target")?;
    let backend_is = |port: u16| -> Result<Option<()>> {
        let backends = daemon_a.backends_of(&a_ip, np.parse()?, "UDP")?;
        Ok((backends == Some(vec![format!("{pod_ip}:{port}")])).then_some(()))
    };
    cluster.wait(
        "node A serves the node port",
        Duration::from_secs(30),
        || backend_is(80),
    )?;

    // One flow, 12 s of datagrams; the change after 4 s.
    let stream = {
        let (world, client, a_ip, np) = (world.clone(), client.clone(), a_ip.clone(), np.clone());
        std::thread::spawn(move || outside_udp_stream(&world, &client, &a_ip, &np, 46000, 12.0))
    };
    std::thread::sleep(Duration::from_secs(4));
    let changed_at = unix_seconds();
    cluster.kubectl(&[
        "patch",
        "service",
        "udp-target",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ports/0/targetPort","value":81}]"#,
    ])?;
    cluster.wait("node A's new backend", Duration::from_secs(10), || {
        backend_is(81)
    })?;
    let programmed_after = unix_seconds() - changed_at;
    let answers = stream
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP stream panicked"))??;
    let before: Vec<&str> = answers
        .iter()
        .filter(|(t, _)| *t < changed_at)
        .map(|(_, a)| a.as_str())
        .collect();
    let first_81 = answers
        .iter()
        .find(|(_, a)| a == "81")
        .map(|(t, _)| t - changed_at);
    let after: Vec<&str> = answers
        .iter()
        .filter(|(t, _)| *t > changed_at + programmed_after + 0.5)
        .map(|(_, a)| a.as_str())
        .collect();
    eprintln!(
        "targetPort 80 -> 81: programmed after {programmed_after:.2} s, first answer from 81 \
         after {first_81:?} s; {} answers before, {} after",
        before.len(),
        after.len()
    );
    ensure!(
        before.len() >= 20 && before.iter().all(|a| *a == "80"),
        "before the change: {before:?}"
    );
    ensure!(
        after.len() >= 20 && after.iter().all(|a| *a == "81"),
        "the flow did not move to port 81 within 0.5 s of the new backend: {answers:?}"
    );
    Ok(())
}

/// Upstream's type changes through ExternalName, as the proxy sees them: ClusterIP ->
/// ExternalName (the API server releases the ClusterIP; lb stops serving it at once),
/// ExternalName -> NodePort (a new ClusterIP and a node port, both served, the node
/// port from another machine) and NodePort -> ExternalName (both go: the node port
/// refuses from outside, the ClusterIP leaves the maps). The DNS side of ExternalName
/// (a CNAME) is cluster DNS's, not the proxy's.
fn type_changes_through_external_name_are_followed() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let node_a = cluster.nodes[0].name.clone();
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let outside_client = world.add_outside("outside")?;
    let daemon = cluster.daemon(0, &[])?;
    let pods_yaml = pinned_redis("xn", 1, &node_a);
    cluster.apply(&format!(
        r#"{pods_yaml}apiVersion: v1
kind: Service
metadata: {{name: xn}}
spec:
  selector: {{app: xn}}
  ports: [{{port: 6379}}]
"#
    ))?;
    let pod = cluster.wait_ready("app=xn", 1)?.remove(0);
    cluster.run_client("client")?;
    let served = |vip: &str| -> Result<Option<()>> {
        Ok((whoami(&cluster, "client", vip)? == pod).then_some(()))
    };
    // The daemon serves every test's namespace: only this one's frontends count.
    let ours = format!("{}/", cluster.namespace);
    let our_frontends = || -> Result<Vec<serde_json::Value>> {
        Ok(daemon
            .list()?
            .into_iter()
            .filter(|fe| fe["service"].as_str().is_some_and(|s| s.starts_with(&ours)))
            .collect())
    };
    let listed =
        |vip: &str| -> Result<bool> { Ok(our_frontends()?.iter().any(|fe| fe["address"] == vip)) };
    let first_vip = cluster.cluster_ip("xn")?;
    cluster.wait("the ClusterIP served", Duration::from_secs(30), || {
        served(&first_vip)
    })?;
    let to_external_name = || {
        cluster.kubectl(&[
            "patch",
            "service",
            "xn",
            "-p",
            r#"{"spec":{"type":"ExternalName","externalName":"redis.example.com"}}"#,
        ])
    };

    to_external_name()?;
    let spec = cluster.kubectl(&["get", "service", "xn", "-o", "jsonpath={.spec.clusterIP}"])?;
    ensure!(
        spec.trim().is_empty(),
        "an ExternalName Service kept clusterIP {spec}"
    );
    cluster.wait("the old ClusterIP dropped", Duration::from_secs(10), || {
        Ok((!listed(&first_vip)?).then_some(()))
    })?;
    let answer = whoami(&cluster, "client", &first_vip)?;
    ensure!(
        answer != pod,
        "the released ClusterIP {first_vip} still reaches {pod}"
    );

    cluster.kubectl(&[
        "patch",
        "service",
        "xn",
        "-p",
        r#"{"spec":{"type":"NodePort","externalName":null,"ports":[{"port":6379}]}}"#,
    ])?;
    let vip = cluster.cluster_ip("xn")?;
    let np = node_port_of(&cluster, "xn")?;
    cluster.wait("the new ClusterIP served", Duration::from_secs(10), || {
        served(&vip)
    })?;
    cluster.wait(
        "the node port served from outside",
        Duration::from_secs(10),
        || {
            Ok(
                (outside_whoami(&world, &outside_client, &a_ip, &np, 0).ok() == Some(pod.clone()))
                    .then_some(()),
            )
        },
    )?;

    to_external_name()?;
    cluster.wait("both dropped", Duration::from_secs(10), || {
        let refused = outside_whoami(&world, &outside_client, &a_ip, &np, 0)
            .is_err_and(|e| format!("{e:#}").contains("ConnectionRefused"));
        Ok((refused && !listed(&vip)?).then_some(()))
    })?;
    let left = our_frontends()?;
    ensure!(
        left.is_empty(),
        "an ExternalName Service still has frontends: {left:?}"
    );
    Ok(())
}

/// Seconds since the Unix epoch (the clock python's `time.time()` reads).
pub(crate) fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One UDP flow (fixed `source_port`) from the outside client to `host:port` for
/// `seconds`: a `serverport` request every 100 ms, each answer (or "timeout" after
/// 300 ms) with the time it was sent.
fn outside_udp_stream(
    world: &World,
    client: &Pod,
    host: &str,
    port: &str,
    source_port: u16,
    seconds: f64,
) -> Result<Vec<(f64, String)>> {
    let script = format!(
        r#"import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.3)
u.bind(('{source}', {source_port})); u.connect(('{host}', {port}))
end = time.time() + {seconds}
while time.time() < end:
    t = time.time()
    try:
        u.send(b'serverport'); print(t, u.recv(100).decode())
    except ConnectionRefusedError: print(t, 'refused')
    except socket.timeout: print(t, 'timeout')
    time.sleep(max(0, t + 0.1 - time.time()))
"#,
        source = client.ipv4
    );
    let out = outside(
        world,
        client,
        &["python3", "-c", &script],
        Duration::from_secs_f64(seconds + 10.0),
    )?;
    timed_answers(&out)
}

/// Lines of "<unix time> <answer>", as the UDP stream scripts print them.
pub(crate) fn timed_answers(out: &str) -> Result<Vec<(f64, String)>> {
    out.lines()
        .map(|line| {
            let (t, answer) = line.split_once(' ').context("a line without answer")?;
            Ok((t.parse()?, answer.to_string()))
        })
        .collect()
}

/// `kubectl rollout restart` of a 3-replica Deployment (on node A; a 3 s preStop, no
/// pod unavailable) behind two node ports, while an outside client opens a new
/// connection every 20 ms through each: through node B (externalTrafficPolicy
/// Cluster, SNAT to node A's pods) and through node A (Local). Not one connection
/// fails, and both streams reach old pods and new ones.
fn rolling_updates_behind_node_ports_fail_no_connection() -> Result<()> {
    use crate::{probe::Probe, reliability::tally};
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_a = cluster.nodes[0].name.clone();
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let b_ip = cluster.nodes[1].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    let daemon_a = cluster.daemon(0, &[])?;
    let daemon_b = cluster.daemon(1, &[])?;
    cluster.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: roll}}
spec:
  replicas: 3
  strategy: {{rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}}}
  selector: {{matchLabels: {{app: roll}}}}
  template:
    metadata: {{labels: {{app: roll}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node_a}}}
      terminationGracePeriodSeconds: 10
      containers:
      - name: redis
        image: redis
        ports: [{{containerPort: 6379}}]
        lifecycle: {{preStop: {{sleep: {{seconds: 3}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: roll-cluster}}
spec:
  type: NodePort
  selector: {{app: roll}}
  ports: [{{port: 6379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: roll-local}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {{app: roll}}
  ports: [{{port: 6379}}]
"#
    ))?;
    let before: BTreeSet<String> = cluster.wait_ready("app=roll", 3)?.into_iter().collect();
    let cluster_np = node_port_of(&cluster, "roll-cluster")?;
    let local_np = node_port_of(&cluster, "roll-local")?;
    for (daemon, ip, port) in [
        (&daemon_b, &b_ip, &cluster_np),
        (&daemon_a, &a_ip, &local_np),
    ] {
        cluster.wait("3 backends", Duration::from_secs(30), || {
            Ok(daemon
                .backends_of(ip, port.parse()?, "TCP")?
                .filter(|b| b.len() == 3)
                .map(|_| ()))
        })?;
    }
    let through_b = Probe::start_in(&world, &client, None, &["load", &b_ip, &cluster_np, "20"])?;
    let through_a = Probe::start_in(&world, &client, None, &["load", &a_ip, &local_np, "20"])?;
    std::thread::sleep(Duration::from_millis(500));
    cluster.kubectl(&["rollout", "restart", "deployment", "roll"])?;
    cluster.kubectl(&["rollout", "status", "deployment", "roll", "--timeout=120s"])?;
    // The last old pod's preStop: its connections drain while new ones go elsewhere.
    std::thread::sleep(Duration::from_secs(4));
    let after: BTreeSet<String> = cluster.wait_ready("app=roll", 3)?.into_iter().collect();
    ensure!(
        before.is_disjoint(&after),
        "not rolled: {before:?} then {after:?}"
    );
    for (path, probe) in [
        ("node B, Cluster", &through_b),
        ("node A, Local", &through_a),
    ] {
        let (ok, failed, by_backend) = tally(probe);
        ensure!(
            failed.is_empty(),
            "{path}: {} of {} connections failed during the rollout: {:?}",
            failed.len(),
            ok + failed.len(),
            &failed[..failed.len().min(10)]
        );
        let reached: BTreeSet<String> = by_backend.keys().cloned().collect();
        ensure!(
            ok > 100 && !reached.is_disjoint(&before) && !reached.is_disjoint(&after),
            "{path}: {ok} connections reached {by_backend:?} (old {before:?}, new {after:?})"
        );
        eprintln!("{path}: {ok} connections during the rollout, none failed: {by_backend:?}");
    }
    Ok(())
}

/// The only pod (no controller replaces it) of two LoadBalancer Services
/// (externalTrafficPolicy Local and Cluster) on node A starts terminating (a 30 s
/// preStop): node A's health-check node
/// port turns to 503 with no local endpoint, so a load balancer stops sending new
/// clients, while clients that still come are served by the terminating pod, through
/// node A (Local) and through node B (Cluster, SNAT), rather than refused: kube-proxy's
/// terminating fallback, from outside.
fn terminating_endpoints_serve_outside_clients_while_the_health_check_fails() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_a = cluster.nodes[0].name.clone();
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let b_ip = cluster.nodes[1].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    let daemon_a = cluster.daemon(0, &[])?;
    let daemon_b = cluster.daemon(1, &[])?;
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: term, labels: {{app: term}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node_a}}}
  terminationGracePeriodSeconds: 40
  containers:
  - name: redis
    image: redis
    ports: [{{containerPort: 6379}}]
    lifecycle: {{preStop: {{sleep: {{seconds: 30}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: term-local}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {{app: term}}
  ports: [{{port: 6379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: term-cluster}}
spec:
  type: LoadBalancer
  selector: {{app: term}}
  ports: [{{port: 6379}}]
"#
    ))?;
    let pod = cluster.wait_ready("app=term", 1)?.remove(0);
    let local_np = node_port_of(&cluster, "term-local")?;
    let cluster_np = node_port_of(&cluster, "term-cluster")?;
    let health = cluster.kubectl(&[
        "get",
        "service",
        "term-local",
        "-o",
        "jsonpath={.spec.healthCheckNodePort}",
    ])?;
    let health = health.trim().to_string();
    let health_check = || -> Result<String> {
        outside(
            &world,
            &client,
            &[
                "curl",
                "-s",
                "--max-time",
                "2",
                "-w",
                " %{http_code}",
                &format!("http://{a_ip}:{health}/healthz"),
            ],
            Duration::from_secs(5),
        )
    };
    let served = |host: &str, port: &str| -> Result<Option<()>> {
        Ok(outside_whoami(&world, &client, host, port, 0)
            .ok()
            .filter(|who| *who == pod)
            .map(|_| ()))
    };
    cluster.wait("both node ports served", Duration::from_secs(30), || {
        Ok(served(&a_ip, &local_np)?.and(served(&b_ip, &cluster_np)?))
    })?;
    cluster.wait("the health check passing", Duration::from_secs(20), || {
        Ok(health_check()
            .ok()
            .filter(|a| a.ends_with(" 200") && a.contains(r#""localEndpoints":1"#)))
    })?;

    cluster.kubectl(&["delete", "pod", &pod, "--wait=false"])?;
    let failing = cluster.wait("the health check failing", Duration::from_secs(20), || {
        Ok(health_check().ok().filter(|a| a.ends_with(" 503")))
    })?;
    ensure!(
        failing.contains(r#""localEndpoints":0"#),
        "health check while terminating: {failing}"
    );
    for (node, host, port) in [("A", &a_ip, &local_np), ("B", &b_ip, &cluster_np)] {
        let who = outside_whoami(&world, &client, host, port, 0)
            .with_context(|| format!("through node {node} while {pod} terminates"))?;
        ensure!(
            who == pod,
            "through node {node}: {who}, not the terminating {pod}"
        );
    }
    drop((daemon_a, daemon_b));
    Ok(())
}

/// A LoadBalancer Service edited in place, seen from another machine through node A:
/// its externalTrafficPolicy switched to Local (a health-check node port appears and
/// answers 200 with the local endpoint count) and back (the port closes); its node
/// port changed (the old one refuses at once, the new one serves); its type changed
/// to ClusterIP (the node port refuses).
fn node_port_edits_in_place_are_followed_from_outside() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_a = cluster.nodes[0].name.clone();
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    let _daemon_a = cluster.daemon(0, &[])?;
    let pods_yaml = pinned_redis("edited", 1, &node_a);
    cluster.apply(&format!(
        r#"{pods_yaml}apiVersion: v1
kind: Service
metadata: {{name: edited}}
spec:
  type: LoadBalancer
  selector: {{app: edited}}
  ports: [{{port: 6379}}]
"#
    ))?;
    let pod = cluster.wait_ready("app=edited", 1)?.remove(0);
    let np = node_port_of(&cluster, "edited")?;
    // (connected, refused) for one TCP connect from outside.
    let connect = |port: &str| -> Result<String> {
        let script = format!(
            "import socket\ns = socket.socket(); s.settimeout(3)\n\
             try:\n    s.connect(('{a_ip}', {port})); print('open')\n\
             except ConnectionRefusedError: print('refused')\n\
             except socket.timeout: print('timeout')\n"
        );
        outside(
            &world,
            &client,
            &["python3", "-c", &script],
            Duration::from_secs(10),
        )
    };
    cluster.wait("the node port served", Duration::from_secs(30), || {
        Ok(outside_whoami(&world, &client, &a_ip, &np, 0)
            .ok()
            .filter(|who| *who == pod))
    })?;
    let patch = |json: &str| cluster.kubectl(&["patch", "service", "edited", "-p", json]);

    patch(r#"{"spec":{"externalTrafficPolicy":"Local"}}"#)?;
    let health = cluster.wait("a health-check node port", Duration::from_secs(20), || {
        let port = cluster.kubectl(&[
            "get",
            "service",
            "edited",
            "-o",
            "jsonpath={.spec.healthCheckNodePort}",
        ])?;
        Ok(Some(port.trim().to_string()).filter(|p| !p.is_empty()))
    })?;
    let answer = cluster.wait(
        "the health check answering",
        Duration::from_secs(20),
        || {
            Ok(outside(
                &world,
                &client,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "2",
                    "-w",
                    " %{http_code}",
                    &format!("http://{a_ip}:{health}/healthz"),
                ],
                Duration::from_secs(5),
            )
            .ok()
            .filter(|a| a.ends_with(" 200")))
        },
    )?;
    ensure!(
        answer.contains(r#""localEndpoints":1"#),
        "health check: {answer}"
    );
    patch(r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#)?;
    cluster.wait(
        "the health-check port closed",
        Duration::from_secs(20),
        || Ok((connect(&health)? == "refused").then_some(())),
    )?;

    let new_np = if np == "30999" { "30998" } else { "30999" };
    patch(&format!(
        r#"{{"spec":{{"ports":[{{"port":6379,"nodePort":{new_np}}}]}}}}"#
    ))?;
    cluster.wait("the new node port served", Duration::from_secs(20), || {
        Ok(outside_whoami(&world, &client, &a_ip, new_np, 0)
            .ok()
            .filter(|who| *who == pod))
    })?;
    ensure!(
        connect(&np)? == "refused",
        "the old node port {np} did not refuse"
    );

    patch(r#"{"spec":{"type":"ClusterIP","ports":[{"port":6379}]}}"#)?;
    cluster.wait("the node port gone", Duration::from_secs(20), || {
        Ok((connect(new_np)? == "refused").then_some(()))
    })?;
    Ok(())
}

/// A DNS Service edited as upstream's protocol and UDP node-port specs edit theirs,
/// seen from another machine through node A: a ClusterIP Service on TCP 53 becomes a
/// NodePort, then gains UDP 53 on the same node port number, and both protocols
/// answer through it; the UDP port's number changes (the new one answers, the old
/// one refuses at once, port unreachable, while TCP goes on); back to ClusterIP, both
/// refuse.
fn dns_node_port_edits_over_tcp_and_udp_from_outside() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_a = cluster.nodes[0].name.clone();
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    let _daemon_a = cluster.daemon(0, &[])?;
    let dns = dns_deployment(&node_a);
    cluster.apply(&format!(
        r#"{dns}apiVersion: v1
kind: Service
metadata: {{name: dns-edit}}
spec:
  selector: {{app: dns}}
  ports: [{{name: tcp, port: 53, protocol: TCP}}]
"#
    ))?;
    let pod = cluster.wait_ready("app=dns", 1)?.remove(0);
    let pod_ip = pod_ip_of(&cluster, "app=dns", &pod)?;
    // A JSON patch: a strategic merge keys ports by number alone, and both are 53.
    let patch =
        |ops: &str| cluster.kubectl(&["patch", "service", "dns-edit", "--type=json", "-p", ops]);
    patch(r#"[{"op":"replace","path":"/spec/type","value":"NodePort"}]"#)?;
    let np = node_port_of(&cluster, "dns-edit")?;
    patch(&format!(
        r#"[{{"op":"add","path":"/spec/ports/-","value":{{"name":"udp","port":53,"protocol":"UDP","nodePort":{np}}}}}]"#
    ))?;
    // The answer of `whoami.test` through node A's `port`, over TCP or UDP.
    let ask = |tcp: bool, port: &str| -> Result<String> {
        let mut argv = vec!["dig", "+short", "+time=1", "+tries=1"];
        if tcp {
            argv.push("+tcp");
        }
        let at = format!("@{a_ip}");
        argv.extend(["-p", port, &at, "whoami.test"]);
        outside(&world, &client, &argv, Duration::from_secs(5))
    };
    let udp_outcome = |port: &str| outside_udp_outcome(&world, &client, &a_ip, port);
    cluster.wait(
        "TCP and UDP on one node port",
        Duration::from_secs(30),
        || {
            let both = ask(true, &np).ok() == Some(pod_ip.clone())
                && ask(false, &np).ok() == Some(pod_ip.clone());
            Ok(both.then_some(()))
        },
    )?;

    let new_np = if np == "30995" { "30994" } else { "30995" };
    patch(&format!(
        r#"[{{"op":"replace","path":"/spec/ports/1/nodePort","value":{new_np}}}]"#
    ))?;
    cluster.wait("UDP on the new node port", Duration::from_secs(20), || {
        Ok((ask(false, new_np).ok() == Some(pod_ip.clone())).then_some(()))
    })?;
    let old = udp_outcome(&np)?;
    ensure!(
        refused_within_a_second(&old),
        "UDP to the old node port {np}: {old}"
    );
    ensure!(
        ask(true, &np)? == pod_ip,
        "TCP on node port {np} stopped with the UDP change"
    );

    patch(r#"[{"op":"replace","path":"/spec/type","value":"ClusterIP"}]"#)?;
    cluster.wait("both node ports gone", Duration::from_secs(20), || {
        let gone = udp_outcome(new_np)?.starts_with("refused") && ask(true, &np).is_err();
        Ok(gone.then_some(()))
    })?;
    Ok(())
}

/// `sessionAffinity: ClientIP` from another machine, on a LoadBalancer Service with
/// four pods over two nodes: 30 new connections (new source ports), alternating
/// between node A's and node B's node port and the load-balancer IP, all reach one
/// pod (the nodes agree without sharing state: the choice is Maglev's for the client's
/// address, then remembered); switched off, the connections spread; switched on
/// again, they stick; the pod deleted, the client moves to one other pod, again the
/// same through both nodes.
fn session_affinity_from_outside_is_the_same_on_both_nodes() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let (node_a, node_b) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let b_ip = cluster.nodes[1].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    lb_testbed::run(
        "ip",
        &[
            "-n",
            &client.netns,
            "route",
            "add",
            &format!("{OUTSIDE_LB_IP}/32"),
            "via",
            &a_ip,
        ],
    )?;
    let daemon_a = cluster.daemon(0, &[])?;
    let daemon_b = cluster.daemon(1, &[])?;
    let mut manifest = String::new();
    for (side, node) in [("a", &node_a), ("b", &node_b)] {
        manifest.push_str(&format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: sticky-{side}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: sticky, side: "{side}"}}}}
  template:
    metadata: {{labels: {{app: sticky, side: "{side}"}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers: [{{name: redis, image: redis, ports: [{{containerPort: 6379}}]}}]
---
"#
        ));
    }
    manifest.push_str(
        r#"apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  type: LoadBalancer
  selector: {app: sticky}
  sessionAffinity: ClientIP
  ports: [{port: 6379}]
"#,
    );
    cluster.apply(&manifest)?;
    cluster.set_load_balancer_ip("sticky", OUTSIDE_LB_IP)?;
    let names: BTreeSet<String> = cluster.wait_ready("app=sticky", 4)?.into_iter().collect();
    let np = node_port_of(&cluster, "sticky")?;
    // This Service's external frontends (tests sharing the control plane run their
    // own Services beside it, which every daemon serves too).
    let ours = format!("{}/sticky:", cluster.namespace);
    let sticky_frontends = |daemon: &crate::support::Daemon| -> Result<Vec<serde_json::Value>> {
        Ok(daemon
            .list()?
            .into_iter()
            .filter(|fe| {
                fe["scope"] == "external"
                    && fe["service"].as_str().is_some_and(|s| s.starts_with(&ours))
            })
            .collect())
    };
    let serving = |count: usize| {
        for daemon in [&daemon_a, &daemon_b] {
            cluster.wait(
                &format!("{count} backends on both nodes"),
                Duration::from_secs(30),
                || {
                    let frontends = sticky_frontends(daemon)?;
                    Ok((frontends.len() >= 2
                        && frontends
                            .iter()
                            .all(|fe| fe["backends"].as_array().is_some_and(|b| b.len() == count)))
                    .then_some(()))
                },
            )?;
        }
        Ok::<_, anyhow::Error>(())
    };
    serving(4)?;
    // New connections through both nodes and the load-balancer IP: the pods reached.
    let reached = |round: u16| -> Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for i in 0..30u16 {
            let (host, port) = match i % 3 {
                0 => (a_ip.as_str(), np.as_str()),
                1 => (b_ip.as_str(), np.as_str()),
                _ => (OUTSIDE_LB_IP, "6379"),
            };
            seen.insert(outside_whoami(
                &world,
                &client,
                host,
                port,
                46000 + round * 100 + i,
            )?);
        }
        Ok(seen)
    };
    let first = reached(0)?;
    ensure!(
        first.len() == 1 && names.contains(first.iter().next().unwrap()),
        "with affinity, 30 connections through both nodes reached {first:?}"
    );
    let set_affinity = |value: &str| {
        cluster.kubectl(&[
            "patch",
            "service",
            "sticky",
            "-p",
            &format!(r#"{{"spec":{{"sessionAffinity":"{value}"}}}}"#),
        ])
    };
    let affinity_is = |daemon: &crate::support::Daemon, on: bool| -> Result<Option<()>> {
        Ok(sticky_frontends(daemon)?
            .iter()
            .all(|fe| fe["affinity_timeout"].is_null() != on)
            .then_some(()))
    };
    set_affinity("None")?;
    for daemon in [&daemon_a, &daemon_b] {
        cluster.wait("affinity off", Duration::from_secs(20), || {
            affinity_is(daemon, false)
        })?;
    }
    let spread = reached(1)?;
    ensure!(
        spread.len() > 1,
        "without affinity, 30 connections all reached {spread:?}"
    );
    set_affinity("ClientIP")?;
    for daemon in [&daemon_a, &daemon_b] {
        cluster.wait("affinity on", Duration::from_secs(20), || {
            affinity_is(daemon, true)
        })?;
    }
    let again = reached(2)?;
    ensure!(
        again.len() == 1,
        "affinity switched on again: 30 connections reached {again:?}"
    );
    // The pod the client sticks to goes: it moves to one other pod, on both nodes.
    let pod = again.iter().next().unwrap().clone();
    let pod_ip = pod_ip_of(&cluster, "app=sticky", &pod)?;
    cluster.kubectl(&["delete", "pod", &pod, "--wait=false"])?;
    cluster.wait(
        "the pod gone from both nodes",
        Duration::from_secs(60),
        || {
            let gone = [&daemon_a, &daemon_b].iter().all(|d| {
                d.list_text()
                    .map(|t| !t.contains(&format!("{pod_ip}:6379")))
                    .unwrap_or(false)
            });
            Ok(gone.then_some(()))
        },
    )?;
    // Its replacement serves too before the client comes back.
    cluster.wait_ready("app=sticky", 4)?;
    serving(4)?;
    let moved = reached(3)?;
    ensure!(
        moved.len() == 1 && !moved.contains(&pod),
        "after {pod} left, 30 connections reached {moved:?}"
    );

    // sessionAffinityConfig's timeout. Eight client addresses stick to the one pod
    // left, and keep it while three more start and for as long as each comes back
    // within the timeout (every node remembers on its own, so each address goes
    // through both); idle past the timeout, each goes where Maglev now puts it, the
    // same pod through both nodes, and with four pods not all of them to the old one
    // (the odds of that are 4^-8).
    const TIMEOUT_S: u32 = 12;
    cluster.kubectl(&[
        "patch",
        "service",
        "sticky",
        "-p",
        &format!(
            r#"{{"spec":{{"sessionAffinityConfig":{{"clientIP":{{"timeoutSeconds":{TIMEOUT_S}}}}}}}}}"#
        ),
    ])?;
    for daemon in [&daemon_a, &daemon_b] {
        cluster.wait("the new timeout", Duration::from_secs(20), || {
            Ok(sticky_frontends(daemon)?
                .iter()
                .all(|fe| fe["affinity_timeout"] == TIMEOUT_S)
                .then_some(()))
        })?;
    }
    cluster.kubectl(&["scale", "deployment", "sticky-a", "--replicas=0"])?;
    cluster.kubectl(&["scale", "deployment", "sticky-b", "--replicas=1"])?;
    let last = cluster.wait_ready("app=sticky", 1)?.remove(0);
    serving(1)?;
    let sources: Vec<String> = (1..=8u8)
        .map(|i| {
            let [a, b, c, d] = client.ipv4.octets();
            std::net::Ipv4Addr::new(a, b, c, d + i).to_string()
        })
        .collect();
    for source in &sources {
        lb_testbed::run(
            "ip",
            &[
                "-n",
                &client.netns,
                "addr",
                "add",
                &format!("{source}/24"),
                "dev",
                "eth0",
            ],
        )?;
    }
    // Each source through node A's and node B's node port: the two pods reached.
    let through_both = || -> Result<Vec<(String, String, String)>> {
        sources
            .iter()
            .map(|source| {
                let via_a = outside_whoami_from(&world, &client, source, &a_ip, &np)?;
                let via_b = outside_whoami_from(&world, &client, source, &b_ip, &np)?;
                Ok((source.clone(), via_a, via_b))
            })
            .collect()
    };
    let all_on = |round: &[(String, String, String)], pod: &str| {
        round.iter().all(|(_, a, b)| a == pod && b == pod)
    };
    let stuck = through_both()?;
    ensure!(all_on(&stuck, &last), "one pod left, yet {stuck:?}");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let held = std::thread::scope(|scope| {
        let refresher = scope.spawn(|| -> Result<usize> {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let round = through_both()?;
                ensure!(
                    all_on(&round, &last),
                    "within the timeout, while pods were added: {round:?}"
                );
                rounds += 1;
            }
            Ok(rounds)
        });
        let scaled = (|| {
            cluster.kubectl(&["scale", "deployment", "sticky-a", "--replicas=2"])?;
            cluster.kubectl(&["scale", "deployment", "sticky-b", "--replicas=2"])?;
            cluster.wait_ready("app=sticky", 4)?;
            serving(4)
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        scaled.and(refresher.join().expect("refresher thread"))
    })?;
    let four_pods = through_both()?;
    ensure!(
        all_on(&four_pods, &last),
        "four pods, within the timeout (after {held} rounds): {four_pods:?}"
    );
    std::thread::sleep(Duration::from_secs(TIMEOUT_S as u64 + 2));
    let expired = through_both()?;
    ensure!(
        expired.iter().all(|(_, a, b)| a == b),
        "past the timeout the nodes disagree: {expired:?}"
    );
    ensure!(
        !all_on(&expired, &last),
        "past the timeout every address still reached {last}: {expired:?}"
    );
    let moved_on = expired.iter().filter(|(_, a, _)| *a != last).count();
    eprintln!(
        "affinity held over {held} rounds while pods were added; past the timeout {moved_on} of 8 addresses moved on"
    );
    Ok(())
}

/// A Deployment `name` of `replicas` redis pods (labelled `app: <name>`) on `node`,
/// then a YAML document separator.
pub(crate) fn pinned_redis(name: &str, replicas: usize, node: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers: [{{name: redis, image: redis, ports: [{{containerPort: 6379}}]}}]
---
"#
    )
}

/// A Deployment of one DNS pod (dnsmasq: `whoami.test` is its own address) on `node`,
/// then a YAML document separator.
pub(crate) fn dns_deployment(node: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: dns}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: dns}}}}
  template:
    metadata: {{labels: {{app: dns}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node_b}}}
      containers: [{{name: dns, image: coredns, ports: [{{containerPort: 53, protocol: UDP}}]}}]
---
"#,
        node_b = node
    )
}

/// The outside client's UDP query for `whoami.test` through `host:port` from
/// `source_port` (one flow per source port): the answering DNS pod's address.
fn outside_dig(
    world: &World,
    client: &Pod,
    host: &str,
    port: &str,
    source_port: u16,
) -> Result<String> {
    outside(
        world,
        client,
        &[
            "dig",
            "+short",
            "+time=1",
            "+tries=1",
            "-b",
            &format!("{}#{source_port}", client.ipv4),
            "-p",
            port,
            &format!("@{host}"),
            "whoami.test",
        ],
        Duration::from_secs(5),
    )
    .with_context(|| format!("dig via {host}:{port} from port {source_port}"))
}

/// The tracked entries of the outside client's flow from `source_port`.
fn flows_from(daemon: &crate::support::Daemon, source_port: u16) -> Result<Vec<serde_json::Value>> {
    let suffix = format!(":{source_port}");
    Ok(daemon
        .flows()?
        .into_iter()
        .filter(|f| {
            f["from"].as_str().is_some_and(|a| a.ends_with(&suffix))
                || f["to"].as_str().is_some_and(|a| a.ends_with(&suffix))
        })
        .collect())
}

/// The daemon's collector on flows from another machine: a UDP flow through node B,
/// whose daemon forgets answered UDP after 2 s, is tracked as `replied` and then
/// removed; a UDP flow through node A (default timeouts) follows its DNS pod when the
/// pod is replaced (kube-proxy's conntrack cleanup: the next datagram reaches the new
/// pod, at once); a 100 MB transfer through node B stays intact through floods of
/// new flows ten and four times the table (real connections, spoofed SYNs) and
/// out-of-window segments from both ends; and node ports without endpoints refuse at
/// once, TCP with a reset and UDP with port unreachable (kube-proxy's REJECT), instead
/// of a timeout.
fn tracked_flows_expire_follow_their_backend_and_empty_node_ports_refuse() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_b = cluster.nodes[1].name.clone();
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let b_ip = cluster.nodes[1].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    let daemon_a = cluster.daemon(0, &[])?;
    let daemon_b = cluster.daemon(
        1,
        &[
            "--conntrack-udp-timeout",
            "2s",
            "--conntrack-udp-timeout-stream",
            "2s",
            "--max-flows",
            "1024",
        ],
    )?;
    let node_a = cluster.nodes[0].name.clone();
    let dns = dns_deployment(&node_b);
    let pods_yaml = pinned_redis("redis", 1, &node_a);
    cluster.apply(&format!(
        r#"{dns}{pods_yaml}apiVersion: v1
kind: Service
metadata: {{name: redis-np}}
spec:
  type: NodePort
  selector: {{app: redis}}
  ports: [{{port: 6379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: dns-np}}
spec:
  type: NodePort
  selector: {{app: dns}}
  ports: [{{port: 53, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty-tcp}}
spec:
  type: NodePort
  selector: {{app: nothing}}
  ports: [{{port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty-udp}}
spec:
  type: NodePort
  selector: {{app: nothing}}
  ports: [{{port: 53, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty-external}}
spec:
  selector: {{app: nothing}}
  externalIPs: [{EMPTY_EXTERNAL_IP}]
  ports: [{{name: tcp, port: 80}}, {{name: udp, port: 53, protocol: UDP}}]
"#
    ))?;
    lb_testbed::run(
        "ip",
        &[
            "-n",
            &client.netns,
            "route",
            "add",
            &format!("{EMPTY_EXTERNAL_IP}/32"),
            "via",
            &a_ip,
        ],
    )?;
    let first = cluster.wait_ready("app=dns", 1)?;
    let first_ip = pod_ips_of(&cluster, "app=dns", &first)?
        .into_iter()
        .next()
        .context("no DNS pod address")?;
    let dns_np = node_port_of(&cluster, "dns-np")?;
    let (empty_tcp, empty_udp) = (
        node_port_of(&cluster, "empty-tcp")?,
        node_port_of(&cluster, "empty-udp")?,
    );
    let programmed = |daemon: &crate::support::Daemon, ip: &str| -> Result<Option<()>> {
        let backends = daemon.backends_of(ip, dns_np.parse()?, "UDP")?;
        Ok(backends
            .is_some_and(|b| b.len() == 1 && !b[0].starts_with(&format!("{first_ip}:")))
            .then_some(()))
    };
    for daemon in [&daemon_a, &daemon_b] {
        cluster.wait("the DNS node port", Duration::from_secs(30), || {
            Ok(daemon
                .list()?
                .iter()
                .any(|fe| {
                    fe["scope"] == "external"
                        && fe["port"].as_u64().map(|p| p.to_string()) == Some(dns_np.clone())
                        && fe["backends"].as_array().is_some_and(|b| b.len() == 1)
                })
                .then_some(()))
        })?;
    }

    // Node B forgets an answered UDP flow after 2 s idle.
    let answer = outside_dig(&world, &client, &b_ip, &dns_np, 45000)?;
    ensure!(answer.contains(&first_ip), "node B answered {answer:?}");
    let tracked = flows_from(&daemon_b, 45000)?;
    ensure!(
        tracked.len() == 2 && tracked.iter().all(|f| f["state"] == "replied"),
        "node B tracks {tracked:?}"
    );
    cluster.wait("the idle flow removed", Duration::from_secs(10), || {
        Ok(flows_from(&daemon_b, 45000)?.is_empty().then_some(()))
    })?;
    ensure!(
        daemon_b.metric("lb_tracked_flows_removed_total{reason=\"expired\"}")? >= 1.0,
        "node B removed the flow but did not count it as expired"
    );

    // Node A keeps its flow (default timeouts) until the DNS pod is replaced: the next
    // query of the same flow reaches the new pod.
    let answer = outside_dig(&world, &client, &a_ip, &dns_np, 45001)?;
    ensure!(answer.contains(&first_ip), "node A answered {answer:?}");
    cluster.kubectl(&["delete", "pod", &first[0], "--wait=false"])?;
    cluster.wait(
        "the new DNS pod programmed",
        Duration::from_secs(60),
        || programmed(&daemon_a, &a_ip),
    )?;
    let second_ip = cluster.wait("the new DNS pod's address", Duration::from_secs(10), || {
        let names = cluster.wait_ready("app=dns", 1)?;
        Ok(pod_ips_of(&cluster, "app=dns", &names)?
            .into_iter()
            .find(|ip| *ip != first_ip))
    })?;
    let started = std::time::Instant::now();
    let answer = cluster.wait("the flow at the new pod", Duration::from_secs(5), || {
        Ok(outside_dig(&world, &client, &a_ip, &dns_np, 45001)
            .ok()
            .filter(|a| a.contains(&second_ip)))
    })?;
    eprintln!(
        "the flow reached the new DNS pod {} s after it was programmed ({answer})",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        daemon_a.metric("lb_tracked_flows_removed_total{reason=\"backend_gone\"}")? >= 1.0,
        "node A did not count the flow of the replaced pod"
    );

    // Floods of new flows, many times what node B tracks (--max-flows 1024, the least
    // it takes), while 100 MB cross node B on one flow (SNATed to the pod on node A):
    // the transfer's entries, in use, outlive the churn. First 10 240 real connections
    // from the client (reset at once), then 4 096 SYNs from eight spoofed addresses
    // of the fabric that nobody answers (their SYN-ACKs die unresolved in node B; few
    // addresses, so the host-wide neighbour table hardly notices).
    cluster.wait_ready("app=redis", 1)?;
    let redis_np = node_port_of(&cluster, "redis-np")?;
    cluster.wait(
        "the redis node port on node B",
        Duration::from_secs(30),
        || {
            Ok(daemon_b
                .backends_of(&b_ip, redis_np.parse()?, "TCP")?
                .filter(|b| b.len() == 1)
                .map(|_| ()))
        },
    )?;
    let connections = format!(
        r#"import socket, struct, time
opened = []
for port in range(30000, 40240):
    s = socket.socket(); s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    s.bind(('{}', port)); s.connect_ex(('{b_ip}', {redis_np})); opened.append(s)
    if len(opened) == 200:
        time.sleep(0.05)
        for o in opened: o.close()
        opened = []
print('flooded')
"#,
        client.ipv4
    );
    let [f1, f2, f3, _] = client.ipv4.octets();
    let spoofed = format!(
        r#"{IP_CHECKSUM}
import random
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
dst = socket.inet_aton('{b_ip}')
for i in range(4096):
    src = socket.inet_aton('{f1}.{f2}.{f3}.%d' % random.randint(150, 157))
    tcp = struct.pack('!HHIIBBHHH', random.randint(1024, 65535), {redis_np},
                      random.getrandbits(32), 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = src + dst + struct.pack('!BBH', 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack('!H', checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(tcp), i, 0, 64, 6, 0, src, dst)
    raw.sendto(ip + tcp, ('{b_ip}', 0))
    if i % 256 == 255: time.sleep(0.02)
print('flooded')
"#
    );
    const CREATED: &str = "lb_datapath_decisions_total{decision=\"tc_ct_created\"}";
    const ESTABLISHED: &str = "lb_datapath_decisions_total{decision=\"tc_ct_established\"}";
    // Returns how many flows moved to the established table meanwhile.
    let flood_during_transfer = |what: &str, flood: &str, source_port: u16, least: f64| {
        let created = daemon_b.metric(CREATED)?;
        let established = daemon_b.metric(ESTABLISHED)?;
        let (intact, flooded) = std::thread::scope(|scope| {
            let transfer =
                scope.spawn(|| outside_transfer(&world, &client, &b_ip, &redis_np, source_port));
            std::thread::sleep(Duration::from_millis(300));
            let flooded = outside(
                &world,
                &client,
                &["python3", "-c", flood],
                Duration::from_secs(60),
            );
            (transfer.join().expect("transfer thread"), flooded)
        });
        ensure!(flooded? == "flooded", "the flood of {what} did not run");
        ensure!(
            intact?,
            "100 MB through node B arrived corrupted during the flood of {what}"
        );
        let churn = daemon_b.metric(CREATED)? - created;
        ensure!(
            churn > least,
            "only {churn} flows were created by the flood of {what}: it did not outgrow the table"
        );
        let established = daemon_b.metric(ESTABLISHED)? - established;
        eprintln!(
            "100 MB intact through node B while {churn} flows of {what} churned a 1024-flow \
             table; {established} flows became established"
        );
        Ok::<_, anyhow::Error>(established)
    };
    flood_during_transfer("new connections", &connections, 47000, 2000.0)?;
    // (Before the spoofed SYNs: the pod's SYN-ACKs to those, retransmitted after
    // their flows were evicted, meet node B's stack, which rightly resets them.)
    out_of_window_segments_reach_no_stack_untranslated(&cluster, &world, &client, &redis_np)?;
    // Only the transfer's own flow is established: a spoofed source never
    // acknowledges the answer, so its flows stay where new ones may evict them.
    let established = flood_during_transfer("spoofed SYNs", &spoofed, 47001, 4000.0)?;
    ensure!(
        established == 1.0,
        "{established} flows became established during the spoofed SYNs (only the transfer's should)"
    );

    // Node ports without endpoints (the node's stack answers), and an external IP
    // without endpoints (the TC program answers port unreachable): refused at once.
    cluster.wait(
        "the external IP programmed",
        Duration::from_secs(30),
        || {
            Ok(daemon_a
                .backends_of(EMPTY_EXTERNAL_IP, 80, "TCP")?
                .map(|_| ()))
        },
    )?;
    for (what, host, tcp, udp) in [
        (
            "node ports",
            a_ip.as_str(),
            empty_tcp.as_str(),
            empty_udp.as_str(),
        ),
        ("an external IP", EMPTY_EXTERNAL_IP, "80", "53"),
    ] {
        let script = format!(
            r#"import socket, time
t = time.time()
s = socket.socket(); s.settimeout(5)
try:
    s.connect(('{host}', {tcp})); print('connected')
except ConnectionRefusedError: print('refused %.2f' % (time.time() - t))
except socket.timeout: print('timeout')
"#
        );
        let tcp = outside(
            &world,
            &client,
            &["python3", "-c", &script],
            Duration::from_secs(10),
        )?;
        let udp = outside_udp_outcome(&world, &client, host, udp)?;
        ensure!(
            refused_within_a_second(&tcp) && refused_within_a_second(&udp),
            "{what} without endpoints: TCP {tcp}, UDP {udp}"
        );
    }
    Ok(())
}

/// Segments far outside the TCP window of a tracked flow (the "invalid conntrack
/// state" of kube-proxy's bug), crafted on both sides of a 100 MB transfer through
/// node B to the redis pod on node A (SNAT): from the outside client to the node port,
/// and from the pod to node B's SNAT address. Node B's TC programs translate them like
/// the flow's other segments, so the receivers' stacks discard them as out of window;
/// none reaches node B's own stack, which would answer with a reset (its `OutRsts`
/// stay put), and the transfer arrives intact.
fn out_of_window_segments_reach_no_stack_untranslated(
    cluster: &Cluster,
    world: &World,
    client: &Pod,
    redis_np: &str,
) -> Result<()> {
    let b_ip = cluster.nodes[1].net().ipv4.to_string();
    let node_b_netns = cluster.nodes[1].net().netns.clone();
    let pod = cluster.wait_ready("app=redis", 1)?.remove(0);
    let pod_ip = pod_ip_of(cluster, "app=redis", &pod)?;
    let node_b_resets = || -> Result<u64> {
        let snmp = lb_testbed::run(
            "ip",
            &["netns", "exec", &node_b_netns, "cat", "/proc/net/snmp"],
        )?;
        tcp_counter(&snmp, "OutRsts")
    };
    const SOURCE_PORT: u16 = 47100;
    let out_of_window = format!("{IP_CHECKSUM}{OUT_OF_WINDOW_SEGMENTS}");
    let resets_before = node_b_resets()?;
    let (intact, injected) = std::thread::scope(|scope| {
        let transfer =
            scope.spawn(|| outside_transfer(world, client, &b_ip, redis_np, SOURCE_PORT));
        let injected = (|| -> Result<()> {
            // The transfer's tuple as the pod sees it: node B's SNAT address and port.
            let snat_port = cluster.wait(
                "the transfer's connection in the pod",
                Duration::from_secs(20),
                || {
                    let out = cluster.exec(
                        &pod,
                        &["ss", "-tnH", "state", "established", "( sport = :6379 )"],
                    )?;
                    let text = String::from_utf8_lossy(&out.stdout).to_string();
                    Ok(text.lines().find_map(|line| {
                        let peer = line.split_whitespace().last()?;
                        let (addr, port) = peer.rsplit_once(':')?;
                        (addr == b_ip).then(|| port.to_string())
                    }))
                },
            )?;
            let towards_pod = outside(
                world,
                client,
                &[
                    "python3",
                    "-c",
                    &out_of_window,
                    &client.ipv4.to_string(),
                    &SOURCE_PORT.to_string(),
                    &b_ip,
                    redis_np,
                ],
                Duration::from_secs(10),
            )?;
            let out = cluster.exec(
                &pod,
                &[
                    "python3",
                    "-c",
                    &out_of_window,
                    &pod_ip,
                    "6379",
                    &b_ip,
                    &snat_port,
                ],
            )?;
            ensure!(
                out.status.success(),
                "crafting segments in the pod: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let towards_client = String::from_utf8_lossy(&out.stdout).trim().to_string();
            ensure!(
                towards_pod == "sent 20" && towards_client == "sent 20",
                "crafted segments: {towards_pod:?}, {towards_client:?}"
            );
            Ok(())
        })();
        (transfer.join().expect("transfer thread"), injected)
    });
    injected?;
    ensure!(
        intact?,
        "100 MB through node B arrived corrupted after out-of-window segments"
    );
    let resets = node_b_resets()? - resets_before;
    eprintln!(
        "40 out-of-window segments during 100 MB through node B; node B's stack sent {resets} resets"
    );
    ensure!(
        resets == 0,
        "node B's own stack answered {resets} out-of-window segments with resets: they reached it untranslated"
    );
    Ok(())
}

/// Sends 20 TCP segments (ACK+PSH, 64 bytes of payload, random sequence and
/// acknowledgement numbers: out of any window) from `argv[1]:argv[2]` to
/// `argv[3]:argv[4]` through a raw socket; prints "sent 20".
/// (Follows [`IP_CHECKSUM`].)
const OUT_OF_WINDOW_SEGMENTS: &str = r#"import random, sys
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
raw.bind((src, 0))
for _ in range(20):
    payload = b'x' * 64
    header = struct.pack('!HHIIBBHHH', sport, dport, random.getrandbits(32),
                         random.getrandbits(32), 5 << 4, 0x18, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 6, len(header) + len(payload))
    header = header[:16] + struct.pack('!H', checksum(pseudo + header + payload)) + header[18:]
    raw.sendto(header + payload, (dst, 0))
print('sent 20')
"#;

/// Python: imports socket, struct and time, and defines `checksum(data)`, the
/// Internet checksum.
const IP_CHECKSUM: &str = r#"import socket, struct, time
def checksum(data):
    if len(data) % 2: data += b'\0'
    total = sum(struct.unpack('!%dH' % (len(data) // 2), data))
    while total >> 16: total = (total >> 16) + (total & 0xffff)
    return ~total & 0xffff
"#;

/// The value of `field` on the `Tcp:` lines of `/proc/net/snmp`.
fn tcp_counter(snmp: &str, field: &str) -> Result<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (names, values) = names
        .zip(values)
        .context("no Tcp lines in /proc/net/snmp")?;
    let index = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no Tcp {field} in /proc/net/snmp"))?;
    values
        .split_whitespace()
        .nth(index)
        .context("a short Tcp line")?
        .parse()
        .context("a Tcp counter")
}

/// An external IP of a Service without endpoints, routed by the outside client to
/// node A.
const EMPTY_EXTERNAL_IP: &str = "10.111.254.22";

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
    let pods_yaml = pinned_redis("redis", 2, &node_a);
    cluster.apply(&format!(
        r#"{pods_yaml}apiVersion: v1
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
    cluster.set_load_balancer_ip("redis-lb", LB_IP)?;
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

    // Node A's uplink carries them from other machines too.
    let log = daemon.log_text();
    ensure!(
        log.contains("are served on these interfaces") && log.contains("eth0"),
        "no TC interface line in:\n{log}"
    );
    Ok(())
}

/// Addresses for the outside tests (in the blackholed service range; the outside
/// client routes each through node A).
const OUTSIDE_EXTERNAL_IP: &str = "10.111.254.20";
const OUTSIDE_LB_IP: &str = "10.111.254.21";

/// Runs `argv` in the outside client's namespace (no cgroup: no socket hooks).
fn outside(world: &World, client: &Pod, argv: &[&str], timeout: Duration) -> Result<String> {
    let mut cmd = world.command(client, None, argv[0])?;
    cmd.args(&argv[1..]);
    let out = output_with_timeout(cmd, timeout)?;
    ensure!(
        out.status.success(),
        "{argv:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// How a DNS query (`whoami.test`) from the outside client to `host:port` over UDP
/// ends: "answered", "refused <seconds>" (port unreachable) or "timeout" (5 s).
fn outside_udp_outcome(world: &World, client: &Pod, host: &str, port: &str) -> Result<String> {
    let script = format!(
        r#"import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.connect(('{host}', {port})); t = time.time()
try:
    u.send(b'\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x06whoami\x04test\x00\x00\x01\x00\x01')
    u.recv(512); print('answered')
except ConnectionRefusedError: print('refused %.2f' % (time.time() - t))
except socket.timeout: print('timeout')
"#
    );
    outside(
        world,
        client,
        &["python3", "-c", &script],
        Duration::from_secs(10),
    )
}

/// Whether an outcome printed as "refused <seconds>" came within a second.
fn refused_within_a_second(outcome: &str) -> bool {
    outcome
        .strip_prefix("refused ")
        .and_then(|s| s.parse::<f64>().ok())
        .is_some_and(|s| s < 1.0)
}

/// The address of `pod`, one of the pods matching `selector`.
fn pod_ip_of(cluster: &Cluster, selector: &str, pod: &str) -> Result<String> {
    pod_ips_of(cluster, selector, &[pod.to_string()])?
        .into_iter()
        .next()
        .with_context(|| format!("the address of pod {pod}"))
}

/// `GET whoami` from the outside client through `host:port`, from source port
/// `source_port` (0: any), with a 3 s timeout: the answering pod's name.
fn outside_whoami(
    world: &World,
    client: &Pod,
    host: &str,
    port: &str,
    source_port: u16,
) -> Result<String> {
    whoami_from(
        world,
        client,
        &client.ipv4.to_string(),
        host,
        port,
        source_port,
    )
}

/// [`outside_whoami`] from another of the client's addresses, any source port.
fn outside_whoami_from(
    world: &World,
    client: &Pod,
    source: &str,
    host: &str,
    port: &str,
) -> Result<String> {
    whoami_from(world, client, source, host, port, 0).with_context(|| format!("from {source}"))
}

fn whoami_from(
    world: &World,
    client: &Pod,
    source: &str,
    host: &str,
    port: &str,
    source_port: u16,
) -> Result<String> {
    let script = format!(
        "import socket\n\
         s = socket.socket(); s.settimeout(3)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{source}', {source_port}))\n\
         s.connect(('{host}', {port}))\n\
         s.sendall(b'GET whoami\\r\\n')\n\
         data = b''\n\
         while data.count(b'\\r\\n') < 2:\n    \
             chunk = s.recv(4096)\n    \
             if not chunk: break\n    \
             data += chunk\n\
         print(data.split(b'\\r\\n')[1].decode())\n"
    );
    outside(
        world,
        client,
        &["python3", "-c", &script],
        Duration::from_secs(10),
    )
    .with_context(|| format!("GET whoami via {host}:{port} from port {source_port}"))
}

/// Stores 100 MB of random bytes in redis through `host:port` from `source_port` and
/// reads them back on the same connection: true when the SHA-256 digests match.
fn outside_transfer(
    world: &World,
    client: &Pod,
    host: &str,
    port: &str,
    source_port: u16,
) -> Result<bool> {
    let v6 = host.contains(':');
    let (family, source) = if v6 {
        ("socket.AF_INET6", client.ipv6.to_string())
    } else {
        ("socket.AF_INET", client.ipv4.to_string())
    };
    let script = format!(
        r#"import hashlib, os, socket
data = os.urandom(100 * 1024 * 1024)
s = socket.socket({family}); s.settimeout(60)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('{source}', {source_port}))
s.connect(('{host}', {port}))
def line():
    buf = b''
    while not buf.endswith(b'\r\n'):
        buf += s.recv(1)
    return buf
s.sendall(b'*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n' % len(data) + data + b'\r\n')
assert line() == b'+OK\r\n'
s.sendall(b'*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n')
n = int(line()[1:-2])
got = bytearray()
while len(got) < n + 2:
    chunk = s.recv(1 << 20)
    if not chunk: break
    got += chunk
print(hashlib.sha256(bytes(got[:n])).hexdigest() == hashlib.sha256(data).hexdigest())
"#
    );
    let out = outside(
        world,
        client,
        &["python3", "-c", &script],
        Duration::from_secs(120),
    )
    .with_context(|| format!("100 MB through {host}:{port} from port {source_port}"))?;
    Ok(out == "True")
}

fn node_port_of(cluster: &Cluster, service: &str) -> Result<String> {
    let port = cluster.kubectl(&[
        "get",
        "service",
        service,
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ])?;
    let port = port.trim().to_string();
    ensure!(port.parse::<u16>().is_ok(), "{service} nodePort {port:?}");
    Ok(port)
}

/// The seed scenario from another machine: `curl <node IP>:<nodePort>`.
fn node_ports_from_other_machines() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let (node_a, node_b) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let a_ip = cluster.nodes[0].net().ipv4.to_string();
    let b_ip = cluster.nodes[1].net().ipv4.to_string();
    let world = cluster.nodes[0].world().clone();
    let client = world.add_outside("outside")?;
    for address in [OUTSIDE_EXTERNAL_IP, OUTSIDE_LB_IP] {
        lb_testbed::run(
            "ip",
            &[
                "-n",
                &client.netns,
                "route",
                "add",
                &format!("{address}/32"),
                "via",
                &a_ip,
            ],
        )?;
    }
    let daemon_a = cluster.daemon(0, &[])?;
    let daemon_b = cluster.daemon(1, &[])?;
    let mut manifest = String::new();
    // Three pods on node A and two on node B: five backends.
    for (side, node, replicas) in [("a", &node_a, 3), ("b", &node_b, 2)] {
        manifest.push_str(&format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: redis-{side}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: redis, side: "{side}"}}}}
  template:
    metadata: {{labels: {{app: redis, side: "{side}"}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers: [{{name: redis, image: redis, ports: [{{containerPort: 6379}}]}}]
---
"#
        ));
    }
    let dns = dns_deployment(&node_b);
    manifest.push_str(&format!(
        r#"{dns}apiVersion: v1
kind: Service
metadata: {{name: redis-np}}
spec:
  type: NodePort
  selector: {{app: redis}}
  externalIPs: [{OUTSIDE_EXTERNAL_IP}]
  ports: [{{port: 6379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: redis-local}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {{app: redis, side: "a"}}
  loadBalancerSourceRanges: [10.253.0.0/16]
  ports: [{{port: 6380, targetPort: 6379}}]
---
apiVersion: v1
kind: Service
metadata: {{name: dns-np}}
spec:
  type: NodePort
  selector: {{app: dns}}
  ports: [{{port: 53, protocol: UDP}}]
"#
    ));
    cluster.apply(&manifest)?;
    cluster.set_load_balancer_ip("redis-local", OUTSIDE_LB_IP)?;
    let names = cluster.wait_ready("app=redis", 5)?;
    let on_a: BTreeSet<String> = cluster.wait_ready("side=a", 3)?.into_iter().collect();
    cluster.wait_ready("app=dns", 1)?;
    let np = node_port_of(&cluster, "redis-np")?;
    let local_np = node_port_of(&cluster, "redis-local")?;
    let dns_np = node_port_of(&cluster, "dns-np")?;
    let health_port = cluster.kubectl(&[
        "get",
        "service",
        "redis-local",
        "-o",
        "jsonpath={.spec.healthCheckNodePort}",
    ])?;
    let health_port = health_port.trim().to_string();

    // Both daemons program the external frontends with every backend.
    for daemon in [&daemon_a, &daemon_b] {
        cluster.wait(
            "external frontends programmed",
            Duration::from_secs(30),
            || {
                let listed = daemon.list()?;
                let full = listed.iter().any(|fe| {
                    fe["scope"] == "external"
                        && fe["port"].as_u64().map(|p| p.to_string()).as_deref()
                            == Some(np.as_str())
                        && fe["backends"].as_array().is_some_and(|b| b.len() == 5)
                });
                Ok(full.then_some(()))
            },
        )?;
    }

    // From outside, through either node: every pod of both nodes answers (backends on
    // the other node through SNAT).
    for host in [&a_ip, &b_ip] {
        let mut seen = BTreeSet::new();
        for _ in 0..60 {
            let who = outside_whoami(&world, &client, host, &np, 0)?;
            ensure!(names.contains(&who), "{host}:{np} answered {who:?}");
            seen.insert(who);
        }
        ensure!(
            seen.len() == 5,
            "{host}:{np} reached only {seen:?} of {names:?}"
        );
    }

    // Maglev: the same flow (client address and port) entering either node reaches the
    // same backend.
    let mut by_port = BTreeMap::new();
    for source_port in 41000..41030u16 {
        let via_a = outside_whoami(&world, &client, &a_ip, &np, source_port)?;
        let via_b = outside_whoami(&world, &client, &b_ip, &np, source_port)?;
        ensure!(
            via_a == via_b,
            "source port {source_port}: {via_a} through node A, {via_b} through node B"
        );
        by_port.insert(source_port, via_a);
    }
    let distinct: BTreeSet<&String> = by_port.values().collect();
    ensure!(distinct.len() > 1, "30 flows all hashed to {distinct:?}");

    // 100 MB each way through node B: to a pod on node A (SNAT, across the fabric) and
    // to one on node B itself. A flow's pick is learnt through node A first (Maglev
    // picks alike), so the transfer's tuple is a fresh one.
    let mut wanted = vec![true, false];
    for source_port in 42000..42100u16 {
        let pod = outside_whoami(&world, &client, &a_ip, &np, source_port)?;
        let Some(i) = wanted
            .iter()
            .position(|remote| on_a.contains(&pod) == *remote)
        else {
            continue;
        };
        ensure!(
            outside_transfer(&world, &client, &b_ip, &np, source_port)?,
            "100 MB through node B (source port {source_port}) arrived corrupted"
        );
        wanted.remove(i);
        if wanted.is_empty() {
            break;
        }
    }
    ensure!(wanted.is_empty(), "no flow found to a pod on each node");

    // The external IP, through node A.
    let who = outside_whoami(&world, &client, OUTSIDE_EXTERNAL_IP, "6379", 0)?;
    ensure!(names.contains(&who), "external IP answered {who:?}");

    // externalTrafficPolicy Local: node A's local pods answer and see the client's own
    // address; node B (no local pod) does not answer at all.
    for _ in 0..10 {
        let who = outside_whoami(&world, &client, &a_ip, &local_np, 0)?;
        ensure!(
            on_a.contains(&who),
            "Local policy on node A answered {who:?}"
        );
    }
    let info = outside(
        &world,
        &client,
        &["redis-cli", "-h", &a_ip, "-p", &local_np, "CLIENT", "INFO"],
        Duration::from_secs(10),
    )?;
    ensure!(
        info.contains(&format!("addr={}:", client.ipv4)),
        "the backend did not see the client's address: {info}"
    );
    ensure!(
        outside_whoami(&world, &client, &b_ip, &local_np, 0).is_err(),
        "node B answered a Local-policy node port without local endpoints"
    );
    for (node, ip, code, count) in [("A", &a_ip, 200, 3), ("B", &b_ip, 503, 0)] {
        let answer = outside(
            &world,
            &client,
            &[
                "curl",
                "-s",
                "-w",
                " %{http_code}",
                &format!("http://{ip}:{health_port}/healthz"),
            ],
            Duration::from_secs(10),
        )?;
        ensure!(
            answer.ends_with(&format!(" {code}"))
                && answer.contains(&format!(r#""localEndpoints":{count}"#)),
            "node {node} health check: {answer}"
        );
    }

    // The load-balancer IP admits the client's range, and refuses it once the range
    // excludes it.
    let who = outside_whoami(&world, &client, OUTSIDE_LB_IP, "6380", 0)?;
    ensure!(on_a.contains(&who), "load-balancer IP answered {who:?}");
    cluster.kubectl(&[
        "patch",
        "service",
        "redis-local",
        "-p",
        r#"{"spec":{"loadBalancerSourceRanges":["192.0.2.0/24"]}}"#,
    ])?;
    cluster.wait("source range enforced", Duration::from_secs(20), || {
        Ok(outside_whoami(&world, &client, OUTSIDE_LB_IP, "6380", 0)
            .is_err()
            .then_some(()))
    })?;

    // UDP: dig through node A reaches the DNS pod on node B.
    let answer = outside(
        &world,
        &client,
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=2",
            "-p",
            &dns_np,
            &format!("@{a_ip}"),
            "whoami.test",
        ],
        Duration::from_secs(10),
    )?;
    let dns_ips = pod_ips_of(&cluster, "app=dns", &cluster.wait_ready("app=dns", 1)?)?;
    ensure!(
        dns_ips.iter().any(|ip| answer.contains(ip.as_str())),
        "dig via {a_ip}:{dns_np} answered {answer:?}, DNS pod {dns_ips:?}"
    );

    // Every decision was counted.
    ensure!(daemon_a.metric("lb_datapath_decisions_total{decision=\"tc_translated\"}")? > 0.0);
    ensure!(daemon_a.metric("lb_datapath_decisions_total{decision=\"tc_snat\"}")? > 0.0);
    ensure!(daemon_a.metric("lb_datapath_decisions_total{decision=\"tc_policy_drop\"}")? > 0.0);
    ensure!(daemon_b.metric("lb_datapath_decisions_total{decision=\"tc_no_backend\"}")? > 0.0);

    // Maglev's disruption bound: one of five backends leaves; of 1000 flows (new
    // connections from the same 1000 client ports), only about its share move.
    let counters = || {
        [&daemon_a, &daemon_b]
            .map(|d| {
                d.list_text()
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .nth(3)
                    .unwrap_or("")
                    .to_string()
            })
            .join("\n")
    };
    let before = outside_flows(&world, &client, &a_ip, &np).with_context(counters)?;
    cluster.kubectl(&["scale", "deployment", "redis-b", "--replicas=1"])?;
    cluster.wait("4 backends", Duration::from_secs(30), || {
        let listed = daemon_a.list()?;
        Ok(listed
            .iter()
            .any(|fe| {
                fe["scope"] == "external"
                    && fe["port"].as_u64().map(|p| p.to_string()).as_deref() == Some(np.as_str())
                    && fe["backends"].as_array().is_some_and(|b| b.len() == 4)
            })
            .then_some(()))
    })?;
    let after = outside_flows(&world, &client, &a_ip, &np).with_context(counters)?;
    let remaining: BTreeSet<&String> = after.iter().collect();
    ensure!(
        remaining.len() == 4,
        "after the scale-down, flows reached {remaining:?}"
    );
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let gone = before.iter().filter(|b| !remaining.contains(b)).count();
    ensure!(
        moved <= 300 && moved >= gone,
        "{moved} of 1000 flows moved ({gone} were on the pod that left)"
    );
    eprintln!("Maglev: {moved} of 1000 flows moved when 1 of 5 backends left ({gone} had to)");
    Ok(())
}

/// `GET whoami` from client ports 43000..44000 through `host:port`, one connection
/// each (closed with a reset, so a port can be used again at once): the pod that
/// answered each.
fn outside_flows(world: &World, client: &Pod, host: &str, port: &str) -> Result<Vec<String>> {
    let script = format!(
        r#"import socket, struct
for source_port in range(43000, 44000):
    s = socket.socket(); s.settimeout(3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    s.bind(('{}', source_port))
    s.connect(('{host}', {port}))
    s.sendall(b'GET whoami\r\n')
    data = b''
    while data.count(b'\r\n') < 2:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
    print(data.split(b'\r\n')[1].decode())
    s.close()
"#,
        client.ipv4
    );
    let out = outside(
        world,
        client,
        &["python3", "-c", &script],
        Duration::from_secs(120),
    )?;
    let flows: Vec<String> = out.lines().map(str::to_string).collect();
    ensure!(flows.len() == 1000, "{} answers of 1000", flows.len());
    Ok(flows)
}

/// Stops the servers a manifests-mode test started (processes in a deleted network
/// namespace would keep running).
pub(crate) struct Servers(Vec<std::process::Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A redis pod `redis-<node>` on each of `nodes`, answering `GET whoami` with its name
/// once this returns.
pub(crate) fn redis_pods<'a>(
    world: &World,
    nodes: &[&'a str],
    work_dir: &std::path::Path,
) -> Result<(Servers, Vec<(&'a str, Pod)>)> {
    let mut servers = Servers(Vec::new());
    let mut pods = Vec::new();
    for &node in nodes {
        let pod = world.add_pod(world.node(node), &format!("redis-{node}"))?;
        let argv = lb_testbed::servers::redis(&pod, 6379, work_dir);
        let mut cmd = world.command(&pod, None, &argv[0])?;
        cmd.args(&argv[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        servers.0.push(cmd.spawn()?);
        pods.push((node, pod));
    }
    for (_, pod) in &pods {
        let mut ready = false;
        for _ in 0..200 {
            let mut cmd = world.command(pod, None, "redis-cli")?;
            cmd.args(["-h", "::1", "SET", "whoami", &pod.name]);
            if output_with_timeout(cmd, Duration::from_secs(2))
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("OK"))
            {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ensure!(ready, "redis in {} did not start", pod.name);
    }
    Ok((servers, pods))
}

/// The TC path over IPv6 (the test control plane is single-stack, so from manifests):
/// two nodes, each with a redis pod and its own daemon; a client outside dialling
/// `[node A]:30080` reaches both pods (node B's through SNAT to node A's IPv6
/// address), and 100 MB arrive intact both ways.
fn ipv6_node_ports_from_manifests() -> Result<()> {
    use crate::support::{Daemon, READY};
    let world = World::new(&["a", "b"])?;
    let client = world.add_outside("outside6")?;
    let work_dir = std::env::temp_dir().join(format!("{}-v6", world.id));
    std::fs::create_dir_all(&work_dir)?;
    let (servers, pods) = redis_pods(&world, &["a", "b"], &work_dir)?;
    let mut manifests = String::new();
    for node in ["a", "b"] {
        let net = world.node(node);
        manifests.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{}\"}}, {{type: InternalIP, address: \"{}\"}}]\n---\n",
            net.ipv4, net.ipv6
        ));
    }
    manifests.push_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: redis6, namespace: default}\nspec:\n  type: NodePort\n  ipFamilies: [IPv6]\n  clusterIP: \"fd00:96::30\"\n  ports: [{port: 6379, nodePort: 30080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: redis6-x\n  namespace: default\n  labels: {kubernetes.io/service-name: redis6}\naddressType: IPv6\nports: [{port: 6379, protocol: TCP}]\nendpoints:\n",
    );
    for (node, pod) in &pods {
        manifests.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: {node}\n",
            pod.ipv6
        ));
    }
    let dir = work_dir.join("manifests");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("redis6.yaml"), manifests)?;
    let mut daemons = Vec::new();
    for node in ["a", "b"] {
        let net = world.node(node);
        let mut daemon = Daemon::launch_source(
            &format!("/sys/fs/bpf/{}-{node}", world.id),
            &net.cgroup.path,
            &work_dir,
            vec![
                "--manifests".into(),
                dir.display().to_string(),
                "--node-name".into(),
                node.into(),
            ],
            &["--netns", &format!("/run/netns/{}", net.netns)],
        )?;
        daemon.wait_for_log(READY, Duration::from_secs(30))?;
        daemons.push(daemon);
    }
    let node_a = world.node("a").ipv6.to_string();
    let names: BTreeSet<String> = pods.iter().map(|(_, p)| p.name.clone()).collect();
    let script = format!(
        r#"import socket
for source_port in range(44000, 44040):
    s = socket.socket(socket.AF_INET6); s.settimeout(3)
    s.bind(('{}', source_port))
    s.connect(('{node_a}', 30080))
    s.sendall(b'GET whoami\r\n')
    data = b''
    while data.count(b'\r\n') < 2:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
    print(data.split(b'\r\n')[1].decode())
"#,
        client.ipv6
    );
    let answers = outside(
        &world,
        &client,
        &["python3", "-c", &script],
        Duration::from_secs(60),
    )
    .with_context(|| daemons[0].log_text())?;
    let seen: BTreeSet<String> = answers.lines().map(str::to_string).collect();
    ensure!(
        seen == names,
        "[{node_a}]:30080 reached {seen:?}, pods {names:?}"
    );
    ensure!(
        outside_transfer(&world, &client, &node_a, "30080", 44100)?,
        "100 MB over IPv6 arrived corrupted"
    );
    ensure!(daemons[0].metric("lb_datapath_decisions_total{decision=\"tc_snat\"}")? > 0.0);
    drop(daemons);
    drop(servers);
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(())
}
