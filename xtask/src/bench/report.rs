//! Results: a table on stdout, `results.json` for tools, `report.md` for people and a
//! latency-versus-services chart (SVG).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use plotters::prelude::*;
use serde_json::json;

use super::{Mode, Results, Row};

fn machine() -> serde_json::Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": memory_gib,
        "date": date,
    })
}

fn row(rows: &[Row], mode: Mode, services: usize, concurrency: usize) -> Option<&Row> {
    rows.iter()
        .find(|r| r.mode == mode && r.services == services && r.concurrency == concurrency)
}

/// The largest `mode`/direct ratio of p50 and of p99 over every service count and
/// concurrency `mode` was measured at.
fn worst_ratios(results: &Results, mode: Mode) -> (f64, f64) {
    let mut worst = (0.0f64, 0.0f64);
    for direct in results.connect.iter().filter(|r| r.mode == Mode::Direct) {
        if let Some(lb) = row(&results.connect, mode, direct.services, direct.concurrency) {
            worst.0 = worst.0.max(lb.p50_us / direct.p50_us);
            worst.1 = worst.1.max(lb.p99_us / direct.p99_us);
        }
    }
    worst
}

fn median(runs: &[f64]) -> Option<f64> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// Median node-port throughput of `mode` over direct's.
fn node_port_ratio(results: &Results, mode: Mode) -> Option<f64> {
    let direct = median(results.node_port_throughput.get(&Mode::Direct)?)?;
    Some(median(results.node_port_throughput.get(&mode)?)? / direct)
}

fn connect_table(results: &Results, markdown: bool) -> String {
    let mut out = String::new();
    let services: BTreeSet<usize> = results.connect.iter().map(|r| r.services).collect();
    let concurrency: BTreeSet<usize> = results.connect.iter().map(|r| r.concurrency).collect();
    for &c in &concurrency {
        if markdown {
            let _ = writeln!(
                out,
                "\n**{c} concurrent connection{}**\n",
                if c == 1 { "" } else { "s" }
            );
            out.push_str("| services | mode | p50 µs | p90 µs | p99 µs | conn/s | p50 vs direct | p99 vs direct |\n|---:|---|---:|---:|---:|---:|---:|---:|\n");
        } else {
            let _ = writeln!(
                out,
                "\nnew connections (connect + request/response + close), concurrency {c}"
            );
            let _ = writeln!(
                out,
                "{:>8}  {:<16} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
                "services", "mode", "p50 us", "p90 us", "p99 us", "conn/s", "p50 x", "p99 x"
            );
        }
        for &n in &services {
            let direct = row(&results.connect, Mode::Direct, n, c);
            for mode in Mode::ALL {
                let Some(r) = row(&results.connect, mode, n, c) else {
                    continue;
                };
                let (x50, x99) = direct.map_or((f64::NAN, f64::NAN), |d| {
                    (r.p50_us / d.p50_us, r.p99_us / d.p99_us)
                });
                if markdown {
                    let _ = writeln!(
                        out,
                        "| {n} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {x50:.2}x | {x99:.2}x |",
                        mode.name(),
                        r.p50_us,
                        r.p90_us,
                        r.p99_us,
                        r.conn_per_s
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "{n:>8}  {:<16} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {x50:>7.2}x {x99:>7.2}x",
                        mode.name(),
                        r.p50_us,
                        r.p90_us,
                        r.p99_us,
                        r.conn_per_s
                    );
                }
            }
        }
    }
    out
}

