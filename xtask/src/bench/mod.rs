//! `cargo xtask bench`: new-connection latency and rate, request latency, throughput
//! and control-plane costs, for this load balancer side by side with the direct path
//! (the physical limit), kube-proxy's iptables mode on both iptables backends, and a
//! userspace proxy, in one run on the same namespaces and servers.
//!
//! Order of measurement, per service count: first the modes that need no iptables
//! rules (direct, lb, userspace-proxy), interleaved over several rounds so machine
//! noise hits them alike; then iptables-nft (its table is deleted afterwards, so
//! conntrack goes away again); then iptables-legacy (last: its tables cannot be
//! unregistered from a namespace).
//!
//! NodePort modes: the same client, outside the balanced cgroup, dials the node's
//! address at a node port: `lb-nodeport` is served by the TC programs on the node's
//! client-side interface, `iptables-*-nodeport` by kube-proxy's KUBE-NODEPORTS rules;
//! `direct` (the client dialling the pods through the node) is the limit for both.

mod client;
mod control_plane;
mod hooks;
mod kube;
mod report;
mod rules;
mod scale;
mod topology;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use self::client::{CLIENT_ARG, main as client_main};
use self::{
    client::Summary,
    rules::{
        AFFINITY_VIP, IPERF_NODE_PORT, IPERF_PORT, IPERF_VIP, NODE_IP, NODE_PORT, PROXY_VIP,
        SERVICE_PORT,
    },
    topology::{SERVER_IPS, Topology},
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A short run (under two minutes on 2 cores, build excluded).
    #[arg(long)]
    quick: bool,
    /// A minimal run that checks the harness end to end (used by `cargo xtask test`;
    /// its timings mean nothing).
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Only the Kubernetes-source measurements (a real API server), printed as JSON.
    #[arg(long)]
    kube_only: bool,
    /// Only the restarts under load, printed as JSON.
    #[arg(long, conflicts_with = "kube_only")]
    restarts_only: bool,
    /// Service counts to measure at (comma-separated).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Services (10 endpoints each) the Kubernetes-source run creates in the API server.
    #[arg(long)]
    kube_services: Option<usize>,
    /// Where results.json, report.md and latency.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Also write BENCHMARKS.md and docs/bench-latency.svg in the repository.
    #[arg(long)]
    publish: bool,
}

/// How much of everything to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub services: Vec<usize>,
    pub concurrency: Vec<usize>,
    /// New connections per (mode, services, concurrency) and round.
    pub connections: usize,
    pub rounds: usize,
    pub round_trips: usize,
    pub iperf_seconds: u32,
    pub iperf_runs: usize,
    pub cp_services: usize,
    pub cp_endpoints: usize,
    pub cp_changes: usize,
    /// Full syncs from manifests at these sizes, each also with this many duplicates.
    pub scale_services: Vec<usize>,
    pub scale_duplicates: usize,
    /// Restarts under load (0: skipped), and the Service count meanwhile.
    pub restarts: usize,
    pub restart_services: usize,
    /// The Kubernetes-source run (0 services: skipped).
    pub kube_services: usize,
    pub kube_endpoints: usize,
    pub kube_changes: usize,
}

