//! The backends the reconciler has programmed, found by identity and by id.
//!
//! Ids are dense (handed out from 1 by an [`IdAllocator`](super::ids::IdAllocator)),
//! so the entries live in a slab indexed by id, and the identity index is a hash
//! table of bare ids that hashes the identity stored in the slab. A slot is 24 bytes
//! (the address, port, protocol, flags and reference count; its id is its index), so
//! a million backends take about 29 bytes each with the index; two hash maps
//! (identity to entry, id to identity) took about 180, an `Option` of the identity
//! and a full entry 41.

use std::{
    hash::{BuildHasher as _, RandomState},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hashbrown::HashTable;

use super::BackendIdentity;
use crate::model::{BackendAddr, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendEntry {
    pub id: u32,
    /// Frontends whose slots point at it.
    pub refs: u32,
    /// `BACKEND_F_LOCAL` as written.
    pub local: bool,
}

const IN_USE: u8 = 1;
const IPV6: u8 = 2;
const LOCAL: u8 = 4;

/// One backend, packed: `IpAddr` alone takes 17 bytes and aligns nothing.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// IPv4 addresses in the first four bytes.
    addr: [u8; 16],
    port: u16,
    protocol: u8,
    flags: u8,
    refs: u32,
}

impl Slot {
    fn new(identity: &BackendIdentity, refs: u32, local: bool) -> Self {
        let mut addr = [0; 16];
        let mut flags = IN_USE;
        match identity.addr.ip {
            IpAddr::V4(ip) => addr[..4].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => {
                addr = ip.octets();
                flags |= IPV6;
            }
        }
        if local {
            flags |= LOCAL;
        }
        Self {
            addr,
            port: identity.addr.port,
            protocol: identity.protocol as u8,
            flags,
            refs,
        }
    }

    fn in_use(&self) -> bool {
        self.flags & IN_USE != 0
    }

    fn identity(&self) -> BackendIdentity {
        let ip = if self.flags & IPV6 != 0 {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            ))
        };
        let protocol = match self.protocol {
            p if p == Protocol::Udp as u8 => Protocol::Udp,
            p if p == Protocol::Sctp as u8 => Protocol::Sctp,
            _ => Protocol::Tcp,
        };
        BackendIdentity {
            addr: BackendAddr {
                ip,
                port: self.port,
            },
            protocol,
        }
    }

    fn matches(&self, identity: &BackendIdentity) -> bool {
        // Equality compares the identity only (not the count or locality).
        self.in_use() && *self == Slot::new(identity, 0, false)
    }

    fn local(&self) -> bool {
        self.flags & LOCAL != 0
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        // The identity: flags other than the family, and the count, are state.
        self.addr == other.addr
            && self.port == other.port
            && self.protocol == other.protocol
            && (self.flags & IPV6) == (other.flags & IPV6)
    }
}

/// A programmed backend, to read and update in place.
pub struct EntryMut<'a> {
    id: u32,
    slot: &'a mut Slot,
}

impl EntryMut<'_> {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn refs_mut(&mut self) -> &mut u32 {
        &mut self.slot.refs
    }

    pub fn local(&self) -> bool {
        self.slot.local()
    }

    pub fn set_local(&mut self, local: bool) {
        self.slot.flags = (self.slot.flags & !LOCAL) | if local { LOCAL } else { 0 };
    }
}

#[derive(Debug, Default)]
pub struct BackendTable {
    by_id: Vec<Slot>,
    index: HashTable<u32>,
    /// Seeded per process: pod addresses are chosen by whoever writes EndpointSlices.
    hasher: RandomState,
}

impl BackendTable {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    fn slot(&self, id: u32) -> Option<&Slot> {
        self.by_id.get(id as usize).filter(|slot| slot.in_use())
    }

    fn find(&self, identity: &BackendIdentity) -> Option<u32> {
        let hash = self.hasher.hash_one(identity);
        self.index
            .find(hash, |&id| self.by_id[id as usize].matches(identity))
            .copied()
    }

