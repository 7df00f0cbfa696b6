//! Owns everything aya: loading the embedded eBPF object, pinning its maps and links
//! under one bpffs directory, attaching its programs, and typed access to the maps.
//!
//! The datapath outlives the daemon by design: links are pinned the moment they are
//! attached, so a crash, `kill -9`, an OOM kill or an upgrade changes nothing in the
//! kernel. A new daemon adopts the pinned maps, syncs them with its source and then
//! swaps its own programs into the pinned links atomically (`BPF_LINK_UPDATE`), so
//! there is no moment without a program and none with two. Only `lb cleanup` (or
//! `lb daemon --detach-on-exit`) removes the datapath.

mod batch;
pub mod features;
pub mod flows;
mod links;
mod maps;
pub mod netns;
pub mod pins;
pub mod pods;
pub mod sockets;
mod sys;
mod tc_netlink;
#[cfg(test)]
mod tc_tests;
pub mod uplink;

use std::{
    collections::BTreeSet,
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, Program, SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use lb_common::{map_names, stat};
use serde::Serialize;
use tracing::{info, warn};

pub use self::{
    features::{KernelFeatures, TcAttachMode},
    maps::{KernelMaps, MapSnapshot},
    pins::Capacities,
    sys::{bpffs_prepare, cgroup2_root, check_root},
};

/// The eBPF object built by `build.rs` from `lb-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-datapath"));

/// Every socket-address program in the object; each attaches to the cgroup hook its
/// ELF section names (`cgroup/connect4`, ...).
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_connect6",
    "lb_sendmsg4",
    "lb_sendmsg6",
    "lb_recvmsg4",
    "lb_recvmsg6",
    "lb_getpeername4",
    "lb_getpeername6",
];

/// Deletes a released socket's state (`cgroup/sock_release`); not loaded on kernels
/// without that hook.
const RELEASE_PROGRAM: &str = "lb_sock_release";

/// The programs this datapath runs on this kernel.
fn programs(capacities: &Capacities) -> Vec<&'static str> {
    let mut names = SOCK_ADDR_PROGRAMS.to_vec();
    if !capacities.legacy_sockets {
        names.push(RELEASE_PROGRAM);
    }
    names
}

/// The TC programs (node ports, external and load-balancer IPs from other machines),
/// each with the direction it attaches to on every external interface. Egress (the
/// reply path) first: an interface whose ingress program fails to attach then
/// translates nothing, rather than translating requests whose replies it cannot.
const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("lb_tc_egress", TcAttachType::Egress),
    ("lb_tc_ingress", TcAttachType::Ingress),
];

/// The TC programs on a packet-mode pod's host-side interface: its replies (egress,
/// as on an external interface) first, then what it sends.
const POD_TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("lb_tc_egress", TcAttachType::Egress),
    ("lb_tc_pod_ingress", TcAttachType::Ingress),
];

/// Pin-name prefix of a TC program attached through a netlink filter (the pin holds
/// the program, so `lb cleanup` can find the filters that run it).
const NETLINK_PIN_PREFIX: &str = "nl_";

/// Pin-name prefix of the links on packet-mode pods' interfaces: the workloads keep
/// those, not [`Datapath::activate`].
const POD_PIN_PREFIX: &str = "pod_";

/// How one interface's TC programs are attached, or why they are not.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TcDevice {
    pub device: String,
    /// `tcx` or `netlink` once attached.
    pub attachment: Option<&'static str>,
    /// Why attaching failed (tried again every `--tc-retry-seconds`).
    pub error: Option<String>,
}

/// How often interfaces whose TC programs failed to attach are tried again, by
/// default.
pub const TC_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// `bpf_link_type` of a TCX link.
const BPF_LINK_TYPE_TCX: u32 = 11;

/// Pin name of the TC link of `program` on `device` (bpffs forbids dots).
fn tc_pin_name(program: &str, device: &str) -> String {
    format!("{program}_{}", device.replace('.', "_"))
}

/// Sub-directory of the pin directory that holds pinned program links.
const LINKS_DIR: &str = "links";

