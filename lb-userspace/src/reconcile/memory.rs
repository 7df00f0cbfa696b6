//! An in-memory map set that checks, after every single operation, the invariant a
//! concurrent `connect()` relies on: every frontend's slots 1..=count exist and point
//! at existing backends.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{Result, bail};
use lb_common::{AffinityMember, Backend, SVC_F_AFFINITY, ServiceKey, ServiceValue};

use super::{KernelState, MapDump, MapSet};

#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: HashMap<u32, Backend>,
    pub names: HashMap<u32, String>,
    pub members: BTreeSet<AffinityMember>,
    /// Maglev tables by frontend id.
    pub tables: HashMap<u32, Vec<u32>>,
    pub ranges: BTreeSet<lb_common::SourceRangeKey>,
    /// Every operation, in order, for assertions on ordering and write counts.
    pub log: Vec<String>,
    /// Fail the n-th put (to test error handling).
    pub fail_put_at: Option<usize>,
    puts: usize,
    /// Capacities, as the kernel enforces them (a write past one is an error).
    pub limits: Option<super::Limits>,
    /// Frontend addresses whose LB_SERVICES writes fail, as a kernel out of memory
    /// would refuse them.
    pub refused_addrs: BTreeSet<std::net::IpAddr>,
}

impl MemoryMaps {
    /// Entries no frontend can reach: slots of missing frontends or beyond a count, and
    /// backends no slot points at.
    pub fn unreachable(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut referenced = std::collections::BTreeSet::new();
        for (key, value) in &self.services {
            if key.slot == 0 {
                continue;
            }
            match self.services.get(&ServiceKey { slot: 0, ..*key }) {
                Some(frontend) if key.slot <= frontend.count => {
                    referenced.insert(value.backend_id);
                }
                _ => found.push(format!("slot {key:?}")),
            }
        }
        for id in self.backends.keys() {
            if !referenced.contains(id) {
                found.push(format!("backend {id}"));
            }
        }
        let wanted = self.wanted_members();
        for member in self.members.difference(&wanted) {
            found.push(format!("affinity member {member:?}"));
        }
        found
    }

    /// The members the affinity frontends' slots call for.
    pub fn wanted_members(&self) -> BTreeSet<AffinityMember> {
        let mut wanted = BTreeSet::new();
        for (key, value) in &self.services {
            if key.slot != 0 || value.flags & SVC_F_AFFINITY == 0 {
                continue;
            }
            for slot in 1..=value.count {
                if let Some(slot_value) = self.services.get(&ServiceKey { slot, ..*key }) {
                    wanted.insert(AffinityMember {
                        svc_id: value.svc_id,
                        backend_id: slot_value.backend_id,
                    });
                }
            }
        }
        wanted
    }

    /// Maps that refuse writes past `limits`, like the kernel's.
    pub fn with_limits(limits: super::Limits) -> Self {
        Self {
            limits: Some(limits),
            ..Default::default()
        }
    }

    /// Puts made so far (to aim `fail_put_at`).
    pub fn puts(&self) -> usize {
        self.puts
    }

    /// The backends a connect() to `frontend` can reach right now.
    pub fn reachable(&self, frontend: &ServiceKey) -> Vec<Backend> {
        let Some(value) = self.services.get(frontend) else {
            return Vec::new();
        };
        (1..=value.count)
            .map(|slot| {
                let slot_value = self.services[&ServiceKey { slot, ..*frontend }];
                self.backends[&slot_value.backend_id]
            })
            .collect()
    }

    fn check_invariant(&self, after: &str) {
        for (key, value) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            for slot in 1..=value.count {
                let slot_key = ServiceKey { slot, ..*key };
                let Some(slot_value) = self.services.get(&slot_key) else {
                    panic!(
                        "after {after}: frontend {key:?} count {} but slot {slot} missing",
                        value.count
                    );
                };
                assert!(
                    self.backends.contains_key(&slot_value.backend_id),
                    "after {after}: slot {slot_key:?} points at missing backend {}",
                    slot_value.backend_id
                );
            }
        }
        for (svc_id, table) in &self.tables {
            if let Some(missing) = table.iter().find(|id| !self.backends.contains_key(id)) {
                panic!(
                    "after {after}: Maglev table of {svc_id} points at missing backend {missing}"
                );
            }
        }
    }

    fn put(&mut self) -> Result<()> {
        self.puts += 1;
        if self.fail_put_at == Some(self.puts) {
            bail!("injected failure at put {}", self.puts);
        }
        Ok(())
    }
}

impl MemoryMaps {
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.put()?;
        if let Some(limits) = self.limits
            && !self.backends.contains_key(&id)
            && self.backends.len() >= limits.backends as usize
        {
            bail!("LB_BACKENDS is full (E2BIG)");
        }
        self.backends.insert(id, *backend);
        let op = format!("put_backend {id}");
        self.check_invariant(&op);
        self.log.push(op);
        Ok(())
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.put()?;
        if self
            .refused_addrs
            .contains(&lb_common::addr_to_ip(&key.addr))
        {
            bail!("refused (ENOMEM)");
        }
        if let Some(limits) = self.limits
            && !self.services.contains_key(key)
            && self.services.len() >= limits.service_entries as usize
        {
            bail!("LB_SERVICES is full (E2BIG)");
        }
        self.services.insert(*key, *value);
        let op = if key.slot == 0 {
            format!("put_frontend count={}", value.count)
        } else {
            format!("put_slot {}={}", key.slot, value.backend_id)
        };
        self.check_invariant(&op);
        self.log.push(op);
        Ok(())
    }
}

