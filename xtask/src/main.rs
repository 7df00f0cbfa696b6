//! `cargo xtask`: run the load balancer in a demo sandbox, run every test, benchmark.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

mod audit;
mod bench;
mod conformance;
mod prereqs;
mod vm;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use lb_testbed::sandbox::{DNS_CLUSTER_IP, REDIS_CLUSTER_IP, Sandbox, TEST_SVC_CLUSTER_IP};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Run, test and benchmark the load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build `lb`, start a sandbox of pods running real servers, run the daemon on the
    /// bundled examples/manifests/ and show connections being balanced (Ctrl-C stops and removes
    /// everything). With `-- --manifests DIR`, run the daemon on your own manifests
    /// instead, attached to this machine's cgroup2 root like a real deployment.
    Run {
        /// Your own folder of Service/EndpointSlice manifests (no sandbox).
        #[arg(long, value_name = "DIR", conflicts_with = "cluster")]
        manifests: Option<PathBuf>,
        /// The demo on a real Kubernetes control plane (kube-apiserver, controller-manager,
        /// scheduler, etcd; a simulated kubelet): the seed scenario applied with kubectl
        /// and the daemon in Kubernetes mode.
        #[arg(long)]
        cluster: bool,
        /// With --cluster: two real nodes (containerd, runc, upstream's kubelet) with lb
        /// deployed from deploy/ as a DaemonSet, cluster DNS in a pod, and the seed's
        /// manifests applied verbatim (its `image: redis` pulled from a local registry).
        #[arg(long, requires = "cluster")]
        real_node: bool,
        /// Extra arguments for `lb daemon` (after --).
        #[arg(last = true)]
        daemon_args: Vec<String>,
    },
    /// Run a command (default: a shell) in the sandbox's web pod, inside the balanced
    /// cgroup, while `cargo xtask run` is running.
    Client {
        #[arg(trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Everything CI runs: formatting, clippy (userspace and eBPF), unit tests, the
    /// real-kernel end-to-end tests, the kernel-compatibility suite inside Linux 6.1
    /// and a smoke run of the benchmark harness. Needs root.
    Test {
        /// Only the kernel-compatibility suite, inside this kernel (6.1): its root-only
        /// unit tests and the end-to-end tests whose behaviour depends on the kernel.
        #[arg(long, value_name = "VERSION")]
        kernel: Option<String>,
    },
    /// Benchmarks against kube-proxy's iptables modes, a userspace proxy and the direct
    /// path, side by side in one run. Needs root.
    Bench(bench::BenchArgs),
    /// Build the DaemonSet's container image without a registry or build daemon: the
    /// release `lb` and the libraries it loads in one layer, written as a docker-archive
    /// (`ctr -n k8s.io images import`, `docker load -i`, `podman load -i`).
    Image {
        /// Where to write the archive.
        #[arg(long, value_name = "FILE", default_value = "target/image/lb.tar")]
        output: PathBuf,
        /// The image's name and tag (deploy/daemonset.yaml's `image`).
        #[arg(long, default_value = DEFAULT_IMAGE)]
        name: String,
    },
    /// Upstream's Service e2e suite (`e2e.test`) on two real nodes with lb deployed
    /// from deploy/, or with upstream's kube-proxy in its place (`--proxy`), skipping
    /// what conformance/skip.txt lists with its reason. Needs root.
    Conformance(conformance::ConformanceArgs),
    /// Remove namespaces, cgroups and pins left by killed test or sandbox runs.
    Cleanup,
}

/// The image deploy/daemonset.yaml runs.
const DEFAULT_IMAGE: &str = concat!("lb:", env!("CARGO_PKG_VERSION"));

fn image_task(output: PathBuf, name: String) -> Result<()> {
    let lb = build_lb(true)?;
    let output = if output.is_relative() {
        workspace_root().join(output)
    } else {
        output
    };
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let id = lb_testbed::image::lb_image(&lb, &name)?.write_docker_archive(&output)?;
    let size = std::fs::metadata(&output)?.len();
    println!(
        "wrote {name} ({id}, {:.1} MiB) to {}\n  import: ctr -n k8s.io images import {}\n      or: docker load -i {}",
        size as f64 / (1 << 20) as f64,
        output.display(),
        output.display(),
        output.display()
    );
    Ok(())
}

