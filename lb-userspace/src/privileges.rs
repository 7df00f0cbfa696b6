//! Least privilege. Once the datapath is loaded, every thread keeps only the
//! capabilities its own work needs (Linux capabilities are per thread, and threads
//! inherit them from the thread that creates them):
//!
//! | thread | keeps | for |
//! |---|---|---|
//! | sync (maps, attach, socket termination) | `CAP_BPF`, `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`, `CAP_SYS_PTRACE` | map writes; cgroup attach and `SOCK_DESTROY`; entering pod network namespaces (`setns`); opening other processes' `/proc/<pid>/ns/net` |
//! | everything else (main, runtime, sources, HTTP) | `CAP_BPF` | reading counters for `/metrics` and the eBPF log ring |
//!
//! Dropped for good (effective, permitted, inheritable and ambient sets): everything
//! else, including `CAP_SYS_RESOURCE` (memlock, only needed while loading on kernels
//! older than 5.11) and `CAP_DAC_OVERRIDE`. Every thread also sets `no_new_privs`, so
//! no `execve` (of a setuid or file-capability binary) can give any back. The bounding
//! set is lowered too where the process may (`CAP_SETPCAP`, which a container runtime
//! normally withholds: the DaemonSet drops it); without it the bounding set keeps the
//! capabilities the pod was given, which `no_new_privs` and an empty permitted set make
//! unreachable.

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
    let effective = caps::read(None, CapSet::Effective)?;
    // Dropping from the bounding set needs CAP_SETPCAP: first, while it is held.
    if effective.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    // Lowering these needs no privilege.
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let kept: CapsHashSet = effective.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    set_no_new_privs()?;
    debug!(kept = ?kept, "capabilities of this thread");
    Ok(())
}

fn set_no_new_privs() -> Result<(), caps::errors::CapsError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(caps::errors::CapsError::from(format!(
            "PR_SET_NO_NEW_PRIVS: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
