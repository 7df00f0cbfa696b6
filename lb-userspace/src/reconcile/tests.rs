use std::net::IpAddr;

use super::{memory::MemoryMaps, *};
use crate::model::{
    ObjectRef,
    endpoints::{Exclusion, Topology},
    frontends::FrontendKind,
};

fn fkey(ip: &str, port: u16) -> FrontendKey {
    FrontendKey::internal(ip.parse().unwrap(), port, Protocol::Tcp)
}

fn frontend(key: FrontendKey, backends: &[&str]) -> Frontend {
    Frontend {
        key,
        service: ObjectRef::new("pods", "redis-master"),
        port_name: String::new(),
        kind: FrontendKind::ClusterIp,
        backends: backends
            .iter()
            .map(|ip| BackendAddr {
                ip: ip.parse().unwrap(),
                port: 6379,
            })
            .collect(),
        local: Default::default(),
        excluded: Vec::new(),
        affinity_timeout: None,
        created: None,
        local_policy: false,
        topology: Topology::Any,
        source_ranges: Vec::new(),
    }
}

fn change(f: Frontend) -> BTreeMap<FrontendKey, Option<Arc<Frontend>>> {
    BTreeMap::from([(f.key, Some(Arc::new(f)))])
}

/// One apply's upserts of all of `frontends`.
fn changes<'a>(
    frontends: impl IntoIterator<Item = &'a Frontend>,
) -> BTreeMap<FrontendKey, Option<Arc<Frontend>>> {
    frontends
        .into_iter()
        .map(|f| (f.key, Some(Arc::new(f.clone()))))
        .collect()
}

/// A frontend programmed with `backends`, with the operation log cleared.
fn programmed(backends: &[&str]) -> (MemoryMaps, Reconciler, FrontendKey) {
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    let key = fkey("10.96.0.100", 6379);
    rec.apply(&mut maps, &change(frontend(key, backends)))
        .unwrap();
    maps.log.clear();
    (maps, rec, key)
}

/// What a restarted daemon builds from the maps.
fn adopt(maps: &MemoryMaps) -> Reconciler {
    Reconciler::adopt(
        Limits::default(),
        maps.services.iter().map(|(k, v)| (*k, *v)),
        maps.backends.iter().map(|(k, v)| (*k, *v)),
        maps.names.iter().map(|(k, v)| (*k, v.clone())),
        maps.members.iter().copied(),
    )
}

fn gone_ips(stats: &ApplyStats) -> Vec<String> {
    stats
        .gone
        .iter()
        .map(|g| g.backend.addr.ip.to_string())
        .collect()
}

fn reachable_ips(maps: &MemoryMaps, key: &FrontendKey) -> BTreeSet<IpAddr> {
    maps.reachable(&service_key(key, 0))
        .iter()
        .map(|b| addr_to_ip(&b.addr))
        .collect()
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|ip| ip.parse().unwrap()).collect()
}

#[test]
fn layout_is_stable() {
    assert_eq!(layout(&[], &[1, 2, 3]), vec![1, 2, 3]);
    // Remove the middle one: the last moves into its slot.
    assert_eq!(layout(&[1, 2, 3], &[1, 3]), vec![1, 3]);
    // Replace one: the new one takes the hole.
    assert_eq!(layout(&[1, 2, 3], &[1, 3, 4]), vec![1, 4, 3]);
    // Remove the last: nothing moves.
    assert_eq!(layout(&[1, 2, 3], &[1, 2]), vec![1, 2]);
    assert_eq!(layout(&[1, 2, 3, 4], &[4]), vec![4]);
    assert_eq!(layout(&[1, 2], &[]), Vec::<u32>::new());
    // A backend in two slots (left by an interrupted shrink) ends up in one.
    assert_eq!(layout(&[4, 2, 3, 4], &[4]), vec![4]);
    assert_eq!(layout(&[4, 2, 4], &[4, 2]), vec![4, 2]);
}

#[test]
fn first_sync_writes_backends_then_slots_then_frontend() {
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    let key = fkey("10.96.0.100", 6379);
    let stats = rec
        .apply(
            &mut maps,
            &change(frontend(
                key,
                &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
            )),
        )
        .unwrap();
    assert_eq!(
        maps.log,
        vec![
            "put_backend 1",
            "put_backend 2",
            "put_backend 3",
            "put_slot 1=1",
            "put_slot 2=2",
            "put_slot 3=3",
            "put_frontend count=3"
        ]
    );
    assert_eq!(stats.writes(), 7);
    assert_eq!(
        reachable_ips(&maps, &key),
        ips(&["10.244.1.11", "10.244.1.12", "10.244.1.13"])
    );
}

#[test]
fn pod_restart_with_new_ip_rewrites_one_slot() {
    let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]);
    // redis-2 restarts as 10.244.1.22.
    let stats = rec
        .apply(
            &mut maps,
            &change(frontend(
                key,
                &["10.244.1.11", "10.244.1.22", "10.244.1.13"],
            )),
        )
        .unwrap();
    assert_eq!(
        maps.log,
        vec!["put_backend 4", "put_slot 2=4", "delete_backend 2"]
    );
    assert_eq!(stats.writes(), 3);
    assert_eq!(
        reachable_ips(&maps, &key),
        ips(&["10.244.1.11", "10.244.1.22", "10.244.1.13"])
    );
    // The old pod is gone: its sockets are to be terminated.
    assert_eq!(gone_ips(&stats), vec!["10.244.1.12"]);
}

#[test]
fn scale_down_to_zero_and_back() {
    let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]);
    rec.apply(&mut maps, &change(frontend(key, &["10.244.1.13"])))
        .unwrap();
    // Count shrinks before the slots go; then the unreferenced backends go.
    assert_eq!(
        maps.log,
        vec![
            "put_slot 1=3",
            "put_frontend count=1",
            "delete_slot 2",
            "delete_slot 3",
            "delete_backend 1",
            "delete_backend 2"
        ]
    );
    maps.log.clear();
    rec.apply(&mut maps, &change(frontend(key, &[]))).unwrap();
    assert_eq!(
        maps.log,
        vec!["put_frontend count=0", "delete_slot 1", "delete_backend 3"]
    );
    // The frontend stays, with no backends: connect() is refused.
    assert_eq!(maps.services[&service_key(&key, 0)].count, 0);
    rec.apply(&mut maps, &change(frontend(key, &["10.244.1.14"])))
        .unwrap();
    assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.14"]));
}

