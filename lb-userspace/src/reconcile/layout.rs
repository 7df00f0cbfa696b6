//! Where each backend of a frontend goes: stable slots.

use std::collections::BTreeSet;

/// Stable slot layout: survivors keep their slot, additions fill holes then append, and
/// a shrink moves trailing backends into holes. A backend listed in several old slots
/// (possible in a kernel state an interrupted update left) keeps only the first.
pub fn layout(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let old_set: BTreeSet<u32> = old.iter().copied().collect();
    let mut additions = wanted.iter().copied().filter(|id| !old_set.contains(id));
    let mut kept = BTreeSet::new();
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|id| (wanted_set.contains(id) && kept.insert(*id)).then_some(*id))
        .collect();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = additions.next();
    }
    slots.extend(additions.map(Some));
    // Compact: drop trailing holes, then move the last backend into the first hole.
    loop {
        while slots.last() == Some(&None) {
            slots.pop();
        }
        match slots.iter().position(Option::is_none) {
            Some(hole) => {
                let last = slots.pop().flatten();
                slots[hole] = last;
            }
            None => break,
        }
    }
    // Collected anew, not in place: in place would keep the capacity of twice as many
    // u32s (the slots of a million endpoints stay in memory).
    let mut ids = Vec::with_capacity(slots.len());
    ids.extend(slots.into_iter().flatten());
    ids
}
