//! This node's pods and their load-balancing modes ([`crate::model::workloads`]),
//! kept in `LB_WORKLOADS` by pod cgroup: the socket hooks leave pods in `packet` or
//! `off` mode alone, and `packet` pods are balanced by the TC programs on their
//! host-side interface instead.
//!
//! A pod is known by its cgroup: the kubelet gives each pod a directory named after
//! its uid (`pod<uid>` with the cgroupfs driver, `kubepods-<qos>-pod<uid_>.slice` with
//! systemd), which its containers' cgroups sit in. The Pod object usually arrives
//! before the kubelet has made that directory, so pods whose directory is not there
//! yet are looked for again every [`RETRY`] until it is (or the pod goes). Until then
//! such a pod is balanced by the socket hooks, as every pod is by default.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    model::{
        ObjectRef,
        workloads::{Detection, Mode, NamespaceSpec, PodSpec, decide},
    },
    source::Kind,
};

/// How often the cgroups of pods that wait for theirs are looked for.
pub const RETRY: Duration = Duration::from_millis(100);
/// A pod still without a cgroup after this long is reported (once).
const REPORT_AFTER: Duration = Duration::from_secs(10);
/// How deep below the attach cgroup pod directories are looked for (the kubelet's sit
/// at kubepods[/qos]/pod, under a cgroupRoot or slice or two).
const SEARCH_DEPTH: usize = 6;

/// Where the kernel side of the modes goes.
pub trait WorkloadDatapath {
    /// `LB_WORKLOADS` becomes exactly `wanted` (cgroup id -> mode value).
    fn set_workloads(&mut self, wanted: &BTreeMap<u64, u32>) -> Result<()>;
    /// The host-side interface of the pod whose processes run in `cgroup` and that
    /// holds one of `ips` (`None` while it has no process or address yet).
    fn pod_interface(&mut self, cgroup: &Path, ips: &[IpAddr]) -> Result<Option<String>>;
    fn interface_exists(&mut self, device: &str) -> bool;
    /// Attaches the packet-mode programs to `device`; returns its ifindex.
    fn attach_packet(&mut self, device: &str) -> Result<u32>;
    fn detach_packet(&mut self, device: &str);
    /// Interfaces carrying packet-mode programs (as pinned: dots made underscores).
    fn packet_interfaces_pinned(&self) -> BTreeSet<String>;
    /// `LB_POD_INTERFACES`: where new flows of packet-mode pods start.
    fn packet_interfaces(&self) -> Result<BTreeSet<u32>>;
    fn set_packet_interface(&mut self, ifindex: u32, on: bool) -> Result<()>;
}

/// The kernel side: the maps and the datapath of the sync thread.
pub struct Kernel<'a> {
    pub maps: &'a mut crate::datapath::KernelMaps,
    pub datapath: &'a mut crate::datapath::Datapath,
}

impl WorkloadDatapath for Kernel<'_> {
    fn set_workloads(&mut self, wanted: &BTreeMap<u64, u32>) -> Result<()> {
        self.maps.set_workloads(wanted)
    }

    fn pod_interface(&mut self, cgroup: &Path, ips: &[IpAddr]) -> Result<Option<String>> {
        crate::datapath::pods::host_side_interface(cgroup, ips, self.datapath.netns())
    }

    fn interface_exists(&mut self, device: &str) -> bool {
        crate::datapath::pods::interface_exists(device, self.datapath.netns()).unwrap_or(true)
    }

    fn attach_packet(&mut self, device: &str) -> Result<u32> {
        self.datapath.attach_pod_interface(device)
    }

    fn detach_packet(&mut self, device: &str) {
        self.datapath.detach_pod_interface(device)
    }

    fn packet_interfaces_pinned(&self) -> BTreeSet<String> {
        self.datapath.pod_interfaces_pinned()
    }

    fn packet_interfaces(&self) -> Result<BTreeSet<u32>> {
        self.maps.pod_interfaces()
    }

    fn set_packet_interface(&mut self, ifindex: u32, on: bool) -> Result<()> {
        self.maps.set_pod_interface(ifindex, on)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PodCgroup {
    path: PathBuf,
    id: u64,
}

/// A packet-mode pod's host-side interface, its programs attached.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodInterface {
    device: String,
    ifindex: u32,
}

