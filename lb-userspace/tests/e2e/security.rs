//! The daemon under the privileges it ships with: the DaemonSet's exact capability
//! set (`drop: [ALL]`, `add: [BPF, NET_ADMIN, SYS_ADMIN, SYS_PTRACE]`),
//! not full root.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, ensure};
use libtest_mimic::Trial;

use crate::{
    cluster::{self, Cluster, shared_control_plane},
    support::*,
    trial,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "security::daemonset_capability_set_is_lowered_per_thread",
            daemonset_capability_set,
        ),
        trial(
            "security::10000_idle_connections_to_the_health_port_are_capped_and_shed_and_probes_get_through",
            idle_health_connections,
        ),
        trial(
            "security::a_100_mb_manifest_is_refused_unread_and_the_rest_serves",
            hundred_megabyte_manifest,
        ),
        cluster::trial(
            "security::an_external_ip_cannot_take_a_cluster_ip_before_or_after_a_restart",
            external_ip_cannot_take_a_cluster_ip,
        ),
        cluster::trial(
            "security::one_service_of_256_ports_and_128_external_ips_cannot_take_all_capacity",
            one_service_cannot_take_all_capacity,
        ),
        cluster::trial(
            "security::an_external_ip_cannot_take_another_nodes_address",
            external_ip_cannot_take_another_node,
        ),
        cluster::trial(
            "security::a_load_balancer_with_70000_source_ranges_cannot_take_the_source_range_map",
            seventy_thousand_source_ranges,
        ),
        cluster::trial(
            "security::a_frontend_the_kernel_refuses_is_skipped_and_the_rest_serves",
            kernel_refuses_one_frontend,
        ),
    ]
}

/// One node, the seed's redis Deployment behind a ClusterIP, the client pod `web` and
/// the daemon, which serves it: (cluster, daemon, redis pod names, the ClusterIP).
fn seed_cluster() -> Result<(Cluster, Daemon, Vec<String>, String)> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    cluster.apply(include_str!("../../../examples/cluster/r-deployment.yaml"))?;
    cluster.kubectl(&["expose", "deployment", "redis-master", "--port=6379"])?;
    cluster.run_client("web")?;
    let redis = cluster.wait_ready("app=redis", 1)?;
    let daemon = cluster.daemon(0, &[])?;
    let vip = cluster.cluster_ip("redis-master")?;
    ensure!(crate::kube::whoami(&cluster, "web", &vip)? == redis[0]);
    Ok((cluster, daemon, redis, vip))
}

/// After a hostile Service (`offender`) of [`seed_cluster`]: a Service created now is
/// served, the ClusterIP that was there still answers, and `/healthz` is 200.
fn others_still_serve(
    cluster: &Cluster,
    daemon: &mut Daemon,
    redis: &[String],
    vip: &str,
    offender: &str,
) -> Result<()> {
    cluster.kubectl(&[
        "expose",
        "deployment",
        "redis-master",
        "--name=late",
        "--port=6379",
    ])?;
    let late = cluster.cluster_ip("late")?;
    cluster.wait(
        &format!("the Service created after the {offender} one"),
        std::time::Duration::from_secs(10),
        || {
            Ok(daemon
                .backends_of(&late, 6379, "TCP")?
                .filter(|b| !b.is_empty()))
        },
    )?;
    ensure!(crate::kube::whoami(cluster, "web", &late)? == redis[0]);
    ensure!(crate::kube::whoami(cluster, "web", vip)? == redis[0]);
    let (code, body) = daemon.http_get("health", "/healthz")?;
    ensure!(code == 200, "/healthz: {code} {body}");
    Ok(())
}

