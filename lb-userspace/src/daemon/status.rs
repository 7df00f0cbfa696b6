//! What the daemon knows beyond the kernel maps (excluded endpoints and why,
//! frontends that did not fit, policies), served as JSON on a Unix socket next to the
//! pin directory's name, so `lb list` can show the whole picture. Kept up to date
//! incrementally: a sync touches only the frontends it changed.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tracing::{debug, info};

use crate::{
    datapath::{KernelFeatures, TcDevice},
    model::{Frontend, FrontendKey},
    reconcile::Shortage,
};

/// The status socket of the daemon that owns `pin_dir`.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from("/run/lb").join(format!("{name}.sock"))
}

#[derive(Debug, Default)]
pub struct Board {
    frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
    unprogrammed: BTreeMap<FrontendKey, String>,
    ready: bool,
    features: Option<KernelFeatures>,
    tc_devices: Vec<TcDevice>,
    unserved: Vec<UnservedService>,
    workloads: Vec<super::workloads::WorkloadStatus>,
}

/// Something a Service asks that this node cannot serve, and why.
#[derive(Debug, Clone, Serialize)]
pub struct UnservedService {
    pub service: String,
    pub why: String,
}

/// The daemon's side of `lb list`.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<Board>>,
    node: String,
    source: String,
}

#[derive(Debug, Serialize)]
pub struct ExcludedEndpoint {
    pub address: String,
    pub port: u16,
    pub reason: crate::model::Exclusion,
}

/// One frontend as the daemon sees it (joined with the kernel's view by `lb list`).
#[derive(Debug, Serialize)]
pub struct FrontendStatus {
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub scope: crate::model::Scope,
    pub service: String,
    pub kind: crate::model::FrontendKind,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// "Cluster" or "Local".
    pub policy: &'static str,
    pub topology: crate::model::Topology,
    pub excluded: Vec<ExcludedEndpoint>,
    /// Why the kernel does not hold (this version of) the frontend, if it does not.
    pub not_programmed: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pid: u32,
    pub node: String,
    pub source: String,
    pub ready: bool,
    /// The optional kernel features and what is used of each.
    pub kernel: Option<KernelFeatures>,
    /// Interfaces for traffic from other machines: how their TC programs are
    /// attached, or why not.
    pub tc_devices: Vec<TcDevice>,
    pub frontends: Vec<FrontendStatus>,
    pub unserved: Vec<UnservedService>,
    /// This node's pods not in `socket` mode.
    pub workloads: Vec<super::workloads::WorkloadStatus>,
}

impl StatusBoard {
    pub fn new(node: &str, source: &str) -> Self {
        Self {
            inner: Arc::default(),
            node: node.into(),
            source: source.into(),
        }
    }

