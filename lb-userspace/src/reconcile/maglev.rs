//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for external frontends.
//!
//! A table of M entries (M prime) is filled by letting each backend claim, in turn,
//! the next free entry of its own permutation of `0..M`. Each backend ends up with
//! ⌊M/N⌋ or ⌈M/N⌉ entries, and a change of one backend moves little more than that
//! backend's share of entries. The permutations depend only on the backends' addresses,
//! so every node computes the same table for the same backend set and a flow reaches
//! the same backend whichever node it enters.

use super::super::model::BackendAddr;

/// FNV-1a over `bytes`, started from `seed`: stable across builds and machines (the
/// tables of all nodes must agree), unlike std's randomized hasher.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly: finish with a 64-bit avalanche (splitmix64).
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

fn name_of(backend: &BackendAddr) -> Vec<u8> {
    let mut name = match backend.ip {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    name.extend_from_slice(&backend.port.to_be_bytes());
    name
}

/// Whether `n` is prime (table sizes must be, for every skip to yield a permutation).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The Maglev table of `backends` (any order: they are sorted first) with `size`
/// entries (a prime): entry i is an index into `backends`. Empty without backends.
pub fn table(backends: &[BackendAddr], size: u32) -> Vec<u32> {
    debug_assert!(is_prime(size), "Maglev table size {size} is not prime");
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    let n = order.len();
    if n == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let permutations: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let name = name_of(&backends[i]);
            let offset = fnv1a(0x6d61_676c_6576_0001, &name) % m;
            let skip = fnv1a(0x6d61_676c_6576_0002, &name) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entries = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    loop {
        for (turn, &(offset, skip)) in permutations.iter().enumerate() {
            let mut candidate = (offset + next[turn] * skip) % m;
            while entries[candidate as usize] != u32::MAX {
                next[turn] += 1;
                candidate = (offset + next[turn] * skip) % m;
            }
            entries[candidate as usize] = order[turn] as u32;
            next[turn] += 1;
            filled += 1;
            if filled == size as usize {
                return entries;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn pods(n: usize) -> Vec<BackendAddr> {
        (0..n)
            .map(|i| BackendAddr {
                ip: IpAddr::V4(Ipv4Addr::new(10, 244, (i / 200) as u8, (i % 200) as u8 + 2)),
                port: 8080,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &i in table {
            counts[i as usize] += 1;
        }
        counts
    }

    #[test]
    fn every_backend_gets_its_share_within_one_percent() {
        for n in [1, 2, 3, 5, 7, 10, 33, 100, 163] {
            let table = table(&pods(n), 16381);
            let counts = counts(&table, n);
            let fair = 16381.0 / n as f64;
            for (i, c) in counts.iter().enumerate() {
                let off = (*c as f64 - fair).abs() / fair;
                assert!(
                    off <= 0.01,
                    "{n} backends: backend {i} has {c} entries, fair {fair:.1}"
                );
            }
            // Round-robin filling: shares differ by at most one entry.
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "{n} backends: {min}..{max}");
        }
    }

    #[test]
    fn tables_do_not_depend_on_the_order_backends_are_listed() {
        let backends = pods(9);
        let mut reversed = backends.clone();
        reversed.reverse();
        let forward = table(&backends, 4093);
        let backward = table(&reversed, 4093);
        // Same backend (not index) in every entry.
        for (a, b) in forward.iter().zip(&backward) {
            assert_eq!(backends[*a as usize], reversed[*b as usize]);
        }
    }

    /// Entries whose backend changed between two tables, as a fraction of the table.
    fn moved(before: &[BackendAddr], after: &[BackendAddr], size: u32) -> f64 {
        let (a, b) = (table(before, size), table(after, size));
        let changed = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| before[**x as usize] != after[**y as usize])
            .count();
        changed as f64 / size as f64
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        for n in [5, 10, 50] {
            let before = pods(n);
            for removed in [0, n / 2, n - 1] {
                let mut after = before.clone();
                after.remove(removed);
                let fraction = moved(&before, &after, 16381);
                let share = 1.0 / n as f64;
                // The removed backend's share must move. Maglev moves somewhat more (about
                // 1.5x the share at 50 backends), and for 1 of 5 at most the 25% allowed.
                assert!(
                    fraction >= share * 0.99,
                    "{n}: moved {fraction:.4} < share {share:.4}"
                );
                assert!(
                    fraction <= (share * 1.75).min(0.25),
                    "{n} backends, removing #{removed}: {:.1}% of entries moved (share {:.1}%)",
                    fraction * 100.0,
                    share * 100.0
                );
            }
        }
    }

    #[test]
    fn adding_one_backend_moves_little_more_than_its_share() {
        for n in [4, 9, 49] {
            let before = pods(n);
            let after = pods(n + 1);
            let fraction = moved(&before, &after, 16381);
            let share = 1.0 / (n + 1) as f64;
            assert!(
                fraction <= share * 1.75,
                "{n}+1: moved {fraction:.4}, share {share:.4}"
            );
        }
    }

    #[test]
    fn table_sizes_must_be_prime() {
        assert!(is_prime(16381) && is_prime(65521) && is_prime(251) && is_prime(2));
        assert!(!is_prime(16384) && !is_prime(1) && !is_prime(0) && !is_prime(65535));
    }

    #[test]
    fn no_backends_no_table() {
        assert!(table(&[], 251).is_empty());
    }
}