/// A 100 MB file appears in the manifest folder beside a valid one: it is refused
/// without being read (the daemon's resident memory does not grow by its size), named
/// in the log, the valid Service is served, and `/healthz` stays 200.
fn hundred_megabyte_manifest() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(
        &dir,
        "redis.yaml",
        &redis_manifest("10.96.0.100", &backends.iter().collect::<Vec<_>>()),
    )?;
    let mut daemon = Daemon::start(&tb, &dir)?;
    let rss = |pid: u32| -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    };
    let pid = daemon.pid().context("daemon pid")?;
    let before = rss(pid)?;
    // Real bytes (a valid YAML comment line repeated), not a sparse file.
    let line = format!("# {}\n", "x".repeat(1022));
    let big = dir.join("big.yaml");
    {
        use std::io::Write as _;
        let mut file = std::io::BufWriter::new(std::fs::File::create(&big)?);
        for _ in 0..(100 << 10) {
            file.write_all(line.as_bytes())?;
        }
        file.flush()?;
    }
    daemon.wait_for_log(
        "larger than 64 MiB, the limit for one manifest file",
        slow(std::time::Duration::from_secs(20)),
    )?;
    let log = daemon.log_text();
    ensure!(
        log.lines()
            .any(|l| l.contains("big.yaml") && l.contains("larger than 64 MiB")),
        "the refusal does not name the file"
    );
    let after = rss(pid)?;
    ensure!(
        after < before + 32 * 1024,
        "the daemon's RSS grew from {before} kB to {after} kB: the file was read"
    );
    let who = whoami(&tb, &client, "10.96.0.100", 6379)?;
    ensure!(
        backends.iter().any(|b| b.name == who),
        "the ClusterIP answered {who:?}"
    );
    let (code, body) = daemon.http_get("health", "/healthz")?;
    ensure!(code == 200, "/healthz: {code} {body}");
    std::fs::remove_file(&big)?;
    Ok(())
}

/// A tenant's LoadBalancer Service lists 70 000 `loadBalancerSourceRanges`, more than
/// LB_SOURCE_RANGES holds (65 537 by default). Its external frontend is refused by
/// name (the map is never overfilled, so no sync fails); the ClusterIP that was there
/// keeps serving, a Service created after it is served, `/healthz` stays 200, and the
/// one refused frontend is what `lb_unprogrammed_frontends` counts.
fn seventy_thousand_source_ranges() -> Result<()> {
    let (cluster, mut daemon, redis, vip) = seed_cluster()?;
    let ns = cluster.namespace.clone();

    // 11.0.0.0/24, 11.0.1.0/24, ...: prefixes only, nothing is ever sent to them.
    let ranges: Vec<String> = (0u32..70_000)
        .map(|i| format!("{}.{}.{}.0/24", 11 + (i >> 16), (i >> 8) & 255, i & 255))
        .collect();
    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ranges", "namespace": ns},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": "redis"},
            "ports": [{"port": 6379}],
            "loadBalancerSourceRanges": ranges,
        },
    });
    // create, not apply: apply would copy the 1.2 MB object into an annotation.
    cluster
        .cp
        .kubectl_with_input(&["create", "-f", "-"], Some(&service.to_string()))?;
    cluster.set_load_balancer_ip("ranges", "198.51.100.50")?;
    let shortage = "LB_SOURCE_RANGES cannot hold its loadBalancerSourceRanges";
    daemon.wait_for_log(shortage, slow(std::time::Duration::from_secs(30)))?;
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(shortage))
        .unwrap_or_default();
    ensure!(
        line.contains(&format!("Service {ns}/ranges")) && line.contains("198.51.100.50"),
        "the refusal does not name the Service and its address: {line}"
    );

    others_still_serve(&cluster, &mut daemon, &redis, &vip, "refused")?;
    let unprogrammed = daemon.metric("lb_unprogrammed_frontends")?;
    ensure!(
        unprogrammed == 1.0,
        "lb_unprogrammed_frontends is {unprogrammed}, not the one refused frontend"
    );
    ensure!(
        !log.contains("syncing the kernel maps failed"),
        "a sync failed on the way:\n{log}"
    );
    Ok(())
}

