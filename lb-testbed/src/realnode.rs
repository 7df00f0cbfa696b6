//! A real Kubernetes node inside a [`World`] node's network namespace: Debian's
//! containerd and runc, the CNI bridge on the node's pod bridge, and upstream's kubelet
//! registered with a test [`ControlPlane`]. Images are written locally
//! ([`crate::image`]) and imported; no registry is involved.
//!
//! What lives where:
//! - containerd and the kubelet run in the node's network namespace (so do
//!   hostNetwork pods), in the machine's mount and PID namespaces;
//! - pods are cgroups under `<cgroup root>/<node netns name>/kubepods`, the World
//!   node's cgroup, so a daemon attached there sees exactly this node's pods;
//! - the kubelet reaches the API server (loopback only) through a forwarder on the
//!   node's own 127.0.0.1:<api port>, and the API server reaches the kubelet (exec,
//!   logs) and its pods (the pod proxy) over a veth from the machine to the node: the
//!   machine gets routes to the node's address and its podCIDR only, from the
//!   link-local 169.254.253.1, so nothing bound for them takes the default route out;
//! - containerd and the kubelet get a UTS namespace with the node's name, which
//!   hostNetwork pods share;
//! - the service ranges, blackholed by the World, are routed to a discarding device
//!   instead, so the netfilter hooks after routing run as on a real node;
//! - host settings the kubelet changes (`vm.overcommit_memory`, `kernel.panic`, ...)
//!   are restored when the last node stops, and so is the propagation of
//!   /sys/fs/bpf (made shared while nodes run, as on systemd hosts).
//!
//! Everything is removed on drop: containers (every process in the node's pod
//! cgroups), containerd's shims, mounts under the node's directory, cgroups in every
//! hierarchy, the veth and the route.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    PREFIX, SERVICE_RANGE_V4, SERVICE_RANGE_V6, cgroup2_root, forward::Forwarder, ip,
    k8s::ControlPlane, netns_command, remove_cgroup_tree, world::NodeNet,
};

/// The machine's side of every node's management veth: link-local, so it cannot be
/// a gateway or peer of the machine's own networks (checked before use).
const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 253, 1);
/// The sandbox image the kubelet asks for (upstream's default for v1.36).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.2";

/// Host sysctls the kubelet sets (protectKernelDefaults: false), recorded before the
/// first node starts and restored when the last one stops.
const KUBELET_SYSCTLS: &[&str] = &[
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];
/// What running nodes changed on the machine.
struct HostState {
    nodes: usize,
    sysctls: Vec<(String, String)>,
    /// /sys/fs/bpf was made shared and goes back to private.
    bpffs_was_private: bool,
}
static HOST_STATE: Mutex<HostState> = Mutex::new(HostState {
    nodes: 0,
    sysctls: Vec::new(),
    bpffs_was_private: false,
});

/// Whether the mount at `path` is a shared one (mountinfo's "shared:N").
fn is_shared_mount(path: &str) -> Option<bool> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().rev().find_map(|line| {
        let (before, _) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split_whitespace().collect();
        (fields.get(4) == Some(&path)).then(|| fields[6..].iter().any(|f| f.starts_with("shared:")))
    })
}

fn set_propagation(path: &str, flag: libc::c_ulong) -> bool {
    let Ok(target) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: a propagation change only; no source, type or data.
    unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flag,
            std::ptr::null(),
        ) == 0
    }
}

/// Where the machine's settings are kept while nodes run, so that `cargo xtask
/// cleanup` restores them after a killed run: lines `sysctl <name> <value>` and
/// `bpffs-was-private`.
fn host_state_file() -> PathBuf {
    std::env::temp_dir().join(format!("{PREFIX}-realnode-host-settings"))
}

