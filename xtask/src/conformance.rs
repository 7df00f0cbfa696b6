//! `cargo xtask conformance`: upstream's own Service e2e suite (`e2e.test` v1.36.2 from
//! `../shared/k8s/`) against two real nodes (lb_testbed::realnode) with `lb` deployed
//! from `deploy/` as the service proxy, or with upstream's kube-proxy in its place, so
//! the two can be compared spec by spec.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_testbed::{
    cluster_dns::{ClusterDnsFeed, reload_dnsmasq},
    image::{Image, lb_image},
    k8s::{ControlPlane, extra_binary},
    realnode::{self, NodeOptions, PodDns, RealNode},
    world::World,
};

use crate::{build_lb, prereqs, require_root, workspace_root};

/// The image tag upstream's suite runs (test/utils/image/manifest.go of v1.36.2).
const AGNHOST_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.63.0";
/// ... and of its busybox image.
const BUSYBOX_IMAGE: &str = "registry.k8s.io/e2e-test-images/busybox:1.37.0-1";
/// What runs: the Service specs (focus) minus what cannot run here (conformance/skip.txt).
/// upstream's groups of the service proxy's specs, as the real-node issue lists them.
const DEFAULT_FOCUS: &str = r"\[sig-network\] (Services|Networking Granular Checks: Services|Conntrack|Traffic Distribution|Topology Hints) ";
/// How the names of the specs of those groups start (what the reports count).
const PROXY_SPECS: [&str; 5] = [
    "[sig-network] Services ",
    "[sig-network] Networking Granular Checks: Services ",
    "[sig-network] Conntrack ",
    "[sig-network] Traffic Distribution ",
    "[sig-network] Topology Hints ",
];
/// How the names of the Service specs (conformance/ci.txt's) start.
const SERVICE_SPECS: &str = PROXY_SPECS[0];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proxy {
    /// `lb`, deployed with deploy/rbac.yaml and deploy/daemonset.yaml.
    Lb,
    /// Upstream's kube-proxy v1.36.2 in nftables mode, on each node's network.
    KubeProxyNftables,
    /// Upstream's kube-proxy v1.36.2 in iptables mode, on each node's network.
    KubeProxyIptables,
}

#[derive(clap::Args)]
pub struct ConformanceArgs {
    /// The service proxy under test.
    #[arg(long, value_enum, default_value = "lb")]
    proxy: Proxy,
    /// Ginkgo focus (a regular expression over spec names).
    #[arg(long, default_value = DEFAULT_FOCUS)]
    focus: String,
    /// Where the JUnit report and the summary go.
    #[arg(long, value_name = "DIR", default_value = "target/conformance")]
    out: PathBuf,
    /// Real nodes in the cluster (upstream skips a spec that needs more than there are).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4))]
    nodes: u8,
    /// The subset `cargo xtask test` runs (conformance/ci.txt) in place of `--focus`.
    #[arg(long, conflicts_with = "focus")]
    ci: bool,
    /// lb's `--default-workload-mode` for the whole run (`packet`: every test pod's
    /// Service traffic goes through the packet path). Without it, `--ci` runs
    /// conformance/ci-packet.txt again in packet mode after the subset.
    #[arg(long, value_name = "MODE")]
    workload_mode: Option<String>,
}

impl ConformanceArgs {
    /// The subset of `cargo xtask test`, with lb.
    pub fn ci() -> Self {
        Self {
            proxy: Proxy::Lb,
            focus: DEFAULT_FOCUS.to_string(),
            out: PathBuf::from("target/conformance-ci"),
            nodes: 2,
            ci: true,
            workload_mode: None,
        }
    }
}

/// Upstream specs `cargo xtask test` runs again with every test pod in packet mode.
const PACKET_SPECS: &str = "conformance/ci-packet.txt";

/// The CI subset: the spec names conformance/ci.txt lists.
fn ci_specs() -> Result<Vec<String>> {
    spec_list("conformance/ci.txt")
}

/// The spec names a list of conformance/ names.
fn spec_list(file: &str) -> Result<Vec<String>> {
    let names: Vec<String> = annotated_list(file)?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    if names.is_empty() {
        bail!("{file} lists no spec");
    }
    Ok(names)
}

