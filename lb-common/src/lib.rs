//! Map keys and values shared by the eBPF datapath (`lb-ebpf`) and the userspace
//! controller (`lb-userspace`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so the kernel and userspace
//! agree on the byte layout; sizes are asserted at compile time.
//!
//! Byte order: addresses and ports are stored **in network byte order**, exactly as the
//! kernel hands them to a `cgroup/connect*` program (`user_ip4`, `user_ip6`, `user_port`).
//! An address is always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one
//! map serves both families and an IPv6 socket dialling a mapped IPv4 ClusterIP is
//! balanced like an IPv4 one.
#![no_std]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Version of the layout of every map below (keys, values, types, meaning). A daemon
/// adopts pinned maps only of its own version; any change to a map's layout or
/// meaning must bump it (the loader also compares types and sizes as a safety net).
pub const LAYOUT_VERSION: u32 = 8;

/// Kernel map types used (`enum bpf_map_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MapKind {
    Hash = 1,
    Array = 2,
    PerCpuArray = 6,
    LruHash = 9,
    LpmTrie = 11,
    HashOfMaps = 13,
    SkStorage = 24,
}

/// What sizes a map: a fixed count, or one of the capacity settings (`lb daemon
/// --max-*` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    Fixed,
    /// Frontends (and frontend ids).
    Frontends,
    /// Distinct backends (and backend ids).
    Backends,
    /// Frontend entries plus their backend slots.
    ServiceEntries,
    /// Translated connected sockets remembered for reverse translation.
    Sockets,
    /// The LRU that replaces the socket map on kernels without `cgroup/sock_release`
    /// (sized like it there, one entry otherwise).
    LegacySockets,
    /// Session-affinity entries: (client, frontend) pairs remembered.
    Affinity,
    /// Flows from other machines tracked by the TC programs (two entries each).
    Flows,
}

/// One map: every property the eBPF side, the loader, the adoption check and `lb list`
/// need, defined once.
#[derive(Clone, Copy, Debug)]
pub struct MapDef {
    /// Pin name (a file under the pin directory's version folder).
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    /// Entries when no capacity setting overrides it (the default of that setting).
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub flags: u32,
    pub capacity: Capacity,
    pub help: &'static str,
}

/// `BPF_F_NO_PREALLOC`: elements are allocated on insert and freed through RCU, so a
/// value a program reads is never reused under it, and memory follows use.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// The maps, with their default capacities.
pub mod maps {
    use core::mem::size_of;

    use super::*;

    /// Default of `--max-frontends`.
    pub const DEFAULT_FRONTENDS: u32 = 1 << 16;
    /// Default of `--max-backends`.
    pub const DEFAULT_BACKENDS: u32 = 1 << 18;
    /// Default of `--max-service-entries` (frontends plus backend slots).
    pub const DEFAULT_SERVICE_ENTRIES: u32 = 1 << 20;
    /// Default of `--max-sockets`: open translated connected sockets on the node
    /// (memory follows use: about 110 bytes per open socket, plus 8 bytes per slot).
    pub const DEFAULT_SOCKETS: u32 = 1 << 18;

    pub const SERVICES: MapDef = MapDef {
        name: "LB_SERVICES",
        kind: MapKind::Hash,
        key_size: size_of::<ServiceKey>() as u32,
        value_size: size_of::<ServiceValue>() as u32,
        max_entries: DEFAULT_SERVICE_ENTRIES,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::ServiceEntries,
        help: "frontends (slot 0) and their backend slots",
    };
    pub const BACKENDS: MapDef = MapDef {
        name: "LB_BACKENDS",
        kind: MapKind::Hash,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<Backend>() as u32,
        max_entries: DEFAULT_BACKENDS,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Backends,
        help: "backend id -> pod address and port",
    };
    /// Default of `--max-affinity-entries`.
    pub const DEFAULT_AFFINITY: u32 = 1 << 16;

