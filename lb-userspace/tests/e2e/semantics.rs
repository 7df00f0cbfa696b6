//! Service semantics for ClusterIP traffic on a real control plane with two simulated
//! nodes and the daemon on node A: session affinity, internalTrafficPolicy Local and
//! topology (trafficDistribution PreferClose).

use std::{
    collections::BTreeSet,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use libtest_mimic::Trial;
use serde_json::Value;

use crate::{
    cluster::{Cluster, shared_control_plane, trial},
    external::{AGNHOST, dns_deployment, pinned_redis, timed_answers, unix_seconds},
    kube::{pod_ips_of, refused_at_once, whoami},
    support::Daemon,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "semantics::session_affinity_over_udp",
            session_affinity_over_udp,
        ),
        trial(
            "semantics::publish_not_ready_addresses",
            publish_not_ready_addresses,
        ),
        trial(
            "semantics::host_network_clients_and_endpoints",
            host_network_clients_and_endpoints,
        ),
        trial(
            "semantics::session_affinity_client_ip",
            session_affinity_client_ip,
        ),
        trial(
            "semantics::internal_traffic_policy_local",
            internal_traffic_policy_local,
        ),
        trial(
            "semantics::prefer_close_keeps_traffic_in_the_zone",
            prefer_close_keeps_traffic_in_the_zone,
        ),
        trial(
            "semantics::services_of_other_proxies_and_headless_ones_are_not_served",
            services_of_other_proxies_and_headless_ones_are_not_served,
        ),
        trial(
            "semantics::evicted_pods_are_rejected_at_once",
            evicted_pods_are_rejected_at_once,
        ),
        trial(
            "semantics::udp_client_started_before_its_endpoint_is_ready",
            udp_client_started_before_its_endpoint_is_ready,
        ),
        trial(
            "semantics::udp_traffic_follows_its_server_pod_being_replaced",
            udp_traffic_follows_its_server_pod_being_replaced,
        ),
        trial(
            "semantics::prefer_same_node_keeps_traffic_on_the_node",
            prefer_same_node_keeps_traffic_on_the_node,
        ),
        trial(
            "semantics::dual_stack_services_serve_both_families",
            dual_stack_services_serve_both_families,
        ),
    ]
}

/// A datagram every 200 ms from pod `pod` to `host:80`, each from a new socket on
/// `source_port` (as upstream's `nc -u -p` loop sends), for `seconds`: each answer
/// to `hostname` (or the error's name, or "timeout" after 300 ms) with the time it
/// was sent.
fn udp_stream_from_pod(
    cluster: &Cluster,
    pod: &str,
    host: &str,
    source_port: u16,
    seconds: f64,
) -> Result<Vec<(f64, String)>> {
    let script = format!(
        r#"import socket, time
end = time.time() + {seconds}
while time.time() < end:
    t = time.time()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.3)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); u.bind(('0.0.0.0', {source_port}))
    try:
        u.sendto(b'hostname', ('{host}', 80)); print(t, u.recvfrom(100)[0].decode())
    except socket.timeout: print(t, 'timeout')
    except OSError as e: print(t, type(e).__name__)
    u.close(); time.sleep(max(0, t + 0.2 - time.time()))
"#
    );
    let out = cluster.exec_within(
        pod,
        &["python3", "-c", &script],
        Duration::from_secs_f64(seconds + 15.0),
    )?;
    timed_answers(&String::from_utf8_lossy(&out.stdout))
}

/// A UDP server pod behind a ClusterIP is replaced (deleted, a new one created) while
/// three clients send a datagram every 200 ms from a fixed source port (upstream's
/// three "preserve UDP traffic when server pod cycles" specs): a pod through the
/// Service, a hostNetwork pod through it, and a pod through a Service with
/// `internalTrafficPolicy: Local`. Each stream reaches the old pod, then the new
/// one, every datagram from half a second after the new pod is programmed.
fn udp_traffic_follows_its_server_pod_being_replaced() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let daemon = cluster.daemon(0, &[])?;
    let server = |name: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: cycle}}}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: netexec
    image: {AGNHOST}
    args: [netexec, --http-port=8080, --udp-port=80]
    ports: [{{containerPort: 80, protocol: UDP}}]
