//! A small world of "pods" for end-to-end tests, the `cargo xtask run` sandbox and the
//! benchmarks: network namespaces on one bridge, a cgroup2 subtree for the processes
//! the load balancer should see, and real servers and clients started inside them.
//!
//! Network rules (../shared/DESIGN.md section 7): pods get addresses in 10.244.0.0/16 and
//! fd00:244::/64 on a bridge that lives in a namespace of its own, and have no default
//! route; the service ranges (10.96.0.0/12, fd00:96::/64) are blackholed in every pod, so
//! a connection the load balancer did not rewrite fails inside the sandbox instead of
//! leaving the machine. Everything is removed on drop, on success and on panic; leftovers
//! of a killed run carry the `lbt` prefix and `cleanup_leftovers` removes them.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub mod cluster_dns;
pub mod forward;
pub mod image;
pub mod k8s;
pub mod kubelet;
pub mod realnode;
pub mod registry;
pub mod sandbox;
pub mod seed;
pub mod servers;
pub mod world;

/// Prefix of every namespace, cgroup and pin directory a testbed creates.
pub const PREFIX: &str = "lbt";

/// The pod subnet prefix; pod `n` is 10.244.<subnet>.<n>.
pub const POD_SUBNET_V4: [u8; 3] = [10, 244, 1];
/// Service (ClusterIP) ranges, blackholed in every pod.
pub const SERVICE_RANGE_V4: &str = "10.96.0.0/12";
pub const SERVICE_RANGE_V6: &str = "fd00:96::/64";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs a command and fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        if let Some((before, after)) = line.split_once(" - ")
            && after.split_whitespace().next() == Some("cgroup2")
            && let Some(mount_point) = before.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount_point));
        }
    }
    bail!("no cgroup2 file system mounted")
}

/// A pod: one network namespace with one interface on the testbed bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

/// A cgroup2 directory removed (with any process left in it killed) on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// Pids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Only processes this testbed started can be in here.
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            for pid in self.pids() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        remove_cgroup_tree(&self.path);
    }
}

/// Removes a cgroup directory tree (its processes must be gone or going), children
/// first.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() && fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Network namespaces, a bridge, a cgroup and the processes started in them.
pub struct Testbed {
    pub id: String,
    node_netns: String,
    pods: Vec<Pod>,
    cgroup: Cgroup,
    children: Vec<(String, Child)>,
    pub work_dir: PathBuf,
}

impl Testbed {
    /// Creates the node namespace with its bridge and a cgroup for client processes.
    pub fn new() -> Result<Self> {
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let work_dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&work_dir)?;
        let cgroup = Cgroup::create(&id)?;
        let node_netns = format!("{id}-node");
        let testbed = Self {
            id,
            node_netns: node_netns.clone(),
            pods: Vec::new(),
            cgroup,
            children: Vec::new(),
            work_dir,
        };
        ip(&["netns", "add", &node_netns])?;
        let n = node_netns.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        // The node's own address on the pod network (a "host" that can reach pods).
        let node_v4 = format!(
            "{}.{}.{}.1/24",
            POD_SUBNET_V4[0], POD_SUBNET_V4[1], POD_SUBNET_V4[2]
        );
        ip(&["-n", n, "addr", "add", &node_v4, "dev", "br0"])?;
        ip(&[
            "-n",
            n,
            "-6",
            "addr",
            "add",
            "fd00:244::1/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        blackhole_service_ranges(n)?;
        Ok(testbed)
    }

    /// The cgroup whose processes the load balancer under test is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup.path
    }

