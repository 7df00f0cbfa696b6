//! Load-balancing modes per workload (`lb.dev/mode` on a Pod or its Namespace, or
//! detected) on a real control plane: the kubelet stand-in gives every pod its own
//! cgroup as the kubelet lays them out, and the daemon finds them by pod uid.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use libtest_mimic::Trial;

use crate::{
    cluster::{Cluster, shared_control_plane, trial},
    kube::pod_ips_of,
    support::{
        Daemon, manifest_dir, redis_manifest, redis_world, service_yaml, slice_yaml, write_manifest,
    },
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "workloads::off_mode_pods_are_left_alone_and_modes_follow_annotations_live",
            off_mode_pods_are_left_alone_and_modes_follow_annotations_live,
        ),
        trial(
            "workloads::a_sidecar_proxy_sees_the_cluster_ip_in_packet_mode",
            a_sidecar_proxy_sees_the_cluster_ip_in_packet_mode,
        ),
        trial(
            "workloads::a_guest_no_socket_hook_sees_is_balanced_in_packet_mode",
            a_guest_no_socket_hook_sees_is_balanced_in_packet_mode,
        ),
        trial(
            "workloads::modes_from_pod_manifests",
            modes_from_pod_manifests,
        ),
    ]
}

/// Connects from `pod` to `host`:6379 (2 s timeout) and asks redis who answers:
/// `answer <name> peer <address>` (the peer as `getpeername` shows it), or
/// `error <what>`.
fn dial(cluster: &Cluster, pod: &str, host: &str) -> Result<String> {
    let script = dial_script(host);
    let out = cluster.exec(pod, &["python3", "-c", &script])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Client pod `name` on the cluster's first node, with `annotations` (YAML flow map
/// entries, may be empty).
fn client(cluster: &Cluster, name: &str, annotations: &str) -> Result<()> {
    let node = &cluster.nodes[0].name;
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{client: {name}}}, \
         annotations: {{{annotations}}}}}\nspec:\n  nodeName: {node}\n  containers: \
         [{{name: app, image: busybox, command: [sleep, infinity]}}]\n"
    ))?;
    cluster.wait_ready(&format!("client={name}"), 1)?;
    Ok(())
}

/// Waits until `dial` from `pod` to `vip` gives an answer (`balanced`) or an error.
fn wait_dial(cluster: &Cluster, pod: &str, vip: &str, balanced: bool) -> Result<String> {
    cluster.wait(
        &format!(
            "{pod} to {vip} {}",
            if balanced { "balanced" } else { "left alone" }
        ),
        Duration::from_secs(10),
        || {
            let result = dial(cluster, pod, vip)?;
            Ok((result.starts_with("answer") == balanced).then_some(result))
        },
    )
}

fn metric(daemon: &Daemon, mode: &str) -> Result<f64> {
    daemon.metric(&format!("lb_pods{{mode=\"{mode}\"}}"))
}

