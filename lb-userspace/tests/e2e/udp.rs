//! UDP, reverse translation, stale-socket termination, named target ports and IPv6.
//! The seed scenario is kube-dns: one Service with 53/UDP, 53/TCP and 9153/TCP that
//! every pod uses through /etc/resolv.conf, served here by real dnsmasq pods.

use std::{
    collections::BTreeMap,
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use lb_testbed::{Pod, Testbed};
use libtest_mimic::Trial;

use crate::{probe::Probe, support::*, trial};

pub(crate) const DNS_V4: &str = "10.96.0.10";
const DNS_V6: &str = "fd00:96::10";
pub(crate) const REDIS_V4: &str = "10.96.0.100";
const REDIS_V6: &str = "fd00:96::100";
pub(crate) const ZONE_NAME: &str = "redis-master-sr.default.svc.cluster.local";
const ZONE_ANSWER: &str = "10.99.187.220";

pub fn trials() -> Vec<Trial> {
    vec![
        trial("udp::kube_dns_over_udp_and_tcp_ipv4", || {
            kube_dns_over_udp_and_tcp(false)
        }),
        trial("udp::kube_dns_over_udp_and_tcp_ipv6", || {
            kube_dns_over_udp_and_tcp(true)
        }),
        trial("udp::getpeername_shows_the_cluster_ip_ipv4", || {
            getpeername_shows_the_cluster_ip(false)
        }),
        trial("udp::getpeername_shows_the_cluster_ip_ipv6", || {
            getpeername_shows_the_cluster_ip(true)
        }),
        trial("udp::removed_backend_terminates_its_sockets_ipv4", || {
            removed_backend_terminates_its_sockets(false)
        }),
        trial("udp::removed_backend_terminates_its_sockets_ipv6", || {
            removed_backend_terminates_its_sockets(true)
        }),
        trial(
            "udp::named_target_port_on_different_numbers",
            named_target_port_on_different_numbers,
        ),
    ]
}

/// Backend pods running dnsmasq (and redis) and one client pod.
pub(crate) fn dns_world(n: usize, with_redis: bool) -> Result<(Testbed, Vec<Pod>, Pod)> {
    let mut tb = Testbed::new()?;
    let mut backends = Vec::new();
    for i in 1..=n {
        let pod = tb.add_pod(&format!("dns-{i}"), 20 + i as u8)?;
        tb.start_dnsmasq(&pod, &[(ZONE_NAME, ZONE_ANSWER.parse()?)])?;
        if with_redis {
            tb.start_redis(&pod, 6379)?;
        }
        backends.push(pod);
    }
    let client = tb.add_pod("client", 100)?;
    Ok((tb, backends, client))
}

/// kube-dns (53/UDP, 53/TCP, 9153/TCP) and, optionally, redis on the same pods; with
/// `dual_stack` both Services get an IPv6 ClusterIP and IPv6 slices too.
pub(crate) fn manifests(backends: &[&Pod], dual_stack: bool, with_redis: bool) -> String {
    let mut docs = Vec::new();
    let dns_ips: Vec<&str> = if dual_stack {
        vec![DNS_V4, DNS_V6]
    } else {
        vec![DNS_V4]
    };
    docs.push(service_yaml(
        "kube-dns",
        &dns_ips,
        &[
            ("dns", 53, "UDP", "53"),
            ("dns-tcp", 53, "TCP", "53"),
            ("metrics", 9153, "TCP", "9153"),
        ],
    ));
    let dns_ports = [
        ("dns", 53, "UDP"),
        ("dns-tcp", 53, "TCP"),
        ("metrics", 9153, "TCP"),
    ];
    let v4: Vec<String> = backends.iter().map(|p| p.ipv4.to_string()).collect();
    let v6: Vec<String> = backends.iter().map(|p| p.ipv6.to_string()).collect();
    docs.push(slice_yaml(
        "kube-dns-v4",
        "kube-dns",
        "IPv4",
        &dns_ports,
        &v4,
    ));
    if dual_stack {
        docs.push(slice_yaml(
            "kube-dns-v6",
            "kube-dns",
            "IPv6",
            &dns_ports,
            &v6,
        ));
    }
    if with_redis {
        let redis_ips: Vec<&str> = if dual_stack {
            vec![REDIS_V4, REDIS_V6]
        } else {
            vec![REDIS_V4]
        };
        docs.push(service_yaml(
            "redis",
            &redis_ips,
            &[("", 6379, "TCP", "6379")],
        ));
        docs.push(slice_yaml(
            "redis-v4",
            "redis",
            "IPv4",
            &[("", 6379, "TCP")],
            &v4,
        ));
        if dual_stack {
            docs.push(slice_yaml(
                "redis-v6",
                "redis",
                "IPv6",
                &[("", 6379, "TCP")],
                &v6,
            ));
        }
    }
    docs.join("---\n")
}

fn dig(tb: &Testbed, client: &Pod, args: &[&str]) -> Result<String> {
    let mut argv = vec!["dig", "+time=1", "+tries=1"];
    argv.extend_from_slice(args);
    let out = tb.output(client, true, &argv, Duration::from_secs(30))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// dig over UDP and TCP through the kube-dns ClusterIP; 200 queries spread over both
/// dnsmasq backends; an unconnected sendto/recvfrom client sees the reply come from the
/// ClusterIP.
fn kube_dns_over_udp_and_tcp(v6: bool) -> Result<()> {
    let (tb, backends, client) = dns_world(2, false)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(
        &dir,
        "kube-dns.yaml",
        &manifests(&backends.iter().collect::<Vec<_>>(), v6, false),
    )?;
    let daemon = Daemon::start(&tb, &dir)?;
    let vip = if v6 { DNS_V6 } else { DNS_V4 };
    let at = format!("@{vip}");

    ensure!(
        dig(&tb, &client, &[&at, "+short", ZONE_NAME])? == ZONE_ANSWER,
        "UDP query"
    );
    ensure!(
        dig(&tb, &client, &[&at, "+short", "+tcp", ZONE_NAME])? == ZONE_ANSWER,
        "TCP query"
    );

    // 200 queries, one new socket each (dig -f opens a socket per lookup).
    let batch = tb.work_dir.join("queries.txt");
    fs::write(&batch, "whoami.test\n".repeat(200))?;
    let answers = dig(
        &tb,
        &client,
        &[&at, "+short", "-f", batch.to_str().unwrap()],
    )?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in answers.lines() {
        *counts.entry(line).or_default() += 1;
    }
    ensure!(
        counts.values().sum::<usize>() == 200,
        "200 answers: {counts:?}"
    );
    for pod in &backends {
        let n = counts
            .get(pod.ipv4.to_string().as_str())
            .copied()
            .unwrap_or(0);
        ensure!(
            n >= 40,
            "{} answered {n} of 200 queries: {counts:?}",
            pod.name
        );
    }

    // Unconnected UDP: the reply's source must be the ClusterIP, or resolvers drop it.
    let line = crate::probe::Probe::run(&tb, &client, &["dns-sendto", vip, "53", ZONE_NAME])?;
    let expected_from = if v6 {
        format!("[{vip}]:53")
    } else {
        format!("{vip}:53")
    };
    ensure!(
        line == format!("answer {ZONE_ANSWER} from {expected_from}"),
        "sendto/recvfrom: {line}"
    );

    // The CLI shows the UDP (and IPv6) frontends.
    let udp = daemon.backends_of(vip, 53, "UDP")?;
    ensure!(
        udp.as_ref().map(Vec::len) == Some(2),
        "lb list UDP frontend: {udp:?}"
    );
    ensure!(
        daemon.backends_of(vip, 9153, "TCP")?.is_some(),
        "metrics port listed"
    );
    Ok(())
}

/// getpeername() on a translated TCP or connected UDP socket returns the ClusterIP.
fn getpeername_shows_the_cluster_ip(v6: bool) -> Result<()> {
    let (tb, backends, client) = dns_world(1, false)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(
        &dir,
        "kube-dns.yaml",
        &manifests(&[&backends[0]], v6, false),
    )?;
    let _daemon = Daemon::start(&tb, &dir)?;
    let vip = if v6 { DNS_V6 } else { DNS_V4 };
    let expected = if v6 {
        format!("peer [{vip}]:53")
    } else {
        format!("peer {vip}:53")
    };
    for protocol in ["tcp", "udp"] {
        let line = Probe::run(&tb, &client, &["peer", protocol, vip, "53"])?;
        ensure!(line == expected, "{protocol} getpeername: {line}");
    }
    if !v6 {
        // An AF_INET6 socket dialling the IPv4-mapped ClusterIP (Java and many runtimes
        // open dual-stack sockets) is balanced and sees the address it dialled.
        let mapped = format!("::ffff:{vip}");
        let line = Probe::run(&tb, &client, &["peer", "tcp", &mapped, "53"])?;
        ensure!(
            line == format!("peer [{mapped}]:53"),
            "v4-mapped getpeername: {line}"
        );
    }
    // A socket that dialled the pod directly sees the pod.
    let pod_ip = backends[0].ip(v6).to_string();
    let line = Probe::run(&tb, &client, &["peer", "tcp", &pod_ip, "53"])?;
    ensure!(line.contains(&pod_ip), "direct connection: {line}");
    Ok(())
}

struct Held {
    probe: Probe,
    backend: String,
}

/// Starts probes until every backend holds at least one socket of the kind.
fn hold_until_covered(
    tb: &Testbed,
    client: &Pod,
    args: &[&str],
    backends: &[String],
) -> Result<Vec<Held>> {
    let mut held: Vec<Held> = Vec::new();
    for _ in 0..24 {
        let mut probe = Probe::start(tb, client, args)?;
        let first = probe.wait_for(
            |l| l.starts_with("answer") || l.starts_with("error"),
            Duration::from_secs(5),
        )?;
        let Some(answer) = first
            .strip_prefix("answer ")
            .and_then(|a| a.split_whitespace().next())
        else {
            bail!("probe {args:?} failed: {first}");
        };
        held.push(Held {
            probe,
            backend: answer.to_string(),
        });
        if backends
            .iter()
            .all(|b| held.iter().any(|h| &h.backend == b))
        {
            return Ok(held);
        }
    }
    bail!("24 sockets never covered {backends:?}")
}

/// A backend removed from a Service: connected UDP sockets and established TCP
/// connections translated to it get an error within 1 s; sockets to the other backend
/// are untouched; new sockets reach the remaining backend.
fn removed_backend_terminates_its_sockets(v6: bool) -> Result<()> {
    let (tb, backends, client) = dns_world(2, true)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(
        &dir,
        "services.yaml",
        &manifests(&backends.iter().collect::<Vec<_>>(), v6, true),
    )?;
    let mut daemon = Daemon::start(&tb, &dir)?;
    let (dns_vip, redis_vip) = if v6 {
        (DNS_V6, REDIS_V6)
    } else {
        (DNS_V4, REDIS_V4)
    };

    // UDP answers name the pod by its IPv4 address (A record), TCP by its pod name.
    let udp_ids: Vec<String> = backends.iter().map(|p| p.ipv4.to_string()).collect();
    let tcp_ids: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();
    let udp = hold_until_covered(
        &tb,
        &client,
        &["hold-udp", dns_vip, "53", "whoami.test"],
        &udp_ids,
    )?;
    let tcp = hold_until_covered(&tb, &client, &["hold-tcp", redis_vip, "6379"], &tcp_ids)?;

    // dns-1 goes away (its pod is still running: only the Service changes).
    write_manifest(&dir, "services.yaml", &manifests(&[&backends[1]], v6, true))?;
    let changed = Instant::now();
    let removed = (&udp_ids[0], &tcp_ids[0]);
    let is_error = |l: &str| l.starts_with("error");
    for held in udp.iter().chain(&tcp) {
        let gone = &held.backend == removed.0 || &held.backend == removed.1;
        if !gone {
            continue;
        }
        let deadline = changed + Duration::from_secs(1);
        loop {
            if let Some((at, line)) = held.probe.line_after(changed, is_error) {
                ensure!(
                    at <= deadline,
                    "socket to {} errored only after {:?}: {line}",
                    held.backend,
                    at - changed
                );
                // ECONNABORTED (103) from the destroyed socket, or, for UDP, the
                // disconnected socket refusing a send without a destination.
                ensure!(
                    line.starts_with("error 103 ") || line.starts_with("error 89 "),
                    "socket to {}: {line}",
                    held.backend
                );
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "socket to removed backend {} still alive 1 s later: {:?}",
                    held.backend,
                    held.probe.lines()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    // Sockets to the remaining backend keep working.
    thread::sleep(Duration::from_millis(500));
    for held in udp
        .iter()
        .chain(&tcp)
        .filter(|h| &h.backend != removed.0 && &h.backend != removed.1)
    {
        ensure!(
            held.probe.line_after(changed, is_error).is_none(),
            "healthy socket to {} broke: {:?}",
            held.backend,
            held.probe.lines()
        );
        let recent = Instant::now() - Duration::from_millis(400);
        ensure!(
            held.probe
                .line_after(recent, |l| l.starts_with("answer") || l == "ok")
                .is_some(),
            "socket to {} stopped answering: {:?}",
            held.backend,
            held.probe.lines()
        );
    }
    // New sockets reach the remaining backend.
    for _ in 0..5 {
        let line = Probe::run(&tb, &client, &["dns-sendto", dns_vip, "53", "whoami.test"])?;
        ensure!(
            line.starts_with(&format!("answer {} ", udp_ids[1])),
            "new query: {line}"
        );
        ensure!(whoami(&tb, &client, redis_vip, 6379)? == tcp_ids[1]);
    }
    daemon.wait_for_log(
        "terminated sockets of removed backends",
        Duration::from_secs(2),
    )?;
    Ok(())
}

/// test-svc from the seed: targetPort is the name `web-port`, and two pods serve it on
/// different numbers (Kubernetes then writes one slice per port number).
fn named_target_port_on_different_numbers() -> Result<()> {
    let mut tb = Testbed::new()?;
    let web_a = tb.add_pod("lab-web-a", 31)?;
    let web_b = tb.add_pod("lab-web-b", 32)?;
    tb.start_http(&web_a, 8080, "lab-web-a")?;
    tb.start_http(&web_b, 9090, "lab-web-b")?;
    let client = tb.add_pod("lab-sleeper", 100)?;
    let dir = manifest_dir(&tb)?;
    let yaml = [
        service_yaml(
            "test-svc",
            &["10.107.169.79"],
            &[("", 80, "TCP", "web-port")],
        ),
        slice_yaml(
            "test-svc-8080",
            "test-svc",
            "IPv4",
            &[("", 8080, "TCP")],
            &[web_a.ipv4.to_string()],
        ),
        slice_yaml(
            "test-svc-9090",
            "test-svc",
            "IPv4",
            &[("", 9090, "TCP")],
            &[web_b.ipv4.to_string()],
        ),
    ]
    .join("---\n");
    write_manifest(&dir, "test-svc.yaml", &yaml)?;
    let daemon = Daemon::start(&tb, &dir)?;
    let mut seen = BTreeMap::new();
    for _ in 0..24 {
        *seen
            .entry(curl(&tb, &client, "http://10.107.169.79/whoami")?)
            .or_insert(0) += 1;
    }
    ensure!(
        seen.len() == 2 && seen.contains_key("lab-web-a") && seen.contains_key("lab-web-b"),
        "{seen:?}"
    );
    daemon.wait_for_backends(
        "10.107.169.79",
        80,
        "TCP",
        &["10.244.1.31:8080", "10.244.1.32:9090"],
    )?;
    Ok(())
}