---
"#
        )
    };
    cluster.apply(&format!(
        r#"{}apiVersion: v1
kind: Service
metadata: {{name: cycle}}
spec:
  selector: {{app: cycle}}
  ports: [{{port: 80, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: cycle-local}}
spec:
  internalTrafficPolicy: Local
  selector: {{app: cycle}}
  ports: [{{port: 80, protocol: UDP}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: hostnet, labels: {{role: client}}}}
spec:
  hostNetwork: true
  containers: [{{name: sleep, image: busybox, command: [sleep, infinity]}}]
"#,
        server("server-1")
    ))?;
    cluster.wait_ready("app=cycle", 1)?;
    cluster.wait_ready("role=client", 1)?;
    cluster.run_client("client")?;
    let (vip, local_vip) = (
        cluster.cluster_ip("cycle")?,
        cluster.cluster_ip("cycle-local")?,
    );
    let backend_is = |vip: &str, pod: &str| -> Result<Option<()>> {
        let ip = pod_ips_of(&cluster, "app=cycle", &[pod.to_string()])?;
        let want = ip.first().map(|ip| vec![format!("{ip}:80")]);
        Ok((want.is_some() && daemon.backends_of(vip, 80, "UDP")? == want).then_some(()))
    };
    for service in [&vip, &local_vip] {
        cluster.wait("server-1 programmed", Duration::from_secs(20), || {
            backend_is(service, "server-1")
        })?;
    }
    let streams = [
        ("client", vip.as_str(), 47001),
        ("hostnet", vip.as_str(), 47002),
        ("client", local_vip.as_str(), 47003),
    ];
    let (results, replaced_at) = std::thread::scope(|scope| -> Result<_> {
        let handles: Vec<_> = streams
            .iter()
            .map(|&(pod, host, port)| {
                let cluster = &cluster;
                scope.spawn(move || udp_stream_from_pod(cluster, pod, host, port, 16.0))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(4));
        cluster.kubectl(&["delete", "pod", "server-1", "--wait=false"])?;
        cluster.apply(&server("server-2"))?;
        cluster.wait_ready("app=cycle", 1)?;
        for service in [&vip, &local_vip] {
            cluster.wait("server-2 programmed", Duration::from_secs(20), || {
                backend_is(service, "server-2")
            })?;
        }
        let replaced_at = unix_seconds();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a UDP stream panicked"))?
            })
            .collect::<Result<_>>()?;
        Ok((results, replaced_at))
    })?;
    for ((pod, host, _), answers) in streams.iter().zip(&results) {
        let first_new = answers.iter().position(|(_, a)| a == "server-2");
        let old: Vec<&str> = answers
            .iter()
            .take_while(|(_, a)| a != "timeout" && a != "ConnectionRefusedError")
            .map(|(_, a)| a.as_str())
            .collect();
        let settled: Vec<&str> = answers
            .iter()
            .filter(|(t, _)| *t > replaced_at + 0.5)
            .map(|(_, a)| a.as_str())
            .collect();
        eprintln!(
            "{pod} -> {host}: {} answers from server-1 first, server-2 from datagram {first_new:?}, \
             {} after it was programmed",
            old.len(),
            settled.len()
        );
        ensure!(
            old.len() >= 10 && old.iter().all(|a| *a == "server-1"),
            "{pod} -> {host} before the replacement: {answers:?}"
        );
        ensure!(
            settled.len() >= 10 && settled.iter().all(|a| *a == "server-2"),
            "{pod} -> {host} after the new pod was programmed: {answers:?}"
        );
    }
    Ok(())
}

/// The only pod of a Service is evicted (the kubelet kills it and marks it `Failed`,
/// reason `Evicted`; the object stays): the EndpointSlice controller drops it, and a
/// connection to the ClusterIP is refused at once, not left to time out (upstream's
/// "should be rejected for evicted pods").
fn evicted_pods_are_rejected_at_once() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let node_a = cluster.nodes[0].name.clone();
    let daemon = cluster.daemon(0, &[])?;
    // A bare pod, as upstream's: a Deployment would replace the evicted one.
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: evictable, labels: {{app: redis}}}}
spec:
  nodeName: {node_a}
  containers: [{{name: redis, image: redis, ports: [{{containerPort: 6379}}]}}]
---
{}"#,
        redis_service("")
    ))?;
    let pod = cluster.wait_ready("app=redis", 1)?.remove(0);
    cluster.run_client("client")?;
    let vip = cluster.cluster_ip("redis")?;
    cluster.wait("the pod served", Duration::from_secs(20), || {
        Ok((whoami(&cluster, "client", &vip)? == pod).then_some(()))
    })?;
    cluster.nodes[0].evict(&cluster.namespace, &pod)?;
    let phase = cluster.kubectl(&[
        "get",
        "pod",
        &pod,
        "-o",
        "jsonpath={.status.phase}/{.status.reason}",
    ])?;
    ensure!(
        phase.trim() == "Failed/Evicted",
        "evicted pod's status: {phase}"
    );
    cluster.wait("no backend left", Duration::from_secs(20), || {
        Ok(listed(&daemon, &vip)?
            .is_some_and(|fe| fe["backends"].as_array().is_some_and(Vec::is_empty))
            .then_some(()))
    })?;
    refused_at_once(&cluster, "client", &vip)
}

/// A client pod sends a UDP datagram every 200 ms (each from a new socket on one source
/// port, as upstream's `nc -u -p` loop does) to a Service whose only endpoint turns
/// ready 6 s after it started (`initialDelaySeconds`): refused while there is no
/// endpoint, then answered by the pod, every datagram from then on (upstream's
/// "preserve UDP traffic when initial unready endpoints get ready": no stale state
/// from the refused ones).
fn udp_client_started_before_its_endpoint_is_ready() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let _daemon = cluster.daemon(0, &[])?;
    cluster.run_client("client")?;
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: late, labels: {{app: late}}}}
spec:
  containers:
  - name: netexec
    image: {AGNHOST}
    args: [netexec, --http-port=8080, --udp-port=8081]
    ports: [{{containerPort: 8081, protocol: UDP}}]
    readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, initialDelaySeconds: 6, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: late}}
spec:
  selector: {{app: late}}
  ports: [{{port: 80, targetPort: 8081, protocol: UDP}}]