/// A pod annotated `off` dials a ClusterIP untranslated (blackholed here, so it
/// fails at once) while a pod beside it is balanced; `lb list` and /metrics show it.
/// Annotating the pod `socket` live balances its next connection; a Namespace
/// annotation applies to the pods without their own; a value that names no mode is
/// reported by pod name and ignored; deleting the pod removes its entry.
fn off_mode_pods_are_left_alone_and_modes_follow_annotations_live() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let daemon = cluster.daemon(0, &[])?;
    cluster.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: redis, labels: {app: redis}}\nspec:\n  \
         containers: [{name: redis, image: redis, ports: [{containerPort: 6379}]}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: redis}\nspec:\n  selector: {app: \
         redis}\n  ports: [{port: 6379}]\n",
    )?;
    client(&cluster, "web", "")?;
    client(&cluster, "mesh", "lb.dev/mode: 'off'")?;
    cluster.wait_ready("app=redis", 1)?;
    let vip = cluster.cluster_ip("redis")?;
    let pod_ip = pod_ips_of(&cluster, "app=redis", &["redis".to_string()])?[0].clone();

    // web is balanced and sees the ClusterIP as its peer (socket-level rewrite).
    let web = wait_dial(&cluster, "web", &vip, true)?;
    ensure!(web == format!("answer redis peer {vip}"), "web: {web}");
    // mesh is left alone: its connection goes to the ClusterIP itself.
    let mesh = wait_dial(&cluster, "mesh", &vip, false)?;
    let skipped = daemon.metric("lb_datapath_decisions_total{decision=\"workload_skipped\"}")?;
    ensure!(skipped >= 1.0, "workload_skipped = {skipped} after {mesh}");
    // ... but reaches the pod address directly, as the pod would through its own mesh.
    let direct = dial(&cluster, "mesh", &pod_ip)?;
    ensure!(
        direct == format!("answer redis peer {pod_ip}"),
        "mesh direct: {direct}"
    );
    ensure!(metric(&daemon, "off")? == 1.0, "lb_pods off");
    ensure!(metric(&daemon, "socket")? >= 2.0, "lb_pods socket");
    let list = daemon.list_text()?;
    let line = format!(
        "{}/mesh mode off (Pod {}/mesh's annotation lb.dev/mode); cgroup ",
        cluster.namespace, cluster.namespace
    );
    ensure!(
        list.contains(&line) && list.contains("1 cgroups in the kernel (1 off)"),
        "lb list:\n{list}"
    );

    // Annotated socket: its next connection is balanced.
    cluster.kubectl(&[
        "annotate",
        "--overwrite",
        "pod",
        "mesh",
        "lb.dev/mode=socket",
    ])?;
    let mesh = wait_dial(&cluster, "mesh", &vip, true)?;
    ensure!(mesh == format!("answer redis peer {vip}"), "mesh: {mesh}");

    // The Namespace says off: web (no annotation of its own) is left alone, mesh (its
    // own says socket) is still balanced.
    cluster.kubectl(&[
        "annotate",
        "--overwrite",
        "namespace",
        &cluster.namespace,
        "lb.dev/mode=off",
    ])?;
    wait_dial(&cluster, "web", &vip, false)?;
    let mesh = dial(&cluster, "mesh", &vip)?;
    ensure!(
        mesh.starts_with("answer"),
        "mesh under an off Namespace: {mesh}"
    );
    cluster.kubectl(&["annotate", "namespace", &cluster.namespace, "lb.dev/mode-"])?;
    wait_dial(&cluster, "web", &vip, true)?;

    // A typo is reported by name and ignored: the pod stays balanced.
    cluster.kubectl(&["annotate", "--overwrite", "pod", "web", "lb.dev/mode=offf"])?;
    let mut daemon = daemon;
    daemon.wait_for_log(
        &format!(
            "Pod {}/web's annotation lb.dev/mode: \"offf\" is not a load-balancing mode",
            cluster.namespace
        ),
        Duration::from_secs(10),
    )?;
    let web = dial(&cluster, "web", &vip)?;
    ensure!(web.starts_with("answer"), "web with a typo: {web}");

    // Off again, then deleted: its entry goes with it.
    cluster.kubectl(&["annotate", "--overwrite", "pod", "mesh", "lb.dev/mode=off"])?;
    wait_dial(&cluster, "mesh", &vip, false)?;
    cluster.kubectl(&["delete", "pod", "mesh", "--grace-period=0", "--wait=true"])?;
    cluster.wait("mesh's entry removed", Duration::from_secs(10), || {
        Ok(
            (!daemon.list_text()?.contains("pods not balanced") && metric(&daemon, "off")? == 0.0)
                .then_some(()),
        )
    })?;
    Ok(())
}

/// A sidecar proxy as Istio's: the pod's own iptables send its outbound TCP to port
/// 15001, where the proxy reads SO_ORIGINAL_DST, logs it, and connects onward to it
/// (marked, so that connection is not sent back to itself). One request and its
/// answer per connection.
const PROXY: &str = r#"
import socket, struct, sys, threading
log = open(sys.argv[1], 'a', buffering=1)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(('0.0.0.0', 15001))
server.listen(64)
def serve(conn):
    raw = conn.getsockopt(socket.SOL_IP, 80, 16)
    port, ip = struct.unpack('!H', raw[2:4])[0], socket.inet_ntoa(raw[4:8])
    log.write('%s:%d\n' % (ip, port))
    up = socket.socket()
    up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1337)
    up.settimeout(3)
    try:
        up.connect((ip, port))
        up.sendall(conn.recv(4096))
        data = b''
        while data.count(b'\r\n') < 2:
            chunk = up.recv(4096)
            if not chunk: break
            data += chunk
        conn.sendall(data)
    except OSError as e:
        log.write('upstream error %s\n' % e)
    conn.close(); up.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// Lets `pod`'s packets to Service addresses leave the pod (the test bed blackholes
