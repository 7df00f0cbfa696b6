//! The kernel half of the load balancer.
//!
//! `cgroup/connect*` and `cgroup/sendmsg*` rewrite a ClusterIP:port destination to a
//! backend chosen from `LB_SERVICES`/`LB_BACKENDS` before the socket ever sends a packet,
//! so nothing is NATed and no proxy sits in the path. `cgroup/recvmsg*` and
//! `cgroup/getpeername*` translate the backend back to the ClusterIP so applications see
//! the address they dialled.
//!
//! `tc` serves packets from other machines to node ports, external IPs and
//! load-balancer IPs: DNAT (and SNAT for backends on other nodes), tracked per flow.
//!
//! Built for `bpfel-unknown-none` by `lb-userspace/build.rs`; on the host this crate is an
//! empty binary so workspace-wide `cargo check` keeps working.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds for the shared counters (core has no atomic RMW API on the bpf target).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("lb-ebpf is built for bpfel-unknown-none by lb-userspace's build script");
}
