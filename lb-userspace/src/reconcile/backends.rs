//! The backends the reconciler has programmed, found by identity and by id.
//!
//! Ids are dense (handed out from 1 by an [`IdAllocator`](super::ids::IdAllocator)),
//! so the entries live in a slab indexed by id, and the identity index is a hash
//! table of bare ids that hashes the identity stored in the slab. At a million
//! backends that is about 42 bytes per backend; two hash maps (identity to entry, id
//! to identity) took about 180.

use std::hash::{BuildHasher as _, RandomState};

use hashbrown::HashTable;

use super::BackendIdentity;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendEntry {
    pub id: u32,
    /// Frontends whose slots point at it.
    pub refs: u32,
    /// `BACKEND_F_LOCAL` as written.
    pub local: bool,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    identity: BackendIdentity,
    entry: BackendEntry,
}

#[derive(Debug, Default)]
pub struct BackendTable {
    by_id: Vec<Option<Slot>>,
    index: HashTable<u32>,
    /// Seeded per process: pod addresses are chosen by whoever writes EndpointSlices.
    hasher: RandomState,
}

impl BackendTable {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    fn slot(&self, id: u32) -> Option<&Slot> {
        self.by_id.get(id as usize)?.as_ref()
    }

    fn find(&self, identity: &BackendIdentity) -> Option<u32> {
        let hash = self.hasher.hash_one(identity);
        self.index
            .find(hash, |&id| {
                self.slot(id).is_some_and(|slot| &slot.identity == identity)
            })
            .copied()
    }

    #[cfg(test)]
    pub fn get(&self, identity: &BackendIdentity) -> Option<BackendEntry> {
        let id = self.find(identity)?;
        self.slot(id).map(|slot| slot.entry)
    }

    pub fn get_mut(&mut self, identity: &BackendIdentity) -> Option<&mut BackendEntry> {
        let id = self.find(identity)?;
        self.by_id[id as usize].as_mut().map(|slot| &mut slot.entry)
    }

    pub fn get_by_id_mut(&mut self, id: u32) -> Option<&mut BackendEntry> {
        self.by_id
            .get_mut(id as usize)?
            .as_mut()
            .map(|slot| &mut slot.entry)
    }

    pub fn contains(&self, identity: &BackendIdentity) -> bool {
        self.find(identity).is_some()
    }

    /// The identity behind `id`, if it is programmed.
    pub fn identity(&self, id: u32) -> Option<BackendIdentity> {
        self.slot(id).map(|slot| slot.identity)
    }

    pub fn contains_id(&self, id: u32) -> bool {
        self.slot(id).is_some()
    }

    /// Adds `identity` under `entry.id`, or returns the entry it already has.
    pub fn get_or_insert(
        &mut self,
        identity: BackendIdentity,
        entry: BackendEntry,
    ) -> &mut BackendEntry {
        let id = match self.find(&identity) {
            Some(id) => id,
            None => {
                let id = entry.id;
                let at = id as usize;
                if at >= self.by_id.len() {
                    // Grow by a quarter, not double: at a million backends the slab is
                    // the largest thing the daemon holds.
                    let wanted = (at + 1).max(self.by_id.len() + self.by_id.len() / 4);
                    self.by_id.reserve_exact(wanted - self.by_id.len());
                    self.by_id.resize(wanted, None);
                }
                debug_assert!(self.by_id[at].is_none(), "backend id {id} in use twice");
                self.by_id[at] = Some(Slot { identity, entry });
                let hash = self.hasher.hash_one(identity);
                let (by_id, hasher) = (&self.by_id, &self.hasher);
                self.index.insert_unique(hash, id, |&other| {
                    let slot = by_id[other as usize]
                        .as_ref()
                        .expect("indexed ids have slots");
                    hasher.hash_one(slot.identity)
                });
                id
            }
        };
        &mut self.by_id[id as usize]
            .as_mut()
            .expect("found ids have slots")
            .entry
    }

    /// Forgets `id`; returns its identity if it was programmed.
    pub fn remove_id(&mut self, id: u32) -> Option<BackendIdentity> {
        let slot = self.by_id.get_mut(id as usize)?.take()?;
        let hash = self.hasher.hash_one(slot.identity);
        if let Ok(found) = self.index.find_entry(hash, |&other| other == id) {
            found.remove();
        }
        Some(slot.identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendAddr, Protocol};

    fn identity(n: u32) -> BackendIdentity {
        BackendIdentity {
            addr: BackendAddr {
                ip: std::net::Ipv4Addr::from(0x0a80_0000 + n).into(),
                port: 6379,
            },
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn identities_and_ids_agree_through_inserts_and_removals() {
        let mut table = BackendTable::default();
        for id in 1..=1000u32 {
            let entry = BackendEntry {
                id,
                refs: 1,
                local: id % 2 == 0,
            };
            assert_eq!(*table.get_or_insert(identity(id), entry), entry);
        }
        assert_eq!(table.len(), 1000);
        // Inserting a known identity returns its entry, whatever id is offered.
        let again = table.get_or_insert(
            identity(7),
            BackendEntry {
                id: 5000,
                refs: 1,
                local: false,
            },
        );
        assert_eq!(again.id, 7);
        again.refs += 1;
        assert_eq!(table.get(&identity(7)).map(|e| e.refs), Some(2));
        assert!(!table.contains_id(5000));
        for id in (1..=1000u32).step_by(3) {
            assert_eq!(table.remove_id(id), Some(identity(id)));
            assert_eq!(table.remove_id(id), None);
        }
        for id in 1..=1000u32 {
            let kept = (id - 1) % 3 != 0;
            assert_eq!(table.contains(&identity(id)), kept, "{id}");
            assert_eq!(table.contains_id(id), kept);
            assert_eq!(table.identity(id).is_some(), kept);
            assert_eq!(table.get(&identity(id)).map(|e| e.id), kept.then_some(id));
        }
        assert_eq!(table.len(), 666);
        // A freed id serves another identity.
        table.get_or_insert(
            identity(4000),
            BackendEntry {
                id: 1,
                refs: 1,
                local: false,
            },
        );
        assert_eq!(table.identity(1), Some(identity(4000)));
        assert!(!table.contains(&identity(1)));
    }
}
