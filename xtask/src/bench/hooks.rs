//! What the connect4 program costs per call, from the kernel's own run-time statistics
//! (`kernel.bpf_stats_enabled`): the run time and run count it adds while one mode is
//! measured, so plain ClusterIP and session-affinity connects are costed apart.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run-time statistics on while it lives (they cost a little on
/// every program run, so the previous setting comes back afterwards).
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn new() -> Result<Self> {
        let previous = fs::read_to_string(STATS_SYSCTL).context("reading bpf_stats_enabled")?;
        fs::write(STATS_SYSCTL, "1").context("enabling bpf_stats_enabled")?;
        Ok(Self { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        let _ = fs::write(STATS_SYSCTL, self.previous.trim());
    }
}

/// A program's cumulative run time and run count.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    run_time_ns: u64,
    runs: u64,
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let output = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !output.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("bpftool output")
}

/// The counters of the connect4 program attached through the daemon's pinned link.
pub fn connect4(pin_dir: &Path) -> Result<Counters> {
    let link = pin_dir.join("links/lb_connect4");
    let link = link.to_str().context("pin path")?;
    let info = bpftool_json(&["link", "show", "pinned", link])?;
    let id = info["prog_id"].as_u64().context("link without prog_id")?;
    let prog = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
    Ok(Counters {
        run_time_ns: prog["run_time_ns"].as_u64().unwrap_or(0),
        runs: prog["run_cnt"].as_u64().unwrap_or(0),
    })
}

/// Run time and runs accumulated over measurements of one mode.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cost {
    pub run_time_ns: u64,
    pub runs: u64,
}

impl Cost {
    pub fn add(&mut self, before: Counters, after: Counters) {
        self.run_time_ns += after.run_time_ns.saturating_sub(before.run_time_ns);
        self.runs += after.runs.saturating_sub(before.runs);
    }

    pub fn ns_per_run(&self) -> f64 {
        if self.runs == 0 {
            f64::NAN
        } else {
            self.run_time_ns as f64 / self.runs as f64
        }
    }
}

/// results.json's "hook_cost": connect4's cost per call at the largest service count.
#[derive(Debug, Clone, Serialize)]
pub struct HookCost {
    pub services: usize,
    pub plain_ns_per_connect: f64,
    pub affinity_ns_per_connect: f64,
    pub plain: Cost,
    pub affinity: Cost,
}
