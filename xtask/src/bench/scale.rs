//! The control plane at scale, and restarts under load:
//! - a full sync from manifests at each size (10 endpoints per Service), without and
//!   with extra Services whose ClusterIP:port duplicates another's (the conflict path
//!   that used to be quadratic): sync time and daemon memory, to show both grow
//!   linearly;
//! - a steady stream of new connections through a ClusterIP while the daemon is
//!   restarted 20 times (SIGTERM, kill -9, and upgrades whose maps differ): how many
//!   connections failed.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Daemon, Mode, Plan, log_number, memory_mb,
    rules::{self, SERVICE_PORT},
    topology::{SERVER_IPS, Topology},
};

#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    pub services: usize,
    /// Of which this many duplicate another Service's ClusterIP:port.
    pub duplicates: usize,
    pub endpoints: usize,
    /// From the daemon's start to every map written (its `ready` line).
    pub sync_s: f64,
    pub peak_rss_mb: f64,
    pub rss_after_sync_mb: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestartRun {
    pub restarts: usize,
    pub sigterm: usize,
    pub kill_9: usize,
    pub upgrades: usize,
    pub connections: usize,
    pub failed: usize,
    pub seconds: f64,
    /// The client's first errors and the restarts, timed from the client's start
    /// (to tell which restart a failure belongs to).
    pub error_samples: Vec<String>,
    pub events: Vec<String>,
}

/// Capacities large enough for a million endpoints.
const BIG: [&str; 6] = [
    "--max-frontends",
    "262144",
    "--max-backends",
    "2097152",
    "--max-service-entries",
    "2097152",
];

pub fn scale(lb: &Path, topo: &Topology, plan: &Plan) -> Result<Vec<ScaleRow>> {
    let mut rows = Vec::new();
    for &n in &plan.scale_services {
        for duplicates in [0, plan.scale_duplicates] {
            eprintln!(
                "==> scale: {n} services (+{duplicates} duplicates), {} endpoints each",
                plan.cp_endpoints
            );
            let dir = topo.work_dir.join(format!("scale-{n}-{duplicates}"));
            fs::create_dir_all(&dir)?;
            // Files of at most 10 000 Services (about 9 MB): the daemon refuses a
            // manifest file over 64 MiB, as an operator's folder would be split.
            let all = rules::manifests(n, plan.cp_endpoints, &SERVER_IPS);
            write_split(&dir, "services", &all)?;
            let mut text = String::new();
            for d in 0..duplicates {
                // dup-d wants svc-(d % n)'s ClusterIP:port, which that Service holds.
                let i = d % n;
                let endpoints: Vec<_> = (0..plan.cp_endpoints)
                    .map(|j| rules::endpoint(i, j, plan.cp_endpoints, n, &SERVER_IPS))
                    .collect();
                rules::service_manifest(
                    &mut text,
                    &format!("dup-{d}"),
                    rules::vip(i),
                    SERVICE_PORT,
                    &endpoints,
                );
            }
            write_split(&dir, "duplicates", &text)?;
            let daemon =
                Daemon::start_with(lb, topo, &dir, &format!("scale-{n}-{duplicates}"), &BIG)?;
            let log = daemon.log_text();
            let (peak, current) = memory_mb(daemon.pid())?;
            let sync_s =
                log_number(&log, "controller: ready", "elapsed_ms").context("ready line")? / 1000.0;
            // A row for an empty sync would be a lie (a manifest refused, say).
            let served = log_number(&log, "controller: ready", "services").unwrap_or(0.0);
            if served as usize != n + duplicates {
                bail!(
                    "the daemon served {served} Services of {}; its log:\n{log}",
                    n + duplicates
                );
            }
            daemon.stop()?;
            let _ = fs::remove_dir_all(&dir);
            rows.push(ScaleRow {
                services: n + duplicates,
                duplicates,
                endpoints: (n + duplicates) * plan.cp_endpoints,
                sync_s,
                peak_rss_mb: peak,
                rss_after_sync_mb: current,
            });
        }
    }
    Ok(rows)
}

