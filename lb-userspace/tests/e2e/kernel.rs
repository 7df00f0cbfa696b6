//! What differs by kernel, tested the same way on every kernel: the TC programs'
//! attachment (TCX links on 6.6+, netlink clsact filters before, or forced with
//! `--tc-attach netlink`), which must survive `kill -9` and be replaced in place; an
//! interface where attaching fails, which must cost that interface only; and the
//! kernel-feature report. `cargo xtask test` runs these on the host and, with the
//! rest of the kernel-compatibility subset, inside Linux 6.1.

use std::{collections::BTreeSet, process::Command, thread, time::Duration};

use anyhow::{Context as _, Result, ensure};
use lb_testbed::{Pod, output_with_timeout, world::World};
use libtest_mimic::Trial;

use crate::{
    external::redis_pods,
    probe::Probe,
    reliability::tally,
    support::{Daemon, READY, slow},
    trial,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "kernel::node_ports_survive_kill_9_with_the_kernels_tc_attachment",
            || node_ports_survive_kill_9("auto"),
        ),
        trial(
            "kernel::node_ports_survive_kill_9_with_netlink_filters",
            || node_ports_survive_kill_9("netlink"),
        ),
        trial(
            "kernel::uplinks_that_cannot_be_served_are_refused_with_the_reason",
            uplinks_that_cannot_be_served_are_refused_with_the_reason,
        ),
    ]
}

/// An interface without Ethernet headers (loopback) is never attached, and the SNAT
/// ports must be outside the node's ephemeral range: with
/// `net.ipv4.ip_local_port_range = 32768 64000` in the node's namespace the uplink
/// stays unattached, with the reason in `lb list`, while the daemon is ready and
/// serves the rest; once the operator reserves the ports, the next try attaches it.
/// And a node port with no known node address is reported, not silently missed.
fn uplinks_that_cannot_be_served_are_refused_with_the_reason() -> Result<()> {
    let world = World::new(&["a"])?;
    let node = world.node("a");
    // Per-namespace settings, written from inside the node's namespace.
    let sysctl = |name: &str, value: &str| {
        lb_testbed::run(
            "ip",
            &[
                "netns",
                "exec",
                &node.netns,
                "sh",
                "-c",
                &format!("echo '{value}' > /proc/sys/net/ipv4/{name}"),
            ],
        )
    };
    sysctl("ip_local_port_range", "32768 64000")?;
    let work_dir = std::env::temp_dir().join(format!("{}-uplinks", world.id));
    let manifests = work_dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(
        manifests.join("node.yaml"),
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: a}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{}\"}}]\n",
            node.ipv4
        ),
    )?;
    let netns = format!("/run/netns/{}", node.netns);
    let mut daemon = Daemon::launch_source(
        &format!("/sys/fs/bpf/{}-a", world.id),
        &node.cgroup.path,
        &work_dir,
        vec![
            "--manifests".into(),
            manifests.display().to_string(),
            "--node-name".into(),
            "a".into(),
        ],
        &[
            "--netns",
            &netns,
            "--devices",
            "eth0,lo",
            "--tc-retry-seconds",
            "1",
        ],
    )?;
    daemon.wait_for_log(READY, slow(Duration::from_secs(30)))?;
    let list = daemon.list_text()?;
    ensure!(
        list.contains("TC on lo: NOT ATTACHED: lo is not an Ethernet interface (link type 772)")
            && list.contains("TC on eth0: NOT ATTACHED: the SNAT ports 61000-65535 overlap")
            && list.contains("net.ipv4.ip_local_port_range = 32768 64000"),
        "lb list:\n{list}"
    );
    sysctl("ip_local_reserved_ports", "61000-65535")?;
    daemon.wait_for_log(
        "TC programs attached on retry",
        slow(Duration::from_secs(10)),
    )?;
    let list = daemon.list_text()?;
    ensure!(
        list.lines().any(|l| l.starts_with("TC on eth0: attached"))
            && list.contains("TC on lo: NOT ATTACHED"),
        "after the ports were reserved:\n{list}"
    );

    // A node port while no address of this node is known (the Node object leaves the
    // folder): said once in the log and in lb list, instead of a silent miss.
    std::fs::remove_file(manifests.join("node.yaml"))?;
    std::fs::write(
        manifests.join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.0.81\n  ports: [{port: 80, nodePort: 30082}]\n",
    )?;
    daemon.wait_for_log(
        "node port 30082 is not served",
        slow(Duration::from_secs(10)),
    )?;
    let list = daemon.list_text()?;
    ensure!(
        list.contains(
            "NOT SERVED: Service default/web: node port 30082 is not served: no address of node \"a\" is known"
        ),
        "lb list:\n{list}"
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(())
}