/// Where `cargo xtask run` tells `cargo xtask client` how to enter the sandbox.
const SANDBOX_STATE: &str = "/run/lb-sandbox.json";

#[derive(Serialize, Deserialize)]
struct SandboxState {
    client_netns: String,
    cgroup: PathBuf,
    pid: u32,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Builds the `lb` binary and returns its path.
pub fn build_lb(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "-p",
        "lb-userspace",
        "--bin",
        "lb",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !output.status.success() {
        bail!("cargo build failed");
    }
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Ok(msg) = serde_json::from_str::<serde_json::Value>(line)
            && msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "lb"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo build did not report the lb executable")
}

pub fn require_root(what: &str) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (it loads eBPF programs and creates network namespaces)");
    }
    Ok(())
}

fn ctrl_c_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let _ = signal_hook_flag(signal, stop.clone());
    }
    stop
}

/// Minimal signal-to-flag registration (no extra dependency): the handler only stores.
fn signal_hook_flag(signal: i32, flag: Arc<AtomicBool>) -> Result<()> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn handler(_: i32) {
        if let Some(flag) = FLAG.get() {
            flag.store(true, Ordering::SeqCst);
        }
    }
    // SAFETY: the handler only performs an atomic store.
    unsafe { libc::signal(signal, handler as *const () as libc::sighandler_t) };
    Ok(())
}

struct DaemonProcess {
    child: std::process::Child,
}