#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// cgroup2 directory whose processes (and descendants) are load-balanced.
    pub cgroup: PathBuf,
    /// bpffs directory for pinned maps and links.
    pub pin_dir: PathBuf,
    pub capacities: Capacities,
    /// Interfaces for the TC programs; `None`: those holding the node's addresses.
    pub devices: Option<Vec<String>>,
    /// Network namespace holding the devices (default: the daemon's).
    pub netns: Option<PathBuf>,
    /// Entries of each Maglev table (a prime).
    pub maglev_size: u32,
    /// TCX links where available, or netlink filters always.
    pub tc_attach: TcAttachMode,
    /// How often interfaces whose TC programs failed to attach are tried again.
    pub tc_retry: std::time::Duration,
    /// Source ports of flows SNATed to the node.
    pub snat_ports: uplink::SnatPorts,
}

/// A loaded datapath: programs verified, maps pinned (adopted if they were already).
/// Its programs run once [`Datapath::activate`] points the pinned links at them.
pub struct Datapath {
    ebpf: Ebpf,
    options: DatapathOptions,
    layout: pins::Layout,
    active: bool,
    /// Interfaces the TC programs serve (resolved before activation).
    devices: Vec<String>,
    /// Per interface: how its TC programs are attached, or why not.
    tc_devices: Vec<TcDevice>,
    features: KernelFeatures,
    /// Held while this daemon owns the pin directory.
    _instance_lock: fs::File,
}

impl Datapath {
    /// Loads and verifies the programs, adopting maps already pinned in `pin_dir`
    /// (so a restart keeps the kernel state). Attaches nothing yet.
    pub fn load(mut options: DatapathOptions) -> Result<Self> {
        check_root()?;
        sys::raise_memlock_limit();
        options.cgroup = sys::resolve_cgroup2(&options.cgroup)?;
        let fresh = !options.pin_dir.exists();
        bpffs_prepare(&options.pin_dir)?;
        let instance_lock = match sys::lock_pin_dir(&options.pin_dir) {
            Ok(lock) => lock,
            Err(err) => {
                if fresh {
                    let _ = fs::remove_dir(&options.pin_dir);
                }
                return Err(err);
            }
        };
        let probed = features::Probed::probe();
        let features =
            KernelFeatures::describe(probed, options.tc_attach, options.capacities.legacy_sockets);
        info!(
            kernel = %features.release,
            "kernel features: {} (lb list shows what each means here)",
            features.summary()
        );
        if !probed.tcx {
            info!(
                "TC programs are attached as netlink clsact filters (no TCX links before \
                 6.6): they stay attached when the daemon exits and are replaced in place"
            );
        }
        if !probed.sock_destroy {
            warn!(
                "the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off): sockets \
                 connected to a removed backend stay until the client gives up"
            );
        }
        if options.capacities.legacy_sockets {
            warn!("socket tracking: LRU forced by --legacy-socket-tracking");
        } else if let Err(why) = sys::probe_socket_tracking() {
            warn!(
                "socket tracking: {why}; translated sockets are remembered in an LRU of \
                 --max-sockets entries, so under heavy socket churn a long-lived socket's \
                 entry can be evicted (getpeername() then shows the pod, and the socket is \
                 not terminated when its backend leaves)"
            );
            options.capacities.legacy_sockets = true;
        }
        let loaded = (|| {
            let layout = pins::prepare(&options.pin_dir, &options.capacities)?;
            let ebpf = load_object(&layout.dir, &options, probed.set_retval)?;
            info!(maps = %layout.dir.display(), "datapath loaded");
            Ok(Self {
                ebpf,
                options: options.clone(),
                layout,
                active: false,
                devices: Vec::new(),
                tc_devices: Vec::new(),
                features,
                _instance_lock: instance_lock,
            })
        })();
        if loaded.is_err() && fresh {
            // Leave no half-made pin directory behind.
            let _ = unpin_all(&options.pin_dir);
        }
        loaded
    }

    /// Takes the typed map handles (once).
    pub fn take_maps(&mut self) -> Result<KernelMaps> {
        let mut maps = KernelMaps::take(&mut self.ebpf, &self.options.capacities)?;
        maps.maglev_size = self.options.maglev_size;
        Ok(maps)
    }

