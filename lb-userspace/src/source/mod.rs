//! Where Services, EndpointSlices, Nodes, this node's Pods and Namespaces come from: a folder of manifests
//! ([`manifests`]) or the Kubernetes API ([`kube`]). Both speak the same contract, so
//! the daemon drives the model and the reconciler without knowing which it has:
//!
//! - [`Event::Upsert`] / [`Event::Remove`]: an object appeared, changed or went away;
//! - [`Event::Listed`]: every object of that kind has now been delivered (the initial
//!   list, or a re-list after a watch broke). Objects missing from a re-list have been
//!   sent as removals before it. Nothing is programmed until every kind has listed
//!   once, so a restarted daemon never deletes adopted state because one list arrived
//!   late.
//!
//! Events travel in batches (one batch per file read, watch event or list page), which
//! the daemon applies together.

pub mod kube;
pub mod manifests;

use std::{fmt, sync::Arc};

use crate::model::{
    NodeSpec, ObjectRef, ServiceSpec, SliceSpec,
    workloads::{NamespaceSpec, PodSpec},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// This node's Pods, for their load-balancing modes.
    Pod,
    /// Namespaces, for their load-balancing-mode annotation.
    Namespace,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
    ];
    /// What the Service maps are made of: nothing is programmed before each has
    /// listed once.
    pub const SERVICES: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];
    /// What the pods' modes are made of.
    pub const WORKLOADS: [Kind; 2] = [Kind::Pod, Kind::Namespace];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
            Self::Pod => "Pod",
            Self::Namespace => "Namespace",
        })
    }
}

pub type ObjectKey = (Kind, ObjectRef);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    // Shared with the model: objects are parsed once and never copied.
    Service(Arc<ServiceSpec>),
    Slice(Arc<SliceSpec>),
    Node(Arc<NodeSpec>),
    Pod(Arc<PodSpec>),
    Namespace(Arc<NamespaceSpec>),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Self::Service(s) => (Kind::Service, s.id.clone()),
            Self::Slice(s) => (Kind::EndpointSlice, s.id.clone()),
            Self::Node(n) => (Kind::Node, ObjectRef::new("", n.name.clone())),
            Self::Pod(p) => (Kind::Pod, p.id.clone()),
            Self::Namespace(n) => (Kind::Namespace, ObjectRef::new("", n.name.clone())),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Upsert(Object),
    Remove(Kind, ObjectRef),
    Listed(Kind),
}

/// Where a source sends its batches; the daemon coalesces whatever has queued up into
/// one sync. Bounded ([`SINK_BATCHES`]): a source that outruns the daemon (a Service
/// rewritten in a loop) waits instead of growing the queue without limit.
pub type Sink = std::sync::mpsc::SyncSender<Vec<Event>>;

/// Batches the sink holds before sources wait.
pub const SINK_BATCHES: usize = 1024;

/// Sends from an async task without blocking its runtime thread: while the queue is
/// full, the task sleeps and tries again. `Err` once the daemon is gone.
pub async fn send_async(sink: &Sink, mut batch: Vec<Event>) -> Result<(), ()> {
    loop {
        match sink.try_send(batch) {
            Ok(()) => return Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(back)) => {
                batch = back;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(()),
        }
    }
}

/// Tracks which objects a source has delivered per kind, so a re-list can announce
/// removals for objects that vanished while the watch was down. Pure: the Kubernetes
/// source feeds it, and its contract is unit-tested here.
#[derive(Debug, Default)]
pub struct Relist {
    known: std::collections::BTreeMap<Kind, std::collections::BTreeSet<ObjectRef>>,
    listing: std::collections::BTreeMap<Kind, std::collections::BTreeSet<ObjectRef>>,
}

impl Relist {
    /// A (re-)list of `kind` begins.
    pub fn begin(&mut self, kind: Kind) {
        self.listing.insert(kind, Default::default());
    }

