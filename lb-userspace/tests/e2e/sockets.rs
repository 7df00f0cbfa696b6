//! Reverse-translation state that lives exactly as long as its socket: a long-lived
//! connection keeps its ClusterIP peer name, and is still terminated when its backend
//! leaves, however many other sockets come and go; a full socket map overflows into
//! the sockets' own storage without losing either.

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testbed::{Pod, Testbed};
use libtest_mimic::Trial;

use crate::{
    probe::Probe,
    support::*,
    trial,
    udp::{DNS_V4, REDIS_V4, ZONE_NAME, dns_world, manifests},
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "sockets::long_lived_sockets_survive_200k_short_lived_ones",
            long_lived_sockets_survive_churn,
        ),
        trial(
            "sockets::full_socket_map_overflows_and_still_terminates",
            full_socket_map_overflows_and_still_terminates,
        ),
        trial(
            "sockets::kernels_without_sock_release_fall_back_to_the_lru",
            kernels_without_sock_release_fall_back_to_the_lru,
        ),
    ]
}

/// Parsed `sockets:` line of `lb list`: (tracked, capacity, with per-socket storage,
/// overflowed).
fn socket_counts(daemon: &Daemon) -> Result<(u64, u64, u64, u64)> {
    let text = daemon.list_text()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("sockets: "))
        .with_context(|| format!("no sockets line in lb list:\n{text}"))?;
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    ensure!(numbers.len() >= 3, "sockets line: {line}");
    let overflowed = if line.contains("OVERFLOWED") {
        numbers[3]
    } else {
        0
    };
    Ok((numbers[0], numbers[1], numbers[2], overflowed))
}

/// `count` pooled TCP connections to the redis ClusterIP held for `seconds`, each
/// checked to see the ClusterIP as its peer: the probe and its connections.
fn hold_pool(tb: &Testbed, client: &Pod, count: usize, seconds: u64) -> Result<(Probe, Vec<Conn>)> {
    let mut pool = Probe::start(
        tb,
        client,
        &[
            "hold-many-tcp",
            REDIS_V4,
            "6379",
            &count.to_string(),
            &seconds.to_string(),
        ],
    )?;
    wait_line(&mut pool, "opened", Duration::from_secs(10))?;
    let conns = connections(&pool);
    ensure!(conns.len() == count, "pool: {:?}", pool.lines());
    for (i, _, peer) in &conns {
        ensure!(
            *peer == format!("{REDIS_V4}:6379"),
            "connection {i} peer {peer}"
        );
    }
    Ok((pool, conns))
}

/// One pooled connection: (index, backend pod, peer name).
type Conn = (usize, String, String);

/// `conn <i> <who> <peer>` lines of a hold-many-tcp probe.
fn connections(probe: &Probe) -> Vec<Conn> {
    probe
        .lines()
        .iter()
        .filter_map(|l| {
            let mut words = l.strip_prefix("conn ")?.split_whitespace();
            Some((
                words.next()?.parse().ok()?,
                words.next()?.to_string(),
                words.next()?.to_string(),
            ))
        })
        .collect()
}

/// Waits for a line, or fails with what the probe printed.
fn wait_line(probe: &mut Probe, what: &str, timeout: Duration) -> Result<String> {
    probe.wait_for(|l| l == what || l.starts_with(what), timeout)
}

