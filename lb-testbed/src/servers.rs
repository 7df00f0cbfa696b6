//! The real servers test pods run, as argument vectors: the testbed's pods and the
//! simulated kubelet's containers start them the same way.

use std::{fs, net::IpAddr, path::Path};

use anyhow::Result;

use crate::Pod;

/// Borrowed views for `Command::args`-style APIs.
pub fn refs(argv: &[String]) -> Vec<&str> {
    argv.iter().map(String::as_str).collect()
}

/// redis-server on `port`, bound to the pod's addresses and loopback, no persistence.
pub fn redis(pod: &Pod, port: u16, dir: &Path) -> Vec<String> {
    [
        "redis-server",
        "--port",
        &port.to_string(),
        "--bind",
        &format!("{} {} ::1 127.0.0.1", pod.ipv4, pod.ipv6),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--dir",
        &dir.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// dnsmasq on port 53 (UDP and TCP, both families). It answers `whoami.test` with the
/// pod's own addresses (A and AAAA), so clients can tell which backend answered, and
/// each `(name, address)` of `records`.
pub fn dnsmasq(pod: &Pod, records: &[(&str, IpAddr)]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--bind-interfaces",
        "--port=53",
        "--pid-file=",
        "--user=root",
        "--log-facility=-",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(format!("--listen-address={},{}", pod.ipv4, pod.ipv6));
    argv.push(format!("--address=/whoami.test/{}", pod.ipv4));
    argv.push(format!("--address=/whoami.test/{}", pod.ipv6));
    for (name, address) in records {
        argv.push(format!("--host-record={name},{address}"));
    }
    argv
}

/// The document root of [`http`]: `/` and `/whoami` answer `identity`.
pub fn http_root(root: &Path, identity: &str) -> Result<()> {
    fs::create_dir_all(root)?;
    fs::write(root.join("whoami"), identity)?;
    fs::write(root.join("index.html"), format!("{identity}\n"))?;
    Ok(())
}

/// An HTTP server (python3 http.server) on `port`, both families, serving `root`.
pub fn http(root: &Path, port: u16) -> Vec<String> {
    [
        "python3",
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "::",
        "--directory",
        &root.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