/// The kernel refuses a frontend's writes: here LB_SOURCE_RANGES is frozen
/// (`BPF_MAP_FREEZE`: every write from user space fails with EPERM, as an
/// out-of-memory kernel would fail them), so every frontend with
/// `loadBalancerSourceRanges` is refused and nothing else. The refused frontend is
/// reported by Service and retried with backoff; the Service's own ClusterIP, the
/// Service that was there and one created later are served; no sync fails and
/// `/healthz` stays 200.
fn kernel_refuses_one_frontend() -> Result<()> {
    let (cluster, mut daemon, redis, vip) = seed_cluster()?;
    let ns = cluster.namespace.clone();
    let layout = std::fs::read_dir(&daemon.pin_dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.join("LB_SOURCE_RANGES").exists())
        .context("no LB_SOURCE_RANGES pin")?;
    let frozen = std::process::Command::new("bpftool")
        .args(["map", "freeze", "pinned"])
        .arg(layout.join("LB_SOURCE_RANGES"))
        .status()?;
    ensure!(frozen.success(), "bpftool map freeze: {frozen}");

    cluster.apply(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: frozen, namespace: {ns}}}
spec:
  type: LoadBalancer
  selector: {{app: redis}}
  ports: [{{port: 6379}}]
  loadBalancerSourceRanges: [11.0.0.0/24]
"#
    ))?;
    cluster.set_load_balancer_ip("frozen", "198.51.100.51")?;
    let refused = "the kernel refused its writes";
    let slow_wait = slow(std::time::Duration::from_secs(30));
    daemon.wait_for_log(refused, slow_wait)?;
    let frozen_ip = cluster.cluster_ip("frozen")?;
    ensure!(crate::kube::whoami(&cluster, "web", &frozen_ip)? == redis[0]);
    others_still_serve(&cluster, &mut daemon, &redis, &vip, "refused")?;

    // Retried with backoff (0.5 s, 1 s, 2 s, ...): refused again, and reported again.
    cluster.wait("a retry of the refused frontend", slow_wait, || {
        Ok((daemon.log_text().matches(refused).count() >= 3).then_some(()))
    })?;
    let log = daemon.log_text();
    for line in log.lines().filter(|l| l.contains(refused)) {
        ensure!(
            line.contains(&format!("Service {ns}/frozen"))
                && line.contains("198.51.100.51")
                && line.contains("Operation not permitted"),
            "the refusal does not name the Service, its address and the kernel's error: {line}"
        );
    }
    // Other tests' Services share the control plane: count this one's only.
    let unprogrammed: Vec<String> = daemon
        .list()?
        .iter()
        .filter(|f| !f["not_programmed"].is_null())
        .filter(|f| {
            f["service"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("{ns}/")))
        })
        .map(|f| format!("{} {}", f["address"], f["not_programmed"]))
        .collect();
    ensure!(
        unprogrammed.len() == 1
            && unprogrammed[0].contains("198.51.100.51")
            && unprogrammed[0].contains("the kernel refused"),
        "not programmed: {unprogrammed:?}, not the one refused frontend"
    );
    let failures = daemon.metric("lb_sync_failures_total")?;
    ensure!(failures == 0.0, "{failures} syncs failed:\n{log}");
    let (code, body) = daemon.http_get("health", "/healthz")?;
    ensure!(code == 200, "/healthz: {code} {body}");
    Ok(())
}

/// A process on node b's own network (its kubelet, say) and its working directory,
/// stopped and removed on drop.
struct NodeServer(std::process::Child, std::path::PathBuf);

