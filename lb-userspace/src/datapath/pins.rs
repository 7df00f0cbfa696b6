//! Versioned pinned state. Maps live in `<pin dir>/v<LAYOUT_VERSION>/`, links in
//! `<pin dir>/links/`. A daemon adopts pinned maps only when the version matches and
//! every map has the type, key and value sizes, flags and capacity it expects;
//! otherwise it builds a new map set beside the old one (the old datapath keeps
//! serving), fills it from its source, swaps its programs into the pinned links, and
//! only then removes the old maps: a migration, never a misread.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapInfo, MapType};
use lb_common::{Capacity, LAYOUT_VERSION, MapDef, MapKind, maps};
use tracing::{info, warn};

use super::links;

/// Map capacities (the `--max-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    pub frontends: u32,
    pub backends: u32,
    pub service_entries: u32,
    pub sockets: u32,
    pub affinity: u32,
    /// External flows the TC connection tracking holds (two entries each).
    pub flows: u32,
    /// The kernel has no `cgroup/sock_release`: sockets are remembered in the LRU
    /// (`LB_SOCK_REVNAT_LRU`) instead. Decided by probing the kernel at load time.
    pub legacy_sockets: bool,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            frontends: maps::DEFAULT_FRONTENDS,
            backends: maps::DEFAULT_BACKENDS,
            service_entries: maps::DEFAULT_SERVICE_ENTRIES,
            sockets: maps::DEFAULT_SOCKETS,
            affinity: maps::DEFAULT_AFFINITY,
            flows: maps::DEFAULT_FLOWS,
            legacy_sockets: false,
        }
    }
}

impl Capacities {
    /// What the reconciler may use: ids `1..=N` for `--max-frontends N` and
    /// `--max-backends N` (id 0 means "none", so the maps indexed by id hold N + 1).
    pub fn limits(&self) -> crate::reconcile::Limits {
        crate::reconcile::Limits {
            frontends: self.frontends + 1,
            backends: self.backends + 1,
            service_entries: self.service_entries,
            source_ranges: self.frontends + 1,
            maglev_bytes: crate::reconcile::DEFAULT_MAGLEV_BYTES,
        }
    }

    /// `max_entries` of `def` under these capacities.
    pub fn entries(&self, def: &MapDef) -> u32 {
        match def.capacity {
            Capacity::Fixed => def.max_entries,
            Capacity::Frontends => self.frontends + 1,
            Capacity::Backends => self.backends + 1,
            Capacity::ServiceEntries => self.service_entries,
            // The map that is not in use keeps one entry.
            Capacity::Sockets if self.legacy_sockets => 1,
            Capacity::Sockets => self.sockets,
            Capacity::LegacySockets if self.legacy_sockets => self.sockets,
            Capacity::LegacySockets => 1,
            Capacity::Affinity => self.affinity,
            Capacity::Flows => self.flows.saturating_mul(2),
        }
    }
}

/// The folder of this build's maps.
pub fn version_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// Where a new map set is built when the pinned one of this version cannot be
/// adopted (bpffs allows no dots in names).
fn staging_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}_new"))
}

fn kind_of(map_type: MapType) -> Option<MapKind> {
    Some(match map_type {
        MapType::Hash => MapKind::Hash,
        MapType::Array => MapKind::Array,
        MapType::PerCpuArray => MapKind::PerCpuArray,
        MapType::LruHash => MapKind::LruHash,
        MapType::LpmTrie => MapKind::LpmTrie,
        MapType::HashOfMaps => MapKind::HashOfMaps,
        MapType::SkStorage => MapKind::SkStorage,
        _ => return None,
    })
}

/// Why the map pinned at `path` cannot serve as `def`, if it cannot.
pub fn mismatch(path: &Path, def: &MapDef, entries: u32) -> Option<String> {
    let info = match MapInfo::from_pin(path) {
        Ok(info) => info,
        Err(err) => return Some(format!("{} cannot be opened ({err})", def.name)),
    };
    let kind = info.map_type().ok().and_then(kind_of);
    if kind != Some(def.kind) {
        return Some(format!(
            "{} has type {:?}, expected {:?}",
            def.name, kind, def.kind
        ));
    }
    if info.key_size() != def.key_size || info.value_size() != def.value_size {
        return Some(format!(
            "{} has {}-byte keys and {}-byte values, expected {} and {}",
            def.name,
            info.key_size(),
            info.value_size(),
            def.key_size,
            def.value_size
        ));
    }
    if info.map_flags() != def.flags {
        return Some(format!(
            "{} has flags {:#x}, expected {:#x}",
            def.name,
            info.map_flags(),
            def.flags
        ));
    }
    if info.max_entries() != entries {
        return Some(format!(
            "{} holds {} entries, the capacity flags ask for {entries}",
            def.name,
            info.max_entries()
        ));
    }
    None
}

/// Why the map set in `dir` cannot be adopted, if it cannot.
fn incompatible(dir: &Path, capacities: &Capacities) -> Option<String> {
    maps::ALL
        .iter()
        .find_map(|def| mismatch(&dir.join(def.name), def, capacities.entries(def)))
}

