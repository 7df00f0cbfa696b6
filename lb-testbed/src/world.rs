//! A world of several nodes for the Kubernetes and NodePort tests: each node is a
//! network namespace (its "host network") with a bridge for its pods, a podCIDR of its
//! own and an uplink to a shared fabric; an optional "outside" client sits on the
//! fabric too and reaches the nodes' addresses only.
//!
//! Addresses (world `w`, node `n` counted from 1), all inside these namespaces:
//! - node uplink: 10.253.w.(10+n)/24 and fd00:253:w::(10+n)/64 on the fabric;
//! - node podCIDR: 10.244.(4w+n).0/24 and fd00:244:(4w+n)::/64, gateway .1 on the
//!   node's bridge; each node routes the other nodes' podCIDRs over the fabric;
//! - outside client: 10.253.w.100 and fd00:253:w::100, routes to the fabric only;
//!   ephemeral ports 50000-60999 (tests bind lower ones themselves).
//!
//! No namespace has a default route, and the service ranges are blackholed in all
//! of them, so nothing can leave the machine. Everything is removed on drop.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};

use crate::{Cgroup, PREFIX, Pod, SERVICE_RANGE_V4, SERVICE_RANGE_V6, ip, netns_command};

static NEXT_WORLD: AtomicU32 = AtomicU32::new(0);

/// One simulated node's host network.
#[derive(Debug)]
pub struct NodeNet {
    pub name: String,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node's podCIDRs (IPv4 /24 and IPv6 /64).
    pub pod_cidr_v4: String,
    pub pod_cidr_v6: String,
    /// Processes of this node's pods (and the node's daemon attaches here).
    pub cgroup: Cgroup,
    subnet: u8,
    /// Host numbers in use in the podCIDR, and the last one handed out: addresses are
    /// allocated round-robin like host-local IPAM, so a new pod never inherits the
    /// address (and stale neighbour entries) of one that just left.
    hosts: Mutex<(Vec<u8>, u8)>,
}

impl NodeNet {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }

    fn pod_v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, host)
    }

    fn pod_v6(&self, host: u8) -> Ipv6Addr {
        format!("fd00:244:{:x}::{:x}", self.subnet, host)
            .parse()
            .expect("valid address")
    }
}

pub struct World {
    pub id: String,
    index: u8,
    fabric_netns: String,
    pub nodes: Vec<NodeNet>,
    pods: Mutex<Vec<Pod>>,
}

impl World {
    /// Creates the fabric and `node_names.len()` nodes.
    pub fn new(node_names: &[&str]) -> Result<Self> {
        let index = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        if index >= 60 {
            bail!("too many worlds in one process (the address plan has room for 60)");
        }
        let index = index as u8;
        let id = format!("{PREFIX}{}w{index}", std::process::id());
        let fabric_netns = format!("{id}-fabric");
        let mut world = Self {
            id,
            index,
            fabric_netns: fabric_netns.clone(),
            nodes: Vec::new(),
            pods: Mutex::new(Vec::new()),
        };
        ip(&["netns", "add", &fabric_netns])?;
        let f = fabric_netns.as_str();
        ip(&["-n", f, "link", "set", "lo", "up"])?;
        ip(&["-n", f, "link", "add", "fab0", "type", "bridge"])?;
        ip(&["-n", f, "link", "set", "fab0", "up"])?;
        for (i, name) in node_names.iter().enumerate() {
            let node = world.make_node(name, i as u8 + 1)?;
            world.nodes.push(node);
        }
        // Every node routes every other node's podCIDR through that node.
        for node in &world.nodes {
            for other in world.nodes.iter().filter(|o| o.name != node.name) {
                ip(&[
                    "-n",
                    &node.netns,
                    "route",
                    "add",
                    &other.pod_cidr_v4,
                    "via",
                    &other.ipv4.to_string(),
                ])?;
                ip(&[
                    "-n",
                    &node.netns,
                    "-6",
                    "route",
                    "add",
                    &other.pod_cidr_v6,
                    "via",
                    &other.ipv6.to_string(),
                ])?;
            }
        }
        Ok(world)
    }

