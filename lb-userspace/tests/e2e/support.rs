//! Shared pieces of the end-to-end tests: the daemon under test, manifest writers and
//! clients.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testbed::{Pod, Testbed};
use serde_json::Value;

pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// The log line of a daemon's first completed sync (not any line containing "ready").
pub const READY: &str = "lb::daemon::controller: ready";

/// `timeout` stretched for slow machines: `LB_E2E_SLOWDOWN=N` (the kernel-compatibility
/// run sets it: its guest runs on an emulated CPU) multiplies the waits for daemons and
/// client programs to start, never what a test asserts about the datapath's speed.
pub fn slow(timeout: Duration) -> Duration {
    let factor = std::env::var("LB_E2E_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    timeout * factor
}

/// A running `lb daemon` attached to a test's cgroup, with its own pin directory and
/// source (a manifest folder, or a control plane's kubeconfig).
pub struct Daemon {
    child: Option<Child>,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    pub cgroup: PathBuf,
    /// `--manifests DIR` or `--kubeconfig FILE --node-name NAME`.
    source: Vec<String>,
    work_dir: PathBuf,
    /// A command the daemon runs under (e.g. `setpriv` with a capability set).
    wrapper: Vec<String>,
}

impl Daemon {
    /// Starts the daemon on `manifests` and waits until it reports ready.
    pub fn start(tb: &Testbed, manifests: &Path) -> Result<Self> {
        Self::start_with(tb, manifests, &[])
    }

    pub fn start_with(tb: &Testbed, manifests: &Path, extra: &[&str]) -> Result<Self> {
        let mut daemon = Self::launch(tb, manifests, extra)?;
        daemon.wait_for_log(READY, slow(Duration::from_secs(20)))?;
        Ok(daemon)
    }

    /// Starts the daemon without waiting for it to be ready.
    pub fn launch(tb: &Testbed, manifests: &Path, extra: &[&str]) -> Result<Self> {
        Self::launch_source(
            &format!("/sys/fs/bpf/{}", tb.id),
            tb.cgroup(),
            &tb.work_dir,
            vec!["--manifests".into(), manifests.display().to_string()],
            extra,
        )
    }

    /// Starts a daemon with any source arguments.
    pub fn launch_source(
        pin_dir: &str,
        cgroup: &Path,
        work_dir: &Path,
        source: Vec<String>,
        extra: &[&str],
    ) -> Result<Self> {
        let mut daemon = Self {
            child: None,
            pin_dir: PathBuf::from(pin_dir),
            log: work_dir.join(format!("daemon-{}.log", unique())),
            cgroup: cgroup.to_path_buf(),
            source,
            work_dir: work_dir.to_path_buf(),
            wrapper: Vec::new(),
        };
        daemon.spawn(extra)?;
        Ok(daemon)
    }

    /// Starts the daemon on `manifests` under `wrapper` (a command that execs the
    /// rest of its arguments) and waits until it reports ready.
    pub fn start_wrapped(tb: &Testbed, manifests: &Path, wrapper: &[&str]) -> Result<Self> {
        let mut daemon = Self {
            child: None,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{}", tb.id)),
            log: tb.work_dir.join(format!("daemon-{}.log", unique())),
            cgroup: tb.cgroup().to_path_buf(),
            source: vec!["--manifests".into(), manifests.display().to_string()],
            work_dir: tb.work_dir.clone(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        daemon.spawn(&[])?;
        daemon.wait_for_log(READY, slow(Duration::from_secs(20)))?;
        Ok(daemon)
    }

    fn spawn(&mut self, extra: &[&str]) -> Result<()> {
        let log_file = fs::File::create(&self.log)?;
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(LB);
                command
            }
            None => Command::new(LB),
        };
        let child = command
            .arg("daemon")
            .args(&self.source)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            // The default rescan interval (10 s): changes must arrive through events.
            .args(["--log-level", "info,lb=debug"])
            // Tests run in parallel: each daemon on ports of its own.
            .args([
                "--health-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting lb daemon")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the daemon with SIGKILL (a crash, an OOM kill).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The address a daemon's server (`health` or `metrics`) bound, from its log.
    pub fn server_addr(&self, which: &str) -> Result<String> {
        let needle = format!("{which} server listening");
        let log = self.log_text();
        log.lines()
            .find(|l| l.contains(&needle))
            .and_then(|l| l.split("bound=").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
            .with_context(|| format!("the daemon did not log its {which} address:\n{log}"))
    }

    /// GET `path` on the daemon's health or metrics server: (status, body).
    pub fn http_get(&self, which: &str, path: &str) -> Result<(u16, String)> {
        let addr = self.server_addr(which)?;
        let out = Command::new("curl")
            .args(["-s", "--max-time", "2", "-w", "\n%{http_code}"])
            .arg(format!("http://{addr}{path}"))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_string()))
    }

    /// Restarts a stopped daemon with the same pin directory and manifests.
    pub fn restart(&mut self, extra: &[&str]) -> Result<()> {
        assert!(self.child.is_none(), "daemon still running");
        self.log = self.work_dir.join(format!("daemon-{}.log", unique()));
        self.spawn(extra)?;
        self.wait_for_log(READY, slow(Duration::from_secs(20)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon's log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "lb daemon exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "lb daemon did not log {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with SIGTERM and asserts a clean exit (code 0).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("lb daemon exited with {status}:\n{}", self.log_text());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("lb daemon did not stop within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `lb list [extra]` for this daemon's pin directory: its standard output.
    fn run_list(&self, extra: &[&str]) -> Result<Vec<u8>> {
        let output = Command::new(LB)
            .arg("list")
            .args(extra)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()?;
        if !output.status.success() {
            bail!(
                "lb list failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output.stdout)
    }

    /// `lb list` (text) for this daemon's pin directory.
    pub fn list_text(&self) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.run_list(&[])?).into_owned())
    }

    /// A sample of the daemon's /metrics, summed over label sets.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (code, body) = self.http_get("metrics", "/metrics")?;
        ensure!(code == 200, "/metrics answered {code}");
        Ok(body
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// `lb ct --json` for this daemon's pin directory: one object per tracked entry.
    pub fn flows(&self) -> Result<Vec<Value>> {
        let output = Command::new(LB)
            .args(["ct", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()?;
        ensure!(
            output.status.success(),
            "lb ct failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// `lb list --json` for this daemon's pin directory.
    pub fn list(&self) -> Result<Vec<Value>> {
        Ok(serde_json::from_slice(&self.run_list(&["--json"])?)?)
    }

    /// The sorted backend `ip:port` list of one frontend in `lb list --json`.
    pub fn backends_of(
        &self,
        address: &str,
        port: u16,
        protocol: &str,
    ) -> Result<Option<Vec<String>>> {
        Ok(self.list()?.iter().find_map(|fe| {
            (fe["address"] == address && fe["port"] == port && fe["protocol"] == protocol).then(
                || {
                    let mut backends: Vec<String> = fe["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| format!("{}:{}", b["address"].as_str().unwrap_or(""), b["port"]))
                        .collect();
                    backends.sort();
                    backends
                },
            )
        }))
    }

    /// Waits until `lb list` shows `expected` as the backends of a frontend.
    pub fn wait_for_backends(
        &self,
        address: &str,
        port: u16,
        protocol: &str,
        expected: &[&str],
    ) -> Result<()> {
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        // Well under the 10 s periodic rescan: only a file-system event gets here in time.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let got = self.backends_of(address, port, protocol)?;
            if got.as_ref() == Some(&expected) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{address}:{port}/{protocol} has backends {got:?}, expected {expected:?}\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        // Whatever happened, leave no pins behind (the datapath outlives the daemon by design).
        if self.pin_dir.exists() {
            let _ = Command::new(LB)
                .args(["cleanup", "--pin-dir"])
                .arg(&self.pin_dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Writes a manifest atomically (write then rename), as editors and config tools do.
pub fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let staging = dir.join(format!(".{name}.{}.tmp", unique()));
    fs::write(&staging, text)?;
    fs::rename(&staging, dir.join(name))?;
    Ok(())
}

pub fn manifest_dir(tb: &Testbed) -> Result<PathBuf> {
    let dir = tb.work_dir.join(format!("manifests-{}", unique()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A Service port: (name, port, protocol, targetPort as YAML).
pub type SvcPort<'a> = (&'a str, u32, &'a str, &'a str);

pub fn service_yaml(name: &str, cluster_ips: &[&str], ports: &[SvcPort]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: pods\nspec:\n  clusterIP: {}\n",
        cluster_ips[0]
    );
    if cluster_ips.len() > 1 {
        let _ = writeln!(
            yaml,
            "  clusterIPs: [{}]",
            cluster_ips
                .iter()
                .map(|ip| format!("\"{ip}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    yaml.push_str("  ports:\n");
    for (port_name, port, protocol, target) in ports {
        let _ = writeln!(
            yaml,
            "  - {{name: \"{port_name}\", port: {port}, protocol: {protocol}, targetPort: {target}}}"
        );
    }
    yaml
}

/// An EndpointSlice: ports (name, port, protocol), ready endpoint addresses.
pub fn slice_yaml(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, u16, &str)],
    addresses: &[String],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: pods\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {address_type}\nports:\n"
    );
    for (port_name, port, protocol) in ports {
        let _ = writeln!(
            yaml,
            "- {{name: \"{port_name}\", port: {port}, protocol: {protocol}}}"
        );
    }
    if addresses.is_empty() {
        yaml.push_str("endpoints: []\n");
    } else {
        yaml.push_str("endpoints:\n");
        for address in addresses {
            let _ = writeln!(
                yaml,
                "- addresses: [\"{address}\"]\n  conditions: {{ready: true}}"
            );
        }
    }
    yaml
}

/// The redis Service of the seed scenario, with its slice, as one multi-document file.
pub fn redis_manifest(cluster_ip: &str, backends: &[&Pod]) -> String {
    let addresses: Vec<String> = backends.iter().map(|p| p.ipv4.to_string()).collect();
    format!(
        "{}---\n{}",
        service_yaml("redis-master", &[cluster_ip], &[("", 6379, "TCP", "6379")]),
        slice_yaml(
            "redis-master-1",
            "redis-master",
            "IPv4",
            &[("", 6379, "TCP")],
            &addresses
        )
    )
}

/// Serves redis-master at the ClusterIP 10.96.0.100 with `backends` from a fresh
/// manifest folder, and returns the folder and the ready daemon.
pub fn serve_redis(tb: &Testbed, backends: &[&Pod]) -> Result<(PathBuf, Daemon)> {
    let dir = manifest_dir(tb)?;
    write_manifest(&dir, "redis.yaml", &redis_manifest("10.96.0.100", backends))?;
    let daemon = Daemon::start(tb, &dir)?;
    Ok((dir, daemon))
}

/// Runs redis-cli in a balanced client pod and returns (stdout, stderr, elapsed).
pub fn redis_cli(
    tb: &Testbed,
    client: &Pod,
    host: &str,
    port: u16,
    args: &[&str],
) -> Result<(String, String, Duration)> {
    let port = port.to_string();
    let mut argv = vec!["redis-cli", "-h", host, "-p", &port];
    argv.extend_from_slice(args);
    let started = Instant::now();
    let output = tb.output(client, true, &argv, Duration::from_secs(10))?;
    Ok((
        String::from_utf8_lossy(&output.stdout).trim().to_string(),
        String::from_utf8_lossy(&output.stderr).trim().to_string(),
        started.elapsed(),
    ))
}

/// `curl -s <url>` from a balanced client pod: the body.
pub fn curl(tb: &Testbed, client: &Pod, url: &str) -> Result<String> {
    let out = tb.output(
        client,
        true,
        &["curl", "-s", "--max-time", "2", url],
        Duration::from_secs(5),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Which backend answers a new connection to host:port (its `whoami` key).
pub fn whoami(tb: &Testbed, client: &Pod, host: &str, port: u16) -> Result<String> {
    let (out, err, _) = redis_cli(tb, client, host, port, &["GET", "whoami"])?;
    if out.is_empty() || out.contains("Could not connect") {
        bail!("no answer from {host}:{port}: {out} {err}");
    }
    Ok(out)
}

/// A testbed with `n` redis backend pods (redis-1 ..) and one client pod.
pub fn redis_world(n: usize) -> Result<(Testbed, Vec<Pod>, Pod)> {
    let mut tb = Testbed::new()?;
    let mut backends = Vec::new();
    for i in 1..=n {
        let pod = tb.add_pod(&format!("redis-{i}"), 10 + i as u8)?;
        tb.start_redis(&pod, 6379)?;
        backends.push(pod);
    }
    let client = tb.add_pod("web", 100)?;
    Ok((tb, backends, client))
}

/// What one thread of a process holds: (name, effective, permitted, bounding,
/// no_new_privs), capability sets as bit masks.
pub struct ThreadCaps {
    pub name: String,
    pub effective: u64,
    pub permitted: u64,
    pub bounding: u64,
    pub no_new_privs: bool,
}

/// Every thread of `pid`, from `/proc/<pid>/task/*/status`.
pub fn thread_caps(pid: u32) -> Result<Vec<ThreadCaps>> {
    let mut threads = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let status = fs::read_to_string(task.join("status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap_or(u64::MAX);
        threads.push(ThreadCaps {
            name: fs::read_to_string(task.join("comm"))?.trim().to_string(),
            effective: mask("CapEff:"),
            permitted: mask("CapPrm:"),
            bounding: mask("CapBnd:"),
            no_new_privs: field("NoNewPrivs:") == "1",
        });
    }
    Ok(threads)
}

/// Capability bits.
pub const CAP_NET_ADMIN: u64 = 1 << 12;
pub const CAP_SYS_PTRACE: u64 = 1 << 19;
pub const CAP_SYS_ADMIN: u64 = 1 << 21;
pub const CAP_BPF: u64 = 1 << 39;
/// What the sync thread keeps; every other thread keeps CAP_BPF only.
pub const SYNC_CAPS: u64 = CAP_BPF | CAP_NET_ADMIN | CAP_SYS_ADMIN | CAP_SYS_PTRACE;

/// The daemon's threads hold what privileges.rs promises: the sync thread exactly
/// [`SYNC_CAPS`], every other thread exactly CAP_BPF, effective and permitted alike,
/// all with no_new_privs; the bounding set is within `bounding` (what the process could
/// drop it to).
pub fn ensure_least_privilege(pid: u32, bounding: u64) -> Result<Vec<ThreadCaps>> {
    let threads = thread_caps(pid)?;
    ensure!(
        threads.iter().any(|t| t.name == "sync"),
        "no sync thread among {:?}",
        threads.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    for t in &threads {
        let want = if t.name == "sync" { SYNC_CAPS } else { CAP_BPF };
        ensure!(
            t.effective == want && t.permitted == want,
            "thread {}: effective {:#x}, permitted {:#x}, want {want:#x}",
            t.name,
            t.effective,
            t.permitted
        );
        ensure!(
            t.bounding & !bounding == 0,
            "thread {}: bounding {:#x} beyond {bounding:#x}",
            t.name,
            t.bounding
        );
        ensure!(t.no_new_privs, "thread {}: no_new_privs not set", t.name);
    }
    Ok(threads)
}