impl Plan {
    fn for_args(args: &BenchArgs) -> Self {
        let mut plan = if args.smoke {
            Self {
                services: vec![1, 20],
                concurrency: vec![1, 2],
                connections: 200,
                rounds: 1,
                round_trips: 200,
                iperf_seconds: 1,
                iperf_runs: 1,
                cp_services: 200,
                cp_endpoints: 10,
                cp_changes: 5,
                scale_services: vec![100],
                scale_duplicates: 20,
                restarts: 3,
                restart_services: 20,
                kube_services: 50,
                kube_endpoints: 10,
                kube_changes: 5,
            }
        } else if args.quick {
            Self {
                services: vec![1, 10_000],
                concurrency: vec![1, 4],
                connections: 1_000,
                rounds: 5,
                round_trips: 5_000,
                iperf_seconds: 2,
                iperf_runs: 2,
                cp_services: 10_000,
                cp_endpoints: 10,
                cp_changes: 50,
                scale_services: Vec::new(),
                scale_duplicates: 0,
                restarts: 0,
                restart_services: 0,
                kube_services: 0,
                kube_endpoints: 0,
                kube_changes: 0,
            }
        } else {
            Self {
                services: vec![1, 1_000, 10_000, 30_000],
                concurrency: vec![1, 4],
                connections: 2_000,
                rounds: 20,
                round_trips: 20_000,
                iperf_seconds: 3,
                iperf_runs: 7,
                cp_services: 10_000,
                cp_endpoints: 10,
                cp_changes: 200,
                scale_services: vec![10_000, 50_000, 100_000],
                scale_duplicates: 10_000,
                restarts: 20,
                restart_services: 10_000,
                kube_services: 10_000,
                kube_endpoints: 10,
                kube_changes: 200,
            }
        };
        if let Some(services) = &args.services {
            plan.services = services.clone();
        }
        if let Some(services) = args.kube_services {
            plan.kube_services = services;
        }
        plan
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Direct,
    Lb,
    /// lb, to a ClusterIP with `sessionAffinity: ClientIP` (largest service count only).
    LbAffinity,
    UserspaceProxy,
    IptablesNft,
    IptablesLegacy,
    /// A client outside the node dialling the node's address at a node port.
    LbNodePort,
    IptablesNftNodePort,
    IptablesLegacyNodePort,
    /// lb, for a client pod in packet mode (`lb.dev/mode: packet`): translated per
    /// packet on the pod's interface instead of at connect().
    LbPacket,
}

impl Mode {
    pub const ALL: [Mode; 10] = [
        Mode::Direct,
        Mode::Lb,
        Mode::LbPacket,
        Mode::LbAffinity,
        Mode::IptablesLegacy,
        Mode::IptablesNft,
        Mode::UserspaceProxy,
        Mode::LbNodePort,
        Mode::IptablesLegacyNodePort,
        Mode::IptablesNftNodePort,
    ];

    /// The node-port variant of a ClusterIP mode.
    fn node_port(self) -> Option<Mode> {
        match self {
            Mode::Lb => Some(Mode::LbNodePort),
            Mode::IptablesNft => Some(Mode::IptablesNftNodePort),
            Mode::IptablesLegacy => Some(Mode::IptablesLegacyNodePort),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Lb => "lb",
            Mode::LbAffinity => "lb-affinity",
            Mode::UserspaceProxy => "userspace-proxy",
            Mode::IptablesNft => "iptables-nft",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::LbNodePort => "lb-nodeport",
            Mode::IptablesNftNodePort => "iptables-nft-nodeport",
            Mode::IptablesLegacyNodePort => "iptables-legacy-nodeport",
            Mode::LbPacket => "lb-packet",
        }
    }

    fn targets(self, services: usize) -> String {
        match self {
            Mode::Direct => SERVER_IPS
                .map(|ip| format!("{ip}:{SERVICE_PORT}"))
                .join(","),
            Mode::UserspaceProxy => format!("{PROXY_VIP}:{SERVICE_PORT}"),
            Mode::LbAffinity => format!("{AFFINITY_VIP}:{SERVICE_PORT}"),
            Mode::LbNodePort | Mode::IptablesNftNodePort | Mode::IptablesLegacyNodePort => {
                format!("{NODE_IP}:{NODE_PORT}")
            }
            _ => format!(
                "{}:{SERVICE_PORT}",
                rules::vip(rules::target_index(services))
            ),
        }
    }