"#
    ))?;
    let vip = cluster.cluster_ip("late")?;
    let answers: Vec<String> = udp_stream_from_pod(&cluster, "client", &vip, 47000, 16.0)?
        .into_iter()
        .map(|(_, answer)| answer)
        .collect();
    let first_answer = answers
        .iter()
        .position(|a| a == "late")
        .with_context(|| format!("the pod never answered: {answers:?}"))?;
    let (before, after) = answers.split_at(first_answer);
    eprintln!(
        "{} datagrams before the endpoint was ready ({:?}), {} after",
        before.len(),
        before.iter().collect::<BTreeSet<_>>(),
        after.len()
    );
    ensure!(
        before.len() >= 10,
        "the client did not start before the endpoint was ready: {answers:?}"
    );
    // kube-proxy REJECTs while a Service has no endpoint: refused at once, no timeout.
    ensure!(
        before.iter().all(|a| a == "ConnectionRefusedError"),
        "datagrams before the endpoint was ready: {before:?}"
    );
    ensure!(
        after.len() >= 10 && after.iter().all(|a| a == "late"),
        "datagrams lost once the endpoint was ready: {after:?}"
    );
    Ok(())
}

/// The labels that hand a Service to another proxy
/// (`service.kubernetes.io/service-proxy-name`) or mark it headless
/// (`service.kubernetes.io/headless`), on Services that have a ClusterIP and a ready
/// endpoint: not served while labelled, served once the label goes, and no longer
/// served when a served Service gets one (upstream's two label specs, both ways).
fn services_of_other_proxies_and_headless_ones_are_not_served() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let node_a = cluster.nodes[0].name.clone();
    let daemon = cluster.daemon(0, &[])?;
    let pods_yaml = pinned_redis("redis", 1, &node_a);
    let service = |name: &str, labels: &str| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, labels: {{{labels}}}}}
spec:
  selector: {{app: redis}}
  ports: [{{port: 6379}}]
---
"#
        )
    };
    cluster.apply(&format!(
        "{pods_yaml}{}{}{}",
        service("plain", ""),
        service(
            "other-proxy",
            "service.kubernetes.io/service-proxy-name: foo-bar"
        ),
        service("headless-label", "service.kubernetes.io/headless: \"\""),
    ))?;
    let pod = cluster.wait_ready("app=redis", 1)?.remove(0);
    cluster.run_client("client")?;
    let vips: Vec<String> = ["plain", "other-proxy", "headless-label"]
        .iter()
        .map(|name| cluster.cluster_ip(name))
        .collect::<Result<_>>()?;
    // Served: the pod answers. Not served: not in the maps, and the client's
    // connection never reaches the pod (its namespace blackholes the service range).
    let served = |vip: &str| -> Result<bool> {
        let in_maps = listed(&daemon, vip)?.is_some();
        let answer = whoami(&cluster, "client", vip)?;
        ensure!(
            in_maps == (answer == pod),
            "{vip}: in the maps {in_maps}, answered {answer:?}"
        );
        Ok(in_maps)
    };
    let wait_served = |vip: &str, want: bool| {
        cluster.wait(
            &format!("{vip} served: {want}"),
            Duration::from_secs(20),
            || Ok((served(vip)? == want).then_some(())),
        )
    };
    wait_served(&vips[0], true)?;
    ensure!(!served(&vips[1])?, "a Service of another proxy is served");
    ensure!(!served(&vips[2])?, "a Service labelled headless is served");

    cluster.kubectl(&[
        "label",
        "service",
        "other-proxy",
        "service.kubernetes.io/service-proxy-name-",
    ])?;
    cluster.kubectl(&[
        "label",
        "service",
        "headless-label",
        "service.kubernetes.io/headless-",
    ])?;
    wait_served(&vips[1], true)?;
    wait_served(&vips[2], true)?;

    cluster.kubectl(&[
        "label",
        "service",
        "plain",
        "service.kubernetes.io/service-proxy-name=foo-bar",
    ])?;
    cluster.kubectl(&[
        "label",
        "service",
        "other-proxy",
        "service.kubernetes.io/headless=",
    ])?;
    wait_served(&vips[0], false)?;
    wait_served(&vips[1], false)?;
    ensure!(
        served(&vips[2])?,
        "an unrelated label change stopped {}",
        vips[2]
    );
    Ok(())
}

/// A redis Deployment part (`app: redis`, `part: <name>`), optionally pinned to a node,
/// draining for `prestop` seconds when stopped.
fn redis_part(name: &str, replicas: usize, node: Option<&str>, prestop: u32) -> String {
    let selector = node
        .map(|n| format!("nodeSelector: {{kubernetes.io/hostname: {n}}}"))
        .unwrap_or_else(|| "nodeSelector: {}".into());
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: redis, part: {name}}}}}
  template:
    metadata: {{labels: {{app: redis, part: {name}}}}}
    spec:
      {selector}
      terminationGracePeriodSeconds: {grace}
      containers:
      - name: redis
        image: redis
        ports: [{{containerPort: 6379}}]
        lifecycle: {{preStop: {{sleep: {{seconds: {prestop}}}}}}}
"#,
        grace = prestop + 10,
        prestop = prestop.max(1),
    )
}

/// `sessionAffinity: ClientIP` over UDP: a DNS Service of three pods answers 20
/// queries of one client (each from a new socket) from one pod; without affinity,
/// from more than one.
fn session_affinity_over_udp() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let _daemon = cluster.daemon(0, &[])?;
    cluster.apply(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: dns}
spec:
  replicas: 3
  selector: {matchLabels: {app: dns}}
  template:
    metadata: {labels: {app: dns}}
    spec:
      containers: [{name: dns, image: coredns, ports: [{containerPort: 53, protocol: UDP}]}]
