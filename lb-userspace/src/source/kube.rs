//! The Kubernetes API source: kube-rs watchers on Services, EndpointSlices, Nodes,
//! Namespaces and this node's Pods (their load-balancing modes), turned into the
//! source events of [`super`].
//!
//! - Server-side selectors skip what kube-proxy skips (Services and slices another
//!   proxy owns or marked headless); the same rules are applied again to every object
//!   (unit-tested in the model), so nothing depends on the server honouring them.
//! - Objects are converted to the model's compact specs as they arrive and the API
//!   objects dropped at once (no reflector store, no managedFields in memory).
//! - A watch that breaks, a `410 Gone` or an API outage makes the watcher list again;
//!   [`Relist`] turns the new list into removals of what vanished meanwhile, and the
//!   model into minimal map writes. While the API server is unreachable the datapath
//!   keeps its last state; retries back off (as client-go does, up to 30 s) but a
//!   cheap `/version` probe brings every watcher back within about half a second of
//!   the server's return. An outage is logged once when it starts and once when it
//!   ends.
//! - Streaming lists (`sendInitialEvents`) are used where the server supports them,
//!   with a fallback to list+watch when it does not (etcd older than 3.4.31/3.5.13,
//!   or the WatchList feature off).

use std::{
    fmt::Debug,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, watcher::Event as WatchEvent},
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{Event, Kind, Object, Relist, Sink};
use crate::{
    model::{
        NodeSpec, ObjectRef, ServiceSpec, SliceSpec, spec,
        workloads::{NamespaceSpec, PodSpec},
    },
    warnings::Summary,
};

/// Builds a client: `--kubeconfig`, else `$KUBECONFIG`, else the in-cluster
/// service-account configuration.
/// A client for the API, and the addresses it connects to.
pub async fn client(kubeconfig: Option<&Path>) -> Result<(Client, Vec<std::net::IpAddr>)> {
    let mut config = if let Some(path) = kubeconfig {
        let file = Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("using kubeconfig {}", path.display()))?
    } else if std::env::var_os("KUBECONFIG").is_some() {
        Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .context("using the kubeconfig named by $KUBECONFIG")?
    } else {
        match Config::incluster() {
            Ok(config) => config,
            Err(err) => bail!(
                "no Kubernetes API configuration: pass --kubeconfig, set KUBECONFIG, or run \
                 in a cluster with a service account ({err}); for a folder of manifests use \
                 --manifests"
            ),
        }
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    // Watches are long-lived and may be quiet: no read timeout (the watcher has its own).
    config.read_timeout = None;
    let api = api_addresses(&config.cluster_url).await;
    Ok((
        Client::try_from(config).context("creating the Kubernetes client")?,
        api,
    ))
}

/// The addresses this daemon reaches the API server at (the cluster URL's host, as
/// written or resolved): no Service may take them, or it would cut the daemon off.
async fn api_addresses(url: &hyper::Uri) -> Vec<std::net::IpAddr> {
    let Some(host) = url.host() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return vec![ip.to_canonical()];
    }
    let port = url.port_u16().unwrap_or(443);
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::lookup_host((host, port)),
    )
    .await
    {
        Ok(Ok(addresses)) => addresses.map(|a| a.ip().to_canonical()).collect(),
        _ => Vec::new(),
    }
}

/// What the daemon can observe of the API connection.
#[derive(Debug, Default)]
pub struct ApiStatus {
    /// Requests that failed (list, watch, watch errors).
    pub errors: AtomicU64,
    /// When the current outage began.
    down_since: Mutex<Option<Instant>>,
    /// Wakes watchers that are backing off once the API answers again.
    back: Notify,
    probing: AtomicBool,
    /// Set once the server refused a streaming list: every watcher lists instead.
    no_streaming_lists: AtomicBool,
}

impl ApiStatus {
    pub fn is_down(&self) -> bool {
        self.down_since.lock().expect("lock").is_some()
    }