    /// The node's network namespace (its bridge and the pods' veth peers).
    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    /// Adds a pod with address 10.244.1.`host` and fd00:244::`host`.
    pub fn add_pod(&mut self, name: &str, host: u8) -> Result<Pod> {
        let index = self.pods.len();
        let netns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &netns])?;
        let pod = Pod {
            name: name.to_string(),
            netns: netns.clone(),
            ipv4: Ipv4Addr::new(POD_SUBNET_V4[0], POD_SUBNET_V4[1], POD_SUBNET_V4[2], host),
            ipv6: format!("fd00:244::{host:x}").parse()?,
        };
        self.pods.push(pod.clone());
        let peer = format!("v{index}");
        let node = self.node_netns.as_str();
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", node, "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        ip(&["-n", node, "link", "set", &peer, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{}/24", pod.ipv4),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &netns,
            "-6",
            "addr",
            "add",
            &format!("{}/64", pod.ipv6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        blackhole_service_ranges(&netns)?;
        Ok(pod)
    }

    /// A command that runs inside `pod`'s network namespace and, with `balanced`,
    /// inside the testbed cgroup (so the load balancer under test rewrites its
    /// connections).
    pub fn command(&self, pod: &Pod, balanced: bool, program: &str) -> Result<Command> {
        netns_command(
            &pod.netns,
            balanced.then_some(self.cgroup.path.as_path()),
            program,
        )
    }

    /// Runs a command to completion in a pod (with a timeout) and returns its output.
    pub fn output(
        &self,
        pod: &Pod,
        balanced: bool,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = self.command(pod, balanced, argv[0])?;
        cmd.args(&argv[1..]);
        output_with_timeout(cmd, timeout)
    }

    /// Starts a long-running process in a pod; it is stopped when the testbed drops.
    pub fn spawn(&mut self, pod: &Pod, balanced: bool, argv: &[&str]) -> Result<u32> {
        let log = fs::File::create(self.work_dir.join(format!(
            "{}-{}.log",
            pod.name,
            self.children.len()
        )))?;
        let mut cmd = self.command(pod, balanced, argv[0])?;
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {}", argv.join(" "), pod.name))?;
        let pid = child.id();
        self.children.push((argv.join(" "), child));
        Ok(pid)
    }

    /// Stops a process started with [`Testbed::spawn`].
    pub fn stop(&mut self, pid: u32) {
        if let Some(pos) = self.children.iter().position(|(_, c)| c.id() == pid) {
            let (_, mut child) = self.children.remove(pos);
            stop_child(&mut child, Duration::from_secs(3));
        }
    }

    /// Starts redis-server in `pod` on `port`, waits until it answers, and stores the
    /// pod's name under the key `whoami` so clients can tell which backend answered.
    pub fn start_redis(&mut self, pod: &Pod, port: u16) -> Result<u32> {
        let argv = servers::redis(pod, port, &self.work_dir);
        let pid = self.spawn(pod, false, &servers::refs(&argv))?;
        let port_s = port.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.output(
                pod,
                false,
                &[
                    "redis-cli",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port_s,
                    "SET",
                    "whoami",
                    &pod.name,
                ],
                Duration::from_secs(2),
            )?;
            if String::from_utf8_lossy(&out.stdout).trim() == "OK" {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server in {} did not start: {}",
                    pod.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Testbed {
    /// Starts dnsmasq in `pod` on port 53 (UDP and TCP, both families). It answers
    /// `whoami.test` with the pod's own addresses (A and AAAA), so clients can tell
    /// which backend answered, and each `(name, address)` of `records`.
    pub fn start_dnsmasq(&mut self, pod: &Pod, records: &[(&str, IpAddr)]) -> Result<u32> {
        let argv = servers::dnsmasq(pod, records);
        let pid = self.spawn(pod, false, &servers::refs(&argv))?;
        let server = pod.ipv4.to_string();
        self.wait_until(
            pod,
            &[
                "dig",
                &format!("@{server}"),
                "+short",
                "+time=1",
                "+tries=1",
                "whoami.test",
            ],
            &server,
        )?;
        Ok(pid)
    }

    /// Starts an HTTP server (python3 http.server) in `pod` on `port`, serving a file
    /// `whoami` that holds `identity`.
    pub fn start_http(&mut self, pod: &Pod, port: u16, identity: &str) -> Result<u32> {
        let root = self.work_dir.join(format!("www-{}-{port}", pod.name));
        servers::http_root(&root, identity)?;
        let argv = servers::http(&root, port);
        let pid = self.spawn(pod, false, &servers::refs(&argv))?;
        let url = format!("http://{}:{port}/whoami", pod.ipv4);
        self.wait_until(pod, &["curl", "-s", "--max-time", "1", &url], identity)?;
        Ok(pid)
    }

    /// Runs `argv` in `pod` (not balanced) until its output contains `expected`.
    fn wait_until(&self, pod: &Pod, argv: &[&str], expected: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.output(pod, false, argv, Duration::from_secs(3));
            if let Ok(out) = &out
                && String::from_utf8_lossy(&out.stdout).contains(expected)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} in {} never answered {expected:?}: {out:?}",
                    argv[0],
                    pod.name
                );
            }
            thread::sleep(Duration::from_millis(30));
        }
    }
}

fn blackhole_service_ranges(netns: &str) -> Result<()> {
    ip(&["-n", netns, "route", "add", "blackhole", SERVICE_RANGE_V4])?;
    ip(&[
        "-n",
        netns,
        "-6",
        "route",
        "add",
        "blackhole",
        SERVICE_RANGE_V6,
    ])?;
    Ok(())
}

/// Runs `cmd` in a UTS namespace of its own with `hostname`, as a container runtime
/// gives a pod (or a machine) its name.
pub fn with_hostname(cmd: &mut Command, hostname: &str) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let hostname = std::ffi::CString::new(hostname)?;
    // SAFETY: only async-signal-safe calls (unshare, sethostname) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWUTS) != 0
                || libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A command whose child enters `/run/netns/<netns>` and optionally joins `cgroup`
/// before exec.
pub fn netns_command(netns: &str, cgroup: Option<&Path>, program: &str) -> Result<Command> {
    let ns_file = fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    let procs = match cgroup {
        Some(path) => Some(
            fs::OpenOptions::new()
                .write(true)
                .open(path.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", path.display()))?,
        ),
        None => None,
    };
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (write, setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs a command, killing it if it outlives `timeout`. Output is drained while the
/// command runs, so a chatty command never blocks on a full pipe.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    use std::io::Read as _;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            bail!(
                "{:?} timed out after {timeout:?}: {}",
                cmd.get_program(),
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(2));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// SIGTERM, then SIGKILL if `child` has not exited within `grace`.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        for (_, child) in &mut self.children {
            stop_child(child, Duration::from_secs(3));
        }
        for pod in &self.pods {
            let _ = ip(&["netns", "del", &pod.netns]);
        }
        let _ = ip(&["netns", "del", &self.node_netns]);
        let _ = fs::remove_dir_all(&self.work_dir);
    }
}

/// Removes namespaces, cgroups and pin directories left by testbeds whose process was
/// killed before it could clean up. Only names with the `lbt` prefix are touched.
pub fn cleanup_leftovers() -> Result<Vec<String>> {
    let mut removed = k8s::cleanup_leftovers();
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(PREFIX) {
                if let Ok(pids) = ip(&["netns", "pids", name]) {
                    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                ip(&["netns", "del", name])?;
                removed.push(format!("netns {name}"));
            }
        }
    }
    // Before the cgroups below: a real node's pods are cgroups inside them.
    removed.extend(realnode::cleanup_leftovers());
    if let Ok(root) = cgroup2_root() {
        for entry in fs::read_dir(&root)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && entry.path().is_dir() {
                drop(Cgroup { path: entry.path() });
                removed.push(format!("cgroup {name}"));
            }
        }
    }
    Ok(removed)
}