---
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  selector: {app: dns}
  sessionAffinity: ClientIP
  ports: [{port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {role: client}}
spec:
  containers: [{name: c, image: busybox}]
"#,
    )?;
    cluster.wait_ready("app=dns", 3)?;
    cluster.wait_ready("role=client", 1)?;
    let vip = cluster.cluster_ip("dns")?;
    let answers = || -> Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            let out = cluster.exec(
                "client",
                &[
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=2",
                    &format!("@{vip}"),
                    "whoami.test",
                ],
            )?;
            seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        Ok(seen)
    };
    let sticky = cluster.wait("answers from one pod", Duration::from_secs(20), || {
        let seen = answers()?;
        Ok((seen.len() == 1 && !seen.iter().next().unwrap().is_empty()).then_some(seen))
    })?;
    cluster.kubectl(&[
        "patch",
        "service",
        "dns",
        "-p",
        r#"{"spec":{"sessionAffinity":"None"}}"#,
    ])?;
    let spread = cluster.wait("answers from several pods", Duration::from_secs(20), || {
        let seen = answers()?;
        Ok((seen.len() > 1).then_some(seen))
    })?;
    eprintln!("UDP with affinity: {sticky:?}; without: {spread:?}");
    Ok(())
}

/// A pod that never turns ready (its readiness probe dials a port nothing listens
/// on) behind two Services: with `publishNotReadyAddresses: true` it is served (the
/// EndpointSlice controller lists it as ready), without it the Service has no
/// endpoint and a connection is refused at once.
fn publish_not_ready_addresses() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let _daemon = cluster.daemon(0, &[])?;
    cluster.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: unready, labels: {app: unready}}
spec:
  containers:
  - name: redis
    image: redis
    ports: [{containerPort: 6379}]
    readinessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: published}
spec:
  publishNotReadyAddresses: true
  selector: {app: unready}
  ports: [{port: 6379}]
---
apiVersion: v1
kind: Service
metadata: {name: unpublished}
spec:
  selector: {app: unready}
  ports: [{port: 6379}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {role: client}}
spec:
  containers: [{name: c, image: busybox}]
"#,
    )?;
    cluster.wait_ready("role=client", 1)?;
    let published = cluster.cluster_ip("published")?;
    let unpublished = cluster.cluster_ip("unpublished")?;
    // The test bed names a redis pod (GET whoami) once it is ready: PING instead.
    cluster.wait(
        "the unready pod served when published",
        Duration::from_secs(30),
        || {
            let out = cluster.exec("client", &["redis-cli", "-h", &published, "PING"])?;
            Ok((String::from_utf8_lossy(&out.stdout).trim() == "PONG").then_some(()))
        },
    )?;
    let ready = cluster.kubectl(&[
        "get",
        "pod",
        "unready",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ])?;
    ensure!(
        ready.trim() == "False",
        "the pod turned ready ({ready}): the test proves nothing"
    );
    refused_at_once(&cluster, "client", &unpublished)
}

/// hostNetwork pods, which run in their node's own network namespace (and its
/// cgroup, so the node's socket hooks apply): a hostNetwork client on node A reaches
/// a ClusterIP over TCP and a DNS Service over UDP (upstream's "node-Service" checks),
/// and a hostNetwork redis on node B, whose endpoint is node B's own address, serves a
/// pod on node A through its Service ("service endpoints using hostNetwork").
fn host_network_clients_and_endpoints() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let (node_a, node_b) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let _daemons = [cluster.daemon(0, &[])?, cluster.daemon(1, &[])?];
    let redis_pods = pinned_redis("redis", 1, &node_a);
    let dns_pods = dns_deployment(&node_b);
    cluster.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: hostnet}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: hostnet}}}}
  template:
    metadata: {{labels: {{app: hostnet}}}}
    spec:
      hostNetwork: true
      nodeSelector: {{kubernetes.io/hostname: {node_b}}}
      containers: [{{name: redis, image: redis, ports: [{{containerPort: 6379}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: hostnet}}
spec:
  selector: {{app: hostnet}}
  ports: [{{port: 6379}}]
---
{redis_pods}apiVersion: v1
kind: Service
metadata: {{name: redis}}
spec:
  selector: {{app: redis}}
  ports: [{{port: 6379}}]
---
{dns_pods}apiVersion: v1
kind: Service
metadata: {{name: dns}}
spec:
  selector: {{app: dns}}
  ports: [{{port: 53, protocol: UDP}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: hclient, labels: {{role: hclient}}}}
spec:
  hostNetwork: true
  nodeName: {node_a}
  containers: [{{name: c, image: busybox}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, labels: {{role: client}}}}
spec:
  nodeName: {node_a}
  containers: [{{name: c, image: busybox}}]
"#
    ))?;
    let hostnet = cluster.wait_ready("app=hostnet", 1)?.remove(0);
    let redis = cluster.wait_ready("app=redis", 1)?.remove(0);
    let dns = cluster.wait_ready("app=dns", 1)?;
    cluster.wait_ready("role=hclient", 1)?;
    cluster.wait_ready("role=client", 1)?;
    // The kubelet reports a hostNetwork pod's address as its node's.
    let node_b_ip = cluster.nodes[1].net().ipv4.to_string();
    let hostnet_ip =
        cluster.kubectl(&["get", "pod", &hostnet, "-o", "jsonpath={.status.podIP}"])?;
    ensure!(
        hostnet_ip.trim() == node_b_ip,
        "hostNetwork pod IP {hostnet_ip}, node B {node_b_ip}"
    );

    let redis_vip = cluster.cluster_ip("redis")?;
    let hostnet_vip = cluster.cluster_ip("hostnet")?;
    let dns_vip = cluster.cluster_ip("dns")?;
    cluster.wait(
        "the hostNetwork client reaches a ClusterIP",
        Duration::from_secs(20),
        || Ok((whoami(&cluster, "hclient", &redis_vip)? == redis).then_some(())),
    )?;
    cluster.wait(
        "a pod reaches the hostNetwork endpoint",
        Duration::from_secs(20),
        || Ok((whoami(&cluster, "client", &hostnet_vip)? == hostnet).then_some(())),
    )?;
    let dns_ips = pod_ips_of(&cluster, "app=dns", &dns)?;
    let answer = cluster.wait(
        "the hostNetwork client's UDP query",
        Duration::from_secs(20),
        || {
            let out = cluster.exec(
                "hclient",
                &[
                    "dig",
                    "+short",
                    "+time=1",
                    "+tries=2",
                    &format!("@{dns_vip}"),
                    "whoami.test",
                ],
            )?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            Ok(dns_ips
                .iter()
                .any(|ip| text.contains(ip.as_str()))
                .then_some(text))
        },
    )?;
    eprintln!(
        "hostNetwork client: DNS over UDP through {dns_vip} answered {}",
        answer.trim()
    );
    Ok(())
}

