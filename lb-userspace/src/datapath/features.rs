//! The optional kernel features the datapath uses, probed at start-up by asking the
//! kernel (loading a probe program, making a request it must refuse), never from the
//! version number: distribution kernels backport features and disable others.

use serde::Serialize;

use super::{sockets, sys};

/// One optional feature: whether the kernel has it, and what the daemon does with or
/// without it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Feature {
    /// Short name, also the `feature` label of `lb_kernel_feature`.
    pub name: &'static str,
    pub available: bool,
    /// What runs on this kernel: the feature, or its fallback.
    pub in_use: String,
    /// The mainline version that brought it (for the operator's orientation only).
    pub since: &'static str,
}

/// What the kernel offers the datapath.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    pub features: Vec<Feature>,
}

/// Probe results before options (such as `--tc-attach`) decide what is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    pub tcx: bool,
    pub set_retval: bool,
    /// `cgroup/sock_release` with socket cookies and socket storage.
    pub socket_tracking: bool,
    pub sock_destroy: bool,
}

impl Probed {
    pub fn probe() -> Self {
        Self {
            tcx: sys::probe_tcx(),
            set_retval: sys::probe_set_retval(),
            socket_tracking: sys::probe_socket_tracking().is_ok(),
            sock_destroy: sockets::probe_destroy(),
        }
    }
}

/// How TC programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum TcAttachMode {
    /// TCX links where the kernel has them (>= 6.6), else netlink clsact filters.
    #[default]
    Auto,
    /// Netlink clsact filters even where TCX exists (for coexistence with tools that
    /// manage tc filters, and to exercise the fallback).
    Netlink,
}

impl KernelFeatures {
    /// The report for `probed`, given the choices the options made: TCX only if
    /// `tc_mode` allows it, socket tracking only if not forced to the LRU.
    pub fn describe(probed: Probed, tc_mode: TcAttachMode, legacy_sockets: bool) -> Self {
        let tcx_used = probed.tcx && tc_mode == TcAttachMode::Auto;
        let features = vec![
            Feature {
                name: "tcx",
                available: probed.tcx,
                in_use: if tcx_used {
                    "TC programs attached as pinned TCX links".into()
                } else {
                    "TC programs attached as netlink clsact filters (left in place on exit, replaced in place by the next daemon)".into()
                },
                since: "6.6",
            },
            Feature {
                name: "set_retval",
                available: probed.set_retval,
                in_use: if probed.set_retval {
                    "connections to Services without endpoints refused with ECONNREFUSED".into()
                } else {
                    "connections to Services without endpoints refused with EPERM".into()
                },
                since: "5.18",
            },
            Feature {
                name: "sock_release",
                available: probed.socket_tracking,
                in_use: if probed.socket_tracking && !legacy_sockets {
                    "socket state deleted with its socket (cgroup/sock_release, socket storage)"
                        .into()
                } else {
                    "socket state in an LRU of --max-sockets entries".into()
                },
                since: "5.9",
            },
            Feature {
                name: "sock_destroy",
                available: probed.sock_destroy,
                in_use: if probed.sock_destroy {
                    "sockets of removed backends terminated through sock_diag SOCK_DESTROY".into()
                } else {
                    "sockets of removed backends are not terminated (CONFIG_INET_DIAG_DESTROY off): they wait for the client's timeout".into()
                },
                since: "4.5",
            },
        ];
        Self {
            release: kernel_release(),
            features,
        }
    }

    /// One line for the log: `tcx=no sock_release=yes ...`.
    pub fn summary(&self) -> String {
        self.features
            .iter()
            .map(|f| format!("{}={}", f.name, if f.available { "yes" } else { "no" }))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn get(&self, name: &str) -> Option<&Feature> {
        self.features.iter().find(|f| f.name == name)
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Probed = Probed {
        tcx: true,
        set_retval: true,
        socket_tracking: true,
        sock_destroy: true,
    };

    #[test]
    fn options_choose_the_fallbacks() {
        let full = KernelFeatures::describe(ALL, TcAttachMode::Auto, false);
        assert!(full.get("tcx").unwrap().in_use.contains("TCX"));
        assert_eq!(
            full.summary(),
            "tcx=yes set_retval=yes sock_release=yes sock_destroy=yes"
        );
        let forced = KernelFeatures::describe(ALL, TcAttachMode::Netlink, true);
        assert!(forced.get("tcx").unwrap().available);
        assert!(forced.get("tcx").unwrap().in_use.contains("netlink"));
        assert!(forced.get("sock_release").unwrap().in_use.contains("LRU"));
        let old = Probed {
            tcx: false,
            set_retval: false,
            ..ALL
        };
        let old = KernelFeatures::describe(old, TcAttachMode::Auto, false);
        assert!(old.get("tcx").unwrap().in_use.contains("netlink"));
        assert!(old.get("set_retval").unwrap().in_use.contains("EPERM"));
    }

    /// The probes against this kernel (the host's, and 6.1 in the kernel-compatibility
    /// run) find what mainline kernels of that version have.
    #[test]
    #[ignore = "needs root (loads probe programs); cargo xtask test runs it with --include-ignored"]
    fn probes_answer_on_this_kernel() {
        let probed = Probed::probe();
        let release = kernel_release();
        let mut numbers = release
            .split(['.', '-'])
            .filter_map(|p| p.parse::<u32>().ok());
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        assert_eq!(probed.tcx, version >= (6, 6), "tcx probe on {release}");
        assert_eq!(
            probed.set_retval,
            version >= (5, 18),
            "set_retval probe on {release}"
        );
        assert!(probed.socket_tracking, "sock_release probe on {release}");
        assert!(probed.sock_destroy, "sock_destroy probe on {release}");
    }
}
