//! Backend selection: the one place that reads `LB_SERVICES` and `LB_BACKENDS`.

use lb_common::{Backend, ServiceKey, stat};

use crate::maps::{LB_BACKENDS, LB_SERVICES, count};

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

/// Picks a backend for `key` (slot ignored) using `hash` to choose the slot.
#[inline(always)]
pub fn select_backend(key: &mut ServiceKey, hash: u32) -> Selection {
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
        key.slot = (hash % frontend.count as u32) as u16 + 1;
        if let Some(slot) = (unsafe { LB_SERVICES.get(*key) }).copied()
            && let Some(backend) = (unsafe { LB_BACKENDS.get(slot.backend_id) }).copied()
        {
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

/// Spreads a 64-bit value (a socket cookie) over 32 bits so `% count` is fair.
#[inline(always)]
pub fn hash64(value: u64) -> u32 {
    let mixed = (value ^ (value >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 32) as u32
}
