//! The datapath survives its daemon: restarts under load (SIGTERM, kill -9, upgrades
//! that migrate the maps), changes made while no daemon runs, layout migrations,
//! capacity limits, shutdown during a long sync, and `lb cleanup`.

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_testbed::Testbed;
use libtest_mimic::Trial;

use crate::{probe::Probe, support::*, trial};

const VIP: &str = "10.96.0.100";

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "reliability::restarts_kill_9_and_upgrades_under_load_drop_nothing",
            restarts_under_load,
        ),
        trial(
            "reliability::a_change_made_while_down_converges_on_restart",
            change_while_down,
        ),
        trial(
            "reliability::an_older_layout_is_migrated_while_it_serves",
            older_layout_is_migrated,
        ),
        trial(
            "reliability::services_past_capacity_are_reported_and_wait",
            capacity_overflow,
        ),
        trial(
            "reliability::cleanup_removes_everything_and_refuses_while_a_daemon_runs",
            cleanup_removes_everything,
        ),
        trial(
            "reliability::sigterm_during_a_long_sync_exits_within_a_second",
            sigterm_during_long_sync,
        ),
    ]
}

/// Counts a load probe's results: (ok, failed, answers by backend).
pub(crate) fn tally(probe: &Probe) -> (usize, Vec<String>, BTreeMap<String, usize>) {
    let mut ok = 0;
    let mut failed = Vec::new();
    let mut by_backend = BTreeMap::new();
    for line in probe.lines() {
        if let Some(who) = line.strip_prefix("ok ") {
            ok += 1;
            *by_backend.entry(who.to_string()).or_insert(0) += 1;
        } else {
            failed.push(line);
        }
    }
    (ok, failed, by_backend)
}

/// A steady stream of new connections (one every 10 ms) through the ClusterIP while
/// the daemon is restarted 20 times: SIGTERM, `kill -9`, and an upgrade whose maps
/// differ (so they are migrated and the programs swapped). No connection fails and
/// every one reaches a current backend.
fn restarts_under_load() -> Result<()> {
    let (tb, backends, client) = redis_world(3)?;
    let (_dir, mut daemon) = serve_redis(&tb, &backends.iter().collect::<Vec<_>>())?;
    let probe = Probe::start(&tb, &client, &["load", VIP, "6379", "10"])?;
    thread::sleep(Duration::from_millis(300));
    let mut sockets = lb_common::maps::DEFAULT_SOCKETS;
    let mut kinds = BTreeMap::new();
    for round in 0..20 {
        let kind = ["sigterm", "kill -9", "upgrade"][round % 3];
        *kinds.entry(kind).or_insert(0) += 1;
        match kind {
            "sigterm" => daemon.stop()?,
            _ => daemon.kill()?,
        }
        // No daemon at all for a while: the pinned datapath serves alone.
        thread::sleep(Duration::from_millis(150 + 50 * (round as u64 % 4)));
        if kind == "upgrade" {
            // A build whose maps differ: the next daemon migrates them.
            sockets = if sockets == lb_common::maps::DEFAULT_SOCKETS {
                sockets * 2
            } else {
                lb_common::maps::DEFAULT_SOCKETS
            };
        }
        daemon.restart(&["--max-sockets", &sockets.to_string()])?;
        if kind == "upgrade" {
            let log = daemon.log_text();
            ensure!(
                log.contains("cannot be adopted")
                    && log.contains("removed the maps of the previous datapath"),
                "round {round}: the upgrade did not migrate:\n{log}"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(300));
    let (ok, failed, by_backend) = tally(&probe);
    drop(probe);
    ensure!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(10)]
    );
    ensure!(ok > 500, "only {ok} connections were made");
    let current: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();
    ensure!(
        by_backend.keys().all(|b| current.contains(b)),
        "a connection reached something else: {by_backend:?}"
    );
    eprintln!("{ok} connections over 20 restarts {kinds:?}, none failed: {by_backend:?}");
    Ok(())
}