/// The `redis` Service in front of every part, with extra spec lines.
fn redis_service(extra_spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: redis}}
spec:
  selector: {{app: redis}}
  ports: [{{port: 6379}}]
{extra_spec}
"#
    )
}

/// Client pods (busybox: `sleep infinity`) on node `node`.
fn clients(cluster: &Cluster, names: &[&str], node: &str) -> Result<()> {
    for name in names {
        cluster.apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{role: client, client: {name}}}}}
spec:
  nodeName: {node}
  containers: [{{name: sleep, image: busybox, command: [sleep, infinity]}}]
"#
        ))?;
    }
    for name in names {
        cluster.wait_ready(&format!("client={name}"), 1)?;
    }
    Ok(())
}

/// Who answers `n` connections from `client`, in order.
fn answers(cluster: &Cluster, client: &str, vip: &str, n: usize) -> Result<Vec<String>> {
    (0..n).map(|_| whoami(cluster, client, vip)).collect()
}

/// The daemon's frontend for `vip`:6379/TCP in `lb list --json`.
fn listed(daemon: &Daemon, vip: &str) -> Result<Option<Value>> {
    Ok(daemon
        .list()?
        .into_iter()
        .find(|fe| fe["address"] == vip && fe["port"] == 6379 && fe["protocol"] == "TCP"))
}

/// Waits until the daemon's maps hold exactly `ips` (port 6379) for `vip`.
fn wait_backends(cluster: &Cluster, daemon: &Daemon, vip: &str, ips: &[String]) -> Result<()> {
    let mut want: Vec<String> = ips.iter().map(|ip| format!("{ip}:6379")).collect();
    want.sort();
    cluster.wait(
        &format!("backends {want:?}"),
        Duration::from_secs(20),
        || Ok((daemon.backends_of(vip, 6379, "TCP")?.as_ref() == Some(&want)).then_some(())),
    )
}

fn ready_ips(cluster: &Cluster, selector: &str, n: usize) -> Result<(Vec<String>, Vec<String>)> {
    let names = cluster.wait_ready(selector, n)?;
    let ips = pod_ips_of(cluster, selector, &names)?;
    Ok((names, ips))
}

fn distinct(answers: &[String]) -> BTreeSet<&String> {
    answers.iter().collect()
}

const AFFINITY_MISS: &str = "lb_datapath_decisions_total{decision=\"affinity_miss\"}";
const AFFINITY_HIT: &str = "lb_datapath_decisions_total{decision=\"affinity_hit\"}";