#[derive(Clone, Debug)]
struct PodState {
    mode: Mode,
    why: String,
    cgroup: Option<PodCgroup>,
    /// Since when a pod that needs its cgroup (and, in packet mode, its interface)
    /// has been waiting for it.
    waiting_since: Option<Instant>,
    /// Kept once attached, also if the pod leaves packet mode: its flows go on.
    interface: Option<PodInterface>,
}

/// One pod as `lb list` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WorkloadStatus {
    pub pod: String,
    pub mode: Mode,
    pub why: String,
    /// Its cgroup, once found (pods not in `socket` mode only).
    pub cgroup: Option<String>,
    /// Packet mode: its host-side interface, once the programs are attached there.
    pub interface: Option<String>,
}

pub struct Workloads {
    node_name: String,
    /// Where the socket hooks are attached: pods are looked for below it.
    attach_cgroup: PathBuf,
    /// The cgroup2 mount, for cgroup paths given relative to it (manifests).
    cgroup2_mount: PathBuf,
    detection: Detection,
    pods: BTreeMap<ObjectRef, Arc<PodSpec>>,
    namespaces: BTreeMap<Arc<str>, Option<Arc<str>>>,
    listed: BTreeSet<Kind>,
    states: BTreeMap<ObjectRef, PodState>,
    /// What `LB_WORKLOADS` holds (`None` until first written).
    written: Option<BTreeMap<u64, u32>>,
    dirty: bool,
    retry_at: Option<Instant>,
    /// Problems already logged, so each is logged once.
    reported: BTreeSet<String>,
    /// Interfaces of replaced pods, whose programs the next sync removes.
    detach: Vec<String>,
}

impl Workloads {
    pub fn new(
        node_name: String,
        attach_cgroup: PathBuf,
        cgroup2_mount: PathBuf,
        detection: Detection,
    ) -> Self {
        Self {
            node_name,
            attach_cgroup,
            cgroup2_mount,
            detection,
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            listed: BTreeSet::new(),
            states: BTreeMap::new(),
            written: None,
            dirty: true,
            retry_at: None,
            reported: BTreeSet::new(),
            detach: Vec::new(),
        }
    }

    pub fn upsert_pod(&mut self, spec: Arc<PodSpec>) {
        if spec
            .node
            .as_deref()
            .is_some_and(|node| node != self.node_name)
        {
            // Another node's (manifests list every pod): make sure it is not ours.
            self.remove_pod(&spec.id);
            return;
        }
        if self.pods.get(&spec.id) != Some(&spec) {
            if self.pods.get(&spec.id).map(|p| &p.uid) != Some(&spec.uid)
                && let Some(state) = self.states.remove(&spec.id)
            {
                // A new pod of that name: its cgroup and interface are other ones.
                self.detach.extend(state.interface.map(|i| i.device));
            }
            self.pods.insert(spec.id.clone(), spec);
            self.dirty = true;
        }
    }

    pub fn remove_pod(&mut self, id: &ObjectRef) {
        if self.pods.remove(id).is_some() {
            self.dirty = true;
        }
    }

    pub fn upsert_namespace(&mut self, spec: &NamespaceSpec) {
        if self.namespaces.get(&spec.name) != Some(&spec.mode) {
            self.namespaces.insert(spec.name.clone(), spec.mode.clone());
            self.dirty = true;
        }
    }