    pub const SOCK_REVNAT: MapDef = MapDef {
        name: "LB_SOCK_REVNAT",
        kind: MapKind::Hash,
        key_size: size_of::<SockRevKey>() as u32,
        value_size: size_of::<SockRevValue>() as u32,
        max_entries: DEFAULT_SOCKETS,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Sockets,
        help: "translated connected sockets: (cookie, backend) -> what the application dialled; \
               an entry lives exactly as long as its socket (deleted by cgroup/sock_release)",
    };
    pub const SOCK_REVNAT_LRU: MapDef = MapDef {
        name: "LB_SOCK_REVNAT_LRU",
        kind: MapKind::LruHash,
        key_size: size_of::<SockRevKey>() as u32,
        value_size: size_of::<SockRevValue>() as u32,
        max_entries: DEFAULT_SOCKETS,
        flags: 0,
        capacity: Capacity::LegacySockets,
        help: "kernels without cgroup/sock_release: every translated socket, evicted least recently used",
    };
    pub const SOCK_LOCAL: MapDef = MapDef {
        name: "LB_SOCK_LOCAL",
        kind: MapKind::SkStorage,
        key_size: size_of::<i32>() as u32,
        value_size: size_of::<SockLocal>() as u32,
        max_entries: 0,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Fixed,
        help: "per-socket storage (freed with the socket): unconnected UDP sends, and translations \
               LB_SOCK_REVNAT had no room for",
    };
    pub const AFFINITY: MapDef = MapDef {
        name: "LB_AFFINITY",
        kind: MapKind::LruHash,
        key_size: size_of::<AffinityKey>() as u32,
        value_size: size_of::<AffinityValue>() as u32,
        max_entries: DEFAULT_AFFINITY,
        flags: 0,
        capacity: Capacity::Affinity,
        help: "sessionAffinity ClientIP: (client, frontend) -> backend and last use",
    };
    pub const AFFINITY_MEMBERS: MapDef = MapDef {
        name: "LB_AFFINITY_MEMBERS",
        kind: MapKind::Hash,
        key_size: size_of::<AffinityMember>() as u32,
        value_size: size_of::<u32>() as u32,
        max_entries: DEFAULT_SERVICE_ENTRIES,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::ServiceEntries,
        help: "(frontend, backend) pairs of affinity frontends: an affinity entry is used only \
               while its backend is still a member",
    };
    pub const STATS: MapDef = MapDef {
        name: "LB_STATS",
        kind: MapKind::PerCpuArray,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u64>() as u32,
        max_entries: stat::COUNT,
        flags: 0,
        capacity: Capacity::Fixed,
        help: "per-CPU decision counters (lb_common::stat)",
    };
    pub const FRONTEND_STATS: MapDef = MapDef {
        name: "LB_FRONTEND_STATS",
        kind: MapKind::Array,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<FrontendStats>() as u32,
        max_entries: DEFAULT_FRONTENDS,
        flags: 0,
        capacity: Capacity::Frontends,
        help: "per-frontend counters, by frontend id",
    };
    pub const BACKEND_STATS: MapDef = MapDef {
        name: "LB_BACKEND_STATS",
        kind: MapKind::Array,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u64>() as u32,
        max_entries: DEFAULT_BACKENDS,
        flags: 0,
        capacity: Capacity::Backends,
        help: "per-backend connection counters, by backend id",
    };
    pub const FRONTEND_NAMES: MapDef = MapDef {
        name: "LB_FRONTEND_NAMES",
        kind: MapKind::Hash,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<FrontendName>() as u32,
        max_entries: DEFAULT_FRONTENDS,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Frontends,
        help: "frontend id -> Service name (for lb list and bpftool; the programs never read it)",
    };

    /// Default of `--max-flows`: connections from other machines tracked at once.
    pub const DEFAULT_FLOWS: u32 = 1 << 17;

    pub const CT: MapDef = MapDef {
        name: "LB_CT",
        kind: MapKind::LruHash,
        key_size: size_of::<CtKey>() as u32,
        value_size: size_of::<CtValue>() as u32,
        max_entries: DEFAULT_FLOWS * 2,
        flags: 0,
        capacity: Capacity::Flows,
        help: "TC connection tracking, flows not answered yet (and answered ones LB_CT_EST had no \
               room for): both directions -> how their packets are rewritten (least recently \
               used evicted first)",
    };
    /// Flows move here from `LB_CT` on their first answer: a burst of new flows (a SYN
    /// flood) evicts only unanswered ones, as Linux conntrack's early drop spares
    /// assured connections. Only the daemon's collector removes entries (idle past
    /// their timeout, or closing: moved back to `LB_CT`).
    pub const CT_ESTABLISHED: MapDef = MapDef {
        name: "LB_CT_EST",
        kind: MapKind::Hash,
        key_size: size_of::<CtKey>() as u32,
        value_size: size_of::<CtValue>() as u32,
        max_entries: DEFAULT_FLOWS * 2,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Flows,
        help: "TC connection tracking, answered flows: both directions -> how their packets are \
               rewritten (never evicted by new flows; the collector expires them)",
    };
    pub const MAGLEV: MapDef = MapDef {
        name: "LB_MAGLEV",
        kind: MapKind::HashOfMaps,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u32>() as u32,
        max_entries: DEFAULT_FRONTENDS,
        flags: 0,
        capacity: Capacity::Frontends,
        help: "external frontend id -> its Maglev lookup table (an array of backend ids)",
    };
    pub const SOURCE_RANGES: MapDef = MapDef {
        name: "LB_SOURCE_RANGES",
        kind: MapKind::LpmTrie,
        key_size: size_of::<SourceRangeKey>() as u32,
        value_size: size_of::<u32>() as u32,
        max_entries: DEFAULT_FRONTENDS,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Frontends,
        help: "loadBalancerSourceRanges: (frontend id, client prefix) allowed",
    };
    pub const NODE_ADDRS: MapDef = MapDef {
        name: "LB_NODE_ADDRS",
        kind: MapKind::Array,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<Addr>() as u32,
        max_entries: 2,
        flags: 0,
        capacity: Capacity::Fixed,
        help: "this node's SNAT source addresses: [0] IPv4 (mapped), [1] IPv6; zero = none",
    };

