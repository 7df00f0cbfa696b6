//! ClusterIP over TCP: the seed scenario of a web pod reaching `redis-master` through
//! its ClusterIP, with backends coming, going and moving.

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use libtest_mimic::Trial;

use crate::{support::*, trial};

const VIP: &str = "10.96.0.100";

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "clusterip::redis_cli_through_cluster_ip",
            redis_cli_through_cluster_ip,
        ),
        trial(
            "clusterip::connections_are_spread_fairly",
            connections_are_spread_fairly,
        ),
        trial(
            "clusterip::pod_restart_with_new_ip",
            pod_restart_with_new_ip,
        ),
        trial(
            "clusterip::scale_3_to_1_to_0_refuses_at_once",
            scale_3_to_1_to_0_refuses_at_once,
        ),
        trial(
            "clusterip::multi_port_service_reaches_each_target_port",
            multi_port_service,
        ),
        trial(
            "clusterip::bad_manifest_is_reported_and_changes_nothing",
            bad_manifest_changes_nothing,
        ),
        trial(
            "clusterip::non_service_traffic_is_untouched",
            non_service_traffic_is_untouched,
        ),
        trial(
            "clusterip::restart_keeps_the_datapath_and_adopts_it",
            restart_keeps_the_datapath,
        ),
        trial(
            "clusterip::startup_errors_are_one_line",
            startup_errors_are_one_line,
        ),
        trial(
            "clusterip::in_place_edits_apply_when_the_file_is_closed",
            in_place_edits_apply_when_closed,
        ),
        trial(
            "clusterip::a_change_right_after_start_is_applied",
            change_right_after_start_is_applied,
        ),
        trial(
            "clusterip::inconsistent_maps_refuse_and_the_kernel_says_why",
            inconsistent_maps_refuse_and_log,
        ),
    ]
}

/// The seed: redis-master (one replica) behind 10.96.0.100:6379; the web pod uses
/// redis-cli against the ClusterIP.
fn redis_cli_through_cluster_ip() -> Result<()> {
    let (tb, backends, client) = redis_world(1)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[&backends[0]]))?;
    let daemon = Daemon::start(&tb, &dir)?;

    let (out, err, _) = redis_cli(&tb, &client, VIP, 6379, &["PING"])?;
    ensure!(out == "PONG", "PING through the ClusterIP: {out:?} {err}");
    let (out, _, _) = redis_cli(
        &tb,
        &client,
        VIP,
        6379,
        &["SET", "reidstest", "2020-02-10 17:19:10"],
    )?;
    ensure!(out == "OK", "SET: {out:?}");
    let (out, _, _) = redis_cli(&tb, &client, VIP, 6379, &["GET", "reidstest"])?;
    ensure!(out == "2020-02-10 17:19:10", "GET: {out:?}");
    // The value really lives in the backend pod: read it there directly.
    let direct = tb.output(
        &backends[0],
        false,
        &["redis-cli", "-h", "127.0.0.1", "GET", "reidstest"],
        Duration::from_secs(5),
    )?;
    ensure!(String::from_utf8_lossy(&direct.stdout).trim() == "2020-02-10 17:19:10");

    // lb list shows the frontend, its backend and the translations counted.
    let list = daemon.list()?;
    ensure!(list.len() == 1, "{list:?}");
    let fe = &list[0];
    ensure!(
        fe["address"] == VIP && fe["port"] == 6379 && fe["protocol"] == "TCP",
        "{fe}"
    );
    ensure!(fe["service"] == "pods/redis-master:6379", "{fe}");
    ensure!(fe["counters"]["translated"].as_u64() == Some(3), "{fe}");
    ensure!(fe["backends"][0]["connections"].as_u64() == Some(3), "{fe}");
    let human = daemon.list_text()?;
    ensure!(
        human.contains("10.96.0.100:6379") && human.contains("10.244.1.11:6379 (3)"),
        "{human}"
    );

    // Least privilege, as full root (with CAP_SETPCAP): the bounding set goes too.
    let pid = daemon.pid().context("daemon pid")?;
    ensure_least_privilege(pid, SYNC_CAPS)?;
    Ok(())
}

