//! Prometheus metrics, named as kube-proxy names them where they mean the same thing
//! (so existing dashboards and alerts fit), plus `lb_` series for what is ours. The
//! datapath's own counters are read from the per-CPU maps at scrape time.

use std::{
    fmt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{datapath::StatsReader, source::kube::ApiStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: String,
}

/// Sizes the controller publishes after every sync (cheaper than counting map
/// entries at scrape time).
#[derive(Debug, Default)]
pub struct Sizes {
    pub frontends: AtomicU64,
    pub backends: AtomicU64,
    /// Entries of LB_SERVICES (frontends + slots).
    pub service_entries: AtomicU64,
    /// Frontends the maps could not hold (reported, retried when space frees up).
    pub unprogrammed: AtomicU64,
    /// Interfaces with the TC programs attached, and those where attaching failed.
    pub tc_devices_attached: AtomicU64,
    pub tc_devices_failed: AtomicU64,
    /// This node's pods by load-balancing mode (socket, packet, off).
    pub workload_pods: [AtomicU64; 3],
    /// Pods not in socket mode whose cgroup (or interface) was not found yet.
    pub workloads_waiting: AtomicU64,
}

impl Sizes {
    pub fn set_workloads(
        &self,
        counts: &std::collections::BTreeMap<crate::model::workloads::Mode, u64>,
        waiting: u64,
    ) {
        for (i, mode) in crate::model::workloads::Mode::ALL.iter().enumerate() {
            self.workload_pods[i].store(counts.get(mode).copied().unwrap_or(0), Ordering::Relaxed);
        }
        self.workloads_waiting.store(waiting, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabel {
    feature: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// Everything the daemon counts.
#[derive(Debug)]
pub struct Metrics {
    pub sync_duration: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub programming_latency: Histogram,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    pub syncs: Counter,
    pub sync_failures: Counter,
    pub map_writes: Counter,
    pub sockets_destroyed: Counter,
    flow_removals: Family<ReasonLabel, Counter>,
    pub sizes: Arc<Sizes>,
    registry: Registry,
}

/// Reads what only exists at scrape time: datapath counters, API errors, sizes.
#[derive(Debug)]
struct Live {
    stats: Option<StatsReader>,
    api: Option<Arc<ApiStatus>>,
    sizes: Arc<Sizes>,
    capacities: Vec<(String, u64)>,
    /// (feature, whether the kernel has it).
    features: Vec<(String, bool)>,
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64| {
            let metric = ConstGauge::new(value as i64);
            let metric_encoder =
                encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(metric_encoder)
        };
        gauge(
            &mut encoder,
            "lb_frontends",
            "Frontends (address, port, protocol, scope) programmed in the kernel",
            self.sizes.frontends.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "lb_backends",
            "Distinct backends programmed in the kernel",
            self.sizes.backends.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "lb_unprogrammed_frontends",
            "Frontends the maps could not hold; they wait for space (see lb list)",
            self.sizes.unprogrammed.load(Ordering::Relaxed),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "lb_map_entries",
                "Entries in use per map",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            let used = [
                (
                    "LB_SERVICES",
                    self.sizes.service_entries.load(Ordering::Relaxed),
                ),
                ("LB_BACKENDS", self.sizes.backends.load(Ordering::Relaxed)),
            ];
            for (map, value) in used {
                let label = MapLabel { map: map.into() };
                ConstGauge::new(value as i64).encode(family.encode_family(&label)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_map_capacity",
                "Capacity (max_entries) per map",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, value) in &self.capacities {
                let label = MapLabel { map: map.clone() };
                ConstGauge::new(*value as i64).encode(family.encode_family(&label)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_kernel_feature",
                "Optional kernel features: 1 if the kernel has it (lb list says what is used instead when not)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (feature, available) in &self.features {
                let label = FeatureLabel {
                    feature: feature.clone(),
                };
                ConstGauge::new(i64::from(*available)).encode(family.encode_family(&label)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_tc_devices",
                "Interfaces for traffic from other machines, by whether their TC programs are attached",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (state, value) in [
                ("attached", &self.sizes.tc_devices_attached),
                ("failed", &self.sizes.tc_devices_failed),
            ] {
                let label = StateLabel {
                    state: state.into(),
                };
                ConstGauge::new(value.load(Ordering::Relaxed) as i64)
                    .encode(family.encode_family(&label)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_pods",
                "This node's pods by load-balancing mode (lb.dev/mode, or detected)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (mode, value) in crate::model::workloads::Mode::ALL
                .iter()
                .zip(&self.sizes.workload_pods)
            {
                let label = ModeLabel {
                    mode: mode.to_string(),
                };
                ConstGauge::new(value.load(Ordering::Relaxed) as i64)
                    .encode(family.encode_family(&label)?)?;
            }
        }
        gauge(
            &mut encoder,
            "lb_pods_waiting_for_cgroup",
            "Pods in packet or off mode not in effect yet: cgroup (or, in packet mode, interface) not found (the socket hooks balance them meanwhile)",
            self.sizes.workloads_waiting.load(Ordering::Relaxed),
        )?;
        if let Some(api) = &self.api {
            let metric = ConstCounter::new(api.errors.load(Ordering::Relaxed));
            let metric_encoder = encoder.encode_descriptor(
                "lb_api_errors",
                "Kubernetes API requests (lists, watches) that failed",
                None,
                metric.metric_type(),
            )?;
            metric.encode(metric_encoder)?;
        }
        if let Some(stats) = &self.stats
            && let Ok(values) = stats.read()
        {
            let value = |name: &str| {
                values
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, v)| *v)
            };
            gauge(
                &mut encoder,
                "lb_sockets_local_storage",
                "Open sockets holding per-socket storage (unconnected UDP senders, overflow)",
                value("local_created").saturating_sub(value("local_released")),
            )?;
            gauge(
                &mut encoder,
                "lb_sockets_overflowed",
                "Open sockets whose translation the socket map had no room for (raise --max-sockets)",
                value("overflowed_sockets").saturating_sub(value("overflowed_released")),
            )?;
            if let Ok((map, tracked)) = stats.tracked_sockets() {
                let mut family = encoder.encode_descriptor(
                    "lb_tracked_sockets",
                    "Translated connected sockets the socket map remembers",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                let label = MapLabel { map: map.into() };
                ConstGauge::new(tracked as i64).encode(family.encode_family(&label)?)?;
            }
            let mut family = encoder.encode_descriptor(
                "lb_datapath_decisions",
                "Decisions of the eBPF programs, summed over CPUs (LB_STATS)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, value) in values {
                let label = DecisionLabel {
                    decision: name.to_string(),
                };
                ConstCounter::new(value).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "kubeproxy_sync_proxy_rules_duration",
            "How long one sync of the kernel maps took",
            Unit::Seconds,
            sync_duration.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "kubeproxy_sync_proxy_rules_last_timestamp",
            "When the kernel maps were last synced successfully (Unix time)",
            Unit::Seconds,
            last_sync.clone(),
        );
        let programming_latency = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        registry.register_with_unit(
            "kubeproxy_network_programming_duration",
            "From an EndpointSlice's last-change-trigger-time to its change reaching the kernel maps",
            Unit::Seconds,
            programming_latency.clone(),
        );
        let service_changes = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Service objects added, changed or removed",
            service_changes.clone(),
        );
        let endpoint_changes = Counter::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "EndpointSlice objects added, changed or removed",
            endpoint_changes.clone(),
        );
        let syncs = Counter::default();
        registry.register(
            "lb_syncs",
            "Syncs of the kernel maps that succeeded",
            syncs.clone(),
        );
        let sync_failures = Counter::default();
        registry.register(
            "lb_sync_failures",
            "Syncs of the kernel maps that failed (each is retried)",
            sync_failures.clone(),
        );
        let map_writes = Counter::default();
        registry.register(
            "lb_map_writes",
            "Map entries written or deleted by syncs",
            map_writes.clone(),
        );
        let sockets_destroyed = Counter::default();
        registry.register(
            "lb_sockets_destroyed",
            "Established sockets destroyed because their backend left its Service",
            sockets_destroyed.clone(),
        );
        let flow_removals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "lb_tracked_flows_removed",
            "Tracked external flows the daemon removed, by reason (expired, frontend_gone, \
             source_range, backend_gone)",
            flow_removals.clone(),
        );
        Self {
            sync_duration,
            last_sync,
            programming_latency,
            service_changes,
            endpoint_changes,
            syncs,
            sync_failures,
            map_writes,
            sockets_destroyed,
            flow_removals,
            sizes: Arc::new(Sizes::default()),
            registry,
        }
    }

    /// Counts flows the collector removed, by reason.
    pub fn count_flow_removals(
        &self,
        removed: &std::collections::BTreeMap<crate::datapath::flows::Removal, u64>,
    ) {
        for (reason, count) in removed {
            self.flow_removals
                .get_or_create(&ReasonLabel {
                    reason: reason.name().to_string(),
                })
                .inc_by(*count);
        }
    }

    /// Adds the scrape-time series (datapath counters from `pin_dir`, API errors).
    pub fn with_live(
        mut self,
        pin_dir: &Path,
        capacities: &crate::datapath::Capacities,
        features: Option<&crate::datapath::KernelFeatures>,
        api: Option<Arc<ApiStatus>>,
    ) -> Self {
        let stats = StatsReader::open(pin_dir).ok();
        let capacities = crate::datapath::capacities(capacities);
        let features = features
            .map(|f| {
                f.features
                    .iter()
                    .map(|f| (f.name.to_string(), f.available))
                    .collect()
            })
            .unwrap_or_default();
        self.registry.register_collector(Box::new(Live {
            stats,
            api,
            sizes: self.sizes.clone(),
            capacities,
            features,
        }));
        self
    }

    /// The text exposition format (0.0.4), as Prometheus scrapes it.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `Content-Type` of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[allow(dead_code)]
fn _assert_family_is_send(_: Family<MapLabel, Counter>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_as_prometheus_text() {
        let metrics = Metrics::new();
        metrics.service_changes.inc_by(3);
        metrics.sync_duration.observe(0.02);
        metrics.sizes.frontends.store(7, Ordering::Relaxed);
        let metrics = metrics.with_live(
            Path::new("/nonexistent"),
            &crate::datapath::Capacities::default(),
            None,
            None,
        );
        let text = metrics.encode();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| s.value.clone())
        };
        assert_eq!(
            value("kubeproxy_sync_proxy_rules_service_changes_total"),
            Some(prometheus_parse::Value::Counter(3.0))
        );
        assert_eq!(
            value("lb_frontends"),
            Some(prometheus_parse::Value::Gauge(7.0))
        );
        assert!(matches!(
            value("kubeproxy_sync_proxy_rules_duration_seconds"),
            Some(prometheus_parse::Value::Histogram(_))
        ));
    }
}