/// Which pinned map sets exist besides this version's: other versions' folders and
/// the maps of the first layout, pinned directly in the pin directory.
fn other_map_sets(pin_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return found;
    };
    let ours = [version_dir(pin_dir), staging_dir(pin_dir)];
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_version_dir = path.is_dir()
            && name.starts_with('v')
            && name[1..]
                .split('_')
                .next()
                .is_some_and(|n| n.parse::<u32>().is_ok());
        let is_legacy_pin = path.is_file() && name.starts_with("LB_");
        if (is_version_dir && !ours.contains(&path)) || is_legacy_pin {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The version a map set was pinned with, for messages.
fn describe(set: &Path) -> String {
    match set.file_name().and_then(|n| n.to_str()) {
        Some(name) if name.starts_with("LB_") => {
            "layout v1 (maps pinned in the pin directory itself)".into()
        }
        Some(name) => format!("layout {name}"),
        None => set.display().to_string(),
    }
}

/// Whether the programs behind the pinned links use the maps in `dir`.
fn in_use_by_links(pin_dir: &Path, dir: &Path) -> bool {
    let Ok(services) = MapInfo::from_pin(dir.join(maps::SERVICES.name)) else {
        return false;
    };
    let map_id = services.id();
    let Ok(entries) = fs::read_dir(pin_dir.join(super::LINKS_DIR)) else {
        return false;
    };
    entries.flatten().any(|entry| {
        links::open_pinned(&entry.path())
            .and_then(|fd| links::link_info(std::os::fd::AsFd::as_fd(&fd)))
            .ok()
            .and_then(|info| {
                aya::programs::loaded_programs()
                    .flatten()
                    .find(|prog| prog.id() == info.prog_id)
            })
            .and_then(|prog| prog.map_ids().ok().flatten())
            .is_some_and(|ids| ids.contains(&map_id))
    })
}

/// Where this daemon's maps are pinned, and what to clean up once its programs run.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The folder the maps are loaded from (adopted) or created in.
    pub dir: PathBuf,
    /// Built beside an incompatible set of this version: renamed to the version folder
    /// once active.
    pub staging: bool,
    /// Map sets to remove once this build's programs run (the old datapath serves
    /// until then).
    pub stale: Vec<PathBuf>,
}

/// Decides where to load the maps from, resolving a migration a previous daemon left
/// half done.
pub fn prepare(pin_dir: &Path, capacities: &Capacities) -> Result<Layout> {
    let target = version_dir(pin_dir);
    let staging = staging_dir(pin_dir);
    if staging.exists() {
        if in_use_by_links(pin_dir, &staging) {
            info!(dir = %staging.display(), "finishing a migration a previous daemon started");
            if target.exists() {
                remove_map_set(&target)?;
            }
            fs::rename(&staging, &target).with_context(|| {
                format!("renaming {} to {}", staging.display(), target.display())
            })?;
        } else {
            remove_map_set(&staging)?;
        }
    }
    let stale = other_map_sets(pin_dir);
    if target.exists() {
        match incompatible(&target, capacities) {
            None => {
                if !stale.is_empty() {
                    info!(stale = ?stale, "older map sets will be removed once this daemon's programs run");
                }
                return Ok(Layout {
                    dir: target,
                    staging: false,
                    stale,
                });
            }
            Some(why) => {
                warn!(
                    "the pinned maps cannot be adopted: {why}; building new maps in {} (the old \
                     datapath keeps serving until they are filled and this daemon's programs take over)",
                    staging.display()
                );
                super::sys::create_private_dir(&staging)?;
                let mut stale = stale;
                stale.push(target);
                return Ok(Layout {
                    dir: staging,
                    staging: true,
                    stale,
                });
            }
        }
    }
    for set in &stale {
        warn!(
            "the pinned datapath at {} has {}, this build uses layout v{LAYOUT_VERSION}: migrating \
             (new maps are built and filled while the old datapath keeps serving, then replace it)",
            pin_dir.display(),
            describe(set)
        );
    }
    super::sys::create_private_dir(&target)?;
    Ok(Layout {
        dir: target,
        staging: false,
        stale,
    })
}

/// Once this build's programs run: removes the old map sets and moves a staged set
/// into the version folder.
pub fn finish(pin_dir: &Path, layout: &mut Layout) -> Result<()> {
    for set in std::mem::take(&mut layout.stale) {
        remove_map_set(&set)?;
        info!(removed = %set.display(), "removed the maps of the previous datapath");
    }
    if layout.staging {
        let target = version_dir(pin_dir);
        fs::rename(&layout.dir, &target).with_context(|| {
            format!("renaming {} to {}", layout.dir.display(), target.display())
        })?;
        layout.dir = target;
        layout.staging = false;
    }
    Ok(())
}

/// Unpins a map set: a folder of pins, or one legacy pin file.
fn remove_map_set(path: &Path) -> Result<()> {
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            let entry = entry?.path();
            fs::remove_file(&entry).with_context(|| format!("unpinning {}", entry.display()))?;
        }
        fs::remove_dir(path).with_context(|| format!("removing {}", path.display()))?;
    } else if path.exists() {
        fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    Ok(())
}

/// The folder `lb list` and metrics read the maps from: this version's, or a clear
/// error naming what is pinned instead.
pub fn readable_dir(pin_dir: &Path) -> Result<PathBuf> {
    let target = version_dir(pin_dir);
    if target.join(maps::SERVICES.name).exists() {
        return Ok(target);
    }
    let staging = staging_dir(pin_dir);
    if staging.join(maps::SERVICES.name).exists() {
        return Ok(staging);
    }
    if let Some(other) = other_map_sets(pin_dir).first() {
        anyhow::bail!(
            "the datapath pinned at {} has {}; this lb reads layout v{LAYOUT_VERSION} (use the lb \
             that runs there, or restart the daemon with this one to migrate)",
            pin_dir.display(),
            describe(other)
        );
    }
    anyhow::bail!(
        "no datapath pinned at {} (is `lb daemon` running with --pin-dir {}?)",
        pin_dir.display(),
        pin_dir.display()
    )
}
