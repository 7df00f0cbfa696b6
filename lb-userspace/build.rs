//! Builds the eBPF datapath (`lb-ebpf`, nightly + bpf-linker) and leaves the object in
//! OUT_DIR, where `src/datapath` embeds it, so a plain `cargo build` yields one `lb`
//! binary that carries its own kernel programs.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found in the workspace"))?;
    let ebpf_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent directory"))?;
    // aya-build watches the eBPF crate; the shared types live next door.
    let common_dir = ebpf_dir.parent().map(|root| root.join("lb-common"));
    if let Some(common_dir) = common_dir {
        println!("cargo:rerun-if-changed={common_dir}");
    }
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF datapath failed; it needs `rustup component add rust-src \
         --toolchain nightly` and `cargo +nightly install bpf-linker@0.10.0 --locked` \
         (.ci/run installs both)",
    )?;
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let object = out_dir.join("lb-datapath");
    if object.exists() {
        sanitize_btf_names(&object)?;
    }
    Ok(())
}

/// bpf-linker 0.10 leaves some Rust generic names in BTF (`MaybeUninit<u8>`, from
/// aya-log-ebpf's level global); the kernel rejects the whole BTF blob for them, and
/// aya then loads the programs without BTF. Rewriting the offending characters of type
/// and member names in place (same length) keeps BTF, so line info and typed program
/// dumps stay available. Line-info strings (source text) are left untouched.
fn sanitize_btf_names(path: &std::path::Path) -> anyhow::Result<usize> {
    use object::{Object as _, ObjectSection as _};

    let mut data = std::fs::read(path)?;
    let Some((start, len)) = ({
        let file = object::File::parse(&*data).context("parsing the eBPF object")?;
        file.section_by_name(".BTF").and_then(|s| s.file_range())
    }) else {
        return Ok(0);
    };
    let btf = &mut data[start as usize..(start + len) as usize];
    let u32_at =
        |b: &[u8], off: usize| u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize;
    if btf.len() < 24 || btf[0..2] != [0x9f, 0xeb] {
        anyhow::bail!("unexpected .BTF header (big-endian or not BTF)");
    }
    let hdr_len = u32_at(btf, 4);
    let (type_off, type_len) = (u32_at(btf, 8), u32_at(btf, 12));
    let (str_off, str_len) = (u32_at(btf, 16), u32_at(btf, 20));
    let types = hdr_len + type_off..hdr_len + type_off + type_len;
    let strings = hdr_len + str_off..hdr_len + str_off + str_len;

    // Collect name offsets of every type and member.
    let mut names = Vec::new();
    let mut pos = types.start;
    while pos + 12 <= types.end {
        let name_off = u32_at(btf, pos);
        let info = u32_at(btf, pos + 4);
        let kind = (info >> 24) & 0x1f;
        let vlen = info & 0xffff;
        names.push(name_off);
        pos += 12;
        let (extra, member_size, member_named) = match kind {
            1 => (4, 0, false),     // INT
            3 => (12, 0, false),    // ARRAY
            4 | 5 => (0, 12, true), // STRUCT, UNION
            6 => (0, 8, true),      // ENUM
            13 => (0, 8, true),     // FUNC_PROTO params
            14 => (4, 0, false),    // VAR
            15 => (0, 12, false),   // DATASEC
            17 => (4, 0, false),    // DECL_TAG
            19 => (0, 12, true),    // ENUM64
            _ => (0, 0, false),
        };
        pos += extra;
        for _ in 0..vlen {
            if member_named {
                names.push(u32_at(btf, pos));
            }
            pos += member_size;
        }
    }

    let mut fixed = 0;
    for name_off in names {
        let begin = strings.start + name_off;
        if name_off == 0 || begin >= strings.end {
            continue;
        }
        let end = btf[begin..strings.end]
            .iter()
            .position(|b| *b == 0)
            .map_or(strings.end, |n| begin + n);
        let name = &mut btf[begin..end];
        if name.iter().any(|b| b"<>,() :&*[];".contains(b)) {
            for b in name.iter_mut().filter(|b| b"<>,() :&*[];".contains(b)) {
                *b = b'_';
            }
            fixed += 1;
        }
    }
    if fixed > 0 {
        std::fs::write(path, &data)?;
    }
    Ok(fixed)
}
