//! Rebuild the eBPF object when the `bpf-linker` binary changes: cargo cannot see it as
//! a dependency otherwise.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
