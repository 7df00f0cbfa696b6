//! The service health server of `externalTrafficPolicy: Local` Services, as kube-proxy
//! serves it: on each Service's `healthCheckNodePort`, any path answers JSON with the
//! count of the Service's ready endpoints on this node, 200 when there is at least one
//! and 503 otherwise, so a cloud load balancer sends traffic only to nodes that can
//! serve it without a second hop.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use super::slots::Slots;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    runtime::Handle,
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    datapath::netns::NetnsGuard,
    model::{HealthCheck, ObjectRef},
};

struct Server {
    state: Arc<Mutex<HealthCheck>>,
    task: JoinHandle<()>,
}

/// The health servers of the current Services, one per health-check node port.
pub struct HealthCheckServers {
    runtime: Handle,
    netns: Option<PathBuf>,
    servers: BTreeMap<u16, Server>,
    /// Ports that could not be bound, reported once each.
    failed: BTreeMap<u16, ObjectRef>,
    /// Connections open across all health-check ports: past this the oldest idle one is
    /// closed for the new one ([`super::slots`]), so a flood (anyone's) can neither
    /// exhaust the daemon nor lock the load balancers' probes out.
    slots: Arc<Slots>,
}

/// Connections all health-check node ports hold at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A health-check exchange (read the request, answer, close) ends within this.
const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl HealthCheckServers {
    pub fn new(runtime: Handle, netns: Option<PathBuf>) -> Self {
        Self {
            runtime,
            netns,
            servers: BTreeMap::new(),
            failed: BTreeMap::new(),
            slots: Slots::new(MAX_CONNECTIONS),
        }
    }

    /// Starts, updates and stops servers to match `wanted`. Must run on a thread that
    /// may enter `--netns` (the sync thread).
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                info!(port, "health-check node port closed");
            }
            keep
        });
        self.failed.retain(|port, _| wanted.contains_key(port));
        for (port, check) in wanted {
            if let Some(server) = self.servers.get(port) {
                let mut state = server.state.lock().expect("health state lock");
                if state.local_endpoints != check.local_endpoints || state.service != check.service
                {
                    *state = check.clone();
                }
                continue;
            }
            match self.start(*port, check) {
                Ok(server) => {
                    info!(port, service = %check.service, local_endpoints = check.local_endpoints, "health-check node port serving");
                    self.failed.remove(port);
                    self.servers.insert(*port, server);
                }
                Err(err) => {
                    if self.failed.insert(*port, check.service.clone()).is_none() {
                        warn!(port, service = %check.service, "Service {}: healthCheckNodePort {port} cannot be served: {err:#}; retried on the next change", check.service);
                    }
                }
            }
        }
    }

    fn start(&self, port: u16, check: &HealthCheck) -> anyhow::Result<Server> {
        let _enter = self.runtime.enter();
        let listener = {
            let _netns = NetnsGuard::enter(self.netns.as_deref())?;
            // [::] takes IPv4 too (IPV6_V6ONLY is off by default).
            super::http::listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?
        };
        let state = Arc::new(Mutex::new(check.clone()));
        let served = state.clone();
        let slots = self.slots.clone();
        let task = self.runtime.spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    // Out of file descriptors, say: retry without spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let Some(mut slot) = slots.admit() else {
                    // Every connection is being answered: closed unanswered (dropped).
                    continue;
                };
                slot.room().await;
                let slot_id = slot.id();
                let answer = response(&served.lock().expect("health state lock"));
                let task = tokio::spawn(async move {
                    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
                        // The request itself does not matter (any path, any method).
                        let mut request = [0u8; 1024];
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(2),
                            stream.read(&mut request),
                        )
                        .await;
                        let _busy = slot.busy();
                        let _ = stream.write_all(answer.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    })
                    .await;
                });
                slots.attach(slot_id, task.abort_handle());
            }
        });
        Ok(Server { state, task })
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

/// kube-proxy's answer: `{"service":{...},"localEndpoints":N,"serviceProxyHealthy":true}`.
fn response(check: &HealthCheck) -> String {
    let body = serde_json::json!({
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if check.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let mut check = HealthCheck {
            service: ObjectRef {
                namespace: "web".into(),
                name: "shop".into(),
            },
            local_endpoints: 2,
        };
        let ok = response(&check);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with(
            r#"{"localEndpoints":2,"service":{"name":"shop","namespace":"web"},"serviceProxyHealthy":true}"#
        ), "{ok}");
        check.local_endpoints = 0;
        assert!(response(&check).starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }

    #[test]
    fn a_probe_past_the_cap_is_answered_and_the_oldest_idle_connection_closed() {
        use std::io::{Read as _, Write as _};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let port = std::net::TcpListener::bind("[::]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut servers = HealthCheckServers::new(runtime.handle().clone(), None);
        let check = HealthCheck {
            service: ObjectRef::new("web", "shop"),
            local_endpoints: 1,
        };
        servers.sync(&BTreeMap::from([(port, check)]));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Idle connections (no request): together they take every slot.
        let mut idle: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(500));
        // A probe is answered at once all the same...
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        probe.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        probe
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        // ... because the oldest idle connection was closed for it.
        let mut byte = [0u8; 1];
        idle[0]
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        assert_eq!(idle[0].read(&mut byte).unwrap_or(usize::MAX), 0);
        let newest = idle.last_mut().unwrap();
        newest
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        assert!(
            newest.read(&mut byte).is_err(),
            "the newest idle one is open"
        );
        drop(idle);
    }
}