/// Checks that `focus` matches exactly `wanted` specs (a typo in a list would drop one).
fn check_focus(e2e: &Path, focus: &str, wanted: usize, file: &str) -> Result<()> {
    let dry = Command::new(e2e)
        .args([
            &format!("--ginkgo.focus={focus}"),
            "--ginkgo.dry-run",
            "--ginkgo.no-color",
        ])
        .output()
        .context("e2e.test --ginkgo.dry-run")?;
    let text = String::from_utf8_lossy(&dry.stdout);
    let matched = text
        .lines()
        .find_map(|l| l.strip_prefix("Will run "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok());
    if matched != Some(wanted) {
        bail!(
            "{file} names {wanted} specs; e2e.test matches {matched:?} (a name that is not \
             upstream's, or one that matches several)"
        );
    }
    Ok(())
}

/// A focus on exactly the Service specs `names`.
fn focus_on(names: &[String]) -> String {
    let escaped: Vec<String> = names.iter().map(|n| regex_escape(n)).collect();
    format!(r"\[sig-network\] Services ({})", escaped.join("|"))
}

/// `text` matched literally by a Go regular expression.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The committed skip list: `regex  # reason` per line.
fn skip_list() -> Result<Vec<(String, String)>> {
    annotated_list("conformance/skip.txt")
}

/// A committed list of `entry  # why` lines (blank lines and `#` comments aside):
/// every entry must say why it is there.
fn annotated_list(file: &str) -> Result<Vec<(String, String)>> {
    let path = workspace_root().join(file);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(" # ") {
            Some((entry, why)) if !why.trim().is_empty() => {
                out.push((entry.trim().to_string(), why.trim().to_string()));
            }
            _ => bail!("{}: every entry needs a reason: {line:?}", path.display()),
        }
    }
    Ok(out)
}

