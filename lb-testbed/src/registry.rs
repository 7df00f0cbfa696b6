//! A pull-only container registry for images written here ([`crate::image`]), so that
//! manifests run verbatim: `image: redis` (tag `latest`, pull policy `Always`) makes
//! the kubelet pull, and with no registry reachable from this machine the pull must
//! be answered here. Real nodes' containerd lists it as the mirror of every registry
//! host it serves (`docker.io`, ...).
//!
//! It speaks the part of the OCI distribution API a pull uses (`/v2/`, manifests by
//! tag or digest, blobs by digest; GET and HEAD), serves OCI manifests with one
//! uncompressed layer, and records every manifest request, so tests can tell a pull
//! from the use of an image already present.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::image::Image;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// An image name split as registries see it: `redis` is `docker.io`,
/// `library/redis`, `latest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub host: String,
    pub repository: String,
    pub tag: String,
}

impl Reference {
    /// Docker's normalisation: a first component with a dot or a colon (or
    /// `localhost`) is a registry host, else the host is `docker.io`, where one-part
    /// names live under `library/`; the tag defaults to `latest`.
    pub fn parse(name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('@') || name.chars().any(char::is_whitespace) {
            bail!("image name {name:?}: expected [host/]repository[:tag]");
        }
        let (host, rest) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => {
                (repository.to_string(), tag.to_string())
            }
            _ => (rest, "latest".to_string()),
        };
        let repository = if host == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() || tag.is_empty() {
            bail!("image name {name:?}: expected [host/]repository[:tag]");
        }
        Ok(Self {
            host,
            repository,
            tag,
        })
    }
}

/// A manifest and its digest.
type Manifest = (String, Arc<Vec<u8>>);

/// What the registry holds: manifests by (repository, tag or digest) and blobs by
/// digest.
#[derive(Default)]
struct Store {
    manifests: HashMap<(String, String), Manifest>,
    blobs: HashMap<String, Arc<Vec<u8>>>,
}

