//! The daemon under the privileges it ships with: the DaemonSet's exact capability
//! set (`drop: [ALL]`, `add: [BPF, NET_ADMIN, SYS_ADMIN, SYS_PTRACE, SYS_RESOURCE]`),
//! not full root.

use anyhow::{Context as _, Result, ensure};
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "security::daemonset_capability_set_is_lowered_per_thread",
        daemonset_capability_set,
    )]
}

/// `deploy/daemonset.yaml`'s capabilities, as setpriv spells them.
const DAEMONSET_CAPS: &str = "-all,+bpf,+net_admin,+sys_admin,+sys_ptrace,+sys_resource";
const CAP_SYS_RESOURCE: u64 = 1 << 24;

/// Started as a container runtime starts it (root, bounding = inheritable-free set of
/// the five capabilities, no CAP_SETPCAP), the daemon loads, serves a ClusterIP, and
/// then every thread holds only what privileges.rs promises, effective and permitted,
/// with no_new_privs set; the bounding set cannot be lowered without CAP_SETPCAP and
/// stays the pod's five.
fn daemonset_capability_set() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(
        &dir,
        "redis.yaml",
        &redis_manifest("10.96.0.100", &backends.iter().collect::<Vec<_>>()),
    )?;
    let bounding = format!("--bounding-set={DAEMONSET_CAPS}");
    let inheritable = "--inh-caps=-all";
    let daemon = Daemon::start_wrapped(&tb, &dir, &["setpriv", &bounding, inheritable, "--"])?;
    let who = whoami(&tb, &client, "10.96.0.100", 6379)?;
    ensure!(
        backends.iter().any(|b| b.name == who),
        "the ClusterIP answered {who:?}"
    );
    let pid = daemon.pid().context("daemon pid")?;
    let pod_set = SYNC_CAPS | CAP_SYS_RESOURCE;
    let threads = ensure_least_privilege(pid, pod_set)?;
    for t in &threads {
        eprintln!(
            "thread {:<16} effective {:#012x} permitted {:#012x} bounding {:#012x} no_new_privs {}",
            t.name, t.effective, t.permitted, t.bounding, t.no_new_privs
        );
    }
    Ok(())
}