/// upstream's busybox test image (the Conntrack specs' clients and servers): Debian's
/// static busybox, an applet at every path.
fn busybox_image() -> Result<Image> {
    let mut image = Image::new(BUSYBOX_IMAGE);
    image.add_busybox(&[])?;
    for dir in ["/tmp", "/var/tmp"] {
        image.add_dir(dir, 0o1777);
    }
    for dir in ["/proc", "/sys", "/dev", "/etc", "/root", "/home"] {
        image.add_dir(dir, 0o755);
    }
    image.add_bytes("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
    image.add_bytes("/etc/group", "root:x:0:\n", 0o644);
    image.cmd = vec!["sh".into()];
    Ok(image)
}

/// upstream's agnhost with the tools the suite execs in pods: busybox's applets,
/// curl, OpenBSD nc (busybox's rejects `-v -t`), GNU wget, and dash as /bin/sh so
/// that busybox does not shadow them.
fn agnhost_image(work: &Path) -> Result<Image> {
    let agnhost = extra_binary("agnhost")?;
    let mut image = Image::new(AGNHOST_IMAGE);
    image.add_program(&agnhost, "/agnhost")?;
    image.entrypoint = vec!["/agnhost".into()];
    for dir in ["/tmp", "/var/tmp"] {
        image.add_dir(dir, 0o1777);
    }
    for dir in ["/proc", "/sys", "/dev", "/etc", "/root", "/home"] {
        image.add_dir(dir, 0o755);
    }
    image.add_busybox(&["/bin/sh", "/bin/nc", "/usr/bin/nc", "/usr/bin/wget"])?;
    image.add_program(Path::new("/usr/bin/curl"), "/usr/bin/curl")?;
    image.add_program(Path::new("/usr/bin/wget"), "/usr/bin/wget")?;
    image.add_program(Path::new("/bin/dash"), "/bin/sh")?;
    // OpenBSD nc from Debian's package, unpacked (not installed: the host's `nc`
    // stays as it is).
    let nc = work.join("netcat-openbsd/bin/nc.openbsd");
    if !nc.exists() {
        fs::create_dir_all(work)?;
        let status = Command::new("sh")
            .current_dir(work)
            .arg("-c")
            .arg("apt-get download netcat-openbsd && dpkg-deb -x netcat-openbsd_*.deb netcat-openbsd && rm -f netcat-openbsd_*.deb")
            .status()?;
        if !status.success() || !nc.exists() {
            bail!("could not unpack netcat-openbsd");
        }
    }
    image.add_program(&nc, "/usr/bin/nc")?;
    image.add_symlink("/bin/nc", "/usr/bin/nc");
    image.add_bytes(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        0o644,
    );
    image.add_bytes("/etc/group", "root:x:0:\nnobody:x:65534:\n", 0o644);
    Ok(image)
}

/// kube-proxy processes, one per node, stopped on drop.
struct KubeProxies(Vec<Child>);

impl Drop for KubeProxies {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_kube_proxies(nodes: &[RealNode], mode: &str, out: &Path) -> Result<KubeProxies> {
    let binary = extra_binary("kube-proxy")?;
    let mut children = Vec::new();
    for node in nodes {
        let log = fs::File::create(out.join(format!("kube-proxy-{}.log", node.name)))?;
        let mut cmd = lb_testbed::netns_command(&node.netns, None, &binary.display().to_string())?;
        cmd.args([
            &format!("--kubeconfig={}", node.dir.join("kubeconfig").display()),
            &format!("--hostname-override={}", node.name),
            &format!("--proxy-mode={mode}"),
            "--cluster-cidr=10.244.0.0/16",
            // nf_conntrack_max belongs to the machine (read-only in a node's network
            // namespace): leave it as it is.
            "--conntrack-max-per-core=0",
            "--v=1",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        // Pods share their node's bridge: a reply from a backend on the client's own
        // node is bridged, and only reaches the NAT's conntrack with br_netfilter on,
        // as kubeadm requires of every node (per network namespace since Linux 5.3).
        for family in ["iptables", "ip6tables"] {
            let status = Command::new("ip")
                .args(["netns", "exec", &node.netns, "sysctl", "-qw"])
                .arg(format!("net.bridge.bridge-nf-call-{family}=1"))
                .status()?;
            if !status.success() {
                bail!("cannot turn on net.bridge.bridge-nf-call-{family} (modprobe br_netfilter)");
            }
        }
        children.push(cmd.spawn().context("starting kube-proxy")?);
    }
    let mut proxies = KubeProxies(children);
    // Fail now, not after 20 minutes of failing specs, if kube-proxy cannot run here.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (node, child) in nodes.iter().zip(&mut proxies.0) {
        let log = out.join(format!("kube-proxy-{}.log", node.name));
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "kube-proxy on {} exited ({status}); see {}",
                    node.name,
                    log.display()
                );
            }
            if healthz_ok(SocketAddr::from((node.ipv4, 10256))) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-proxy on {} is not healthy after 60 s; see {}",
                    node.name,
                    log.display()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
    Ok(proxies)
}

/// Whether `addr` answers `GET /healthz` with 200.
fn healthz_ok(addr: SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// The Service specs of a JUnit report: name (without `[It] `), outcome, seconds.
/// e2e.test reports every spec it has (7 900), those outside the focus as skipped.
fn specs(junit: &str) -> Vec<(String, Outcome, f64)> {
    let attribute = |case: &str, name: &str| {
        case.split(&format!(" {name}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    let mut out = Vec::new();
    for case in junit.split("<testcase").skip(1) {
        let name = attribute(case, "name")
            .replace("&#39;", "'")
            .replace("&quot;", "\"")
            .replace("&amp;", "&");
        // Suite setup and reports are testcases too; only specs count.
        let Some(name) = name
            .strip_prefix("[It] ")
            .filter(|n| PROXY_SPECS.iter().any(|group| n.starts_with(group)))
        else {
            continue;
        };
        let body = case.split("</testcase>").next().unwrap_or(case);
        let status = attribute(case, "status");
        let outcome = if status == "skipped" || body.contains("<skipped") {
            Outcome::Skipped
        } else if status == "failed" || body.contains("<failure") || body.contains("<error") {
            Outcome::Failed
        } else {
            Outcome::Passed
        };
        let seconds = attribute(case, "time").parse().unwrap_or(0.0);
        out.push((name.to_string(), outcome, seconds));
    }
    out
}

/// Counts of a JUnit report: (passed, failed, skipped), and the failed specs' names.
fn summarize(junit: &str, only: &[String]) -> (usize, usize, usize, Vec<String>) {
    let mut specs = specs(junit);
    if !only.is_empty() {
        specs.retain(|(name, ..)| {
            name.strip_prefix(SERVICE_SPECS)
                .is_some_and(|rest| only.iter().any(|o| rest == o))
        });
    }
    let count = |o: Outcome| specs.iter().filter(|s| s.1 == o).count();
    let failures = specs
        .iter()
        .filter(|s| s.1 == Outcome::Failed)
        .map(|s| s.0.clone())
        .collect();
    (
        count(Outcome::Passed),
        count(Outcome::Failed),
        count(Outcome::Skipped),
        failures,
    )
}

/// The report directories of the proxies, in table order, with their column titles.
const COLUMNS: [(&str, &str); 3] = [
    ("lb", "lb"),
    ("kubeproxynftables", "kube-proxy nftables"),
    ("kubeproxyiptables", "kube-proxy iptables"),
];

/// The JUnit report e2e.test wrote in `dir`, if any.
fn junit_report(dir: &Path) -> Result<Option<String>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    Ok(entries
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("junit"))
        .map(|e| fs::read_to_string(e.path()))
        .transpose()?)
}

/// A markdown table of every spec that ran (or was skipped) under any proxy with a
/// report in `out`, one column per proxy, with each column's totals.
fn results_table(out: &Path) -> Result<String> {
    let mut by_spec: BTreeMap<String, BTreeMap<usize, (Outcome, f64)>> = BTreeMap::new();
    let mut present = Vec::new();
    for (column, (dir, _)) in COLUMNS.iter().enumerate() {
        let Some(junit) = junit_report(&out.join(dir))? else {
            continue;
        };
        present.push(column);
        for (name, outcome, seconds) in specs(&junit) {
            by_spec
                .entry(name)
                .or_default()
                .insert(column, (outcome, seconds));
        }
    }
    let mut table = String::from("| spec |");
    for &column in &present {
        table.push_str(&format!(" {} |", COLUMNS[column].1));
    }
    table.push_str("\n|---|");
    table.push_str(&"---|".repeat(present.len()));
    table.push('\n');
    let mut totals = vec![[0usize; 3]; COLUMNS.len()];
    for (name, results) in &by_spec {
        table.push_str(&format!("| {} |", name.replace('|', "\\|")));
        for &column in &present {
            match results.get(&column) {
                Some((outcome, seconds)) => {
                    totals[column][*outcome as usize] += 1;
                    if *outcome == Outcome::Skipped {
                        table.push_str(" skipped |");
                    } else {
                        table.push_str(&format!(" {} ({seconds:.0} s) |", outcome.word()));
                    }
                }
                None => table.push_str(" not run |"),
            }
        }
        table.push('\n');
    }
    table.push_str("| **total** (passed / failed / skipped) |");
    for &column in &present {
        let [passed, failed, skipped] = totals[column];
        table.push_str(&format!(" {passed} / {failed} / {skipped} |"));
    }
    table.push('\n');
    Ok(table)
}

pub fn run(args: ConformanceArgs) -> Result<()> {
    require_root("cargo xtask conformance")?;
    prereqs::ensure()?;
    if let Some(why) = realnode::unavailable() {
        bail!(why);
    }
    let out = if args.out.is_relative() {
        workspace_root().join(&args.out)
    } else {
        args.out.clone()
    };
    fs::create_dir_all(&out)?;
    let skips = skip_list()?;
    let e2e = extra_binary("e2e.test")?;
    let kubectl = lb_testbed::k8s::binaries()?
        .context("no Kubernetes binaries")?
        .join("kubectl");

    let ci_specs = if args.ci { ci_specs()? } else { Vec::new() };
    let focus = if args.ci {
        focus_on(&ci_specs)
    } else {
        args.focus.clone()
    };
    // Each entry must name exactly one upstream spec (a typo would drop it); checked
    // before any image or node is built.
    if args.ci {
        check_focus(&e2e, &focus, ci_specs.len(), "conformance/ci.txt")?;
    }
    let packet_subset = args.ci && args.proxy == Proxy::Lb && args.workload_mode.is_none();
    let packet_specs = if packet_subset {
        let specs = spec_list(PACKET_SPECS)?;
        check_focus(&e2e, &focus_on(&specs), specs.len(), PACKET_SPECS)?;
        specs
    } else {
        Vec::new()
    };
    let lb_args: Vec<String> = args
        .workload_mode
        .iter()
        .map(|m| format!("--default-workload-mode={m}"))
        .collect();

    eprintln!("==> images");
    let images_dir = out.join("images");
    fs::create_dir_all(&images_dir)?;
    let (shipped, lb_name) = realnode::shipped_daemonset()?;
    let lb = build_lb(true)?;
    lb_image(&lb, &lb_name)?.write_docker_archive(&images_dir.join("lb.tar"))?;
    realnode::pause_image(&images_dir.join("pause.tar"))?;
    agnhost_image(&images_dir.join("work"))?
        .write_docker_archive(&images_dir.join("agnhost.tar"))?;
    busybox_image()?.write_docker_archive(&images_dir.join("busybox.tar"))?;
    let images: Vec<PathBuf> = ["lb.tar", "pause.tar", "agnhost.tar", "busybox.tar"]
        .iter()
        .map(|n| images_dir.join(n))
        .collect();

    eprintln!("==> control plane and {} real nodes", args.nodes);
    let cp = ControlPlane::start_for_real_nodes()?;
    let names: Vec<String> = (1..=args.nodes).map(|i| format!("node{i}")).collect();
    let world = World::new(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
    let node_options = NodeOptions {
        dns: PodDns::NodeLocal,
        ..NodeOptions::default()
    };
    // A zone per node, as the topology specs want (at least three for Traffic
    // Distribution: `--nodes 3`).
    let nodes = world
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let options = NodeOptions {
                zone: Some(format!("zone-{}", i + 1)),
                ..node_options.clone()
            };
            RealNode::start_with(&cp, n, &images, &options)
        })
        .collect::<Result<Vec<_>>>()?;
    let (files, pids): (Vec<PathBuf>, Vec<u32>) =
        nodes.iter().filter_map(RealNode::dns_records).unzip();
    let dns = ClusterDnsFeed::start(&cp, files, move || {
        reload_dnsmasq(pids.iter().map(|&pid| pid as i32))
    })?;

    let _kube_proxies = match args.proxy {
        Proxy::Lb => {
            eprintln!("==> lb from deploy/");
            let lb_args: Vec<&str> = lb_args.iter().map(String::as_str).collect();
            realnode::deploy_lb_with(&cp, &shipped, &lb_args)?;
            realnode::wait_lb_ready(&cp, nodes.len(), Duration::from_secs(120))?;
            None
        }
        Proxy::KubeProxyNftables => Some(start_kube_proxies(&nodes, "nftables", &out)?),
        Proxy::KubeProxyIptables => Some(start_kube_proxies(&nodes, "iptables", &out)?),
    };

    let skip = skips
        .iter()
        .map(|(p, _)| p.as_str())
        .collect::<Vec<_>>()
        .join("|");
    let suite = Suite {
        e2e: &e2e,
        kubectl: &kubectl,
        cp: &cp,
        skip: &skip,
    };
    let mut name = format!("{:?}", args.proxy).to_lowercase();
    if let Some(mode) = &args.workload_mode {
        name.push_str(&format!("-{mode}"));
    }
    let report_dir = out.join(&name);
    let mut failed = suite.run(&focus, &report_dir, &ci_specs, &name)?;
    fs::write(out.join("table.md"), results_table(&out)?)?;
    if !packet_specs.is_empty() {
        eprintln!("==> lb again, every test pod in packet mode ({PACKET_SPECS})");
        let before = packet_translations(&cp)?;
        realnode::deploy_lb_with(&cp, &shipped, &["--default-workload-mode=packet"])?;
        realnode::wait_lb_rolled_out(&cp, Duration::from_secs(120))?;
        realnode::wait_lb_ready(&cp, nodes.len(), Duration::from_secs(120))?;
        let packet_dir = out.join("lb-packet");
        failed += suite.run(
            &focus_on(&packet_specs),
            &packet_dir,
            &packet_specs,
            "lb-packet",
        )?;
        // The specs pass through either path: make sure it was the packet path.
        let flows = packet_translations(&cp)?.saturating_sub(before);
        println!("lb-packet: the packet path translated {flows} new flows of pods");
        if flows == 0 {
            bail!("the packet-mode run passed without the packet path translating anything");
        }
    }
    let reasons: BTreeMap<&str, &str> = skips
        .iter()
        .map(|(p, r)| (p.as_str(), r.as_str()))
        .collect();
    eprintln!("skipped by conformance/skip.txt: {reasons:#?}");
    drop(dns);
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    drop(nodes);
    realnode::remove_lb_pins(&lb, &names);
    drop(world);
    drop(cp);
    if failed > 0 {
        bail!("{failed} upstream specs failed (see {})", out.display());
    }
    Ok(())
}

/// How e2e.test runs against the cluster.
struct Suite<'a> {
    e2e: &'a Path,
    kubectl: &'a Path,
    cp: &'a ControlPlane,
    skip: &'a str,
}

impl Suite<'_> {
    /// Runs the specs `focus` matches, reports into `report_dir` (summary.txt, named
    /// `name`) and prints the summary; returns how many failed (of `only`, if given).
    fn run(&self, focus: &str, report_dir: &Path, only: &[String], name: &str) -> Result<usize> {
        eprintln!("==> e2e.test --ginkgo.focus={focus:?}");
        let _ = fs::remove_dir_all(report_dir);
        fs::create_dir_all(report_dir)?;
        let started = Instant::now();
        let status = Command::new(self.e2e)
            .args([
                &format!("--kubeconfig={}", self.cp.kubeconfig.display()),
                "--provider=local",
                &format!("--kubectl-path={}", self.kubectl.display()),
                &format!("--report-dir={}", report_dir.display()),
                &format!("--ginkgo.focus={focus}"),
                &format!("--ginkgo.skip={}", self.skip),
                "--ginkgo.no-color",
                "--ginkgo.timeout=2h",
                "--allowed-not-ready-nodes=0",
            ])
            .stdout(fs::File::create(report_dir.join("e2e.log"))?)
            .stderr(Stdio::inherit())
            .status()
            .context("running e2e.test")?;
        let elapsed = started.elapsed();
        let junit = junit_report(report_dir)?.context("e2e.test wrote no JUnit report")?;
        let (passed, failed, skipped, failures) = summarize(&junit, only);
        let mut summary = format!(
            "{name}: {passed} passed, {failed} failed, {skipped} skipped in {:.0} s (e2e.test exit {status})\n",
            elapsed.as_secs_f64()
        );
        for name in &failures {
            summary.push_str(&format!("  FAILED {name}\n"));
        }
        fs::write(report_dir.join("summary.txt"), &summary)?;
        println!("{summary}");
        Ok(failed)
    }
}

/// New flows the lb pods' TC programs translated so far (`tc_translated` summed over
/// the nodes, from `lb list` in each lb pod). The packet-mode specs use no node port,
/// so what this adds during them is pods' flows.
fn packet_translations(cp: &ControlPlane) -> Result<u64> {
    let mut total = 0;
    for (pod, node) in realnode::ready_pods(cp, "kube-system", "app.kubernetes.io/name=lb") {
        let list = cp.kubectl(&[
            "-n",
            "kube-system",
            "exec",
            &pod,
            "--",
            "/usr/local/bin/lb",
            "list",
            &format!("--pin-dir={}", realnode::lb_pin_dir(&node)),
        ])?;
        total += list
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tc_translated="))
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("no tc_translated counter in lb list of {pod}:\n{list}"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_reports_are_counted() {
        let junit = r#"<testsuites><testsuite>
<testcase name="[SynchronizedBeforeSuite]" status="passed"></testcase>
<testcase name="[It] [sig-network] Services a" status="passed"></testcase>
<testcase name="[It] [sig-network] Services b" status="failed"><failure>x</failure></testcase>
<testcase name="[It] [sig-network] Services c" status="skipped"><skipped message="s"></skipped></testcase>
<testcase name="[It] [sig-apps] Deployment d" status="skipped"><skipped message="skipped"></skipped></testcase>
<testcase name="[It] [sig-network] Conntrack e" status="passed"></testcase>
</testsuite></testsuites>"#;
        let (passed, failed, skipped, failures) = summarize(junit, &[]);
        assert_eq!((passed, failed, skipped), (2, 1, 1));
        assert_eq!(failures, ["[sig-network] Services b"]);
        let only = ["a".to_string(), "c".to_string()];
        assert_eq!(summarize(junit, &only), (1, 0, 1, vec![]));
    }

    #[test]
    fn results_of_several_proxies_make_one_table() {
        let out = std::env::temp_dir().join(format!("lbt-conformance-{}", std::process::id()));
        let case = |name: &str, status: &str, time: f64| {
            format!(r#"<testcase name="[It] {name}" status="{status}" time="{time}"></testcase>"#)
        };
        for (dir, cases) in [
            (
                "lb",
                [
                    case("[sig-network] Services a", "passed", 3.2),
                    case("[sig-network] Services b", "failed", 40.0),
                ],
            ),
            (
                "kubeproxyiptables",
                [
                    case("[sig-network] Services a", "passed", 2.9),
                    case("[sig-network] Services c", "skipped", 0.0),
                ],
            ),
        ] {
            fs::create_dir_all(out.join(dir)).unwrap();
            let junit = format!(
                "<testsuites><testsuite>{}</testsuite></testsuites>",
                cases.join("\n")
            );
            fs::write(out.join(dir).join("junit_01.xml"), junit).unwrap();
        }
        let table = results_table(&out).unwrap();
        fs::remove_dir_all(&out).unwrap();
        assert_eq!(
            table,
            "| spec | lb | kube-proxy iptables |\n\
             |---|---|---|\n\
             | [sig-network] Services a | passed (3 s) | passed (3 s) |\n\
             | [sig-network] Services b | failed (40 s) | not run |\n\
             | [sig-network] Services c | not run | skipped |\n\
             | **total** (passed / failed / skipped) | 1 / 1 / 0 | 1 / 0 / 1 |\n"
        );
    }

    #[test]
    fn the_ci_subset_becomes_an_escaped_focus() {
        let focus = focus_on(&ci_specs().unwrap());
        assert!(focus.contains(r"should serve a basic endpoint from pods \[Conformance\]"));
        assert_eq!(regex_escape("a (b) [c]"), r"a \(b\) \[c\]");
    }

    /// docs/conformance.md's map names tests of the e2e suite (`module::function`):
    /// each must be a trial of lb-userspace/tests/e2e/<module>.rs, so the map cannot
    /// name a test that was renamed or removed.
    #[test]
    fn the_conformance_map_names_real_e2e_tests() {
        let doc = fs::read_to_string(workspace_root().join("docs/conformance.md")).unwrap();
        let (_, map) = doc
            .split_once("\n## Conformance map")
            .expect("docs/conformance.md has a \"## Conformance map\" section");
        let mut named = 0;
        for line in map.lines().filter(|l| l.starts_with("| ")) {
            let Some(here) = line.split(" | ").nth(1) else {
                continue;
            };
            for name in here.split('`').skip(1).step_by(2) {
                let Some((module, _)) = name.split_once("::") else {
                    continue;
                };
                let path = format!("lb-userspace/tests/e2e/{module}.rs");
                let source = fs::read_to_string(workspace_root().join(&path)).unwrap_or_default();
                assert!(
                    source.contains(&format!("\"{name}\"")),
                    "docs/conformance.md names {name}, which is no trial of {path}"
                );
                named += 1;
            }
        }
        assert!(named >= 40, "the map names only {named} tests");
    }

    /// Each group's summary line ("covered 21, partly 11, ...") counts its rows.
    #[test]
    fn the_conformance_map_summaries_count_their_rows() {
        let doc = fs::read_to_string(workspace_root().join("docs/conformance.md")).unwrap();
        let (_, map) = doc.split_once("\n## Conformance map").unwrap();
        for group in map.split("\n## ").skip(1) {
            let title = group.lines().next().unwrap_or_default();
            let Some(summary) = group.lines().find(|l| {
                [
                    "covered ",
                    "partly ",
                    "not covered ",
                    "API only ",
                    "unsupported ",
                ]
                .iter()
                .any(|kind| l.starts_with(kind))
            }) else {
                panic!("map group {title} has no summary line");
            };
            let mut counted = std::collections::BTreeMap::<String, usize>::new();
            for row in group
                .lines()
                .filter(|l| l.starts_with("| ") && !l.starts_with("| upstream spec"))
            {
                let note = row.rsplit(" | ").next().unwrap_or_default();
                let kind = if note.starts_with("**covered**") {
                    "covered"
                } else if note.starts_with("**partly**") {
                    "partly"
                } else if note.starts_with("**not covered**") {
                    "not covered"
                } else if note.starts_with("API only") {
                    "API only"
                } else if note.starts_with("unsupported") {
                    "unsupported"
                } else {
                    panic!("map row of {title} has no kind: {row}");
                };
                *counted.entry(kind.to_string()).or_default() += 1;
            }
            let summarized: std::collections::BTreeMap<String, usize> = summary
                .split(", ")
                .map(|part| {
                    let (kind, n) = part.rsplit_once(' ').unwrap();
                    (kind.to_string(), n.parse().unwrap())
                })
                .collect();
            assert_eq!(summarized, counted, "the summary of map group {title}");
        }
    }

    #[test]
    fn every_skip_has_a_reason() {
        let skips = skip_list().unwrap();
        assert!(!skips.is_empty());
        assert!(skips.iter().all(|(p, r)| !p.is_empty() && !r.is_empty()));
    }
}