/// sessionAffinity ClientIP with a 5 s timeout: one client pod sticks to one backend,
/// another pod has its own choice, an idle client chooses afresh, a deleted backend
/// moves its clients at once, switching affinity off spreads them again and switching it
/// back on makes them stick again.
fn session_affinity_client_ip() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let node_a = cluster.nodes[0].name.clone();
    let daemon = cluster.daemon(0, &[])?;
    cluster.apply(&redis_part("redis", 3, None, 1))?;
    cluster.apply(&redis_service(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}",
    ))?;
    clients(&cluster, &["web-1", "web-2"], &node_a)?;
    let (names, ips) = ready_ips(&cluster, "app=redis", 3)?;
    let vip = cluster.cluster_ip("redis")?;
    wait_backends(&cluster, &daemon, &vip, &ips)?;
    let fe = listed(&daemon, &vip)?.context("frontend listed")?;
    ensure!(fe["affinity_timeout"] == 5, "lb list: {fe}");

    let first = answers(&cluster, "web-1", &vip, 50)?;
    ensure!(
        distinct(&first).len() == 1,
        "web-1 reached {:?}",
        distinct(&first)
    );
    let second = answers(&cluster, "web-2", &vip, 20)?;
    ensure!(
        distinct(&second).len() == 1,
        "web-2 reached {:?}",
        distinct(&second)
    );
    ensure!(
        daemon.metric(AFFINITY_HIT)? >= 68.0,
        "affinity hits counted"
    );

    // After 7 s idle the entry has expired: the next connection is a fresh choice
    // (counted as a miss), which then sticks; over a few tries it changes.
    let mut pinned = first[0].clone();
    let mut changed = false;
    for _ in 0..6 {
        thread::sleep(Duration::from_secs(7));
        let misses = daemon.metric(AFFINITY_MISS)?;
        let now = answers(&cluster, "web-1", &vip, 10)?;
        ensure!(
            distinct(&now).len() == 1,
            "web-1 after idling: {:?}",
            distinct(&now)
        );
        ensure!(
            daemon.metric(AFFINITY_MISS)? == misses + 1.0,
            "an expired entry is one fresh choice"
        );
        if now[0] != pinned {
            changed = true;
            pinned = now[0].clone();
            break;
        }
    }
    ensure!(
        changed,
        "six fresh choices among 3 backends all picked {pinned}"
    );

    // The pinned backend's pod is deleted: web-1 moves to a live backend at once.
    let victim_ip = ips[names
        .iter()
        .position(|n| *n == pinned)
        .context("pinned pod")?]
    .clone();
    cluster.kubectl(&["delete", "pod", &pinned, "--wait=false"])?;
    cluster.wait(
        "the deleted pod out of rotation",
        Duration::from_secs(20),
        || {
            let backends = daemon.backends_of(&vip, 6379, "TCP")?.unwrap_or_default();
            Ok((!backends.contains(&format!("{victim_ip}:6379"))).then_some(()))
        },
    )?;
    let moved = answers(&cluster, "web-1", &vip, 10)?;
    ensure!(
        distinct(&moved).len() == 1 && moved[0] != pinned,
        "after deleting {pinned}: {:?}",
        distinct(&moved)
    );

    // Affinity off: the same client spreads again.
    cluster.kubectl(&[
        "patch",
        "service",
        "redis",
        "-p",
        r#"{"spec":{"sessionAffinity":"None"}}"#,
    ])?;
    cluster.wait("affinity off in the maps", Duration::from_secs(10), || {
        Ok(listed(&daemon, &vip)?
            .is_some_and(|fe| fe["affinity_timeout"].is_null())
            .then_some(()))
    })?;
    let spread = answers(&cluster, "web-1", &vip, 30)?;
    ensure!(
        distinct(&spread).len() >= 2,
        "without affinity: {:?}",
        distinct(&spread)
    );

    // And on again (default timeout, 3 hours): each client sticks to one backend again.
    cluster.kubectl(&[
        "patch",
        "service",
        "redis",
        "-p",
        r#"{"spec":{"sessionAffinity":"ClientIP","sessionAffinityConfig":null}}"#,
    ])?;
    cluster.wait("affinity on in the maps", Duration::from_secs(10), || {
        Ok(listed(&daemon, &vip)?
            .is_some_and(|fe| fe["affinity_timeout"] == 10800)
            .then_some(()))
    })?;
    for client in ["web-1", "web-2"] {
        let sticky = answers(&cluster, client, &vip, 30)?;
        ensure!(
            distinct(&sticky).len() == 1,
            "{client} with affinity switched back on: {:?}",
            distinct(&sticky)
        );
    }
    Ok(())
}

/// internalTrafficPolicy Local: only node A's endpoints answer; node A's only endpoint
/// terminating is still used; none on node A (node B's still ready) is ECONNREFUSED
/// at once.
fn internal_traffic_policy_local() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let (node_a, node_b) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let daemon = cluster.daemon(0, &[])?;
    cluster.apply(&redis_part("redis-a", 2, Some(&node_a), 6))?;
    cluster.apply(&redis_part("redis-b", 2, Some(&node_b), 1))?;
    cluster.apply(&redis_service("  internalTrafficPolicy: Local"))?;
    clients(&cluster, &["web"], &node_a)?;
    let (a_names, a_ips) = ready_ips(&cluster, "part=redis-a", 2)?;
    let (_, b_ips) = ready_ips(&cluster, "part=redis-b", 2)?;
    let vip = cluster.cluster_ip("redis")?;
    wait_backends(&cluster, &daemon, &vip, &a_ips)?;
    let seen = answers(&cluster, "web", &vip, 20)?;
    ensure!(
        seen.iter().all(|who| a_names.contains(who)),
        "Local policy reached {:?}, node A runs {a_names:?}",
        distinct(&seen)
    );
    let fe = listed(&daemon, &vip)?.context("frontend listed")?;
    ensure!(fe["policy"] == "Local", "lb list: {fe}");
    let excluded: BTreeSet<String> = fe["excluded"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "not-local")
        .filter_map(|e| e["address"].as_str().map(str::to_string))
        .collect();
    ensure!(
        excluded == b_ips.iter().cloned().collect(),
        "node B's endpoints listed as not local: {excluded:?}, expected {b_ips:?}"
    );

    // Down to one local endpoint, then that one terminating (6 s preStop): it is still
    // used, the other node's ready endpoints are not.
    cluster.kubectl(&["scale", "deployment", "redis-a", "--replicas=1"])?;
    let (last, last_ip) = ready_ips(&cluster, "part=redis-a", 1)?;
    wait_backends(&cluster, &daemon, &vip, &last_ip)?;
    // The scaled-down pod drains (terminating, serving) before it leaves the slice.
    cluster.wait("the scaled-down pod gone", Duration::from_secs(30), || {
        Ok((cluster.endpoints("redis")?.len() == 3).then_some(()))
    })?;
    cluster.kubectl(&["scale", "deployment", "redis-a", "--replicas=0"])?;
    cluster.wait(
        "the last local endpoint terminating",
        Duration::from_secs(20),
        || {
            Ok(cluster
                .endpoints("redis")?
                .iter()
                .any(|e| e.0 == last_ip[0] && !e.1 && e.2 && e.3)
                .then_some(()))
        },
    )?;
    let draining = answers(&cluster, "web", &vip, 5)?;
    ensure!(
        draining.iter().all(|who| *who == last[0]),
        "the terminating local endpoint must still serve: {draining:?}"
    );

    // It is gone: no local endpoint, so connections are refused at once.
    wait_backends(&cluster, &daemon, &vip, &[])?;
    refused_at_once(&cluster, "web", &vip)?;
    Ok(())
}

