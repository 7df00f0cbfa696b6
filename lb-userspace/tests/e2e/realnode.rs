//! `lb` deployed as users deploy it: `deploy/rbac.yaml` and `deploy/daemonset.yaml`
//! applied to a control plane whose node is a real kubelet with containerd and runc
//! (lb_testbed::realnode), running the image `cargo xtask image` builds, then the
//! seed's redis Deployment served through a ClusterIP to a client pod.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testbed::{
    image::{Image, lb_image},
    k8s::ControlPlane,
    realnode::{self, RealNode},
    world::World,
};
use libtest_mimic::Trial;

use crate::support::{SYNC_CAPS, ensure_least_privilege};

/// The seed's Service address (examples/manifests/redis-master.yaml).
const REDIS_CLUSTER_IP: &str = "10.99.187.220";

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
        Some(_) => crate::trial(name, body).with_ignored_flag(true),
        None => crate::trial(name, body),
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The images this node runs: lb (the test build of the binary in `cargo xtask
/// image`'s layout), the sandbox image, and redis (redis-server and redis-cli).
fn build_images(dir: &Path, lb_name: &str) -> Result<Vec<PathBuf>> {
    let lb = lb_image(Path::new(env!("CARGO_BIN_EXE_lb")), lb_name)?;
    lb.write_docker_archive(&dir.join("lb.tar"))?;
    realnode::pause_image(&dir.join("pause.tar"))?;
    // The seed's `image: redis`. Like the official image, it serves other pods
    // (protected mode off).
    let mut redis = Image::new("docker.io/library/redis:latest");
    redis
        .add_program(
            Path::new("/usr/bin/redis-server"),
            "/usr/local/bin/redis-server",
        )?
        .add_program(Path::new("/usr/bin/redis-cli"), "/usr/local/bin/redis-cli")?;
    redis.entrypoint = vec!["/usr/local/bin/redis-server".into()];
    redis.cmd = vec!["--protected-mode".into(), "no".into()];
    redis.write_docker_archive(&dir.join("redis.tar"))?;
    Ok(vec![
        dir.join("lb.tar"),
        dir.join("pause.tar"),
        dir.join("redis.tar"),
    ])
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

fn describe(cp: &ControlPlane, nodes: &[RealNode]) -> String {
    let mut text = format!(
        "pods:\n{}\nevents:\n{}",
        cp.kubectl(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_default(),
        cp.kubectl(&["get", "events", "-A"]).unwrap_or_default(),
    );
    for node in nodes {
        text.push_str(&format!(
            "\nkubelet of {}:\n{}",
            node.name,
            node.log_tail("kubelet")
        ));
    }
    text
}

/// The DaemonSet, as shipped but for the operator's settings, runs under two real
/// kubelets: on each node the init container mounts bpffs on the host, the daemon
/// becomes ready (the kubelet's readiness probe) with its health server on the node's
/// address only, every thread holds only what the README's table says, and
/// `kubectl logs` and `kubectl exec ... lb list` work. The seed's redis Deployment then
/// answers a client pod on the other node through its ClusterIP, seeing the client's
/// own pod address (no NAT), the client having found it through the environment the
/// kubelet injected; and a client outside the cluster reaches it through a NodePort on
/// either node (the TC path, SNAT through the node without the pod).
fn daemonset_under_real_kubelets() -> Result<()> {
    let cp = ControlPlane::start_for_real_nodes()?;
    let world = World::new(&["node1", "node2"])?;
    let outside = world.add_outside("outside")?;
    let images_dir = cp.dir.join("images");
    fs::create_dir_all(&images_dir)?;
    let (shipped, image) = realnode::shipped_daemonset()?;
    let images = build_images(&images_dir, &image)?;
    let nodes = world
        .nodes
        .iter()
        .map(|n| RealNode::start(&cp, n, &images))
        .collect::<Result<Vec<_>>>()?;
    let result = (|| -> Result<()> {
        // Each node's pods are <cgroup2>/<node name>: one DaemonSet, per-node paths.
        realnode::deploy_lb(&cp, &shipped)?;
        let lb_pods = realnode::wait_lb_ready(&cp, nodes.len(), Duration::from_secs(120))
            .with_context(|| describe(&cp, &nodes))?;
        eprintln!("lb pods Ready: {lb_pods:?}");

        for node in &nodes {
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

        // The seed: its redis Deployment (`image: redis`; no registry exists here, so
        // the locally imported image is used instead of pulled) and its Service.
        let deployment =
            fs::read_to_string(workspace().join("examples/cluster/r-deployment.yaml"))?.replace(
                "      - image: redis\n",
                "      - image: redis\n        imagePullPolicy: IfNotPresent\n",
            );
        cp.kubectl_with_input(&["apply", "-f", "-"], Some(&deployment))?;
        cp.kubectl_with_input(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: redis-master-sr\n  namespace: default\n\
                 spec:\n  clusterIP: {REDIS_CLUSTER_IP}\n  ports:\n  - port: 6379\n    targetPort: 6379\n  \
                 selector:\n    app: redis\n"
            )),
        )?;
        let (server, server_node) =
            wait_for("the redis pod Ready", Duration::from_secs(60), || {
                realnode::ready_pods(&cp, "default", "app=redis")
                    .into_iter()
                    .next()
            })
            .with_context(|| describe(&cp, &nodes))?;
        // The client runs on the other node, and starts after the Service, so the
        // kubelet gives it the Service's environment variables.
        let client_node = nodes
            .iter()
            .find(|n| n.name != server_node)
            .context("a node without the redis pod")?;
        cp.kubectl_with_input(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: default\n  labels:\n    role: client\n\
                 spec:\n  nodeName: {}\n  containers:\n  - name: web\n    image: redis\n    imagePullPolicy: IfNotPresent\n    \
                 args: [--port, \"7000\", --protected-mode, \"no\"]\n",
                client_node.name
            )),
        )?;
        wait_for("the client pod Ready", Duration::from_secs(60), || {
            realnode::ready_pods(&cp, "default", "role=client")
                .into_iter()
                .next()
        })
        .with_context(|| describe(&cp, &nodes))?;
        let client_ip = cp.kubectl(&["get", "pod", "web", "-o", "jsonpath={.status.podIP}"])?;
        // The environment the kubelet gave the container, from the runtime's spec of it
        // (redis-server overwrites its own /proc/<pid>/environ with its title).
        let container = cp.kubectl(&[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.status.containerStatuses[0].containerID}",
        ])?;
        let container = container
            .trim()
            .strip_prefix("containerd://")
            .context("no containerd container id")?;
        let info: serde_json::Value =
            serde_json::from_str(&client_node.ctr(&["containers", "info", container])?)?;
        let wanted = format!("REDIS_MASTER_SR_SERVICE_HOST={REDIS_CLUSTER_IP}");
        let env = &info["Spec"]["process"]["env"];
        ensure!(
            env.as_array()
                .is_some_and(|vars| vars.iter().any(|v| v.as_str() == Some(wanted.as_str()))),
            "the kubelet did not inject {wanted}: {env}"
        );

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
                out.ok()?.contains(REDIS_CLUSTER_IP).then_some(())
            },
        )
        .with_context(|| format!("kubectl exec ... lb list: {last}"))?;

        // The nodes blackhole the service range: only a rewritten connect reaches redis.
        let cli = |args: &[&str]| -> Result<String> {
            let mut argv = vec![
                "exec",
                "web",
                "--",
                "/usr/local/bin/redis-cli",
                "-h",
                REDIS_CLUSTER_IP,
                "-p",
                "6379",
            ];
            argv.extend(args);
            cp.kubectl(&argv)
        };
        let set = wait_for("SET through the ClusterIP", Duration::from_secs(30), || {
            cli(&["set", "seed", "hello"]).ok()
        })?;
        ensure!(set.trim() == "OK", "SET answered {set:?}");
        let info = cli(&["client", "info"])?;
        ensure!(
            info.contains(&format!("addr={}:", client_ip.trim())),
            "redis saw {info:?}, not the client pod {client_ip} on the other node"
        );
        let got = cp.kubectl(&[
            "exec",
            &server,
            "--",
            "/usr/local/bin/redis-cli",
            "get",
            "seed",
        ])?;
        ensure!(got.trim() == "hello", "the redis pod holds {got:?}");

        // A NodePort from outside the cluster, on both nodes.
        cp.kubectl(&[
            "expose",
            "deployment",
            "redis-master",
            "--type=NodePort",
            "--name=redis-np",
            "--port=6379",
        ])?;
        let node_port = cp.kubectl(&[
            "get",
            "service",
            "redis-np",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ])?;
        for node in &nodes {
            let address = node.ipv4.to_string();
            let got = wait_for(
                &format!("GET through {address}:{node_port} from outside"),
                Duration::from_secs(30),
                || {
                    let out = world
                        .command(&outside, None, "redis-cli")
                        .ok()?
                        .args(["-h", &address, "-p", node_port.trim(), "GET", "seed"])
                        .output()
                        .ok()?;
                    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    (text == "hello").then_some(text)
                },
            )?;
            eprintln!("outside -> {address}:{} -> {got}", node_port.trim());
        }
        Ok(())
    })();
    let cleanup = cp.kubectl(&[
        "delete",
        "daemonset",
        "-n",
        "kube-system",
        "lb",
        "--wait=false",
    ]);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    drop(nodes);
    realnode::remove_lb_pins(Path::new(env!("CARGO_BIN_EXE_lb")), &names);
    drop(world);
    result?;
    cleanup.map(|_| ())
}
