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
    /// Connections open across all health-check ports: past this a new one is closed
    /// at once, so load balancers' probes (or anyone's) cannot exhaust the daemon.
    slots: Arc<tokio::sync::Semaphore>,
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
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
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
        let listener = {
            let _netns = NetnsGuard::enter(self.netns.as_deref())?;
            // [::] takes IPv4 too (IPV6_V6ONLY is off by default).
            std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?
        };
        listener.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(check.clone()));
        let served = state.clone();
        let slots = self.slots.clone();
        let _enter = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let task = self.runtime.spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    // Out of file descriptors, say: retry without spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Full: closed unanswered (dropping it).
                    continue;
                };
                let answer = response(&served.lock().expect("health state lock"));
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
                        // The request itself does not matter (any path, any method).
                        let mut request = [0u8; 1024];
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(2),
                            stream.read(&mut request),
                        )
                        .await;
                        let _ = stream.write_all(answer.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    })
                    .await;
                });
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
    fn connections_past_the_cap_are_closed_and_the_port_keeps_answering() {
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
        // Idle connections (no request): each holds a slot for the read timeout.
        let idle: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(500));
        // A full request: without the cap it would be answered at once.
        let mut extra = std::net::TcpStream::connect(addr).unwrap();
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\n\r\n");
        extra
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut got = Vec::new();
        let _ = extra.read_to_end(&mut got);
        assert!(got.is_empty(), "answered past the cap: {got:?}");
        // Once the idle ones time out, the port answers again.
        std::thread::sleep(std::time::Duration::from_secs(3));
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        probe.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        probe.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        drop(idle);
    }
}
