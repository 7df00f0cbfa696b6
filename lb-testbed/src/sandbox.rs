//! The demo sandbox of `cargo xtask run`: exactly the pods the bundled `examples/manifests/`
//! manifests describe, with real servers in them.

use std::net::IpAddr;

use anyhow::Result;

use crate::{Pod, Testbed};

/// redis-master replicas: (pod name, host part of 10.244.1.x).
pub const REDIS_PODS: [(&str, u8); 3] = [
    ("redis-master-1", 11),
    ("redis-master-2", 12),
    ("redis-master-3", 13),
];
/// CoreDNS stand-ins (dnsmasq) behind kube-dns.
pub const DNS_PODS: [(&str, u8); 2] = [("coredns-1", 21), ("coredns-2", 22)];
/// test-svc's pods: (name, host, port they serve `web-port` on).
pub const WEB_PODS: [(&str, u8, u16); 2] = [("lab-web-a", 31, 8080), ("lab-web-b", 32, 9090)];
/// The web pod that plays the seed's flask app: the client.
pub const CLIENT_POD: (&str, u8) = ("web", 100);
/// ClusterIP of `redis-master-sr` in examples/manifests/redis-master.yaml.
pub const REDIS_CLUSTER_IP: &str = "10.99.187.220";
/// ClusterIPs of kube-dns in examples/manifests/kube-dns.yaml.
pub const DNS_CLUSTER_IP: &str = "10.96.0.10";
pub const DNS_CLUSTER_IP_V6: &str = "fd00:96::a";
/// ClusterIP of test-svc in examples/manifests/test-svc.yaml.
pub const TEST_SVC_CLUSTER_IP: &str = "10.107.169.79";

/// Names the sandbox's DNS resolves, like cluster DNS would.
pub const DNS_RECORDS: [(&str, &str); 3] = [
    (
        "redis-master-sr.default.svc.cluster.local",
        REDIS_CLUSTER_IP,
    ),
    ("kube-dns.kube-system.svc.cluster.local", DNS_CLUSTER_IP),
    ("test-svc.default.svc.cluster.local", TEST_SVC_CLUSTER_IP),
];

pub struct Sandbox {
    pub testbed: Testbed,
    pub client: Pod,
    pub redis: Vec<Pod>,
    pub dns: Vec<Pod>,
    pub web: Vec<Pod>,
}

impl Sandbox {
    /// Creates the pods and starts their servers: redis (answering `GET whoami` with
    /// its pod name), dnsmasq (plus a metrics page on 9153) and HTTP servers.
    pub fn start() -> Result<Self> {
        let mut testbed = Testbed::new()?;
        let mut redis = Vec::new();
        for (name, host) in REDIS_PODS {
            let pod = testbed.add_pod(name, host)?;
            testbed.start_redis(&pod, 6379)?;
            redis.push(pod);
        }
        let records: Vec<(&str, IpAddr)> = DNS_RECORDS
            .iter()
            .map(|(name, ip)| Ok((*name, ip.parse()?)))
            .collect::<Result<_>>()?;
        let mut dns = Vec::new();
        for (name, host) in DNS_PODS {
            let pod = testbed.add_pod(name, host)?;
            testbed.start_dnsmasq(&pod, &records)?;
            testbed.start_http(&pod, 9153, &format!("# {name} metrics\n"))?;
            dns.push(pod);
        }
        let mut web = Vec::new();
        for (name, host, port) in WEB_PODS {
            let pod = testbed.add_pod(name, host)?;
            testbed.start_http(&pod, port, name)?;
            web.push(pod);
        }
        let client = testbed.add_pod(CLIENT_POD.0, CLIENT_POD.1)?;
        Ok(Self {
            testbed,
            client,
            redis,
            dns,
            web,
        })
    }
}