    /// A request failed: logs once per outage and starts the probe.
    fn failed(self: &Arc<Self>, client: &Client, kind: Kind, err: &watcher::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut down = self.down_since.lock().expect("lock");
        if down.is_none() {
            *down = Some(Instant::now());
            warn!(
                "Kubernetes API unreachable or failing ({kind} watch: {err}); the datapath keeps \
                 its current state; retrying"
            );
        } else {
            debug!("{kind} watch: {err}");
        }
        drop(down);
        if !self.probing.swap(true, Ordering::SeqCst) {
            let status = self.clone();
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if !status.is_down() || client.apiserver_version().await.is_ok() {
                        break;
                    }
                }
                status.probing.store(false, Ordering::SeqCst);
                status.back.notify_waiters();
            });
        }
    }

    /// A watcher received something: the outage (if any) is over.
    fn succeeded(&self) {
        let mut down = self.down_since.lock().expect("lock");
        if let Some(since) = down.take() {
            info!(
                outage_ms = since.elapsed().as_millis() as u64,
                "Kubernetes API reachable again; re-listing"
            );
            self.back.notify_waiters();
        }
    }
}

/// Retry delays after errors: 0.8 s doubling to 30 s (client-go's), cut short when the
/// API answers again.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    async fn wait(&mut self, status: &ApiStatus) {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = status.back.notified() => {}
        }
    }
}

/// Whether a watch error means "this server cannot do streaming lists".
fn streaming_lists_unsupported(err: &watcher::Error) -> bool {
    let message = match err {
        watcher::Error::WatchError(status) => status.message.clone(),
        watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.message.clone(),
        _ => return false,
    };
    message.contains("RequestWatchProgress")
        || message.contains("sendInitialEvents")
        || message.contains("WatchList")
}

/// Whether a watch error is the API server refusing this daemon the kind (RBAC).
fn forbidden(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::WatchError(status) => status.code == 403,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 403,
        _ => false,
    }
}

/// Converts one API object; `Ok(None)` when this proxy does not serve it.
type Convert<K> = fn(&K) -> Result<Option<Object>, Vec<String>>;

/// A watched object decoded on its own. The API server may hold an object the
/// client's types cannot decode (a Service status condition without
/// `lastTransitionTime`, say): decoding it as part of the watch stream would fail the
/// watch of every object of its kind, over and over. Decoded alone, it is reported by
/// name; a `status.conditions` that does not decode is dropped first (nothing here
/// reads it, and Kubernetes accepted it).
#[derive(Clone, Debug)]
enum Decoded<K> {
    Object(Box<K>),
    Undecodable {
        metadata: Box<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
        error: String,
    },
}

impl<'de, K: DeserializeOwned> serde::Deserialize<'de> for Decoded<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(deserializer)?;
        let error = match K::deserialize(&value) {
            Ok(object) => return Ok(Self::Object(Box::new(object))),
            Err(error) => error.to_string(),
        };
        let conditions = value
            .get_mut("status")
            .and_then(serde_json::Value::as_object_mut)
            .and_then(|status| status.remove("conditions"));
        if conditions.is_some()
            && let Ok(object) = K::deserialize(&value)
        {
            return Ok(Self::Object(Box::new(object)));
        }
        let metadata = value
            .get("metadata")
            .and_then(|m| serde::Deserialize::deserialize(m).ok())
            .unwrap_or_default();
        Ok(Self::Undecodable { metadata, error })
    }
}