    /// Pods on one node with a load-balancing mode other than `socket` (the kubelet's
    /// default limit is 110 pods per node; memory follows use).
    pub const MAX_WORKLOADS: u32 = 4096;

    pub const WORKLOADS: MapDef = MapDef {
        name: "LB_WORKLOADS",
        kind: MapKind::Hash,
        key_size: size_of::<u64>() as u32,
        value_size: size_of::<u32>() as u32,
        max_entries: MAX_WORKLOADS,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Fixed,
        help: "pod cgroup id -> its load-balancing mode (lb_common::workload_mode) when not \
               socket: the socket hooks leave those pods' connections untranslated",
    };
    pub const POD_INTERFACES: MapDef = MapDef {
        name: "LB_POD_INTERFACES",
        kind: MapKind::Hash,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u32>() as u32,
        max_entries: MAX_WORKLOADS,
        flags: BPF_F_NO_PREALLOC,
        capacity: Capacity::Fixed,
        help: "host-side ifindex of each packet-mode pod -> 1: lb_tc_pod_ingress starts new \
               flows there (flows it tracks go on after a pod leaves packet mode)",
    };
    pub const WORKLOAD_COUNT: MapDef = MapDef {
        name: "LB_WORKLOAD_COUNT",
        kind: MapKind::Array,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u32>() as u32,
        max_entries: 1,
        flags: 0,
        capacity: Capacity::Fixed,
        help: "entries in LB_WORKLOADS: while 0 (no pod opted out) the socket hooks skip the \
               lookup of the caller's cgroups",
    };

    /// Every map the object declares.
    pub const ALL: [MapDef; 19] = [
        SERVICES,
        BACKENDS,
        AFFINITY,
        AFFINITY_MEMBERS,
        SOCK_REVNAT,
        SOCK_REVNAT_LRU,
        SOCK_LOCAL,
        STATS,
        FRONTEND_STATS,
        BACKEND_STATS,
        FRONTEND_NAMES,
        CT,
        CT_ESTABLISHED,
        MAGLEV,
        SOURCE_RANGES,
        NODE_ADDRS,
        WORKLOADS,
        WORKLOAD_COUNT,
        POD_INTERFACES,
    ];
}

/// Pin names of the maps (files under the pin directory's version folder).
pub mod map_names {
    use super::maps;

    pub const SERVICES: &str = maps::SERVICES.name;
    pub const BACKENDS: &str = maps::BACKENDS.name;
    pub const SOCK_REVNAT: &str = maps::SOCK_REVNAT.name;
    pub const SOCK_REVNAT_LRU: &str = maps::SOCK_REVNAT_LRU.name;
    pub const SOCK_LOCAL: &str = maps::SOCK_LOCAL.name;
    pub const AFFINITY: &str = maps::AFFINITY.name;
    pub const AFFINITY_MEMBERS: &str = maps::AFFINITY_MEMBERS.name;
    pub const STATS: &str = maps::STATS.name;
    pub const FRONTEND_STATS: &str = maps::FRONTEND_STATS.name;
    pub const BACKEND_STATS: &str = maps::BACKEND_STATS.name;
    pub const FRONTEND_NAMES: &str = maps::FRONTEND_NAMES.name;
    pub const CT: &str = maps::CT.name;
    pub const CT_ESTABLISHED: &str = maps::CT_ESTABLISHED.name;
    pub const MAGLEV: &str = maps::MAGLEV.name;
    pub const SOURCE_RANGES: &str = maps::SOURCE_RANGES.name;
    pub const NODE_ADDRS: &str = maps::NODE_ADDRS.name;
    pub const WORKLOADS: &str = maps::WORKLOADS.name;
    pub const WORKLOAD_COUNT: &str = maps::WORKLOAD_COUNT.name;
    pub const POD_INTERFACES: &str = maps::POD_INTERFACES.name;
}