impl DaemonProcess {
    /// Starts `lb daemon`, echoing its log to our stderr, and waits for "ready".
    fn start(lb: &Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new(lb)
            .arg("daemon")
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting lb daemon")?;
        let stderr = child.stderr.take().expect("piped");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  [lb] {line}");
                if line.contains(" ready ") || line.ends_with(" ready") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready_rx.try_recv().is_ok() {
                return Ok(Self { child });
            }
            if let Some(status) = child.try_wait()? {
                bail!("lb daemon exited with {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("lb daemon did not become ready");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> Result<()> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("lb daemon exited with {status}");
        }
        Ok(())
    }
}

fn run_task(manifests: Option<PathBuf>, daemon_args: Vec<String>) -> Result<()> {
    require_root("cargo xtask run")?;
    prereqs::ensure()?;
    let lb = build_lb(false)?;
    let stop = ctrl_c_flag();

    // `cargo xtask run -- --manifests DIR [daemon flags]` (or `run --manifests DIR`):
    // the user's own manifests, no sandbox.
    let manifests_in_daemon_args = daemon_args
        .iter()
        .any(|a| a == "--manifests" || a.starts_with("--manifests="));
    if manifests.is_some() || manifests_in_daemon_args {
        // The real thing on the user's manifests: the default cgroup is the host root.
        let mut args = Vec::new();
        if let Some(dir) = &manifests {
            args.extend(["--manifests".to_string(), dir.display().to_string()]);
        }
        args.extend(daemon_args);
        eprintln!("Starting lb daemon {} (Ctrl-C to stop)", args.join(" "));
        let daemon = DaemonProcess::start(&lb, &args)?;
        while !stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(100));
        }
        return daemon.stop();
    }

    eprintln!(
        "Creating the sandbox: pods redis-master-1..3 (10.244.1.11-13, redis-server), coredns-1..2 \
         (10.244.1.21-22, dnsmasq), lab-web-a/b (10.244.1.31-32, HTTP) and the client pod web (10.244.1.100)"
    );
    let sandbox = Sandbox::start()?;
    let tb = &sandbox.testbed;
    let pin_dir = format!("/sys/fs/bpf/{}", tb.id);
    let mut args = vec![
        "--manifests".to_string(),
        workspace_root()
            .join("examples/manifests")
            .display()
            .to_string(),
        "--cgroup".to_string(),
        tb.cgroup().display().to_string(),
        "--pin-dir".to_string(),
        pin_dir.clone(),
        // The sandbox goes away with the demo; nothing must stay attached.
        "--detach-on-exit".to_string(),
    ];
    args.extend(daemon_args);
    let daemon = DaemonProcess::start(&lb, &args)?;
    let state = SandboxState {
        client_netns: sandbox.client.netns.clone(),
        cgroup: tb.cgroup().to_path_buf(),
        pid: std::process::id(),
    };
    fs::write(SANDBOX_STATE, serde_json::to_vec(&state)?)?;

    let demo = (|| -> Result<()> {
        let run_in_web = |argv: &[&str]| -> Result<String> {
            let out = tb.output(&sandbox.client, true, argv, Duration::from_secs(5))?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        println!(
            "\nThe web pod resolves redis through kube-dns (ClusterIP {DNS_CLUSTER_IP}, UDP), as resolv.conf would:"
        );
        let answer = run_in_web(&[
            "dig",
            "+short",
            &format!("@{DNS_CLUSTER_IP}"),
            "redis-master-sr.default.svc.cluster.local",
        ])?;
        println!(
            "  dig +short @{DNS_CLUSTER_IP} redis-master-sr.default.svc.cluster.local  ->  {answer}"
        );

        println!("\nand opens ten new connections to redis-master-sr at {REDIS_CLUSTER_IP}:6379:");
        let mut tally = std::collections::BTreeMap::new();
        for _ in 0..10 {
            let who = run_in_web(&[
                "redis-cli",
                "-h",
                REDIS_CLUSTER_IP,
                "-p",
                "6379",
                "GET",
                "whoami",
            ])?;
            println!("  redis-cli -h {REDIS_CLUSTER_IP} GET whoami  ->  {who}");
            *tally.entry(who).or_insert(0) += 1;
        }
        println!("  answered by: {tally:?}");

        println!(
            "\ntest-svc ({TEST_SVC_CLUSTER_IP}:80, targetPort web-port = 8080 on one pod, 9090 on the other):"
        );
        for _ in 0..4 {
            let who = run_in_web(&[
                "curl",
                "-s",
                &format!("http://{TEST_SVC_CLUSTER_IP}/whoami"),
            ])?;
            println!("  curl http://{TEST_SVC_CLUSTER_IP}/whoami  ->  {who}");
        }
        let list = Command::new(&lb)
            .args(["list", "--pin-dir", &pin_dir])
            .output()?;
        println!(
            "\nlb list --pin-dir {pin_dir}:\n{}",
            String::from_utf8_lossy(&list.stdout)
        );
        Ok(())
    })();
    if let Err(err) = demo {
        eprintln!("demo failed: {err:#}");
    }
    println!(
        "Try it yourself (another terminal, as root):\n\
         \x20 cargo xtask client redis-cli -h {REDIS_CLUSTER_IP} GET whoami\n\
         \x20 cargo xtask client dig @{DNS_CLUSTER_IP} whoami.test\n\
         \x20 cargo xtask client            # a shell in the web pod, balanced like a real pod\n\
         \x20 target/debug/lb list --pin-dir {pin_dir}\n\
         \x20 bpftool map dump pinned {pin_dir}/v{layout}/LB_SERVICES\n\
         Edit examples/manifests/*.yaml and watch the daemon apply it. Ctrl-C stops and removes the sandbox.",
        layout = lb_common::LAYOUT_VERSION
    );
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("\nStopping: detaching the datapath and removing the sandbox");
    let _ = fs::remove_file(SANDBOX_STATE);
    daemon.stop()?;
    drop(sandbox);
    Ok(())
}

