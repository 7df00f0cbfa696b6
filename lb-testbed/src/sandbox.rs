//! The demo sandbox of `cargo xtask run`: exactly the pods the bundled `examples/`
//! manifests describe, with real servers in them.

use anyhow::Result;

use crate::{Pod, Testbed};

/// redis-master replicas: (pod name, host part of 10.244.1.x).
pub const REDIS_PODS: [(&str, u8); 3] = [
    ("redis-master-1", 11),
    ("redis-master-2", 12),
    ("redis-master-3", 13),
];
/// The web pod that plays the seed's flask app: the client.
pub const CLIENT_POD: (&str, u8) = ("web", 100);
/// ClusterIP of `redis-master-sr` in examples/redis-master.yaml.
pub const REDIS_CLUSTER_IP: &str = "10.99.187.220";

pub struct Sandbox {
    pub testbed: Testbed,
    pub client: Pod,
    pub redis: Vec<Pod>,
}

impl Sandbox {
    /// Creates the pods and starts their servers (each redis answers `GET whoami` with
    /// its pod name).
    pub fn start() -> Result<Self> {
        let mut testbed = Testbed::new()?;
        let mut redis = Vec::new();
        for (name, host) in REDIS_PODS {
            let pod = testbed.add_pod(name, host)?;
            testbed.start_redis(&pod, 6379)?;
            redis.push(pod);
        }
        let client = testbed.add_pod(CLIENT_POD.0, CLIENT_POD.1)?;
        Ok(Self {
            testbed,
            client,
            redis,
        })
    }
}