/// Load-balancing modes of a pod (`LB_WORKLOADS` values). Pods absent from the map are
/// balanced at `connect()` by the socket hooks.
pub mod workload_mode {
    /// Socket-level balancing (the default; never stored).
    pub const SOCKET: u32 = 0;
    /// Balanced per packet on the pod's host-side interface: the pod itself sees the
    /// ClusterIP (a sidecar proxy's SO_ORIGINAL_DST, a VM guest's packets).
    pub const PACKET: u32 = 1;
    /// Never translated by lb (a mesh that balances itself).
    pub const OFF: u32 = 2;
    /// Deepest cgroup2 level of a pod's cgroup the socket hooks look at (the kubelet's
    /// are at 2-4, below a cgroupRoot or systemd slice or two).
    pub const MAX_LEVEL: i32 = 16;
}

/// First port of the default SNAT range (`--snat-ports 61000-65535`): above Linux's
/// default ephemeral range (32768-60999), so the node's own connections never use it.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61000;

/// Default Maglev table size (`--maglev-table-size`): a prime, about 100 times the
/// backends of a large Service, as the Maglev paper advises for even spread.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16381;

/// `BPF_F_INNER_MAP`: Maglev tables of any size fit the outer map (kernel >= 5.10).
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: a Maglev table is filled through a shared mapping, one copy
/// instead of a syscall's worth of work per entry (kernel >= 5.5).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// The flags of every Maglev table (the outer map accepts only tables like its
/// template).
pub const MAGLEV_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// `CtKey::dir`: a packet from the client towards the frontend.
pub const CT_FORWARD: u8 = 0;
/// `CtKey::dir`: a reply from the backend, as it arrives (after any SNAT).
pub const CT_REPLY: u8 = 1;

/// `CtValue::flags`: the client's source was replaced by the node's address (SNAT).
pub const CT_F_SNAT: u32 = 1 << 0;
/// `CtValue::flags`: the backend runs on this node.
pub const CT_F_LOCAL_BACKEND: u32 = 1 << 1;
/// `CtValue::flags`: created by a program that records the flow's state in the flags
/// below (entries without it predate that and are taken as established).
pub const CT_F_STATEFUL: u32 = 1 << 2;
/// `CtValue::flags`: a packet of this entry's direction was a reply (set on reply
/// entries: the flow was answered).
pub const CT_F_REPLIED: u32 = 1 << 3;
/// `CtValue::flags`: a TCP FIN went this entry's way (the flow is closing).
pub const CT_F_FIN: u32 = 1 << 4;
/// `CtValue::flags`: a TCP RST went this entry's way (the flow is over).
pub const CT_F_RST: u32 = 1 << 5;

/// Key of `LB_CT`: a packet's tuple as it arrives at the TC hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    /// Source address, network order, IPv4-mapped for IPv4.
    pub src: Addr,
    /// Destination address, network order, IPv4-mapped for IPv4.
    pub dst: Addr,
    /// Ports, network order.
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub dir: u8,
    pub _pad: u16,
}

/// Value of `LB_CT`: the tuple a matching packet is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// New source address and port (network order, IPv4-mapped for IPv4).
    pub src: Addr,
    /// New destination address and port.
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    /// Frontend id of the flow.
    pub svc_id: u32,
    /// Backend id chosen for the flow (forward entries): a flow whose backend left is
    /// balanced afresh.
    pub backend_id: u32,
    /// `CT_F_*`.
    pub flags: u32,
    /// `bpf_ktime_get_ns()` when the flow was last seen (refreshed at most once a
    /// second).
    pub last_seen_ns: u64,
}

/// Key of `LB_SOURCE_RANGES` (an LPM trie): `prefix_len` counts the 32 bits of
/// `svc_id` plus the prefix bits of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub prefix_len: u32,
    /// Frontend id, big-endian (an LPM key is matched bytewise).
    pub svc_id_be: u32,
    /// Client prefix, network order, IPv4-mapped for IPv4.
    pub addr: Addr,
}

