//! The Kubernetes source at scale: Services and EndpointSlices created in a real API
//! server, then the daemon's start-to-ready time, its memory, and how long single
//! endpoint changes take from the slice's `last-change-trigger-time` to the kernel
//! map (measured by polling the map, and as the daemon's own
//! `kubeproxy_network_programming_duration_seconds` histogram reports it).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use lb_testbed::{
    Cgroup,
    k8s::{ControlPlane, Etcd},
    kubelet::admin_client,
};
use serde::Serialize;
use serde_json::json;

use super::{
    Plan,
    control_plane::{ChangeLatency, MapProbe},
    memory_mb,
};

#[derive(Debug, Clone, Default, Serialize)]
pub struct KubeBench {
    pub services: usize,
    pub endpoints: usize,
    /// Creating the objects in the API server (not the daemon's work).
    pub create_objects_s: f64,
    /// From `lb daemon` start to ready (listed everything, programmed the maps).
    pub start_to_ready_s: f64,
    pub peak_rss_mb: f64,
    pub rss_after_sync_mb: f64,
    /// Trigger time written into the slice -> the kernel map holds the change (polled).
    pub programming: ChangeLatency,
    /// The daemon's histogram: bucket upper bounds at p50/p99, and its sample count.
    pub metric_p50_ms: f64,
    pub metric_p99_ms: f64,
    pub metric_samples: u64,
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .expect("valid Service")
}

/// An address that exists nowhere: this benchmark measures the control plane.
fn endpoint_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 246, 0, 1)) + n as u32)
}

fn slice(service: &str, endpoints: &[Ipv4Addr], trigger: Option<&str>) -> EndpointSlice {
    let mut annotations = serde_json::Map::new();
    if let Some(t) = trigger {
        annotations.insert(
            "endpoints.kubernetes.io/last-change-trigger-time".into(),
            json!(t),
        );
    }
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x"),
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "lb-bench",
            },
            "annotations": annotations,
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|ip| json!({"addresses": [ip.to_string()]})).collect::<Vec<_>>(),
    }))
    .expect("valid EndpointSlice")
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

async fn create_objects(client: &Client, ns: &str, services: usize, per: usize) -> Result<IpAddr> {
    let svcs = Api::<Service>::namespaced(client.clone(), ns);
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
    let pp = PostParams::default();
    let results: Vec<Result<()>> = stream::iter(0..services)
        .map(|i| {
            let (svcs, slices, pp) = (svcs.clone(), slices.clone(), pp.clone());
            async move {
                let name = format!("svc-{i}");
                svcs.create(&pp, &service(&name)).await?;
                let ips: Vec<Ipv4Addr> = (0..per).map(|k| endpoint_ip(i * per + k)).collect();
                slices.create(&pp, &slice(&name, &ips, None)).await?;
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    svcs.create(&pp, &service("changing")).await?;
    slices
        .create(&pp, &slice("changing", &[endpoint_ip(10_000_000)], None))
        .await?;
    let created = svcs.get("changing").await?;
    created
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no ClusterIP allocated")?
        .parse()
        .context("ClusterIP")
}

/// The bucket upper bound (ms) at quantile `q` of a histogram in Prometheus text.
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> (f64, u64) {
    let mut buckets: Vec<(f64, u64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((bound, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0, |b| b.1);
    let wanted = (q * total as f64).ceil() as u64;
    let bound = buckets
        .iter()
        .find(|b| b.1 >= wanted.max(1))
        .map_or(f64::NAN, |b| b.0 * 1000.0);
    (bound, total)
}

pub fn run(lb: &Path, plan: &Plan, work_dir: &Path) -> Result<KubeBench> {
    if let Some(reason) = lb_testbed::k8s::unavailable() {
        bail!("{reason}");
    }
    let cp = ControlPlane::start(Etcd::Bundled)?;
    let ns = "bench";
    cp.kubectl(&["create", "namespace", ns])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = runtime.block_on(admin_client(&cp.kubeconfig))?;
    let started = Instant::now();
    let vip = runtime.block_on(create_objects(
        &client,
        ns,
        plan.kube_services,
        plan.kube_endpoints,
    ))?;
    let create_objects_s = started.elapsed().as_secs_f64();

    let cgroup = Cgroup::create(&format!(
        "{}{}kbench",
        lb_testbed::PREFIX,
        std::process::id()
    ))?;
    let pin_dir = format!(
        "/sys/fs/bpf/{}{}kbench",
        lb_testbed::PREFIX,
        std::process::id()
    );
    let log = work_dir.join("daemon-kube.log");
    let started = Instant::now();
    let mut child = Command::new(lb)
        .arg("daemon")
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args([
            "--node-name",
            "bench-node",
            "--pin-dir",
            &pin_dir,
            "--detach-on-exit",
        ])
        .arg("--cgroup")
        .arg(&cgroup.path)
        .args(["--health-addr", "off", "--metrics-addr", "127.0.0.1:0"])
        .args(["--log-level", "info,kube_client::client::tls=error"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()?;
    let result = (|| -> Result<KubeBench> {
        let log_text = || fs::read_to_string(&log).unwrap_or_default();
        while !log_text().contains("controller: ready") {
            if let Some(status) = child.try_wait()? {
                bail!("lb daemon exited ({status}):\n{}", log_text());
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("lb daemon not ready after 300 s:\n{}", log_text());
            }
            thread::sleep(Duration::from_millis(5));
        }
        let start_to_ready_s = started.elapsed().as_secs_f64();
        let (peak, current) = memory_mb(child.id())?;

        let probe = MapProbe::open(Path::new(&pin_dir), vip)?;
        let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
        let mut latencies = Vec::new();
        for k in 1..=plan.kube_changes {
            let expected = endpoint_ip(10_000_000 + k);
            let trigger = SystemTime::now();
            let stamp = now_rfc3339();
            let patch = slice("changing", &[expected], Some(&stamp));
            runtime.block_on(slices.patch(
                "changing-x",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))?;
            loop {
                if probe.backend() == Some(expected) {
                    latencies.push(trigger.elapsed().unwrap_or_default());
                    break;
                }
                if trigger.elapsed().unwrap_or_default() > Duration::from_secs(5) {
                    bail!("endpoint change {k} did not reach the kernel map within 5 s");
                }
                thread::sleep(Duration::from_micros(50));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let metrics_addr = log_text()
            .lines()
            .find(|l| l.contains("metrics server listening"))
            .and_then(|l| l.split("bound=").nth(1))
            .map(|s| s.trim().to_string())
            .context("no metrics address in the log")?;
        let metrics = Command::new("curl")
            .args(["-s", &format!("http://{metrics_addr}/metrics")])
            .output()?;
        let metrics = String::from_utf8_lossy(&metrics.stdout);
        let name = "kubeproxy_network_programming_duration_seconds";
        let (metric_p50_ms, metric_samples) = histogram_quantile(&metrics, name, 0.5);
        let (metric_p99_ms, _) = histogram_quantile(&metrics, name, 0.99);
        let (peak_after, _) = memory_mb(child.id())?;
        Ok(KubeBench {
            services: plan.kube_services + 1,
            endpoints: plan.kube_services * plan.kube_endpoints + 1,
            create_objects_s,
            start_to_ready_s,
            peak_rss_mb: peak.max(peak_after),
            rss_after_sync_mb: current,
            programming: ChangeLatency::of(latencies),
            metric_p50_ms,
            metric_p99_ms,
            metric_samples,
        })
    })();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    drop(cgroup);
    result
}
