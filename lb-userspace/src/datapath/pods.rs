//! A pod's host-side interface, where packet mode attaches, found from the pod's
//! cgroup whatever the CNI (routed veths, or veths on a bridge): a process of the pod
//! gives its network namespace; there, the interface holding the pod's address names
//! its veth peer (`IFLA_LINK`), the interface on the node's side.

use std::{
    fs::File,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use anyhow::{Context as _, Result, bail};

use super::{netns, tc_netlink};

/// A process of the cgroup tree at `dir` (the pod's), if any runs yet.
fn process_in(dir: &Path) -> Option<i32> {
    let own = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    if let Some(pid) = own.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| process_in(&e.path()))
}

/// The name, in the devices' namespace (`devices_netns`, else this thread's), of the
/// interface facing the pod whose processes run in `cgroup` and that holds one of
/// `ips`. `Ok(None)` while no process of the pod runs or it has no such address yet.
pub fn host_side_interface(
    cgroup: &Path,
    ips: &[IpAddr],
    devices_netns: Option<&Path>,
) -> Result<Option<String>> {
    let Some(pid) = process_in(cgroup) else {
        return Ok(None);
    };
    let ns_path = format!("/proc/{pid}/ns/net");
    let pod_ns = match File::open(&ns_path) {
        Ok(file) => file,
        // The process just exited: look again later.
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("opening {ns_path}")),
    };
    let node_ns = devices_netns.map_or_else(
        || std::fs::metadata("/proc/thread-self/ns/net"),
        std::fs::metadata,
    )?;
    if pod_ns.metadata()?.ino() == node_ns.ino() {
        bail!(
            "it shares the node's network namespace (hostNetwork): there is no interface of its \
             own to balance its packets on"
        );
    }
    // setns changes the calling thread only: a thread of its own enters the pod.
    let inside = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Option<(u32, u32)>> {
                // SAFETY: plain syscall on a descriptor we own.
                if unsafe { libc::setns(pod_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("entering the pod's network namespace");
                }
                let Some(name) = netns::interface_addresses()?
                    .into_iter()
                    .find(|(name, ip)| name != "lo" && ips.contains(ip))
                    .map(|(name, _)| name)
                else {
                    return Ok(None);
                };
                let index = tc_netlink::interfaces()?
                    .into_iter()
                    .find(|(_, n)| *n == name)
                    .map(|(i, _)| i)
                    .with_context(|| format!("interface {name} vanished"))?;
                let peer = tc_netlink::link_peer(index)?.with_context(|| {
                    format!("the pod's interface {name} has no peer (not a veth)")
                })?;
                Ok(Some((index, peer)))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread inside the pod's namespace panicked"))?
    })?;
    let Some((pod_index, peer)) = inside else {
        return Ok(None);
    };
    let _entered = netns::NetnsGuard::enter(devices_netns)?;
    let name = tc_netlink::interfaces()?
        .into_iter()
        .find(|(i, _)| *i == peer)
        .map(|(_, n)| n)
        .with_context(|| format!("no interface {peer} on the node's side"))?;
    // The index is the peer's in the peer's namespace: make sure that is this one.
    if tc_netlink::link_peer(peer)? != Some(pod_index) {
        bail!("interface {name} is not the pod's veth peer (its peer is in another namespace)");
    }
    Ok(Some(name))
}

/// Whether `device` exists in the devices' namespace.
pub fn interface_exists(device: &str, devices_netns: Option<&Path>) -> Result<bool> {
    let _entered = netns::NetnsGuard::enter(devices_netns)?;
    Ok(tc_netlink::interfaces()?.iter().any(|(_, n)| n == device))
}