fn count_backends(
    tb: &lb_testbed::Testbed,
    client: &lb_testbed::Pod,
    connections: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for _ in 0..connections {
        *counts.entry(whoami(tb, client, VIP, 6379)?).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Three redis replicas each get a fair share of 300 new connections.
fn connections_are_spread_fairly() -> Result<()> {
    let (tb, backends, client) = redis_world(3)?;
    let (_dir, daemon) = serve_redis(&tb, &backends.iter().collect::<Vec<_>>())?;
    let counts = count_backends(&tb, &client, 300)?;
    ensure!(counts.len() == 3, "all three backends answer: {counts:?}");
    for (backend, n) in &counts {
        ensure!(
            (60..=141).contains(n),
            "{backend} got {n} of 300 connections (want 20%..47%): {counts:?}"
        );
    }
    // The kernel's per-backend counters agree with what the clients saw.
    let list = daemon.list()?;
    let total: u64 = list[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["connections"].as_u64().unwrap())
        .sum();
    ensure!(total == 300, "kernel counted {total} connections");
    Ok(())
}

/// "The pod restarted with a new IP": redis-2 is replaced by a pod at another address;
/// within 1 s of the manifest change new connections reach only the new pod.
fn pod_restart_with_new_ip() -> Result<()> {
    let (mut tb, backends, client) = redis_world(1)?;
    let old = &backends[0];
    let new = tb.add_pod("redis-1b", 21)?;
    tb.start_redis(&new, 6379)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[old]))?;
    let _daemon = Daemon::start(&tb, &dir)?;
    ensure!(whoami(&tb, &client, VIP, 6379)? == "redis-1");

    // The old pod keeps running (a stale route would still be answered): only the
    // manifest changes.
    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[&new]))?;
    let changed = Instant::now();
    loop {
        let who = whoami(&tb, &client, VIP, 6379)?;
        if who == "redis-1b" {
            break;
        }
        if changed.elapsed() > Duration::from_secs(1) {
            bail!("1 s after the change connections still reach {who}");
        }
    }
    let switched_after = changed.elapsed();
    for _ in 0..30 {
        let who = whoami(&tb, &client, VIP, 6379)?;
        ensure!(
            who == "redis-1b",
            "a connection reached {who} after the switch"
        );
    }
    eprintln!("switched to the new pod {switched_after:?} after the manifest change");
    Ok(())
}

/// Scaling 3 -> 1 -> 0: only the remaining replica answers; with none, connect() fails
/// at once with ECONNREFUSED.
fn scale_3_to_1_to_0_refuses_at_once() -> Result<()> {
    let (tb, backends, client) = redis_world(3)?;
    let (dir, daemon) = serve_redis(&tb, &backends.iter().collect::<Vec<_>>())?;
    ensure!(count_backends(&tb, &client, 30)?.len() == 3);

    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[&backends[2]]))?;
    daemon.wait_for_backends(VIP, 6379, "TCP", &["10.244.1.13:6379"])?;
    let counts = count_backends(&tb, &client, 30)?;
    ensure!(
        counts == BTreeMap::from([("redis-3".to_string(), 30)]),
        "{counts:?}"
    );

    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[]))?;
    daemon.wait_for_backends(VIP, 6379, "TCP", &[])?;
    for _ in 0..5 {
        let (out, err, elapsed) = redis_cli(&tb, &client, VIP, 6379, &["PING"])?;
        let text = format!("{out} {err}");
        ensure!(
            text.contains("Connection refused"),
            "expected ECONNREFUSED, got: {text}"
        );
        // redis-cli start-up included (hence `slow`: an emulated CPU starts it
        // slower); a hang or a timeout would take seconds.
        ensure!(
            elapsed < slow(Duration::from_millis(500)),
            "refusal took {elapsed:?}"
        );
    }
    // Every attempt was refused by the datapath (redis-cli tries twice) and none was
    // translated.
    let list = daemon.list()?;
    ensure!(
        list[0]["counters"]["refused"].as_u64() >= Some(5),
        "{}",
        list[0]
    );
    ensure!(
        list[0]["counters"]["translated"].as_u64() == Some(60),
        "{}",
        list[0]
    );
    Ok(())
}

