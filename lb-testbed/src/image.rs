//! Container images written without a registry or a build daemon: one layer holding
//! the given files (a program and the shared libraries it loads), saved as a
//! docker-archive that `ctr images import` (and `docker load`, `podman load`) reads.
//!
//! The archive is reproducible: fixed timestamps, owners and order, so the same inputs
//! give the same image ID.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

/// Where an image file's bytes come from.
#[derive(Clone, Debug)]
pub enum Content {
    /// A file of this machine (symlinks followed).
    Host(PathBuf),
    /// Literal bytes.
    Bytes(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// An (empty) directory.
    Dir,
}

#[derive(Clone, Debug)]
pub struct Image {
    /// Name and tag, e.g. `registry.k8s.io/pause:3.10.2` or `lb:0.1.0`.
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// Absolute path in the image -> (content, permission bits).
    pub files: BTreeMap<String, (Content, u32)>,
}

impl Image {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            files: BTreeMap::new(),
        }
    }

    /// Adds `binary` at `path` with every shared library `ldd` says it loads (at the
    /// paths the dynamic loader looks them up), so the image needs no base layer.
    pub fn add_program(&mut self, binary: &Path, path: &str) -> Result<&mut Self> {
        self.files.insert(
            path.to_string(),
            (Content::Host(binary.to_path_buf()), 0o755),
        );
        for library in shared_libraries(binary)? {
            let in_image = library.display().to_string();
            self.files
                .entry(in_image)
                .or_insert((Content::Host(library), 0o755));
        }
        Ok(self)
    }

    /// Debian's static busybox at `/bin/busybox` and a link to it for each of its
    /// applets, but for the paths in `except` (tools the image brings its own of).
    pub fn add_busybox(&mut self, except: &[&str]) -> Result<&mut Self> {
        self.add_program(Path::new("/bin/busybox"), "/bin/busybox")
            .context("apt-get install busybox-static")?;
        let applets = Command::new("/bin/busybox")
            .arg("--list-full")
            .output()
            .context("busybox --list-full (apt-get install busybox-static)")?;
        for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
            let path = format!("/{applet}");
            if path != "/bin/busybox" && !except.contains(&path.as_str()) {
                self.add_symlink(&path, "/bin/busybox");
            }
        }
        Ok(self)
    }

    pub fn add_bytes(&mut self, path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        self.files
            .insert(path.to_string(), (Content::Bytes(bytes.into()), mode));
        self
    }

    /// An empty directory (`/tmp` with mode 0o1777, say).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.files
            .insert(path.trim_end_matches('/').to_string(), (Content::Dir, mode));
        self
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.files.insert(
            path.to_string(),
            (Content::Symlink(target.to_string()), 0o777),
        );
        self
    }

    /// The layer as an uncompressed tar: parent directories first, then the files in
    /// path order, all owned by root with timestamp 0.
    fn layer(&self) -> Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dirs = std::collections::BTreeSet::new();
        for path in self.files.keys() {
            if !path.starts_with('/') || path.contains("/../") || path.ends_with('/') {
                bail!("image path {path:?} must be absolute and name a file");
            }
            let mut parent = Path::new(path).parent();
            while let Some(dir) = parent.filter(|d| *d != Path::new("/")) {
                dirs.insert(dir.to_path_buf());
                parent = dir.parent();
            }
        }
        let header = |kind: tar::EntryType, mode: u32, size: u64| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_size(size);
            header
        };
        for (path, (content, _)) in &self.files {
            if matches!(content, Content::Dir) {
                dirs.insert(PathBuf::from(path));
            }
        }
        for dir in &dirs {
            let mode = match self.files.get(&dir.display().to_string()) {
                Some((Content::Dir, mode)) => *mode,
                _ => 0o755,
            };
            let mut h = header(tar::EntryType::Directory, mode, 0);
            let name = format!("{}/", dir.strip_prefix("/").expect("absolute").display());
            builder.append_data(&mut h, name, std::io::empty())?;
        }
        for (path, (content, mode)) in &self.files {
            let name = path.trim_start_matches('/');
            match content {
                Content::Dir => {}
                Content::Symlink(target) => {
                    let mut h = header(tar::EntryType::Symlink, *mode, 0);
                    builder.append_link(&mut h, name, target)?;
                }
                Content::Host(source) => {
                    let bytes = fs::read(source)
                        .with_context(|| format!("reading {}", source.display()))?;
                    let mut h = header(tar::EntryType::Regular, *mode, bytes.len() as u64);
                    builder.append_data(&mut h, name, bytes.as_slice())?;
                }
                Content::Bytes(bytes) => {
                    let mut h = header(tar::EntryType::Regular, *mode, bytes.len() as u64);
                    builder.append_data(&mut h, name, bytes.as_slice())?;
                }
            }
        }
        Ok(builder.into_inner()?)
    }

    /// The image's one layer (an uncompressed tar) and its configuration (JSON), as
    /// both a docker-archive and a registry ([`crate::registry`]) serve them.
    pub fn layer_and_config(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let layer = self.layer()?;
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "lb-testbed image writer"}],
        });
        Ok((layer, serde_json::to_vec(&config)?))
    }

    /// Writes the image as a docker-archive at `out`; returns the image ID (the
    /// digest of its configuration, as `docker images --no-trunc` and `crictl` show).
    pub fn write_docker_archive(&self, out: &Path) -> Result<String> {
        let (layer, config) = self.layer_and_config()?;
        let layer_digest = sha256_hex(&layer);
        let config_digest = sha256_hex(&config);
        let manifest = serde_json::json!([{
            "Config": format!("{config_digest}.json"),
            "RepoTags": [self.name],
            "Layers": [format!("{layer_digest}/layer.tar")],
        }]);

        let tmp = out.with_extension("tmp");
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
        let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_size(bytes.len() as u64);
            archive.append_data(&mut h, name, bytes)?;
            Ok(())
        };
        add(&format!("{layer_digest}/layer.tar"), &layer)?;
        add(&format!("{config_digest}.json"), &config)?;
        add("manifest.json", &serde_json::to_vec(&manifest)?)?;
        archive.into_inner()?.flush()?;
        fs::rename(&tmp, out)?;
        Ok(format!("sha256:{config_digest}"))
    }
}