/// the service range in every pod; a real pod routes it to its node, where lb's
/// packet path translates it, and where the test bed's node still blackholes what it
/// would not).
fn route_services_to_the_node(cluster: &Cluster, pod: &str) -> Result<()> {
    let out = cluster.exec(pod, &["ip", "route", "del", "blackhole", "10.96.0.0/12"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits until `lb list` shows `pod` in `mode`, its programs attached in packet mode.
fn wait_mode(cluster: &Cluster, daemon: &Daemon, pod: &str, mode: &str) -> Result<String> {
    let name = format!("{}/{pod} mode {mode} ", cluster.namespace);
    cluster
        .wait(
            &format!("{pod} in mode {mode}"),
            Duration::from_secs(15),
            || {
                let list = daemon.list_text()?;
                let line = list.lines().find(|l| l.contains(&name)).map(str::to_string);
                Ok(line.filter(|l| mode != "packet" || l.contains("interface ")))
            },
        )
        .with_context(|| {
            format!(
                "lb list:\n{}\ndaemon log:\n{}",
                daemon.list_text().unwrap_or_default(),
                daemon.log_text()
            )
        })
}

/// Three redis pods, two on the first node and one on the second, behind Service
/// `redis`; returns (ClusterIP, pod names).
fn redis_on_two_nodes(cluster: &Cluster) -> Result<(String, Vec<String>)> {
    for (name, node) in [
        ("redis-1", &cluster.nodes[0].name),
        ("redis-2", &cluster.nodes[0].name),
        ("redis-3", &cluster.nodes[1].name),
    ] {
        cluster.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: redis}}}}\n\
             spec:\n  nodeName: {node}\n  containers: [{{name: redis, image: redis, ports: \
             [{{containerPort: 6379}}]}}]\n"
        ))?;
    }
    cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: redis}\nspec:\n  selector: {app: \
         redis}\n  ports: [{port: 6379}]\n",
    )?;
    let names = cluster.wait_ready("app=redis", 3)?;
    Ok((cluster.cluster_ip("redis")?, names))
}