/// A Service with two ports reaches the right target port for each.
fn multi_port_service() -> Result<()> {
    let (mut tb, backends, client) = redis_world(2)?;
    // A second redis in each backend pod on 6380, answering "<pod>-alt".
    for pod in &backends {
        tb.start_redis(pod, 6380)?;
        tb.output(
            pod,
            false,
            &[
                "redis-cli",
                "-p",
                "6380",
                "SET",
                "whoami",
                &format!("{}-alt", pod.name),
            ],
            Duration::from_secs(5),
        )?;
    }
    let dir = manifest_dir(&tb)?;
    let addresses: Vec<String> = backends.iter().map(|p| p.ipv4.to_string()).collect();
    let yaml = format!(
        "{}---\n{}",
        service_yaml(
            "redis",
            &["10.96.0.110"],
            &[("main", 6379, "TCP", "6379"), ("alt", 7000, "TCP", "6380")]
        ),
        slice_yaml(
            "redis-1",
            "redis",
            "IPv4",
            &[("main", 6379, "TCP"), ("alt", 6380, "TCP")],
            &addresses
        )
    );
    write_manifest(&dir, "redis.yaml", &yaml)?;
    let _daemon = Daemon::start(&tb, &dir)?;
    for _ in 0..10 {
        let main = whoami(&tb, &client, "10.96.0.110", 6379)?;
        ensure!(
            main == "redis-1" || main == "redis-2",
            "port 6379 reached {main}"
        );
        let alt = whoami(&tb, &client, "10.96.0.110", 7000)?;
        ensure!(
            alt == "redis-1-alt" || alt == "redis-2-alt",
            "port 7000 reached {alt}"
        );
    }
    Ok(())
}

/// Bad manifests are reported with file and object, never take the daemon down, and
/// change nothing that was good.
fn bad_manifest_changes_nothing() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let (dir, mut daemon) = serve_redis(&tb, &backends.iter().collect::<Vec<_>>())?;
    let before = daemon.list()?;

    // Broken YAML, an impossible port, an unknown protocol, and a second Service
    // claiming redis-master's ClusterIP:port.
    write_manifest(
        &dir,
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
    )?;
    write_manifest(
        &dir,
        "bad-ports.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("too-big", &["10.96.0.120"], &[("", 70000, "TCP", "80")]),
            service_yaml("icmp", &["10.96.0.121"], &[("", 80, "ICMP", "80")])
        ),
    )?;
    // Without creation timestamps (hand-written manifests) the first by
    // namespace/name wins a contested address: this one sorts after redis-master.
    write_manifest(
        &dir,
        "impostor.yaml",
        &service_yaml("zz-impostor", &[VIP], &[("", 6379, "TCP", "6379")]),
    )?;
    daemon.wait_for_log("zz-impostor", Duration::from_secs(3))?;
    // Give the daemon time to (not) act on the bad input.
    thread::sleep(Duration::from_millis(1200));
    let log = daemon.log_text();
    for needle in [
        "broken.yaml: not valid YAML",
        "bad-ports.yaml: Service pods/too-big: spec.ports[0].port 70000 is out of range",
        "bad-ports.yaml: Service pods/icmp: spec.ports[0]: unknown protocol \"ICMP\"",
        "Service pods/zz-impostor: 10.96.0.100:6379/TCP is served by Service pods/redis-master (the first by namespace/name wins)",
    ] {
        ensure!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    ensure!(daemon.is_running(), "the daemon survived bad input");
    let after = daemon.list()?;
    let strip = |l: &[serde_json::Value]| -> Vec<(String, String)> {
        l.iter()
            .map(|f| {
                (
                    f["address"].to_string(),
                    f["backends"]
                        .to_string()
                        .replace(|c: char| c.is_ascii_digit(), ""),
                )
            })
            .collect()
    };
    ensure!(
        strip(&before) == strip(&after),
        "tables differ:\n{before:?}\n{after:?}"
    );
    ensure!(
        whoami(&tb, &client, VIP, 6379).is_ok(),
        "the good service still answers"
    );

    // Breaking the good file itself keeps its last good state too.
    write_manifest(&dir, "redis.yaml", "this: is: not: yaml: [")?;
    daemon.wait_for_log("redis.yaml: not valid YAML", Duration::from_secs(3))?;
    ensure!(
        whoami(&tb, &client, VIP, 6379).is_ok(),
        "service kept after its file broke"
    );
    ensure!(daemon.backends_of(VIP, 6379, "TCP")?.map(|b| b.len()) == Some(2));
    Ok(())
}