impl Drop for NodeServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// A tenant's Service claims node b's address on 6379 as an external IP, with pods
/// of its own behind it. The daemon of node a (which watches every Node) refuses it by
/// name, and a pod on node a dialling node b's address still reaches what node b runs
/// there: a redis-server on node b's own network.
fn external_ip_cannot_take_another_node() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None, None])?;
    let ns = cluster.namespace.clone();
    // Node a is where the scheduler put the client; node b is the other one.
    cluster.run_client("web")?;
    let a_name = cluster
        .pod_node("web")
        .context("the client pod has no node")?
        .net()
        .name
        .clone();
    let a = cluster
        .nodes
        .iter()
        .position(|n| n.net().name == a_name)
        .context("node a")?;
    let node_b = cluster.nodes[1 - a].net();
    let b_ip = node_b.ipv4.to_string();
    let dir = std::env::temp_dir().join(format!("{}-redis", node_b.netns));
    std::fs::create_dir_all(&dir)?;
    let mut server = lb_testbed::netns_command(&node_b.netns, None, "redis-server")?;
    server
        .args([
            "--port",
            "6379",
            "--bind",
            &b_ip,
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--protected-mode",
            "no",
            "--dir",
            &dir.display().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _server = NodeServer(
        server.spawn().context("starting redis-server on node b")?,
        dir.clone(),
    );
    let identity = cluster.wait(
        "node b's own redis",
        std::time::Duration::from_secs(10),
        || {
            let mut cli = lb_testbed::netns_command(&node_b.netns, None, "redis-cli")?;
            let out = cli
                .args(["-h", &b_ip, "SET", "whoami", "node-b-itself"])
                .output()?;
            Ok((String::from_utf8_lossy(&out.stdout).trim() == "OK").then_some(()))
        },
    );
    identity?;
    cluster.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: claim}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: claim}}}}\n  template:\n    metadata: {{labels: {{app: claim}}}}\n    spec: {{containers: [{{name: r, image: redis, ports: [{{containerPort: 6379}}]}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: claim}}\nspec:\n  selector: {{app: claim}}\n  externalIPs: [\"{b_ip}\"]\n  ports: [{{port: 6379}}]\n"
    ))?;
    let claimers = cluster.wait_ready("app=claim", 1)?;
    let mut daemon = cluster.daemon(a, &[])?;
    daemon.wait_for_log(
        &format!(
            // The Node object is named after the node's namespace.
            "Service {ns}/claim: external address {b_ip} is not served: it is an address of node {}",
            node_b.netns
        ),
        slow(std::time::Duration::from_secs(10)),
    )?;
    for _ in 0..10 {
        let who = crate::kube::whoami(&cluster, "web", &b_ip)?;
        ensure!(
            who == "node-b-itself",
            "a pod dialling node b's address reached {who:?} (the claim's pods are {claimers:?})"
        );
    }
    Ok(())
}

/// A tenant's Service with 256 ports and 128 external IPs wants 65 792 frontends,
/// more than the maps' default 65 536. It is cut to `--max-frontends-per-service`
/// (reported by name), the Services that were there keep serving, one created after
/// it is served, and `/healthz` stays 200.
fn one_service_cannot_take_all_capacity() -> Result<()> {
    let (cluster, mut daemon, redis, vip) = seed_cluster()?;
    let ns = cluster.namespace.clone();

    let ports: Vec<String> = (0..256)
        .map(|i| format!("{{name: p{i}, port: {}}}", 20000 + i))
        .collect();
    // In the blackholed service range: nothing could leave the sandbox.
    let ips: Vec<String> = (0..128).map(|i| format!("\"10.111.200.{i}\"")).collect();
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: wide}}\nspec:\n  externalIPs: [{}]\n  ports: [{}]\n",
        ips.join(", "),
        ports.join(", ")
    ))?;
    daemon.wait_for_log(
        &format!(
            "Service {ns}/wide wants 65792 frontends (ports x addresses x scopes), more than --max-frontends-per-service 1024"
        ),
        slow(std::time::Duration::from_secs(20)),
    )?;
    others_still_serve(&cluster, &mut daemon, &redis, &vip, "wide")?;
    ensure!(
        daemon.metric("lb_unprogrammed_frontends")? == 0.0,
        "frontends left unprogrammed"
    );
    Ok(())
}

/// A ClusterIP the test asks the API server for (inside the blackholed service range).
const CONTESTED: &str = "10.96.213.17";

