//! Every map the datapath uses. Capacities, flags and sizes come from the one table
//! in `lb_common::maps` (the loader resizes maps to the daemon's `--max-*` flags);
//! layouts and byte order are documented there too.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type},
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use aya_ebpf::{helpers::generated::bpf_map_lookup_elem, maps::LpmTrie};
use lb_common::{
    Addr, AffinityKey, AffinityMember, AffinityValue, Backend, CtKey, CtValue, FrontendName,
    FrontendStats, ServiceKey, ServiceValue, SockLocal, SockRevKey, SockRevValue,
    maps::{
        AFFINITY, AFFINITY_MEMBERS, BACKEND_STATS, BACKENDS, CT, CT_ESTABLISHED, DEFAULT_FRONTENDS,
        FRONTEND_NAMES, FRONTEND_STATS, NODE_ADDRS, POD_INTERFACES, SERVICES, SOCK_REVNAT,
        SOCK_REVNAT_LRU, SOURCE_RANGES, STATS, WORKLOAD_COUNT, WORKLOADS,
    },
};

/// Frontends (slot 0) and their backend slots. Not preallocated: elements are freed
/// through RCU, so a value read by a program is never reused under it by a concurrent
/// update from userspace.
#[map]
pub static LB_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES.max_entries, SERVICES.flags);

/// Backend id -> pod address and port.
#[map]
pub static LB_BACKENDS: HashMap<u32, Backend> =
    HashMap::pinned(BACKENDS.max_entries, BACKENDS.flags);

/// sessionAffinity ClientIP: (client, frontend) -> backend and last use. An LRU: a
/// busy node forgets its least recently seen clients first, as kube-proxy's `recent`
/// lists do.
#[map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY.max_entries, AFFINITY.flags);

/// The current (frontend, backend) pairs of affinity frontends, written by userspace:
/// a remembered backend that left its frontend is never used again.
#[map]
pub static LB_AFFINITY_MEMBERS: HashMap<AffinityMember, u32> =
    HashMap::pinned(AFFINITY_MEMBERS.max_entries, AFFINITY_MEMBERS.flags);

/// Translated connected sockets: (socket cookie, backend) -> the ClusterIP:port the
/// application dialled. Read by recvmsg/getpeername and by userspace to terminate
/// sockets whose backend went away; an entry is deleted when its socket is released,
/// so nothing is ever evicted.
#[map]
pub static LB_SOCK_REVNAT: HashMap<SockRevKey, SockRevValue> =
    HashMap::pinned(SOCK_REVNAT.max_entries, SOCK_REVNAT.flags);

/// Stands in for `LB_SOCK_REVNAT` on kernels without `cgroup/sock_release` (< 5.9),
/// where nothing could delete entries: every translated socket, least recently used
/// evicted first. One entry elsewhere.
#[map]
pub static LB_SOCK_REVNAT_LRU: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(SOCK_REVNAT_LRU.max_entries, SOCK_REVNAT_LRU.flags);

/// A BTF socket-storage map definition that is pinned by name (aya-ebpf's `SkStorage`
/// is not pinned, and storage must survive daemon restarts like the other maps).
/// The fields are the BTF map-definition convention; they are never read.
#[repr(C)]
pub struct PinnedSockStorage {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SockLocal,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
}

// SAFETY: a placeholder the loader replaces with a map reference; no state.
unsafe impl Sync for PinnedSockStorage {}

impl PinnedSockStorage {
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    /// The storage of socket `sk` (a `struct bpf_sock *` the verifier knows as a full
    /// socket, or a `cgroup/sock` context), created zeroed if `create`; null if it has
    /// none (or it could not be created).
    #[inline(always)]
    pub fn get_ptr(&self, sk: *mut c_void, create: bool) -> *mut SockLocal {
        let flags = if create {
            BPF_SK_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        let map = ptr::from_ref(self).cast_mut().cast();
        unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), flags) }.cast()
    }
}

/// Per-socket storage, freed by the kernel with its socket: the reverse translations
/// of unconnected UDP sends, and connected translations `LB_SOCK_REVNAT` had no room
/// for (flagged, so userspace can find those sockets through sock_diag).
#[btf_map]
pub static LB_SOCK_LOCAL: PinnedSockStorage = PinnedSockStorage::new();

/// TC connection tracking: both directions of every flow from another machine not
/// answered yet, each keyed by the tuple as it arrives, valued by the tuple to rewrite
/// it to.
#[map]
pub static LB_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CT.max_entries, CT.flags);

/// TC connection tracking of answered flows (moved from `LB_CT` on their first
/// answer): never evicted by new flows.
#[map]
pub static LB_CT_EST: HashMap<CtKey, CtValue> =
    HashMap::pinned(CT_ESTABLISHED.max_entries, CT_ESTABLISHED.flags);

/// `loadBalancerSourceRanges`: (frontend id, client prefix) -> 1.
#[map]
pub static LB_SOURCE_RANGES: LpmTrie<[u32; 5], u32> =
    LpmTrie::pinned(SOURCE_RANGES.max_entries, SOURCE_RANGES.flags);