/// While no daemon runs, a manifest changes; the restarted daemon converges within 1 s
/// and writes only what changed.
fn change_while_down() -> Result<()> {
    let (mut tb, backends, client) = redis_world(2)?;
    let third = tb.add_pod("redis-3", 13)?;
    tb.start_redis(&third, 6379)?;
    let (dir, mut daemon) = serve_redis(&tb, &[&backends[0], &backends[1]])?;
    daemon.stop()?;
    // redis-1 leaves, redis-3 joins.
    write_manifest(
        &dir,
        "redis.yaml",
        &redis_manifest(VIP, &[&backends[1], &third]),
    )?;
    let started = Instant::now();
    daemon.restart(&[])?;
    daemon.wait_for_backends(VIP, 6379, "TCP", &["10.244.1.12:6379", "10.244.1.13:6379"])?;
    let took = started.elapsed();
    let log = daemon.log_text();
    // One backend written, one slot rewritten, one backend deleted.
    ensure!(
        log.contains("kernel maps synchronised") && log.contains("map_writes=3"),
        "{log}"
    );
    ensure!(took < Duration::from_secs(1), "converged after {took:?}");
    for _ in 0..20 {
        let who = whoami(&tb, &client, VIP, 6379)?;
        ensure!(who == "redis-2" || who == "redis-3", "reached {who}");
    }
    Ok(())
}

/// A datapath pinned by a previous version (its maps in another layout folder) keeps
/// serving while the new daemon builds, fills and switches to its own maps; the old
/// maps are removed afterwards. A capacity change migrates the same way.
fn older_layout_is_migrated() -> Result<()> {
    let (tb, backends, client) = redis_world(2)?;
    let (_dir, mut daemon) = serve_redis(&tb, &backends.iter().collect::<Vec<_>>())?;
    let version = format!("v{}", lb_common::LAYOUT_VERSION);
    daemon.stop()?;
    // As a previous version would have left it: its maps under its own layout folder.
    fs::rename(daemon.pin_dir.join(&version), daemon.pin_dir.join("v1"))?;
    let probe = Probe::start(&tb, &client, &["load", VIP, "6379", "10"])?;
    thread::sleep(Duration::from_millis(300));
    daemon.restart(&[])?;
    let log = daemon.log_text();
    ensure!(
        log.contains("has layout v1") && log.contains("migrating"),
        "no clear migration message:\n{log}"
    );
    ensure!(
        !daemon.pin_dir.join("v1").exists(),
        "the old maps were not removed"
    );
    ensure!(daemon.pin_dir.join(&version).join("LB_SERVICES").exists());

    // A capacity flag that changes a map's size: migrated, with the reason named.
    daemon.stop()?;
    daemon.restart(&["--max-backends", "4096"])?;
    let log = daemon.log_text();
    ensure!(
        log.contains("LB_BACKENDS holds 262145 entries, the capacity flags ask for 4097"),
        "{log}"
    );
    thread::sleep(Duration::from_millis(300));
    let (ok, failed, _) = tally(&probe);
    drop(probe);
    ensure!(
        failed.is_empty(),
        "connections failed during the migrations: {failed:?}"
    );
    ensure!(ok > 50, "only {ok} connections");
    ensure!(daemon.backends_of(VIP, 6379, "TCP")?.map(|b| b.len()) == Some(2));
    Ok(())
}