#[test]
fn removing_a_frontend_deletes_the_entry_first_and_frees_ids() {
    let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12"]);
    rec.apply(&mut maps, &BTreeMap::from([(key, None)]))
        .unwrap();
    assert_eq!(
        maps.log,
        vec![
            "delete_frontend",
            "delete_slot 1",
            "delete_slot 2",
            "delete_backend 1",
            "delete_backend 2"
        ]
    );
    assert!(maps.services.is_empty() && maps.backends.is_empty());
    assert_eq!(rec.frontend_count(), 0);
    assert_eq!(rec.backend_count(), 0);
}

#[test]
fn retained_endpoints_are_not_gone() {
    let (mut maps, mut rec, key) = programmed(&["10.244.1.11", "10.244.1.12"]);
    // .12 turns terminating: unselected but still listed, so it drains.
    let mut draining = frontend(key, &["10.244.1.11"]);
    draining.excluded = vec![(
        BackendAddr {
            ip: "10.244.1.12".parse().unwrap(),
            port: 6379,
        },
        Exclusion::Terminating,
    )];
    let stats = rec.apply(&mut maps, &change(draining)).unwrap();
    assert!(stats.gone.is_empty(), "{:?}", stats.gone);
    assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.11"]));
    // Then the pod disappears from the slice: now its sockets must go.
    let stats = rec
        .apply(&mut maps, &change(frontend(key, &["10.244.1.11"])))
        .unwrap();
    assert_eq!(gone_ips(&stats), vec!["10.244.1.12"]);
    // Removing the whole frontend reports every backend it had.
    let stats = rec
        .apply(&mut maps, &BTreeMap::from([(key, None)]))
        .unwrap();
    assert_eq!(stats.gone.len(), 1);
}

#[test]
fn backends_shared_between_frontends_live_until_the_last_user_goes() {
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    let a = fkey("10.96.0.100", 6379);
    let b = fkey("10.96.0.101", 6379);
    let mut both = change(frontend(a, &["10.244.1.11"]));
    both.insert(b, Some(Arc::new(frontend(b, &["10.244.1.11"]))));
    rec.apply(&mut maps, &both).unwrap();
    assert_eq!(
        maps.backends.len(),
        1,
        "one backend entry shared by two frontends"
    );
    rec.apply(&mut maps, &BTreeMap::from([(a, None)])).unwrap();
    assert_eq!(maps.backends.len(), 1);
    assert_eq!(reachable_ips(&maps, &b), ips(&["10.244.1.11"]));
    rec.apply(&mut maps, &BTreeMap::from([(b, None)])).unwrap();
    assert!(maps.backends.is_empty());
}

#[test]
fn ids_are_not_reused_immediately() {
    let mut alloc = IdAllocator::new(8);
    let a = alloc.allocate().unwrap();
    alloc.release(a);
    let b = alloc.allocate().unwrap();
    assert_ne!(a, b);
    let rest: Vec<u32> = (0..5).map(|_| alloc.allocate().unwrap()).collect();
    assert_eq!(rest, vec![3, 4, 5, 6, 7]);
    // Only once every other id was used does the freed one come back.
    assert_eq!(alloc.allocate(), Some(a));
    assert_eq!(alloc.allocate(), None, "ids 1..8 are all taken");
}

#[test]
fn adopting_kernel_state_writes_nothing_when_it_matches() {
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    let key = fkey("10.96.0.100", 6379);
    let desired = frontend(key, &["10.244.1.11", "10.244.1.12"]);
    rec.apply(&mut maps, &change(desired.clone())).unwrap();

    // A restarted daemon adopts the maps: identical desired state means no writes.
    let mut adopted = adopt(&maps);
    let desired_all = BTreeMap::from([(key, Arc::new(desired.clone()))]);
    assert!(adopted.diff_all(&desired_all).is_empty());
    maps.log.clear();
    // A change after adoption reuses the adopted ids.
    let changed = frontend(key, &["10.244.1.11", "10.244.1.13"]);
    adopted.apply(&mut maps, &change(changed)).unwrap();
    assert_eq!(
        maps.log,
        vec!["put_backend 3", "put_slot 2=3", "delete_backend 2"]
    );
}

/// An interrupted shrink can leave one backend in two slots (moved into a hole before
/// the count dropped); adoption counts it once, and the next update neither keeps the
/// duplicate nor frees the backend while a slot still points at it.
#[test]
fn a_backend_left_in_two_slots_is_counted_once() {
    let (mut maps, _, key) = programmed(&["10.244.1.11", "10.244.1.12", "10.244.1.13"]);
    let third = maps.services[&service_key(&key, 3)];
    maps.services.insert(service_key(&key, 1), third);
    let mut adopted = adopt(&maps);
    let changes = adopted.diff_all(&BTreeMap::from([(
        key,
        Arc::new(frontend(key, &["10.244.1.13"])),
    )]));
    adopted.apply(&mut maps, &changes).unwrap();
    assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.13"]));
    assert_eq!(maps.services[&service_key(&key, 0)].count, 1);
    // Moving the backend to another frontend and removing this one frees nothing in use.
    let other = fkey("10.96.0.101", 6379);
    let mut swap = change(frontend(other, &["10.244.1.13"]));
    swap.insert(key, None);
    adopted.apply(&mut maps, &swap).unwrap();
    assert_eq!(reachable_ips(&maps, &other), ips(&["10.244.1.13"]));
    assert!(maps.unreachable().is_empty());
}

/// Two backend ids holding the same pod, each in a slot of one frontend (another
/// writer's leftovers): adoption keeps the first slot's id, rewrites the other slot
/// and deletes its id, so the frontend ends with each of its pods once.
#[test]
fn a_backend_under_two_ids_is_adopted_once() {
    let (mut maps, _, key) = programmed(&["10.244.1.11", "10.244.1.12"]);
    let first = maps.services[&service_key(&key, 1)].backend_id;
    let twin = 77;
    maps.backends.insert(twin, maps.backends[&first]);
    maps.services
        .get_mut(&service_key(&key, 2))
        .unwrap()
        .backend_id = twin;
    let mut adopted = adopt(&maps);
    let desired = BTreeMap::from([(
        key,
        Arc::new(frontend(key, &["10.244.1.11", "10.244.1.12"])),
    )]);
    let changes = adopted.diff_all(&desired);
    assert_eq!(changes.len(), 1, "the frontend is rewritten");
    adopted.apply(&mut maps, &changes).unwrap();
    assert_eq!(
        reachable_ips(&maps, &key),
        ips(&["10.244.1.11", "10.244.1.12"])
    );
    assert!(!maps.backends.contains_key(&twin), "{:?}", maps.backends);
    assert_eq!(maps.backends.len(), 2);
    assert!(maps.unreachable().is_empty());
    assert!(adopted.diff_all(&desired).is_empty());
}

