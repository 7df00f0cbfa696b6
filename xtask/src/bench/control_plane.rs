//! Control-plane costs: a full sync of many services from manifests (time, daemon
//! memory), the delay from one endpoint change in a manifest to the kernel map holding
//! it, and iptables-restore of the same table as the anchor.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    Backend, ServiceKey, ServiceValue, addr_from_ip, addr_to_ip, map_names, port_to_net,
};
use serde::Serialize;

use super::{
    Daemon, Plan, iptables_restore, log_number, memory_mb, node_run, rules,
    topology::{SERVER_IPS, Topology},
};

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChangeLatency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl ChangeLatency {
    pub fn of(mut latencies: Vec<Duration>) -> Self {
        latencies.sort();
        let ns: Vec<u64> = latencies.iter().map(|d| d.as_nanos() as u64).collect();
        Self {
            samples: ns.len(),
            p50_ms: super::client::percentile(&ns, 50.0) / 1000.0,
            p90_ms: super::client::percentile(&ns, 90.0) / 1000.0,
            p99_ms: super::client::percentile(&ns, 99.0) / 1000.0,
            max_ms: ns.last().map_or(f64::NAN, |v| *v as f64 / 1e6),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlPlane {
    pub services: usize,
    pub endpoints: usize,
    /// From reading the first manifest to every map written (what "ready" reports).
    pub full_sync_s: f64,
    /// Of which: writing the kernel maps (batched).
    pub map_writes_s: f64,
    /// From `lb daemon` start (programs loaded, attached) to ready.
    pub start_to_ready_s: f64,
    pub peak_rss_mb: f64,
    pub rss_after_sync_mb: f64,
    pub endpoint_change: ChangeLatency,
    pub iptables_legacy_restore_s: f64,
    pub iptables_nft_restore_s: f64,
}

const CHANGING_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 1);

fn changing_manifest(endpoint: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: changing, namespace: bench}}\nspec:\n  clusterIP: {CHANGING_VIP}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: changing-x\n  namespace: bench\n  labels: {{kubernetes.io/service-name: changing}}\naddressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n- addresses: [\"{endpoint}\"]\n"
    )
}

fn change_endpoint(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 246, 0, 1)) + k as u32)
}

/// Reads a changing service's only backend straight from the pinned maps.
pub struct MapProbe {
    vip: std::net::IpAddr,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
}

impl MapProbe {
    pub fn open(pin_dir: &Path, vip: std::net::IpAddr) -> Result<Self> {
        let maps_dir = pin_dir.join(format!("v{}", lb_common::LAYOUT_VERSION));
        let open = |name: &str| -> Result<Map> {
            Ok(Map::from_map_data(MapData::from_pin(maps_dir.join(name))?)?)
        };
        Ok(Self {
            vip,
            services: open(map_names::SERVICES)?.try_into()?,
            backends: open(map_names::BACKENDS)?.try_into()?,
        })
    }

    pub fn backend(&self) -> Option<Ipv4Addr> {
        let key = ServiceKey::new(
            addr_from_ip(self.vip),
            port_to_net(80),
            lb_common::IPPROTO_TCP,
            lb_common::SCOPE_INTERNAL,
            1,
        );
        let slot = self.services.get(&key, 0).ok()?;
        let backend = self.backends.get(&slot.backend_id, 0).ok()?;
        match addr_to_ip(&backend.addr) {
            std::net::IpAddr::V4(v4) => Some(v4),
            _ => None,
        }
    }
}

fn write_atomically(dir: &Path, name: &str, text: &str) -> Result<()> {
    let staging = dir.join(format!(".{name}.tmp"));
    fs::write(&staging, text)?;
    fs::rename(&staging, dir.join(name))?;
    Ok(())
}

pub fn run(lb: &Path, topo: &mut Topology, pin_dir: &Path, plan: &Plan) -> Result<ControlPlane> {
    let dir = topo.work_dir.join("control-plane");
    fs::create_dir_all(&dir)?;
    let servers = [
        Ipv4Addr::new(10, 245, 255, 1),
        Ipv4Addr::new(10, 245, 255, 2),
        Ipv4Addr::new(10, 245, 255, 3),
    ];
    // Endpoints that exist nowhere: this part measures the control plane only.
    fs::write(
        dir.join("services.yaml"),
        rules::manifests(plan.cp_services, plan.cp_endpoints, &servers),
    )?;
    write_atomically(
        &dir,
        "changing.yaml",
        &changing_manifest(change_endpoint(0)),
    )?;

    let daemon = Daemon::start(lb, topo, &dir, "control-plane")?;
    let log = daemon.log_text();
    let (peak, current) = memory_mb(daemon.pid())?;
    let mut result = ControlPlane {
        services: plan.cp_services,
        endpoints: plan.cp_services * plan.cp_endpoints,
        full_sync_s: log_number(&log, " ready ", "elapsed_ms").context("ready line")? / 1000.0,
        map_writes_s: log_number(&log, "kernel maps synchronised", "elapsed_us")
            .context("sync line")?
            / 1e6,
        start_to_ready_s: daemon.ready_s,
        peak_rss_mb: peak,
        rss_after_sync_mb: current,
        ..Default::default()
    };

    let probe = MapProbe::open(pin_dir, CHANGING_VIP.into())?;
    let mut latencies = Vec::new();
    for k in 1..=plan.cp_changes {
        let expected = change_endpoint(k);
        // Start the clock before writing: the daemon may run (and finish) before this
        // process is scheduled again after the rename.
        let written = Instant::now();
        write_atomically(&dir, "changing.yaml", &changing_manifest(expected))?;
        loop {
            if probe.backend() == Some(expected) {
                latencies.push(written.elapsed());
                break;
            }
            if written.elapsed() > Duration::from_secs(3) {
                bail!(
                    "endpoint change {k} did not reach the kernel map within 3 s:\n{}",
                    daemon.log_text()
                );
            }
            thread::sleep(Duration::from_micros(50));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let (peak, _) = memory_mb(daemon.pid())?;
    result.peak_rss_mb = result.peak_rss_mb.max(peak);
    daemon.stop()?;
    result.endpoint_change = ChangeLatency::of(latencies);

    // The anchor: kube-proxy's rules for the same table.
    let rules = rules::iptables_rules(plan.cp_services, plan.cp_endpoints, &SERVER_IPS, &[]);
    result.iptables_nft_restore_s = iptables_restore(topo, "iptables-nft-restore", &rules)?;
    node_run(topo, &["nft", "delete", "table", "ip", "nat"])?;
    result.iptables_legacy_restore_s = iptables_restore(topo, "iptables-legacy-restore", &rules)?;
    node_run(topo, &["iptables-legacy", "-t", "nat", "-F"])?;
    node_run(topo, &["iptables-legacy", "-t", "nat", "-X"])?;
    Ok(result)
}
