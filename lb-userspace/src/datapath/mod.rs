//! Owns everything aya: loading the embedded eBPF object, attaching its programs to a
//! cgroup, pinning maps (and, on request, links) under one bpffs directory, and typed
//! access to the maps.

mod batch;
mod maps;
mod sys;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        cgroup_sock_addr::CgroupSockAddrLinkId,
        links::{FdLink, PinnedLink},
    },
};
use tracing::{info, warn};

pub use self::{
    maps::{KernelMaps, MapSnapshot},
    sys::{bpffs_prepare, cgroup2_root, check_root},
};

/// The eBPF object built by `build.rs` from `lb-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-datapath"));

/// Every program in the object; each attaches to the cgroup hook its ELF section
/// names (`cgroup/connect4`, ...).
const PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_connect6",
    "lb_sendmsg4",
    "lb_sendmsg6",
    "lb_recvmsg4",
    "lb_recvmsg6",
    "lb_getpeername4",
    "lb_getpeername6",
];

/// Sub-directory of the pin directory that holds pinned program links.
const LINKS_DIR: &str = "links";

#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// cgroup2 directory whose processes (and descendants) are load-balanced.
    pub cgroup: PathBuf,
    /// bpffs directory for pinned maps and links.
    pub pin_dir: PathBuf,
}

/// A loaded and attached datapath. Dropping it without [`Datapath::shutdown`] detaches the
/// programs but leaves the maps pinned.
pub struct Datapath {
    ebpf: Ebpf,
    options: DatapathOptions,
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    /// Held while this daemon owns the pin directory.
    _instance_lock: fs::File,
}

impl Datapath {
    /// Loads the programs (adopting maps already pinned in `pin_dir`, so a restart keeps
    /// the kernel state) and attaches them to the cgroup. Links pinned by a previous
    /// instance are replaced only after the new ones are attached, so there is no moment
    /// without a datapath.
    pub fn load(options: DatapathOptions) -> Result<Self> {
        check_root()?;
        sys::check_cgroup2(&options.cgroup)?;
        let fresh = !options.pin_dir.exists();
        bpffs_prepare(&options.pin_dir)?;
        let instance_lock = match sys::lock_pin_dir(&options.pin_dir) {
            Ok(lock) => lock,
            Err(err) => {
                if fresh {
                    let _ = fs::remove_dir(&options.pin_dir);
                }
                return Err(err);
            }
        };
        let loaded = Self::load_into_pin_dir(options.clone(), instance_lock);
        if loaded.is_err() && fresh {
            // Leave no half-made pin directory behind.
            let _ = unpin_all(&options.pin_dir);
        }
        loaded
    }