/// trafficDistribution PreferClose with nodes in two zones: the controller hints each
/// endpoint for its zone; traffic from node A stays in node A's zone while it has an
/// endpoint there, and spreads over the other zone once the hints do not cover it.
fn prefer_close_keeps_traffic_in_the_zone() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[Some("zone-1"), Some("zone-2")])?;
    let (node_a, node_b) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let daemon = cluster.daemon(0, &[])?;
    cluster.apply(&redis_part("redis-z1", 1, Some(&node_a), 1))?;
    cluster.apply(&redis_part("redis-z2", 2, Some(&node_b), 1))?;
    cluster.apply(&redis_service("  trafficDistribution: PreferClose"))?;
    clients(&cluster, &["web"], &node_a)?;
    let (z1_names, z1_ips) = ready_ips(&cluster, "part=redis-z1", 1)?;
    let (z2_names, z2_ips) = ready_ips(&cluster, "part=redis-z2", 2)?;
    let vip = cluster.cluster_ip("redis")?;
    match wait_backends(&cluster, &daemon, &vip, &z1_ips) {
        Ok(()) => {}
        Err(err) => bail!(
            "{err:#}; slices: {}",
            cluster.kubectl(&["get", "endpointslices", "-o", "yaml"])?
        ),
    }
    let seen = answers(&cluster, "web", &vip, 20)?;
    ensure!(
        seen.iter().all(|who| z1_names.contains(who)),
        "PreferClose reached {:?}, zone-1 runs {z1_names:?}",
        distinct(&seen)
    );
    let fe = listed(&daemon, &vip)?.context("frontend listed")?;
    ensure!(fe["topology"] == "PreferSameZone", "lb list: {fe}");
    let other_zone = fe["excluded"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "other-zone")
        .count();
    ensure!(
        other_zone == 2,
        "zone-2 endpoints excluded as other-zone: {fe}"
    );

    // No endpoint left in zone-1: the hints do not cover node A's zone, so they are
    // ignored and traffic spreads over zone-2.
    cluster.kubectl(&["scale", "deployment", "redis-z1", "--replicas=0"])?;
    wait_backends(&cluster, &daemon, &vip, &z2_ips)?;
    let all_pods: Vec<String> = z1_names.iter().chain(&z2_names).cloned().collect();
    first_answer_from(&cluster, "web", &vip, &z2_names, &all_pods, "zone-2")?;
    let spread = answers(&cluster, "web", &vip, 30)?;
    let reached: BTreeSet<&String> = distinct(&spread);
    ensure!(
        reached == z2_names.iter().collect(),
        "without zone-1 endpoints: {reached:?}, zone-2 runs {z2_names:?}"
    );
    Ok(())
}