/// Connections to pod IPs and to unknown ClusterIPs are not rewritten.
fn non_service_traffic_is_untouched() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[&backends[0]]))?;
    let daemon = Daemon::start(&tb, &dir)?;
    // Directly to redis-2's pod IP: it answers, although it is not a backend.
    for _ in 0..5 {
        ensure!(whoami(&tb, &client, &backends[1].ipv4.to_string(), 6379)? == "redis-2");
    }
    // Another port on the ClusterIP, and another ClusterIP: not services, so not
    // rewritten; the sandbox blackholes them.
    let (out, err, _) = redis_cli(&tb, &client, VIP, 6380, &["PING"])?;
    ensure!(!out.contains("PONG"), "{out} {err}");
    let (out, err, _) = redis_cli(&tb, &client, "10.96.0.200", 6379, &["PING"])?;
    ensure!(!out.contains("PONG"), "{out} {err}");
    let list = daemon.list()?;
    ensure!(list[0]["counters"]["translated"] == 0, "{}", list[0]);
    ensure!(list[0]["counters"]["refused"] == 0, "{}", list[0]);
    Ok(())
}

/// The datapath outlives the daemon, and the next daemon adopts it without rewriting
/// anything; a stop with --detach-on-exit removes everything.
fn restart_keeps_the_datapath() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(
        &dir,
        "redis.yaml",
        &redis_manifest(VIP, &backends.iter().collect::<Vec<_>>()),
    )?;
    let mut daemon = Daemon::start(&tb, &dir)?;
    whoami(&tb, &client, VIP, 6379)?;
    daemon.stop()?;
    ensure!(daemon.log_text().contains("left attached and pinned"));

    // No daemon: connections are still balanced by the pinned programs.
    let counts = count_backends(&tb, &client, 20)?;
    ensure!(counts.len() == 2, "{counts:?}");
    ensure!(daemon.list()?.len() == 1, "lb list works without a daemon");

    // The next daemon adopts the maps: nothing to write.
    daemon.restart(&[])?;
    let log = daemon.log_text();
    ensure!(
        log.contains("kernel maps synchronised") && log.contains("map_writes=0"),
        "{log}"
    );
    ensure!(log.contains("links_updated=9"), "{log}");
    whoami(&tb, &client, VIP, 6379)?;
    daemon.stop()?;
    daemon.restart(&["--detach-on-exit"])?;
    daemon.stop()?;

    // --detach-on-exit: the ClusterIP is no longer rewritten, and pins are gone.
    let (out, err, _) = redis_cli(&tb, &client, VIP, 6379, &["PING"])?;
    ensure!(
        !out.contains("PONG"),
        "still balanced after detaching: {out} {err}"
    );
    ensure!(!daemon.pin_dir.exists(), "pins removed");
    let leftover = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(tb.cgroup())
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&leftover.stdout).contains("lb_connect4"),
        "programs detached"
    );
    Ok(())
}