#[test]
fn adoption_cleans_leftovers_of_an_interrupted_update() {
    let (mut maps, _, key) = programmed(&["10.244.1.11", "10.244.1.12"]);
    // Simulate a crash mid-shrink: count already 1, slot 2 and backend 2 left behind,
    // plus an orphan slot of a frontend that no longer exists.
    maps.services.get_mut(&service_key(&key, 0)).unwrap().count = 1;
    let orphan = service_key(&fkey("10.96.0.200", 80), 1);
    maps.services.insert(
        orphan,
        ServiceValue {
            backend_id: 1,
            svc_id: 9,
            ..Default::default()
        },
    );
    let mut adopted = adopt(&maps);
    let desired = BTreeMap::from([(key, Arc::new(frontend(key, &["10.244.1.11"])))]);
    let changes = adopted.diff_all(&desired);
    assert!(changes.is_empty(), "slot 1 is intact: {changes:?}");
    adopted.apply(&mut maps, &changes).unwrap();
    assert!(!maps.services.contains_key(&service_key(&key, 2)));
    assert!(!maps.services.contains_key(&orphan));
    assert!(!maps.backends.contains_key(&2));
    assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.11"]));
}

#[test]
fn diff_all_removes_what_is_not_desired() {
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    let a = fkey("10.96.0.100", 6379);
    rec.apply(&mut maps, &change(frontend(a, &["10.244.1.11"])))
        .unwrap();
    let changes = rec.diff_all(&BTreeMap::new());
    assert_eq!(changes, BTreeMap::from([(a, None)]));
}

#[test]
fn a_failed_write_leaves_the_kernel_consistent() {
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    let key = fkey("10.96.0.100", 6379);
    rec.apply(&mut maps, &change(frontend(key, &["10.244.1.11"])))
        .unwrap();
    // The second backend write of the next update fails; the invariant checks in
    // MemoryMaps prove no connect could have seen a dangling slot.
    maps.fail_put_at = Some(4);
    let err = rec
        .apply(
            &mut maps,
            &change(frontend(
                key,
                &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
            )),
        )
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.11"]));
    // A resync from the kernel's state converges.
    let mut resynced = adopt(&maps);
    let desired = BTreeMap::from([(
        key,
        Arc::new(frontend(
            key,
            &["10.244.1.11", "10.244.1.12", "10.244.1.13"],
        )),
    )]);
    let changes = resynced.diff_all(&desired);
    resynced.apply(&mut maps, &changes).unwrap();
    assert_eq!(
        reachable_ips(&maps, &key),
        ips(&["10.244.1.11", "10.244.1.12", "10.244.1.13"])
    );
    assert_eq!(
        maps.backends.len(),
        3,
        "the half-written backend was collected"
    );
}

