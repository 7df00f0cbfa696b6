//! Load-balancing modes per workload: which of this node's pods the socket hooks
//! balance at `connect()` (`socket`, the default), which are balanced per packet on
//! their host-side interface (`packet`: a sidecar proxy or a VM guest must see the
//! ClusterIP), and which lb leaves alone (`off`: a mesh that balances itself).
//!
//! A pod's mode comes from, in order: its own `lb.dev/mode` annotation, its
//! Namespace's, the auto-detection rules (an Istio or Linkerd sidecar, a KubeVirt
//! launcher, a runtime class listed by `--packet-runtime-classes`: `packet`), else
//! `socket`. An annotation with a value that is not a mode is reported and skipped,
//! so the next rule decides. Pure: converted from API objects here, decided here,
//! unit-tested here.

use std::{fmt, path::PathBuf, str::FromStr, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::spec::ObjectRef;

/// Annotation on a Pod or Namespace choosing the mode.
pub const MODE_ANNOTATION: &str = "lb.dev/mode";
/// Manifests only (no kubelet lays out cgroups there): the pod's cgroup2 directory,
/// absolute or relative to the cgroup2 mount.
pub const CGROUP_ANNOTATION: &str = "lb.dev/cgroup";

/// Istio's injector records what it injected here.
const ISTIO_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Linkerd's injector sets this on every meshed pod.
const LINKERD_PROXY_ANNOTATION: &str = "linkerd.io/proxy-version";
const ISTIO_PROXY_CONTAINER: &str = "istio-proxy";
const LINKERD_PROXY_CONTAINER: &str = "linkerd-proxy";
/// KubeVirt runs each VM in a pod labelled `kubevirt.io=virt-launcher`.
const KUBEVIRT_LABEL: &str = "kubevirt.io";
const KUBEVIRT_LAUNCHER: &str = "virt-launcher";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Socket,
    Packet,
    Off,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Socket, Mode::Packet, Mode::Off];

    /// The value `LB_WORKLOADS` holds for it.
    pub fn map_value(self) -> u32 {
        match self {
            Self::Socket => lb_common::workload_mode::SOCKET,
            Self::Packet => lb_common::workload_mode::PACKET,
            Self::Off => lb_common::workload_mode::OFF,
        }
    }

    pub fn from_map_value(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.map_value() == value)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Packet => "packet",
            Self::Off => "off",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s.trim())
            .ok_or_else(|| format!("{s:?} is not a load-balancing mode (socket, packet or off)"))
    }
}

/// What the mode decision needs of one of this node's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub id: ObjectRef,
    /// Finds the pod's cgroup (`pod<uid>` in the kubelet's layout).
    pub uid: Option<Arc<str>>,
    /// `spec.nodeName` (manifests may list other nodes' pods).
    pub node: Option<Arc<str>>,
    /// Its `lb.dev/mode` annotation, as written.
    pub mode: Option<Arc<str>>,
    /// Why auto-detection would pick `packet` for it, if it would (before runtime
    /// classes, which depend on the daemon's flags).
    pub detected: Option<&'static str>,
    pub runtime_class: Option<Arc<str>>,
    /// `lb.dev/cgroup` (manifests).
    pub cgroup: Option<PathBuf>,
    /// Its addresses (`status.podIPs`): where packet mode finds its interface.
    pub ips: Vec<std::net::IpAddr>,
    pub host_network: bool,
}

/// A Namespace's `lb.dev/mode` annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub name: Arc<str>,
    pub mode: Option<Arc<str>>,
}

fn annotation<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

impl PodSpec {
    /// `None` for a pod that no longer runs (Succeeded, Failed): its cgroup is gone.
    pub fn from_k8s(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let spec = pod.spec.as_ref();
        let containers = spec.into_iter().flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        });
        let mut detected = None;
        for container in containers {
            detected = detected.or(match container.name.as_str() {
                ISTIO_PROXY_CONTAINER => Some("an istio-proxy container"),
                LINKERD_PROXY_CONTAINER => Some("a linkerd-proxy container"),
                _ => None,
            });
        }
        if annotation(meta, ISTIO_STATUS_ANNOTATION).is_some() {
            detected = detected.or(Some("Istio's sidecar.istio.io/status annotation"));
        }
        if annotation(meta, LINKERD_PROXY_ANNOTATION).is_some() {
            detected = detected.or(Some("Linkerd's linkerd.io/proxy-version annotation"));
        }
        let launcher = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(KUBEVIRT_LABEL))
            .is_some_and(|v| v == KUBEVIRT_LAUNCHER);
        if launcher {
            detected = detected.or(Some("a KubeVirt virt-launcher pod"));
        }
        let ips = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        Some(Self {
            id: ObjectRef::new(
                meta.namespace.clone().unwrap_or_else(|| "default".into()),
                meta.name.clone().unwrap_or_default(),
            ),
            uid: meta.uid.as_deref().map(Arc::from),
            node: spec.and_then(|s| s.node_name.as_deref()).map(Arc::from),
            mode: annotation(meta, MODE_ANNOTATION).map(Arc::from),
            detected,
            runtime_class: spec
                .and_then(|s| s.runtime_class_name.as_deref())
                .map(Arc::from),
            cgroup: annotation(meta, CGROUP_ANNOTATION).map(PathBuf::from),
            ips,
            host_network: spec.and_then(|s| s.host_network) == Some(true),
        })
    }
}