impl<K: k8s_openapi::Resource> k8s_openapi::Resource for Decoded<K> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K> k8s_openapi::Metadata for Decoded<K>
where
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
{
    type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn metadata(&self) -> &Self::Ty {
        match self {
            Self::Object(object) => object.metadata(),
            Self::Undecodable { metadata, .. } => metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut Self::Ty {
        match self {
            Self::Object(object) => object.metadata_mut(),
            Self::Undecodable { metadata, .. } => metadata,
        }
    }
}

fn service(svc: &Service) -> Result<Option<Object>, Vec<String>> {
    Ok(ServiceSpec::from_k8s(svc)?.map(|s| Object::Service(Arc::new(s))))
}

fn slice(slice: &EndpointSlice) -> Result<Option<Object>, Vec<String>> {
    if spec::slice_ignored(&slice.metadata).is_some() {
        return Ok(None);
    }
    Ok(SliceSpec::from_k8s(slice)?.map(|s| Object::Slice(Arc::new(s))))
}

fn node(node: &Node) -> Result<Option<Object>, Vec<String>> {
    Ok(Some(Object::Node(Arc::new(NodeSpec::from_k8s(node)?))))
}

fn pod(pod: &Pod) -> Result<Option<Object>, Vec<String>> {
    Ok(PodSpec::from_k8s(pod).map(|p| Object::Pod(Arc::new(p))))
}

fn namespace(namespace: &Namespace) -> Result<Option<Object>, Vec<String>> {
    Ok(Some(Object::Namespace(Arc::new(NamespaceSpec::from_k8s(
        namespace,
    )))))
}

/// Starts the watchers on the current tokio runtime: Services, EndpointSlices, Nodes,
/// Namespaces and the Pods of node `node_name`.
pub fn spawn(client: Client, sink: Sink, node_name: &str) -> Arc<ApiStatus> {
    let status = Arc::new(ApiStatus::default());
    // kube-proxy's selector, on Services and slices alike.
    let not_ours = format!(
        "!{},!{}",
        spec::HEADLESS_LABEL,
        spec::SERVICE_PROXY_NAME_LABEL
    );
    let services = watcher::Config::default().labels(&not_ours);
    let slices = watcher::Config::default().labels(&not_ours);
    // Every Node: this one for its name, zone and addresses, the others so that no
    // Service's external IP can take their addresses.
    let nodes = watcher::Config::default();
    tokio::spawn(watch(
        Api::<Decoded<Service>>::all(client.clone()),
        services,
        Kind::Service,
        service as Convert<Service>,
        client.clone(),
        sink.clone(),
        status.clone(),
    ));
    tokio::spawn(watch(
        Api::<Decoded<EndpointSlice>>::all(client.clone()),
        slices,
        Kind::EndpointSlice,
        slice as Convert<EndpointSlice>,
        client.clone(),
        sink.clone(),
        status.clone(),
    ));
    tokio::spawn(watch(
        Api::<Decoded<Node>>::all(client.clone()),
        nodes,
        Kind::Node,
        node as Convert<Node>,
        client.clone(),
        sink.clone(),
        status.clone(),
    ));
    // Only this node's pods: memory follows the node, not the cluster.
    let pods = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    tokio::spawn(watch(
        Api::<Decoded<Pod>>::all(client.clone()),
        pods,
        Kind::Pod,
        pod as Convert<Pod>,
        client.clone(),
        sink.clone(),
        status.clone(),
    ));
    tokio::spawn(watch(
        Api::<Decoded<Namespace>>::all(client.clone()),
        watcher::Config::default(),
        Kind::Namespace,
        namespace as Convert<Namespace>,
        client,
        sink,
        status.clone(),
    ));
    status
}

fn id_of<K: Resource>(kind: Kind, object: &K) -> ObjectRef {
    let meta = object.meta();
    let namespace = if matches!(kind, Kind::Node | Kind::Namespace) {
        String::new()
    } else {
        meta.namespace.clone().unwrap_or_default()
    };
    ObjectRef::new(namespace, meta.name.clone().unwrap_or_default())
}

/// One kind's watch, forever (until the sink closes).
async fn watch<K>(
    api: Api<Decoded<K>>,
    config: watcher::Config,
    kind: Kind,
    convert: Convert<K>,
    client: Client,
    sink: Sink,
    status: Arc<ApiStatus>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    Decoded<K>: Resource<DynamicType = ()>,
{
    let mut relist = Relist::default();
    let mut backoff = Backoff::new();
    let mut refused_reported = false;
    'restart: loop {
        let streaming = !status.no_streaming_lists.load(Ordering::SeqCst);
        let config = if streaming {
            config.clone().streaming_lists()
        } else {
            config.clone()
        };
        let mut stream = std::pin::pin!(watcher(api.clone(), config));
        // Objects of the list in progress, sent together when it completes.
        let mut listing: Vec<Event> = Vec::new();
        let mut summary = Summary::default();
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(event) => {
                    status.succeeded();
                    backoff.reset();
                    event
                }
                Err(err) => {
                    if streaming && streaming_lists_unsupported(&err) {
                        if !status.no_streaming_lists.swap(true, Ordering::SeqCst) {
                            info!(
                                "the API server does not support streaming lists ({err}); using list+watch"
                            );
                        }
                        continue 'restart;
                    }
                    if Kind::WORKLOADS.contains(&kind) && forbidden(&err) {
                        // Older RBAC without pods or namespaces: Services are served
                        // all the same; only the pods' modes wait for the permission.
                        if !refused_reported {
                            refused_reported = true;
                            warn!(
                                "listing {kind}s is forbidden ({err}): pods' load-balancing \
                                 modes (lb.dev/mode) are not applied until the daemon's \
                                 ClusterRole allows list and watch on pods and namespaces \
                                 (deploy/rbac.yaml); retrying"
                            );
                        }
                        tokio::time::sleep(Backoff::MAX).await;
                        continue;
                    }
                    status.failed(&client, kind, &err);
                    backoff.wait(&status).await;
                    continue;
                }
            };
            let batch = match event {
                WatchEvent::Init => {
                    relist.begin(kind);
                    listing.clear();
                    summary = Summary::default();
                    continue;
                }
                WatchEvent::InitApply(object) => {
                    apply(
                        kind,
                        &object,
                        convert,
                        &mut relist,
                        &mut listing,
                        &mut summary,
                    );
                    continue;
                }
                WatchEvent::InitDone => {
                    std::mem::take(&mut summary).finish();
                    let mut batch = std::mem::take(&mut listing);
                    batch.extend(relist.end(kind));
                    batch
                }
                WatchEvent::Apply(object) => {
                    let mut batch = Vec::new();
                    let mut once = Summary::default();
                    apply(kind, &object, convert, &mut relist, &mut batch, &mut once);
                    once.finish();
                    batch
                }
                WatchEvent::Delete(object) => {
                    let id = id_of(kind, &object);
                    relist.gone(kind, &id);
                    vec![Event::Remove(kind, id)]
                }
            };
            if !batch.is_empty() && super::send_async(&sink, batch).await.is_err() {
                return;
            }
        }
        // The watcher stream never ends on its own; if it does, start over.
        backoff.wait(&status).await;
    }
}