fn targets(results: &Results) -> Vec<(String, String, bool)> {
    let (p50, p99) = worst_ratios(results, Mode::Lb);
    let mut lines = vec![(
        "new-connection p50 and p99 via ClusterIP within 5% of direct at every service count"
            .to_string(),
        format!("worst p50 {:.3}x, worst p99 {:.3}x of direct", p50, p99),
        p50 <= 1.05 && p99 <= 1.05,
    )];
    if let Some(h) = &results.hook_cost {
        let (p50, p99) = worst_ratios(results, Mode::LbAffinity);
        lines.push((
            format!(
                "with sessionAffinity ClientIP at {} services: p50 and p99 within 5% of direct",
                h.services
            ),
            format!(
                "worst p50 {p50:.3}x, worst p99 {p99:.3}x of direct; connect4 {:.0} ns per call with affinity, {:.0} ns without (bpf_stats, {} and {} calls)",
                h.affinity_ns_per_connect, h.plain_ns_per_connect, h.affinity.runs, h.plain.runs
            ),
            p50 <= 1.05 && p99 <= 1.05,
        ));
    }
    let (p50, p99) = worst_ratios(results, Mode::LbPacket);
    if p50 > 0.0 {
        lines.push((
            "a client pod in packet mode: p50 and p99 within 10% of direct at every service count"
                .into(),
            format!("worst p50 {p50:.3}x, worst p99 {p99:.3}x of direct"),
            p50 <= 1.10 && p99 <= 1.10,
        ));
    }
    let (p50, p99) = worst_ratios(results, Mode::LbNodePort);
    if p50 > 0.0 {
        lines.push((
            "node port from outside the node: p50 and p99 within 10% of direct at every service count".into(),
            format!("worst p50 {p50:.3}x, worst p99 {p99:.3}x of direct"),
            p50 <= 1.10 && p99 <= 1.10,
        ));
    }
    if let Some(ratio) = node_port_ratio(results, Mode::LbNodePort) {
        lines.push((
            "throughput through a node port at least 95% of direct".into(),
            format!("{:.1}% (medians)", ratio * 100.0),
            ratio >= 0.95,
        ));
    }
    if let Some(t) = &results.throughput {
        lines.push((
            "throughput via ClusterIP at least 98% of direct".into(),
            format!(
                "{:.1}% ({:.2} vs {:.2} Gbit/s, medians)",
                t.lb_ratio * 100.0,
                t.lb_gbps,
                t.direct_gbps
            ),
            t.lb_ratio >= 0.98,
        ));
        lines.push((
            "throughput via ClusterIP from a packet-mode pod at least 95% of direct".into(),
            format!(
                "{:.1}% ({:.2} vs {:.2} Gbit/s, medians)",
                t.lb_packet_ratio * 100.0,
                t.lb_packet_gbps,
                t.direct_gbps
            ),
            t.lb_packet_ratio >= 0.95,
        ));
    }
    let cp = &results.control_plane;
    lines.push((
        format!(
            "full sync of {} services / {} endpoints under 1 s",
            cp.services, cp.endpoints
        ),
        format!(
            "{:.3} s (map writes {:.3} s; start to ready {:.3} s)",
            cp.full_sync_s, cp.map_writes_s, cp.start_to_ready_s
        ),
        cp.full_sync_s < 1.0,
    ));
    lines.push((
        "daemon RSS under 100 MB".into(),
        format!(
            "peak {:.1} MB, {:.1} MB after sync",
            cp.peak_rss_mb, cp.rss_after_sync_mb
        ),
        cp.peak_rss_mb < 100.0,
    ));
    lines.push((
        "endpoint change to kernel map p99 under 10 ms".into(),
        format!(
            "p50 {:.2} ms, p99 {:.2} ms over {} changes",
            cp.endpoint_change.p50_ms, cp.endpoint_change.p99_ms, cp.endpoint_change.samples
        ),
        cp.endpoint_change.p99_ms < 10.0,
    ));
    // The largest scale row without duplicates: the DaemonSet's sizing target.
    if let Some(largest) = results
        .scale
        .iter()
        .filter(|r| r.duplicates == 0)
        .max_by_key(|r| r.services)
    {
        lines.push((
            format!(
                "{} Services / {} endpoints from manifests: peak RSS under 300 MB",
                largest.services, largest.endpoints
            ),
            format!(
                "peak {:.0} MB, {:.0} MB after sync",
                largest.peak_rss_mb, largest.rss_after_sync_mb
            ),
            largest.peak_rss_mb < 300.0,
        ));
        lines.push((
            format!(
                "{} Services / {} endpoints from manifests: ready under 3 s",
                largest.services, largest.endpoints
            ),
            format!("{:.1} s", largest.sync_s),
            largest.sync_s < 3.0,
        ));
    }
    if let Some(k) = &results.kubernetes {
        lines.push((
            format!(
                "Kubernetes source, {} Services / {} endpoints: start to ready under 3 s",
                k.services, k.endpoints
            ),
            format!("{:.3} s", k.start_to_ready_s),
            k.start_to_ready_s < 3.0,
        ));
        lines.push((
            "Kubernetes source: daemon RSS under 100 MB".into(),
            format!(
                "peak {:.1} MB, {:.1} MB after sync",
                k.peak_rss_mb, k.rss_after_sync_mb
            ),
            k.peak_rss_mb < 100.0,
        ));
        lines.push((
            "network programming latency p99 under 50 ms".into(),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms over {} changes (daemon's histogram: p50 <= {} ms, p99 <= {} ms)",
                k.programming.p50_ms, k.programming.p99_ms, k.programming.samples, k.metric_p50_ms, k.metric_p99_ms
            ),
            k.programming.p99_ms < 50.0,
        ));
    }
    if let Some(r) = &results.restarts {
        lines.push((
            format!(
                "no failed connection across {} daemon restarts under load",
                r.restarts
            ),
            format!(
                "{} of {} connections failed ({} SIGTERM, {} kill -9, {} map-migrating upgrades)",
                r.failed, r.connections, r.sigterm, r.kill_9, r.upgrades
            ),
            r.failed == 0,
        ));
    }
    if let Some((worst, best)) = scale_per_endpoint_spread(&results.scale) {
        lines.push((
            "control plane linear: sync time per endpoint at the largest size within 2x of the smallest, duplicates included".into(),
            format!("{:.2} us per endpoint at worst, {:.2} us at best", worst * 1e6, best * 1e6),
            worst <= 2.0 * best,
        ));
    }
    lines
}