#[test]
fn many_random_updates_keep_the_invariant() {
    // A deterministic pseudo-random walk over backend sets for a few frontends;
    // MemoryMaps asserts the connect() invariant after every single operation.
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    let keys: Vec<FrontendKey> = (0..4)
        .map(|i| fkey(&format!("10.96.0.{}", 10 + i), 80))
        .collect();
    let mut seed: u64 = 0x1234_5678;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..400 {
        let key = keys[(next() % 4) as usize];
        let change = if next() % 10 == 0 {
            None
        } else {
            let n = next() % 6;
            let pool: Vec<String> = (0..n)
                .map(|_| format!("10.244.1.{}", next() % 12 + 1))
                .collect();
            let refs: Vec<&str> = pool.iter().map(String::as_str).collect();
            let mut f = frontend(key, &refs);
            f.backends.sort();
            f.backends.dedup();
            Some(f)
        };
        let expected: BTreeSet<IpAddr> = change
            .as_ref()
            .map(|f| f.backends.iter().map(|b| b.ip).collect())
            .unwrap_or_default();
        rec.apply(&mut maps, &BTreeMap::from([(key, change.map(Arc::new))]))
            .unwrap();
        assert_eq!(reachable_ips(&maps, &key), expected);
    }
    // No leaked backends: every backend in the map is referenced by some slot.
    let referenced: BTreeSet<u32> = maps
        .services
        .iter()
        .filter(|(k, _)| k.slot > 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    assert_eq!(referenced, maps.backends.keys().copied().collect());
}

fn small(frontends: u32, backends: u32, service_entries: u32) -> Limits {
    Limits {
        frontends,
        backends,
        service_entries,
        ..Limits::default()
    }
}

#[test]
fn frontends_past_capacity_are_reported_and_earlier_ones_keep_working() {
    // Ids 1..4: three frontends fit; LB_SERVICES holds 8 entries.
    let limits = small(4, 64, 8);
    let mut maps = MemoryMaps::with_limits(limits);
    let mut rec = Reconciler::new(limits);
    let keys: Vec<FrontendKey> = (0..5)
        .map(|i| fkey(&format!("10.96.0.{}", 10 + i), 80))
        .collect();
    let mut changes = BTreeMap::new();
    for key in &keys {
        changes.insert(*key, Some(Arc::new(frontend(*key, &["10.244.1.11"]))));
    }
    let stats = rec.apply(&mut maps, &changes).unwrap();
    // Three frontends (2 entries each) get the three ids; two wait for one.
    assert_eq!(rec.frontend_count(), 3);
    assert_eq!(
        stats.unprogrammed,
        vec![
            (keys[3], Shortage::Frontends),
            (keys[4], Shortage::Frontends)
        ]
    );
    for key in &keys[..3] {
        assert_eq!(reachable_ips(&maps, key), ips(&["10.244.1.11"]));
    }
    for key in &keys[3..] {
        assert!(
            !maps.services.contains_key(&service_key(key, 0)),
            "all of it or none"
        );
    }
    assert!(maps.unreachable().is_empty());

    // An update that does not fit (6 + 3 > 8 entries) leaves the previous version.
    let four = ["10.244.1.11", "10.244.1.12", "10.244.1.13", "10.244.1.14"];
    let stats = rec
        .apply(&mut maps, &change(frontend(keys[0], &four)))
        .unwrap();
    assert_eq!(
        stats.unprogrammed,
        vec![(keys[0], Shortage::ServiceEntries)]
    );
    assert_eq!(reachable_ips(&maps, &keys[0]), ips(&["10.244.1.11"]));

    // Space frees up: a retry of `pending` programs what fits now, in key order.
    let stats = rec
        .apply(
            &mut maps,
            &BTreeMap::from([(keys[1], None), (keys[2], None)]),
        )
        .unwrap();
    assert!(stats.freed_space());
    let stats = rec.apply(&mut maps, &rec.pending()).unwrap();
    assert_eq!(stats.now_programmed, vec![keys[0], keys[3]]);
    assert_eq!(
        stats.unprogrammed,
        vec![(keys[4], Shortage::ServiceEntries)]
    );
    assert_eq!(reachable_ips(&maps, &keys[0]), ips(&four));
    assert_eq!(reachable_ips(&maps, &keys[3]), ips(&["10.244.1.11"]));
    assert!(!maps.services.contains_key(&service_key(&keys[4], 0)));
    assert_eq!(rec.service_entry_count(), maps.services.len());
    assert!(maps.unreachable().is_empty());
}

#[test]
fn backends_past_capacity_keep_the_frontend_out_entirely() {
    let limits = small(16, 4, 64);
    let mut maps = MemoryMaps::with_limits(limits);
    let mut rec = Reconciler::new(limits);
    let a = fkey("10.96.0.10", 80);
    let b = fkey("10.96.0.11", 80);
    rec.apply(
        &mut maps,
        &change(frontend(a, &["10.244.1.1", "10.244.1.2"])),
    )
    .unwrap();
    // b needs two new backends; only one id is left (ids 1..4).
    let stats = rec
        .apply(
            &mut maps,
            &change(frontend(b, &["10.244.1.1", "10.244.1.3", "10.244.1.4"])),
        )
        .unwrap();
    assert_eq!(stats.unprogrammed, vec![(b, Shortage::Backends)]);
    assert!(!maps.services.contains_key(&service_key(&b, 0)));
    assert_eq!(maps.backends.len(), 2, "nothing half-written");
    // Reusing existing backends fits.
    let stats = rec
        .apply(
            &mut maps,
            &change(frontend(b, &["10.244.1.1", "10.244.1.2", "10.244.1.3"])),
        )
        .unwrap();
    assert!(stats.unprogrammed.is_empty());
    assert_eq!(
        reachable_ips(&maps, &b),
        ips(&["10.244.1.1", "10.244.1.2", "10.244.1.3"])
    );
}

#[test]
fn affinity_frontends_list_their_backends_as_members() {
    let key = fkey("10.96.0.100", 6379);
    let mut sticky = frontend(key, &["10.244.1.1", "10.244.1.2"]);
    sticky.affinity_timeout = Some(10_800);
    let mut maps = MemoryMaps::default();
    let mut rec = Reconciler::default();
    rec.apply(&mut maps, &change(sticky.clone())).unwrap();
    assert_eq!(maps.members.len(), 2);
    assert_eq!(maps.members, maps.wanted_members());
    // Written with the slots, before the frontend entry makes them reachable.
    let put_member = maps
        .log
        .iter()
        .position(|op| op.starts_with("put_member"))
        .unwrap();
    let put_frontend = maps
        .log
        .iter()
        .position(|op| op.starts_with("put_frontend"))
        .unwrap();
    assert!(put_member < put_frontend, "{:?}", maps.log);

    // A backend leaves: its member goes after its slot.
    maps.log.clear();
    let mut shrunk = sticky.clone();
    shrunk.backends.truncate(1);
    rec.apply(&mut maps, &change(shrunk.clone())).unwrap();
    assert_eq!(maps.members.len(), 1);
    assert_eq!(maps.members, maps.wanted_members());
    let slot = maps
        .log
        .iter()
        .position(|op| op.starts_with("delete_slot"))
        .unwrap();
    let member = maps
        .log
        .iter()
        .position(|op| op.starts_with("delete_member"))
        .unwrap();
    assert!(slot < member, "{:?}", maps.log);

    // A restart that finds a member missing rewrites it; one left over is deleted.
    maps.members.clear();
    maps.members.insert(AffinityMember {
        svc_id: 77,
        backend_id: 5,
    });
    let mut adopted = adopt(&maps);
    let desired = BTreeMap::from([(key, Arc::new(shrunk.clone()))]);
    let diff = adopted.diff_all(&desired);
    assert_eq!(diff.len(), 1, "missing members make the frontend differ");
    adopted.apply(&mut maps, &diff).unwrap();
    assert_eq!(maps.members, maps.wanted_members());
    assert_eq!(maps.members.len(), 1);

    // Affinity switched off: no members; removed frontends leave none either.
    let mut plain = shrunk.clone();
    plain.affinity_timeout = None;
    adopted.apply(&mut maps, &change(plain)).unwrap();
    assert!(maps.members.is_empty());
    adopted.apply(&mut maps, &change(shrunk)).unwrap();
    assert_eq!(maps.members.len(), 1);
    adopted
        .apply(&mut maps, &BTreeMap::from([(key, None)]))
        .unwrap();
    assert!(maps.members.is_empty());
    assert!(maps.unreachable().is_empty());
}

/// A pseudo-random walk through Services (some fighting over one ClusterIP:port),
/// slices, deletions, injected write failures and small capacities. After every step
/// (with a resync from the kernel's state after a failure, as the daemon does), the
/// maps hold exactly the model's frontends that fit, nothing unreachable, and
/// frontends that did not fit are entirely absent or at their previous version.
#[test]
fn the_maps_follow_the_model_through_failures_and_capacity_limits() {
    follow_the_model(false);
}

/// The same walk with writes the kernel keeps refusing for some frontend addresses,
/// applied as the controller does: failures are isolated, never the whole apply.
#[test]
fn the_maps_follow_the_model_when_the_kernel_refuses_some_frontends() {
    follow_the_model(true);
}

fn follow_the_model(isolating: bool) {
    use crate::model::{Model, ServiceSpec, SliceSpec, spec};

    let limits = small(10, 14, 36);
    let mut maps = MemoryMaps::with_limits(limits);
    let mut rec = Reconciler::new(limits);
    let mut model = Model::default();
    let mut seed: u64 = 0x9e37_79b9;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let service = |i: u64, ip: u64, affinity: bool| {
        Arc::new(ServiceSpec {
            id: ObjectRef::new("pods", format!("svc-{i}")),
            service_type: spec::ServiceType::ClusterIP,
            cluster_ips: vec![format!("10.96.0.{}", 10 + ip).parse().unwrap()],
            ports: vec![spec::ServicePortSpec {
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: spec::TargetPort::Number(8080),
                node_port: None,
            }],
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            affinity_timeout: affinity.then_some(10_800),
            internal_local: false,
            external_local: false,
            health_check_node_port: None,
            traffic_distribution: None,
            created: None,
        })
    };
    let slice = |i: u64, endpoints: Vec<IpAddr>| {
        Arc::new(SliceSpec {
            id: ObjectRef::new("pods", format!("svc-{i}-x")),
            service: ObjectRef::new("pods", format!("svc-{i}")),
            address_type: Some(spec::AddressType::Ipv4),
            ports: vec![spec::SlicePort {
                name: String::new(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            endpoints: endpoints
                .into_iter()
                .map(|address| spec::SliceEndpoint {
                    address,
                    ready: true,
                    serving: true,
                    terminating: false,
                    placement: Default::default(),
                })
                .collect(),
            trigger_time: None,
        })
    };
    let mut failures = 0;
    let mut refusals = 0;
    for step in 0..2000 {
        let i = next(12);
        match next(10) {
            0 => model.remove_service(&ObjectRef::new("pods", format!("svc-{i}"))),
            1 => model.remove_slice(&ObjectRef::new("pods", format!("svc-{i}-x"))),
            // Eight addresses for twelve Services: conflicts happen.
            // Affinity comes and goes too.
            2..=4 => model.upsert_service(service(i, next(8), next(2) == 0)),
            _ => {
                let n = next(6);
                let endpoints = (0..n)
                    .map(|_| format!("10.244.1.{}", next(20) + 1).parse().unwrap())
                    .collect();
                model.upsert_slice(slice(i, endpoints));
            }
        }
        if next(4) == 0 {
            maps.fail_put_at = Some(maps.puts() + 1 + next(4) as usize);
        }
        if isolating && next(8) == 0 {
            // The kernel refuses one of the eight addresses for a while, or none.
            maps.refused_addrs.clear();
            if next(2) == 0 {
                let ip = format!("10.96.0.{}", 10 + next(8)).parse().unwrap();
                maps.refused_addrs.insert(ip);
            }
        }
        let changes = model.recompute();
        if isolating {
            let mut refusals_left = 2;
            let mut stats = rec
                .apply_isolating(&mut maps, &changes.frontends, &mut refusals_left)
                .unwrap();
            maps.fail_put_at = None;
            if stats.retried_after.is_some() {
                failures += 1;
            }
            // What the controller does: retry when space frees, and what was refused.
            if stats.freed_space() || rec.has_refused() {
                let mut retry = rec.pending();
                retry.extend(rec.refused().map(|(k, f)| (k, Some(f))));
                stats = rec
                    .apply_isolating(&mut maps, &retry, &mut refusals_left)
                    .unwrap();
            }
            refusals += stats.refused.len();
            for (key, _) in &stats.refused {
                assert!(
                    maps.refused_addrs.contains(&key.ip) || refusals_left == 0,
                    "step {step}: {key} refused for no reason"
                );
            }
        } else {
            let result = rec.apply(&mut maps, &changes.frontends);
            maps.fail_put_at = None;
            let freed = result.as_ref().is_ok_and(ApplyStats::freed_space);
            if result.is_err() {
                failures += 1;
                rec = adopt_with(limits, &maps);
                let diff = rec.diff_all(model.frontends());
                rec.apply(&mut maps, &diff).unwrap();
            } else if freed && !rec.unprogrammed().is_empty() {
                rec.apply(&mut maps, &rec.pending()).unwrap();
            }
        }
        assert!(
            maps.unreachable().is_empty(),
            "step {step}: {:?}",
            maps.unreachable()
        );
        assert_eq!(maps.members, maps.wanted_members(), "step {step}");
        for (key, frontend) in model.frontends() {
            let in_kernel = maps.services.contains_key(&service_key(key, 0));
            if rec.unprogrammed().contains_key(key) {
                assert_eq!(in_kernel, rec.is_programmed(key), "step {step}: {key}");
                continue;
            }
            let want: BTreeSet<IpAddr> = frontend.backends.iter().map(|b| b.ip).collect();
            assert_eq!(reachable_ips(&maps, key), want, "step {step}: {key}");
        }
        for key in maps.services.keys().filter(|k| k.slot == 0) {
            let ip = addr_to_ip(&key.addr);
            assert!(
                model.frontends().keys().any(|k| k.ip == ip),
                "step {step}: {ip} is in the kernel but not in the model"
            );
        }
        assert_eq!(
            rec.service_entry_count(),
            maps.services.len(),
            "step {step}"
        );
        assert!(maps.backends.len() < limits.backends as usize);
    }
    assert!(failures > 80, "only {failures} injected failures");
    assert!(!isolating || refusals > 50, "only {refusals} refusals");
}

fn adopt_with(limits: Limits, maps: &MemoryMaps) -> Reconciler {
    Reconciler::adopt(
        limits,
        maps.services.iter().map(|(k, v)| (*k, *v)),
        maps.backends.iter().map(|(k, v)| (*k, *v)),
        maps.names.iter().map(|(k, v)| (*k, v.clone())),
        maps.members.iter().copied(),
    )
}

fn external(ip: &str, port: u16, backends: &[&str]) -> Frontend {
    let mut f = frontend(
        FrontendKey {
            scope: Scope::External,
            ..fkey(ip, port)
        },
        backends,
    );
    f.kind = FrontendKind::NodePort;
    f
}

#[test]
fn external_frontends_get_a_maglev_table_before_their_entry_and_lose_it_after() {
    let mut maps = MemoryMaps::default();
    let mut r = Reconciler::default().with_maglev_size(251);
    let f = external("10.253.0.11", 30002, &["10.244.1.2", "10.244.1.3"]);
    let key = f.key;
    r.apply(&mut maps, &change(f)).unwrap();
    let svc_id = maps.services[&service_key(&key, 0)].svc_id;
    let table = &maps.tables[&svc_id];
    assert_eq!(table.len(), 251);
    let ids: BTreeSet<u32> = table.iter().copied().collect();
    assert_eq!(ids.len(), 2, "both backends in the table");
    let table_at = maps
        .log
        .iter()
        .position(|op| op.starts_with("put_table"))
        .unwrap();
    let entry_at = maps
        .log
        .iter()
        .position(|op| op.starts_with("put_frontend"))
        .unwrap();
    assert!(table_at < entry_at, "{:?}", maps.log);

    // One backend leaves: a new table without it, written before the backend is deleted
    // (MemoryMaps panics if a table points at a missing backend).
    maps.log.clear();
    r.apply(
        &mut maps,
        &change(external("10.253.0.11", 30002, &["10.244.1.2"])),
    )
    .unwrap();
    assert_eq!(
        maps.tables[&svc_id]
            .iter()
            .copied()
            .collect::<BTreeSet<u32>>()
            .len(),
        1
    );
    // An unchanged frontend is not rewritten.
    maps.log.clear();
    r.apply(
        &mut maps,
        &change(external("10.253.0.11", 30002, &["10.244.1.2"])),
    )
    .unwrap();
    assert!(
        !maps.log.iter().any(|op| op.starts_with("put_table")),
        "{:?}",
        maps.log
    );

    // Removed: table gone too; a ClusterIP frontend never has one.
    r.apply(&mut maps, &BTreeMap::from([(key, None)])).unwrap();
    assert!(maps.tables.is_empty());
    r.apply(
        &mut maps,
        &change(frontend(fkey("10.96.0.1", 80), &["10.244.1.2"])),
    )
    .unwrap();
    assert!(maps.tables.is_empty());
}

#[test]
fn source_ranges_are_written_per_frontend_and_follow_changes() {
    let mut maps = MemoryMaps::default();
    let mut r = Reconciler::default();
    let mut f = external("10.111.254.11", 6379, &["10.244.1.2"]);
    f.kind = FrontendKind::LoadBalancer;
    f.source_ranges = vec![crate::model::spec::Cidr::parse("10.253.0.0/16").unwrap()];
    r.apply(&mut maps, &change(f.clone())).unwrap();
    let svc_id = maps.services[&service_key(&f.key, 0)].svc_id;
    let range = *maps.ranges.iter().next().unwrap();
    assert_eq!(u32::from_be(range.svc_id_be), svc_id);
    // 32 bits of frontend id, 96 of the IPv4-mapped prefix, 16 of the range.
    assert_eq!(range.prefix_len, 32 + 96 + 16);
    assert_eq!(range.addr, addr_from_ip("10.253.0.0".parse().unwrap()));
    assert_ne!(
        maps.services[&service_key(&f.key, 0)].flags & SVC_F_SOURCE_RANGES,
        0
    );

    f.source_ranges = vec![crate::model::spec::Cidr::parse("192.0.2.0/24").unwrap()];
    r.apply(&mut maps, &change(f.clone())).unwrap();
    assert_eq!(maps.ranges.len(), 1);
    assert_eq!(maps.ranges.iter().next().unwrap().prefix_len, 32 + 96 + 24);
    r.apply(&mut maps, &BTreeMap::from([(f.key, None)]))
        .unwrap();
    assert!(maps.ranges.is_empty());
}

#[test]
fn a_backends_locality_follows_its_endpoint() {
    let mut maps = MemoryMaps::default();
    let mut r = Reconciler::default();
    let mut f = external("10.253.0.11", 30002, &["10.244.1.2"]);
    r.apply(&mut maps, &change(f.clone())).unwrap();
    let id = maps.services[&service_key(&f.key, 1)].backend_id;
    assert_eq!(maps.backends[&id].flags & BACKEND_F_LOCAL, 0);
    // The endpoint's nodeName arrives (or the Node is renamed): the same backend id,
    // now local, so the TC path stops SNATing to it.
    f.local = crate::model::frontends::LocalMask::all(f.backends.len());
    r.apply(&mut maps, &change(f.clone())).unwrap();
    assert_eq!(maps.services[&service_key(&f.key, 1)].backend_id, id);
    assert_ne!(maps.backends[&id].flags & BACKEND_F_LOCAL, 0);
    // Adopted state knows it: nothing to rewrite for it.
    let mut adopted = adopt(&maps);
    let stats = adopted.apply(&mut maps, &change(f)).unwrap();
    assert_eq!(stats.backends_written, 0);
}

/// Two model keys, one kernel key: an IPv4-mapped IPv6 frontend is refused, so it can
/// never overwrite its IPv4 twin's entry.
#[test]
fn an_ipv4_mapped_frontend_is_refused_and_its_twin_kept() {
    let (mut maps, mut rec, key) = programmed(&["10.244.1.1"]);
    let mapped = fkey("::ffff:10.96.0.100", 6379);
    let stats = rec
        .apply(&mut maps, &change(frontend(mapped, &["10.244.1.9"])))
        .unwrap();
    assert_eq!(stats.unprogrammed, vec![(mapped, Shortage::AliasedAddress)]);
    assert_eq!(reachable_ips(&maps, &key), ips(&["10.244.1.1"]));
    assert!(maps.log.is_empty(), "nothing written: {:?}", maps.log);
}

/// `n` prefixes 10.<i>.0.0/16.
fn ranges(n: usize) -> Vec<crate::model::spec::Cidr> {
    (0..n)
        .map(|i| crate::model::spec::Cidr::parse(&format!("10.{i}.0.0/16")).unwrap())
        .collect()
}

#[test]
fn source_ranges_past_capacity_leave_the_frontend_unserved_and_others_untouched() {
    // LB_SOURCE_RANGES holds 5 entries.
    let limits = Limits {
        source_ranges: 5,
        ..Limits::default()
    };
    // Maps that refuse what does not fit, as the kernel's do: admission must agree.
    let mut maps = MemoryMaps::with_limits(limits);
    let mut r = Reconciler::new(limits);
    let mut first = external("10.111.254.11", 6379, &["10.244.1.2"]);
    first.kind = FrontendKind::LoadBalancer;
    first.source_ranges = ranges(3);
    let mut greedy = external("10.111.254.12", 6379, &["10.244.1.3"]);
    greedy.kind = FrontendKind::LoadBalancer;
    greedy.source_ranges = ranges(3);
    let plain = external("10.111.254.13", 6379, &["10.244.1.4"]);
    let all = changes([&first, &greedy, &plain]);
    let stats = r.apply(&mut maps, &all).unwrap();
    assert_eq!(
        stats.unprogrammed,
        vec![(greedy.key, Shortage::SourceRanges)]
    );
    assert!(maps.services.contains_key(&service_key(&first.key, 0)));
    assert!(maps.services.contains_key(&service_key(&plain.key, 0)));
    assert!(!maps.services.contains_key(&service_key(&greedy.key, 0)));
    assert_eq!(maps.ranges.len(), 3);

    // An update that would pass the limit keeps the previous version serving.
    first.source_ranges = ranges(6);
    let stats = r.apply(&mut maps, &change(first.clone())).unwrap();
    assert_eq!(
        stats.unprogrammed,
        vec![(first.key, Shortage::SourceRanges)]
    );
    assert_eq!(maps.ranges.len(), 3);

    // Space freed by a deletion is used by the next apply.
    r.apply(&mut maps, &BTreeMap::from([(first.key, None)]))
        .unwrap();
    let stats = r.apply(&mut maps, &change(greedy.clone())).unwrap();
    assert!(stats.unprogrammed.is_empty(), "{:?}", stats.unprogrammed);
    assert_eq!(maps.ranges.len(), 3);
}

#[test]
fn maglev_tables_past_the_memory_budget_are_refused_and_cluster_ips_still_fit() {
    // Tables of 251 entries (2 008 bytes of kernel memory): the budget holds two.
    let limits = Limits {
        maglev_bytes: 2 * 2008 + 1000,
        ..Limits::default()
    };
    let mut maps = MemoryMaps::with_limits(limits);
    let mut r = Reconciler::new(limits).with_maglev_size(251);
    let externals: Vec<Frontend> = (0..3)
        .map(|i| external("10.253.0.11", 30000 + i, &["10.244.1.2"]))
        .collect();
    let cluster_ip = frontend(fkey("10.96.0.100", 6379), &["10.244.1.2"]);
    let all = changes(externals.iter().chain([&cluster_ip]));
    let stats = r.apply(&mut maps, &all).unwrap();
    assert_eq!(
        stats.unprogrammed,
        vec![(externals[2].key, Shortage::MaglevMemory)]
    );
    assert_eq!(maps.tables.len(), 2);
    assert!(maps.services.contains_key(&service_key(&cluster_ip.key, 0)));
    // Updating a served external frontend replaces its own table: no new memory.
    let mut moved = externals[0].clone();
    moved.backends = frontend(moved.key, &["10.244.1.9"]).backends;
    let stats = r.apply(&mut maps, &change(moved)).unwrap();
    assert!(stats.unprogrammed.is_empty(), "{:?}", stats.unprogrammed);
}

#[test]
fn when_space_is_short_cluster_ips_then_older_services_win_whatever_their_keys() {
    // Two frontend ids; three frontends want one each.
    let limits = small(3, 64, 64);
    let mut maps = MemoryMaps::with_limits(limits);
    let mut r = Reconciler::new(limits);
    // External frontends whose keys sort before the ClusterIP's.
    let mut older = external("10.0.0.1", 80, &["10.244.1.2"]);
    older.kind = FrontendKind::ExternalIp;
    older.created = Some(100);
    let mut newer = external("10.0.0.2", 80, &["10.244.1.3"]);
    newer.kind = FrontendKind::ExternalIp;
    newer.created = Some(200);
    let mut cluster_ip = frontend(fkey("10.96.0.10", 80), &["10.244.1.4"]);
    cluster_ip.created = Some(300);
    let all = changes([&newer, &older, &cluster_ip]);
    let stats = r.apply(&mut maps, &all).unwrap();
    assert_eq!(stats.unprogrammed, vec![(newer.key, Shortage::Frontends)]);
    assert!(maps.services.contains_key(&service_key(&cluster_ip.key, 0)));
    assert!(maps.services.contains_key(&service_key(&older.key, 0)));
}

#[test]
fn a_frontend_the_kernel_refuses_is_skipped_and_the_rest_programmed() {
    let mut maps = MemoryMaps::default();
    let mut r = Reconciler::default();
    let a = frontend(fkey("10.96.0.1", 80), &["10.244.1.2"]);
    let refused = frontend(fkey("10.96.0.2", 80), &["10.244.1.3", "10.244.1.4"]);
    let c = frontend(fkey("10.96.0.3", 80), &["10.244.1.5"]);
    maps.refused_addrs.insert(refused.key.ip);
    let mut refusals_left = 16;
    let stats = r
        .apply_isolating(&mut maps, &changes([&a, &refused, &c]), &mut refusals_left)
        .unwrap();
    assert_eq!(refusals_left, 15);
    assert_eq!(stats.refused.len(), 1);
    assert_eq!(stats.refused[0].0, refused.key);
    assert!(stats.refused[0].1.contains("ENOMEM"), "{:?}", stats.refused);
    assert!(stats.retried_after.is_some());
    assert_eq!(r.unprogrammed()[&refused.key].1, Shortage::KernelRefused);
    assert!(r.has_refused());
    for ok in [&a, &c] {
        assert_eq!(reachable_ips(&maps, &ok.key).len(), 1, "{}", ok.key);
    }
    assert!(!maps.services.contains_key(&service_key(&refused.key, 0)));
    // Its backends were written before the refusal; nothing is left behind.
    assert!(maps.unreachable().is_empty(), "{:?}", maps.unreachable());
    assert_eq!(r.service_entry_count(), maps.services.len());

    // Once the kernel takes it, the retry programs it and forgets the refusal.
    maps.refused_addrs.clear();
    let retry: BTreeMap<_, _> = r.refused().map(|(k, f)| (k, Some(f))).collect();
    let stats = r
        .apply_isolating(&mut maps, &retry, &mut refusals_left)
        .unwrap();
    assert!(stats.refused.is_empty() && stats.retried_after.is_none());
    assert_eq!(reachable_ips(&maps, &refused.key).len(), 2);
    assert!(!r.has_refused() && r.unprogrammed().is_empty());
}

#[test]
fn once_the_refusal_budget_is_spent_the_rest_is_deferred_untried() {
    let mut maps = MemoryMaps::default();
    let mut r = Reconciler::default();
    let all: Vec<Frontend> = (1..=4)
        .map(|i| frontend(fkey(&format!("10.96.0.{i}"), 80), &["10.244.1.2"]))
        .collect();
    maps.refused_addrs.insert(all[0].key.ip);
    let mut refusals_left = 1;
    let stats = r
        .apply_isolating(&mut maps, &changes(&all), &mut refusals_left)
        .unwrap();
    assert_eq!(refusals_left, 0);
    // The first (in admission order) was tried and refused; the rest never tried.
    assert_eq!(stats.refused.len(), 4);
    assert!(stats.refused[0].1.contains("ENOMEM"));
    assert!(
        stats.refused[1..]
            .iter()
            .all(|(_, why)| why.contains("not tried"))
    );
    assert!(maps.services.is_empty());
    assert!(maps.unreachable().is_empty(), "{:?}", maps.unreachable());

    // The next sync has a budget again and programs all but the refused one.
    let mut refusals_left = 16;
    let retry: BTreeMap<_, _> = r.refused().map(|(k, f)| (k, Some(f))).collect();
    let stats = r
        .apply_isolating(&mut maps, &retry, &mut refusals_left)
        .unwrap();
    assert_eq!(stats.refused.len(), 1);
    assert_eq!(r.frontend_count(), 3);
}

/// Another writer filled LB_SOURCE_RANGES behind the reconciler's back: the write
/// fails, the maps are read back (the strangers' entries become garbage that admission
/// counts), the frontend waits for space rather than failing the apply, and it is
/// programmed once the garbage is gone.
#[test]
fn a_stale_view_is_rebuilt_from_the_maps_and_the_write_retried() {
    let limits = Limits {
        source_ranges: 4,
        ..Limits::default()
    };
    let mut maps = MemoryMaps::with_limits(limits);
    let mut r = Reconciler::new(limits);
    for i in 0..4u8 {
        maps.ranges.insert(SourceRangeKey {
            prefix_len: 32 + 128,
            svc_id_be: 999u32.to_be(),
            addr: addr_from_ip(std::net::IpAddr::from([
                0xfe80,
                0,
                0,
                0,
                0,
                0,
                0,
                u16::from(i),
            ])),
        });
    }
    let mut lb = external("10.111.254.11", 6379, &["10.244.1.2"]);
    lb.kind = FrontendKind::LoadBalancer;
    lb.source_ranges = ranges(2);
    let plain = frontend(fkey("10.96.0.3", 80), &["10.244.1.5"]);
    let mut refusals_left = 16;
    let stats = r
        .apply_isolating(&mut maps, &changes([&lb, &plain]), &mut refusals_left)
        .unwrap();
    assert!(
        stats
            .retried_after
            .as_ref()
            .unwrap()
            .contains("LB_SOURCE_RANGES is full")
    );
    assert!(stats.refused.is_empty());
    assert_eq!(stats.unprogrammed, vec![(lb.key, Shortage::SourceRanges)]);
    assert_eq!(reachable_ips(&maps, &plain.key).len(), 1);
    // The strangers' entries were deleted: the waiting frontend fits now.
    assert!(stats.freed_space());
    let stats = r.apply(&mut maps, &r.pending()).unwrap();
    assert!(stats.unprogrammed.is_empty());
    assert_eq!(maps.ranges.len(), 2);
    assert_eq!(refusals_left, 16);
}

#[test]
fn tracked_flows_are_checked_against_what_is_programmed() {
    use crate::datapath::flows::Removal;
    let mut maps = MemoryMaps::default();
    let mut r = Reconciler::default().with_maglev_size(251);
    let mut f = external("10.111.254.11", 6379, &["10.244.1.2", "10.244.1.3"]);
    f.kind = FrontendKind::LoadBalancer;
    f.source_ranges = vec![crate::model::spec::Cidr::parse("10.253.0.0/16").unwrap()];
    r.apply(&mut maps, &change(f.clone())).unwrap();
    let svc_id = maps.services[&service_key(&f.key, 0)].svc_id;
    let id_of = |maps: &MemoryMaps, ip: &str| {
        let addr = addr_from_ip(ip.parse().unwrap());
        *maps
            .backends
            .iter()
            .find(|(_, b)| b.addr == addr)
            .unwrap()
            .0
    };
    let backend = |ip: &str| (addr_from_ip(ip.parse().unwrap()), port_to_net(6379));
    let (first, second) = (id_of(&maps, "10.244.1.2"), id_of(&maps, "10.244.1.3"));
    let inside = addr_from_ip("10.253.0.100".parse().unwrap());
    let outside = addr_from_ip("192.0.2.9".parse().unwrap());
    {
        let check = r.flow_check();
        assert_eq!(
            check.stale(svc_id, &inside, first, backend("10.244.1.2")),
            None
        );
        assert_eq!(
            check.stale(svc_id, &outside, first, backend("10.244.1.2")),
            Some(Removal::SourceRange)
        );
        assert_eq!(
            check.stale(svc_id + 100, &inside, first, backend("10.244.1.2")),
            Some(Removal::FrontendGone)
        );
        // An id that names another backend now (reused): the flow is not its.
        assert_eq!(
            check.stale(svc_id, &inside, second, backend("10.244.1.2")),
            Some(Removal::BackendGone)
        );
    }
    // A terminating backend keeps its flows; a backend that left loses them.
    f.backends.retain(|b| b.ip.to_string() != "10.244.1.3");
    f.excluded = vec![(
        BackendAddr {
            ip: "10.244.1.3".parse().unwrap(),
            port: 6379,
        },
        Exclusion::Terminating,
    )];
    r.apply(&mut maps, &change(f.clone())).unwrap();
    assert_eq!(
        r.flow_check()
            .stale(svc_id, &inside, second, backend("10.244.1.3")),
        None
    );
    f.excluded.clear();
    r.apply(&mut maps, &change(f.clone())).unwrap();
    assert_eq!(
        r.flow_check()
            .stale(svc_id, &inside, second, backend("10.244.1.3")),
        Some(Removal::BackendGone)
    );
    // The source ranges grow to admit everyone; then the frontend goes.
    f.source_ranges.clear();
    r.apply(&mut maps, &change(f.clone())).unwrap();
    assert_eq!(
        r.flow_check()
            .stale(svc_id, &outside, first, backend("10.244.1.2")),
        None
    );
    r.apply(&mut maps, &BTreeMap::from([(f.key, None)]))
        .unwrap();
    assert_eq!(
        r.flow_check()
            .stale(svc_id, &inside, first, backend("10.244.1.2")),
        Some(Removal::FrontendGone)
    );
}