    /// The capacities in force, with the socket-tracking mode the kernel allows.
    pub fn capacities(&self) -> Capacities {
        self.options.capacities
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Decides the interfaces the TC programs attach to: `--devices`, else those
    /// holding one of `node_addresses` (in `--netns`). Returns them.
    pub fn resolve_devices(&mut self, node_addresses: &[std::net::IpAddr]) -> Result<&[String]> {
        self.devices = match &self.options.devices {
            Some(devices) => devices.clone(),
            None => {
                let _netns = netns::NetnsGuard::enter(self.options.netns.as_deref())?;
                netns::devices_holding(node_addresses)?
            }
        };
        Ok(&self.devices)
    }

    /// Runs TC program `name` on `packet` (`BPF_PROG_TEST_RUN`): its verdict and the
    /// packet as it left.
    #[cfg(test)]
    pub fn test_run_tc(&self, name: &str, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// The interfaces the TC programs serve.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// The namespace of the devices (`--netns`).
    pub fn netns(&self) -> Option<&Path> {
        self.options.netns.as_deref()
    }

    /// The optional kernel features and what is used of them.
    pub fn features(&self) -> &KernelFeatures {
        &self.features
    }

    /// Per interface: how the TC programs are attached, or why they are not.
    pub fn tc_devices(&self) -> &[TcDevice] {
        &self.tc_devices
    }

    /// How often failed TC attachments are tried again.
    pub fn tc_retry(&self) -> std::time::Duration {
        self.options.tc_retry
    }

    /// Whether TC programs attach as TCX links (else as netlink filters).
    fn uses_tcx(&self) -> bool {
        self.features.get("tcx").is_some_and(|f| f.available)
            && self.options.tc_attach == TcAttachMode::Auto
    }

    /// Attaches (or swaps in place) the TC programs on every interface in `devices`.
    /// A failure is recorded for its interface only (and logged): the socket path and
    /// the other interfaces never wait for it. Returns (updated, attached) counts.
    fn attach_tc(&mut self, links_dir: &Path, devices: &[String]) -> (usize, usize) {
        let (mut updated, mut attached) = (0, 0);
        let entered = netns::NetnsGuard::enter(self.options.netns.as_deref());
        for device in devices {
            let result = match &entered {
                Ok(_) => self.attach_device(links_dir, device),
                Err(err) => Err(anyhow::anyhow!("{err:#}")),
            };
            let status = match result {
                Ok((u, a, via)) => {
                    updated += u;
                    attached += a;
                    TcDevice {
                        device: device.clone(),
                        attachment: Some(via),
                        error: None,
                    }
                }
                Err(err) => {
                    warn!(
                        device = %device,
                        "TC programs not attached: {err:#}; node ports, external and \
                         load-balancer IPs are not served from other machines through this \
                         interface (tried again every {:?})",
                        self.options.tc_retry
                    );
                    TcDevice {
                        device: device.clone(),
                        attachment: None,
                        error: Some(format!("{err:#}")),
                    }
                }
            };
            match self.tc_devices.iter_mut().find(|d| d.device == *device) {
                Some(known) => *known = status,
                None => self.tc_devices.push(status),
            }
        }
        (updated, attached)
    }

    /// Attaches both TC programs to `device` in the current namespace: (updated,
    /// attached, how).
    fn attach_device(
        &mut self,
        links_dir: &Path,
        device: &str,
    ) -> Result<(usize, usize, &'static str)> {
        uplink::require_ethernet(device)?;
        // Checked where the programs attach (the devices' namespace), and again at
        // every retry: fixing the sysctl is enough.
        if let Some(why) = self.options.snat_ports.conflict_here() {
            bail!(why);
        }
        let tcx = self.uses_tcx();
        let (updated, attached) = self.attach_programs(links_dir, device, &TC_PROGRAMS, "")?;
        Ok((updated, attached, if tcx { "tcx" } else { "netlink" }))
    }

    /// Attaches `programs` to `device` (in the current namespace), pinned under
    /// `pin_prefix`: (updated, attached).
    fn attach_programs(
        &mut self,
        links_dir: &Path,
        device: &str,
        programs: &[(&str, TcAttachType)],
        pin_prefix: &str,
    ) -> Result<(usize, usize)> {
        let ifindex = ifindex(device)?;
        let tcx = self.uses_tcx();
        if !tcx {
            match aya::programs::tc::qdisc_add_clsact(device) {
                Ok(()) => info!(device, "added a clsact qdisc for the TC programs"),
                // Already there (ours from before, or someone else's: shared).
                Err(aya::programs::tc::TcError::NetlinkError(err))
                    if err.raw_os_error() == Some(libc::EEXIST) => {}
                Err(err) => return Err(err).context("adding a clsact qdisc"),
            }
        }
        let (mut updated, mut attached) = (0, 0);
        for &(name, direction) in programs {
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            let pin_name = format!("{pin_prefix}{}", tc_pin_name(name, device));
            let names = (name, pin_name.as_str());
            let replaced = if tcx {
                attach_tcx(program, links_dir, device, ifindex, names, direction)?
            } else {
                attach_netlink(program, links_dir, device, ifindex, names, direction)?
            };
            if replaced {
                updated += 1;
            } else {
                attached += 1;
            }
        }
        Ok((updated, attached))
    }

    /// Attaches the packet-mode programs to a pod's host-side interface `device` (in
    /// the devices' namespace); returns its ifindex there. Pinned, so they outlive the
    /// daemon like the others and a restart adopts them.
    pub fn attach_pod_interface(&mut self, device: &str) -> Result<u32> {
        let links_dir = self.options.pin_dir.join(LINKS_DIR);
        sys::create_private_dir(&links_dir)?;
        let _entered = netns::NetnsGuard::enter(self.options.netns.as_deref())?;
        uplink::require_ethernet(device)?;
        self.attach_programs(&links_dir, device, &POD_TC_PROGRAMS, POD_PIN_PREFIX)
            .with_context(|| format!("attaching the packet-mode programs to {device}"))?;
        ifindex(device)
    }

    /// The interfaces (as pinned: dots made underscores) that carry packet-mode
    /// programs.
    pub fn pod_interfaces_pinned(&self) -> BTreeSet<String> {
        let links_dir = self.options.pin_dir.join(LINKS_DIR);
        let Ok(entries) = fs::read_dir(&links_dir) else {
            return BTreeSet::new();
        };
        let prefixes: Vec<String> = POD_TC_PROGRAMS
            .iter()
            .flat_map(|(name, _)| {
                let pin = format!("{POD_PIN_PREFIX}{name}_");
                [format!("{NETLINK_PIN_PREFIX}{pin}"), pin]
            })
            .collect();
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                prefixes
                    .iter()
                    .find_map(|p| name.strip_prefix(p.as_str()).map(str::to_string))
            })
            .filter(|device| !device.ends_with("_new"))
            .collect()
    }

