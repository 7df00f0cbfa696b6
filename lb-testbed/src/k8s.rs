//! A real Kubernetes control plane for tests: etcd, kube-apiserver, the
//! controller-manager (every controller but node lifecycle) and the scheduler, on
//! loopback ports of their own, with token authentication and RBAC. Only the kubelet
//! is simulated ([`crate::kubelet`]).
//!
//! Binaries come from `$KUBEBUILDER_ASSETS` (envtest's convention) or from
//! `../shared/k8s` (xz-compressed; unpacked once into `target/k8s/` and checked
//! against the checksums its README lists).

use std::{
    fs,
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::PREFIX;

/// Token of the admin user (system:masters) in the static token file.
pub const ADMIN_TOKEN: &str = "lb-test-admin-token";
/// Service ClusterIP range the API server allocates from (blackholed in every pod).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The IPv6 service range of the simulated-node control plane (dual-stack: IPv4 first,
/// so Services stay IPv4 unless they ask), inside the range every pod blackholes.
pub const SERVICE_CIDR_V6: &str = "fd00:96::/108";
pub const NODE_PORT_RANGE: &str = "30000-32767";
/// Namespace annotation that makes every pod of the namespace select nodes by label
/// (the PodNodeSelector admission plugin); tests use it to keep verbatim manifests on
/// their own simulated nodes.
pub const NODE_SELECTOR_ANNOTATION: &str = "scheduler.alpha.kubernetes.io/node-selector";
/// Node label naming the world (test) a simulated node belongs to.
pub const WORLD_LABEL: &str = "lb.test/world";

const BINARIES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
];

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-testbed lives in the workspace")
        .to_path_buf()
}

/// Where the shared, compressed binaries are.
pub fn shared_dir() -> PathBuf {
    workspace_root().join("../shared/k8s")
}

/// The directory holding the control-plane binaries, unpacking them if needed, or
/// `None` when neither `$KUBEBUILDER_ASSETS` nor `../shared/k8s` has them.
pub fn binaries() -> Result<Option<PathBuf>> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from)
        && dir.join("kube-apiserver").exists()
    {
        return Ok(Some(dir));
    }
    let shared = shared_dir();
    if !shared.join("kube-apiserver.xz").exists() {
        return Ok(None);
    }
    let target = workspace_root().join("target/k8s");
    let stamp = target.join(".verified");
    if stamp.exists() {
        return Ok(Some(target));
    }
    fs::create_dir_all(&target)?;
    for name in BINARIES {
        unpack(&shared, &target, name)?;
    }
    fs::write(&stamp, "")?;
    Ok(Some(target))
}

/// Unpacks `<shared>/<name>.xz` into `target` and checks it against the checksum the
/// shared README lists for it.
fn unpack(shared: &Path, target: &Path, name: &str) -> Result<PathBuf> {
    let readme = fs::read_to_string(shared.join("README.md")).unwrap_or_default();
    let out = target.join(name);
    let unpacked = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xz -dc '{}' > '{}.tmp' && chmod +x '{}.tmp' && mv '{}.tmp' '{}'",
            shared.join(format!("{name}.xz")).display(),
            out.display(),
            out.display(),
            out.display(),
            out.display()
        ))
        .status()
        .context("running xz (apt-get install xz-utils)")?;
    if !unpacked.success() {
        bail!("unpacking {name} from {} failed", shared.display());
    }
    // The README lists "<sha256>  <name>"; a binary it lists must match.
    if let Some(expected) = readme.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        let sum = parts.next()?;
        (parts.next() == Some(name) && sum.len() == 64).then(|| sum.to_string())
    }) {
        let got = crate::run("sha256sum", &[&out.to_string_lossy()])?;
        if !got.starts_with(&expected) {
            let _ = fs::remove_file(&out);
            bail!(
                "{name} unpacked from {} does not match its README checksum",
                shared.display()
            );
        }
    }
    Ok(out)
}