/// Start-up failures exit non-zero with a one-line reason.
fn startup_errors_are_one_line() -> Result<()> {
    let tb = lb_testbed::Testbed::new()?;
    let dir = manifest_dir(&tb)?;
    let pin = format!("/sys/fs/bpf/{}", tb.id);
    let cases: Vec<(Vec<String>, Option<u32>, &str)> = vec![
        (
            vec!["--cgroup".into(), "/tmp".into()],
            None,
            "is not a cgroup2 directory",
        ),
        (
            vec![
                "--cgroup".into(),
                tb.cgroup().display().to_string(),
                "--pin-dir".into(),
                "/tmp/lb-pins".into(),
            ],
            None,
            "is not on a bpf file system",
        ),
        (
            vec!["--cgroup".into(), tb.cgroup().display().to_string()],
            Some(65534),
            "must run as root",
        ),
    ];
    for (args, uid, expected) in cases {
        let default_pin = ["--pin-dir".to_string(), pin.clone()];
        let pin_args: &[String] = if args.contains(&"--pin-dir".to_string()) {
            &[]
        } else {
            &default_pin
        };
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid",
                    &uid.to_string(),
                    "--regid",
                    &uid.to_string(),
                    "--clear-groups",
                    LB,
                ]);
                c
            }
            None => Command::new(LB),
        };
        cmd.args(["daemon", "--manifests"])
            .arg(&dir)
            .args(pin_args)
            .args(&args)
            .env("NO_COLOR", "1");
        let output = cmd.output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("");
        ensure!(!output.status.success(), "{args:?} succeeded");
        ensure!(
            last.starts_with("lb: error:") && last.contains(expected),
            "{args:?}: {stderr}"
        );
    }
    // A second daemon on a pin directory in use is refused, and the first keeps going.
    let manifests = manifest_dir(&tb)?;
    let mut first = Daemon::start_with(&tb, &manifests, &["--detach-on-exit"])?;
    let second = Command::new(LB)
        .args(["daemon", "--manifests"])
        .arg(&manifests)
        .arg("--cgroup")
        .arg(tb.cgroup())
        .arg("--pin-dir")
        .arg(&first.pin_dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&second.stderr);
    ensure!(
        !second.status.success() && stderr.contains("another lb daemon is using pin directory"),
        "{stderr}"
    );
    ensure!(first.is_running());
    first.stop()?;

    let missing = Command::new(LB)
        .args([
            "daemon",
            "--manifests",
            "/nonexistent-lb-manifests",
            "--pin-dir",
            &pin,
            "--cgroup",
        ])
        .arg(tb.cgroup())
        .output()?;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    ensure!(
        !missing.status.success()
            && stderr.contains("manifest directory /nonexistent-lb-manifests does not exist"),
        "{stderr}"
    );
    ensure!(
        !std::path::Path::new(&pin).exists() || fs::read_dir(&pin)?.next().is_none(),
        "nothing pinned on failure"
    );
    let _ = fs::remove_dir(&pin);
    Ok(())
}

/// An editor that rewrites a file in place (truncate, write, write, close) never
/// exposes its half-written content: the daemon waits for the close.
fn in_place_edits_apply_when_closed() -> Result<()> {
    use std::io::Write as _;
    let (mut tb, backends, client) = redis_world(1)?;
    let new = tb.add_pod("redis-1b", 21)?;
    tb.start_redis(&new, 6379)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[&backends[0]]))?;
    let daemon = Daemon::start(&tb, &dir)?;

    let full = redis_manifest(VIP, &[&new]);
    // The first half holds the Service but not yet its EndpointSlice.
    let split = full.find("---").unwrap();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.join("redis.yaml"))?;
    file.write_all(&full.as_bytes()[..split])?;
    file.flush()?;
    let writing = Instant::now();
    while writing.elapsed() < Duration::from_millis(150) {
        // Mid-write, the old endpoint still serves: nothing was applied.
        ensure!(
            whoami(&tb, &client, VIP, 6379)? == "redis-1",
            "half-written file applied"
        );
    }
    file.write_all(&full.as_bytes()[split..])?;
    drop(file);
    let closed = Instant::now();
    loop {
        if whoami(&tb, &client, VIP, 6379)? == "redis-1b" {
            break;
        }
        ensure!(
            closed.elapsed() < Duration::from_secs(1),
            "closed file not applied within 1 s"
        );
    }
    ensure!(!daemon.log_text().contains("WARN"), "{}", daemon.log_text());
    Ok(())
}