fn restore_settings(sysctls: &[(String, String)], bpffs_was_private: bool) {
    for (name, value) in sysctls {
        let _ = fs::write(sysctl_path(name), value);
    }
    if bpffs_was_private {
        set_propagation("/sys/fs/bpf", libc::MS_PRIVATE);
    }
    let _ = fs::remove_file(host_state_file());
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

/// Records what the kubelet will change, and makes the host's bpffs a shared mount
/// as systemd hosts have it: the DaemonSet mounts it with `Bidirectional` (and
/// `HostToContainer`) propagation, which runtimes refuse on a private mount.
fn prepare_host() {
    let mut state = HOST_STATE.lock().expect("lock");
    if state.nodes == 0 {
        // A killed run's settings come first: they are the machine's own.
        restore_leftover_settings();
        state.bpffs_was_private = is_shared_mount("/sys/fs/bpf") == Some(false)
            && set_propagation("/sys/fs/bpf", libc::MS_SHARED);
        state.sysctls = KUBELET_SYSCTLS
            .iter()
            .filter_map(|name| {
                let value = fs::read_to_string(sysctl_path(name)).ok()?;
                Some((name.to_string(), value.trim().to_string()))
            })
            .collect();
        let mut saved: String = state
            .sysctls
            .iter()
            .map(|(name, value)| format!("sysctl {name} {value}\n"))
            .collect();
        if state.bpffs_was_private {
            saved.push_str("bpffs-was-private\n");
        }
        let _ = fs::write(host_state_file(), saved);
    }
    state.nodes += 1;
}

fn restore_host() {
    let mut state = HOST_STATE.lock().expect("lock");
    state.nodes = state.nodes.saturating_sub(1);
    if state.nodes == 0 {
        let sysctls = std::mem::take(&mut state.sysctls);
        restore_settings(&sysctls, std::mem::take(&mut state.bpffs_was_private));
    }
}

/// Tools a real node needs (Debian packages containerd, runc,
/// containernetworking-plugins; gcc builds the pause program).
pub fn unavailable() -> Option<String> {
    let missing: Vec<&str> = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/loopback",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!(
            "a real node needs {} (apt-get install containerd runc containernetworking-plugins)",
            missing.join(", ")
        ))
    }
}

/// Every v1 hierarchy and the cgroup2 mount, as (mount point, is cpuset).
fn cgroup_hierarchies() -> Result<Vec<(PathBuf, bool)>> {
    let mut out = Vec::new();
    for line in fs::read_to_string("/proc/self/mountinfo")?.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let mut after = after.split_whitespace();
        let fstype = after.next();
        let options = after.nth(1).unwrap_or("");
        let Some(mount_point) = before.split_whitespace().nth(4) else {
            continue;
        };
        match fstype {
            Some("cgroup") => out.push((
                PathBuf::from(mount_point),
                options.split(',').any(|o| o == "cpuset"),
            )),
            Some("cgroup2") => out.push((PathBuf::from(mount_point), false)),
            _ => {}
        }
    }
    Ok(out)
}

/// Where pods' DNS queries go (the kubelet's `clusterDNS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodDns {
    /// No cluster DNS: pods get the node's resolv.conf.
    #[default]
    None,
    /// dnsmasq on the node's address, never forwarding, authoritative for
    /// `cluster.local`; its records are written from the API ([`ClusterDnsFeed`]).
    NodeLocal,
    /// A DNS Service's ClusterIP (kube-dns in a cluster that runs a DNS pod).
    Server(Ipv4Addr),
}

#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    pub dns: PodDns,
    /// (registry host, endpoint) pairs containerd pulls through instead of the
    /// registry itself ([`crate::registry::Registry::mirrors`]).
    pub registry_mirrors: Vec<(String, String)>,
    /// The node's `topology.kubernetes.io/zone` label, set by its kubelet.
    pub zone: Option<String>,
}

pub struct RealNode {
    /// The Node object's name (the node's network namespace name).
    pub name: String,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    /// The node's IPv4 pod range (its pods sit on its bridge).
    pub pod_cidr: String,
    pub dir: PathBuf,
    /// The kubelet's cgroupRoot, e.g. `/lbt123w0-node1`.
    pub cgroup_root: String,
    socket: PathBuf,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    /// The node-local cluster DNS (dnsmasq on the node's address), if asked for.
    dns: Option<Child>,
    _forwarder: Forwarder,
    host_link: String,
    cgroups: Vec<PathBuf>,
}