/// Another binary of the shared set (`kubelet`, `kube-proxy`, `agnhost`, `e2e.test`),
/// unpacked on first use.
pub fn extra_binary(name: &str) -> Result<PathBuf> {
    let dir = binaries()?.with_context(|| unavailable().unwrap_or_default())?;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let shared = shared_dir();
    if !shared.join(format!("{name}.xz")).exists() {
        bail!(
            "{name} is neither in {} nor in {}",
            dir.display(),
            shared.display()
        );
    }
    // Unpacked beside a temporary name first: parallel tests may ask at once.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().expect("lock");
    if path.exists() {
        return Ok(path);
    }
    unpack(&shared, &dir, name)
}

/// Why tests that need a control plane cannot run, if they cannot.
pub fn unavailable() -> Option<String> {
    match binaries() {
        Ok(Some(_)) => None,
        Ok(None) => Some(format!(
            "no Kubernetes control-plane binaries: set KUBEBUILDER_ASSETS to a directory \
             with kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd, \
             or provide {}",
            shared_dir().display()
        )),
        Err(err) => Some(format!("{err:#}")),
    }
}

/// Which etcd stores the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Etcd {
    /// The etcd 3.6 beside the other binaries (streaming lists work).
    Bundled,
    /// Debian's etcd-server 3.4 (`/usr/bin/etcd`): no RequestWatchProgress, so no
    /// streaming lists, like many real clusters.
    Debian,
}