/// The DaemonSet's image (`cargo xtask image`, and the one the real-node tests run):
/// `/usr/local/bin/lb` (the eBPF programs are inside it) and the shared libraries it
/// loads, nothing else; no shell, the init container runs `lb mount-bpffs`.
/// deploy/Dockerfile builds the same layout.
pub fn lb_image(lb: &Path, name: &str) -> Result<Image> {
    let mut image = Image::new(name);
    image.add_program(lb, "/usr/local/bin/lb")?;
    image.entrypoint = vec!["/usr/local/bin/lb".into()];
    Ok(image)
}

/// The SHA-256 of `bytes` in lowercase hex, as image digests spell it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The shared libraries `binary` loads, including the dynamic loader, as `ldd`
/// resolves them on this machine; empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable" (static) is the only acceptable failure.
        let stderr = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", binary.display(), stderr.trim());
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!(
                "{} needs a library this machine lacks: {line}",
                binary.display()
            );
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_are_reproducible_and_name_their_layer() {
        let dir = std::env::temp_dir().join(format!("lbt-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut image = Image::new("example.test/tool:1");
        image.entrypoint = vec!["/bin/true".into()];
        image
            .add_program(Path::new("/bin/true"), "/bin/true")
            .unwrap()
            .add_bytes("/etc/motd", "hello\n", 0o644)
            .add_symlink("/usr/bin/true", "/bin/true");
        let first = image.write_docker_archive(&dir.join("a.tar")).unwrap();
        let second = image.write_docker_archive(&dir.join("b.tar")).unwrap();
        assert_eq!(first, second);
        assert_eq!(
            fs::read(dir.join("a.tar")).unwrap(),
            fs::read(dir.join("b.tar")).unwrap()
        );

        // The outer archive: the layer, the configuration and the manifest.
        let mut outer = tar::Archive::new(fs::File::open(dir.join("a.tar")).unwrap());
        let mut entries = BTreeMap::new();
        for entry in outer.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            entries.insert(name, bytes);
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&entries["manifest.json"]).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], "example.test/tool:1");
        let layer_name = manifest[0]["Layers"][0].as_str().unwrap();
        let layer = &entries[layer_name];
        let config: serde_json::Value =
            serde_json::from_slice(&entries[manifest[0]["Config"].as_str().unwrap()]).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256_hex(layer))
        );

        // The layer: parents before children, the program's libraries, the loader.
        let names: Vec<String> = tar::Archive::new(layer.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        let position = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(position("etc/") < position("etc/motd"), "{names:?}");
        assert!(names.contains(&"bin/true".to_string()), "{names:?}");
        assert!(names.iter().any(|n| n.contains("libc.so")), "{names:?}");
        assert!(names.iter().any(|n| n.contains("ld-linux")), "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