const CLUSTER_VIP: &str = "10.96.0.80";
const CLUSTER_PORT: u16 = 30080;
const LOCAL_PORT: u16 = 30081;
/// An interface that does not exist when the daemon starts, then appears.
const LATE_DEVICE: &str = "lblate0";

/// Two nodes from manifests, a redis pod on each, a client pod on node A and a client
/// outside. Node A's daemon serves `eth0` and an interface that does not exist yet:
///
/// - it is ready anyway, and ClusterIPs and node ports work (on 6.1 before this fix,
///   a TC attach failure failed the whole sync forever);
/// - `lb list` and `/metrics` name the failed interface and the kernel's features; the
///   interface appears and is attached on the next try;
/// - externalTrafficPolicy Cluster spreads over both nodes' pods (SNAT for node B's),
///   Local answers from node A's pod only;
/// - a new connection every 20 ms through the node port from outside and through the
///   ClusterIP from the pod, while node A's daemon is killed with `kill -9` five
///   times: none fails, and while no daemon runs the programs are still attached;
/// - `lb cleanup` removes the attachments: the node port is then the node's own
///   closed port.
fn node_ports_survive_kill_9(tc_attach: &str) -> Result<()> {
    let world = World::new(&["a", "b"])?;
    let outside = world.add_outside("outside")?;
    let work_dir = std::env::temp_dir().join(format!("{}-kernel", world.id));
    std::fs::create_dir_all(&work_dir)?;
    let (servers, pods) = redis_pods(&world, &["a", "b"], &work_dir)?;
    let client = world.add_pod(world.node("a"), "client")?;
    let manifests = work_dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("services.yaml"), manifest(&world, &pods))?;

    let node_a = world.node("a");
    let netns_a = format!("/run/netns/{}", node_a.netns);
    let args_a = [
        "--netns",
        netns_a.as_str(),
        "--devices",
        &format!("eth0,{LATE_DEVICE}"),
        "--tc-attach",
        tc_attach,
        "--tc-retry-seconds",
        "1",
    ];
    let mut daemon_a = Daemon::launch_source(
        &format!("/sys/fs/bpf/{}-a", world.id),
        &node_a.cgroup.path,
        &work_dir,
        vec![
            "--manifests".into(),
            manifests.display().to_string(),
            "--node-name".into(),
            "a".into(),
        ],
        &args_a,
    )?;
    daemon_a.wait_for_log(READY, slow(Duration::from_secs(30)))?;
    let node_b = world.node("b");
    let netns_b = format!("/run/netns/{}", node_b.netns);
    let mut daemon_b = Daemon::launch_source(
        &format!("/sys/fs/bpf/{}-b", world.id),
        &node_b.cgroup.path,
        &work_dir,
        vec![
            "--manifests".into(),
            manifests.display().to_string(),
            "--node-name".into(),
            "b".into(),
        ],
        &["--netns", &netns_b, "--tc-attach", tc_attach],
    )?;
    daemon_b.wait_for_log(READY, slow(Duration::from_secs(30)))?;

    // The missing interface is reported, and costs nothing else.
    let list = daemon_a.list_text()?;
    let expected = if tc_attach == "netlink" || !kernel_has_tcx(&list) {
        "netlink"
    } else {
        "tcx"
    };
    ensure!(
        list.contains(&format!("TC on eth0: attached ({expected})"))
            && list.contains(&format!("TC on {LATE_DEVICE}: NOT ATTACHED")),
        "lb list:\n{list}"
    );
    ensure!(
        list.contains("kernel ") && list.contains("tcx") && list.contains("sock_release"),
        "lb list has no kernel section:\n{list}"
    );
    ensure!(daemon_a.metric("lb_tc_devices{state=\"failed\"}")? == 1.0);
    ensure!(daemon_a.metric("lb_kernel_feature{feature=\"sock_release\"}")? == 1.0);
    let names: BTreeSet<String> = pods.iter().map(|(_, p)| p.name.clone()).collect();
    let a_ip = node_a.ipv4.to_string();
    let b_ip = node_b.ipv4.to_string();
    ensure!(
        answers(&world, &outside, &a_ip, CLUSTER_PORT, 30)? == names,
        "externalTrafficPolicy Cluster through node A did not reach both pods"
    );
    let local_a = answers(&world, &outside, &a_ip, LOCAL_PORT, 10)?;
    let local_b = answers(&world, &outside, &b_ip, LOCAL_PORT, 10)?;
    ensure!(
        local_a == BTreeSet::from(["redis-a".to_string()])
            && local_b == BTreeSet::from(["redis-b".to_string()]),
        "externalTrafficPolicy Local: node A reached {local_a:?}, node B {local_b:?}"
    );

    // The interface appears: the next try attaches it.
    lb_testbed::run(
        "ip",
        &[
            "-n",
            &node_a.netns,
            "link",
            "add",
            LATE_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            "lblate1",
        ],
    )?;
    daemon_a.wait_for_log(
        "TC programs attached on retry",
        slow(Duration::from_secs(10)),
    )?;
    let list = daemon_a.list_text()?;
    ensure!(
        list.contains(&format!("TC on {LATE_DEVICE}: attached ({expected})")),
        "after the interface appeared:\n{list}"
    );

    // Streams through both paths while node A's daemon is killed five times.
    let from_outside = Probe::start_in(
        &world,
        &outside,
        None,
        &["load", &a_ip, &CLUSTER_PORT.to_string(), "20"],
    )?;
    let from_pod = Probe::start_in(
        &world,
        &client,
        Some(&node_a.cgroup.path),
        &["load", CLUSTER_VIP, "6379", "20"],
    )?;
    thread::sleep(Duration::from_millis(500));
    let mut kinds = Vec::new();
    for round in 0..5 {
        daemon_a.kill()?;
        // No daemon: what the kernel holds serves alone.
        if round == 0 && expected == "netlink" {
            let filters = tc_filters(&node_a.netns, "eth0")?;
            ensure!(
                filters.contains("lb_tc_ingress") && filters.contains("lb_tc_egress"),
                "no filters after kill -9:\n{filters}"
            );
        }
        thread::sleep(Duration::from_millis(200 + 100 * round));
        daemon_a.restart(&args_a)?;
        let log = daemon_a.log_text();
        ensure!(
            log.contains("links_updated=") && !log.contains("TC programs not attached"),
            "round {round}: the restarted daemon did not take over its attachments:\n{log}"
        );
        kinds.push("kill -9");
        thread::sleep(Duration::from_millis(300));
    }
    thread::sleep(Duration::from_millis(500));
    let outside_results = tally(&from_outside);
    let pod_results = tally(&from_pod);
    drop(from_outside);
    drop(from_pod);
    for (path, (ok, failed, by_backend)) in [
        ("node port from outside", &outside_results),
        ("ClusterIP from the pod", &pod_results),
    ] {
        ensure!(
            failed.is_empty(),
            "{path}: {} of {} connections failed over {} kill -9: {:?}",
            failed.len(),
            ok + failed.len(),
            kinds.len(),
            &failed[..failed.len().min(10)]
        );
        ensure!(*ok > 50, "{path}: only {ok} connections");
        ensure!(
            by_backend.keys().cloned().collect::<BTreeSet<_>>() == names,
            "{path}: reached {by_backend:?}"
        );
        eprintln!(
            "{path} ({expected}): {ok} connections over {} kill -9, none failed: {by_backend:?}",
            kinds.len()
        );
    }

    // lb cleanup takes the attachments away: the node port is the node's own again.
    daemon_a.stop()?;
    let cleaned = Command::new(crate::support::LB)
        .args(["cleanup", "--pin-dir"])
        .arg(&daemon_a.pin_dir)
        .args(["--netns", &netns_a])
        .output()?;
    ensure!(
        cleaned.status.success(),
        "lb cleanup: {}",
        String::from_utf8_lossy(&cleaned.stderr)
    );
    let filters = tc_filters(&node_a.netns, "eth0")?;
    ensure!(
        !filters.contains("lb_tc_"),
        "filters left after lb cleanup:\n{filters}"
    );
    let refused = outside_once(&world, &outside, &a_ip, CLUSTER_PORT)?;
    ensure!(
        refused.contains("ConnectionRefused") || refused.contains("refused"),
        "after cleanup, node A's node port answered: {refused}"
    );
    drop(daemon_b);
    drop(servers);
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(())
}