/// Waits (up to 30 s) for a first answer from `client` through `vip` from one of
/// `names`; an answer from another of `all_pods` fails at once. The first connection
/// to a node no traffic went to yet timed out (10 s) in three full-suite runs on other
/// machines, never alone; the cause is not known (in a passing full run here the
/// neighbour tables held under 50 entries and no CPU's backlog dropped a packet). A
/// first answer that takes over a second is printed with the backlog drops meanwhile
/// and the client node's neighbours, so that the next occurrence says more.
fn first_answer_from(
    cluster: &Cluster,
    client: &str,
    vip: &str,
    names: &[String],
    all_pods: &[String],
    what: &str,
) -> Result<()> {
    let started = Instant::now();
    let drops_before = backlog_drops();
    cluster.wait(
        &format!("{vip} from {client} reaching {what}"),
        Duration::from_secs(30),
        || match whoami(cluster, client, vip) {
            Ok(who) if names.contains(&who) => Ok(Some(())),
            Ok(who) if all_pods.contains(&who) => {
                bail!("{vip} from {client} reached {who}; {what} runs {names:?}")
            }
            _ => Ok(None),
        },
    )?;
    if started.elapsed() > Duration::from_secs(1) {
        let neighbours = cluster
            .pod_node(client)
            .map(|node| {
                Command::new("ip")
                    .args(["-n", &node.net().netns, "neigh"])
                    .output()
                    .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        eprintln!(
            "first answer from {client} via {vip} to {what} after {:?}; backlog drops {} -> {}; \
             neighbours of its node:\n{neighbours}",
            started.elapsed(),
            drops_before,
            backlog_drops()
        );
    }
    Ok(())
}

/// Packets every CPU's input backlog dropped (`/proc/net/softnet_stat`, column 2),
/// machine-wide: namespaces share it.
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .sum()
}

/// trafficDistribution on three nodes: A and B in zone-1, C in zone-2; one endpoint
/// on B, one on C; a client and a daemon on A and on B; three Services on those
/// endpoints, PreferSameNode, PreferSameZone and PreferClose. The controller hints
/// each endpoint for its node and zone. PreferSameNode: B's client reaches only B's
/// endpoint (same node); A's, with none on its node, only B's too (same zone, never
/// C's). PreferSameZone and PreferClose: both clients reach only B's (the zone's
/// endpoint on another node). With B's endpoint gone, every Service falls back to
/// C's (upstream's PreferSameNode specs and the multi-node PreferSameZone and
/// PreferClose ones).
fn prefer_same_node_keeps_traffic_on_the_node() -> Result<()> {
    let cluster = Cluster::new(
        shared_control_plane()?,
        &[Some("zone-1"), Some("zone-1"), Some("zone-2")],
    )?;
    let [node_a, node_b, node_c] = [0, 1, 2].map(|i| cluster.nodes[i].name.clone());
    let daemons = [cluster.daemon(0, &[])?, cluster.daemon(1, &[])?];
    cluster.apply(&redis_part("redis-b", 1, Some(&node_b), 1))?;
    cluster.apply(&redis_part("redis-c", 1, Some(&node_c), 1))?;
    let services = [
        ("same-node", "PreferSameNode"),
        ("same-zone", "PreferSameZone"),
        ("close", "PreferClose"),
    ];
    for (name, distribution) in services {
        cluster.apply(&format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: redis}}
  trafficDistribution: {distribution}
  ports: [{{port: 6379}}]
"#
        ))?;
    }
    clients(&cluster, &["on-a"], &node_a)?;
    clients(&cluster, &["on-b"], &node_b)?;
    let (b_names, b_ips) = ready_ips(&cluster, "part=redis-b", 1)?;
    let (c_names, c_ips) = ready_ips(&cluster, "part=redis-c", 1)?;
    let vips = services
        .iter()
        .map(|(name, _)| cluster.cluster_ip(name))
        .collect::<Result<Vec<_>>>()?;
    let all_pods: Vec<String> = b_names.iter().chain(&c_names).cloned().collect();
    let reach_only = |names: &[String], what: &str| -> Result<()> {
        for ((service, _), vip) in services.iter().zip(&vips) {
            for client in ["on-b", "on-a"] {
                first_answer_from(&cluster, client, vip, names, &all_pods, what)?;
                let seen = answers(&cluster, client, vip, 10)?;
                ensure!(
                    seen.iter().all(|who| names.contains(who)),
                    "{service} from {client} reached {:?}; {what} runs {names:?}",
                    distinct(&seen)
                );
            }
        }
        Ok(())
    };
    for daemon in &daemons {
        for vip in &vips {
            if let Err(err) = wait_backends(&cluster, daemon, vip, &b_ips) {
                bail!(
                    "{err:#}; slices: {}",
                    cluster.kubectl(&["get", "endpointslices", "-o", "yaml"])?
                );
            }
        }
    }
    reach_only(&b_names, "node B")?;
    let on_b = listed(&daemons[1], &vips[0])?.context("frontend listed on node B")?;
    ensure!(on_b["topology"] == "PreferSameNode", "node B lists {on_b}");

    // Node B's endpoint goes: no hint covers either node or zone-1, so every Service
    // falls back to every endpoint: C's.
    cluster.kubectl(&["scale", "deployment", "redis-b", "--replicas=0"])?;
    for daemon in &daemons {
        for vip in &vips {
            wait_backends(&cluster, daemon, vip, &c_ips)?;
        }
    }
    reach_only(&c_names, "node C")
}

/// Dual-stack Services from the real allocator (the control plane has an IPv4 and an
/// IPv6 service range; the kubelet stand-in reports both pod addresses):
/// RequireDualStack and PreferDualStack get a ClusterIP of each family, an IPv6-only
/// Service one IPv6 ClusterIP, a Service that asks nothing stays IPv4. Every one of
/// those addresses is served from a client pod and reaches both pods, whose IPv6
/// addresses the EndpointSlice controller lists in the Services' IPv6 slices.
fn dual_stack_services_serve_both_families() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let node_a = cluster.nodes[0].name.clone();
    let daemon = cluster.daemon(0, &[])?;
    let pods_yaml = pinned_redis("redis", 2, &node_a);
    let services = [
        ("require", "ipFamilyPolicy: RequireDualStack", 2),
        ("prefer", "ipFamilyPolicy: PreferDualStack", 2),
        ("v6-only", "ipFamilies: [IPv6]", 1),
        ("default", "", 1),
    ];
    let mut yaml = pods_yaml;
    for (name, family, _) in services {
        yaml.push_str(&format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  {family}
  selector: {{app: redis}}
  ports: [{{port: 6379}}]
---
"#
        ));
    }
    cluster.apply(&yaml)?;
    let pods: BTreeSet<String> = cluster.wait_ready("app=redis", 2)?.into_iter().collect();
    cluster.run_client("client")?;
    for (name, _, families) in services {
        let ips = cluster.kubectl(&[
            "get",
            "service",
            name,
            "-o",
            "jsonpath={.spec.clusterIPs[*]}",
        ])?;
        let ips: Vec<&str> = ips.split_whitespace().collect();
        let v6 = ips.iter().filter(|ip| ip.contains(':')).count();
        let expected_v6 = usize::from(name != "default");
        ensure!(
            ips.len() == families && v6 == expected_v6,
            "Service {name}: clusterIPs {ips:?}"
        );
        for ip in ips {
            let reached = cluster.wait(
                &format!("{name} at {ip} reaching both pods"),
                Duration::from_secs(30),
                || {
                    let seen: BTreeSet<String> =
                        answers(&cluster, "client", ip, 20)?.into_iter().collect();
                    Ok((seen == pods).then_some(seen))
                },
            )?;
            let listed = listed(&daemon, ip)?.context("frontend listed")?;
            let backends_of_its_family = listed["backends"].as_array().is_some_and(|b| {
                b.len() == 2
                    && b.iter().all(|be| {
                        be["address"].as_str().unwrap_or("").contains(':') == ip.contains(':')
                    })
            });
            ensure!(backends_of_its_family, "{name} at {ip}: {listed}");
            eprintln!("{name} at {ip}: {reached:?}");
        }
    }
    Ok(())
}
