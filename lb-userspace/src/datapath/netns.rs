//! Doing things in the network namespace that holds the node's external interfaces
//! (`lb daemon --netns`; by default the daemon's own): attaching the TC programs
//! (interface indexes are per namespace) and binding health-check node ports.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// While alive, the calling thread is in another network namespace; dropping it
/// returns the thread to the namespace it was in. Nothing between may yield to other
/// work on the thread (use it in synchronous code only).
pub struct NetnsGuard {
    original: Option<File>,
}

impl NetnsGuard {
    /// Enters `netns` (a `/run/netns/NAME` or `/proc/PID/ns/net` path); `None` stays.
    pub fn enter(netns: Option<&Path>) -> Result<Self> {
        let Some(path) = netns else {
            return Ok(Self { original: None });
        };
        let original = File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        let target = File::open(path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        setns(&target).with_context(|| format!("entering network namespace {}", path.display()))?;
        Ok(Self {
            original: Some(original),
        })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Some(original) = &self.original
            && let Err(err) = setns(original)
        {
            // A thread stuck in the wrong namespace would bind and attach in the wrong
            // place from now on: not recoverable.
            panic!("cannot return to the daemon's network namespace: {err}");
        }
    }
}

fn setns(ns: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Interfaces of the current namespace and their addresses (`getifaddrs`).
pub fn interface_addresses() -> Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut found = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string; ifa_addr points at a sockaddr of
        // the family it says.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        found.push((name, ip));
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The interfaces that hold any of `addresses` (the default `--devices`).
pub fn devices_holding(addresses: &[IpAddr]) -> Result<Vec<String>> {
    let mut devices: Vec<String> = interface_addresses()?
        .into_iter()
        .filter(|(name, ip)| name != "lo" && addresses.contains(ip))
        .map(|(name, _)| name)
        .collect();
    devices.sort();
    devices.dedup();
    Ok(devices)
}

/// Checks `--netns` names a network namespace.
pub fn check(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        bail!("--netns {}: no such network namespace", path.display());
    }
    Ok(path.to_path_buf())
}