    pub fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.remove(name).is_some() {
            self.dirty = true;
        }
    }

    pub fn listed(&mut self, kind: Kind) {
        if Kind::WORKLOADS.contains(&kind) && self.listed.insert(kind) {
            self.dirty = true;
        }
    }

    /// When [`Self::sync`] has work: now (`Some(past)`), later, or never (`None`).
    pub fn due_at(&self) -> Option<Instant> {
        if !Kind::WORKLOADS.iter().all(|k| self.listed.contains(k)) {
            return None;
        }
        if self.dirty {
            return Some(Instant::now());
        }
        self.retry_at
    }

    /// Decides every pod's mode, finds the cgroups of those not in `socket` mode (and
    /// the interfaces of those in `packet` mode, attaching the programs there) and
    /// writes the maps where that changed them. Nothing before Pods and Namespaces
    /// have both listed once: what a restarted daemon adopted stays as it was.
    ///
    /// Make before break: a pod's cgroup enters `LB_WORKLOADS` as `packet` (so the
    /// socket hooks stop balancing it) only once its interface balances its packets.
    pub fn sync(&mut self, kernel: &mut impl WorkloadDatapath) -> Result<()> {
        if self.due_at().is_none_or(|at| at > Instant::now()) {
            return Ok(());
        }
        self.dirty = false;
        self.retry_at = None;
        let now = Instant::now();
        // Pods gone: their interfaces' programs go with them.
        let gone: Vec<ObjectRef> = self
            .states
            .keys()
            .filter(|id| !self.pods.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.detach.extend(
                self.states
                    .remove(&id)
                    .and_then(|s| s.interface)
                    .map(|i| i.device),
            );
        }
        for device in std::mem::take(&mut self.detach) {
            kernel.detach_packet(&device);
        }
        let mut index: Option<HashMap<String, PathBuf>> = None;
        let mut wanted = BTreeMap::new();
        let mut interfaces = BTreeSet::new();
        let mut problems = Vec::new();
        for (id, pod) in &self.pods {
            let namespace_mode = self
                .namespaces
                .get(&*id.namespace)
                .and_then(|m| m.as_deref());
            let decision = decide(pod, namespace_mode, &self.detection);
            problems.extend(decision.problems);
            let state = self.states.entry(id.clone()).or_insert_with(|| PodState {
                mode: Mode::Socket,
                why: String::new(),
                cgroup: None,
                waiting_since: None,
                interface: None,
            });
            if (state.mode, state.why.as_str()) != (decision.mode, decision.why.as_str()) {
                if decision.mode != Mode::Socket || state.mode != Mode::Socket {
                    info!(pod = %id, mode = %decision.mode, why = %decision.why, "load-balancing mode");
                }
                state.mode = decision.mode;
                state.why = decision.why;
            }
            // An interface that went away (the pod's sandbox was recreated) is found
            // again.
            if let Some(interface) = &state.interface
                && !kernel.interface_exists(&interface.device)
            {
                kernel.detach_packet(&interface.device);
                state.interface = None;
            }
            if state.mode == Mode::Socket {
                state.waiting_since = None;
                continue;
            }
            // A known cgroup must still be the same directory.
            if let Some(cgroup) = &state.cgroup
                && cgroup_id(&cgroup.path) != Some(cgroup.id)
            {
                state.cgroup = None;
            }
            if state.cgroup.is_none() {
                state.cgroup = match &pod.cgroup {
                    Some(path) => {
                        let path = self.cgroup2_mount.join(path);
                        cgroup_id(&path).map(|id| PodCgroup { path, id })
                    }
                    None => pod.uid.as_deref().and_then(|uid| {
                        let index =
                            index.get_or_insert_with(|| index_pod_cgroups(&self.attach_cgroup));
                        let path = index.get(uid)?.clone();
                        cgroup_id(&path).map(|id| PodCgroup { path, id })
                    }),
                };
            }
            let mut missing = match &state.cgroup {
                Some(_) => None,
                None => Some(match &pod.cgroup {
                    Some(path) => format!("its cgroup {} does not exist", path.display()),
                    None => format!(
                        "no cgroup of pod uid {} below {}",
                        pod.uid.as_deref().unwrap_or("(none)"),
                        self.attach_cgroup.display()
                    ),
                }),
            };
            if state.mode == Mode::Packet && pod.host_network {
                // The node's own interfaces are not the pod's: nothing to wait for.
                problems.push(format!(
                    "Pod {id}: mode packet, but it uses the node's network (hostNetwork): it \
                     has no interface of its own to balance its packets on; the socket hooks \
                     balance it"
                ));
                state.waiting_since = None;
                continue;
            }
            if let (Some(cgroup), Mode::Packet, None) =
                (&state.cgroup, state.mode, &state.interface)
            {
                match kernel.pod_interface(&cgroup.path, &pod.ips) {
                    Ok(Some(device)) => match kernel.attach_packet(&device) {
                        Ok(ifindex) => {
                            info!(pod = %id, interface = %device, "packet-mode programs attached");
                            state.interface = Some(PodInterface { device, ifindex });
                        }
                        Err(err) => missing = Some(format!("{err:#}")),
                    },
                    Ok(None) => missing = Some("no process or address of its own yet".to_string()),
                    Err(err) => missing = Some(format!("its interface: {err:#}")),
                }
            }
            let ready = match (state.mode, &state.cgroup, &state.interface) {
                (Mode::Off, Some(cgroup), _) => Some(cgroup.id),
                (Mode::Packet, Some(cgroup), Some(interface)) => {
                    interfaces.insert(interface.ifindex);
                    Some(cgroup.id)
                }
                _ => None,
            };
            match ready {
                Some(cgroup_id) => {
                    state.waiting_since = None;
                    wanted.insert(cgroup_id, state.mode.map_value());
                }
                None => {
                    let since = *state.waiting_since.get_or_insert(now);
                    self.retry_at = Some(now + RETRY);
                    if now.duration_since(since) >= REPORT_AFTER {
                        problems.push(format!(
                            "Pod {id}: mode {} but {}: the socket hooks balance it meanwhile",
                            state.mode,
                            missing.as_deref().unwrap_or("not ready")
                        ));
                    }
                }
            }
        }
        for problem in problems {
            if self.reported.insert(problem.clone()) {
                warn!("{problem}");
            }
        }
        // Interfaces pinned by a previous run that no pod claims: gone, or (once no
        // packet-mode pod still looks for its own) no longer packet-mode pods'.
        let claimed: BTreeSet<String> = self
            .states
            .values()
            .filter_map(|s| s.interface.as_ref())
            .map(|i| i.device.replace('.', "_"))
            .collect();
        let searching = self
            .states
            .values()
            .any(|s| s.mode == Mode::Packet && s.interface.is_none());
        for device in kernel.packet_interfaces_pinned() {
            if !claimed.contains(&device) && (!searching || !kernel.interface_exists(&device)) {
                kernel.detach_packet(&device);
            }
        }
        let result = self.write(kernel, &wanted, &interfaces);
        if result.is_err() {
            self.dirty = true;
            self.retry_at = Some(now + RETRY);
        }
        result
    }

    /// Writes what changed: interfaces where packet-mode pods start flows are added
    /// before their cgroups are marked (so no connection falls between the socket
    /// hooks and the packet path), removed after.
    fn write(
        &mut self,
        kernel: &mut impl WorkloadDatapath,
        wanted: &BTreeMap<u64, u32>,
        interfaces: &BTreeSet<u32>,
    ) -> Result<()> {
        let current = kernel.packet_interfaces()?;
        for ifindex in interfaces.difference(&current) {
            kernel.set_packet_interface(*ifindex, true)?;
        }
        if self.written.as_ref() != Some(wanted) {
            kernel.set_workloads(wanted)?;
            self.written = Some(wanted.clone());
        }
        for ifindex in current.difference(interfaces) {
            kernel.set_packet_interface(*ifindex, false)?;
        }
        Ok(())
    }

    /// Pods by mode (each mode present, zero if none).
    pub fn counts(&self) -> BTreeMap<Mode, u64> {
        let mut counts: BTreeMap<Mode, u64> = Mode::ALL.into_iter().map(|m| (m, 0)).collect();
        for state in self.states.values() {
            *counts.entry(state.mode).or_default() += 1;
        }
        counts
    }

    /// Pods not in `socket` mode whose cgroup was not found yet.
    pub fn waiting(&self) -> u64 {
        self.states
            .values()
            .filter(|s| s.waiting_since.is_some())
            .count() as u64
    }

    /// Every pod not in `socket` mode, for `lb list`.
    pub fn status(&self) -> Vec<WorkloadStatus> {
        self.states
            .iter()
            .filter(|(_, s)| s.mode != Mode::Socket)
            .map(|(id, s)| WorkloadStatus {
                pod: id.to_string(),
                mode: s.mode,
                why: s.why.clone(),
                cgroup: s.cgroup.as_ref().map(|c| c.path.display().to_string()),
                interface: s.interface.as_ref().map(|i| i.device.clone()),
            })
            .collect()
    }
}