/// The node's SNAT source per family: [0] IPv4 (mapped), [1] IPv6.
#[map]
pub static LB_NODE_ADDRS: Array<Addr> = Array::pinned(NODE_ADDRS.max_entries, NODE_ADDRS.flags);

/// Pod cgroup id -> load-balancing mode, for pods not balanced by the socket hooks.
#[map]
pub static LB_WORKLOADS: HashMap<u64, u32> =
    HashMap::pinned(WORKLOADS.max_entries, WORKLOADS.flags);

/// Entries in `LB_WORKLOADS`, kept by userspace: zero while no pod opted out, so the
/// socket hooks then pay one array read.
#[map]
pub static LB_WORKLOAD_COUNT: Array<u32> =
    Array::pinned(WORKLOAD_COUNT.max_entries, WORKLOAD_COUNT.flags);

/// Host-side ifindex of each packet-mode pod: where `lb_tc_pod_ingress` starts flows.
#[map]
pub static LB_POD_INTERFACES: HashMap<u32, u32> =
    HashMap::pinned(POD_INTERFACES.max_entries, POD_INTERFACES.flags);

/// BTF definition of one Maglev table (the inner map template): backend ids indexed by
/// `flow hash % table size`. `BPF_F_INNER_MAP` lets tables of any `--maglev-table-size`
/// stand in for it. Fields follow the BTF map-definition convention; never read.
#[repr(C)]
pub struct MaglevTableDef {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_ARRAY as usize],
    key: *const u32,
    value: *const u32,
    max_entries: *const [i32; lb_common::DEFAULT_MAGLEV_TABLE_SIZE as usize],
    map_flags: *const [i32; lb_common::MAGLEV_TABLE_FLAGS as usize],
}

/// BTF definition of `LB_MAGLEV`: a pinned hash of maps, frontend id -> its table.
/// Userspace builds a new table and swaps it in with one update, so a lookup sees
/// either the old table or the new one, never a half-written one.
#[repr(C)]
pub struct MaglevMapDef {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_HASH_OF_MAPS as usize],
    key: *const u32,
    max_entries: *const [i32; DEFAULT_FRONTENDS as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
    values: [*const MaglevTableDef; 0],
}

// SAFETY: a placeholder the loader replaces with a map reference; no state.
unsafe impl Sync for MaglevMapDef {}

impl MaglevMapDef {
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            max_entries: ptr::null(),
            pinning: ptr::null(),
            values: [],
        }
    }

    /// Entry `index` of frontend `svc_id`'s table (a backend id), if it has a table and
    /// the index is inside it.
    #[inline(always)]
    pub fn backend_id(&self, svc_id: u32, index: u32) -> Option<u32> {
        let outer = ptr::from_ref(self).cast_mut().cast();
        let table = unsafe { bpf_map_lookup_elem(outer, ptr::from_ref(&svc_id).cast()) };
        if table.is_null() {
            return None;
        }
        let entry = unsafe { bpf_map_lookup_elem(table, ptr::from_ref(&index).cast()) };
        if entry.is_null() {
            return None;
        }
        Some(unsafe { *entry.cast::<u32>() })
    }
}

#[btf_map]
pub static LB_MAGLEV: MaglevMapDef = MaglevMapDef::new();

/// Global per-CPU decision counters, indexed by `lb_common::stat`.
#[map]
pub static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS.max_entries, STATS.flags);

/// Per-frontend counters, indexed by frontend id (atomic adds).
#[map]
pub static LB_FRONTEND_STATS: Array<FrontendStats> =
    Array::pinned(FRONTEND_STATS.max_entries, FRONTEND_STATS.flags);

/// Per-backend connection counters, indexed by backend id (atomic adds).
#[map]
pub static LB_BACKEND_STATS: Array<u64> =
    Array::pinned(BACKEND_STATS.max_entries, BACKEND_STATS.flags);

/// Frontend id -> Service name, for `lb list` and `bpftool`. Written by userspace only.
#[map]
pub static LB_FRONTEND_NAMES: HashMap<u32, FrontendName> =
    HashMap::pinned(FRONTEND_NAMES.max_entries, FRONTEND_NAMES.flags);

/// Bumps a global counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = LB_STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, so a plain add is exact.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn atomic_inc(counter: *mut u64) {
    // A BPF atomic add (the result is unused, so no BPF_FETCH is needed): the counter is
    // shared between CPUs. `AtomicU64::fetch_add` is not offered on the bpf target.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, 1,
        )
    };
}

/// Bumps a frontend's translated or refused counter.
#[inline(always)]
pub fn count_frontend(svc_id: u32, refused: bool) {
    if let Some(stats) = LB_FRONTEND_STATS.get_ptr_mut(svc_id) {
        let counter = unsafe {
            if refused {
                &raw mut (*stats).refused
            } else {
                &raw mut (*stats).translated
            }
        };
        atomic_inc(counter);
    }
}

/// Bumps a backend's connection counter.
#[inline(always)]
pub fn count_backend(backend_id: u32) {
    if let Some(counter) = LB_BACKEND_STATS.get_ptr_mut(backend_id) {
        atomic_inc(counter);
    }
}