/// A manifest changed while the daemon performs its first sync is applied at once: the
/// folder is watched before it is first read, so the change is not left to the periodic
/// rescan (10 s).
fn change_right_after_start_is_applied() -> Result<()> {
    let (mut tb, backends, client) = redis_world(1)?;
    let new = tb.add_pod("redis-1b", 21)?;
    tb.start_redis(&new, 6379)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(&dir, "a-redis.yaml", &redis_manifest(VIP, &[&backends[0]]))?;
    // Read after a-redis.yaml and slow to parse: the window the change lands in.
    let filler: Vec<String> = (0..3000)
        .map(|i| {
            service_yaml(
                &format!("filler-{i}"),
                &[&format!("10.100.{}.{}", i / 250, i % 250 + 1)],
                &[("", 80, "TCP", "80")],
            )
        })
        .collect();
    write_manifest(&dir, "z-filler.yaml", &filler.join("---\n"))?;
    let mut daemon = Daemon::launch(&tb, &dir, &[])?;
    daemon.wait_for_log("datapath loaded", Duration::from_secs(20))?;
    write_manifest(&dir, "a-redis.yaml", &redis_manifest(VIP, &[&new]))?;
    daemon.wait_for_log(READY, Duration::from_secs(20))?;
    daemon.wait_for_backends(VIP, 6379, "TCP", &["10.244.1.21:6379"])?;
    ensure!(whoami(&tb, &client, VIP, 6379)? == "redis-1b");
    Ok(())
}

/// A frontend whose slot points nowhere (written behind the daemon's back with bpftool)
/// is refused rather than sent to the ClusterIP, and the program's aya-log warning
/// reaches the daemon's log.
fn inconsistent_maps_refuse_and_log() -> Result<()> {
    let (tb, backends, client) = redis_world(1)?;
    let dir = manifest_dir(&tb)?;
    write_manifest(&dir, "redis.yaml", &redis_manifest(VIP, &[&backends[0]]))?;
    let mut daemon = Daemon::start(&tb, &dir)?;
    // 10.96.0.150:80/TCP, slot 0: count 1, frontend id 999; slot 1 is never written.
    let key = "00 00 00 00 00 00 00 00 00 00 ff ff 0a 60 00 96 00 50 06 00 00 00 00 00";
    let value = "00 00 00 00 e7 03 00 00 01 00 00 00 00 00 00 00";
    let map = daemon
        .pin_dir
        .join(format!("v{}", lb_common::LAYOUT_VERSION))
        .join("LB_SERVICES");
    let mut args: Vec<String> = vec![
        "map".into(),
        "update".into(),
        "pinned".into(),
        map.display().to_string(),
        "key".into(),
        "hex".into(),
    ];
    args.extend(key.split(' ').map(String::from));
    args.extend(["value".into(), "hex".into()]);
    args.extend(value.split(' ').map(String::from));
    let out = Command::new("bpftool").args(&args).output()?;
    ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (out, err, elapsed) = redis_cli(&tb, &client, "10.96.0.150", 80, &["PING"])?;
    ensure!(
        format!("{out} {err}").contains("Connection refused"),
        "{out} {err}"
    );
    ensure!(
        elapsed < Duration::from_millis(500),
        "refusal took {elapsed:?}"
    );
    daemon.wait_for_log(
        "frontend 999: slot or backend missing after retries; refused",
        Duration::from_secs(3),
    )?;
    // The real service is unaffected.
    ensure!(whoami(&tb, &client, VIP, 6379)? == "redis-1");
    Ok(())
}