    fn load_into_pin_dir(options: DatapathOptions, instance_lock: fs::File) -> Result<Self> {
        maps::drop_incompatible_pins(&options.pin_dir)?;

        let (mut ebpf, refuses_with_econnrefused) = load_object(&options.pin_dir)?;
        if !refuses_with_econnrefused {
            warn!(
                "kernel lacks bpf_set_retval (< 5.18): connections to services without \
                 endpoints fail with EPERM instead of ECONNREFUSED"
            );
        }

        let cgroup = fs::File::open(&options.cgroup)
            .with_context(|| format!("opening cgroup {}", options.cgroup.display()))?;
        let old_links = pinned_links(&options.pin_dir)?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            let link = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| {
                    format!("attaching {name} to cgroup {}", options.cgroup.display())
                })?;
            links.push((name, link));
        }
        for (path, link) in old_links {
            // Unpinning drops the last reference: the old program detaches now that
            // ours is in place.
            match link.unpin() {
                Ok(_) => {
                    info!(link = %path.display(), "replaced datapath link left by a previous run")
                }
                Err(err) => warn!(link = %path.display(), "could not unpin old link: {err}"),
            }
        }
        info!(
            cgroup = %options.cgroup.display(),
            pin_dir = %options.pin_dir.display(),
            "datapath attached"
        );
        Ok(Self {
            ebpf,
            options,
            links,
            _instance_lock: instance_lock,
        })
    }

    /// Takes the typed map handles (once).
    pub fn take_maps(&mut self) -> Result<KernelMaps> {
        KernelMaps::take(&mut self.ebpf)
    }

    /// Starts forwarding aya-log records from the programs to `tracing`.
    pub fn start_logger(&mut self) {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            // SAFETY: the logger owns its ring-buffer fd and lives inside the AsyncFd
            // until the task ends; the fd is never closed or replaced meanwhile.
            Ok(logger) => match unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            } {
                Ok(mut logger) => {
                    tokio::spawn(async move {
                        loop {
                            let Ok(mut guard) = logger.readable_mut().await else {
                                break;
                            };
                            guard.get_inner_mut().flush();
                            guard.clear_ready();
                        }
                    });
                }
                Err(err) => warn!("eBPF log forwarding unavailable: {err}"),
            },
            Err(err) => warn!("eBPF log forwarding unavailable: {err}"),
        }
    }

    /// Stops the datapath. With `keep_pinned` the programs stay attached through pinned
    /// links and the maps stay pinned, so connections keep being balanced until the next
    /// `lb daemon` adopts them; otherwise everything is detached and unpinned.
    pub fn shutdown(mut self, keep_pinned: bool) -> Result<()> {
        if keep_pinned {
            let links_dir = self.options.pin_dir.join(LINKS_DIR);
            fs::create_dir_all(&links_dir)
                .with_context(|| format!("creating {}", links_dir.display()))?;
            for (name, id) in std::mem::take(&mut self.links) {
                let program: &mut CgroupSockAddr = self
                    .ebpf
                    .program_mut(name)
                    .with_context(|| format!("program {name} missing"))?
                    .try_into()?;
                let link = program.take_link(id)?;
                let fd_link: FdLink = link.try_into().context("link is not fd-based")?;
                let path = links_dir.join(name);
                fd_link
                    .pin(&path)
                    .with_context(|| format!("pinning link {}", path.display()))?;
            }
            info!(pin_dir = %self.options.pin_dir.display(), "datapath left attached and pinned");
            Ok(())
        } else {
            let pin_dir = self.options.pin_dir.clone();
            // Dropping the object detaches every link it owns.
            drop(self.ebpf);
            unpin_all(&pin_dir)?;
            info!(pin_dir = %pin_dir.display(), "datapath detached and unpinned");
            Ok(())
        }
    }
}

fn load_object(pin_dir: &Path) -> Result<(Ebpf, bool)> {
    let attempt = |has_set_retval: u8| -> Result<Ebpf> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global("LB_CONFIG_HAS_SET_RETVAL", &has_set_retval, true)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        Ok(ebpf)
    };
    match attempt(1) {
        Ok(ebpf) => Ok((ebpf, true)),
        Err(with_retval) => match attempt(0) {
            // Only the bpf_set_retval call differs: the kernel is older than 5.18.
            Ok(ebpf) => Ok((ebpf, false)),
            Err(_) => Err(with_retval),
        },
    }
}

fn pinned_links(pin_dir: &Path) -> Result<Vec<(PathBuf, PinnedLink)>> {
    let dir = pin_dir.join(LINKS_DIR);
    let mut links = Vec::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(links);
    };
    for entry in entries {
        let path = entry?.path();
        match PinnedLink::from_pin(&path) {
            Ok(link) => links.push((path, link)),
            Err(err) => {
                warn!(link = %path.display(), "removing unusable pinned link: {err}");
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(links)
}

/// Removes every pin under `pin_dir` (maps and links) and the directory itself.
pub fn unpin_all(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let links_dir = pin_dir.join(LINKS_DIR);
    if links_dir.exists() {
        for entry in fs::read_dir(&links_dir)? {
            fs::remove_file(entry?.path())?;
        }
        fs::remove_dir(&links_dir)?;
    }
    for entry in fs::read_dir(pin_dir)? {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(())
}

/// Detaches links pinned by `--keep-pinned` and removes all pins: what `lb cleanup`
/// does for an instance that will not come back.
pub fn cleanup(pin_dir: &Path) -> Result<()> {
    for (path, link) in pinned_links(pin_dir)? {
        link.unpin()
            .with_context(|| format!("unpinning {}", path.display()))?;
    }
    unpin_all(pin_dir)
}

pub fn check_pin_dir_exists(pin_dir: &Path) -> Result<()> {
    if !pin_dir.join(lb_common::map_names::SERVICES).exists() {
        bail!(
            "no datapath pinned at {} (is `lb daemon` running with --pin-dir {}?)",
            pin_dir.display(),
            pin_dir.display()
        );
    }
    Ok(())
}