    /// The cgroup its client runs in: the one lb is attached to for the socket path,
    /// the packet-mode pod's for the packet path, none for the others.
    fn cgroup(self, topo: &Topology) -> Option<&Path> {
        match self {
            Mode::Lb | Mode::LbAffinity => Some(&topo.cgroup.path),
            Mode::LbPacket => Some(&topo.packet_cgroup),
            _ => None,
        }
    }
}

/// One row of results.json's "connect" (and "request") list.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub mode: Mode,
    pub services: usize,
    pub concurrency: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub conn_per_s: f64,
    pub samples: usize,
    pub errors: usize,
}

impl Row {
    fn new(mode: Mode, services: usize, concurrency: usize, s: &Summary) -> Self {
        Self {
            mode,
            services,
            concurrency,
            p50_us: s.p50_us,
            p90_us: s.p90_us,
            p99_us: s.p99_us,
            conn_per_s: s.per_s,
            samples: s.samples,
            errors: s.errors,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub direct_gbps: f64,
    pub lb_gbps: f64,
    pub lb_ratio: f64,
    pub direct_runs_gbps: Vec<f64>,
    pub lb_runs_gbps: Vec<f64>,
    /// The packet-mode pod through the ClusterIP.
    pub lb_packet_gbps: f64,
    pub lb_packet_ratio: f64,
    pub lb_packet_runs_gbps: Vec<f64>,
    pub seconds_per_run: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SetupTimes {
    /// services -> seconds to load the rules with iptables-restore.
    pub iptables_legacy_restore_s: BTreeMap<usize, f64>,
    pub iptables_nft_restore_s: BTreeMap<usize, f64>,
    /// services -> seconds from `lb daemon` start to ready (programs loaded, maps
    /// written).
    pub lb_ready_s: BTreeMap<usize, f64>,
}

/// Runs the client in the client namespace and returns its summary.
fn measure(
    topo: &Topology,
    exe: &Path,
    mode: Mode,
    services: usize,
    kind: &str,
    count: usize,
    concurrency: usize,
) -> Result<Summary> {
    let mut cmd = topo.client_command(mode.cgroup(topo), exe)?;
    cmd.args([
        CLIENT_ARG,
        kind,
        &mode.targets(services),
        &count.to_string(),
        &concurrency.to_string(),
    ]);
    let output =
        lb_testbed::output_with_timeout(cmd, Duration::from_secs(300)).with_context(|| {
            format!(
                "{} {kind} x{concurrency} at {services} services",
                mode.name()
            )
        })?;
    if !output.status.success() {
        bail!(
            "{} client failed: {}",
            mode.name(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let summary: Summary = serde_json::from_slice(&output.stdout).with_context(|| {
        let text = String::from_utf8_lossy(&output.stdout);
        format!(
            "{} client output (every exchange failed?): {}",
            mode.name(),
            &text[..text.len().min(2000)]
        )
    })?;
    // A handful of errors in tens of thousands of connections would be noise; more
    // means the path is broken, and its numbers would lie.
    if summary.errors * 100 > count {
        bail!(
            "{}: {} of {count} exchanges failed",
            mode.name(),
            summary.errors
        );
    }
    Ok(summary)
}

/// Removes the benchmark's datapath (`lb cleanup`) when the run ends, also on errors.
struct PinCleanup {
    lb: PathBuf,
    pin_dir: PathBuf,
}

impl Drop for PinCleanup {
    fn drop(&mut self) {
        if self.pin_dir.exists() {
            let _ = Command::new(&self.lb)
                .arg("cleanup")
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// A running `lb daemon` for the benchmark.
struct Daemon {
    child: Child,
    log: PathBuf,
    pub ready_s: f64,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Reached on error paths only (`stop` consumes it cleanly): never leave a daemon
        // attached behind.
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    /// A daemon that removes its datapath when it stops (each run starts from scratch).
    fn start(lb: &Path, topo: &Topology, manifests: &Path, tag: &str) -> Result<Self> {
        Self::start_with(lb, topo, manifests, tag, &["--detach-on-exit"])
    }

    fn start_with(
        lb: &Path,
        topo: &Topology,
        manifests: &Path,
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let log = topo.work_dir.join(format!("daemon-{tag}.log"));
        let log_file = fs::File::create(&log)?;
        let started = Instant::now();
        let mut child = Command::new(lb)
            .args(["daemon", "--manifests"])
            .arg(manifests)
            .arg("--cgroup")
            .arg(&topo.cgroup.path)
            .args(["--pin-dir", &format!("/sys/fs/bpf/{}", topo.id)])
            // The node ports: TC on the node's client-side interface.
            .args(["--node-name", rules::NODE_NAME, "--devices", "to-client"])
            .arg("--netns")
            .arg(format!("/run/netns/{}", topo.node_ns))
            .args(["--health-addr", "off", "--metrics-addr", "off"])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting lb daemon")?;
        let deadline = started + Duration::from_secs(120);
        loop {
            if fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("controller: ready")
            {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "lb daemon exited ({status}):\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("lb daemon not ready after 120 s");
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(Self {
            child,
            log,
            ready_s: started.elapsed().as_secs_f64(),
        })
    }

    /// Waits until the packet-mode client pod's interface carries the packet path
    /// (until then its connections would be balanced by the socket hooks).
    fn wait_for_packet_mode(&self, lb: &Path, topo: &Topology) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(lb)
                .args(["list", "--pin-dir", &format!("/sys/fs/bpf/{}", topo.id)])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).contains("interface to-packet") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the packet-mode client pod was not given its packet path:\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash.
    fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM; the datapath stays (unless started with --detach-on-exit).
    fn stop_keeping(self) -> Result<()> {
        self.stop()
    }

    fn stop(mut self) -> Result<()> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("lb daemon exited with {status}:\n{}", self.log_text());
        }
        Ok(())
    }
}

/// Loads kube-proxy-style rules into the node namespace; returns the seconds it took.
fn iptables_restore(topo: &Topology, binary: &str, rules: &str) -> Result<f64> {
    let path = topo.work_dir.join("rules.txt");
    fs::write(&path, rules)?;
    let mut cmd = topo.node_command(binary)?;
    cmd.stdin(fs::File::open(&path)?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let output = cmd.spawn()?.wait_with_output()?;
    let elapsed = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "{binary} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(elapsed)
}

fn node_run(topo: &Topology, argv: &[&str]) -> Result<()> {
    let mut cmd = topo.node_command(argv[0])?;
    cmd.args(&argv[1..]);
    let output = lb_testbed::output_with_timeout(cmd, Duration::from_secs(60))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn iperf(topo: &Topology, mode: Mode, target: &str, seconds: u32) -> Result<f64> {
    iperf_at(topo, mode, target, IPERF_PORT, seconds)
}

fn iperf_at(topo: &Topology, mode: Mode, target: &str, port: u16, seconds: u32) -> Result<f64> {
    let mut cmd = topo.client_command(mode.cgroup(topo), Path::new("/usr/bin/iperf3"))?;
    cmd.args([
        "-c",
        target,
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    let output = lb_testbed::output_with_timeout(cmd, Duration::from_secs(seconds as u64 + 30))?;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).context("iperf3 JSON")?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .with_context(|| format!("iperf3 reported no throughput: {}", json["error"]))
}

/// iperf3 runs from the client, outside the balanced cgroup, to the node port.
fn node_port_iperf(topo: &Topology, plan: &Plan) -> Result<Vec<f64>> {
    (0..plan.iperf_runs)
        .map(|_| {
            iperf_at(
                topo,
                Mode::LbNodePort,
                &NODE_IP.to_string(),
                IPERF_NODE_PORT,
                plan.iperf_seconds,
            )
        })
        .collect()
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

pub struct Results {
    pub plan: Plan,
    pub connect: Vec<Row>,
    pub request: Vec<Row>,
    pub throughput: Option<Throughput>,
    pub setup: SetupTimes,
    pub control_plane: control_plane::ControlPlane,
    pub scale: Vec<scale::ScaleRow>,
    pub restarts: Option<scale::RestartRun>,
    pub kubernetes: Option<kube::KubeBench>,
    pub hook_cost: Option<hooks::HookCost>,
    /// iperf3 through a node port at the largest service count: mode -> runs (Gbit/s),
    /// with `direct` (to the pod through the node) as the limit.
    pub node_port_throughput: BTreeMap<Mode, Vec<f64>>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    crate::require_root("cargo xtask bench")?;
    crate::prereqs::ensure()?;
    let plan = Plan::for_args(&args);
    let started = Instant::now();
    eprintln!("==> building lb (release)");
    let lb = crate::build_lb(true)?;
    if args.kube_only {
        let work = std::env::temp_dir().join(format!(
            "{}{}kbench-work",
            lb_testbed::PREFIX,
            std::process::id()
        ));
        fs::create_dir_all(&work)?;
        let result = kube::run(&lb, &plan, &work);
        let _ = fs::remove_dir_all(&work);
        println!("{}", serde_json::to_string_pretty(&result?)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        crate::workspace_root().join(&args.out)
    };
    fs::create_dir_all(&out)?;

    eprintln!("==> building the benchmark network");
    let mut topo = Topology::new()?;
    topo.start_servers(&rules::haproxy_config(&SERVER_IPS))?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", topo.id));
    // Daemons restarted without --detach-on-exit leave their datapath pinned on purpose.
    let _cleanup = PinCleanup {
        lb: lb.clone(),
        pin_dir: pin_dir.clone(),
    };
    if args.restarts_only {
        let run = scale::restarts(&lb, &topo, &exe, &plan)?;
        println!("{}", serde_json::to_string_pretty(&run)?);
        return Ok(());
    }

    let largest = *plan.services.iter().max().context("no service counts")?;
    let points_per_n = plan.concurrency.len() as u64 * (plan.rounds as u64 * 4 + 2);
    let affinity_points = (plan.concurrency.len() * plan.rounds) as u64;
    let bar = progress(points_per_n * plan.services.len() as u64 + affinity_points + 2);
    let mut samples: BTreeMap<(Mode, usize, usize), Vec<Summary>> = BTreeMap::new();
    let mut request = Vec::new();
    let mut throughput = None;
    let mut setup = SetupTimes::default();
    let mut hook_cost = None;
    let mut node_port_throughput: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
    let bpf_stats = hooks::StatsEnabled::new()?;

    let result = (|| -> Result<()> {
        // Phase A: no iptables rules anywhere: direct, lb and the userspace proxy,
        // interleaved round by round.
        for &n in &plan.services {
            eprintln!("==> {n} services: direct, lb, userspace-proxy");
            bar.set_message(format!("{n} services: writing manifests, starting lb"));
            let dir = topo.work_dir.join(format!("manifests-{n}"));
            fs::create_dir_all(&dir)?;
            fs::write(
                dir.join("services.yaml"),
                rules::manifests(n, 3, &SERVER_IPS),
            )?;
            fs::write(dir.join("iperf.yaml"), rules::iperf_manifest(&SERVER_IPS))?;
            fs::write(
                dir.join("affinity.yaml"),
                rules::affinity_manifest(&SERVER_IPS),
            )?;
            fs::write(
                dir.join("nodeports.yaml"),
                rules::node_port_manifests(&rules::node_port_services(n, &SERVER_IPS)),
            )?;
            fs::write(
                dir.join("packet-pod.yaml"),
                rules::packet_pod_manifest(&topo.packet_cgroup, topology::PACKET_CLIENT_IP),
            )?;
            let daemon = Daemon::start(&lb, &topo, &dir, &n.to_string())?;
            setup.lb_ready_s.insert(n, daemon.ready_s);
            daemon.wait_for_packet_mode(&lb, &topo)?;
            let mut modes = vec![
                Mode::Direct,
                Mode::Lb,
                Mode::LbPacket,
                Mode::LbNodePort,
                Mode::UserspaceProxy,
            ];
            if n == largest {
                modes.insert(2, Mode::LbAffinity);
            }
            for &mode in &modes {
                // Warm-up, not recorded; a broken path shows the daemon's log.
                measure(&topo, &exe, mode, n, "crr", 200, 2)
                    .with_context(|| format!("lb daemon log:\n{}", daemon.log_text()))?;
            }
            let (mut plain_cost, mut affinity_cost) =
                (hooks::Cost::default(), hooks::Cost::default());
            for round in 0..plan.rounds {
                for &c in &plan.concurrency {
                    // Rotate the order each round: no mode always runs first.
                    for k in 0..modes.len() {
                        let mode = modes[(round + k) % modes.len()];
                        bar.set_message(format!(
                            "{n} services, round {}, {} x{c}",
                            round + 1,
                            mode.name()
                        ));
                        // connect4's run time, for the two modes it serves.
                        let cost = match mode {
                            Mode::Lb => Some(&mut plain_cost),
                            Mode::LbAffinity => Some(&mut affinity_cost),
                            _ => None,
                        };
                        let before = cost
                            .is_some()
                            .then(|| hooks::connect4(&pin_dir))
                            .transpose()?;
                        let s = measure(&topo, &exe, mode, n, "crr", plan.connections, c)?;
                        if let (Some(cost), Some(before)) = (cost, before) {
                            cost.add(before, hooks::connect4(&pin_dir)?);
                        }
                        samples.entry((mode, n, c)).or_default().push(s);
                        bar.inc(1);
                    }
                }
            }
            if n == largest {
                hook_cost = Some(hooks::HookCost {
                    services: n,
                    plain_ns_per_connect: plain_cost.ns_per_run(),
                    affinity_ns_per_connect: affinity_cost.ns_per_run(),
                    plain: plain_cost,
                    affinity: affinity_cost,
                });
                bar.set_message("request latency on established connections");
                for &mode in &modes {
                    let s = measure(&topo, &exe, mode, n, "rr", plan.round_trips, 1)?;
                    request.push(Row::new(mode, n, 1, &s));
                }
                bar.set_message("throughput (iperf3)");
                let (mut direct, mut balanced, mut packet) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..plan.iperf_runs {
                    direct.push(iperf(
                        &topo,
                        Mode::Direct,
                        &SERVER_IPS[0].to_string(),
                        plan.iperf_seconds,
                    )?);
                    balanced.push(iperf(
                        &topo,
                        Mode::Lb,
                        &IPERF_VIP.to_string(),
                        plan.iperf_seconds,
                    )?);
                    packet.push(iperf(
                        &topo,
                        Mode::LbPacket,
                        &IPERF_VIP.to_string(),
                        plan.iperf_seconds,
                    )?);
                }
                let median = |v: &mut Vec<f64>| {
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                let (d, l) = (median(&mut direct.clone()), median(&mut balanced.clone()));
                let p = median(&mut packet.clone());
                bar.set_message("throughput through a node port (iperf3)");
                node_port_throughput.insert(Mode::LbNodePort, node_port_iperf(&topo, &plan)?);
                node_port_throughput.insert(Mode::Direct, direct.clone());
                throughput = Some(Throughput {
                    direct_gbps: d,
                    lb_gbps: l,
                    lb_ratio: l / d,
                    direct_runs_gbps: direct,
                    lb_runs_gbps: balanced,
                    lb_packet_gbps: p,
                    lb_packet_ratio: p / d,
                    lb_packet_runs_gbps: packet,
                    seconds_per_run: plan.iperf_seconds,
                });
            }
            daemon.stop()?;
            bar.inc(plan.concurrency.len() as u64);
        }

        // Phases B and C: kube-proxy's rules on each iptables backend.
        for (mode, binary) in [
            (Mode::IptablesNft, "iptables-nft-restore"),
            (Mode::IptablesLegacy, "iptables-legacy-restore"),
        ] {
            for &n in &plan.services {
                eprintln!("==> {n} services: {}", mode.name());
                bar.set_message(format!("{n} services: {binary}"));
                let node_ports = rules::node_port_services(n, &SERVER_IPS);
                let secs = iptables_restore(
                    &topo,
                    binary,
                    &rules::iptables_rules(n, 3, &SERVER_IPS, &node_ports),
                )?;
                let both = [mode, mode.node_port().expect("an iptables mode")];
                match mode {
                    Mode::IptablesNft => setup.iptables_nft_restore_s.insert(n, secs),
                    _ => setup.iptables_legacy_restore_s.insert(n, secs),
                };
                for m in both {
                    measure(&topo, &exe, m, n, "crr", 200, 2)?;
                }
                for round in 0..plan.rounds {
                    for &c in &plan.concurrency {
                        for k in 0..both.len() {
                            let m = both[(round + k) % both.len()];
                            bar.set_message(format!(
                                "{n} services, round {}, {} x{c}",
                                round + 1,
                                m.name()
                            ));
                            let s = measure(&topo, &exe, m, n, "crr", plan.connections, c)?;
                            samples.entry((m, n, c)).or_default().push(s);
                        }
                    }
                }
                if n == largest {
                    let s = measure(&topo, &exe, mode, n, "rr", plan.round_trips, 1)?;
                    request.push(Row::new(mode, n, 1, &s));
                    bar.set_message(format!("{}: throughput through a node port", mode.name()));
                    node_port_throughput.insert(both[1], node_port_iperf(&topo, &plan)?);
                }
                bar.inc(plan.concurrency.len() as u64);
            }
            if mode == Mode::IptablesNft {
                // Remove the table so conntrack and the hooks are gone for what follows.
                node_run(&topo, &["nft", "delete", "table", "ip", "nat"])?;
            }
        }
        bar.inc(1);
        Ok(())
    })();
    bar.finish_and_clear();
    drop(bpf_stats);
    result?;

    eprintln!(
        "==> control plane: {} services, {} endpoints",
        plan.cp_services,
        plan.cp_services * plan.cp_endpoints
    );
    let restarts = if plan.restarts > 0 {
        eprintln!("==> {} restarts under load", plan.restarts);
        Some(scale::restarts(&lb, &topo, &exe, &plan)?)
    } else {
        None
    };
    let control_plane = control_plane::run(&lb, &mut topo, &pin_dir, &plan)?;
    let scale = scale::scale(&lb, &topo, &plan)?;
    let kubernetes = if plan.kube_services > 0 {
        eprintln!(
            "==> Kubernetes source: {} services, {} endpoints in a real API server",
            plan.kube_services,
            plan.kube_services * plan.kube_endpoints
        );
        Some(kube::run(&lb, &plan, &topo.work_dir)?)
    } else {
        None
    };

    let connect: Vec<Row> = samples
        .iter()
        .map(|((mode, n, c), parts)| Row::new(*mode, *n, *c, &Summary::merge(parts)))
        .collect();
    drop(topo);
    let results = Results {
        plan,
        connect,
        request,
        throughput,
        setup,
        control_plane,
        scale,
        restarts,
        kubernetes,
        hook_cost,
        node_port_throughput,
    };
    report::write(
        &results,
        &out,
        args.publish.then(crate::workspace_root).as_deref(),
        started.elapsed(),
    )?;
    if args.smoke {
        report::check_smoke(&out)?;
    }
    Ok(())
}

/// Reads a daemon log line's `key=value` number.
pub fn log_number(log: &str, line_marker: &str, key: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(line_marker))?;
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..].split_whitespace().next()?.parse().ok()
}

/// Peak and current resident memory of a process, in MB.
pub fn memory_mb(pid: u32) -> Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<f64> {
        let line = BufReader::new(status.as_bytes())
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with(name))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
            .map(|kb| kb / 1024.0)
    };
    Ok((
        field("VmHWM:").unwrap_or(f64::NAN),
        field("VmRSS:").unwrap_or(f64::NAN),
    ))
}