/// A tenant's Service `aaa-hijack` (older than its victim, first by name, with pods of
/// its own) claims the victim's ClusterIP as an external IP on the same port. With
/// both present when the daemon starts, and again after a restart, every connection a
/// pod makes to the ClusterIP reaches the victim's pods, and the hijack is reported by
/// name with the reason.
fn external_ip_cannot_take_a_cluster_ip() -> Result<()> {
    let cluster = Cluster::new(shared_control_plane()?, &[None])?;
    let ns = cluster.namespace.clone();
    cluster.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: hijack}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: hijack}}}}\n  template:\n    metadata: {{labels: {{app: hijack}}}}\n    spec: {{containers: [{{name: r, image: redis, ports: [{{containerPort: 6379}}]}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: aaa-hijack}}\nspec:\n  selector: {{app: hijack}}\n  externalIPs: [\"{CONTESTED}\"]\n  ports: [{{port: 6379}}]\n"
    ))?;
    // Strictly younger than the hijack (timestamps have one-second resolution).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    cluster.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: victim}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: victim}}}}\n  template:\n    metadata: {{labels: {{app: victim}}}}\n    spec: {{containers: [{{name: r, image: redis, ports: [{{containerPort: 6379}}]}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: victim}}\nspec:\n  selector: {{app: victim}}\n  clusterIP: {CONTESTED}\n  ports: [{{port: 6379}}]\n"
    ))?;
    cluster.run_client("web")?;
    let victims = cluster.wait_ready("app=victim", 2)?;
    let hijackers = cluster.wait_ready("app=hijack", 2)?;
    let mut daemon = cluster.daemon(0, &[])?;
    let report = format!(
        "Service {ns}/aaa-hijack: {CONTESTED}:6379/TCP is served by Service {ns}/victim (a ClusterIP wins"
    );
    for round in ["first start", "restart"] {
        daemon.wait_for_log(&report, slow(std::time::Duration::from_secs(10)))?;
        let mut seen = BTreeMap::new();
        for _ in 0..30 {
            *seen
                .entry(crate::kube::whoami(&cluster, "web", CONTESTED)?)
                .or_insert(0usize) += 1;
        }
        ensure!(
            seen.keys().all(|who| victims.contains(who))
                && !seen.keys().any(|who| hijackers.contains(who)),
            "{round}: connections to the ClusterIP reached {seen:?} (victims {victims:?})"
        );
        eprintln!("{round}: 30 connections to {CONTESTED} reached {seen:?}");
        daemon.kill()?;
        if round == "first start" {
            daemon.restart(&[])?;
        }
    }
    Ok(())
}

/// `deploy/daemonset.yaml`'s capabilities, as setpriv spells them.
const DAEMONSET_CAPS: &str = "-all,+bpf,+net_admin,+sys_admin,+sys_ptrace";

/// Started as a container runtime starts it (root, bounding = inheritable-free set of
/// the four capabilities, no CAP_SETPCAP), the daemon loads, serves a ClusterIP, and
/// then every thread holds only what privileges.rs promises, effective and permitted,
/// with no_new_privs set; the bounding set cannot be lowered without CAP_SETPCAP and
/// stays the pod's four.
fn daemonset_capability_set() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(
        &dir,
        "redis.yaml",
        &redis_manifest("10.96.0.100", &backends.iter().collect::<Vec<_>>()),
    )?;
    let bounding = format!("--bounding-set={DAEMONSET_CAPS}");
    let inheritable = "--inh-caps=-all";
    let mut daemon = Daemon::start_wrapped(&tb, &dir, &["setpriv", &bounding, inheritable, "--"])?;
    let who = whoami(&tb, &client, "10.96.0.100", 6379)?;
    ensure!(
        backends.iter().any(|b| b.name == who),
        "the ClusterIP answered {who:?}"
    );
    let pid = daemon.pid().context("daemon pid")?;
    let pod_set = SYNC_CAPS;
    let threads = ensure_least_privilege(pid, pod_set)?;
    for t in &threads {
        eprintln!(
            "thread {:<16} effective {:#012x} permitted {:#012x} bounding {:#012x} no_new_privs {}",
            t.name, t.effective, t.permitted, t.bounding, t.no_new_privs
        );
    }
    // Its status socket goes with it (a dead daemon's socket is cleared by the next).
    let socket = lb::daemon::status::socket_path(&daemon.pin_dir);
    ensure!(socket.exists(), "no status socket at {}", socket.display());
    daemon.stop()?;
    ensure!(!socket.exists(), "{} left after exit", socket.display());
    Ok(())
}