/// A pod with an `istio-proxy` container is detected as meshed and balanced per
/// packet: its sidecar reads the ClusterIP the application dialled (SO_ORIGINAL_DST)
/// and its onward connection to that ClusterIP is balanced across the Service's pods
/// on both nodes, while the application's getpeername() shows the ClusterIP. In
/// socket mode (annotated) the proxy sees a pod address instead, as it does under
/// every socket-level balancer; annotated packet again, the ClusterIP.
fn a_sidecar_proxy_sees_the_cluster_ip_in_packet_mode() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let mut daemon = cluster.daemon(0, &[])?;
    let (vip, names) = redis_on_two_nodes(&cluster)?;
    let node = &cluster.nodes[0].name;
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: mesh, labels: {{client: mesh}}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - {{name: app, image: busybox, \
         command: [sleep, infinity]}}\n  - {{name: istio-proxy, image: busybox, command: \
         [sleep, infinity]}}\n"
    ))?;
    cluster.wait_ready("client=mesh", 1)?;
    let line = wait_mode(&cluster, &daemon, "mesh", "packet")?;
    ensure!(
        line.contains("(detected: an istio-proxy container)"),
        "lb list: {line}"
    );
    daemon.wait_for_log("packet-mode programs attached", Duration::from_secs(5))?;
    route_services_to_the_node(&cluster, "mesh")?;
    let work = tempfile::tempdir()?;
    let (script, log) = (work.path().join("proxy.py"), work.path().join("proxy.log"));
    std::fs::write(&script, PROXY)?;
    let redirect = "iptables -t nat -A OUTPUT -p tcp --dport 6379 -m mark ! --mark 1337 -j \
                    REDIRECT --to-ports 15001";
    let start = format!(
        "{redirect} && (python3 {} {} >/dev/null 2>&1 &) && sleep 0.5",
        script.display(),
        log.display()
    );
    let out = cluster.exec("mesh", &["sh", "-c", &start])?;
    ensure!(
        out.status.success(),
        "starting the sidecar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dials = |n: usize| -> Result<Vec<String>> {
        std::fs::write(&log, "")?;
        (0..n).map(|_| dial(&cluster, "mesh", &vip)).collect()
    };
    let seen = dials(30)?;
    let recorded = std::fs::read_to_string(&log)?;
    ensure!(
        recorded.lines().count() == 30 && recorded.lines().all(|l| l == format!("{vip}:6379")),
        "the sidecar must see the ClusterIP the application dialled:\n{recorded}"
    );
    let mut answered = std::collections::BTreeSet::new();
    for result in &seen {
        let who = result
            .strip_prefix("answer ")
            .and_then(|r| r.strip_suffix(&format!(" peer {vip}")))
            .with_context(|| format!("a dial through the sidecar: {result}"))?;
        answered.insert(who.to_string());
    }
    ensure!(
        answered.len() >= 2 && answered.iter().all(|w| names.contains(w)),
        "onward connections balanced across {names:?}: {answered:?}"
    );
    ensure!(
        daemon.metric("lb_datapath_decisions_total{decision=\"tc_translated\"}")? >= 30.0,
        "the packet path translated the onward connections"
    );

    // Socket mode: the application's connect() is rewritten before iptables sees it,
    // so the proxy only sees a pod address.
    cluster.kubectl(&["annotate", "pod", "mesh", "lb.dev/mode=socket"])?;
    wait_socket(&cluster, &daemon, "mesh")?;
    let recorded = {
        dials(5)?;
        std::fs::read_to_string(&log)?
    };
    ensure!(
        recorded.lines().count() == 5 && recorded.lines().all(|l| !l.starts_with(&vip)),
        "in socket mode the sidecar sees pod addresses:\n{recorded}"
    );
    cluster.kubectl(&[
        "annotate",
        "--overwrite",
        "pod",
        "mesh",
        "lb.dev/mode=packet",
    ])?;
    wait_mode(&cluster, &daemon, "mesh", "packet")?;
    let recorded = {
        dials(5)?;
        std::fs::read_to_string(&log)?
    };
    ensure!(
        recorded.lines().all(|l| l == format!("{vip}:6379")),
        "packet mode again:\n{recorded}"
    );
    Ok(())
}

/// Waits until `lb list` no longer shows `pod` (socket mode is not listed).
fn wait_socket(cluster: &Cluster, daemon: &Daemon, pod: &str) -> Result<()> {
    let name = format!("{}/{pod} mode ", cluster.namespace);
    cluster.wait(
        &format!("{pod} in socket mode"),
        Duration::from_secs(15),
        || Ok((!daemon.list_text()?.contains(&name)).then_some(())),
    )
}