/// Past `--max-frontends`, the Services that do not fit are reported by name (log,
/// `lb list`, metric), every earlier Service keeps working, and freeing space programs
/// the waiting ones.
fn capacity_overflow() -> Result<()> {
    let (tb, backends, client) = redis_world(1)?;
    let dir = manifest_dir(&tb)?;
    let service = |i: usize| {
        format!(
            "{}---\n{}",
            service_yaml(
                &format!("svc-{i:02}"),
                &[&format!("10.96.1.{}", i + 1)],
                &[("", 6379, "TCP", "6379")]
            ),
            slice_yaml(
                &format!("svc-{i:02}-x"),
                &format!("svc-{i:02}"),
                "IPv4",
                &[("", 6379, "TCP")],
                &[backends[0].ipv4.to_string()]
            )
        )
    };
    for i in 0..10 {
        write_manifest(&dir, &format!("svc-{i:02}.yaml"), &service(i))?;
    }
    // Sixteen frontends fit.
    let mut daemon = Daemon::start_with(&tb, &dir, &["--max-frontends", "16"])?;
    for i in 10..21 {
        write_manifest(&dir, &format!("svc-{i:02}.yaml"), &service(i))?;
    }
    daemon.wait_for_log("not programmed", Duration::from_secs(5))?;
    thread::sleep(Duration::from_millis(500));
    let log = daemon.log_text();
    for i in 16..21 {
        ensure!(
            log.contains(&format!(
                "Service pods/svc-{i}: 10.96.1.{}:6379/TCP: not programmed: no frontend id left",
                i + 1
            )),
            "svc-{i} not reported:\n{log}"
        );
    }
    let human = daemon.list_text()?;
    ensure!(
        human.matches("NOT PROGRAMMED").count() == 5
            && human.contains("5 frontends are not programmed"),
        "{human}"
    );
    let (_, metrics) = daemon.http_get("metrics", "/metrics")?;
    ensure!(metrics.contains("lb_unprogrammed_frontends 5"), "{metrics}");
    for i in 0..16 {
        ensure!(whoami(&tb, &client, &format!("10.96.1.{}", i + 1), 6379)? == "redis-1");
    }
    // Five Services go: the five waiting ones take their places.
    for i in 0..5 {
        fs::remove_file(dir.join(format!("svc-{i:02}.yaml")))?;
    }
    daemon.wait_for_log("are programmed now", Duration::from_secs(5))?;
    for i in 5..21 {
        let who = whoami(&tb, &client, &format!("10.96.1.{}", i + 1), 6379)
            .with_context(|| format!("svc-{i}"))?;
        ensure!(who == "redis-1");
    }
    let listed = daemon.list()?;
    ensure!(
        listed.iter().all(|f| f["not_programmed"].is_null()),
        "{listed:?}"
    );
    Ok(())
}

fn bpftool(args: &[&str]) -> Result<String> {
    let out = Command::new("bpftool").args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The ids of the programs attached to a cgroup and of the maps pinned for a daemon.
fn our_objects(daemon: &Daemon, tb: &Testbed) -> Result<(Vec<String>, Vec<String>)> {
    let cgroup: serde_json::Value = serde_json::from_str(&bpftool(&[
        "-j",
        "cgroup",
        "show",
        &tb.cgroup().display().to_string(),
    ])?)?;
    let progs: Vec<String> = cgroup
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64().map(|id| id.to_string()))
        .collect();
    let dir = daemon
        .pin_dir
        .join(format!("v{}", lb_common::LAYOUT_VERSION));
    let mut maps = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let info: serde_json::Value = serde_json::from_str(&bpftool(&[
            "-j",
            "map",
            "show",
            "pinned",
            &entry?.path().display().to_string(),
        ])?)?;
        maps.push(info["id"].to_string());
    }
    Ok((progs, maps))
}