/// Largest number of backends one frontend may have (slots are u16, slot 0 is the
/// frontend itself).
pub const MAX_BACKENDS_PER_FRONTEND: u32 = u16::MAX as u32;

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), in network
/// byte order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A 16-byte address as four 32-bit words in network byte order.
pub type Addr = [u32; 4];

/// Builds the stored form of an IPv4 address given as the kernel's network-order `u32`.
#[inline(always)]
pub const fn addr_from_v4_raw(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether a stored address is IPv4-mapped.
#[inline(always)]
pub const fn addr_is_v4(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Converts an address to its stored form.
pub fn addr_from_ip(ip: IpAddr) -> Addr {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = u32::from_ne_bytes([
            octets[i * 4],
            octets[i * 4 + 1],
            octets[i * 4 + 2],
            octets[i * 4 + 3],
        ]);
        i += 1;
    }
    words
}

/// Converts a stored address back; IPv4-mapped addresses come back as IPv4.
pub fn addr_to_ip(addr: &Addr) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Converts a host-order port to its stored (network-order) form.
#[inline(always)]
pub const fn port_to_net(port: u16) -> u16 {
    port.to_be()
}

/// Converts a stored (network-order) port to host order.
#[inline(always)]
pub const fn port_from_net(port: u16) -> u16 {
    u16::from_be(port)
}

/// Returns an IPv4 address as the kernel's network-order `u32` (`user_ip4`).
pub fn v4_raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Key of `LB_SERVICES`.
///
/// Slot 0 is the frontend entry (its [`ServiceValue::count`] says how many backends the
/// service has); slots `1..=count` point at backends. A lookup picks
/// `slot = hash % count + 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend (ClusterIP) address, network order, IPv4-mapped for IPv4.
    pub addr: Addr,
    /// Frontend port, network order.
    pub port: u16,
    /// IP protocol number (`IPPROTO_TCP`, `IPPROTO_UDP`, `IPPROTO_SCTP`).
    pub proto: u8,
    /// Which hooks the frontend is for: [`SCOPE_INTERNAL`] (connections made on this
    /// node, socket hooks) or [`SCOPE_EXTERNAL`] (packets from elsewhere, TC).
    pub scope: u8,
    /// 0 = frontend entry, `1..=count` = backend slots.
    pub slot: u16,
    pub _pad: u16,
}

impl ServiceKey {
    pub const fn new(addr: Addr, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            scope,
            slot,
            _pad: 0,
        }
    }
}

/// `ServiceKey::scope` of frontends the socket hooks serve.
pub const SCOPE_INTERNAL: u8 = 0;
/// `ServiceKey::scope` of frontends the TC programs serve.
pub const SCOPE_EXTERNAL: u8 = 1;

/// `ServiceValue::flags`: `sessionAffinity: ClientIP` (timeout in `affinity_timeout`).
pub const SVC_F_AFFINITY: u16 = 1 << 0;
/// `ServiceValue::flags`: the backend set follows a Local traffic policy (external
/// scope: keep the client address, never SNAT).
pub const SVC_F_LOCAL: u16 = 1 << 1;
/// `ServiceValue::flags`: clients must match `loadBalancerSourceRanges`.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 2;
/// `ServiceValue::flags`: a node port (on one of the node's own addresses), so a
/// packet the TC program does not serve can be left to the node's stack, which
/// refuses it (TCP reset, ICMP port unreachable) as kube-proxy's REJECT does.
pub const SVC_F_NODE_PORT: u16 = 1 << 3;

/// `Backend::flags`: the backend runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// Value of `LB_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Backend id this slot points at (slots only; 0 in the frontend entry).
    pub backend_id: u32,
    /// Frontend id: index into `LB_FRONTEND_STATS`; also tags reverse-translation entries.
    pub svc_id: u32,
    /// Number of backend slots (frontend entry only). 0 = the service exists but has no
    /// backends, and `connect()` is refused with ECONNREFUSED.
    pub count: u16,
    /// `SVC_F_*` flags (frontend entry only).
    pub flags: u16,
    /// Session affinity timeout in seconds (frontend entry with `SVC_F_AFFINITY`).
    pub affinity_timeout: u32,
}

/// Key of `LB_BACKENDS` is the backend id (`u32`, `1..MAX_BACKENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    /// Pod address, network order, IPv4-mapped for IPv4.
    pub addr: Addr,
    /// Pod port, network order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
    pub _pad: u32,
}

/// Key of `LB_SOCK_REVNAT`: one translated socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend address, network order, IPv4-mapped for IPv4.
    pub addr: Addr,
    /// Backend port, network order.
    pub port: u16,
    pub _pad: [u16; 3],
}

