//! `lb` deployed as users deploy it: `deploy/rbac.yaml` and `deploy/daemonset.yaml`
//! applied to a control plane whose node is a real kubelet with containerd and runc
//! (lb_testbed::realnode), running the image `cargo xtask image` builds, then the
//! seed verbatim (lb_testbed::seed): redis pulled, found by environment and DNS.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testbed::{
    cluster_dns::KUBE_DNS_IP,
    realnode::{self, RealNode},
    seed::{self, SeedCluster},
};
use libtest_mimic::Trial;

use crate::support::{SYNC_CAPS, ensure_least_privilege};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "realnode::daemonset_under_two_real_kubelets",
        daemonset_under_real_kubelets,
    )]
}

/// Needs the control-plane binaries and containerd: without them it fails with the
/// reason on CI and is reported as ignored elsewhere.
fn trial(name: &'static str, body: fn() -> Result<()>) -> Trial {
    let missing = lb_testbed::k8s::unavailable().or_else(realnode::unavailable);
    match missing {
        Some(reason) if std::env::var_os("CI").is_some() => {
            Trial::test(name, move || Err(reason.clone().into()))
        }
        // Two kubelets, containerd and a control plane: alone, so that the timing of
        // the test beside it does not depend on this one.
        Some(_) => crate::trial_alone(name, body).with_ignored_flag(true),
        None => crate::trial_alone(name, body),
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// The host pid of the first process in `node`'s pods whose command line starts with
/// `argv0` and contains `needle`.
fn find_process(node: &RealNode, argv0: &str, needle: &str) -> Option<i32> {
    node.pod_pids().into_iter().find(|pid| {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline.starts_with(argv0) && cmdline.contains(needle)
    })
}

/// The DaemonSet, as shipped but for the operator's settings, runs under two real
/// kubelets: on each node the init container mounts bpffs on the host, the daemon
/// becomes ready (the kubelet's readiness probe) with its health server on the node's
/// address only, every thread holds only what the README's table says, and
/// `kubectl logs` and `kubectl exec ... lb list` work. Then the seed, verbatim: its
/// redis Deployment (`image: redis`, pulled) answers a client pod on the other node
/// through the ClusterIP the client finds in the environment the kubelet injected and
/// through cluster DNS (a DNS pod behind kube-dns, reached through lb too), seeing the
/// client's own pod address (no NAT); and a client outside the cluster reaches it
/// through the NodePort on either node (the TC path).
fn daemonset_under_real_kubelets() -> Result<()> {
    let cluster = SeedCluster::start(
        Path::new(env!("CARGO_BIN_EXE_lb")),
        &["node1", "node2"],
        false,
    )?;
    let cp = &cluster.cp;
    let lb_pods = &cluster.lb_pods;
    eprintln!("lb pods Ready: {lb_pods:?}");
    for node in &cluster.nodes {
        let pin_dir = realnode::lb_pin_dir(&node.name);
        ensure!(
            Path::new(&pin_dir).exists(),
            "no pins at {pin_dir} on the host: the init container's bpffs or its propagation failed"
        );
        // Per-thread capabilities, read from the host.
        let pid = find_process(node, "/usr/local/bin/lb", "daemon")
            .with_context(|| format!("no lb daemon process in {}'s pods", node.name))?;
        let threads = ensure_least_privilege(pid as u32, SYNC_CAPS)?;
        for t in &threads {
            eprintln!(
                "{}: thread {:<16} effective {:#012x} permitted {:#012x} bounding {:#012x} no_new_privs {}",
                node.name, t.name, t.effective, t.permitted, t.bounding, t.no_new_privs
            );
        }
        // The health server listens on the node's address only.
        let health = |host: &str| -> Result<String> {
            let out = lb_testbed::netns_command(&node.netns, None, "curl")?
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                ])
                .arg(format!("http://{host}:10256/healthz"))
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        ensure!(
            health(&node.ipv4.to_string())? == "200",
            "no /healthz on {}'s address",
            node.name
        );
        ensure!(
            health("127.0.0.1")? == "000",
            "the health server of {} also listens on loopback",
            node.name
        );
    }
    let (lb_pod, _) = &lb_pods[0];
    let logs = cp.kubectl(&["logs", "-n", "kube-system", lb_pod, "-c", "lb"])?;
    ensure!(
        logs.contains("ready"),
        "kubectl logs shows no ready line:\n{logs}"
    );

    // The seed, verbatim: no pull policy, so the kubelet pulls `redis` (:latest).
    let deployment = fs::read_to_string(workspace().join(seed::DEPLOYMENT))?;
    ensure!(
        deployment.contains("      - image: redis\n") && !deployment.contains("imagePullPolicy"),
        "{} is no longer the seed's Deployment",
        seed::DEPLOYMENT
    );
    let seed = cluster.apply_seed()?;
    let pulls = cluster.registry.pulls();
    ensure!(
        pulls.iter().any(|p| p == "library/redis:latest"),
        "the kubelet never pulled redis from the test registry: {pulls:?}"
    );
    ensure!(
        seed.client_node != seed.redis_node,
        "the client and redis share {}",
        seed.redis_node
    );
    let client_ip = cp.kubectl(&["get", "pod", "web", "-o", "jsonpath={.status.podIP}"])?;

    // lb list inside the pod shows the Service once synced.
    let mut last = String::new();
    wait_for(
        "lb list to show the Service",
        Duration::from_secs(30),
        || {
            let pin_dir = realnode::lb_pin_dir(&lb_pods[0].1);
            let out = cp.kubectl(&[
                "exec",
                "-n",
                "kube-system",
                lb_pod,
                "-c",
                "lb",
                "--",
                "/usr/local/bin/lb",
                "list",
                "--pin-dir",
                &pin_dir,
            ]);
            last = format!("{out:?}");
            out.ok()?.contains(&seed.cluster_ip).then_some(())
        },
    )
    .with_context(|| format!("kubectl exec ... lb list: {last}"))?;

    // Through the environment the kubelet injected (the nodes discard the service
    // range: only a rewritten connect reaches redis).
    let host = cluster.sh(
        "web",
        "echo $REDIS_MASTER_SR_SERVICE_HOST:$REDIS_MASTER_SR_SERVICE_PORT",
    )?;
    ensure!(
        host.trim() == format!("{}:6379", seed.cluster_ip),
        "the kubelet injected {host:?}, not redis-master-sr at {}",
        seed.cluster_ip
    );
    let by_env = "redis-cli -h $REDIS_MASTER_SR_SERVICE_HOST -p $REDIS_MASTER_SR_SERVICE_PORT";
    let set = wait_for("SET through the ClusterIP", Duration::from_secs(30), || {
        cluster.sh("web", &format!("{by_env} set seed hello")).ok()
    })?;
    ensure!(set.trim() == "OK", "SET answered {set:?}");
    let info = cluster.sh("web", &format!("{by_env} client info"))?;
    ensure!(
        info.contains(&format!("addr={}:", client_ip.trim())),
        "redis saw {info:?}, not the client pod {client_ip} on the other node"
    );
    let got = cp.kubectl(&[
        "exec",
        &seed.redis_pod,
        "--",
        "/usr/local/bin/redis-cli",
        "get",
        "seed",
    ])?;
    ensure!(got.trim() == "hello", "the redis pod holds {got:?}");

    // Through cluster DNS: the query goes to kube-dns's ClusterIP (UDP through lb) and
    // the short name resolves by the search path the kubelet wrote.
    let lookup = wait_for(
        "redis-master-sr in cluster DNS",
        Duration::from_secs(30),
        || {
            let out = cluster
                .sh("web", "nslookup redis-master-sr.default.svc.cluster.local")
                .ok()?;
            out.contains(&seed.cluster_ip).then_some(out)
        },
    )?;
    ensure!(
        lookup.contains(&KUBE_DNS_IP.to_string()),
        "the answer did not come from kube-dns: {lookup}"
    );
    let by_name = cluster.sh("web", "redis-cli -h redis-master-sr get seed")?;
    ensure!(
        by_name.trim() == "hello",
        "redis-master-sr answered {by_name:?}"
    );

    // The seed's NodePort from outside the cluster, on both nodes.
    for node in &cluster.nodes {
        let address = node.ipv4.to_string();
        let port = seed::NODE_PORT.to_string();
        let got = wait_for(
            &format!("GET through {address}:{port} from outside"),
            Duration::from_secs(30),
            || {
                let out = cluster
                    .world
                    .command(&cluster.outside, None, "redis-cli")
                    .ok()?
                    .args(["-h", &address, "-p", &port, "GET", "seed"])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                (text == "hello").then_some(text)
            },
        )?;
        eprintln!("outside -> {address}:{port} -> {got}");
    }
    Ok(())
}
