//! The benchmark network: client namespace -> node namespace (a router, where
//! kube-proxy's rules and the userspace proxy live) -> three server namespaces running
//! redis-server (and iperf3 on the first). A second client namespace, shaped the same,
//! is the pod that lb balances in packet mode (its own veth to the node). Every route leads into these namespaces
//! only; the service range is blackholed on the node, so nothing can leave the machine.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_testbed::{Cgroup, PREFIX, netns_command, output_with_timeout, run};

use super::rules::PROXY_VIP;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// The packet-mode client pod's address.
pub const PACKET_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
pub const SERVER_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 11),
    Ipv4Addr::new(10, 244, 1, 12),
    Ipv4Addr::new(10, 244, 1, 13),
];

/// Clients run on one CPU and every server (redis, haproxy, iperf3) on the other, so
/// each mode pays the same cross-CPU wake-ups instead of whatever the scheduler picked
/// that run: measured without pinning, that placement noise was larger than the
/// differences between modes.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// `taskset -c <cpu> argv...` on a command whose program is taskset (a no-op
/// `taskset -c 0-N` on a single-CPU machine).
fn pinned(mut cmd: Command, cpu: usize, argv: &[&str]) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let list = if cpus > SERVER_CPU {
        cpu.to_string()
    } else {
        format!("0-{}", cpus - 1)
    };
    cmd.args(["-c", &list]).args(argv);
    cmd
}

pub struct Topology {
    pub id: String,
    pub client_ns: String,
    /// The packet-mode client pod's namespace.
    pub packet_ns: String,
    /// Its cgroup (below `cgroup`), which the daemon's Pod manifest names.
    pub packet_cgroup: PathBuf,
    pub node_ns: String,
    pub server_ns: Vec<String>,
    /// Client processes of the `lb` mode run here; the daemon attaches to it.
    pub cgroup: Cgroup,
    pub work_dir: PathBuf,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(|_| ())
}