    /// Records a sync's frontend changes and what still does not fit.
    pub fn update<'a>(
        &self,
        changes: impl IntoIterator<Item = (&'a FrontendKey, &'a Option<Arc<Frontend>>)>,
        unprogrammed: &BTreeMap<FrontendKey, (Arc<Frontend>, Shortage)>,
    ) {
        let mut board = self.inner.lock().expect("lock");
        for (key, change) in changes {
            match change {
                Some(frontend) => {
                    board.frontends.insert(*key, frontend.clone());
                }
                None => {
                    board.frontends.remove(key);
                }
            }
        }
        board.unprogrammed = unprogrammed
            .iter()
            .map(|(key, (_, shortage))| (*key, shortage.to_string()))
            .collect();
    }

    /// Replaces everything (after a full sync).
    pub fn reset(
        &self,
        everything: &BTreeMap<FrontendKey, Option<Arc<Frontend>>>,
        unprogrammed: &BTreeMap<FrontendKey, (Arc<Frontend>, Shortage)>,
    ) {
        self.inner.lock().expect("lock").frontends.clear();
        self.update(everything, unprogrammed);
    }

    pub fn set_features(&self, features: KernelFeatures) {
        self.inner.lock().expect("lock").features = Some(features);
    }

    pub fn set_workloads(&self, workloads: Vec<super::workloads::WorkloadStatus>) {
        self.inner.lock().expect("lock").workloads = workloads;
    }

    pub fn set_tc_devices(&self, devices: &[TcDevice]) {
        self.inner.lock().expect("lock").tc_devices = devices.to_vec();
    }

    pub fn set_unserved(&self, unserved: &BTreeMap<crate::model::ObjectRef, String>) {
        self.inner.lock().expect("lock").unserved = unserved
            .iter()
            .map(|(service, why)| UnservedService {
                service: service.to_string(),
                why: why.clone(),
            })
            .collect();
    }

    pub fn set_ready(&self) {
        self.inner.lock().expect("lock").ready = true;
    }

    pub fn status(&self) -> Status {
        let board = self.inner.lock().expect("lock");
        let frontends = board
            .frontends
            .values()
            .map(|f| FrontendStatus {
                address: f.key.ip.to_string(),
                port: f.key.port,
                protocol: f.key.protocol.to_string(),
                scope: f.key.scope,
                service: crate::reconcile::frontend_name(f),
                kind: f.kind,
                affinity_timeout: f.affinity_timeout,
                policy: if f.local_policy { "Local" } else { "Cluster" },
                topology: f.topology,
                excluded: f
                    .excluded
                    .iter()
                    .map(|(addr, reason)| ExcludedEndpoint {
                        address: addr.ip.to_string(),
                        port: addr.port,
                        reason: *reason,
                    })
                    .collect(),
                not_programmed: board.unprogrammed.get(&f.key).cloned(),
            })
            .collect();
        Status {
            pid: std::process::id(),
            node: self.node.clone(),
            source: self.source.clone(),
            ready: board.ready,
            kernel: board.features.clone(),
            tc_devices: board.tc_devices.clone(),
            frontends,
            unserved: board.unserved.clone(),
            workloads: board.workloads.clone(),
        }
    }
}

/// Serves the board on the pin directory's status socket until the process ends.
pub async fn serve(pin_dir: &Path, board: StatusBoard) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = socket_path(pin_dir);
    let dir = path.parent().expect("/run/lb");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    // This daemon holds the pin directory's lock: a socket file left there is stale.
    let _ = std::fs::remove_file(&path);
    remove_stale(dir);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding status socket {}", path.display()))?;
    info!(socket = %path.display(), "status socket listening (lb list reads it)");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: retry without spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let board = board.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    let body = serde_json::to_vec(&board.status()).unwrap_or_default();
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("Content-Type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .expect("static parts"),
                        )
                    }
                });
                if let Err(err) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("status connection: {err}");
                }
            });
        }
    });
    Ok(path)
}

/// Removes this daemon's status socket (on exit).
pub fn remove(pin_dir: &Path) {
    let _ = std::fs::remove_file(socket_path(pin_dir));
}

/// Removes sockets in `dir` that nobody listens on any more (daemons that were
/// killed), so the directory does not collect them.
fn remove_stale(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "sock")
            && std::os::unix::net::UnixStream::connect(&path)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            debug!(socket = %path.display(), "removing a stale status socket");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// `lb list`'s client: the status of the daemon owning `pin_dir`, if one answers.
pub fn fetch(pin_dir: &Path) -> Option<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket_path(pin_dir)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    stream
        .write_all(b"GET /status HTTP/1.0\r\nHost: lb\r\n\r\n")
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_follow_the_pin_directory() {
        assert_eq!(
            socket_path(Path::new("/sys/fs/bpf/lb")),
            PathBuf::from("/run/lb/sys_fs_bpf_lb.sock")
        );
        assert_ne!(
            socket_path(Path::new("/sys/fs/bpf/a-b")),
            socket_path(Path::new("/sys/fs/bpf/a_c"))
        );
    }
}