impl NamespaceSpec {
    pub fn from_k8s(namespace: &Namespace) -> Self {
        Self {
            name: Arc::from(namespace.metadata.name.as_deref().unwrap_or_default()),
            mode: annotation(&namespace.metadata, MODE_ANNOTATION).map(Arc::from),
        }
    }
}

/// The rules after the annotations (`lb daemon --workload-detection`,
/// `--packet-runtime-classes`, `--default-workload-mode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    /// Sidecar meshes and KubeVirt launchers get `packet`.
    pub enabled: bool,
    /// Pods of these runtime classes (Kata, gVisor) get `packet`.
    pub packet_runtime_classes: Vec<String>,
    /// What every other pod gets; hostNetwork pods (no interface of their own, and
    /// often the node's agents, lb's own among them) keep `socket` unless annotated.
    pub default_mode: Mode,
}

impl Default for Detection {
    fn default() -> Self {
        Self {
            enabled: true,
            packet_runtime_classes: Vec::new(),
            default_mode: Mode::Socket,
        }
    }
}

/// A pod's mode and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub mode: Mode,
    pub why: String,
    /// An annotation that named no mode, reported by the caller (and skipped).
    pub problems: Vec<String>,
}

/// Decides `pod`'s mode; `namespace_mode` is its Namespace's annotation.
pub fn decide(pod: &PodSpec, namespace_mode: Option<&str>, detection: &Detection) -> Decision {
    let mut problems = Vec::new();
    let mut parse = |value: Option<&str>, whose: String| match value.map(str::parse::<Mode>) {
        Some(Ok(mode)) => Some((mode, format!("{whose} annotation {MODE_ANNOTATION}"))),
        Some(Err(err)) => {
            problems.push(format!(
                "{whose} annotation {MODE_ANNOTATION}: {err}; ignored"
            ));
            None
        }
        None => None,
    };
    let chosen = parse(pod.mode.as_deref(), format!("Pod {}'s", pod.id))
        .or_else(|| parse(namespace_mode, format!("Namespace {}'s", pod.id.namespace)))
        .or_else(|| {
            if !detection.enabled {
                return None;
            }
            if let Some(why) = pod.detected {
                return Some((Mode::Packet, format!("detected: {why}")));
            }
            let class = pod.runtime_class.as_deref()?;
            detection
                .packet_runtime_classes
                .iter()
                .any(|c| c == class)
                .then(|| {
                    (
                        Mode::Packet,
                        format!("detected: runtime class {class} (--packet-runtime-classes)"),
                    )
                })
        });
    let (mode, why) = chosen.unwrap_or_else(|| match detection.default_mode {
        Mode::Socket => (Mode::Socket, "default".into()),
        _ if pod.host_network => (Mode::Socket, "default (hostNetwork)".into()),
        mode => (mode, "--default-workload-mode".into()),
    });
    Decision {
        mode,
        why,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> PodSpec {
        let pod: Pod = serde_saphyr::from_str(yaml).unwrap();
        PodSpec::from_k8s(&pod).unwrap()
    }

    const PLAIN: &str = "metadata: {name: app, namespace: shop, uid: u1}\n\
        spec: {containers: [{name: app, image: redis}]}\n";

    #[test]
    fn pods_default_to_socket() {
        let d = decide(&pod(PLAIN), None, &Detection::default());
        assert_eq!((d.mode, d.why.as_str()), (Mode::Socket, "default"));
        assert!(d.problems.is_empty());
    }

    #[test]
    fn the_pod_annotation_beats_the_namespace_which_beats_detection() {
        let sidecar = pod(
            "metadata: {name: app, namespace: shop, annotations: {lb.dev/mode: 'off'}}\n\
             spec: {containers: [{name: app}, {name: istio-proxy}]}\n",
        );
        let d = decide(&sidecar, Some("socket"), &Detection::default());
        assert_eq!(d.mode, Mode::Off);
        assert_eq!(d.why, "Pod shop/app's annotation lb.dev/mode");
        let unannotated = PodSpec {
            mode: None,
            ..sidecar.clone()
        };
        let d = decide(&unannotated, Some("socket"), &Detection::default());
        assert_eq!(d.mode, Mode::Socket);
        assert_eq!(d.why, "Namespace shop's annotation lb.dev/mode");
        let d = decide(&unannotated, None, &Detection::default());
        assert_eq!(d.mode, Mode::Packet);
        assert_eq!(d.why, "detected: an istio-proxy container");
    }

    #[test]
    fn sidecars_launchers_and_listed_runtime_classes_are_detected_unless_turned_off() {
        let cases = [
            (
                "metadata: {name: a, annotations: {sidecar.istio.io/status: '{}'}}\nspec: {containers: [{name: app}]}\n",
                "Istio's sidecar.istio.io/status annotation",
            ),
            (
                "metadata: {name: a}\nspec: {containers: [{name: app}], initContainers: [{name: linkerd-proxy, restartPolicy: Always}]}\n",
                "a linkerd-proxy container",
            ),
            (
                "metadata: {name: a, labels: {kubevirt.io: virt-launcher}}\nspec: {containers: [{name: compute}]}\n",
                "a KubeVirt virt-launcher pod",
            ),
        ];
        for (yaml, why) in cases {
            let d = decide(&pod(yaml), None, &Detection::default());
            assert_eq!(d.mode, Mode::Packet, "{yaml}");
            assert_eq!(d.why, format!("detected: {why}"));
            let off = Detection {
                enabled: false,
                ..Detection::default()
            };
            assert_eq!(decide(&pod(yaml), None, &off).mode, Mode::Socket);
        }
        let kata = pod(
            "metadata: {name: vm}\nspec: {runtimeClassName: kata, containers: [{name: app}]}\n",
        );
        assert_eq!(
            decide(&kata, None, &Detection::default()).mode,
            Mode::Socket
        );
        let listed = Detection {
            packet_runtime_classes: vec!["gvisor".into(), "kata".into()],
            ..Detection::default()
        };
        let d = decide(&kata, None, &listed);
        assert_eq!(d.mode, Mode::Packet);
        assert_eq!(
            d.why,
            "detected: runtime class kata (--packet-runtime-classes)"
        );
    }

    #[test]
    fn the_default_mode_applies_last_and_never_to_host_network_pods() {
        let packet = Detection {
            default_mode: Mode::Packet,
            ..Detection::default()
        };
        let d = decide(&pod(PLAIN), None, &packet);
        assert_eq!(
            (d.mode, d.why.as_str()),
            (Mode::Packet, "--default-workload-mode")
        );
        let d = decide(&pod(PLAIN), Some("socket"), &packet);
        assert_eq!(d.mode, Mode::Socket, "a Namespace says otherwise");
        let host =
            pod("metadata: {name: agent}\nspec: {hostNetwork: true, containers: [{name: a}]}\n");
        let d = decide(&host, None, &packet);
        assert_eq!(
            (d.mode, d.why.as_str()),
            (Mode::Socket, "default (hostNetwork)")
        );
    }

    #[test]
    fn an_annotation_that_names_no_mode_is_reported_and_the_next_rule_decides() {
        let p = pod(
            "metadata: {name: app, namespace: shop, annotations: {lb.dev/mode: sockets}}\n\
             spec: {containers: [{name: app}]}\n",
        );
        let d = decide(&p, Some("off"), &Detection::default());
        assert_eq!(d.mode, Mode::Off);
        assert_eq!(
            d.problems,
            vec![
                "Pod shop/app's annotation lb.dev/mode: \"sockets\" is not a load-balancing mode \
                 (socket, packet or off); ignored"
            ]
        );
        let d = decide(&p, Some("bogus"), &Detection::default());
        assert_eq!(d.mode, Mode::Socket);
        assert_eq!(d.problems.len(), 2);
    }

    #[test]
    fn finished_pods_are_not_workloads_and_addresses_and_cgroups_are_kept() {
        let done: Pod = serde_saphyr::from_str(
            "metadata: {name: job}\nspec: {containers: [{name: a}]}\nstatus: {phase: Succeeded}\n",
        )
        .unwrap();
        assert_eq!(PodSpec::from_k8s(&done), None);
        let p = pod(
            "metadata: {name: a, uid: abc, annotations: {lb.dev/cgroup: /sys/fs/cgroup/x}}\n\
             spec: {hostNetwork: true, containers: [{name: a}]}\n\
             status: {phase: Running, podIPs: [{ip: 10.0.0.5}, {ip: 'fd00::5'}]}\n",
        );
        assert_eq!(p.id, ObjectRef::new("default", "a"));
        assert_eq!(p.uid.as_deref(), Some("abc"));
        assert_eq!(p.cgroup, Some(PathBuf::from("/sys/fs/cgroup/x")));
        assert_eq!(p.ips.len(), 2);
        assert!(p.host_network);
        for mode in Mode::ALL {
            assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
            assert_eq!(Mode::from_map_value(mode.map_value()), Some(mode));
        }
    }
}
