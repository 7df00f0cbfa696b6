//! Every map the datapath uses. Capacities, flags and sizes come from the one table
//! in `lb_common::maps` (the loader resizes maps to the daemon's `--max-*` flags);
//! layouts and byte order are documented there too.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, FrontendName, FrontendStats, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
    maps::{BACKEND_STATS, BACKENDS, FRONTEND_NAMES, FRONTEND_STATS, SERVICES, SOCK_REVNAT, STATS},
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

/// Translated sockets: (socket cookie, backend) -> the ClusterIP:port the application
/// dialled. Read by recvmsg/getpeername; read by userspace to terminate sockets whose
/// backend went away.
#[map]
pub static LB_SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(SOCK_REVNAT.max_entries, SOCK_REVNAT.flags);

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