    /// Removes the packet-mode programs from `device` (gone already, or its pod left
    /// packet mode for good).
    pub fn detach_pod_interface(&mut self, device: &str) {
        let links_dir = self.options.pin_dir.join(LINKS_DIR);
        let pins: Vec<String> = POD_TC_PROGRAMS
            .iter()
            .flat_map(|(name, _)| {
                let pin = format!("{POD_PIN_PREFIX}{}", tc_pin_name(name, device));
                [format!("{NETLINK_PIN_PREFIX}{pin}"), pin]
            })
            .filter(|pin| links_dir.join(pin).exists())
            .collect();
        self.detach_stale_netlink(&links_dir, &pins);
        for pin in pins {
            let _ = fs::remove_file(links_dir.join(pin));
        }
    }

    /// Tries again the interfaces whose TC programs failed to attach; returns whether
    /// any is still failing.
    pub fn retry_tc(&mut self) -> bool {
        let failed: Vec<String> = self
            .tc_devices
            .iter()
            .filter(|d| d.error.is_some())
            .map(|d| d.device.clone())
            .collect();
        if !failed.is_empty() {
            let links_dir = self.options.pin_dir.join(LINKS_DIR);
            self.attach_tc(&links_dir, &failed);
            for device in self
                .tc_devices
                .iter()
                .filter(|d| failed.contains(&d.device))
            {
                if let Some(via) = device.attachment {
                    info!(device = %device.device, attachment = via, "TC programs attached on retry");
                }
            }
        }
        self.tc_devices.iter().any(|d| d.error.is_some())
    }

    /// Pin names of the TC programs on `device`, in either attachment.
    fn tc_pins(device: &str) -> Vec<String> {
        TC_PROGRAMS
            .iter()
            .flat_map(|(name, _)| {
                let pin = tc_pin_name(name, device);
                [format!("{NETLINK_PIN_PREFIX}{pin}"), pin]
            })
            .collect()
    }