/// Value of `LB_SOCK_REVNAT`: what the application originally dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevValue {
    /// Frontend address, network order, IPv4-mapped for IPv4.
    pub addr: Addr,
    /// Frontend port, network order.
    pub port: u16,
    pub _pad: u16,
    /// Frontend id the socket was translated for.
    pub svc_id: u32,
    /// `bpf_get_netns_cookie()` of the socket's network namespace.
    pub netns_cookie: u64,
}

/// `AffinityKey::kind`: the client is a network namespace (socket hooks: a pod).
pub const AFFINITY_CLIENT_NETNS: u8 = 0;
/// `AffinityKey::kind`: the client is an IP address (packets from outside the node).
pub const AFFINITY_CLIENT_IP: u8 = 1;

/// Key of `LB_AFFINITY`: one client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// The client: a netns cookie in the first two words (`AFFINITY_CLIENT_NETNS`), or
    /// an address, network order, IPv4-mapped for IPv4 (`AFFINITY_CLIENT_IP`).
    pub client: Addr,
    /// Frontend id.
    pub svc_id: u32,
    /// `AFFINITY_CLIENT_*`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

impl AffinityKey {
    pub const fn netns(cookie: u64, svc_id: u32) -> Self {
        Self {
            client: [cookie as u32, (cookie >> 32) as u32, 0, 0],
            svc_id,
            kind: AFFINITY_CLIENT_NETNS,
            _pad: [0; 3],
        }
    }
}

/// Value of `LB_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    /// The backend this client sticks to.
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last connection that used it; the entry is stale
    /// once the frontend's `affinity_timeout` seconds have passed since.
    pub last_used_ns: u64,
}

/// Key of `LB_AFFINITY_MEMBERS` (the value is unused): this backend is one of the
/// frontend's current backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct AffinityMember {
    pub svc_id: u32,
    pub backend_id: u32,
}

/// Entries of one socket's [`SockLocal`].
pub const SOCK_LOCAL_ENTRIES: usize = 4;
/// `SockLocalEntry::kind`: unused.
pub const LOCAL_EMPTY: u8 = 0;
/// `SockLocalEntry::kind`: an unconnected UDP send (`sendmsg` with an address).
pub const LOCAL_SENT: u8 = 1;
/// `SockLocalEntry::kind`: a `connect()` translation `LB_SOCK_REVNAT` had no room for.
pub const LOCAL_OVERFLOW: u8 = 2;
/// `SockLocal::flags`: the socket holds (or held) a [`LOCAL_OVERFLOW`] entry.
pub const SOCK_LOCAL_F_OVERFLOWED: u32 = 1;

/// One reverse translation kept in a socket's own storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockLocalEntry {
    /// Backend address, network order, IPv4-mapped for IPv4.
    pub backend: Addr,
    /// What the application dialled, network order, IPv4-mapped for IPv4.
    pub orig: Addr,
    /// Frontend id.
    pub svc_id: u32,
    /// Backend port, network order.
    pub backend_port: u16,
    /// Dialled port, network order.
    pub orig_port: u16,
    /// `LOCAL_*`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

/// Value of `LB_SOCK_LOCAL`, socket-local storage the kernel frees with its socket:
/// the reverse translations of an unconnected UDP socket (one per backend it sent to,
/// the oldest overwritten first), and a connected socket's translation when
/// `LB_SOCK_REVNAT` was full. `lb` finds the latter through sock_diag to terminate
/// them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockLocal {
    pub entries: [SockLocalEntry; SOCK_LOCAL_ENTRIES],
    /// Next entry to (over)write, modulo [`SOCK_LOCAL_ENTRIES`].
    pub next: u32,
    /// `SOCK_LOCAL_F_*`.
    pub flags: u32,
}

/// Per-frontend counters (`LB_FRONTEND_STATS`, indexed by frontend id, updated with
/// atomic adds).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrontendStats {
    /// Sockets or datagrams translated to a backend.
    pub translated: u64,
    /// `connect()`/`sendmsg()` calls refused because the service had no backends.
    pub refused: u64,
}

/// Value of `LB_FRONTEND_NAMES` (frontend id -> "namespace/name:port-name"), written by
/// userspace for `lb list` and `bpftool`; the programs never read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendName {
    /// UTF-8, NUL-padded.
    pub name: [u8; 128],
}