/// Writes `text` (Service and EndpointSlice pairs, each Service starting a
/// `---\napiVersion: v1\nkind: Service` document) as `<stem>-<n>.yaml` files of at
/// most 10 000 Services each.
fn write_split(dir: &Path, stem: &str, text: &str) -> Result<()> {
    const PER_FILE: usize = 10_000;
    let marker = "---\napiVersion: v1\nkind: Service\n";
    let starts: Vec<usize> = text.match_indices(marker).map(|(at, _)| at).collect();
    for (n, first) in starts.chunks(PER_FILE).enumerate() {
        let from = first[0];
        let to = starts
            .get((n + 1) * PER_FILE)
            .copied()
            .unwrap_or(text.len());
        fs::write(dir.join(format!("{stem}-{n}.yaml")), &text[from..to])?;
    }
    Ok(())
}

/// New connections every 5 ms through the target ClusterIP while the daemon is
/// restarted: SIGTERM, kill -9, and an upgrade whose maps differ (a capacity change:
/// the next daemon migrates them), in turn.
pub fn restarts(lb: &Path, topo: &Topology, exe: &Path, plan: &Plan) -> Result<RestartRun> {
    let dir = topo.work_dir.join("restarts");
    fs::create_dir_all(&dir)?;
    fs::write(
        dir.join("services.yaml"),
        rules::manifests(plan.restart_services, 3, &SERVER_IPS),
    )?;
    // Kept on exit like every later one (a daemon started with --detach-on-exit would
    // take the datapath down at the first SIGTERM).
    let mut daemon = Daemon::start_with(lb, topo, &dir, "restarts-0", &[])?;
    // A client that runs through all restarts: about one connection per 5 ms.
    let count = plan.restarts * 150;
    let target = Mode::Lb.targets(plan.restart_services);
    let mut cmd = topo.client_command(Mode::Lb.cgroup(topo), exe)?;
    cmd.args([
        super::CLIENT_ARG,
        "crr-paced",
        &target,
        &count.to_string(),
        "1",
        "5",
    ]);
    let client =
        thread::spawn(move || lb_testbed::output_with_timeout(cmd, Duration::from_secs(600)));
    let started = Instant::now();
    let mut run = RestartRun::default();
    let mut sockets = lb_common::maps::DEFAULT_SOCKETS;
    thread::sleep(Duration::from_millis(200));
    for round in 0..plan.restarts {
        let at = started.elapsed().as_secs_f64();
        run.events.push(format!(
            "at {at:.3} s: {}",
            [
                "SIGTERM",
                "kill -9",
                "kill -9, then a map-migrating upgrade"
            ][round % 3]
        ));
        match round % 3 {
            0 => {
                daemon.stop_keeping()?;
                run.sigterm += 1;
            }
            1 => {
                daemon.kill()?;
                run.kill_9 += 1;
            }
            _ => {
                daemon.kill()?;
                sockets = if sockets == lb_common::maps::DEFAULT_SOCKETS {
                    sockets * 2
                } else {
                    lb_common::maps::DEFAULT_SOCKETS
                };
                run.upgrades += 1;
            }
        }
        thread::sleep(Duration::from_millis(100));
        daemon = Daemon::start_with(
            lb,
            topo,
            &dir,
            &format!("restarts-{}", round + 1),
            &["--max-sockets", &sockets.to_string()],
        )?;
        run.restarts += 1;
        thread::sleep(Duration::from_millis(100));
    }
    let output = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    run.seconds = started.elapsed().as_secs_f64();
    daemon.stop()?;
    if !output.status.success() {
        bail!(
            "restart client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let summary: super::client::Summary =
        serde_json::from_slice(&output.stdout).context("client output")?;
    run.connections = summary.samples + summary.errors;
    run.failed = summary.errors;
    run.error_samples = summary.error_samples;
    Ok(run)
}
