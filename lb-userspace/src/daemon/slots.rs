//! Connection slots of the daemon's small servers (health, metrics, health-check node
//! ports), which anyone who can reach the node can connect to.
//!
//! A server holds at most a fixed number of connections, so a flood cannot exhaust the
//! daemon's file descriptors. When all are taken, the oldest connection that is not
//! answering a request is closed to make room for the new one (rather than the new one
//! being refused): a flood of idle connections then cannot lock a probe out, since the
//! probe's connection is always the newest.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::task::AbortHandle;

#[derive(Debug)]
pub struct Slots {
    max: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    /// By admission order: the first idle entry is the oldest.
    by_id: BTreeMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    busy: Arc<AtomicBool>,
    /// The connection's task; `None` until [`Slots::attach`].
    task: Option<AbortHandle>,
}

/// One admitted connection's slot, freed on drop.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    busy: Arc<AtomicBool>,
    slots: Arc<Slots>,
    /// The connection closed to make room for this one.
    evicted: Option<AbortHandle>,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(Open::default()),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        // A panic elsewhere while holding the lock leaves the map consistent.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a new connection, closing the oldest idle connection if all are
    /// taken; `None` (close the new one) when every connection is answering.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open();
        let mut evicted = None;
        if open.by_id.len() >= self.max {
            let oldest_idle = open
                .by_id
                .iter()
                .find(|(_, e)| e.task.is_some() && !e.busy.load(Ordering::SeqCst))
                .map(|(id, _)| *id)?;
            if let Some(entry) = open.by_id.remove(&oldest_idle)
                && let Some(task) = entry.task
            {
                task.abort();
                evicted = Some(task);
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        open.by_id.insert(
            id,
            Entry {
                busy: busy.clone(),
                task: None,
            },
        );
        Some(Slot {
            id,
            busy,
            slots: self.clone(),
            evicted,
        })
    }

    /// Records the task serving `slot`'s connection, so it can be closed to make room.
    pub fn attach(&self, slot_id: u64, task: AbortHandle) {
        if let Some(entry) = self.open().by_id.get_mut(&slot_id) {
            entry.task = Some(task);
        }
    }

    /// Connections held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open().by_id.len()
    }
}

impl Slot {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits until the connection closed to make room for this one is gone (its
    /// descriptor closed: an abort takes effect when the task is next polled), so a
    /// server never holds more connections than its cap, however fast they arrive.
    pub async fn room(&mut self) {
        if let Some(evicted) = self.evicted.take() {
            while !evicted.is_finished() {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Marks the connection as answering a request (not to be closed for room) until
    /// the guard drops.
    pub fn busy(&self) -> Busy {
        self.busy.store(true, Ordering::SeqCst);
        Busy(self.busy.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open().by_id.remove(&self.id);
    }
}

pub struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection task that runs until aborted, holding its slot.
    fn hold(
        rt: &tokio::runtime::Runtime,
        slots: &Arc<Slots>,
        slot: Slot,
    ) -> tokio::task::JoinHandle<()> {
        let id = slot.id();
        let task = rt.spawn(async move {
            let _slot = slot;
            std::future::pending::<()>().await;
        });
        slots.attach(id, task.abort_handle());
        task
    }

    #[test]
    fn when_full_the_oldest_idle_connection_makes_room_and_busy_ones_are_kept() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let slots = Slots::new(3);
        let first = slots.admit().unwrap();
        let busy = first.busy();
        let first_task = hold(&rt, &slots, first);
        let second_task = hold(&rt, &slots, slots.admit().unwrap());
        let third_task = hold(&rt, &slots, slots.admit().unwrap());
        assert_eq!(slots.len(), 3);

        // Full: the oldest idle one (the second; the first is answering) is closed.
        let fourth = slots.admit().unwrap();
        assert_eq!(slots.len(), 3);
        rt.block_on(async {
            assert!(second_task.await.unwrap_err().is_cancelled());
        });
        assert!(!first_task.is_finished() && !third_task.is_finished());
        let fourth_task = hold(&rt, &slots, fourth);

        // Every connection answering: the new one is refused instead.
        let all_busy: Vec<Busy> = {
            let open = slots.open();
            open.by_id
                .values()
                .map(|e| {
                    e.busy.store(true, Ordering::SeqCst);
                    Busy(e.busy.clone())
                })
                .collect()
        };
        assert!(slots.admit().is_none());
        drop(busy);
        drop(all_busy);

        // A connection that ends frees its slot.
        fourth_task.abort();
        rt.block_on(async {
            let _ = fourth_task.await;
        });
        assert_eq!(slots.len(), 2);
        assert!(slots.admit().is_some());
    }
}