    /// Removes the netlink filters of programs pinned as `stale` (pin names under
    /// `links_dir`) from the devices' namespace.
    fn detach_stale_netlink(&self, links_dir: &Path, stale: &[String]) {
        let ids: Vec<u32> = stale
            .iter()
            .filter(|n| n.starts_with(NETLINK_PIN_PREFIX))
            .filter_map(|n| links::open_pinned(&links_dir.join(n)).ok())
            .filter_map(|fd| links::program_id(fd.as_fd()).ok())
            .collect();
        if ids.is_empty() {
            return;
        }
        let removed = netns::NetnsGuard::enter(self.options.netns.as_deref())
            .and_then(|_guard| Ok(tc_netlink::delete_running(&ids)?));
        match removed {
            Ok(n) => info!(
                filters = n,
                "removed TC filters of interfaces no longer served"
            ),
            Err(err) => warn!("removing TC filters of interfaces no longer served: {err:#}"),
        }
    }

    /// Makes this build's programs the ones that run: a link pinned by a previous run
    /// on the same cgroup is updated in place (atomically); otherwise a new link is
    /// attached and pinned at once, and a pinned link on another cgroup is replaced
    /// after the new one is in place.
    pub fn activate(&mut self) -> Result<()> {
        let links_dir = self.options.pin_dir.join(LINKS_DIR);
        sys::create_private_dir(&links_dir)?;
        let cgroup_path = &self.options.cgroup.clone();
        let cgroup = fs::File::open(cgroup_path)
            .with_context(|| format!("opening cgroup {}", cgroup_path.display()))?;
        let cgroup_id = links::cgroup_id(cgroup_path)?;
        let (mut updated, mut attached) = (0, 0);
        let names = programs(&self.options.capacities);
        for name in &names {
            let program = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?;
            let pin = links_dir.join(name);
            if let Ok(link) = links::open_pinned(&pin) {
                let info = links::link_info(link.as_fd())
                    .with_context(|| format!("reading pinned link {}", pin.display()))?;
                if info.link_type == links::BPF_LINK_TYPE_CGROUP && info.cgroup_id == cgroup_id {
                    links::update(link.as_fd(), program.fd()?.as_fd())
                        .with_context(|| format!("updating pinned link {}", pin.display()))?;
                    updated += 1;
                    continue;
                }
                info!(link = %pin.display(), "pinned link is attached elsewhere; replacing it");
            }
            let link = attach_cgroup(program, &cgroup)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup_path.display()))?;
            pin_link(link, &links_dir, name)?;
            attached += 1;
        }
        let devices = self.devices.clone();
        let (tc_updated, tc_attached) = self.attach_tc(&links_dir, &devices);
        updated += tc_updated;
        attached += tc_attached;
        // Links of programs this build no longer has, or of devices no longer served,
        // or attached the other way (TCX or netlink) than this daemon attaches.
        let tcx = self.uses_tcx();
        let served: Vec<String> = self
            .tc_devices
            .iter()
            .flat_map(|d| {
                // A device that failed keeps whatever a previous daemon left serving.
                Self::tc_pins(&d.device).into_iter().filter(move |pin| {
                    d.error.is_some() || pin.starts_with(NETLINK_PIN_PREFIX) != tcx
                })
            })
            .collect();
        let stale: Vec<String> = fs::read_dir(&links_dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| {
                let pod = name.starts_with(POD_PIN_PREFIX)
                    || name.starts_with(&format!("{NETLINK_PIN_PREFIX}{POD_PIN_PREFIX}"));
                !pod && !names.contains(&name.as_str())
                    && !served.contains(name)
                    && !name.ends_with("_new")
            })
            .collect();
        self.detach_stale_netlink(&links_dir, &stale);
        for name in &stale {
            warn!(link = %links_dir.join(name).display(), "removing a pinned link this build has no program or interface for");
            let _ = fs::remove_file(links_dir.join(name));
        }
        self.active = true;
        info!(
            cgroup = %cgroup_path.display(),
            pin_dir = %self.options.pin_dir.display(),
            links_updated = updated,
            links_attached = attached,
            tc = ?self.tc_devices,
            "datapath attached"
        );
        // Nothing uses the old maps any more.
        pins::finish(&self.options.pin_dir, &mut self.layout)?;
        Ok(())
    }

    /// Starts forwarding aya-log records from the programs to `tracing`.
    pub fn start_logger(&mut self) {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            // SAFETY: the logger owns its ring-buffer fd and lives inside the AsyncFd
            // until the task ends; the fd is never closed or replaced meanwhile.
            Ok(logger) => match unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            } {
                Ok(mut logger) => {
                    tokio::spawn(async move {
                        loop {
                            let Ok(mut guard) = logger.readable_mut().await else {
                                break;
                            };
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                    });
                }
                Err(err) => warn!("eBPF log forwarding unavailable: {err}"),
            },
            Err(err) => warn!("eBPF log forwarding unavailable: {err}"),
        }
    }

    /// Stops the daemon's side. The pinned links and maps stay (connections keep being
    /// balanced until the next `lb daemon` adopts them) unless `detach` is set.
    pub fn shutdown(self, detach: bool) -> Result<()> {
        let pin_dir = self.options.pin_dir.clone();
        drop(self.ebpf);
        if detach {
            cleanup(&pin_dir, self.options.netns.as_deref())?;
            info!(pin_dir = %pin_dir.display(), "datapath detached and unpinned");
        } else {
            info!(pin_dir = %pin_dir.display(), "datapath left attached and pinned");
        }
        Ok(())
    }
}