/// A loopback port free now, below the kernel's ephemeral range and the node ports:
/// a port from that range (what binding port 0 gives) can be taken by any outgoing
/// connection in the seconds before the server that was handed it binds it, and a
/// node port the API server hands a Service could equal it (kubelets reach the API
/// server through a forwarder on their node's loopback).
fn free_port() -> Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_start = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let node_ports_start = NODE_PORT_RANGE
        .split_once('-')
        .and_then(|(first, _)| first.parse::<u32>().ok())
        .unwrap_or(30000);
    const LOWEST: u32 = 10_000;
    let highest = ephemeral_start.min(node_ports_start);
    let span = highest.saturating_sub(LOWEST);
    if span < 1_000 {
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    // Spread processes and calls apart so that concurrent test runs rarely try the
    // same ports; the bind below settles it.
    let seed = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = LOWEST + seed.wrapping_add(step.wrapping_mul(97)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    bail!("no free loopback port in {LOWEST}..{highest}")
}

struct Process {
    name: &'static str,
    args: Vec<String>,
    child: Option<Child>,
}

pub struct ControlPlane {
    pub dir: PathBuf,
    bin: PathBuf,
    pub api_port: u16,
    /// Admin kubeconfig (token auth, TLS verification off: the serving cert is
    /// self-signed).
    pub kubeconfig: PathBuf,
    /// Behind a lock so tests holding the control plane by `Arc` can stop and start
    /// the API server.
    processes: std::sync::Mutex<Vec<Process>>,
}

impl ControlPlane {
    /// For simulated kubelets: every controller but node lifecycle (the stand-ins do
    /// not renew leases).
    pub fn start(etcd: Etcd) -> Result<Self> {
        Self::start_with(etcd, false)
    }

    /// For real kubelets ([`crate::realnode`]): every controller (node lifecycle lifts
    /// the not-ready taint), and the API server reaches kubelets (exec, logs) at
    /// their InternalIP.
    pub fn start_for_real_nodes() -> Result<Self> {
        Self::start_with(Etcd::Bundled, true)
    }

    fn start_with(etcd: Etcd, real_nodes: bool) -> Result<Self> {
        let bin = binaries()?.with_context(|| unavailable().unwrap_or_default())?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}{}cp{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("certs"))?;
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;
        let this = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir: dir.clone(),
            bin: bin.clone(),
            api_port,
            processes: std::sync::Mutex::new(Vec::new()),
        };
        let d = |p: &str| dir.join(p).display().to_string();
        crate::run("openssl", &["genrsa", "-out", &d("sa.key"), "2048"])?;
        crate::run(
            "openssl",
            &["rsa", "-in", &d("sa.key"), "-pubout", "-out", &d("sa.pub")],
        )?;
        fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )?;
        fs::write(&this.kubeconfig, kubeconfig_text(api_port, ADMIN_TOKEN))?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        // etcd syncs every write to disk; on tmpfs the control plane is as fast as the
        // machine allows (it holds test data only).
        let etcd_dir = if Path::new("/dev/shm").is_dir() {
            Path::new("/dev/shm")
                .join(dir.file_name().expect("named"))
                .join("etcd")
        } else {
            dir.join("etcd")
        };
        let mut etcd_args = vec![
            format!("--data-dir={}", etcd_dir.display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
        ];
        let etcd_binary = match etcd {
            // The bundled server takes exactly the four flags above.
            Etcd::Bundled => bin.join("etcd").display().to_string(),
            Etcd::Debian => {
                etcd_args.push(format!("--initial-advertise-peer-urls={peer_url}"));
                etcd_args.push(format!("--initial-cluster=default={peer_url}"));
                "/usr/bin/etcd".to_string()
            }
        };
        this.spawn("etcd", &etcd_binary, etcd_args)?;
        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", d("certs")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            if real_nodes {
                format!("--service-cluster-ip-range={SERVICE_CIDR}")
            } else {
                format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR_V6}")
            },
            format!("--service-node-port-range={NODE_PORT_RANGE}"),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            "--enable-admission-plugins=PodNodeSelector".into(),
            // As kubeadm clusters run: DaemonSets of node agents may be privileged.
            "--allow-privileged=true".into(),
            // Answer at once when stopped: tests stop it on purpose.
            "--shutdown-delay-duration=0s".into(),
        ];
        if real_nodes {
            api_args.push("--kubelet-preferred-address-types=InternalIP".into());
        }
        this.spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver").display().to_string(),
            api_args,
        )?;
        this.wait_ready(Duration::from_secs(60))?;
        this.spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager").display().to_string(),
            vec![
                format!("--kubeconfig={}", this.kubeconfig.display()),
                // No serving port: nothing here reads it, and a port picked ahead of
                // time can be taken (by an ephemeral connection) before the process
                // binds it, which kills the controller.
                "--secure-port=0".into(),
                format!("--service-account-private-key-file={}", d("sa.key")),
                format!("--root-ca-file={}", d("certs/apiserver.crt")),
                "--leader-elect=false".into(),
                if real_nodes {
                    "--controllers=*".into()
                } else {
                    "--controllers=*,-nodelifecycle".into()
                },
                "--use-service-account-credentials=false".into(),
            ],
        )?;
        this.spawn(
            "kube-scheduler",
            &bin.join("kube-scheduler").display().to_string(),
            vec![
                format!("--kubeconfig={}", this.kubeconfig.display()),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
            ],
        )?;
        // The default namespace exists once the API server's bootstrap has run.
        let deadline = Instant::now() + Duration::from_secs(30);
        while this.kubectl(&["get", "namespace", "default"]).is_err() {
            if Instant::now() > deadline {
                bail!("the API server never created the default namespace");
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(this)
    }

    fn spawn(&self, name: &'static str, program: &str, args: Vec<String>) -> Result<()> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(program)
            .args(&args)
            // Its own process group: a Ctrl-C meant for the test or demo must not stop
            // the control plane under it; Drop stops it in order.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        // Leftovers of a killed run can be found and stopped by `cleanup_leftovers`.
        let mut pids = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pids"))?;
        writeln!(pids, "{}", child.id())?;
        let mut processes = self.processes.lock().expect("lock");
        match processes.iter_mut().find(|p| p.name == name) {
            Some(process) => process.child = Some(child),
            None => processes.push(Process {
                name,
                args,
                child: Some(child),
            }),
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// Waits until `/readyz` answers ok.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = Command::new("curl")
                .args(["-sk", "--max-time", "2", "-H"])
                .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
                .arg(format!("{}/readyz", self.url()))
                .output()?;
            if String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {timeout:?}:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Control-plane processes that have exited, each with its status and log tail;
    /// empty while all run. For error messages: a dead scheduler leaves pods Pending
    /// with no other sign.
    pub fn exited_processes(&self) -> String {
        let mut report = String::new();
        for process in self.processes.lock().expect("lock").iter_mut() {
            if let Some(child) = process.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                report.push_str(&format!(
                    "{} exited ({status}); its log ends:\n{}\n",
                    process.name,
                    self.log_tail(process.name)
                ));
            }
        }
        report
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the API server (SIGKILL: an outage, not a graceful drain).
    pub fn stop_apiserver(&self) {
        let mut processes = self.processes.lock().expect("lock");
        if let Some(process) = processes.iter_mut().find(|p| p.name == "kube-apiserver")
            && let Some(mut child) = process.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server again with the same flags and waits until it is ready.
    pub fn start_apiserver(&self) -> Result<()> {
        let args = self
            .processes
            .lock()
            .expect("lock")
            .iter()
            .find(|p| p.name == "kube-apiserver")
            .map(|p| p.args.clone())
            .context("no API server was started")?;
        let program = self.bin.join("kube-apiserver").display().to_string();
        self.spawn("kube-apiserver", &program, args)?;
        self.wait_ready(Duration::from_secs(60))
    }

    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Runs kubectl; fails with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, None)
    }

    /// Runs kubectl with `input` on stdin (`kubectl apply -f -`).
    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let mut cmd = self.kubectl_command();
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running kubectl")?;
        if let Some(input) = input {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a namespace whose pods only land on nodes of `world`.
    pub fn create_namespace(&self, name: &str, world: &str) -> Result<()> {
        self.kubectl_with_input(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  annotations:\n    \
                 {NODE_SELECTOR_ANNOTATION}: {WORLD_LABEL}={world}\n"
            )),
        )?;
        Ok(())
    }

    /// A kubeconfig for the same server that authenticates with `token`.
    pub fn kubeconfig_for_token(&self, token: &str, path: &Path) -> Result<()> {
        fs::write(path, kubeconfig_text(self.api_port, token))?;
        Ok(())
    }
}