/// `lb cleanup` is refused while a daemon holds the pin directory; afterwards it
/// leaves nothing: no program attached, no link, no map, no pin.
fn cleanup_removes_everything() -> Result<()> {
    let (tb, backends, client) = redis_world(1)?;
    let (_dir, mut daemon) = serve_redis(&tb, &[&backends[0]])?;
    let (progs, maps) = our_objects(&daemon, &tb)?;
    ensure!(
        progs.len() == 9 && maps.len() == lb_common::maps::ALL.len(),
        "{progs:?} {maps:?}"
    );
    let refused = Command::new(LB)
        .args(["cleanup", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success()
            && stderr.contains(&format!("(pid {}) is using", daemon.pid().unwrap_or(0))),
        "{stderr}"
    );
    ensure!(
        whoami(&tb, &client, VIP, 6379)? == "redis-1",
        "a refused cleanup changed nothing"
    );
    daemon.stop()?;
    let done = Command::new(LB)
        .args(["cleanup", "--pin-dir"])
        .arg(&daemon.pin_dir)
        .output()?;
    ensure!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    ensure!(!daemon.pin_dir.exists(), "pins left");
    // The kernel frees programs and maps shortly after their last reference goes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let progs_left = bpftool(&["prog", "show"])?;
        let maps_left = bpftool(&["map", "show"])?;
        let links_left = bpftool(&["link", "show"])?;
        let left: Vec<String> = progs
            .iter()
            .filter(|id| {
                progs_left.lines().any(|l| l.starts_with(&format!("{id}:")))
                    || links_left.contains(&format!("prog {id}"))
            })
            .map(|id| format!("program {id}"))
            .chain(
                maps.iter()
                    .filter(|id| maps_left.lines().any(|l| l.starts_with(&format!("{id}:"))))
                    .map(|id| format!("map {id}")),
            )
            .collect();
        if left.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "left after cleanup: {left:?}");
        thread::sleep(Duration::from_millis(50));
    }
    let cgroup = bpftool(&["cgroup", "show", &tb.cgroup().display().to_string()])?;
    ensure!(!cgroup.contains("lb_"), "{cgroup}");
    let (out, err, _) = redis_cli(&tb, &client, VIP, 6379, &["PING"])?;
    ensure!(
        !out.contains("PONG"),
        "still balanced after cleanup: {out} {err}"
    );
    Ok(())
}

/// A daemon busy with a large first sync honours SIGTERM within a second, answers
/// health checks meanwhile, and leaves a consistent datapath (every frontend it wrote
/// reaches its backends).
fn sigterm_during_long_sync() -> Result<()> {
    let tb = Testbed::new()?;
    let dir = manifest_dir(&tb)?;
    // 60 000 Services with 4 endpoints each, 5 000 of them fighting over addresses.
    let mut text = String::with_capacity(60_000 * 600);
    for i in 0..60_000u32 {
        let ip_index = if i % 12 == 0 { i / 2 } else { i };
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: big}}\nspec:\n  clusterIP: 10.{}.{}.{}\n  ports: [{{port: 80}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-x, namespace: big, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
                 addressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [10.250.{}.1]}}, {{addresses: [10.250.{}.2]}}, {{addresses: [10.250.{}.3]}}, {{addresses: [10.250.{}.4]}}]\n---\n",
                100 + ip_index / 65536,
                (ip_index / 256) % 256,
                ip_index % 256,
                i % 250,
                i % 250,
                i % 250,
                i % 250
            ),
        );
    }
    fs::write(dir.join("big.yaml"), text)?;
    let mut daemon = Daemon::launch(&tb, &dir, &[])?;
    // Stop it in the middle of writing the maps.
    daemon.wait_for_log("frontend changes written so far", Duration::from_secs(90))?;
    // The sync is under way: health answers at once.
    let asked = Instant::now();
    let (code, _) = daemon.http_get("health", "/healthz")?;
    ensure!(
        code == 200 && asked.elapsed() < Duration::from_secs(1),
        "/healthz during the sync: {code} after {:?}",
        asked.elapsed()
    );
    let stopped = Instant::now();
    daemon.stop()?;
    let took = stopped.elapsed();
    ensure!(
        took < Duration::from_secs(1),
        "SIGTERM honoured after {took:?}:\n{}",
        daemon.log_text()
    );
    // Whatever was written is consistent.
    let listed = daemon.list()?;
    ensure!(!listed.is_empty(), "SIGTERM came before any map write");
    ensure!(
        listed.iter().all(|f| f["missing_slots"] == 0),
        "a frontend points at missing slots"
    );
    eprintln!(
        "SIGTERM during the sync: exited after {took:?}; {} frontends were written",
        listed.len()
    );
    Ok(())
}