impl RealNode {
    /// Starts containerd and the kubelet on `node` and imports `images`
    /// (docker-archives); returns once the Node is Ready.
    pub fn start(cp: &ControlPlane, node: &NodeNet, images: &[PathBuf]) -> Result<Self> {
        Self::start_with(cp, node, images, &NodeOptions::default())
    }

    pub fn start_with(
        cp: &ControlPlane,
        node: &NodeNet,
        images: &[PathBuf],
        options: &NodeOptions,
    ) -> Result<Self> {
        if let Some(why) = unavailable() {
            bail!(why);
        }
        let dir = std::env::temp_dir().join(format!("{}-kl", node.netns));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        // Interface names hold 15 bytes: a counter, not the node's (longer) name.
        static NEXT_LINK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let host_link = format!(
            "{PREFIX}m{}-{}",
            std::process::id(),
            NEXT_LINK.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        prepare_host();
        let forwarder = Forwarder::start(
            &node.netns,
            SocketAddr::from(([127, 0, 0, 1], cp.api_port)),
            SocketAddr::from(([127, 0, 0, 1], cp.api_port)),
        );
        let forwarder = match forwarder {
            Ok(f) => f,
            Err(e) => {
                restore_host();
                return Err(e);
            }
        };
        let mut this = Self {
            // The Node object, the kubelet's cgroupRoot and the namespace share one
            // name, so a DaemonSet can find its node's pods at `<cgroup2>/$(NODE_NAME)`.
            name: node.netns.clone(),
            netns: node.netns.clone(),
            ipv4: node.ipv4,
            pod_cidr: node.pod_cidr_v4.clone(),
            socket: dir.join("containerd.sock"),
            dir,
            cgroup_root: format!("/{}", node.netns),
            containerd: None,
            kubelet: None,
            dns: None,
            _forwarder: forwarder,
            host_link,
            cgroups: Vec::new(),
        };
        this.start_inner(cp, node, images, options)
            .with_context(|| format!("starting real node {}", node.name))?;
        Ok(this)
    }

    fn start_inner(
        &mut self,
        cp: &ControlPlane,
        node: &NodeNet,
        images: &[PathBuf],
        options: &NodeOptions,
    ) -> Result<()> {
        self.plug_management_link()?;
        self.discard_service_ranges()?;
        self.make_cgroup_root()?;
        let dir = self.dir.clone();
        let d = |p: &str| dir.join(p).display().to_string();
        for sub in [
            "containerd/root",
            "containerd/state",
            "cni",
            "ipam",
            "kubelet",
            "logs",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(
            dir.join("containerd.toml"),
            containerd_config(&dir, &self.socket, &options.registry_mirrors),
        )?;
        fs::write(
            dir.join("cni/10-lb-node.conflist"),
            cni_config(&node.pod_cidr_v4, &d("ipam")),
        )?;
        fs::write(dir.join("resolv.conf"), "nameserver 192.0.2.53\n")?;
        let cluster_dns = match options.dns {
            PodDns::None => None,
            PodDns::NodeLocal => Some(self.ipv4),
            PodDns::Server(address) => Some(address),
        };
        fs::write(
            dir.join("kubelet.yaml"),
            kubelet_config(&dir, &self.socket, &self.cgroup_root, cluster_dns),
        )?;
        if options.dns == PodDns::NodeLocal {
            fs::write(dir.join("dns-hosts"), "")?;
            let address = self.ipv4.to_string();
            let hosts = d("dns-hosts");
            self.dns = Some(self.spawn(
                "dnsmasq",
                "dnsmasq",
                &[
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    &format!("--addn-hosts={hosts}"),
                    &format!("--listen-address={address}"),
                    "--bind-interfaces",
                    // Authoritative for the cluster domain: unknown names are NXDOMAIN.
                    "--local=/cluster.local/",
                    "--pid-file=",
                    "--user=root",
                    "--log-facility=-",
                ],
            )?);
        }
        fs::write(dir.join("kubeconfig"), fs::read_to_string(&cp.kubeconfig)?)?;

        self.containerd = Some(self.spawn(
            "containerd",
            "/usr/bin/containerd",
            &["--config", &d("containerd.toml"), "--log-level", "warn"],
        )?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr(&["version"]).is_err() {
            if Instant::now() > deadline {
                bail!("containerd did not start:\n{}", self.log_tail("containerd"));
            }
            thread::sleep(Duration::from_millis(100));
        }
        for image in images {
            self.ctr(&["images", "import", &image.display().to_string()])
                .with_context(|| format!("importing {}", image.display()))?;
        }

        let kubelet = crate::k8s::extra_binary("kubelet")?;
        let mut args = vec![
            format!("--config={}", d("kubelet.yaml")),
            format!("--kubeconfig={}", d("kubeconfig")),
            format!("--root-dir={}", d("kubelet")),
            format!("--volume-plugin-dir={}", d("kubelet/volume-plugins")),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.ipv4),
            "--v=1".to_string(),
        ];
        if let Some(zone) = &options.zone {
            args.push(format!("--node-labels=topology.kubernetes.io/zone={zone}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.kubelet = Some(self.spawn("kubelet", &kubelet.display().to_string(), &args)?);
        self.wait_ready(cp, Duration::from_secs(90))
    }

    /// The veth the API server reaches the kubelet through (see the module docs).
    fn plug_management_link(&self) -> Result<()> {
        // Never shadow an address or route the machine already uses.
        let holders = ip(&["-o", "addr", "show", "to", &format!("{HOST_ADDRESS}/32")])?;
        if let Some(line) = holders.lines().find(|l| !l.contains(PREFIX)) {
            bail!("{HOST_ADDRESS} is already in use on this machine: {line}");
        }
        for dst in [format!("{}/32", self.ipv4), self.pod_cidr.clone()] {
            let route = ip(&["route", "show", "exact", &dst])?;
            if !route.trim().is_empty() {
                bail!("the machine already routes {dst}: {route}");
            }
        }
        ip(&[
            "link",
            "add",
            &self.host_link,
            "type",
            "veth",
            "peer",
            "name",
            "mgmt0",
            "netns",
            &self.netns,
        ])?;
        ip(&["link", "set", &self.host_link, "up"])?;
        ip(&["-n", &self.netns, "link", "set", "mgmt0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{HOST_ADDRESS}/32"),
            "dev",
            &self.host_link,
        ])?;
        // The node's address, and its pods through it (the node answers ARP for its own
        // address only): the API server's pod proxy dials pod IPs, which must never
        // take the machine's default route out.
        ip(&[
            "route",
            "add",
            &format!("{}/32", self.ipv4),
            "dev",
            &self.host_link,
            "src",
            &HOST_ADDRESS.to_string(),
        ])?;
        ip(&[
            "route",
            "add",
            &self.pod_cidr,
            "via",
            &self.ipv4.to_string(),
            "dev",
            &self.host_link,
            "src",
            &HOST_ADDRESS.to_string(),
            "onlink",
        ])?;
        ip(&[
            "-n",
            &self.netns,
            "route",
            "add",
            &format!("{HOST_ADDRESS}/32"),
            "dev",
            "mgmt0",
        ])?;
        Ok(())
    }

    /// The World blackholes the service ranges in the node's namespace. A blackhole
    /// route fails a packet at the routing decision, before the netfilter hooks that
    /// follow it, where kube-proxy rejects connections to Services without endpoints
    /// and translates the node's own (hostNetwork) connections. A route to an ifb
    /// device discards just the same (ifb drops what tc did not redirect to it; this
    /// kernel has no dummy driver), but only after those hooks, as a real node's
    /// default route would carry the packet on.
    fn discard_service_ranges(&self) -> Result<()> {
        let ns = self.netns.as_str();
        ip(&["-n", ns, "link", "add", "svcdiscard", "type", "ifb"])?;
        ip(&["-n", ns, "link", "set", "svcdiscard", "up"])?;
        for (family, range) in [("-4", SERVICE_RANGE_V4), ("-6", SERVICE_RANGE_V6)] {
            ip(&[
                "-n",
                ns,
                family,
                "route",
                "replace",
                range,
                "dev",
                "svcdiscard",
            ])?;
        }
        Ok(())
    }

    /// The kubelet's cgroupRoot must exist in every hierarchy; a v1 cpuset cgroup
    /// starts with no CPUs or memory nodes, so it inherits its parent's.
    fn make_cgroup_root(&mut self) -> Result<()> {
        for (mount, cpuset) in cgroup_hierarchies()? {
            let path = mount.join(self.cgroup_root.trim_start_matches('/'));
            if !path.exists() {
                fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
            }
            if cpuset {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = fs::read_to_string(mount.join(file)).unwrap_or_default();
                    fs::write(path.join(file), parent.trim())
                        .with_context(|| format!("writing {}/{file}", path.display()))?;
                }
            }
            self.cgroups.push(path);
        }
        Ok(())
    }

    fn spawn(&self, name: &str, program: &str, args: &[&str]) -> Result<Child> {
        let log = fs::File::create(self.dir.join(format!("logs/{name}.log")))?;
        use std::os::unix::process::CommandExt as _;
        let mut cmd = netns_command(&self.netns, None, program)?;
        // A UTS namespace named after the node: hostNetwork pods (which share the
        // runtime's) report the node's name as their hostname, as on a real machine.
        crate::with_hostname(&mut cmd, &self.name)?;
        cmd.args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn().with_context(|| format!("starting {program}"))
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text =
            fs::read_to_string(self.dir.join(format!("logs/{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `ctr` against this node's containerd, in the kubelet's namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the Node reports Ready.
    pub fn wait_ready(&self, cp: &ControlPlane, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = cp
                .kubectl(&[
                    "get",
                    "node",
                    &self.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .unwrap_or_default();
            if ready.trim() == "True" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} not Ready after {timeout:?}; kubelet log:\n{}",
                    self.name,
                    self.log_tail("kubelet")
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Where the node-local DNS reads its records, and its pid (SIGHUP reloads them).
    pub fn dns_records(&self) -> Option<(PathBuf, u32)> {
        self.dns
            .as_ref()
            .map(|child| (self.dir.join("dns-hosts"), child.id()))
    }

    /// Cgroup2 directory of this node's pods (where a node's daemon attaches).
    pub fn pods_cgroup(&self) -> Result<PathBuf> {
        Ok(cgroup2_root()?.join(self.cgroup_root.trim_start_matches('/')))
    }

    /// Pids of every process in this node's pods.
    pub fn pod_pids(&self) -> Vec<i32> {
        self.pods_cgroup()
            .map(|root| pids_below(&root))
            .unwrap_or_default()
    }
}

/// Pids of every process in the cgroup2 directory `dir` and below it.
pub fn pids_below(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    collect_pids(dir, &mut pids);
    pids
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) {
    pids.extend(
        fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok()),
    );
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

/// SIGKILLs every process whose command line names `text` (a node directory: only a
/// node's own processes do).
fn kill_processes_naming(text: &str) {
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(text) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Detaches every mount below `dir` (rootfs overlays, pod network namespaces, kubelet
/// volumes), deepest first.
fn unmount_below(dir: &str) {
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        if let Ok(c) = std::ffi::CString::new(mount) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            crate::stop_child(&mut kubelet, Duration::from_secs(5));
        }
        if let Some(mut dns) = self.dns.take() {
            crate::stop_child(&mut dns, Duration::from_secs(2));
        }
        // Every container process: all of them sit in this node's pod cgroups.
        for _ in 0..3 {
            for pid in self.pod_pids() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(200));
        }
        if let Some(mut containerd) = self.containerd.take() {
            crate::stop_child(&mut containerd, Duration::from_secs(5));
        }
        // Shims outlive containerd; they name our socket, under our directory.
        let dir = self.dir.display().to_string();
        kill_processes_naming(&dir);
        unmount_below(&dir);
        for cgroup in self.cgroups.drain(..).rev() {
            remove_cgroup_tree(&cgroup);
        }
        let _ = ip(&["link", "del", &self.host_link]);
        restore_host();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn containerd_config(dir: &Path, socket: &Path, mirrors: &[(String, String)]) -> String {
    let d = |p: &str| dir.join(p).display().to_string();
    let mirrors: String = mirrors
        .iter()
        .map(|(host, endpoint)| {
            format!(
                "    [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{host}\"]\n      endpoint = [\"{endpoint}\"]\n"
            )
        })
        .collect();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    # Root here lacks CAP_SYS_RESOURCE: runc must not lower oom_score_adj below ours.
    restrict_oom_score_adj = true
    enable_selinux = false
    # Pod network namespaces under the state dir, not /var/run/netns: a killed run
    # leaves them where cleanup finds them.
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{cni}"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
{mirrors}"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        socket = socket.display(),
        opt = d("containerd/opt"),
        cni = d("cni"),
    )
}

/// The CNI bridge plugin on the World node's own pod bridge (`br0`, gateway .1
/// already there), host-local addresses from the node's podCIDR; pods route
/// everything through the node, which has no route out.
fn cni_config(pod_cidr: &str, ipam_dir: &str) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "lb-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "br0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr, "rangeStart": pod_cidr.replace(".0/24", ".100")}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                },
            },
            {"type": "loopback"},
        ],
    })
    .to_string()
}

fn kubelet_config(
    dir: &Path,
    socket: &Path,
    cgroup_root: &str,
    cluster_dns: Option<Ipv4Addr>,
) -> String {
    let d = |p: &str| dir.join(p).display().to_string();
    let dns = cluster_dns
        .map(|ip| format!("clusterDNS:\n- {ip}\nclusterDomain: cluster.local\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroups v1 (hybrid) and no systemd on this machine.
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupsPerQOS: true
cgroupRoot: {cgroup_root}
enforceNodeAllocatable: []
failSwapOn: false
protectKernelDefaults: false
resolvConf: {resolv}
containerRuntimeEndpoint: unix://{socket}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
podLogsDir: {logs}
# Root here lacks CAP_SYS_RESOURCE: no negative oom_score_adj.
oomScoreAdj: 0
# Else it adds KUBE-FIREWALL jumps to the node's INPUT and OUTPUT chains.
makeIPTablesUtilChains: false
# Only the API server reaches this port (over the management veth).
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
{dns}"#,
        resolv = d("resolv.conf"),
        socket = socket.display(),
        logs = d("pod-logs"),
    )
}

/// The sandbox ("pause") image: a static program that sleeps, reaps the children it
/// inherits as PID 1 of a shared PID namespace, and exits on SIGTERM or SIGINT.
pub fn pause_image(out: &Path) -> Result<String> {
    const PAUSE_C: &str = r#"
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"#;
    let work = out.with_extension("build");
    fs::create_dir_all(&work)?;
    fs::write(work.join("pause.c"), PAUSE_C)?;
    let binary = work.join("pause");
    crate::run(
        "gcc",
        &[
            "-static",
            "-O2",
            "-o",
            &binary.display().to_string(),
            &work.join("pause.c").display().to_string(),
        ],
    )?;
    let mut image = crate::image::Image::new(PAUSE_IMAGE);
    image.add_program(&binary, "/pause")?;
    image.entrypoint = vec!["/pause".into()];
    let id = image.write_docker_archive(out)?;
    let _ = fs::remove_dir_all(&work);
    Ok(id)
}

/// Restores the machine's settings a killed run recorded, if any.
fn restore_leftover_settings() -> bool {
    let Ok(saved) = fs::read_to_string(host_state_file()) else {
        return false;
    };
    let sysctls: Vec<(String, String)> = saved
        .lines()
        .filter_map(|l| {
            let mut parts = l.strip_prefix("sysctl ")?.splitn(2, ' ');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect();
    restore_settings(&sysctls, saved.lines().any(|l| l == "bpffs-was-private"));
    true
}

/// What a killed run's real nodes left (`cargo xtask cleanup`; nothing may be running):
/// processes naming a node directory (containerd, its shims, the kubelet), mounts under
/// it, the directory, and `lbt` cgroups in every hierarchy, their pods' first.
pub fn cleanup_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    let temp = std::env::temp_dir();
    let dirs: Vec<PathBuf> = fs::read_dir(&temp)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with(PREFIX) && n.ends_with("-kl")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    for dir in dirs {
        let text = dir.display().to_string();
        kill_processes_naming(&text);
        unmount_below(&text);
        if fs::remove_dir_all(&dir).is_ok() {
            removed.push(format!("real node directory {text}"));
        }
    }
    // Management links whose node namespace outlived its run (the kernel keeps a
    // namespace while anything refers to it; the machine's side still routes to it).
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        for name in links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .filter(|n| n.starts_with(&format!("{PREFIX}m")))
        {
            if ip(&["link", "del", name]).is_ok() {
                removed.push(format!("management link {name}"));
            }
        }
    }
    if restore_leftover_settings() {
        removed.push("the kubelet's sysctls and /sys/fs/bpf's propagation, restored".into());
    }
    for (mount, _) in cgroup_hierarchies().unwrap_or_default() {
        for entry in fs::read_dir(&mount).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(PREFIX) || !entry.path().is_dir() {
                continue;
            }
            let mut pids = Vec::new();
            collect_pids(&entry.path(), &mut pids);
            for pid in pids {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            remove_cgroup_tree(&entry.path());
            if !entry.path().exists() {
                removed.push(format!("cgroup {}", entry.path().display()));
            }
        }
    }
    removed
}

/// `deploy/daemonset.yaml` as shipped, and the image its two containers run.
pub fn shipped_daemonset() -> Result<(String, String)> {
    let path = crate::k8s::workspace_root().join("deploy/daemonset.yaml");
    let yaml = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let images: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    if images.len() != 2 || images[0] != images[1] {
        bail!("deploy/daemonset.yaml should run one image in its two containers: {images:?}");
    }
    let image = images[0].to_string();
    Ok((yaml, image))
}

/// A registry serving `images` to every real node that lists its
/// [`Registry::mirrors`] (on the machine's side of the management links, so nodes
/// reach it and nothing else does).
pub fn start_registry(images: &[crate::image::Image]) -> Result<crate::registry::Registry> {
    crate::registry::Registry::start(HOST_ADDRESS, images)
}

/// Where the DaemonSet [`deploy_lb`] applies pins a node's datapath.
pub fn lb_pin_dir(node: &str) -> String {
    format!("/sys/fs/bpf/{node}-lb")
}

/// Deploys lb as users do: `deploy/rbac.yaml`, then `daemonset` (deploy/daemonset.yaml)
/// with the operator's settings for these nodes: each node's pods at
/// `<cgroup2>/$(NODE_NAME)` and its pins at [`lb_pin_dir`].
pub fn deploy_lb(cp: &ControlPlane, daemonset: &str) -> Result<()> {
    deploy_lb_with(cp, daemonset, &[])
}

/// [`deploy_lb`] with more `lb daemon` arguments (`--default-workload-mode=packet`);
/// applied over a deployed DaemonSet, it rolls its pods.
pub fn deploy_lb_with(cp: &ControlPlane, daemonset: &str, extra_args: &[&str]) -> Result<()> {
    let cgroup2 = cgroup2_root()?;
    let mut daemonset = daemonset_for(
        daemonset,
        cp.api_port,
        &format!("{}/$(NODE_NAME)", cgroup2.display()),
        &lb_pin_dir("$(NODE_NAME)"),
    )?;
    for arg in extra_args {
        let pin = format!("- --pin-dir={}\n", lb_pin_dir("$(NODE_NAME)"));
        let indent = daemonset
            .lines()
            .find(|l| l.trim_start().starts_with("- --pin-dir="))
            .map(|l| &l[..l.len() - l.trim_start().len()])
            .unwrap_or("")
            .to_string();
        daemonset = daemonset.replacen(&pin, &format!("{pin}{indent}- {arg}\n"), 1);
    }
    let rbac = crate::k8s::workspace_root().join("deploy/rbac.yaml");
    cp.kubectl(&["apply", "-f", &rbac.display().to_string()])?;
    cp.kubectl_with_input(&["apply", "-f", "-"], Some(&daemonset))?;
    Ok(())
}

/// Waits until the lb DaemonSet's pods all run its current version (after
/// [`deploy_lb_with`] changed it).
pub fn wait_lb_rolled_out(cp: &ControlPlane, timeout: Duration) -> Result<()> {
    cp.kubectl(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/lb",
        &format!("--timeout={}s", timeout.as_secs()),
    ])
    .map(|_| ())
}

/// Ready pods matching `selector` in `namespace`, with their nodes.
pub fn ready_pods(cp: &ControlPlane, namespace: &str, selector: &str) -> Vec<(String, String)> {
    let out = cp
        .kubectl(&[
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ])
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            let (name, node, ready) = (parts.next()?, parts.next()?, parts.next()?);
            (ready == "True").then(|| (name.to_string(), node.to_string()))
        })
        .collect()
}