/// `cargo xtask run --cluster`: the seed scenario on a real control plane.
fn cluster_task(daemon_args: Vec<String>) -> Result<()> {
    use lb_testbed::{
        k8s::{ControlPlane, Etcd},
        kubelet::{NodeOptions, SimNode},
        world::World,
    };
    require_root("cargo xtask run --cluster")?;
    prereqs::ensure()?;
    if let Some(reason) = lb_testbed::k8s::unavailable() {
        bail!("{reason}");
    }
    let lb = build_lb(false)?;
    let stop = ctrl_c_flag();
    eprintln!(
        "Starting a Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)"
    );
    let cp = ControlPlane::start(Etcd::Bundled)?;
    let world = std::sync::Arc::new(World::new(&["node-1"])?);
    let node = SimNode::start(&cp, world.clone(), "node-1", NodeOptions::default())?;
    eprintln!(
        "Simulated node {} registered (pods on {})",
        node.name,
        node.net().pod_cidr_v4
    );
    let pin_dir = format!("/sys/fs/bpf/{}", node.name);
    let mut args = vec![
        "--kubeconfig".to_string(),
        cp.kubeconfig.display().to_string(),
        "--node-name".to_string(),
        node.name.clone(),
        "--cgroup".to_string(),
        node.net().cgroup.path.display().to_string(),
        "--pin-dir".to_string(),
        pin_dir.clone(),
        "--detach-on-exit".to_string(),
        "--health-addr".to_string(),
        "127.0.0.1:10256".to_string(),
        "--metrics-addr".to_string(),
        "127.0.0.1:10249".to_string(),
        // The demo's kubeconfig skips TLS verification (self-signed test server);
        // kube-rs warns about it on every connection.
        "--log-level".to_string(),
        "info,kube_client::client::tls=error".to_string(),
    ];
    args.extend(daemon_args);
    let daemon = DaemonProcess::start(&lb, &args)?;
    let kubectl = |args: &[&str]| -> Result<String> {
        let out = cp.kubectl(args)?;
        for line in out.lines() {
            println!("    {line}");
        }
        Ok(out)
    };
    let demo = (|| -> Result<()> {
        let deployment = workspace_root().join("examples/cluster/r-deployment.yaml");
        println!(
            "\n$ kubectl apply -f examples/cluster/r-deployment.yaml   # the seed's redis Deployment"
        );
        kubectl(&["apply", "-f", &deployment.display().to_string()])?;
        println!("$ kubectl expose deployment redis-master --port=6379");
        kubectl(&["expose", "deployment", "redis-master", "--port=6379"])?;
        println!("$ kubectl run web --image=busybox -- sleep infinity        # the client pod");
        kubectl(&[
            "run",
            "web",
            "--image=busybox",
            "--restart=Never",
            "--",
            "sleep",
            "infinity",
        ])?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let vip = loop {
            let ready = cp.kubectl(&["get", "pods", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"])?;
            let slices = cp.kubectl(&[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=redis-master",
                "-o",
                "jsonpath={.items[*].endpoints[*].addresses[0]}",
            ])?;
            if ready.lines().filter(|l| *l == "True").count() == 2 && !slices.trim().is_empty() {
                break cp.kubectl(&[
                    "get",
                    "service",
                    "redis-master",
                    "-o",
                    "jsonpath={.spec.clusterIP}",
                ])?;
            }
            if Instant::now() > deadline {
                bail!("the pods did not become ready");
            }
            thread::sleep(Duration::from_millis(200));
        };
        println!("$ kubectl get pods,services,endpointslices -o wide");
        kubectl(&["get", "pods,services,endpointslices", "-o", "wide"])?;
        thread::sleep(Duration::from_millis(300));
        println!(
            "\nThe web pod connects to redis-master at the ClusterIP the API server allocated ({vip}):"
        );
        for _ in 0..3 {
            let out = node.exec(
                "default",
                "web",
                &["redis-cli", "-h", &vip, "GET", "whoami"],
                Duration::from_secs(5),
            )?;
            println!(
                "  redis-cli -h {vip} GET whoami  ->  {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        let list = Command::new(&lb)
            .args(["list", "--pin-dir", &pin_dir])
            .output()?;
        println!(
            "\nlb list --pin-dir {pin_dir}:\n{}",
            String::from_utf8_lossy(&list.stdout)
        );
        let web = node.pod("default", "web").context("the web pod is gone")?;
        let state = SandboxState {
            client_netns: web.netns.clone(),
            cgroup: node.net().cgroup.path.clone(),
            pid: std::process::id(),
        };
        fs::write(SANDBOX_STATE, serde_json::to_vec(&state)?)?;
        println!(
            "Try it yourself (another terminal, as root):\n\
             \x20 export KUBECONFIG={kubeconfig}\n\
             \x20 alias kubectl={kubectl_bin}\n\
             \x20 kubectl scale deployment redis-master --replicas=3\n\
             \x20 target/debug/lb list --pin-dir {pin_dir}      # follows within a second\n\
             \x20 cargo xtask client redis-cli -h {vip} GET whoami\n\
             \x20 kubectl delete pod -l app=redis                # replacements get new IPs\n\
             \x20 curl -s localhost:10249/metrics | grep kubeproxy_\n\
             Ctrl-C stops the daemon and removes the control plane and the node.",
            kubeconfig = cp.kubeconfig.display(),
            kubectl_bin = lb_testbed::k8s::binaries()?
                .unwrap_or_default()
                .join("kubectl")
                .display(),
        );
        Ok(())
    })();
    if let Err(err) = demo {
        eprintln!("demo failed: {err:#}");
    }
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("\nStopping: detaching the datapath, removing the node and the control plane");
    let _ = fs::remove_file(SANDBOX_STATE);
    daemon.stop()?;
    drop(node);
    drop(world);
    drop(cp);
    Ok(())
}

/// `cargo xtask run --cluster --real-node`: the seed scenario as its documents run it,
/// on two real nodes with lb deployed as users deploy it.
fn real_node_task(daemon_args: Vec<String>) -> Result<()> {
    use lb_testbed::seed::{self, SeedCluster};
    require_root("cargo xtask run --cluster --real-node")?;
    if !daemon_args.is_empty() {
        bail!(
            "with --real-node lb runs as the DaemonSet of deploy/daemonset.yaml: put daemon \
             flags ({}) in its args",
            daemon_args.join(" ")
        );
    }
    prereqs::ensure()?;
    if let Some(reason) = lb_testbed::k8s::unavailable().or_else(lb_testbed::realnode::unavailable)
    {
        bail!("{reason}");
    }
    let lb = build_lb(false)?;
    let stop = ctrl_c_flag();
    eprintln!(
        "Starting a control plane and two real nodes (containerd, runc, kubelet), then lb \
         from deploy/ and a DNS pod (about a minute)"
    );
    let cluster = SeedCluster::start(&lb, &["node1", "node2"], true)?;
    let demo = (|| -> Result<()> {
        cluster.kubectl(&["get", "nodes", "-o", "wide"])?;
        cluster.kubectl(&["get", "pods", "-n", "kube-system", "-o", "wide"])?;
        println!("\n# The seed's manifests, verbatim");
        let seed = cluster.apply_seed()?;
        println!(
            "# the kubelet pulled `image: redis` from the test registry ({}): {:?}",
            cluster.registry.address(),
            cluster.registry.pulls()
        );
        cluster.kubectl(&["get", "pods,services", "-o", "wide"])?;
        println!(
            "\n# web (on {}) reaches redis (on {}) through redis-master-sr's ClusterIP, \
             found in the environment the kubelet injected",
            seed.client_node, seed.redis_node
        );
        cluster.sh("web", "env | grep REDIS_MASTER_SR_SERVICE | sort")?;
        let by_env = "redis-cli -h $REDIS_MASTER_SR_SERVICE_HOST -p $REDIS_MASTER_SR_SERVICE_PORT";
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster
            .sh("web", &format!("{by_env} set seed hello"))
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("redis-master-sr did not answer within 30 s");
            }
            thread::sleep(Duration::from_millis(500));
        }
        cluster.sh("web", &format!("{by_env} client info"))?;
        println!("\n# and by name, through the kube-dns Service (DNS over UDP through lb too)");
        cluster.sh("web", "nslookup redis-master-sr.default.svc.cluster.local")?;
        cluster.sh("web", "redis-cli -h redis-master-sr get seed")?;
        println!(
            "\n# from outside the cluster, through the NodePort {} on each node",
            seed::NODE_PORT
        );
        for node in &cluster.nodes {
            let out = cluster
                .world
                .command(&cluster.outside, None, "redis-cli")?
                .args([
                    "-h",
                    &node.ipv4.to_string(),
                    "-p",
                    &seed::NODE_PORT.to_string(),
                ])
                .args(["get", "seed"])
                .output()?;
            println!(
                "$ redis-cli -h {} -p {} get seed\n    {}",
                node.ipv4,
                seed::NODE_PORT,
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        let (lb_pod, lb_node) = &cluster.lb_pods[0];
        let pin_dir = lb_testbed::realnode::lb_pin_dir(lb_node);
        cluster.kubectl(&[
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
        ])?;
        println!(
            "\nTry it yourself (another terminal, as root):\n\
             \x20 export KUBECONFIG={kubeconfig}\n\
             \x20 alias kubectl={kubectl_bin}\n\
             \x20 kubectl scale deployment redis-master --replicas=3\n\
             \x20 kubectl exec web -- sh -c 'for i in 1 2 3 4 5 6; do redis-cli -h redis-master-sr info server | grep run_id; done'\n\
             \x20 kubectl delete pod -l app=redis                # replacements get new IPs\n\
             \x20 kubectl logs -n kube-system -l app.kubernetes.io/name=lb -c lb\n\
             Ctrl-C removes the nodes and the control plane.",
            kubeconfig = cluster.cp.kubeconfig.display(),
            kubectl_bin = lb_testbed::k8s::binaries()?
                .unwrap_or_default()
                .join("kubectl")
                .display(),
        );
        Ok(())
    })();
    if let Err(err) = demo {
        eprintln!("demo failed: {err:#}");
    }
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("\nStopping: removing lb's pins, the nodes, the registry and the control plane");
    drop(cluster);
    Ok(())
}

fn client_task(command: Vec<String>) -> Result<()> {
    require_root("cargo xtask client")?;
    let state: SandboxState = serde_json::from_slice(
        &fs::read(SANDBOX_STATE)
            .context("no sandbox is running (start one with `cargo xtask run`)")?,
    )?;
    if unsafe { libc::kill(state.pid as i32, 0) } != 0 {
        bail!("the sandbox recorded in {SANDBOX_STATE} is gone; start one with `cargo xtask run`");
    }
    let argv: Vec<String> = if command.is_empty() {
        vec!["bash".into()]
    } else {
        command
    };
    let mut cmd = lb_testbed::netns_command(&state.client_netns, Some(&state.cgroup), &argv[0])?;
    let status = cmd.args(&argv[1..]).status()?;
    if !status.success() {
        bail!("{} exited with {status}", argv.join(" "));
    }
    Ok(())
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let status = cmd.status().with_context(|| format!("running {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    eprintln!("    {name}: ok in {:.1?}", started.elapsed());
    Ok(())
}

fn test_task() -> Result<()> {
    require_root("cargo xtask test")?;
    let started = Instant::now();
    let _bpffs = BpffsRestore::new();
    prereqs::ensure()?;
    step("rustfmt", cargo().args(["fmt", "--all", "--", "--check"]))?;
    step(
        "clippy (userspace)",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "clippy (eBPF)",
        Command::new("rustup")
            .current_dir(workspace_root())
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "-p",
                "lb-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .env(
                "CARGO_TARGET_DIR",
                workspace_root().join("target/ebpf-clippy"),
            ),
    )?;
    eprintln!("==> dependency audit (RustSec snapshot in ../shared/advisory-db)");
    audit::run()?;
    // As root, the unit tests that need root (ignored elsewhere) run too.
    step(
        "unit tests",
        cargo().args([
            "test",
            "--workspace",
            "--lib",
            "--bins",
            "--",
            "--include-ignored",
        ]),
    )?;
    step(
        "end-to-end tests (real kernel, real control plane)",
        cargo().args(["test", "-p", "lb-userspace", "--test", "e2e"]),
    )?;
    eprintln!("==> upstream Service specs on two real nodes (conformance/ci.txt)");
    let upstream = Instant::now();
    conformance::run(conformance::ConformanceArgs::ci())?;
    eprintln!(
        "    upstream Service specs: ok in {:.1?}",
        upstream.elapsed()
    );
    eprintln!("==> kernel-compatibility suite (Linux {})", vm::KERNEL);
    let guest = Instant::now();
    vm::run_suite(vm::KERNEL)?;
    eprintln!(
        "    kernel-compatibility suite: ok in {:.1?}",
        guest.elapsed()
    );
    for target in FUZZ_TARGETS {
        step(
            &format!("fuzzing {target} ({FUZZ_SECONDS} s)"),
            &mut fuzz_command(target, FUZZ_SECONDS),
        )?;
    }
    step(
        "benchmark harness smoke test",
        cargo().args(["xtask", "bench", "--smoke", "--out", "target/bench-smoke"]),
    )?;
    eprintln!("==> all checks passed in {:.1?}", started.elapsed());
    Ok(())
}

/// `cargo xtask test --kernel VERSION`: the kernel-compatibility suite alone.
fn kernel_test_task(kernel: &str) -> Result<()> {
    require_root("cargo xtask test --kernel")?;
    let kernel = vm::kernel_for(kernel)?;
    prereqs::ensure()?;
    vm::run_suite(kernel)
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|l| l.split(' ').nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "))
    })
}

/// The daemons under test mount bpffs when the machine has none; the run unmounts it
/// again at the end (also on failure) if it only holds the kernel's own preload
/// entries (`maps.debug`, `progs.debug`), so the machine is left as it was.
struct BpffsRestore {
    was_mounted: bool,
}

impl BpffsRestore {
    fn new() -> Self {
        Self {
            was_mounted: bpffs_mounted(),
        }
    }
}

impl Drop for BpffsRestore {
    fn drop(&mut self) {
        if self.was_mounted {
            return;
        }
        while bpffs_mounted() {
            let ours_only = fs::read_dir("/sys/fs/bpf").is_ok_and(|entries| {
                entries
                    .flatten()
                    .all(|e| e.file_name().to_string_lossy().ends_with(".debug"))
            });
            if !ours_only {
                eprintln!(
                    "bpffs at /sys/fs/bpf still holds pins: left mounted (cargo xtask cleanup)"
                );
                return;
            }
            let unmounted = Command::new("umount")
                .arg("/sys/fs/bpf")
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                return;
            }
        }
    }
}

/// The fuzz targets (`fuzz/fuzz_targets/`), and how long `cargo xtask test` runs each.
const FUZZ_TARGETS: [&str; 2] = ["manifests", "model"];
const FUZZ_SECONDS: u32 = 30;

/// A bounded fuzzing run of one target, unoptimized (it builds in half the time; a
/// longer run is `cargo +nightly fuzz run <target> -s none` from the workspace root).
/// Findings are written to fuzz/artifacts/ and fail the step.
fn fuzz_command(target: &str, seconds: u32) -> Command {
    let root = workspace_root();
    let corpus = root.join("fuzz/corpus").join(target);
    let _ = fs::create_dir_all(&corpus);
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&root)
        .args([
            "run", "nightly", "cargo", "fuzz", "run", "--dev", "-s", "none", target,
        ])
        .arg(&corpus);
    let seeds = root.join("fuzz/seeds").join(target);
    if seeds.is_dir() {
        cmd.arg(seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn cleanup_task() -> Result<()> {
    require_root("cargo xtask cleanup")?;
    for removed in lb_testbed::cleanup_leftovers()? {
        eprintln!("removed {removed}");
    }
    let pin_dirs: Vec<PathBuf> = fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(lb_testbed::PREFIX)
        })
        .map(|e| e.path())
        .collect();
    if !pin_dirs.is_empty() {
        let lb = build_lb(false)?;
        for pin_dir in pin_dirs {
            Command::new(&lb)
                .args(["cleanup", "--pin-dir"])
                .arg(&pin_dir)
                .status()?;
        }
    }
    let _ = fs::remove_file(SANDBOX_STATE);
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(bench::CLIENT_ARG) {
        return match bench::client_main(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("bench client: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Run {
            cluster: true,
            real_node: true,
            daemon_args,
            ..
        } => real_node_task(daemon_args),
        Task::Run {
            cluster: true,
            daemon_args,
            ..
        } => cluster_task(daemon_args),
        Task::Run {
            manifests,
            daemon_args,
            ..
        } => run_task(manifests, daemon_args),
        Task::Client { command } => client_task(command),
        Task::Test { kernel: None } => test_task(),
        Task::Test {
            kernel: Some(kernel),
        } => kernel_test_task(&kernel),
        Task::Bench(args) => bench::run(args),
        Task::Image { output, name } => image_task(output, name),
        Task::Conformance(args) => conformance::run(args),
        Task::Cleanup => cleanup_task(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
