//! Least privilege. Once the datapath is loaded, every thread keeps only the
//! capabilities its own work needs (Linux capabilities are per thread, and threads
//! inherit them from the thread that creates them):
//!
//! | thread | keeps | for |
//! |---|---|---|
//! | sync (maps, attach, socket termination) | `CAP_BPF`, `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE` | map writes; cgroup attach and `SOCK_DESTROY`; entering pod network namespaces (`setns`); opening other processes' `/proc/<pid>/ns/net` |
//! | everything else (main, runtime, sources, HTTP) | `CAP_BPF` | reading counters for `/metrics` and the eBPF log ring |
//!
//! Dropped for good (effective, permitted, inheritable, ambient and bounding sets):
//! everything else, including `CAP_SYS_RESOURCE` (memlock, only needed while loading
//! on kernels older than 5.11) and `CAP_DAC_OVERRIDE`.

use caps::{CapSet, Capability, CapsHashSet};
use tracing::{debug, warn};

pub const SYNC: &[Capability] = &[
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
];

pub const OTHER: &[Capability] = &[Capability::CAP_BPF];

/// Reduces the calling thread's capabilities to `keep` (or fewer, if it has fewer).
/// A failure (no capability support, not privileged) is logged, not fatal: the
/// daemon then runs with what it has.
pub fn limit_thread(keep: &[Capability]) {
    if let Err(err) = try_limit(keep) {
        warn!("could not drop unneeded capabilities: {err}");
    }
}

fn try_limit(keep: &[Capability]) -> Result<(), caps::errors::CapsError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    for cap in caps::read(None, CapSet::Bounding)? {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let effective: CapsHashSet = caps::read(None, CapSet::Effective)?
        .intersection(&keep)
        .copied()
        .collect();
    caps::set(None, CapSet::Effective, &effective)?;
    caps::set(None, CapSet::Permitted, &effective)?;
    debug!(kept = ?effective, "capabilities of this thread");
    Ok(())
}