/// `argv` from pod `pod` as a VM guest would run it: in the pod's network namespace,
/// but where no socket hook of the node sees it.
fn guest(cluster: &Cluster, pod: &str, argv: &[&str]) -> Result<String> {
    let out =
        cluster.nodes[0].exec_as_guest(&cluster.namespace, pod, argv, Duration::from_secs(10))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A client whose sockets no socket hook sees (a VM guest's, in the pod's namespace)
/// reaches nothing through a ClusterIP in socket mode; annotated `packet`, its TCP
/// connections are balanced across both nodes' pods, its UDP queries answered, a
/// ClientIP-affinity Service keeps it on one pod, an internalTrafficPolicy Local one
/// on this node's, and a Service without endpoints refuses it at once.
fn a_guest_no_socket_hook_sees_is_balanced_in_packet_mode() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let daemon = cluster.daemon(0, &[])?;
    let (vip, names) = redis_on_two_nodes(&cluster)?;
    client(&cluster, "vm", "")?;
    route_services_to_the_node(&cluster, "vm")?;
    // Who answers a connection of the guest's (the pod's name), or `error ...`.
    let python = |host: &str| -> Result<String> {
        let out = guest(&cluster, "vm", &["python3", "-c", &dial_script(host)])?;
        Ok(match out.strip_prefix("answer ") {
            Some(rest) => rest.split(" peer ").next().unwrap_or_default().to_string(),
            None => out,
        })
    };
    let before = python(&vip)?;
    ensure!(
        before.starts_with("error"),
        "socket mode, unseen guest: {before}"
    );

    cluster.kubectl(&["annotate", "pod", "vm", "lb.dev/mode=packet"])?;
    wait_mode(&cluster, &daemon, "vm", "packet")?;
    let seen: Vec<String> = (0..30).map(|_| python(&vip)).collect::<Result<_>>()?;
    let answered: std::collections::BTreeSet<&String> = seen.iter().collect();
    ensure!(
        answered.len() == 3 && answered.iter().all(|w| names.contains(w)),
        "the guest's connections spread over every pod of both nodes: {seen:?}"
    );

    // UDP: a DNS Service answered by its pod on the other node.
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: dns, labels: {{app: dns}}}}\nspec:\n  \
         nodeName: {}\n  containers: [{{name: dns, image: coredns}}]\n---\napiVersion: v1\n\
         kind: Service\nmetadata: {{name: dns}}\nspec:\n  selector: {{app: dns}}\n  ports: \
         [{{port: 53, protocol: UDP}}]\n",
        cluster.nodes[1].name
    ))?;
    cluster.wait_ready("app=dns", 1)?;
    let dns_vip = cluster.cluster_ip("dns")?;
    let dns_ip = pod_ips_of(&cluster, "app=dns", &["dns".to_string()])?[0].clone();
    let answer = cluster.wait("a DNS answer over UDP", Duration::from_secs(10), || {
        let out = guest(
            &cluster,
            "vm",
            &[
                "dig",
                "+short",
                "+tries=1",
                "+time=1",
                &format!("@{dns_vip}"),
                "whoami.test",
            ],
        )?;
        Ok(out.lines().any(|l| l == dns_ip).then_some(out))
    })?;
    ensure!(answer.lines().any(|l| l == dns_ip), "dig: {answer}");

    // Affinity: one pod for every connection of this client.
    cluster.kubectl(&[
        "patch",
        "service",
        "redis",
        "-p",
        r#"{"spec": {"sessionAffinity": "ClientIP"}}"#,
    ])?;
    let sticky = cluster.wait("affinity in force", Duration::from_secs(10), || {
        let seen: Vec<String> = (0..10).map(|_| python(&vip)).collect::<Result<_>>()?;
        let distinct: std::collections::BTreeSet<&String> = seen.iter().collect();
        Ok((distinct.len() == 1).then(|| seen[0].clone()))
    })?;
    ensure!(names.contains(&sticky), "affinity to {sticky}");

    // internalTrafficPolicy Local: this node's pods only.
    cluster.kubectl(&[
        "patch",
        "service",
        "redis",
        "-p",
        r#"{"spec": {"sessionAffinity": "None", "internalTrafficPolicy": "Local"}}"#,
    ])?;
    let local = cluster.wait("only local pods", Duration::from_secs(10), || {
        let seen: Vec<String> = (0..20).map(|_| python(&vip)).collect::<Result<_>>()?;
        Ok(seen
            .iter()
            .all(|w| w == "redis-1" || w == "redis-2")
            .then_some(seen))
    })?;
    ensure!(
        local.iter().any(|w| w == "redis-1") && local.iter().any(|w| w == "redis-2"),
        "both local pods used: {local:?}"
    );

    // No endpoints: refused at once (an ICMP port unreachable from the packet path).
    cluster.kubectl(&[
        "delete",
        "pod",
        "redis-1",
        "redis-2",
        "redis-3",
        "--grace-period=0",
    ])?;
    let refused = cluster.wait("refused", Duration::from_secs(20), || {
        let started = std::time::Instant::now();
        let out = python(&vip)?;
        Ok(out
            .contains("Connection refused")
            .then_some((out, started.elapsed())))
    })?;
    ensure!(
        refused.1 < Duration::from_millis(800),
        "refused only after {:?}",
        refused.1
    );
    Ok(())
}

/// `python3 -c` script: connects to `host`:6379 (2 s timeout) and asks redis who
/// answers: `answer <name> peer <address>` (the peer as `getpeername` shows it), or
/// `error <what>`.
fn dial_script(host: &str) -> String {
    format!(
        "import socket\n\
         s = socket.socket(); s.settimeout(2)\n\
         try:\n    \
             s.connect(('{host}', 6379))\n    \
             s.sendall(b'GET whoami\\r\\n')\n    \
             data = b''\n    \
             while data.count(b'\\r\\n') < 2:\n        \
                 chunk = s.recv(4096)\n        \
                 if not chunk: break\n        \
                 data += chunk\n    \
             print('answer', data.split(b'\\r\\n')[1].decode(), 'peer', s.getpeername()[0])\n\
         except OSError as e:\n    \
             print('error', e)\n"
    )
}