fn kubeconfig_text(port: u16, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
         insecure-skip-tls-verify: true\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  \
         context:\n    cluster: test\n    user: user\ncurrent-context: test\n"
    )
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Dependents first, etcd last.
        for process in self.processes.get_mut().expect("lock").iter_mut().rev() {
            if let Some(mut child) = process.child.take() {
                crate::stop_child(&mut child, Duration::from_secs(2));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        if let Some(name) = self.dir.file_name() {
            let _ = fs::remove_dir_all(Path::new("/dev/shm").join(name));
        }
    }
}

/// Stops control-plane processes of runs that were killed (their pid files remain).
pub fn cleanup_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((owner, _)) = rest.split_once("cp") else {
            continue;
        };
        let owner_alive = owner
            .parse::<i32>()
            .is_ok_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if owner_alive {
            continue;
        }
        for pid in fs::read_to_string(entry.path().join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            // Only if the pid still is ours: its command line names our directory
            // (etcd's data lives in /dev/shm/<name>, so the name, not the path).
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&name) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = fs::remove_dir_all(entry.path());
        let _ = fs::remove_dir_all(Path::new("/dev/shm").join(&name));
        removed.push(format!("control plane {name}"));
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_out_ports_are_bindable_and_outside_the_ephemeral_and_node_port_ranges() {
        let ephemeral_start: u16 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        for &port in &ports {
            assert!(port < ephemeral_start, "{port} is in the ephemeral range");
            assert!(port < 30000, "{port} is in the node port range");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "one call after another: {ports:?}"
        );
    }
}