impl FrontendName {
    /// Stores `text`, truncated at a character boundary to fit.
    pub fn new(text: &str) -> Self {
        let mut name = [0u8; 128];
        let mut end = text.len().min(name.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        name[..end].copy_from_slice(&text.as_bytes()[..end]);
        Self { name }
    }

    pub fn as_str(&self) -> &str {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..end]).unwrap_or("")
    }
}

/// Indices of the per-CPU global counters in `LB_STATS`.
pub mod stat {
    /// Destination was a service and was rewritten to a backend.
    pub const TRANSLATED: u32 = 0;
    /// Destination was a service without backends: refused with ECONNREFUSED.
    pub const REFUSED_NO_BACKEND: u32 = 1;
    /// Destination was not a service: left untouched.
    pub const NOT_SERVICE: u32 = 2;
    /// A slot or backend vanished between lookups (a concurrent update); retried.
    pub const RACE_RETRY: u32 = 3;
    /// Still inconsistent after retries: refused rather than sent to the ClusterIP.
    pub const LOOKUP_FAILED: u32 = 4;
    /// A reply source or peer name was translated back to the ClusterIP.
    pub const REVNAT_HIT: u32 = 5;
    /// Recording a translated socket for reverse translation failed (other than for
    /// lack of room).
    pub const REVNAT_UPDATE_FAILED: u32 = 6;
    /// `LB_SOCK_REVNAT` was full: the translation was kept in the socket's own storage.
    pub const REVNAT_FULL: u32 = 7;
    /// Sockets that got such an overflow entry (once each).
    pub const OVERFLOWED_SOCKETS: u32 = 8;
    /// ... and of those, how many were released since.
    pub const OVERFLOWED_RELEASED: u32 = 9;
    /// Sockets given per-socket storage (unconnected UDP sends, overflow).
    pub const LOCAL_CREATED: u32 = 10;
    /// ... and of those, how many were released since.
    pub const LOCAL_RELEASED: u32 = 11;
    /// `LB_SOCK_REVNAT` entries deleted because their socket was released.
    pub const REVNAT_RELEASED: u32 = 12;
    /// sessionAffinity: the client's remembered backend was used.
    pub const AFFINITY_HIT: u32 = 13;
    /// sessionAffinity: no live entry (new client, expired, backend gone): chosen
    /// afresh and remembered.
    pub const AFFINITY_MISS: u32 = 14;
    /// TC: an IPv4 header that is not one (version other than 4, or a header length
    /// under 20 bytes): dropped, as the stack would.
    pub const TC_MALFORMED: u32 = 15;
    /// TC: a packet to an external frontend was sent to a backend.
    pub const TC_TRANSLATED: u32 = 16;
    /// TC: a reply of a tracked flow was translated back to the frontend.
    pub const TC_REVERSE_TRANSLATED: u32 = 17;
    /// TC: a TCP/UDP packet whose destination is not an external frontend.
    pub const TC_NOT_SERVICE: u32 = 18;
    /// TC: an external frontend without (local) backends: left to the stack on a
    /// node port of a Cluster-policy Service (which refuses it), else dropped.
    pub const TC_NO_BACKEND: u32 = 19;
    /// TC: a client outside `loadBalancerSourceRanges`: dropped.
    pub const TC_POLICY_DROP: u32 = 20;
    /// TC: a TCP packet other than a SYN to a frontend with no tracked flow (an
    /// expired or evicted flow, or forged): never tracked (only a SYN starts a flow);
    /// left to the stack on a node port (which resets it), else dropped.
    pub const TC_CT_MISS_NON_SYN: u32 = 21;
    /// TC: an IPv4 fragment or IPv6 fragment header seen (the first fragment of a
    /// datagram for a frontend is dropped: later ones carry no ports).
    pub const TC_FRAGMENT: u32 = 22;
    /// TC: a new flow's source was replaced by the node's address.
    pub const TC_SNAT: u32 = 23;
    /// TC: no free SNAT port: dropped.
    pub const TC_SNAT_FAILED: u32 = 24;
    /// TC: the route lookup after translation failed; the kernel routes the packet.
    pub const TC_FIB_MISS: u32 = 25;
    /// TC: a packet of a tracked flow (either direction).
    pub const TC_CT_HIT: u32 = 26;
    /// TC: a new flow was tracked.
    pub const TC_CT_CREATED: u32 = 27;
    /// TC: rewriting a packet failed (a helper error): dropped.
    pub const TC_REWRITE_FAILED: u32 = 28;
    /// TC: an ICMP error about a tracked flow was translated for its client.
    pub const TC_ICMP_TRANSLATED: u32 = 29;
    /// TC: a client connected straight to a pod from a tuple a finished node-port flow
    /// had used: that flow's reply entry was removed.
    pub const TC_CT_STALE_REMOVED: u32 = 30;
    /// TC: SNAT needed but the node has no address of the packet's family: dropped.
    pub const TC_SNAT_NO_ADDRESS: u32 = 31;
    /// TC: a flow's first answer moved it to the established table (`LB_CT_EST`).
    pub const TC_CT_ESTABLISHED: u32 = 32;
    /// TC: the established table was full: the answered flow stays in `LB_CT`, where
    /// new flows may evict it (raise `--max-flows`).
    pub const TC_CT_ESTABLISHED_FULL: u32 = 33;
    /// A connect or send from a pod in `packet` or `off` mode: the socket hooks left it
    /// alone (whatever its destination).
    pub const WORKLOAD_SKIPPED: u32 = 34;
    /// Number of counters.
    pub const COUNT: u32 = 35;