/// Removes `removed` from the redis Service and checks that exactly the held
/// connections to it fail, within 1 s.
fn remove_backend_and_check(
    dir: &std::path::Path,
    backends: &[Pod],
    removed: usize,
    held: &Probe,
) -> Result<()> {
    let conns = connections(held);
    let removed_name = backends[removed].name.clone();
    let keep: Vec<&Pod> = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != removed)
        .map(|(_, p)| p)
        .collect();
    write_manifest(dir, "services.yaml", &manifests(&keep, false, true))?;
    let changed = Instant::now();
    let doomed: Vec<usize> = conns
        .iter()
        .filter(|(_, who, _)| *who == removed_name)
        .map(|(i, _, _)| *i)
        .collect();
    ensure!(
        !doomed.is_empty(),
        "no connection to {removed_name}: {conns:?}"
    );
    let deadline = changed + Duration::from_secs(1);
    for i in &doomed {
        let prefix = format!("error {i} ");
        loop {
            if let Some((at, line)) = held.line_after(changed, |l| l.starts_with(&prefix)) {
                ensure!(
                    at <= deadline,
                    "connection {i} to {removed_name} failed only after {:?}",
                    at - changed
                );
                ensure!(line.contains("error 103 "), "connection {i}: {line}");
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "connection {i} to removed backend {removed_name} still alive 1 s later: {:?}",
                    held.lines().iter().rev().take(20).collect::<Vec<_>>()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    // The others keep working: a round after the removal and no error for them.
    thread::sleep(Duration::from_millis(500));
    for (i, who, _) in conns.iter().filter(|(_, who, _)| *who != removed_name) {
        let prefix = format!("error {i} ");
        ensure!(
            held.line_after(changed, |l| l.starts_with(&prefix))
                .is_none(),
            "connection {i} to {who} broke"
        );
    }
    let recent = Instant::now() - Duration::from_millis(300);
    ensure!(
        held.line_after(recent, |l| l == "round").is_some(),
        "the connections to the other backend stopped answering"
    );
    Ok(())
}

/// The DNS world's Services (UDP and TCP on both backends) served by a daemon
/// started with `extra` flags.
fn dns_daemon(tb: &Testbed, backends: &[Pod], extra: &[&str]) -> Result<(PathBuf, Daemon)> {
    let dir = manifest_dir(tb)?;
    write_manifest(
        &dir,
        "services.yaml",
        &manifests(&backends.iter().collect::<Vec<_>>(), false, true),
    )?;
    let daemon = Daemon::start_with(tb, &dir, extra)?;
    Ok((dir, daemon))
}

/// The scenario: a long-lived TCP connection (a database pool) and a
/// long-lived unconnected UDP socket to ClusterIPs, then 200 000 short-lived UDP
/// sockets to the DNS ClusterIP. The long-lived ones keep their translation, the
/// tracked state shrinks back to the open sockets, and removing the connection's
/// backend still resets it within 1 s while connections to the other backend stay.
fn long_lived_sockets_survive_churn() -> Result<()> {
    let (tb, backends, client) = dns_world(2, true)?;
    let (dir, daemon) = dns_daemon(&tb, &backends, &[])?;
    // Four pooled connections (both backends, almost surely) and one resolver socket.
    let (pool, conns) = hold_pool(&tb, &client, 8, 120)?;
    let mut resolver = Probe::start(
        &tb,
        &client,
        &["hold-sendto", DNS_V4, "53", ZONE_NAME, "120"],
    )?;
    let first = wait_line(&mut resolver, "answer", Duration::from_secs(5))?;
    ensure!(
        first.ends_with(&format!("from {DNS_V4}:53")),
        "resolver: {first}"
    );

    let (tracked_before, capacity, ..) = socket_counts(&daemon)?;
    ensure!(
        tracked_before >= 8,
        "8 pooled connections, {tracked_before} tracked"
    );
    ensure!(capacity == lb_common::maps::DEFAULT_SOCKETS as u64);

    let mut churn = Probe::start(&tb, &client, &["churn-udp", DNS_V4, "53", "200000"])?;
    let done = wait_line(&mut churn, "done", Duration::from_secs(240))?;
    let churned = Instant::now();
    eprintln!("200 000 short-lived UDP sockets: {done}");

    // Every pooled connection still sees the ClusterIP as its peer; the resolver's
    // replies still come from the ClusterIP.
    thread::sleep(Duration::from_millis(300));
    ensure!(
        pool.line_after(churned, |l| l == "round").is_some(),
        "the pool stopped: {:?}",
        pool.lines().iter().rev().take(5).collect::<Vec<_>>()
    );
    let changed_peer = pool
        .lines()
        .into_iter()
        .find(|l| l.starts_with("peer ") || l.starts_with("error "));
    ensure!(
        changed_peer.is_none(),
        "a pooled connection lost its translation: {changed_peer:?}"
    );
    let answer = resolver
        .line_after(churned, |l| l.starts_with("answer"))
        .context("the resolver got no answer after the churn")?
        .1;
    ensure!(
        answer.ends_with(&format!("from {DNS_V4}:53")),
        "resolver after churn: {answer}"
    );

    // What is tracked is what is open: the pool (and the probes' own sockets), not
    // the 200 000 closed ones.
    let (tracked, _, local, overflowed) = socket_counts(&daemon)?;
    ensure!(
        tracked <= tracked_before + 2,
        "{tracked} sockets tracked after the churn (before: {tracked_before})"
    );
    ensure!(
        local <= 3,
        "{local} sockets with per-socket storage after the churn"
    );
    ensure!(overflowed == 0, "{overflowed} overflowed");
    ensure!(
        daemon.metric("lb_datapath_decisions_total{decision=\"revnat_released\"}")? >= 100_000.0,
        "release deleted fewer entries than the churn's 100 000 connected sockets"
    );

    // The first pooled connection's backend leaves: its connections reset within 1 s,
    // the others stay.
    let removed = backends
        .iter()
        .position(|p| p.name == conns[0].1)
        .context("backend of connection 0")?;
    remove_backend_and_check(&dir, &backends, removed, &pool)?;
    Ok(())
}

/// --max-sockets 16 and 40 pooled connections: the 24 that do not fit are kept in
/// their sockets' own storage (counted, warned about, shown by lb list and metrics),
/// still see the ClusterIP, and are still terminated when their backend leaves.
fn full_socket_map_overflows_and_still_terminates() -> Result<()> {
    let (tb, backends, client) = dns_world(2, true)?;
    let (dir, mut daemon) = dns_daemon(&tb, &backends, &["--max-sockets", "16"])?;
    let (pool, conns) = hold_pool(&tb, &client, 40, 60)?;
    let (tracked, capacity, _, overflowed) = socket_counts(&daemon)?;
    ensure!(
        capacity == 16 && tracked == 16,
        "tracked {tracked} of {capacity}"
    );
    ensure!(
        overflowed >= 24,
        "{overflowed} overflowed, expected at least 24"
    );
    ensure!(daemon.metric("lb_sockets_overflowed")? >= 24.0);
    ensure!(daemon.metric("lb_datapath_decisions_total{decision=\"revnat_full\"}")? >= 24.0);
    daemon.wait_for_log(
        "the socket map is full (--max-sockets 16)",
        Duration::from_secs(8),
    )?;

    // Replies keep coming back translated.
    thread::sleep(Duration::from_millis(300));
    let changed_peer = pool.lines().into_iter().find(|l| l.starts_with("peer "));
    ensure!(
        changed_peer.is_none(),
        "an overflowed connection lost its translation: {changed_peer:?}"
    );

    // Connections to the removed backend are found whether tracked or overflowed.
    let removed = backends
        .iter()
        .position(|p| p.name == conns[39].1)
        .context("backend of the last connection")?;
    remove_backend_and_check(&dir, &backends, removed, &pool)?;
    daemon.wait_for_log("destroyed_overflowed=", Duration::from_secs(2))?;
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("terminated sockets of removed backends"))
        .context("termination line")?;
    ensure!(
        !line.contains("destroyed_overflowed=0"),
        "no overflowed connection was terminated: {line}"
    );

    // Closing them all brings the counts back down.
    drop(pool);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (tracked, _, _, overflowed) = socket_counts(&daemon)?;
        if tracked <= 2 && overflowed == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after closing: {tracked} tracked, {overflowed} overflowed"
        );
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Where the kernel has no cgroup/sock_release (forced here), the daemon says so in
/// one start-up line and keeps the LRU: translation, getpeername and termination work.
fn kernels_without_sock_release_fall_back_to_the_lru() -> Result<()> {
    let (tb, backends, client) = dns_world(2, true)?;
    let (dir, daemon) = dns_daemon(&tb, &backends, &["--legacy-socket-tracking"])?;
    let log = daemon.log_text();
    let notes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("socket tracking:"))
        .collect();
    ensure!(
        notes.len() == 1,
        "start-up lines about socket tracking: {notes:?}"
    );
    let text = daemon.list_text()?;
    ensure!(
        text.contains("remembered in LB_SOCK_REVNAT_LRU (an LRU"),
        "lb list:\n{text}"
    );
    let line = Probe::run(&tb, &client, &["peer", "tcp", REDIS_V4, "6379"])?;
    ensure!(
        line == format!("peer {REDIS_V4}:6379"),
        "getpeername: {line}"
    );
    let (pool, conns) = hold_pool(&tb, &client, 8, 30)?;
    let removed = backends
        .iter()
        .position(|p| p.name == conns[0].1)
        .context("backend of connection 0")?;
    remove_backend_and_check(&dir, &backends, removed, &pool)?;
    Ok(())
}