pub struct Registry {
    address: SocketAddr,
    hosts: Vec<String>,
    pulls: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Registry {
    /// Serves `images` on `ip` (any free port). The address need not exist yet (a
    /// node's link may bring it later): the socket is bound with `IP_FREEBIND`.
    pub fn start(ip: Ipv4Addr, images: &[Image]) -> Result<Self> {
        let mut store = Store::default();
        let mut hosts = Vec::new();
        for image in images {
            let reference = Reference::parse(&image.name)?;
            let (layer, config) = image.layer_and_config()?;
            let blob = |bytes: Vec<u8>| {
                (
                    format!("sha256:{}", crate::image::sha256_hex(&bytes)),
                    bytes,
                )
            };
            let (layer_digest, layer) = blob(layer);
            let (config_digest, config) = blob(config);
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len()},
                "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": layer.len()}],
            }))?;
            let (manifest_digest, manifest) = blob(manifest);
            let manifest = Arc::new(manifest);
            for key in [reference.tag.clone(), manifest_digest.clone()] {
                store.manifests.insert(
                    (reference.repository.clone(), key),
                    (manifest_digest.clone(), manifest.clone()),
                );
            }
            store.blobs.insert(layer_digest, Arc::new(layer));
            store.blobs.insert(config_digest, Arc::new(config));
            if !hosts.contains(&reference.host) {
                hosts.push(reference.host);
            }
        }
        let listener = listen_freebind(ip)?;
        let address = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let store = Arc::new(store);
        let pulls = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pulls, stop) = (pulls.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (store, pulls) = (store.clone(), pulls.clone());
                            thread::spawn(move || {
                                let _ = serve(stream, &store, &pulls);
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        };
        Ok(Self {
            address,
            hosts,
            pulls,
            stop,
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// (registry host, endpoint) for each host whose images are served here: what a
    /// containerd configuration lists as mirrors.
    pub fn mirrors(&self) -> Vec<(String, String)> {
        self.hosts
            .iter()
            .map(|host| (host.clone(), format!("http://{}", self.address)))
            .collect()
    }

    /// Every manifest request so far, as `repository:reference`.
    pub fn pulls(&self) -> Vec<String> {
        self.pulls.lock().expect("lock").clone()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn listen_freebind(ip: Ipv4Addr) -> Result<TcpListener> {
    // SAFETY: plain socket calls on a descriptor owned here until TcpListener takes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket");
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let set = |level, name| {
            libc::setsockopt(
                fd,
                level,
                name,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set(libc::SOL_IP, libc::IP_FREEBIND) != 0 {
            return Err(std::io::Error::last_os_error()).context("IP_FREEBIND");
        }
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
            || libc::listen(fd, 128) != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("listening on {ip}"));
        }
        Ok(listener)
    }
}

/// One request per connection (`Connection: close`).
fn serve(mut stream: TcpStream, store: &Store, pulls: &Mutex<Vec<String>>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (
        request_line.next().unwrap_or(""),
        request_line.next().unwrap_or(""),
    );
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, digest, body) = route(method, path, store, pulls);
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Docker-Distribution-API-Version: registry/2.0\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(digest) = digest {
        response.push_str(&format!("Docker-Content-Digest: {digest}\r\n"));
    }
    response.push_str("\r\n");
    stream.write_all(response.as_bytes())?;
    if method == "GET" {
        stream.write_all(&body)?;
    }
    Ok(())
}

type Response = (&'static str, &'static str, Option<String>, Arc<Vec<u8>>);

fn route(method: &str, path: &str, store: &Store, pulls: &Mutex<Vec<String>>) -> Response {
    let not_found = |code: &str| -> Response {
        let body = format!(r#"{{"errors":[{{"code":"{code}","message":"not served here"}}]}}"#);
        (
            "404 Not Found",
            "application/json",
            None,
            Arc::new(body.into_bytes()),
        )
    };
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "application/json",
            None,
            Arc::new(br#"{"errors":[{"code":"UNSUPPORTED","message":"pull only"}]}"#.to_vec()),
        );
    }
    if path == "/v2/" || path == "/v2" {
        return ("200 OK", "application/json", None, Arc::new(b"{}".to_vec()));
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return not_found("NAME_UNKNOWN");
    };
    if let Some((repository, reference)) = rest.rsplit_once("/manifests/") {
        pulls
            .lock()
            .expect("lock")
            .push(format!("{repository}:{reference}"));
        return match store
            .manifests
            .get(&(repository.to_string(), reference.to_string()))
        {
            Some((digest, manifest)) => (
                "200 OK",
                MANIFEST_TYPE,
                Some(digest.clone()),
                manifest.clone(),
            ),
            None => not_found("MANIFEST_UNKNOWN"),
        };
    }
    if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        return match store.blobs.get(digest) {
            Some(blob) => (
                "200 OK",
                "application/octet-stream",
                Some(digest.to_string()),
                blob.clone(),
            ),
            None => not_found("BLOB_UNKNOWN"),
        };
    }
    not_found("NAME_UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_as_docker_does() {
        let cases = [
            ("redis", "docker.io", "library/redis", "latest"),
            ("redis:7", "docker.io", "library/redis", "7"),
            ("bitnami/redis", "docker.io", "bitnami/redis", "latest"),
            (
                "registry.k8s.io/e2e-test-images/agnhost:2.63.0",
                "registry.k8s.io",
                "e2e-test-images/agnhost",
                "2.63.0",
            ),
            ("localhost:5000/tool", "localhost:5000", "tool", "latest"),
            (
                "docker.io/library/redis:latest",
                "docker.io",
                "library/redis",
                "latest",
            ),
        ];
        for (name, host, repository, tag) in cases {
            assert_eq!(
                Reference::parse(name).unwrap(),
                Reference {
                    host: host.into(),
                    repository: repository.into(),
                    tag: tag.into()
                },
                "{name}"
            );
        }
        for bad in ["", "redis@sha256:00", "a b", "host.io/:tag"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A pull as containerd makes it, over a real socket on loopback: the manifest by
    /// tag (HEAD, then GET by the digest it names), then each blob, every digest
    /// matching its bytes.
    #[test]
    fn serves_a_pull_whose_digests_check_out() {
        let mut image = Image::new("redis");
        image.add_bytes("/etc/motd", "hello\n", 0o644);
        let registry = Registry::start(Ipv4Addr::LOCALHOST, &[image]).unwrap();
        assert_eq!(
            registry.mirrors(),
            vec![(
                "docker.io".to_string(),
                format!("http://{}", registry.address())
            )]
        );
        let request = |method: &str, path: &str| -> (String, Vec<u8>) {
            let mut stream = TcpStream::connect(registry.address()).unwrap();
            write!(stream, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).unwrap();
            let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            (
                String::from_utf8_lossy(&response[..split]).into_owned(),
                response[split + 4..].to_vec(),
            )
        };
        let header = |head: &str, name: &str| -> String {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_default()
                .to_string()
        };
        let (head, body) = request("HEAD", "/v2/library/redis/manifests/latest?ns=docker.io");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.is_empty());
        let digest = header(&head, "Docker-Content-Digest");
        let (head, manifest) = request("GET", &format!("/v2/library/redis/manifests/{digest}"));
        assert_eq!(header(&head, "Content-Type"), MANIFEST_TYPE);
        assert_eq!(
            format!("sha256:{}", crate::image::sha256_hex(&manifest)),
            digest
        );
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        for blob in [&manifest["config"], &manifest["layers"][0]] {
            let digest = blob["digest"].as_str().unwrap();
            let (head, bytes) = request("GET", &format!("/v2/library/redis/blobs/{digest}"));
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(bytes.len() as u64, blob["size"].as_u64().unwrap());
            assert_eq!(
                format!("sha256:{}", crate::image::sha256_hex(&bytes)),
                digest
            );
        }
        let (head, _) = request("GET", "/v2/library/nginx/manifests/latest");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        let (head, _) = request("PUT", "/v2/library/redis/manifests/latest");
        assert!(head.starts_with("HTTP/1.1 405"), "{head}");
        assert_eq!(
            registry.pulls(),
            vec![
                "library/redis:latest".to_string(),
                format!("library/redis:{digest}"),
                "library/nginx:latest".to_string(),
            ]
        );
    }
}