/// Attaches `program` to `device` as a TCX link, or swaps it into the link a previous
/// daemon pinned there; returns whether it swapped.
fn attach_tcx(
    program: &mut SchedClassifier,
    links_dir: &Path,
    device: &str,
    ifindex: u32,
    (name, pin_name): (&str, &str),
    direction: TcAttachType,
) -> Result<bool> {
    let pin = links_dir.join(pin_name);
    if let Ok(link) = links::open_pinned(&pin) {
        let info = links::link_info(link.as_fd())
            .with_context(|| format!("reading pinned link {}", pin.display()))?;
        if info.link_type == BPF_LINK_TYPE_TCX && info.cgroup_id as u32 == ifindex {
            links::update(link.as_fd(), program.fd()?.as_fd())
                .with_context(|| format!("updating pinned link {}", pin.display()))?;
            return Ok(true);
        }
    }
    let id = program
        .attach_with_options(
            device,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching {name} as a TCX link"))?;
    let link = FdLink::try_from(program.take_link(id)?).context("TCX link is not fd-based")?;
    pin_link(link, links_dir, pin_name)?;
    Ok(false)
}

/// Attaches `program` to `device` as a netlink filter at our priority and handle, or
/// replaces the program of our filter there (atomically, as a TCX link update would);
/// pins the program; returns whether it replaced. The filter outlives the daemon.
fn attach_netlink(
    program: &mut SchedClassifier,
    links_dir: &Path,
    device: &str,
    ifindex: u32,
    (name, pin_name): (&str, &str),
    direction: TcAttachType,
) -> Result<bool> {
    let hook = if direction == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    };
    let existing = tc_netlink::filters(ifindex, direction)
        .with_context(|| format!("listing the filters of the {hook} hook"))?
        .into_iter()
        .find(|f| f.priority == tc_netlink::PRIORITY && f.handle == tc_netlink::HANDLE);
    let handle = TcHandle::from(tc_netlink::HANDLE);
    let (id, replaced) = match existing {
        Some(filter) if filter.is_ours() => {
            let link = SchedClassifierLink::attached(
                device,
                direction,
                tc_netlink::PRIORITY,
                handle,
                None,
            )?;
            let id = program
                .attach_to_link(link)
                .with_context(|| format!("replacing the program of our {hook} filter"))?;
            (id, true)
        }
        Some(filter) => bail!(
            "priority {} handle {:#x} of the {hook} hook holds someone else's {} filter {:?}",
            tc_netlink::PRIORITY,
            tc_netlink::HANDLE,
            filter.kind,
            filter.program_name.unwrap_or_default()
        ),
        None => {
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: tc_netlink::PRIORITY,
                handle,
                classid: None,
            });
            let id = program
                .attach_with_options(device, direction, options)
                .with_context(|| format!("attaching {name} as a netlink filter"))?;
            (id, false)
        }
    };
    // Dropping the link would delete the filter: it stays when the daemon exits, like
    // a pinned link, and the next daemon replaces its program in place.
    std::mem::forget(program.take_link(id)?);
    let pin_name = format!("{NETLINK_PIN_PREFIX}{pin_name}");
    let staging = links_dir.join(format!("{pin_name}_new"));
    let _ = fs::remove_file(&staging);
    links::pin(program.fd()?.as_fd(), &staging)
        .with_context(|| format!("pinning program {}", staging.display()))?;
    fs::rename(&staging, links_dir.join(&pin_name))
        .with_context(|| format!("pinning program {pin_name}"))?;
    Ok(replaced)
}