    fn entry_mut(&mut self, id: u32) -> Option<EntryMut<'_>> {
        let slot = self
            .by_id
            .get_mut(id as usize)
            .filter(|slot| slot.in_use())?;
        Some(EntryMut { id, slot })
    }

    #[cfg(test)]
    pub fn get(&self, identity: &BackendIdentity) -> Option<BackendEntry> {
        let id = self.find(identity)?;
        self.slot(id).map(|slot| BackendEntry {
            id,
            refs: slot.refs,
            local: slot.local(),
        })
    }

    pub fn get_mut(&mut self, identity: &BackendIdentity) -> Option<EntryMut<'_>> {
        let id = self.find(identity)?;
        self.entry_mut(id)
    }

    pub fn get_by_id_mut(&mut self, id: u32) -> Option<EntryMut<'_>> {
        self.entry_mut(id)
    }

    pub fn contains(&self, identity: &BackendIdentity) -> bool {
        self.find(identity).is_some()
    }

    /// The identity behind `id`, if it is programmed.
    pub fn identity(&self, id: u32) -> Option<BackendIdentity> {
        self.slot(id).map(Slot::identity)
    }

    pub fn contains_id(&self, id: u32) -> bool {
        self.slot(id).is_some()
    }

    /// Adds `identity` under `entry.id`, or returns the entry it already has.
    pub fn get_or_insert(
        &mut self,
        identity: BackendIdentity,
        entry: BackendEntry,
    ) -> EntryMut<'_> {
        let id = match self.find(&identity) {
            Some(id) => id,
            None => {
                let id = entry.id;
                let at = id as usize;
                if at >= self.by_id.len() {
                    // Grow by a quarter, not double: at a million backends the slab is
                    // among the largest things the daemon holds. Only the slots up to
                    // the highest id are written: the spare capacity of a large
                    // (mapped) block stays untouched and takes no memory.
                    if at >= self.by_id.capacity() {
                        let wanted = (at + 1).max(self.by_id.len() + self.by_id.len() / 4);
                        self.by_id.reserve_exact(wanted - self.by_id.len());
                    }
                    self.by_id.resize(at + 1, Slot::default());
                }
                debug_assert!(!self.by_id[at].in_use(), "backend id {id} in use twice");
                self.by_id[at] = Slot::new(&identity, entry.refs, entry.local);
                let hash = self.hasher.hash_one(identity);
                let (by_id, hasher) = (&self.by_id, &self.hasher);
                self.index.insert_unique(hash, id, |&other| {
                    hasher.hash_one(by_id[other as usize].identity())
                });
                id
            }
        };
        self.entry_mut(id).expect("found ids have slots")
    }

    /// Forgets `id`; returns its identity if it was programmed.
    pub fn remove_id(&mut self, id: u32) -> Option<BackendIdentity> {
        let identity = self.slot(id)?.identity();
        self.by_id[id as usize] = Slot::default();
        let hash = self.hasher.hash_one(identity);
        if let Ok(found) = self.index.find_entry(hash, |&other| other == id) {
            found.remove();
        }
        Some(identity)
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
            assert_eq!(table.get_or_insert(identity(id), entry).id(), id);
            assert_eq!(table.get(&identity(id)), Some(entry));
        }
        assert_eq!(table.len(), 1000);
        // Inserting a known identity returns its entry, whatever id is offered.
        let mut again = table.get_or_insert(
            identity(7),
            BackendEntry {
                id: 5000,
                refs: 1,
                local: false,
            },
        );
        assert_eq!(again.id(), 7);
        *again.refs_mut() += 1;
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

    #[test]
    fn packed_slots_keep_family_protocol_and_locality_apart() {
        let v4 = BackendIdentity {
            addr: BackendAddr {
                ip: "10.0.0.1".parse().unwrap(),
                port: 53,
            },
            protocol: Protocol::Udp,
        };
        // The same 16 bytes as an IPv6 address, and the same address over TCP.
        let v6 = BackendIdentity {
            addr: BackendAddr {
                ip: "a00:1::".parse().unwrap(),
                port: 53,
            },
            protocol: Protocol::Udp,
        };
        let tcp = BackendIdentity {
            protocol: Protocol::Tcp,
            ..v4
        };
        let sctp = BackendIdentity {
            protocol: Protocol::Sctp,
            ..v6
        };
        let mut table = BackendTable::default();
        for (id, identity) in [(1, v4), (2, v6), (3, tcp), (4, sctp)] {
            let entry = BackendEntry {
                id,
                refs: 1,
                local: id == 2,
            };
            assert_eq!(table.get_or_insert(identity, entry).id(), id);
        }
        assert_eq!(table.len(), 4);
        for (id, identity) in [(1, v4), (2, v6), (3, tcp), (4, sctp)] {
            assert_eq!(table.identity(id), Some(identity));
            assert_eq!(
                table.get(&identity).map(|e| (e.id, e.local)),
                Some((id, id == 2))
            );
        }
        let mut entry = table.get_mut(&v4).unwrap();
        entry.set_local(true);
        *entry.refs_mut() += 2;
        assert_eq!(
            table.get(&v4),
            Some(BackendEntry {
                id: 1,
                refs: 3,
                local: true
            })
        );
        table.get_by_id_mut(2).unwrap().set_local(false);
        assert_eq!(table.get(&v6).map(|e| e.local), Some(false));
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }
}