impl MapDump for MemoryMaps {
    fn dump(&self) -> Result<KernelState> {
        Ok(KernelState {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            names: self.names.iter().map(|(k, v)| (*k, v.clone())).collect(),
            members: self.members.iter().copied().collect(),
            tables: self.tables.keys().copied().collect(),
            ranges: self.ranges.iter().copied().collect(),
        })
    }
}

/// Element by element, checking the invariant after each: the kernel applies a
/// batch the same way, so readers can observe any prefix.
impl MapSet for MemoryMaps {
    fn put_backends(&mut self, entries: &[(u32, Backend)]) -> Result<()> {
        entries
            .iter()
            .try_for_each(|(id, b)| self.put_backend(*id, b))
    }

    fn delete_backends(&mut self, ids: &[u32]) -> Result<()> {
        for id in ids {
            self.backends.remove(id);
            let op = format!("delete_backend {id}");
            self.check_invariant(&op);
            self.log.push(op);
        }
        Ok(())
    }

    fn put_services(&mut self, entries: &[(ServiceKey, ServiceValue)]) -> Result<()> {
        entries.iter().try_for_each(|(k, v)| self.put_service(k, v))
    }

    fn delete_services(&mut self, keys: &[ServiceKey]) -> Result<()> {
        for key in keys {
            self.services.remove(key);
            let op = if key.slot == 0 {
                "delete_frontend".to_string()
            } else {
                format!("delete_slot {}", key.slot)
            };
            self.check_invariant(&op);
            self.log.push(op);
        }
        Ok(())
    }

    fn reset_frontend_stats(&mut self, _svc_ids: &[u32]) -> Result<()> {
        Ok(())
    }

    fn reset_backend_stats(&mut self, _backend_ids: &[u32]) -> Result<()> {
        Ok(())
    }

    fn put_frontend_names(&mut self, names: &[(u32, String)]) -> Result<()> {
        for (svc_id, name) in names {
            self.names.insert(*svc_id, name.clone());
        }
        Ok(())
    }

    fn delete_frontend_names(&mut self, svc_ids: &[u32]) -> Result<()> {
        for svc_id in svc_ids {
            self.names.remove(svc_id);
        }
        Ok(())
    }

    fn put_affinity_members(&mut self, members: &[AffinityMember]) -> Result<()> {
        for member in members {
            self.put()?;
            self.members.insert(*member);
            self.log.push(format!(
                "put_member {}/{}",
                member.svc_id, member.backend_id
            ));
        }
        Ok(())
    }

    fn put_maglev(&mut self, tables: &[(u32, Vec<u32>)]) -> Result<()> {
        // In order, as the kernel's batch: the tables before a failure stay installed.
        for (svc_id, table) in tables {
            self.put()?;
            if let Some(limits) = self.limits
                && !self.tables.contains_key(svc_id)
            {
                let entries: usize = self.tables.values().map(Vec::len).sum();
                if (entries + table.len()) as u64 * super::MAGLEV_ENTRY_BYTES > limits.maglev_bytes
                {
                    bail!("the Maglev tables' memory is exhausted (ENOMEM)");
                }
            }
            self.tables.insert(*svc_id, table.clone());
            let op = format!("put_table {svc_id}");
            self.check_invariant(&op);
            self.log.push(op);
        }
        Ok(())
    }

    fn delete_maglev(&mut self, svc_ids: &[u32]) -> Result<()> {
        for svc_id in svc_ids {
            if self.tables.remove(svc_id).is_some() {
                self.log.push(format!("delete_table {svc_id}"));
            }
        }
        Ok(())
    }

    fn put_source_ranges(&mut self, keys: &[lb_common::SourceRangeKey]) -> Result<()> {
        for key in keys {
            self.put()?;
            if let Some(limits) = self.limits
                && !self.ranges.contains(key)
                && self.ranges.len() >= limits.source_ranges as usize
            {
                bail!("LB_SOURCE_RANGES is full (E2BIG)");
            }
            self.ranges.insert(*key);
            self.log
                .push(format!("put_range {}", u32::from_be(key.svc_id_be)));
        }
        Ok(())
    }

    fn delete_source_ranges(&mut self, keys: &[lb_common::SourceRangeKey]) -> Result<()> {
        for key in keys {
            self.ranges.remove(key);
            self.log
                .push(format!("delete_range {}", u32::from_be(key.svc_id_be)));
        }
        Ok(())
    }

    fn delete_affinity_members(&mut self, members: &[AffinityMember]) -> Result<()> {
        for member in members {
            self.members.remove(member);
            self.log.push(format!(
                "delete_member {}/{}",
                member.svc_id, member.backend_id
            ));
        }
        Ok(())
    }
}