/// Sync seconds per endpoint, worst and best over the scale rows: a quadratic path
/// shows up as the per-endpoint cost growing with size. Rows below 100 000
/// endpoints (the smoke run's) are left out: fixed costs dominate them.
fn scale_per_endpoint_spread(rows: &[super::scale::ScaleRow]) -> Option<(f64, f64)> {
    let per: Vec<f64> = rows
        .iter()
        .filter(|r| r.endpoints >= 100_000)
        .map(|r| r.sync_s / r.endpoints as f64)
        .collect();
    if per.len() < 2 {
        return None;
    }
    let worst = per.iter().cloned().fold(f64::MIN, f64::max);
    let best = per.iter().cloned().fold(f64::MAX, f64::min);
    Some((worst, best))
}

fn chart(results: &Results, path: &Path) -> Result<()> {
    let services: Vec<usize> = results
        .connect
        .iter()
        .map(|r| r.services)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let c = results
        .connect
        .iter()
        .map(|r| r.concurrency)
        .min()
        .unwrap_or(1);
    let max_x = *services.last().unwrap_or(&1) as f64 * 1.5;
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.titled(
        &format!("New-connection latency vs number of services (concurrency {c})"),
        ("sans-serif", 22),
    )?;
    let panels = body.split_evenly((1, 2));
    let colors = [
        RGBColor(0, 0, 0),
        RGBColor(31, 119, 180),
        RGBColor(148, 103, 189),
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(188, 189, 34),
    ];
    for (panel, (label, pick)) in panels.iter().zip([("p50", 50), ("p99", 99)]) {
        let value = |r: &Row| if pick == 50 { r.p50_us } else { r.p99_us };
        let y_max = results
            .connect
            .iter()
            .filter(|r| r.concurrency == c)
            .map(value)
            .fold(0.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .margin(15)
            .caption(format!("{label} latency (µs)"), ("sans-serif", 18))
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((0.8f64..max_x).log_scale(), 0f64..y_max.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("services (log scale)")
            .y_desc("µs")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for (mode, color) in Mode::ALL.iter().zip(colors) {
            let points: Vec<(f64, f64)> = services
                .iter()
                .filter_map(|n| row(&results.connect, *mode, *n, c).map(|r| (*n as f64, value(r))))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(mode.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn markdown(
    results: &Results,
    machine: &serde_json::Value,
    chart_name: &str,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str("Produced by `cargo xtask bench` (method in `xtask/src/bench/`). Everything in one run, on the same namespaces and the same real servers: a client namespace, a node namespace routing to three server namespaces running `redis-server`. Compared side by side:\n\n");
    md.push_str("- **direct**: the client dials the pod IPs itself, one picked at random per connection like the balancers do: the physical limit.\n- **lb**: this load balancer (cgroup `connect4` rewrite of the ClusterIP).\n- **lb-packet**: the same Service, from a client pod in lb's packet mode (`lb.dev/mode: packet`, its own namespace and veth to the node): every packet it sends and receives is translated by the TC programs on its interface, with connection tracking, as a sidecar mesh or VM pod is balanced.\n- **lb-affinity**: the same, to a Service with `sessionAffinity: ClientIP` (at the largest service count; the client namespace sticks to one server, so this includes the affinity map lookup and refresh on every connect).\n- **iptables-legacy** / **iptables-nft**: kube-proxy's iptables mode, the same rule shapes (KUBE-SERVICES -> KUBE-SVC-* `statistic --mode random` -> KUBE-SEP-* DNAT, plus the masquerade marks), loaded with `iptables-restore` on each backend.\n- **userspace-proxy**: haproxy in TCP mode on the node (the old kube-proxy userspace mode's extra hop); configured with the target service only, so its numbers do not depend on the service count.\n\n");
    let _ = writeln!(
        md,
        "Each service has 3 endpoints; the clients use the service in the middle of the table. A new connection is connect + one request/response (`PING`/`+PONG`) + close, like netperf TCP_CRR; {} connections per point and round, {} rounds interleaved between direct, lb and userspace-proxy. Whole run: {:.0} s.\n",
        results.plan.connections,
        results.plan.rounds,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "**Machine**: {} CPUs ({}), {} GiB, Linux {}, {}. Shared and noisy: read ratios measured side by side, not absolute numbers.\n",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or(""),
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or(""),
        machine["date"].as_str().unwrap_or("")
    );
    md.push_str("## Targets\n\n| target | measured | met |\n|---|---|---|\n");
    for (target, measured, met) in targets(results) {
        let _ = writeln!(
            md,
            "| {target} | {measured} | {} |",
            if met { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(
        md,
        "\n## New connections\n\n![latency vs services]({chart_name})"
    );
    md.push_str(&connect_table(results, true));
    md.push_str("\n## Request latency on an established connection (TCP_RR-like)\n\n| mode | services | p50 µs | p99 µs | round trips/s |\n|---|---:|---:|---:|---:|\n");
    for r in &results.request {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.0} |",
            r.mode.name(),
            r.services,
            r.p50_us,
            r.p99_us,
            r.conn_per_s
        );
    }
    if let Some(t) = &results.throughput {
        let _ = writeln!(
            md,
            "\n## Throughput (iperf3, {} s per run, median of {})\n\n| direct | lb | lb / direct | lb-packet | lb-packet / direct |\n|---:|---:|---:|---:|---:|\n| {:.2} Gbit/s | {:.2} Gbit/s | {:.1}% | {:.2} Gbit/s | {:.1}% |\n",
            t.seconds_per_run,
            t.direct_runs_gbps.len(),
            t.direct_gbps,
            t.lb_gbps,
            t.lb_ratio * 100.0,
            t.lb_packet_gbps,
            t.lb_packet_ratio * 100.0
        );
    }
    if !results.node_port_throughput.is_empty() {
        let _ = writeln!(
            md,
            "\n## Throughput through a node port (iperf3 from outside the node, median)\n\n| mode | Gbit/s | vs direct |\n|---|---:|---:|"
        );
        for (mode, runs) in &results.node_port_throughput {
            let ratio = node_port_ratio(results, *mode).unwrap_or(f64::NAN);
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.1}% |",
                mode.name(),
                median(runs).unwrap_or(f64::NAN),
                ratio * 100.0
            );
        }
    }
    let cp = &results.control_plane;
    let _ = writeln!(md, "## Control plane\n\n| | |\n|---|---:|");
    let _ = writeln!(
        md,
        "| full sync, {} services / {} endpoints from manifests | {:.3} s |",
        cp.services, cp.endpoints, cp.full_sync_s
    );
    let _ = writeln!(
        md,
        "| of which kernel map writes (batched) | {:.3} s |",
        cp.map_writes_s
    );
    let _ = writeln!(
        md,
        "| daemon start (load + attach programs) to ready | {:.3} s |",
        cp.start_to_ready_s
    );
    let _ = writeln!(
        md,
        "| daemon RSS, peak / after sync | {:.1} MB / {:.1} MB |",
        cp.peak_rss_mb, cp.rss_after_sync_mb
    );
    let _ = writeln!(
        md,
        "| endpoint change in a manifest to kernel map, p50 / p99 / max ({} changes) | {:.2} / {:.2} / {:.2} ms |",
        cp.endpoint_change.samples,
        cp.endpoint_change.p50_ms,
        cp.endpoint_change.p99_ms,
        cp.endpoint_change.max_ms
    );
    let _ = writeln!(
        md,
        "| anchor: iptables-legacy-restore of the same table | {:.3} s |",
        cp.iptables_legacy_restore_s
    );
    let _ = writeln!(
        md,
        "| anchor: iptables-nft-restore of the same table | {:.3} s |",
        cp.iptables_nft_restore_s
    );
    if let Some(k) = &results.kubernetes {
        let _ = writeln!(
            md,
            "\n## Kubernetes source (a real kube-apiserver)\n\n| | |\n|---|---:|"
        );
        let _ = writeln!(
            md,
            "| objects in the API server | {} Services, {} EndpointSlices, {} endpoints (created in {:.1} s) |",
            k.services, k.services, k.endpoints, k.create_objects_s
        );
        let _ = writeln!(
            md,
            "| daemon start to ready (list all, program the maps) | {:.3} s |",
            k.start_to_ready_s
        );
        let _ = writeln!(
            md,
            "| daemon RSS, peak / after sync | {:.1} MB / {:.1} MB |",
            k.peak_rss_mb, k.rss_after_sync_mb
        );
        let _ = writeln!(
            md,
            "| network programming latency (slice trigger time to kernel map), p50 / p99 / max ({} changes) | {:.2} / {:.2} / {:.2} ms |",
            k.programming.samples, k.programming.p50_ms, k.programming.p99_ms, k.programming.max_ms
        );
        let _ = writeln!(
            md,
            "| `kubeproxy_network_programming_duration_seconds`, bucket bounds at p50 / p99 ({} samples) | <= {} / <= {} ms |",
            k.metric_samples, k.metric_p50_ms, k.metric_p99_ms
        );
    }
    if !results.scale.is_empty() {
        md.push_str("\n## Control plane at scale (manifests, 10 endpoints per Service)\n\nA duplicate is a Service whose ClusterIP:port another Service already holds: it waits, reported, until that address frees (the path that used to be quadratic).\n\n| services | of which duplicates | endpoints | start to ready | per endpoint | RSS peak / after sync |\n|---:|---:|---:|---:|---:|---:|\n");
        for r in &results.scale {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} s | {:.2} µs | {:.0} MB / {:.0} MB |",
                r.services,
                r.duplicates,
                r.endpoints,
                r.sync_s,
                r.sync_s / r.endpoints.max(1) as f64 * 1e6,
                r.peak_rss_mb,
                r.rss_after_sync_mb
            );
        }
    }
    if let Some(r) = &results.restarts {
        let _ = writeln!(
            md,
            "\n## Restarts under load\n\nA client opens a new connection through a ClusterIP every 5 ms while the daemon is restarted {} times in turn by SIGTERM, kill -9, and kill -9 followed by an upgrade whose maps differ (a capacity change the next daemon migrates while the old maps serve).\n\n| restarts | connections | failed | seconds |\n|---:|---:|---:|---:|\n| {} | {} | {} | {:.1} |",
            r.restarts, r.restarts, r.connections, r.failed, r.seconds
        );
    }
    md.push_str("\nSetup time per service count (3 endpoints each):\n\n| services | lb daemon start to ready | iptables-legacy-restore | iptables-nft-restore |\n|---:|---:|---:|---:|\n");
    for n in results.setup.lb_ready_s.keys() {
        let get = |m: &std::collections::BTreeMap<usize, f64>| {
            m.get(n).map_or("-".to_string(), |s| format!("{s:.3} s"))
        };
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} |",
            get(&results.setup.lb_ready_s),
            get(&results.setup.iptables_legacy_restore_s),
            get(&results.setup.iptables_nft_restore_s)
        );
    }
    md
}

pub fn write(
    results: &Results,
    out: &Path,
    publish_root: Option<&Path>,
    elapsed: Duration,
) -> Result<()> {
    let machine = machine();
    let json = json!({
        "connect": results.connect,
        "request": results.request,
        "throughput": results.throughput,
        "node_port_throughput_gbps": results
            .node_port_throughput
            .iter()
            .map(|(mode, runs)| (mode.name(), runs.clone()))
            .collect::<BTreeMap<_, _>>(),
        "control_plane": results.control_plane,
        "kubernetes": results.kubernetes,
        "scale": results.scale,
        "restarts": results.restarts,
        "hook_cost": results.hook_cost,
        "setup": results.setup,
        "machine": machine,
        "plan": results.plan,
    });
    fs::write(out.join("results.json"), serde_json::to_vec_pretty(&json)?)?;
    chart(results, &out.join("latency.svg"))?;
    fs::write(
        out.join("report.md"),
        markdown(results, &machine, "latency.svg", elapsed),
    )?;

    println!("{}", connect_table(results, false));
    println!("request latency on an established connection:");
    for r in &results.request {
        println!(
            "  {:<16} p50 {:>7.1} us  p99 {:>7.1} us",
            r.mode.name(),
            r.p50_us,
            r.p99_us
        );
    }
    println!();
    for (target, measured, met) in targets(results) {
        println!(
            "[{}] {target}: {measured}",
            if met { "met" } else { "MISSED" }
        );
    }
    println!(
        "\nresults: {}/results.json, {}/report.md, {}/latency.svg",
        out.display(),
        out.display(),
        out.display()
    );

    if let Some(root) = publish_root {
        let docs = root.join("docs");
        fs::create_dir_all(&docs)?;
        fs::copy(out.join("latency.svg"), docs.join("bench-latency.svg"))?;
        fs::write(
            root.join("BENCHMARKS.md"),
            markdown(results, &machine, "docs/bench-latency.svg", elapsed),
        )?;
        println!("published BENCHMARKS.md and docs/bench-latency.svg");
    }
    Ok(())
}

/// The smoke test's assertions: every file is there and results.json has the
/// documented shape with a row per mode, service count and concurrency.
pub fn check_smoke(out: &Path) -> Result<()> {
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("results.json"))?).context("results.json")?;
    for key in ["connect", "throughput", "control_plane", "machine"] {
        if json.get(key).is_none() {
            bail!("results.json lacks {key}");
        }
    }
    let rows = json["connect"].as_array().context("connect is a list")?;
    let services: BTreeSet<u64> = rows.iter().filter_map(|r| r["services"].as_u64()).collect();
    let concurrency: BTreeSet<u64> = rows
        .iter()
        .filter_map(|r| r["concurrency"].as_u64())
        .collect();
    // lb-affinity is measured at the largest service count only.
    let expected = (Mode::ALL.len() - 1) * services.len() * concurrency.len() + concurrency.len();
    if rows.len() != expected {
        bail!("{} connect rows, expected {expected}", rows.len());
    }
    for r in rows {
        for field in [
            "mode",
            "services",
            "concurrency",
            "p50_us",
            "p90_us",
            "p99_us",
            "conn_per_s",
        ] {
            if r.get(field).is_none() {
                bail!("connect row lacks {field}: {r}");
            }
        }
        let p50 = r["p50_us"].as_f64().unwrap_or(f64::NAN);
        if !(p50 > 0.0 && p50 <= r["p99_us"].as_f64().unwrap_or(0.0)) {
            bail!("implausible latencies: {r}");
        }
    }
    if json["control_plane"]["endpoint_change"]["samples"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        bail!("no endpoint-change samples");
    }
    if json["throughput"]["lb_gbps"].as_f64().unwrap_or(0.0) <= 0.0 {
        bail!("no throughput measured");
    }
    if json["kubernetes"]["programming"]["samples"]
        .as_u64()
        .unwrap_or(0)
        == 0
        || json["kubernetes"]["metric_samples"].as_u64().unwrap_or(0) == 0
    {
        bail!("no Kubernetes-source measurements: {}", json["kubernetes"]);
    }
    if json["scale"].as_array().is_none_or(|rows| rows.is_empty()) {
        bail!("no control-plane scale rows");
    }
    if json["hook_cost"]["affinity"]["runs"].as_u64().unwrap_or(0) == 0
        || json["hook_cost"]["plain"]["runs"].as_u64().unwrap_or(0) == 0
    {
        bail!("no connect4 cost measured: {}", json["hook_cost"]);
    }
    if json["restarts"]["connections"].as_u64().unwrap_or(0) == 0 {
        bail!("no restart-under-load run: {}", json["restarts"]);
    }
    let svg = fs::read_to_string(out.join("latency.svg"))?;
    if !svg.contains("<svg") || !svg.contains("lb") {
        bail!("latency.svg is not a chart");
    }
    eprintln!("bench smoke test: results.json, report.md and latency.svg are complete");
    Ok(())
}