/// 600 idle connections to the health port (no request ever sent): past the cap of
/// 256 they are closed at once, the daemon's descriptors stay bounded, the idle ones
/// are closed after the header timeout, and `/healthz` answers 200 afterwards.
fn idle_health_connections() -> Result<()> {
    use std::{
        io::Read as _,
        net::TcpStream,
        time::{Duration, Instant},
    };
    const FLOOD: usize = 10_000;
    const CAP: usize = 256;
    raise_open_files(FLOOD + 2_000)?;
    let (tb, backends, client) = redis_world(1)?;
    let (_dir, daemon) = serve_redis(&tb, &backends.iter().collect::<Vec<_>>())?;
    let addr = daemon.server_addr("health")?;
    let pid = daemon.pid().context("daemon pid")?;
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count());
    let before = fds()?;
    // A server-side close reads as end of file (or a reset); an open idle connection
    // as would-block.
    let is_closed = |stream: &TcpStream| {
        let mut byte = [0u8; 1];
        let mut reader: &TcpStream = stream;
        match reader.read(&mut byte) {
            // End of file: closed by the server (it never sends on its own).
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    let mut idle: Vec<TcpStream> = Vec::with_capacity(FLOOD);
    let mut most = 0;
    for i in 0..FLOOD {
        let stream = TcpStream::connect(&addr)?;
        stream.set_nonblocking(true)?;
        idle.push(stream);
        // Keep the daemon's accept queue (1024) from overflowing, where a dropped SYN
        // costs a 1 s retransmit: the connection 2 x CAP back is closed once the daemon
        // has accepted the one CAP after it (the oldest idle one makes room).
        if let Some(back) = i.checked_sub(2 * CAP) {
            let started = Instant::now();
            while !is_closed(&idle[back]) {
                ensure!(
                    started.elapsed() < Duration::from_secs(5),
                    "idle connection {back} is still open {CAP} connections after it was \
                     the oldest"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if i % 1000 == 999 {
            most = most.max(fds()?);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    most = most.max(fds()?);
    ensure!(
        most <= before + CAP + 8,
        "the daemon held {most} descriptors during a flood of {FLOOD} idle connections \
         ({before} before)"
    );
    // The probe gets through while the newest idle connections are still open.
    let (code, body) = daemon.http_get("health", "/healthz")?;
    ensure!(code == 200, "/healthz during the flood: {code} {body}");
    let closed = |streams: &[TcpStream]| streams.iter().filter(|s| is_closed(s)).count();
    let shed_at_once = closed(&idle);
    ensure!(
        shed_at_once >= FLOOD - CAP,
        "only {shed_at_once} of {FLOOD} connections were closed at once"
    );
    let started = Instant::now();
    loop {
        if closed(&idle) == FLOOD {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "idle connections still open {:?} after the flood",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(idle);
    let (code, body) = daemon.http_get("health", "/healthz")?;
    ensure!(code == 200, "/healthz: {code} {body}");
    ensure!(
        whoami(&tb, &client, "10.96.0.100", 6379).is_ok(),
        "the ClusterIP still answers"
    );
    Ok(())
}

/// Lets this process hold `wanted` descriptors (the soft limit up to the hard one).
fn raise_open_files(wanted: usize) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0);
    ensure!(
        limit.rlim_max >= wanted as libc::rlim_t,
        "RLIMIT_NOFILE's hard limit is {}, under the {wanted} descriptors this test needs",
        limit.rlim_max
    );
    if limit.rlim_cur < wanted as libc::rlim_t {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        ensure!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0);
    }
    Ok(())
}