/// Pins `link` as `links_dir/name`: under a temporary name first (bpffs forbids dots
/// in names), then renamed over any old pin, so the old link (if any) detaches only
/// once the new one is attached and pinned.
fn pin_link(link: FdLink, links_dir: &Path, name: &str) -> Result<()> {
    let staging = links_dir.join(format!("{name}_new"));
    let pin = links_dir.join(name);
    let _ = fs::remove_file(&staging);
    link.pin(&staging)
        .with_context(|| format!("pinning link {}", staging.display()))?;
    fs::rename(&staging, &pin).with_context(|| format!("pinning link {}", pin.display()))?;
    Ok(())
}

/// Attaches a cgroup program of either kind the object has and returns its link.
fn attach_cgroup(program: &mut Program, cgroup: &fs::File) -> Result<FdLink> {
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()
        }
        Program::CgroupSock(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()
        }
        other => bail!("unexpected program type {:?}", other.prog_type()),
    }
    .context("cgroup link is not fd-based")?;
    Ok(link)
}

fn load_object(maps_dir: &Path, options: &DatapathOptions, has_set_retval: bool) -> Result<Ebpf> {
    let capacities = &options.capacities;
    if !has_set_retval {
        warn!(
            "kernel lacks bpf_set_retval (< 5.18): connections to services without \
             endpoints fail with EPERM instead of ECONNREFUSED"
        );
    }
    let flag = u8::from(has_set_retval);
    let track_sockets = u8::from(!capacities.legacy_sockets);
    let (snat_first, snat_count) = (
        u32::from(options.snat_ports.first),
        options.snat_ports.count(),
    );
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(maps_dir)
        .override_global("LB_CONFIG_HAS_SET_RETVAL", &flag, true)
        .override_global("LB_CONFIG_TRACK_SOCKETS", &track_sockets, true)
        .override_global("LB_CONFIG_MAGLEV_SIZE", &options.maglev_size, true)
        .override_global("LB_CONFIG_SNAT_PORT_MIN", &snat_first, true)
        .override_global("LB_CONFIG_SNAT_PORTS", &snat_count, true);
    for def in &lb_common::maps::ALL {
        loader.map_max_entries(def.name, capacities.entries(def));
    }
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    // aya reuses a pinned map without looking at it: make sure every map (adopted or
    // created) is what this build declares.
    for def in &lb_common::maps::ALL {
        if let Some(why) = pins::mismatch(&maps_dir.join(def.name), def, capacities.entries(def)) {
            bail!(
                "the map pinned at {} is not what this build expects: {why}",
                maps_dir.display()
            );
        }
    }
    let tc_names = TC_PROGRAMS
        .iter()
        .chain(&POD_TC_PROGRAMS)
        .map(|(name, _)| *name)
        .collect::<BTreeSet<_>>();
    for name in programs(capacities).into_iter().chain(tc_names) {
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?;
        match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            other => bail!("unexpected program type {:?} for {name}", other.prog_type()),
        }
        .with_context(|| format!("verifying program {name}"))?;
    }
    Ok(ebpf)
}