/// Standalone: a Pod manifest names its cgroup (`lb.dev/cgroup`) and mode. In packet
/// mode a process of the pod's cgroup and one in no cgroup at all (a guest) are both
/// balanced by the pod interface's programs, and see the ClusterIP as their peer;
/// rewritten to off, neither reaches it; without the annotation, the socket hooks
/// balance the pod's process again and the guest reaches nothing.
fn modes_from_pod_manifests() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let node = tb.node_netns().to_string();
    // Routed as a real node: forwarding on, the service range sent to the node (which
    // still blackholes it).
    lb_testbed::run(
        "ip",
        &[
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    let pod_cgroup = tb.cgroup().join("kubepods/podapp");
    std::fs::create_dir_all(&pod_cgroup)?;
    let mut sleeper = lb_testbed::netns_command(&client.netns, Some(&pod_cgroup), "sleep")?;
    let mut sleeper = sleeper.arg("infinity").spawn()?;
    let route = lb_testbed::run(
        "ip",
        &[
            "-n",
            &client.netns,
            "route",
            "replace",
            "10.96.0.0/12",
            "via",
            "10.244.1.1",
        ],
    );
    let result = (|| -> Result<()> {
        route?;
        let dir = manifest_dir(&tb)?;
        let vip = "10.96.0.100";
        write_manifest(
            &dir,
            "redis.yaml",
            &redis_manifest(vip, &backends.iter().collect::<Vec<_>>()),
        )?;
        let pod = |mode: Option<&str>| {
            let annotations = mode
                // Quoted: YAML reads a bare `off` as a boolean.
                .map(|m| format!("lb.dev/mode: '{m}', "))
                .unwrap_or_default();
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: app, namespace: pods, annotations: \
                 {{{annotations}lb.dev/cgroup: {}}}}}\nspec: {{containers: [{{name: app}}]}}\n\
                 status: {{podIPs: [{{ip: {}}}]}}\n",
                pod_cgroup.display(),
                client.ipv4
            )
        };
        write_manifest(&dir, "app.yaml", &pod(Some("packet")))?;
        let daemon = Daemon::start_with(&tb, &dir, &["--netns", &format!("/run/netns/{node}")])?;
        let inside = || -> Result<String> {
            let mut cmd = lb_testbed::netns_command(&client.netns, Some(&pod_cgroup), "python3")?;
            cmd.args(["-c", &dial_script(vip)]);
            let out = lb_testbed::output_with_timeout(cmd, Duration::from_secs(10))?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let guest = || -> Result<String> {
            let argv = ["python3", "-c", &dial_script(vip)];
            let out = tb.output(&client, false, &argv, Duration::from_secs(10))?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let wait = |what: &str, check: &dyn Fn() -> Result<bool>| -> Result<()> {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while !check()? {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "timed out waiting for {what}; lb list:\n{}\ndaemon log:\n{}",
                    daemon.list_text().unwrap_or_default(),
                    daemon.log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        };
        wait("the pod's interface", &|| {
            Ok(daemon.list_text()?.contains("pods/app mode packet")
                && daemon.list_text()?.contains("interface v"))
        })?;
        let names: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();
        let mut answered = std::collections::BTreeSet::new();
        for _ in 0..20 {
            for result in [inside()?, guest()?] {
                let who = result
                    .strip_prefix("answer ")
                    .and_then(|r| r.strip_suffix(&format!(" peer {vip}")))
                    .with_context(|| format!("packet mode: {result}"))?;
                answered.insert(who.to_string());
            }
        }
        ensure!(
            answered.len() == 2 && answered.iter().all(|w| names.contains(w)),
            "balanced over {names:?}: {answered:?}"
        );
        bulk_transfers_arrive_intact(&tb, &daemon, &client, &backends[0], &dir)?;

        write_manifest(&dir, "app.yaml", &pod(Some("off")))?;
        wait("off mode", &|| {
            Ok(daemon.list_text()?.contains("pods/app mode off"))
        })?;
        for result in [inside()?, guest()?] {
            ensure!(result.starts_with("error"), "off mode: {result}");
        }

        write_manifest(&dir, "app.yaml", &pod(None))?;
        wait("socket mode", &|| {
            Ok(!daemon.list_text()?.contains("pods/app mode"))
        })?;
        let socket = inside()?;
        ensure!(
            socket.ends_with(&format!(" peer {vip}")) && socket.starts_with("answer"),
            "socket mode: {socket}"
        );
        let guest_now = guest()?;
        ensure!(
            guest_now.starts_with("error"),
            "socket mode, unseen guest: {guest_now}"
        );
        Ok(())
    })();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    result
}

/// Serves `bulk` (ClusterIP 10.96.0.101:9000) from `backend`: a connection that sends
/// `D` gets argv[1] MiB of seeded random bytes, one that sends `U` and then bytes gets
/// their SHA-256.
const BULK_SERVER: &str = r#"
import hashlib, random, socket, sys
mib = int(sys.argv[1])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(('0.0.0.0', 9000))
server.listen(8)
while True:
    conn, _ = server.accept()
    if conn.recv(1) == b'D':
        rng = random.Random(7)
        for _ in range(mib):
            conn.sendall(rng.randbytes(1 << 20))
    else:
        digest = hashlib.sha256()
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk: break
            digest.update(chunk)
        conn.sendall(digest.hexdigest().encode())
    conn.close()
"#;

/// The client side: the SHA-256 of the download, and whether the server's digest of
/// the upload matches what was sent.
const BULK_CLIENT: &str = r#"
import hashlib, random, socket, sys
mib = int(sys.argv[1])
def connect():
    s = socket.socket(); s.settimeout(30); s.connect(('10.96.0.101', 9000)); return s
s = connect(); s.sendall(b'D'); digest = hashlib.sha256()
while True:
    chunk = s.recv(1 << 16)
    if not chunk: break
    digest.update(chunk)
print('download', digest.hexdigest())
s = connect(); s.sendall(b'U'); rng = random.Random(9); sent = hashlib.sha256()
for _ in range(mib):
    block = rng.randbytes(1 << 20); sent.update(block); s.sendall(block)
s.shutdown(socket.SHUT_WR)
print('upload', s.recv(100).decode() == sent.hexdigest())
"#;

/// 100 MiB each way (8 on an emulated CPU, `LB_E2E_SLOWDOWN`) between a guest of the
/// packet-mode pod `client` and `backend` through the ClusterIP, compared by SHA-256.
fn bulk_transfers_arrive_intact(
    tb: &lb_testbed::Testbed,
    daemon: &Daemon,
    client: &lb_testbed::Pod,
    backend: &lb_testbed::Pod,
    dir: &std::path::Path,
) -> Result<()> {
    let mib = if std::env::var_os("LB_E2E_SLOWDOWN").is_some() {
        "8"
    } else {
        "100"
    };
    let mut server = tb.command(backend, false, "python3")?;
    let mut server = server.args(["-c", BULK_SERVER, mib]).spawn()?;
    let result = (|| -> Result<()> {
        write_manifest(
            dir,
            "bulk.yaml",
            &format!(
                "{}---\n{}",
                service_yaml("bulk", &["10.96.0.101"], &[("", 9000, "TCP", "9000")]),
                slice_yaml(
                    "bulk-1",
                    "bulk",
                    "IPv4",
                    &[("", 9000, "TCP")],
                    &[backend.ipv4.to_string()]
                )
            ),
        )?;
        let expected = {
            let script = "import hashlib, random, sys\nrng = random.Random(7)\n\
                          d = hashlib.sha256()\n\
                          for _ in range(int(sys.argv[1])): d.update(rng.randbytes(1 << 20))\n\
                          print(d.hexdigest())";
            let out = std::process::Command::new("python3")
                .args(["-c", script, mib])
                .output()?;
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let backend_ip = format!("{}:9000", backend.ipv4);
        daemon.wait_for_backends("10.96.0.101", 9000, "TCP", &[&backend_ip])?;
        let argv = ["python3", "-c", BULK_CLIENT, mib];
        let out = tb.output(client, false, &argv, Duration::from_secs(120))?;
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out == format!("download {expected}\nupload True"),
            "{mib} MiB each way through the packet path: {out}"
        );
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}