    /// Human names, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "translated",
        "refused_no_backend",
        "not_service",
        "race_retry",
        "lookup_failed",
        "revnat_hit",
        "revnat_update_failed",
        "revnat_full",
        "overflowed_sockets",
        "overflowed_released",
        "local_created",
        "local_released",
        "revnat_released",
        "affinity_hit",
        "affinity_miss",
        "tc_malformed",
        "tc_translated",
        "tc_reverse_translated",
        "tc_not_service",
        "tc_no_backend",
        "tc_policy_drop",
        "tc_ct_miss_non_syn",
        "tc_fragment",
        "tc_snat",
        "tc_snat_failed",
        "tc_fib_miss",
        "tc_ct_hit",
        "tc_ct_created",
        "tc_rewrite_failed",
        "tc_icmp_translated",
        "tc_ct_stale_removed",
        "tc_snat_no_address",
        "tc_ct_established",
        "tc_ct_established_full",
        "workload_skipped",
    ];
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<Backend>() == 24);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 32);
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 32);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityMember>() == 8);
const _: () = assert!(core::mem::size_of::<SockLocalEntry>() == 44);
const _: () = assert!(core::mem::size_of::<SockLocal>() == 184);
const _: () = assert!(core::mem::size_of::<FrontendStats>() == 16);
const _: () = assert!(core::mem::size_of::<FrontendName>() == 128);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 56);
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 24);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers, and have explicit
    // padding fields, so every byte pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SockLocal {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMember {}
    unsafe impl aya::Pod for FrontendStats {}
    unsafe impl aya::Pod for FrontendName {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_round_trips_as_mapped() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let stored = addr_from_ip(ip);
        assert!(addr_is_v4(&stored));
        // The last word is exactly what the kernel puts in `user_ip4`.
        assert_eq!(stored[3], v4_raw(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(stored, addr_from_v4_raw(stored[3]));
        assert_eq!(addr_to_ip(&stored), ip);
    }

    #[test]
    fn ipv6_round_trips() {
        let ip: IpAddr = "fd00:96::a".parse().unwrap();
        let stored = addr_from_ip(ip);
        assert!(!addr_is_v4(&stored));
        assert_eq!(addr_to_ip(&stored), ip);
    }

    #[test]
    fn frontend_names_truncate_on_char_boundaries() {
        assert_eq!(
            FrontendName::new("pods/redis-master").as_str(),
            "pods/redis-master"
        );
        let long = "é".repeat(100);
        let stored = FrontendName::new(&long);
        assert_eq!(stored.as_str(), "é".repeat(64));
    }

    #[test]
    fn affinity_keys_hold_the_netns_cookie_in_the_first_words() {
        let key = AffinityKey::netns(0x1122_3344_5566_7788, 9);
        assert_eq!(key.client, [0x5566_7788, 0x1122_3344, 0, 0]);
        assert_eq!((key.svc_id, key.kind), (9, AFFINITY_CLIENT_NETNS));
        // Byte layout as bpftool shows it: client (16), svc_id (4), kind (1), padding.
        let bytes: [u8; 24] = unsafe { core::mem::transmute(key) };
        assert_eq!(&bytes[0..8], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&bytes[16..20], &9u32.to_ne_bytes());
        assert_eq!(bytes[20], AFFINITY_CLIENT_NETNS);
    }

    #[test]
    fn ports_are_network_order() {
        assert_eq!(port_to_net(6379).to_ne_bytes(), 6379u16.to_be_bytes());
        assert_eq!(port_from_net(port_to_net(53)), 53);
    }
}