    fn fabric_v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 253, self.index, host)
    }

    fn fabric_v6(&self, host: u8) -> Ipv6Addr {
        format!("fd00:253:{:x}::{:x}", self.index, host)
            .parse()
            .expect("valid address")
    }

    /// A veth pair from the fabric bridge into `netns`, named `eth0` there.
    fn plug_into_fabric(&self, netns: &str, port: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
        let f = self.fabric_netns.as_str();
        ip(&[
            "-n", f, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        ip(&["-n", f, "link", "set", port, "master", "fab0", "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{v4}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            netns,
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn make_node(&self, name: &str, n: u8) -> Result<NodeNet> {
        let netns = format!("{}-{name}", self.id);
        let subnet = self.index * 4 + n;
        ip(&["netns", "add", &netns])?;
        let cgroup = Cgroup::create(&netns)?;
        let node = NodeNet {
            name: name.to_string(),
            netns: netns.clone(),
            ipv4: self.fabric_v4(10 + n),
            ipv6: self.fabric_v6(10 + n),
            pod_cidr_v4: format!("10.244.{subnet}.0/24"),
            pod_cidr_v6: format!("fd00:244:{subnet:x}::/64"),
            cgroup,
            subnet,
            hosts: Mutex::new((Vec::new(), 1)),
        };
        let ns = netns.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        self.plug_into_fabric(ns, &format!("n{n}"), node.ipv4, node.ipv6)?;
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", ns, "link", "set", "br0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", node.pod_v4(1)),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{}/64", node.pod_v6(1)),
            "dev",
            "br0",
            "nodad",
        ])?;
        sysctl(ns, "net.ipv4.ip_forward", "1")?;
        sysctl(ns, "net.ipv6.conf.all.forwarding", "1")?;
        blackhole(ns)?;
        Ok(node)
    }

    pub fn node(&self, name: &str) -> &NodeNet {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in world {}", self.id))
    }

    /// Adds a pod network namespace on `node`'s bridge with the next free addresses of
    /// its podCIDR.
    pub fn add_pod(&self, node: &NodeNet, name: &str) -> Result<Pod> {
        let host = {
            let mut guard = node.hosts.lock().expect("lock");
            let (used, last) = &mut *guard;
            let host = (1..=249u8)
                .map(|step| ((*last as i32 - 2 + step as i32).rem_euclid(249) + 2) as u8)
                .find(|h| !used.contains(h))
                .context("the node's podCIDR is full")?;
            used.push(host);
            *last = host;
            host
        };
        let netns = format!("{}-p{}-{host}", self.id, node.subnet);
        let pod = Pod {
            name: name.to_string(),
            netns: netns.clone(),
            ipv4: node.pod_v4(host),
            ipv6: node.pod_v6(host),
        };
        let made = (|| -> Result<()> {
            ip(&["netns", "add", &netns])?;
            let peer = format!("p{host}");
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &node.netns,
                "link",
                "add",
                &peer,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns,
            ])?;
            ip(&[
                "-n",
                &node.netns,
                "link",
                "set",
                &peer,
                "master",
                "br0",
                "up",
            ])?;
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
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &node.pod_v4(1).to_string(),
            ])?;
            ip(&[
                "-n",
                &netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &node.pod_v6(1).to_string(),
            ])?;
            blackhole(&netns)?;
            Ok(())
        })();
        if let Err(err) = made {
            let _ = ip(&["netns", "del", &netns]);
            node.hosts.lock().expect("lock").0.retain(|h| *h != host);
            return Err(err);
        }
        self.pods.lock().expect("lock").push(pod.clone());
        Ok(pod)
    }

    /// Removes a pod's network namespace (its processes must be gone).
    pub fn remove_pod(&self, pod: &Pod) {
        let _ = ip(&["netns", "del", &pod.netns]);
        self.pods
            .lock()
            .expect("lock")
            .retain(|p| p.netns != pod.netns);
        for node in &self.nodes {
            let octets = pod.ipv4.octets();
            if octets[2] == node.subnet {
                node.hosts
                    .lock()
                    .expect("lock")
                    .0
                    .retain(|h| *h != octets[3]);
            }
        }
    }

    /// Adds the outside client on the fabric: it reaches the nodes' addresses and
    /// nothing else.
    pub fn add_outside(&self, name: &str) -> Result<Pod> {
        let netns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &netns])?;
        let pod = Pod {
            name: name.to_string(),
            netns: netns.clone(),
            ipv4: self.fabric_v4(100),
            ipv6: self.fabric_v6(100),
        };
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        self.plug_into_fabric(&netns, "out", pod.ipv4, pod.ipv6)?;
        blackhole(&netns)?;
        // Tests bind source ports below 50000 explicitly (with SO_REUSEADDR); an
        // ephemeral connection of the client's in TIME_WAIT on one of them would make
        // that bind fail.
        sysctl(&netns, "net.ipv4.ip_local_port_range", "50000 60999")?;
        self.pods.lock().expect("lock").push(pod.clone());
        Ok(pod)
    }

    /// A command in `pod`'s network namespace, inside `cgroup` if given (processes in a
    /// node's cgroup are balanced by that node's daemon).
    pub fn command(&self, pod: &Pod, cgroup: Option<&Path>, program: &str) -> Result<Command> {
        netns_command(&pod.netns, cgroup, program)
    }
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    crate::run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )?;
    Ok(())
}

fn blackhole(netns: &str) -> Result<()> {
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

impl Drop for World {
    fn drop(&mut self) {
        for pod in self.pods.lock().expect("lock").drain(..) {
            let _ = ip(&["netns", "del", &pod.netns]);
        }
        for node in &self.nodes {
            let _ = ip(&["netns", "del", &node.netns]);
        }
        let _ = ip(&["netns", "del", &self.fabric_netns]);
    }
}