/// Whether `lb list`'s kernel section says the kernel has TCX.
fn kernel_has_tcx(list: &str) -> bool {
    list.lines()
        .any(|l| l.trim_start().starts_with("tcx") && l.contains(" yes "))
}

fn manifest(world: &World, pods: &[(&str, Pod)]) -> String {
    let mut text = String::new();
    for node in ["a", "b"] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{}\"}}]\n---\n",
            world.node(node).ipv4
        ));
    }
    for (name, vip, node_port, policy) in [
        ("np-cluster", CLUSTER_VIP, CLUSTER_PORT, "Cluster"),
        ("np-local", "10.96.0.81", LOCAL_PORT, "Local"),
    ] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: NodePort\n  clusterIP: \"{vip}\"\n  externalTrafficPolicy: {policy}\n  ports: [{{port: 6379, nodePort: {node_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{port: 6379, protocol: TCP}}]\nendpoints:\n"
        ));
        for (node, pod) in pods {
            text.push_str(&format!(
                "- addresses: [\"{}\"]\n  nodeName: {node}\n",
                pod.ipv4
            ));
        }
        text.push_str("---\n");
    }
    text
}

/// `n` connections from `client` to `host:port`: the pods that answered.
fn answers(
    world: &World,
    client: &Pod,
    host: &str,
    port: u16,
    n: usize,
) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let mut cmd = world.command(client, None, "redis-cli")?;
        cmd.args(["-h", host, "-p", &port.to_string(), "GET", "whoami"]);
        let out = output_with_timeout(cmd, Duration::from_secs(5))?;
        let who = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            out.status.success() && !who.is_empty(),
            "{host}:{port}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen.insert(who);
    }
    Ok(seen)
}

/// One connection attempt: what the client saw.
fn outside_once(world: &World, client: &Pod, host: &str, port: u16) -> Result<String> {
    let mut cmd = world.command(client, None, "python3")?;
    cmd.args([
        "-c",
        &format!(
            "import socket\ntry:\n    socket.create_connection(('{host}', {port}), timeout=3); print('connected')\nexcept Exception as e:\n    print(type(e).__name__, e)"
        ),
    ]);
    let out = output_with_timeout(cmd, Duration::from_secs(10))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `tc filter show` of both clsact hooks of `device` in `netns`.
fn tc_filters(netns: &str, device: &str) -> Result<String> {
    let mut text = String::new();
    for hook in ["ingress", "egress"] {
        let out = Command::new("tc")
            .args(["-n", netns, "filter", "show", "dev", device, hook])
            .output()
            .context("running tc")?;
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    Ok(text)
}