    /// An object arrived (in a list or a watch).
    pub fn seen(&mut self, kind: Kind, id: &ObjectRef) {
        if let Some(listing) = self.listing.get_mut(&kind) {
            listing.insert(id.clone());
        }
        self.known.entry(kind).or_default().insert(id.clone());
    }

    /// An object was deleted (watch).
    pub fn gone(&mut self, kind: Kind, id: &ObjectRef) {
        if let Some(known) = self.known.get_mut(&kind) {
            known.remove(id);
        }
        if let Some(listing) = self.listing.get_mut(&kind) {
            listing.remove(id);
        }
    }

    /// The list of `kind` is complete: returns the removals and the `Listed` event.
    pub fn end(&mut self, kind: Kind) -> Vec<Event> {
        let listed = self.listing.remove(&kind).unwrap_or_default();
        let known = self.known.insert(kind, listed.clone()).unwrap_or_default();
        let mut events: Vec<Event> = known
            .difference(&listed)
            .map(|id| Event::Remove(kind, id.clone()))
            .collect();
        events.push(Event::Listed(kind));
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> ObjectRef {
        ObjectRef::new("pods", name)
    }

    #[test]
    fn a_relist_removes_what_vanished_while_the_watch_was_down() {
        let mut relist = Relist::default();
        relist.begin(Kind::Service);
        relist.seen(Kind::Service, &id("a"));
        relist.seen(Kind::Service, &id("b"));
        assert_eq!(
            relist.end(Kind::Service),
            vec![Event::Listed(Kind::Service)]
        );
        // Watch: c added, a deleted.
        relist.seen(Kind::Service, &id("c"));
        relist.gone(Kind::Service, &id("a"));
        // The watch breaks; meanwhile b was deleted. The re-list delivers c only.
        relist.begin(Kind::Service);
        relist.seen(Kind::Service, &id("c"));
        assert_eq!(
            relist.end(Kind::Service),
            vec![
                Event::Remove(Kind::Service, id("b")),
                Event::Listed(Kind::Service)
            ]
        );
        // Kinds are independent.
        relist.begin(Kind::EndpointSlice);
        assert_eq!(
            relist.end(Kind::EndpointSlice),
            vec![Event::Listed(Kind::EndpointSlice)]
        );
        relist.begin(Kind::Service);
        assert_eq!(
            relist.end(Kind::Service),
            vec![
                Event::Remove(Kind::Service, id("c")),
                Event::Listed(Kind::Service)
            ]
        );
    }

    #[test]
    fn an_object_deleted_during_a_relist_is_not_removed_twice() {
        let mut relist = Relist::default();
        relist.begin(Kind::EndpointSlice);
        relist.seen(Kind::EndpointSlice, &id("s"));
        relist.end(Kind::EndpointSlice);
        relist.begin(Kind::EndpointSlice);
        relist.seen(Kind::EndpointSlice, &id("s"));
        relist.gone(Kind::EndpointSlice, &id("s"));
        assert_eq!(
            relist.end(Kind::EndpointSlice),
            vec![Event::Listed(Kind::EndpointSlice)]
        );
    }

    #[test]
    fn a_full_sink_makes_async_sources_wait_without_blocking_their_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (sink, events) = std::sync::mpsc::sync_channel::<Vec<Event>>(1);
        sink.send(vec![Event::Listed(Kind::Service)]).unwrap();
        runtime.block_on(async {
            let waiting = tokio::spawn({
                let sink = sink.clone();
                async move { send_async(&sink, vec![Event::Listed(Kind::Node)]).await }
            });
            // The one-thread runtime still runs other tasks while the sender waits.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(!waiting.is_finished(), "sent into a full queue");
            assert_eq!(events.recv().unwrap(), vec![Event::Listed(Kind::Service)]);
            assert_eq!(waiting.await.unwrap(), Ok(()));
            assert_eq!(events.recv().unwrap(), vec![Event::Listed(Kind::Node)]);
            drop(events);
            assert_eq!(send_async(&sink, Vec::new()).await, Err(()));
        });
    }
}