/// A cgroup2 directory's id (its inode number, as `bpf_get_current_cgroup_id`
/// reports it).
fn cgroup_id(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    meta.is_dir().then_some(meta.ino())
}

/// The pod uid a kubelet cgroup directory name stands for: `pod<uid>` (cgroupfs) or
/// `...-pod<uid with underscores>.slice` (systemd).
fn pod_uid_of(name: &str) -> Option<String> {
    let uid = if let Some(slice) = name.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        uid.replace('_', "-")
    } else {
        name.strip_prefix("pod")?.to_string()
    };
    let valid = uid.len() >= 8 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    valid.then_some(uid)
}

/// Every pod cgroup below `root` (to [`SEARCH_DEPTH`]), by pod uid. Pod directories
/// are not descended into: their children are containers.
fn index_pod_cgroups(root: &Path) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let mut level = vec![root.to_path_buf()];
    for _ in 0..SEARCH_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                match pod_uid_of(&name.to_string_lossy()) {
                    Some(uid) => {
                        found.insert(uid, entry.path());
                    }
                    None => next.push(entry.path()),
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorded {
        writes: Vec<BTreeMap<u64, u32>>,
        interfaces: BTreeSet<u32>,
    }

    impl WorkloadDatapath for Recorded {
        fn set_workloads(&mut self, wanted: &BTreeMap<u64, u32>) -> Result<()> {
            self.writes.push(wanted.clone());
            Ok(())
        }
        fn pod_interface(&mut self, _: &Path, _: &[IpAddr]) -> Result<Option<String>> {
            Ok(Some("veth-pod".into()))
        }
        fn interface_exists(&mut self, _: &str) -> bool {
            true
        }
        fn attach_packet(&mut self, _: &str) -> Result<u32> {
            Ok(7)
        }
        fn detach_packet(&mut self, _: &str) {}
        fn packet_interfaces_pinned(&self) -> BTreeSet<String> {
            BTreeSet::new()
        }
        fn packet_interfaces(&self) -> Result<BTreeSet<u32>> {
            Ok(self.interfaces.clone())
        }
        fn set_packet_interface(&mut self, ifindex: u32, on: bool) -> Result<()> {
            if on {
                self.interfaces.insert(ifindex);
            } else {
                self.interfaces.remove(&ifindex);
            }
            Ok(())
        }
    }

    const UID: &str = "0b7c2a5e-1f3d-4c8e-9a6b-5d4e3f2a1b0c";

    fn pod(name: &str, mode: Option<&str>, node: Option<&str>) -> Arc<PodSpec> {
        Arc::new(PodSpec {
            id: ObjectRef::new("shop", name),
            uid: Some(Arc::from(UID)),
            node: node.map(Arc::from),
            mode: mode.map(Arc::from),
            detected: None,
            runtime_class: None,
            cgroup: None,
            ips: Vec::new(),
            host_network: false,
        })
    }

    #[test]
    fn kubelet_cgroup_names_give_pod_uids() {
        assert_eq!(pod_uid_of(&format!("pod{UID}")).as_deref(), Some(UID));
        let systemd = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(pod_uid_of(&systemd).as_deref(), Some(UID));
        for other in [
            "kubepods",
            "burstable",
            "kubepods-burstable.slice",
            "podman",
            "cri-containerd-abc.scope",
        ] {
            assert_eq!(pod_uid_of(other), None, "{other}");
        }
    }

    #[test]
    fn pod_cgroups_are_found_in_both_layouts_and_their_containers_skipped() {
        let root = std::env::temp_dir().join(format!("lb-wl-{}", std::process::id()));
        let cgroupfs = root.join(format!("node/kubepods/burstable/pod{UID}"));
        std::fs::create_dir_all(cgroupfs.join("container-1")).unwrap();
        let other = "11111111-2222-3333-4444-555555555555";
        let systemd = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            other.replace('-', "_")
        ));
        std::fs::create_dir_all(&systemd).unwrap();
        let index = index_pod_cgroups(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(index.len(), 2, "{index:?}");
        assert_eq!(index[UID], cgroupfs);
        assert_eq!(index[other], systemd);
    }

    #[test]
    fn packet_mode_pods_enter_the_map_once_their_interface_is_attached_never_host_network_ones() {
        let root = std::env::temp_dir().join(format!("lb-wl-packet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cgroup = root.join(format!("kubepods/pod{UID}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        let id = cgroup_id(&cgroup).unwrap();
        let mut workloads = Workloads::new(
            "node-a".into(),
            root.clone(),
            "/".into(),
            Detection::default(),
        );
        workloads.listed(Kind::Pod);
        workloads.listed(Kind::Namespace);
        let mut kernel = Recorded::default();
        workloads.upsert_pod(pod("vm", Some("packet"), None));
        workloads.sync(&mut kernel).unwrap();
        assert_eq!(kernel.interfaces, BTreeSet::from([7]));
        assert_eq!(kernel.writes.last().unwrap(), &BTreeMap::from([(id, 1)]));
        assert_eq!(workloads.status()[0].interface.as_deref(), Some("veth-pod"));
        // Back to socket: out of the map, its interface starts no flow, programs kept.
        workloads.upsert_pod(pod("vm", Some("socket"), None));
        workloads.sync(&mut kernel).unwrap();
        assert!(kernel.interfaces.is_empty());
        assert_eq!(kernel.writes.last().unwrap(), &BTreeMap::new());
        // A hostNetwork pod asking for packet mode: refused at once, no retry.
        let host = Arc::new(PodSpec {
            host_network: true,
            ..(*pod("agent", Some("packet"), None)).clone()
        });
        workloads.upsert_pod(pod("vm", None, None));
        workloads.upsert_pod(host);
        workloads.sync(&mut kernel).unwrap();
        assert_eq!(kernel.writes.last().unwrap(), &BTreeMap::new());
        assert_eq!(workloads.due_at(), None, "nothing to wait for");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn modes_are_written_once_pods_and_namespaces_listed_and_cgroups_found() {
        let root = std::env::temp_dir().join(format!("lb-wl-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mut workloads = Workloads::new(
            "node-a".into(),
            root.clone(),
            PathBuf::from("/"),
            Detection::default(),
        );
        let mut maps = Recorded::default();
        workloads.upsert_pod(pod("web", Some("off"), Some("node-a")));
        workloads.upsert_pod(pod("elsewhere", Some("off"), Some("node-b")));
        workloads.listed(Kind::Pod);
        workloads.sync(&mut maps).unwrap();
        assert!(maps.writes.is_empty(), "written before Namespaces listed");
        workloads.listed(Kind::Namespace);
        workloads.sync(&mut maps).unwrap();
        // No cgroup yet: nothing to write but the (empty) table, and a retry planned.
        assert_eq!(maps.writes, vec![BTreeMap::new()]);
        assert_eq!(workloads.waiting(), 1);
        assert!(workloads.due_at().is_some());
        let cgroup = root.join(format!("kubepods/pod{UID}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        std::thread::sleep(RETRY);
        workloads.sync(&mut maps).unwrap();
        let id = cgroup_id(&cgroup).unwrap();
        assert_eq!(maps.writes.last().unwrap(), &BTreeMap::from([(id, 2)]));
        assert_eq!(workloads.waiting(), 0);
        assert_eq!(workloads.due_at(), None);
        assert_eq!(workloads.counts()[&Mode::Off], 1);
        // The namespace cannot override the pod's own annotation; removing the
        // annotation lets it.
        workloads.upsert_namespace(&NamespaceSpec {
            name: "shop".into(),
            mode: Some("packet".into()),
        });
        workloads.sync(&mut maps).unwrap();
        assert_eq!(maps.writes.len(), 2, "unchanged table rewritten");
        workloads.upsert_pod(pod("web", None, Some("node-a")));
        workloads.sync(&mut maps).unwrap();
        assert_eq!(maps.writes.last().unwrap(), &BTreeMap::from([(id, 1)]));
        assert_eq!(
            workloads.status()[0].why,
            "Namespace shop's annotation lb.dev/mode"
        );
        // The pod goes: so does its entry.
        workloads.remove_pod(&ObjectRef::new("shop", "web"));
        workloads.sync(&mut maps).unwrap();
        assert_eq!(maps.writes.last().unwrap(), &BTreeMap::new());
        assert!(workloads.status().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
