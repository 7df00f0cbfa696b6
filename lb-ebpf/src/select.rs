//! Backend selection: the one place that reads `LB_SERVICES` and `LB_BACKENDS`, and
//! applies session affinity. The socket hooks look up internal-scope frontends and
//! pick a random slot; the TC programs look up external-scope frontends and use the
//! frontend's Maglev table, so every node picks the same backend for a flow.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    AffinityKey, AffinityMember, AffinityValue, Backend, SVC_F_AFFINITY, ServiceKey, ServiceValue,
    stat,
};

use crate::maps::{LB_AFFINITY, LB_AFFINITY_MEMBERS, LB_BACKENDS, LB_MAGLEV, LB_SERVICES, count};

pub enum Selection {
    /// The destination is not a service: leave it alone.
    NotService,
    /// The service exists but has no backends: refuse.
    NoBackend { svc_id: u32 },
    /// The maps stayed inconsistent across retries (should not happen): refuse.
    Failed { svc_id: u32 },
    Backend {
        backend: Backend,
        backend_id: u32,
        svc_id: u32,
    },
}

/// Attempts at a consistent (frontend, slot, backend) read. Userspace updates in
/// make-before-break order, so a slot or backend can only vanish if a shrink or removal
/// lands between our reads; re-reading the frontend then sees the new count.
const ATTEMPTS: u32 = 3;

/// The backend `client` sticks to on frontend `svc_id`, if its entry is fresh and the
/// backend still serves the frontend; refreshes the entry's last use.
#[inline(always)]
fn sticky(client: &AffinityKey, timeout_s: u32, now: u64) -> Option<(u32, Backend)> {
    let entry = LB_AFFINITY.get_ptr_mut(client)?;
    // SAFETY: a value in the LRU, valid while the program runs (RCU); a concurrent
    // update of the same client at worst loses one last-use refresh.
    let value = unsafe { *entry };
    if now.saturating_sub(value.last_used_ns) > timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    let member = AffinityMember {
        svc_id: client.svc_id,
        backend_id: value.backend_id,
    };
    unsafe { LB_AFFINITY_MEMBERS.get(member) }?;
    let backend = (unsafe { LB_BACKENDS.get(value.backend_id) }).copied()?;
    unsafe { (*entry).last_used_ns = now };
    Some((value.backend_id, backend))
}

/// For a frontend with session affinity: keys `client` to it and returns the time
/// of this choice and the backend `client` sticks to, if any (counted as a hit).
#[inline(always)]
fn remembered(frontend: &ServiceValue, client: &mut AffinityKey) -> (u64, Option<Selection>) {
    if frontend.flags & SVC_F_AFFINITY == 0 {
        return (0, None);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    client.svc_id = frontend.svc_id;
    let hit = sticky(client, frontend.affinity_timeout, now).map(|(backend_id, backend)| {
        count(stat::AFFINITY_HIT);
        Selection::Backend {
            backend,
            backend_id,
            svc_id: frontend.svc_id,
        }
    });
    (now, hit)
}

/// Remembers `backend_id`, just chosen afresh, as `client`'s (an affinity miss).
#[inline(always)]
fn remember(client: &AffinityKey, backend_id: u32, now: u64) {
    count(stat::AFFINITY_MISS);
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = LB_AFFINITY.insert(*client, value, 0);
}

/// Picks a backend for `key` (slot ignored) using `hash` to choose the slot; on a
/// frontend with session affinity, `client` (its `svc_id` filled in here) sticks to
/// the backend it was given last, within the frontend's timeout.
#[inline(always)]
pub fn select_backend(key: &mut ServiceKey, hash: u32, client: &mut AffinityKey) -> Selection {
    let mut svc_id = 0;
    for _ in 0..ATTEMPTS {
        key.slot = 0;
        // Copy values out at once: nothing is held across map calls.
        let Some(frontend) = (unsafe { LB_SERVICES.get(*key) }).copied() else {
            return Selection::NotService;
        };
        svc_id = frontend.svc_id;
        if frontend.count == 0 {
            return Selection::NoBackend { svc_id };
        }
        let (now, hit) = remembered(&frontend, client);
        if let Some(hit) = hit {
            return hit;
        }
        key.slot = (hash % frontend.count as u32) as u16 + 1;
        if let Some(slot) = (unsafe { LB_SERVICES.get(*key) }).copied()
            && let Some(backend) = (unsafe { LB_BACKENDS.get(slot.backend_id) }).copied()
        {
            if frontend.flags & SVC_F_AFFINITY != 0 {
                remember(client, slot.backend_id, now);
            }
            return Selection::Backend {
                backend,
                backend_id: slot.backend_id,
                svc_id,
            };
        }
        count(stat::RACE_RETRY);
    }
    Selection::Failed { svc_id }
}

/// The frontend entry of `key` (its slot is reset to 0), if it is a frontend.
#[inline(always)]
pub fn frontend(key: &mut ServiceKey) -> Option<ServiceValue> {
    key.slot = 0;
    (unsafe { LB_SERVICES.get(*key) }).copied()
}

/// Picks a backend for an external flow of frontend `key` hashed to `hash` (the
/// client's address and port) through the frontend's Maglev table: the same choice on
/// every node. With session affinity, the client's remembered backend while it is
/// fresh and still serves; else the table's choice for the client's address alone
/// (`client_hash`), so every node sends a client to the same backend, and remembered.
/// While the table is not written yet, as the socket hooks do.
#[inline(always)]
pub fn select_external(
    key: &mut ServiceKey,
    hash: u32,
    client_hash: u32,
    client: &mut AffinityKey,
) -> Selection {
    let Some(frontend) = frontend(key) else {
        return Selection::NotService;
    };
    let svc_id = frontend.svc_id;
    if frontend.count == 0 {
        return Selection::NoBackend { svc_id };
    }
    let affinity = frontend.flags & SVC_F_AFFINITY != 0;
    let (now, hit) = remembered(&frontend, client);
    if let Some(hit) = hit {
        return hit;
    }
    let slot = if affinity { client_hash } else { hash } % maglev_size();
    if let Some(backend_id) = LB_MAGLEV.backend_id(svc_id, slot)
        && let Some(backend) = (unsafe { LB_BACKENDS.get(backend_id) }).copied()
    {
        if affinity {
            remember(client, backend_id, now);
        }
        return Selection::Backend {
            backend,
            backend_id,
            svc_id,
        };
    }
    select_backend(key, hash, client)
}

/// Entries of every Maglev table (`--maglev-table-size`, set by the loader).
#[unsafe(no_mangle)]
static LB_CONFIG_MAGLEV_SIZE: u32 = lb_common::DEFAULT_MAGLEV_TABLE_SIZE;

#[inline(always)]
fn maglev_size() -> u32 {
    let size = unsafe { core::ptr::read_volatile(&raw const LB_CONFIG_MAGLEV_SIZE) };
    if size == 0 { 1 } else { size }
}

/// murmur3's 32-bit finalizer: every input bit affects every output bit.
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The Maglev hash of an external flow: the client's address, port and protocol only,
/// so the same flow arriving at any node (any node address) hashes alike.
#[inline(always)]
pub fn flow_hash(client: &lb_common::Addr, client_port: u16, proto: u8) -> u32 {
    let mut h = 0x9e37_79b9 ^ proto as u32;
    for word in client {
        h = fmix32(h ^ *word);
    }
    fmix32(h ^ client_port as u32)
}

/// Spreads a 64-bit value (a socket cookie) over 32 bits so `% count` is fair.
#[inline(always)]
pub fn hash64(value: u64) -> u32 {
    let mixed = (value ^ (value >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 32) as u32
}