/// A veth from the node (`link`, up) to namespace `ns` (`eth0`, up, `addr`/24).
fn plug(node: &str, link: &str, ns: &str, addr: Ipv4Addr) -> Result<()> {
    ip(&[
        "-n", node, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", node, "link", "set", link, "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let mut cmd = netns_command(ns, None, "sh")?;
    cmd.args(["-c", &format!("echo '{value}' > {path}")]);
    let out = output_with_timeout(cmd, Duration::from_secs(5))?;
    if !out.status.success() {
        bail!(
            "sysctl {key}={value} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Topology {
    pub fn new() -> Result<Self> {
        let id = format!("{PREFIX}b{}", std::process::id());
        let work_dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&work_dir)?;
        let cgroup = Cgroup::create(&id)?;
        let mut topo = Self {
            client_ns: format!("{id}-client"),
            packet_ns: format!("{id}-packet"),
            packet_cgroup: cgroup.path.join("packet-pod"),
            node_ns: format!("{id}-node"),
            server_ns: (1..=SERVER_IPS.len())
                .map(|i| format!("{id}-srv{i}"))
                .collect(),
            cgroup,
            id,
            work_dir,
            children: Vec::new(),
        };
        topo.build()?;
        Ok(topo)
    }

    fn build(&mut self) -> Result<()> {
        let node = self.node_ns.clone();
        for ns in [&self.client_ns, &self.packet_ns, &node]
            .into_iter()
            .chain(&self.server_ns)
        {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        sysctl(&node, "net.ipv4.ip_forward", "1")?;
        // The iptables modes run hundreds of thousands of connections in minutes; with
        // the default 120 s TIME_WAIT their conntrack entries would fill the (global)
        // table and SYNs would be dropped. Only this namespace is affected.
        sysctl(
            &node,
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
            "1",
        )?;
        // haproxy opens one server connection per client connection from the node:
        // give it the same port range and TIME_WAIT reuse as the client, or its
        // connect() crawls through exhausted ports and the proxy looks worse than it is.
        sysctl(&node, "net.ipv4.ip_local_port_range", "1024 65535")?;
        // ... but never lb's SNAT ports (the default --snat-ports), which the daemon
        // requires of a node: a SNATed flow must not share a tuple with the node's
        // own connections (it refuses to attach its TC programs otherwise).
        sysctl(&node, "net.ipv4.ip_local_reserved_ports", "61000-65535")?;
        sysctl(&node, "net.ipv4.tcp_tw_reuse", "1")?;
        // The service range exists only as a blackhole on the node; the proxy's VIP is
        // local to it.
        ip(&["-n", &node, "route", "add", "blackhole", "10.96.0.0/12"])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{PROXY_VIP}/32"),
            "dev",
            "lo",
        ])?;

        // Clients <-> node.
        for (ns, link, subnet, addr) in [
            (self.client_ns.clone(), "to-client", 2, CLIENT_IP),
            (self.packet_ns.clone(), "to-packet", 3, PACKET_CLIENT_IP),
        ] {
            let gateway = format!("10.244.{subnet}.1");
            plug(&node, link, &ns, addr)?;
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gateway}/24"),
                "dev",
                link,
            ])?;
            // Only the sandbox's ranges, through the node.
            ip(&["-n", &ns, "route", "add", "10.244.0.0/16", "via", &gateway])?;
            ip(&["-n", &ns, "route", "add", "10.96.0.0/12", "via", &gateway])?;
            // Tens of thousands of short connections a second: widen the port range and
            // reuse TIME_WAIT ports (client namespaces only).
            sysctl(&ns, "net.ipv4.ip_local_port_range", "1024 65535")?;
            sysctl(&ns, "net.ipv4.tcp_tw_reuse", "1")?;
        }
        // The packet-mode pod: a process of its own (how lb finds its interface), in
        // its own cgroup.
        fs::create_dir_all(&self.packet_cgroup)?;
        let mut pod = netns_command(&self.packet_ns, Some(&self.packet_cgroup), "sleep")?;
        pod.arg("infinity").stdin(Stdio::null());
        self.children
            .push(pod.spawn().context("starting the packet-mode pod")?);

        // Servers on a bridge behind the node.
        ip(&["-n", &node, "link", "add", "br-srv", "type", "bridge"])?;
        ip(&["-n", &node, "addr", "add", "10.244.1.1/24", "dev", "br-srv"])?;
        ip(&["-n", &node, "link", "set", "br-srv", "up"])?;
        for (i, (ns, addr)) in self.server_ns.iter().zip(SERVER_IPS).enumerate() {
            let port = format!("s{i}");
            plug(&node, &port, ns, addr)?;
            ip(&["-n", &node, "link", "set", &port, "master", "br-srv"])?;
            ip(&["-n", ns, "route", "add", "default", "via", "10.244.1.1"])?;
        }
        Ok(())
    }

    /// Starts a long-running server process in `ns`, on the servers' CPU; stopped when
    /// the topology drops.
    pub fn spawn(&mut self, ns: &str, argv: &[&str], log: &str) -> Result<()> {
        let log = fs::File::create(self.work_dir.join(log))?;
        let mut cmd = pinned(netns_command(ns, None, "taskset")?, SERVER_CPU, argv);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.children.push(
            cmd.spawn()
                .with_context(|| format!("starting {}", argv[0]))?,
        );
        Ok(())
    }

    /// redis-server on every server, iperf3 on the first, haproxy on the node.
    pub fn start_servers(&mut self, haproxy_cfg: &str) -> Result<()> {
        let dir = self.work_dir.display().to_string();
        for (i, ns) in self.server_ns.clone().iter().enumerate() {
            self.spawn(
                ns,
                &[
                    "redis-server",
                    "--port",
                    "6379",
                    "--bind",
                    "0.0.0.0",
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--tcp-backlog",
                    "4096",
                    "--maxclients",
                    "20000",
                    "--dir",
                    &dir,
                ],
                &format!("redis-{i}.log"),
            )?;
        }
        let first = self.server_ns[0].clone();
        self.spawn(&first, &["iperf3", "-s"], "iperf3.log")?;
        let cfg = self.work_dir.join("haproxy.cfg");
        fs::write(&cfg, haproxy_cfg)?;
        let node = self.node_ns.clone();
        self.spawn(
            &node,
            &["haproxy", "-db", "-f", cfg.to_str().context("path")?],
            "haproxy.log",
        )?;
        // Wait until every server answers from the client.
        for addr in SERVER_IPS
            .iter()
            .map(|a| (a.to_string(), 6379))
            .chain([(PROXY_VIP.to_string(), 6379)])
        {
            self.wait_for_tcp(&addr.0, addr.1)?;
        }
        self.wait_for_tcp(&SERVER_IPS[0].to_string(), 5201)
    }

    fn wait_for_tcp(&self, host: &str, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = netns_command(&self.client_ns, None, "bash")?;
            cmd.args(["-c", &format!("exec 3<>/dev/tcp/{host}/{port}")]);
            if output_with_timeout(cmd, Duration::from_secs(2)).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{host}:{port} did not come up");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command in a client namespace (the packet-mode pod's for its cgroup), inside
    /// `cgroup` if given (the cgroup the load balancer is attached to, or the pod's).
    pub fn client_command(&self, cgroup: Option<&Path>, program: &Path) -> Result<Command> {
        let ns = if cgroup == Some(self.packet_cgroup.as_path()) {
            &self.packet_ns
        } else {
            &self.client_ns
        };
        let cmd = netns_command(ns, cgroup, "taskset")?;
        Ok(pinned(
            cmd,
            CLIENT_CPU,
            &[program.to_str().context("path")?],
        ))
    }

    pub fn node_command(&self, program: &str) -> Result<Command> {
        netns_command(&self.node_ns, None, program)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.client_ns, &self.packet_ns, &self.node_ns]
            .into_iter()
            .chain(&self.server_ns)
        {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = fs::remove_dir_all(&self.work_dir);
    }
}