/// Removes every pin under `pin_dir` (links first, so the programs detach before
/// their maps go; then every map set) and the directory itself.
fn unpin_all(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let links_dir = pin_dir.join(LINKS_DIR);
    let mut dirs = vec![links_dir.clone()];
    dirs.extend(
        fs::read_dir(pin_dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && *p != links_dir),
    );
    for dir in dirs.iter().filter(|d| d.exists()) {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
        fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    for entry in fs::read_dir(pin_dir)? {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(())
}

/// Detaches the datapath pinned at `pin_dir` and removes its pins: what `lb cleanup`
/// does for an instance that will not come back. Unpinning a link drops its last
/// reference, which detaches the program; netlink filters are deleted first, wherever
/// they are: in `netns`, this namespace, or any namespace named under `/run/netns`.
pub fn cleanup(pin_dir: &Path, netns: Option<&Path>) -> Result<()> {
    let links_dir = pin_dir.join(LINKS_DIR);
    let ids: Vec<u32> = fs::read_dir(&links_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(NETLINK_PIN_PREFIX)
        })
        .filter_map(|e| links::open_pinned(&e.path()).ok())
        .filter_map(|fd| links::program_id(fd.as_fd()).ok())
        .collect();
    if !ids.is_empty() {
        let mut namespaces: Vec<Option<PathBuf>> = vec![None];
        namespaces.extend(netns.map(|p| Some(p.to_path_buf())));
        namespaces.extend(
            fs::read_dir("/run/netns")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| Some(e.path())),
        );
        let mut deleted = 0;
        for ns in &namespaces {
            // A dedicated thread: entering a namespace must not move the caller.
            let result = std::thread::scope(|scope| {
                scope
                    .spawn(|| -> Result<usize> {
                        let _guard = netns::NetnsGuard::enter(ns.as_deref())?;
                        Ok(tc_netlink::delete_running(&ids)?)
                    })
                    .join()
            });
            match result {
                Ok(Ok(n)) => deleted += n,
                Ok(Err(err)) => tracing::debug!(netns = ?ns, "no TC filters removed: {err:#}"),
                Err(_) => warn!(netns = ?ns, "TC filter removal thread panicked"),
            }
        }
        info!(filters = deleted, "removed the TC netlink filters");
    }
    unpin_all(pin_dir)
}

/// Programs attached by `pin_dir`'s datapath: (through pinned links, TC programs
/// through netlink filters).
pub fn attached_programs(pin_dir: &Path) -> (usize, usize) {
    let Ok(entries) = fs::read_dir(pin_dir.join(LINKS_DIR)) else {
        return (0, 0);
    };
    let (mut linked, mut netlink) = (0, 0);
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(NETLINK_PIN_PREFIX)
        {
            netlink += 1;
        } else if links::open_pinned(&entry.path())
            .and_then(|fd| links::link_info(fd.as_fd()))
            .is_ok_and(|info| info.prog_id != 0)
        {
            linked += 1;
        }
    }
    (linked, netlink)
}

pub use sys::{ensure_bpffs, lock_holder};

/// The index of `device` in the current network namespace.
fn ifindex(device: &str) -> Result<u32> {
    let name = std::ffi::CString::new(device)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no network interface {device:?}");
    }
    Ok(index)
}

/// Reads the global decision counters (`LB_STATS`) and the socket map's fill from the
/// pins, for metrics.
pub struct StatsReader {
    stats: PerCpuArray<MapData, u64>,
    /// The socket map in use, its name and descriptor.
    sockets: (&'static str, std::os::fd::OwnedFd),
}

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsReader")
    }
}

impl StatsReader {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let dir = pins::readable_dir(pin_dir)?;
        let data = MapData::from_pin(dir.join(map_names::STATS))?;
        // The map not in use holds one entry.
        let lru = aya::maps::MapInfo::from_pin(dir.join(map_names::SOCK_REVNAT_LRU))?;
        let name = if lru.max_entries() > 1 {
            map_names::SOCK_REVNAT_LRU
        } else {
            map_names::SOCK_REVNAT
        };
        let sockets = MapData::from_pin(dir.join(name))?;
        Ok(Self {
            stats: Map::from_map_data(data)?.try_into()?,
            sockets: (name, sockets.fd().as_fd().try_clone_to_owned()?),
        })
    }

    /// (counter name, value summed over CPUs).
    pub fn read(&self) -> Result<Vec<(&'static str, u64)>> {
        (0..stat::COUNT)
            .filter(|i| stat::NAMES[*i as usize] != "reserved")
            .map(|i| {
                let per_cpu = self.stats.get(&i, 0)?;
                Ok((stat::NAMES[i as usize], per_cpu.iter().sum()))
            })
            .collect()
    }

    /// The socket map's name and how many sockets it remembers.
    pub fn tracked_sockets(&self) -> Result<(&'static str, usize)> {
        let entries = batch::lookup_all::<lb_common::SockRevKey, lb_common::SockRevValue>(
            self.sockets.1.as_fd(),
        )?;
        Ok((self.sockets.0, entries.len()))
    }
}

/// `max_entries` of every map under `capacities`, for metrics.
pub fn capacities(capacities: &Capacities) -> Vec<(String, u64)> {
    lb_common::maps::ALL
        .iter()
        // Socket storage has no capacity: it grows with the sockets.
        .filter(|def| def.kind != lb_common::MapKind::SkStorage)
        .map(|def| (def.name.to_string(), capacities.entries(def) as u64))
        .collect()
}