fn apply<K>(
    kind: Kind,
    object: &Decoded<K>,
    convert: Convert<K>,
    relist: &mut Relist,
    batch: &mut Vec<Event>,
    summary: &mut Summary,
) where
    Decoded<K>: Resource,
{
    let id = id_of(kind, object);
    let converted = match object {
        Decoded::Object(object) => convert(object),
        Decoded::Undecodable { error, .. } => Err(vec![format!("cannot be decoded ({error})")]),
    };
    match converted {
        Ok(Some(object)) => {
            relist.seen(kind, &id);
            batch.push(Event::Upsert(object));
        }
        // Not ours (any more): make sure it is not served.
        Ok(None) => {
            relist.gone(kind, &id);
            batch.push(Event::Remove(kind, id));
        }
        Err(problems) => {
            // Keep its last good version (still "seen", so a re-list keeps it too).
            relist.seen(kind, &id);
            summary.warn(
                None,
                &format!(
                    "{kind} {id}: {}; keeping its last good version, if any",
                    problems.join("; ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::{ResourceExt as _, core::Status};

    use super::*;

    #[test]
    fn a_refused_streaming_list_is_recognised() {
        let refused = watcher::Error::WatchError(Box::new(Status::failure(
            "a watch stream was requested by the client but the required storage feature \
             RequestWatchProgress is disabled",
            "InternalError",
        )));
        assert!(streaming_lists_unsupported(&refused));
        let other = watcher::Error::WatchError(Box::new(Status::failure(
            "too old resource version",
            "Expired",
        )));
        assert!(!streaming_lists_unsupported(&other));
    }

    #[test]
    fn objects_are_converted_and_foreign_ones_removed() {
        let mut relist = Relist::default();
        let mut batch = Vec::new();
        let mut summary = Summary::default();
        let svc: Service = crate::source::manifests::from_yaml(
            "metadata: {name: web, namespace: pods}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}",
        )
        .unwrap();
        apply(
            Kind::Service,
            &Decoded::Object(Box::new(svc.clone())),
            service,
            &mut relist,
            &mut batch,
            &mut summary,
        );
        assert!(matches!(&batch[0], Event::Upsert(Object::Service(s)) if &*s.id.name == "web"));
        // The Service is handed to another proxy: it must stop being served.
        let mut foreign = svc.clone();
        foreign
            .labels_mut()
            .insert(spec::SERVICE_PROXY_NAME_LABEL.into(), "other".into());
        apply(
            Kind::Service,
            &Decoded::Object(Box::new(foreign)),
            service,
            &mut relist,
            &mut batch,
            &mut summary,
        );
        assert_eq!(
            batch[1],
            Event::Remove(Kind::Service, ObjectRef::new("pods", "web"))
        );
        // An invalid object is reported and changes nothing.
        let mut broken = svc;
        broken.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 0;
        apply(
            Kind::Service,
            &Decoded::Object(Box::new(broken)),
            service,
            &mut relist,
            &mut batch,
            &mut summary,
        );
        assert_eq!(batch.len(), 2);
        assert_eq!(summary.total(), 1);
    }

    #[test]
    fn objects_are_decoded_one_by_one() {
        // A status condition without lastTransitionTime (the API server serves it as
        // null): decoded without it.
        let odd: Decoded<Service> = serde_json::from_str(
            r#"{"metadata": {"name": "odd", "namespace": "pods"},
                "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]},
                "status": {"conditions": [{"type": "StatusUpdate", "status": "True",
                  "reason": "E2E", "message": "m", "lastTransitionTime": null}]}}"#,
        )
        .unwrap();
        let Decoded::Object(odd) = odd else {
            panic!("not repaired: {odd:?}");
        };
        assert_eq!(odd.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.7"));
        // Something that cannot be decoded at all: named, and reported on apply.
        let broken: Decoded<Service> = serde_json::from_str(
            r#"{"metadata": {"name": "broken", "namespace": "pods"}, "spec": {"ports": "nonsense"}}"#,
        )
        .unwrap();
        assert!(matches!(&broken, Decoded::Undecodable { metadata, error }
            if metadata.name.as_deref() == Some("broken") && error.contains("invalid type")));
        let (mut relist, mut batch, mut summary) =
            (Relist::default(), Vec::new(), Summary::default());
        apply(
            Kind::Service,
            &broken,
            service,
            &mut relist,
            &mut batch,
            &mut summary,
        );
        assert!(batch.is_empty());
        assert_eq!(summary.total(), 1);
        // A watch event carrying it decodes, so the stream goes on.
        let event: kube::core::WatchEvent<Decoded<Service>> = serde_json::from_str(
            r#"{"type": "MODIFIED", "object": {"metadata": {"name": "broken", "namespace": "pods"}, "spec": {"ports": "nonsense"}}}"#,
        )
        .unwrap();
        assert!(matches!(
            event,
            kube::core::WatchEvent::Modified(Decoded::Undecodable { .. })
        ));
    }
}