/// Waits until an lb pod is Ready on each of `nodes` nodes; returns them with their
/// nodes.
pub fn wait_lb_ready(
    cp: &ControlPlane,
    nodes: usize,
    timeout: Duration,
) -> Result<Vec<(String, String)>> {
    let deadline = Instant::now() + timeout;
    loop {
        let pods = ready_pods(cp, "kube-system", "app.kubernetes.io/name=lb");
        if pods.len() == nodes {
            return Ok(pods);
        }
        let exited = cp.exited_processes();
        if !exited.is_empty() || Instant::now() > deadline {
            bail!(
                "lb pods not Ready on {nodes} nodes within {timeout:?}:\n{}\n\
                 kube-system events:\n{}\n{exited}kube-scheduler's log ends:\n{}",
                cp.kubectl(&["get", "pods", "-A", "-o", "wide"])
                    .unwrap_or_default(),
                cp.kubectl(&[
                    "get",
                    "events",
                    "-n",
                    "kube-system",
                    "--sort-by=.lastTimestamp"
                ])
                .unwrap_or_default(),
                cp.log_tail("kube-scheduler"),
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// Removes the datapaths the DaemonSet pinned for `nodes` (they outlive their pods by
/// design), with `lb cleanup` as an operator would.
pub fn remove_lb_pins(lb: &Path, nodes: &[String]) {
    for node in nodes {
        let pin_dir = lb_pin_dir(node);
        if Path::new(&pin_dir).exists() {
            let _ = Command::new(lb)
                .args(["cleanup", "--force", "--pin-dir", &pin_dir])
                .output();
            let _ = fs::remove_dir(&pin_dir);
        }
    }
}

/// `deploy/daemonset.yaml` with what an operator sets for this cluster: the API
/// server's address (the node's forwarder), the cgroup of the node's pods and a pin
/// directory (`$(NODE_NAME)` makes either per node). Each edit must apply exactly
/// once, so a changed DaemonSet fails loudly instead of deploying half-edited.
fn daemonset_for(yaml: &str, api_port: u16, cgroup: &str, pin_dir: &str) -> Result<String> {
    let mut out = yaml.to_string();
    for (from, to) in [
        (
            "value: \"api-server.example\"",
            "value: \"127.0.0.1\"".to_string(),
        ),
        ("value: \"6443\"", format!("value: \"{api_port}\"")),
        (
            "- --cgroup=/host/sys/fs/cgroup\n",
            format!("- --cgroup=/host{cgroup}\n"),
        ),
        (
            "- --pin-dir=/sys/fs/bpf/lb\n",
            format!("- --pin-dir={pin_dir}\n"),
        ),
    ] {
        if out.matches(from).count() != 1 {
            bail!("deploy/daemonset.yaml no longer has `{from}` once");
        }
        out = out.replace(from, &to);
    }
    Ok(out)
}
