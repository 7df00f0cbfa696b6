//! The standalone source: a folder of Kubernetes YAML (or JSON) manifests holding
//! `v1 Service`, `discovery.k8s.io/v1 EndpointSlice` and `v1 Node` objects, in
//! multi-document files or `kind: List` documents as `kubectl get -o yaml` prints them.
//!
//! Files are re-read only when they change (inotify, plus a periodic rescan as a safety
//! net). Bad input never loses state: a file that no longer parses keeps all its
//! previous objects, and an object that no longer validates keeps its last good
//! version; both are reported with the file and object name. Unknown fields are errors
//! (like `kubectl apply --validate=strict`): a misspelt `targetport` would otherwise
//! silently send traffic to the wrong port.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    hash::{BuildHasher as _, RandomState},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use hashbrown::HashTable;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::{debug, info, warn};

use super::{Event, Kind, Object, ObjectKey, Sink};
use crate::{
    model::{
        NodeSpec, ObjectRef, ServiceSpec, SliceSpec, spec,
        workloads::{NamespaceSpec, PodSpec},
    },
    warnings::Summary,
};

/// Something wrong with the input, named precisely enough to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// "Service pods/redis-master", or "document 3" when the object has no name.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(object) => write!(f, "{}: {object}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Changes to the effective object set, for the model.
#[derive(Debug, Default)]
pub struct SourceChanges {
    pub upserted: Vec<Object>,
    pub removed: Vec<ObjectKey>,
    pub problems: Vec<Problem>,
    /// Files re-read in this scan.
    pub files_read: usize,
}

impl SourceChanges {
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }

    /// The source events for these changes (problems are reported separately).
    pub fn events(self) -> Vec<Event> {
        let mut events: Vec<Event> = self.upserted.into_iter().map(Event::Upsert).collect();
        events.extend(
            self.removed
                .into_iter()
                .map(|(kind, id)| Event::Remove(kind, id)),
        );
        events
    }
}

/// What a periodic rescan compares to decide whether to re-read a file. File times are
/// coarse (a jiffy) and inodes are reused, so two quick atomic replacements can look
/// alike: file-system events therefore always re-read the files they name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    inode: u64,
}

#[derive(Debug, Default)]
struct FileState {
    fingerprint: Option<Fingerprint>,
    /// Hash of the text last parsed: a file re-read with identical content changes
    /// nothing.
    content: u64,
    objects: FileObjects,
}

/// One file's objects, sorted by key: 16 bytes an object, where a B-tree keyed by
/// a copy of each key took about 100 (20 MB at 200 000 objects).
#[derive(Clone, Debug, Default)]
struct FileObjects(Vec<Object>);

impl FileObjects {
    fn sorted(objects: BTreeMap<ObjectKey, Object>) -> Self {
        Self(objects.into_values().collect())
    }

    fn get(&self, key: &ObjectKey) -> Option<&Object> {
        let at = self.0.binary_search_by(|o| cmp_key(o, key)).ok()?;
        Some(&self.0[at])
    }

    fn contains_key(&self, key: &ObjectKey) -> bool {
        self.get(key).is_some()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Object> {
        self.0.iter()
    }
}

/// The effective object of every key, with the file it comes from. The objects
/// (16 bytes each, shared with the model) carry their keys, so no key is copied: a
/// B-tree of copied keys took 20 MB at 200 000 objects, this table about 9.
#[derive(Debug, Default)]
struct Effective {
    table: HashTable<(Object, Arc<Path>)>,
    hasher: RandomState,
}

impl Effective {
    fn hash_key(&self, key: &ObjectKey) -> u64 {
        self.hasher.hash_one((key.0, &key.1))
    }

    fn hash_object(hasher: &RandomState, object: &Object) -> u64 {
        with_key(object, |kind, id| hasher.hash_one((kind, id)))
    }

    fn get(&self, key: &ObjectKey) -> Option<&Arc<Path>> {
        let hash = self.hash_key(key);
        let found = self.table.find(hash, |(o, _)| cmp_key(o, key).is_eq())?;
        Some(&found.1)
    }

    fn contains_key(&self, key: &ObjectKey) -> bool {
        self.get(key).is_some()
    }

    fn remove(&mut self, key: &ObjectKey) {
        let hash = self.hash_key(key);
        if let Ok(found) = self
            .table
            .find_entry(hash, |(o, _)| cmp_key(o, key).is_eq())
        {
            found.remove();
        }
    }

    /// Makes `object` the effective one for its key, from `path`.
    fn insert(&mut self, object: Object, path: Arc<Path>) {
        let hash = Self::hash_object(&self.hasher, &object);
        let key = object.key();
        let hasher = &self.hasher;
        match self.table.entry(
            hash,
            |(o, _)| cmp_key(o, &key).is_eq(),
            |(o, _)| Self::hash_object(hasher, o),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut slot) => *slot.get_mut() = (object, path),
            hashbrown::hash_table::Entry::Vacant(slot) => {
                slot.insert((object, path));
            }
        }
    }
}

/// Calls `f` with `object`'s key, borrowed where the object holds it (a Node's is
/// built from its name).
fn with_key<R>(object: &Object, f: impl FnOnce(Kind, &ObjectRef) -> R) -> R {
    match object {
        Object::Service(s) => f(Kind::Service, &s.id),
        Object::Slice(s) => f(Kind::EndpointSlice, &s.id),
        Object::Pod(p) => f(Kind::Pod, &p.id),
        Object::Node(_) | Object::Namespace(_) => {
            let (kind, id) = object.key();
            f(kind, &id)
        }
    }
}

/// How `object`'s key orders against `key`, without copying the key.
fn cmp_key(object: &Object, key: &ObjectKey) -> std::cmp::Ordering {
    with_key(object, |kind, id| (kind, id).cmp(&(key.0, &key.1)))
}

#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The effective object per key and the file it came from (one shared path per
    /// file and refresh: a copy per object cost 6 MB at 200 000 objects).
    effective: Effective,
}

fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // Editors' swap and backup files.
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let file_type = entry.file_type()?;
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if file_type.is_dir() && !hidden {
            walk(&path, out)?;
        } else if (file_type.is_file() || file_type.is_symlink()) && is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).ok()?;
    Some(Fingerprint {
        len: meta.len(),
        modified: meta.modified().ok(),
        changed: (meta.ctime(), meta.ctime_nsec()),
        inode: meta.ino(),
    })
}

impl ManifestDir {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            bail!(
                "manifest directory {} does not exist or is not a directory",
                root.display()
            );
        }
        Ok(Self {
            root,
            files: BTreeMap::new(),
            effective: Effective::default(),
        })
    }

    /// Re-reads changed, new and removed files and returns what changed.
    pub fn scan(&mut self) -> Result<SourceChanges> {
        let mut changes = SourceChanges::default();
        let mut present = Vec::new();
        walk(&self.root, &mut present)
            .with_context(|| format!("reading manifest directory {}", self.root.display()))?;
        let present: BTreeSet<PathBuf> = present.into_iter().collect();

        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            self.forget_file(&path, &mut changes);
        }
        for path in present {
            self.refresh_file(&path, false, &mut changes);
        }
        Ok(changes)
    }

    /// Re-reads only the given paths (from file-system events): O(changed files), so
    /// one edit in a folder of thousands of files costs one read. Paths that are not
    /// manifests (editor temp files) are ignored; a directory falls back to a full scan.
    pub fn scan_paths(&mut self, paths: &BTreeSet<PathBuf>) -> Result<SourceChanges> {
        if paths.iter().any(|p| p.is_dir() || self.is_known_dir(p)) {
            return self.scan();
        }
        let mut changes = SourceChanges::default();
        for path in paths {
            if !path.starts_with(&self.root) || !is_manifest(path) {
                continue;
            }
            if path.exists() {
                self.refresh_file(path, true, &mut changes);
            } else if self.files.contains_key(path) {
                self.forget_file(path, &mut changes);
            }
        }
        Ok(changes)
    }

    /// Whether `path` was a directory holding known files (and has been removed).
    fn is_known_dir(&self, path: &Path) -> bool {
        !path.exists() && self.files.keys().any(|f| f != path && f.starts_with(path))
    }

    fn forget_file(&mut self, path: &Path, changes: &mut SourceChanges) {
        let old = self.files.remove(path).unwrap_or_default();
        self.replace_file_objects(path, old.objects, FileObjects::default(), changes);
    }

    /// Re-parses one file if its content changed; without `force`, only if its
    /// fingerprint changed too.
    fn refresh_file(&mut self, path: &Path, force: bool, changes: &mut SourceChanges) {
        let fp = fingerprint(path);
        let known = self.files.get(path).and_then(|f| f.fingerprint);
        if !force && fp.is_some() && fp == known {
            return;
        }
        changes.files_read += 1;
        let text = match read_bounded(path) {
            Ok(text) => text,
            Err(err) => {
                changes.problems.push(Problem {
                    file: path.to_path_buf(),
                    object: None,
                    message: format!("cannot read file ({err}); keeping its previous objects"),
                });
                return;
            }
        };
        let content = {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            text.hash(&mut hasher);
            hasher.finish()
        };
        if let Some(state) = self.files.get_mut(path)
            && state.content == content
        {
            state.fingerprint = fp;
            return;
        }
        let previous = self.files.remove(path).unwrap_or_default();
        let parsed = parse_file(path, &text, &previous.objects, &mut changes.problems);
        let objects = match parsed {
            Some(objects) => FileObjects::sorted(objects),
            // Unparseable: keep everything the file had.
            None => previous.objects.clone(),
        };
        self.files.insert(
            path.to_path_buf(),
            FileState {
                fingerprint: fp,
                content,
                objects: FileObjects::default(),
            },
        );
        self.replace_file_objects(path, previous.objects, objects, changes);
    }

    /// Swaps one file's objects and updates the effective set, resolving objects defined
    /// in two files (the file that had it first keeps it).
    fn replace_file_objects(
        &mut self,
        path: &Path,
        old: FileObjects,
        new: FileObjects,
        changes: &mut SourceChanges,
    ) {
        let shared_path: Arc<Path> = Arc::from(path);
        for key in old.iter().map(Object::key).filter(|k| !new.contains_key(k)) {
            if self.effective.get(&key).map(|p| &**p) != Some(path) {
                continue;
            }
            self.effective.remove(&key);
            // Another file may define it too: it takes over.
            let other = self.files.iter().find_map(|(p, f)| {
                let object = f.objects.get(&key).filter(|_| p.as_path() != path)?;
                Some((Arc::<Path>::from(p.as_path()), object.clone()))
            });
            match other {
                Some((other_path, object)) => {
                    self.effective.insert(object.clone(), other_path);
                    changes.upserted.push(object);
                }
                None => changes.removed.push(key),
            }
        }
        for object in new.iter() {
            let key = object.key();
            match self.effective.get(&key) {
                Some(owner) if **owner != *path => {
                    changes.problems.push(Problem {
                        file: path.to_path_buf(),
                        object: Some(format!("{} {}", key.0, key.1)),
                        message: format!(
                            "also defined in {}, which wins; this copy is ignored",
                            owner.display()
                        ),
                    });
                }
                _ => {
                    if old.get(&key) != Some(object) || !self.effective.contains_key(&key) {
                        changes.upserted.push(object.clone());
                    }
                    self.effective.insert(object.clone(), shared_path.clone());
                }
            }
        }
        if let Some(state) = self.files.get_mut(path) {
            state.objects = new;
        }
    }
}

/// Splits a YAML stream at its document markers (`---` at the start of a line), so
/// documents can be parsed independently. Each piece keeps its marker line.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker && offset > start {
            pieces.push((start_line, &text[start..offset]));
            start = offset;
            start_line = number + 1;
        }
        offset += line.len();
    }
    if start < text.len() {
        pieces.push((start_line, &text[start..]));
    }
    pieces
}

/// What one document holds: its objects, each with a label for messages.
type DocumentItems = Vec<(String, Result<Parsed, Invalid>)>;

/// The YAML parser's limits. Its defaults stop alias bombs ("billion laughs") and
/// runaway nesting; the node and event counts are raised so that one `kind: List`
/// document may hold as many objects as a 64 MiB file can (the file size limit bounds
/// the work).
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 32 * 1024 * 1024;
    budget.max_events = 64 * 1024 * 1024;
    budget.max_reader_input_bytes = Some(MAX_FILE_BYTES as usize);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// One YAML (or JSON) document as a JSON value, the form Kubernetes objects
/// deserialize from; an empty document (only a marker or comments) is `null`.
fn parse_yaml(text: &str) -> Result<Value, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, yaml_options())
}

/// One YAML document deserialized as the Kubernetes object type `T` (through JSON, as
/// the manifests source reads objects).
#[cfg(test)]
pub(crate) fn from_yaml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let value = parse_yaml(text).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

fn parse_document(index: usize, text: &str) -> Result<DocumentItems, serde_saphyr::Error> {
    let value = parse_yaml(text)?;
    let items = match list_items(value) {
        Ok(items) => items,
        Err(single) => vec![single],
    };
    Ok(items
        .into_iter()
        .filter(|item| !item.is_null())
        .map(|item| (describe(&item, index), parse_object(item)))
        .collect())
}

/// Parses documents on every core: a 10 000-Service folder is mostly parse time.
fn parse_documents(pieces: &[(usize, &str)]) -> Vec<Result<DocumentItems, serde_saphyr::Error>> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    if workers < 2 || pieces.len() < 64 {
        return pieces
            .iter()
            .enumerate()
            .map(|(i, (_, text))| parse_document(i + 1, text))
            .collect();
    }
    let chunk = pieces.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = pieces
            .chunks(chunk)
            .enumerate()
            .map(|(n, part)| {
                scope.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, (_, text))| parse_document(n * chunk + i + 1, text))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("manifest parser thread panicked"))
            .collect()
    })
}

/// Parses one file. `None` when the file as a whole cannot be parsed (its previous
/// objects are then kept); otherwise its valid objects, with invalid ones replaced by
/// their previous version when there was one.
fn parse_file(
    path: &Path,
    text: &str,
    previous: &FileObjects,
    problems: &mut Vec<Problem>,
) -> Option<BTreeMap<ObjectKey, Object>> {
    let pieces = split_documents(text);
    let parsed = parse_documents(&pieces);
    let mut objects = BTreeMap::new();
    for ((start_line, _), document) in pieces.iter().zip(parsed) {
        let items = match document {
            Ok(items) => items,
            Err(err) => {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    object: None,
                    message: format!(
                        "not valid YAML in the document starting at line {start_line} ({err}); \
                         keeping the {} object(s) this file had",
                        previous.len()
                    ),
                });
                return None;
            }
        };
        for (label, outcome) in items {
            let report = |problems: &mut Vec<Problem>, message: String| {
                problems.push(Problem {
                    file: path.to_path_buf(),
                    object: Some(label.clone()),
                    message,
                });
            };
            match outcome {
                Ok(Parsed::Object(object)) => {
                    if let std::collections::btree_map::Entry::Vacant(slot) =
                        objects.entry(object.key())
                    {
                        slot.insert(object);
                    } else {
                        report(
                            problems,
                            "defined twice in this file; the first one is used".into(),
                        );
                    }
                }
                Ok(Parsed::Ignored(why)) => report(problems, why),
                Err(Invalid { key, message }) => {
                    let kept = key.as_ref().and_then(|k| previous.get(k).map(|o| (k, o)));
                    match kept {
                        Some((key, old)) => {
                            report(
                                problems,
                                format!("{message}; keeping its last good version"),
                            );
                            objects.insert(key.clone(), old.clone());
                        }
                        None => report(problems, format!("{message}; skipped")),
                    }
                }
            }
        }
    }
    Some(objects)
}

/// Parses the text of one manifest file (as if it were new): its valid objects and
/// the problems found. The fuzz target's entry point.
pub fn parse_text(text: &str) -> (Vec<Object>, Vec<Problem>) {
    let mut problems = Vec::new();
    let objects = parse_file(
        Path::new("fuzz.yaml"),
        text,
        &FileObjects::default(),
        &mut problems,
    )
    .map(|objects| objects.into_values().collect())
    .unwrap_or_default();
    (objects, problems)
}

/// Items of a `kind: List` (or `ServiceList`, `EndpointSliceList`) document; any
/// other document comes back as `Err`.
fn list_items(document: Value) -> Result<Vec<Value>, Value> {
    let is_list = document
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|kind| kind.ends_with("List"));
    if !is_list {
        return Err(document);
    }
    match document {
        Value::Object(mut map) => match map.remove("items") {
            Some(Value::Array(items)) => Ok(items),
            _ => Ok(Vec::new()),
        },
        other => Err(other),
    }
}

fn describe(value: &Value, index: usize) -> String {
    let kind = value.get("kind").and_then(Value::as_str);
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match (kind, name) {
        (Some(kind), Some(name)) => format!("{kind} {namespace}/{name}"),
        (Some(kind), None) => format!("{kind} (document {index}, no metadata.name)"),
        _ => format!("document {index}"),
    }
}

enum Parsed {
    Object(Object),
    Ignored(String),
}

struct Invalid {
    key: Option<ObjectKey>,
    message: String,
}

/// Deserializes strictly: unknown fields are errors naming their path.
fn strict<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let parsed: T =
        serde_ignored::deserialize(value, |path| unknown.push(field_path(&path.to_string())))
            .map_err(|e| e.to_string())?;
    if !unknown.is_empty() {
        return Err(format!("unknown field(s): {}", unknown.join(", ")));
    }
    Ok(parsed)
}

/// Renders a serde_ignored path (`spec.?.ports.?.0.targetport`, where `?` marks an
/// Option) the way kubectl names fields: `spec.ports[0].targetport`.
fn field_path(raw: &str) -> String {
    let mut out = String::new();
    for segment in raw.split('.').filter(|s| *s != "?") {
        if segment.parse::<usize>().is_ok() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

fn parse_object(value: Value) -> Result<Parsed, Invalid> {
    let text_field = |field: &str| {
        value
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let api_version = text_field("apiVersion");
    let kind = text_field("kind");
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let invalid = |kind: Kind, message: String| Invalid {
        key: name.as_ref().map(|name| {
            let id = if matches!(kind, Kind::Node | Kind::Namespace) {
                ObjectRef::new("", name.clone())
            } else {
                ObjectRef::new(namespace.clone(), name.clone())
            };
            (kind, id)
        }),
        message,
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let service: Service = strict(value).map_err(|e| invalid(Kind::Service, e))?;
            if let Some(why) = spec::service_ignored(&service.metadata) {
                return Ok(Parsed::Ignored(why));
            }
            let spec = ServiceSpec::from_k8s(&service)
                .map_err(|errors| invalid(Kind::Service, errors.join("; ")))?
                .expect("ignored Services are filtered above");
            Ok(Parsed::Object(Object::Service(Arc::new(spec))))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice =
                strict(value).map_err(|e| invalid(Kind::EndpointSlice, e))?;
            if let Some(why) = spec::slice_ignored(&slice.metadata) {
                return Ok(Parsed::Ignored(why));
            }
            let spec = SliceSpec::from_k8s(&slice)
                .map_err(|errors| invalid(Kind::EndpointSlice, errors.join("; ")))?
                .expect("ignored slices are filtered above");
            Ok(Parsed::Object(Object::Slice(Arc::new(spec))))
        }
        ("v1", "Node") => {
            let node: Node = strict(value).map_err(|e| invalid(Kind::Node, e))?;
            let spec = NodeSpec::from_k8s(&node)
                .map_err(|errors| invalid(Kind::Node, errors.join("; ")))?;
            Ok(Parsed::Object(Object::Node(Arc::new(spec))))
        }
        ("v1", "Pod") => {
            let pod: Pod = strict(value).map_err(|e| invalid(Kind::Pod, e))?;
            match PodSpec::from_k8s(&pod) {
                Some(spec) => Ok(Parsed::Object(Object::Pod(Arc::new(spec)))),
                None => Ok(Parsed::Ignored(format!(
                    "Pod {namespace}/{} has finished (phase Succeeded or Failed); ignored",
                    name.as_deref().unwrap_or_default()
                ))),
            }
        }
        ("v1", "Namespace") => {
            let ns: Namespace = strict(value).map_err(|e| invalid(Kind::Namespace, e))?;
            Ok(Parsed::Object(Object::Namespace(Arc::new(
                NamespaceSpec::from_k8s(&ns),
            ))))
        }
        (_, "Service" | "EndpointSlice" | "Node" | "Pod" | "Namespace") => Err(Invalid {
            key: None,
            message: format!(
                "apiVersion {api_version:?} is not supported for {kind} (use v1 for Service, \
                 Node, Pod and Namespace, discovery.k8s.io/v1 for EndpointSlice); skipped"
            ),
        }),
        ("", _) | (_, "") => Err(Invalid {
            key: None,
            message: "not a Kubernetes object (apiVersion and kind are required)".into(),
        }),
        ("v1", "Endpoints") => Ok(Parsed::Ignored(
            "v1 Endpoints are not read; describe endpoints with discovery.k8s.io/v1 EndpointSlice"
                .into(),
        )),
        _ => Ok(Parsed::Ignored(format!(
            "kind {kind} is not read (only v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node, v1 Pod and v1 Namespace); ignored"
        ))),
    }
}

/// A file written in place (no rename) is re-read when its writer closes it; if the
/// writer keeps it open (or writes through mmap), this long after its last write.
const UNCLOSED_WRITE_GRACE: Duration = Duration::from_millis(200);

/// What a file-system event asks for.
enum Trigger {
    /// These files are complete (closed after writing, renamed into place, removed).
    Ready(Vec<PathBuf>),
    /// These files are being written; wait for them to be closed.
    Writing(Vec<PathBuf>),
    /// Something we cannot narrow down (a directory moved, events were lost).
    Rescan,
}

fn classify(event: notify::Event) -> Option<Trigger> {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    if event.need_rescan() {
        return Some(Trigger::Rescan);
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            Some(Trigger::Ready(event.paths))
        }
        // Opens and reads (ours included).
        EventKind::Access(_) => None,
        EventKind::Create(CreateKind::Folder) => Some(Trigger::Rescan),
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_)) => {
            Some(Trigger::Writing(event.paths))
        }
        EventKind::Modify(ModifyKind::Metadata(_)) => None,
        EventKind::Modify(_) | EventKind::Remove(_) => Some(Trigger::Ready(event.paths)),
        EventKind::Any | EventKind::Other => Some(Trigger::Rescan),
    }
}

fn report(problems: &[Problem]) {
    let mut summary = Summary::default();
    for problem in problems {
        summary.warn(None, &problem.to_string());
    }
    summary.finish();
}

/// Starts the manifest source on a thread of its own (parsing a large folder must not
/// hold up signals or health checks). The folder is watched before it is first read,
/// so a change made during the initial read is seen as an event. Sends every object,
/// then `Listed` for every kind, then changes as they happen, until `sink` closes.
pub fn spawn(root: PathBuf, rescan_interval: Duration, sink: Sink) -> Result<()> {
    let mut dir = ManifestDir::new(&root)?;
    let (tx, triggers) = mpsc::channel::<Trigger>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let trigger = match event {
            Ok(event) => classify(event),
            Err(_) => Some(Trigger::Rescan),
        };
        if let Some(trigger) = trigger {
            let _ = tx.send(trigger);
        }
    })
    .context("creating the file watcher")?;
    notify::Watcher::watch(&mut watcher, &root, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", root.display()))?;
    std::thread::Builder::new()
        .name("manifests".into())
        .spawn(move || {
            let _watcher = watcher;
            follow(&mut dir, &triggers, rescan_interval, &sink);
        })
        .context("starting the manifest source")?;
    Ok(())
}

fn follow(
    dir: &mut ManifestDir,
    triggers: &mpsc::Receiver<Trigger>,
    rescan_interval: Duration,
    sink: &Sink,
) {
    // The initial read: nothing is announced as listed until it succeeds, so the
    // daemon never programs (or removes) anything from a folder it could not read.
    let started = Instant::now();
    let changes = loop {
        match dir.scan() {
            Ok(changes) => break changes,
            Err(err) => {
                warn!("{err:#}; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    report(&changes.problems);
    info!(
        files = changes.files_read,
        objects = changes.upserted.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        folder = %dir.root.display(),
        "manifests read"
    );
    let mut events = changes.events();
    events.extend(Kind::ALL.map(Event::Listed));
    if sink.send(events).is_err() {
        return;
    }

    // Files being written in place, and when they were last written.
    let mut writing: BTreeMap<PathBuf, Instant> = BTreeMap::new();
    let mut next_rescan = Instant::now() + rescan_interval;
    loop {
        let grace_deadline = writing
            .values()
            .min()
            .map(|last| *last + UNCLOSED_WRITE_GRACE);
        let deadline = grace_deadline.map_or(next_rescan, |g| g.min(next_rescan));
        let mut ready = BTreeSet::new();
        let mut full = false;
        match triggers.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(first) => {
                // Take every event already queued, then read once.
                let mut next = Some(first);
                while let Some(trigger) = next {
                    match trigger {
                        Trigger::Ready(paths) => {
                            for path in paths {
                                writing.remove(&path);
                                ready.insert(path);
                            }
                        }
                        Trigger::Writing(paths) => {
                            for path in paths {
                                writing.insert(path, Instant::now());
                            }
                        }
                        Trigger::Rescan => full = true,
                    }
                    next = triggers.try_recv().ok();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let due: Vec<PathBuf> = writing
            .iter()
            .filter(|(_, last)| now >= **last + UNCLOSED_WRITE_GRACE)
            .map(|(path, _)| path.clone())
            .collect();
        for path in due {
            writing.remove(&path);
            ready.insert(path);
        }
        if now >= next_rescan {
            full = true;
            next_rescan = now + rescan_interval;
        }
        let scanned = if full {
            debug!("manifest folder: full rescan");
            dir.scan()
        } else if !ready.is_empty() {
            debug!(files = ready.len(), "manifest files changed");
            dir.scan_paths(&ready)
        } else {
            continue;
        };
        let changes = match scanned {
            Ok(changes) => changes,
            Err(err) => {
                // The folder vanished or became unreadable: keep serving the last state.
                warn!("{err:#}; keeping the current services");
                continue;
            }
        };
        report(&changes.problems);
        if changes.is_empty() {
            continue;
        }
        if sink.send(changes.events()).is_err() {
            return;
        }
    }
}

/// Manifest files larger than this are refused (a Service or slice is a few KB; a
/// file of thousands of them is a few MB), so one stray file cannot exhaust memory.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads a manifest file, refusing one over [`MAX_FILE_BYTES`] without reading it.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let file = fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB, the limit for one manifest file",
            MAX_FILE_BYTES >> 20
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REDIS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: redis-master, namespace: pods}
spec:
  clusterIP: 10.96.0.100
  ports: [{port: 6379, targetPort: 6379}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: redis-master-1
  namespace: pods
  labels: {kubernetes.io/service-name: redis-master}
addressType: IPv4
ports: [{port: 6379, protocol: TCP}]
endpoints:
- addresses: [10.244.1.11]
- addresses: [10.244.1.12]
"#;

    fn dir_with(files: &[(&str, &str)]) -> (tempfile::TempDir, ManifestDir) {
        let tmp = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = tmp.path().join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        let dir = ManifestDir::new(tmp.path()).unwrap();
        (tmp, dir)
    }

    fn rewrite(tmp: &tempfile::TempDir, name: &str, text: &str) {
        // A new inode, like editors that save by rename, so the change is always seen.
        let path = tmp.path().join(name);
        let staging = tmp.path().join(format!(".{name}.tmp"));
        fs::write(&staging, text).unwrap();
        fs::rename(staging, path).unwrap();
    }

    fn names(objects: &[Object]) -> Vec<String> {
        objects
            .iter()
            .map(|o| match o {
                Object::Service(s) => format!("Service {}", s.id),
                Object::Slice(s) => format!("EndpointSlice {}", s.id),
                Object::Node(n) => format!("Node {}", n.name),
                Object::Pod(p) => format!("Pod {}", p.id),
                Object::Namespace(n) => format!("Namespace {}", n.name),
            })
            .collect()
    }

    #[test]
    fn reads_multi_document_files() {
        let (_tmp, mut dir) = dir_with(&[("redis.yaml", REDIS)]);
        let changes = dir.scan().unwrap();
        assert!(changes.problems.is_empty(), "{:?}", changes.problems);
        assert_eq!(
            names(&changes.upserted),
            vec![
                "Service pods/redis-master",
                "EndpointSlice pods/redis-master-1"
            ]
        );
        // Unchanged files are not re-read.
        let again = dir.scan().unwrap();
        assert_eq!(again.files_read, 0);
        assert!(again.is_empty());
    }

    #[test]
    fn reads_kubectl_list_output() {
        let list = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: kube-dns
    namespace: kube-system
    uid: 1b7a2a1c-0000-0000-0000-000000000000
    resourceVersion: "245"
    creationTimestamp: "2024-01-01T00:00:00Z"
    labels: {k8s-app: kube-dns}
  spec:
    clusterIP: 10.96.0.10
    clusterIPs: [10.96.0.10]
    internalTrafficPolicy: Cluster
    ipFamilies: [IPv4]
    ipFamilyPolicy: SingleStack
    ports:
    - {name: dns, port: 53, protocol: UDP, targetPort: 53}
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
    selector: {k8s-app: kube-dns}
    sessionAffinity: None
    type: ClusterIP
  status: {loadBalancer: {}}
"#;
        let (_tmp, mut dir) = dir_with(&[("all.yaml", list)]);
        let changes = dir.scan().unwrap();
        assert!(changes.problems.is_empty(), "{:?}", changes.problems);
        assert_eq!(
            names(&changes.upserted),
            vec!["Service kube-system/kube-dns"]
        );
    }

    #[test]
    fn other_kinds_are_reported_and_ignored() {
        let deployment =
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: redis}\nspec: {}\n";
        let (_tmp, mut dir) = dir_with(&[("redis.yaml", REDIS), ("deploy.yaml", deployment)]);
        let changes = dir.scan().unwrap();
        assert_eq!(changes.upserted.len(), 2);
        assert_eq!(changes.problems.len(), 1);
        let text = changes.problems[0].to_string();
        assert!(
            text.contains("deploy.yaml: Deployment default/redis: kind Deployment is not read"),
            "{text}"
        );
    }

    #[test]
    fn broken_yaml_keeps_the_files_previous_objects() {
        let (tmp, mut dir) = dir_with(&[("redis.yaml", REDIS)]);
        dir.scan().unwrap();
        rewrite(
            &tmp,
            "redis.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
        );
        let changes = dir.scan().unwrap();
        assert!(changes.is_empty(), "nothing removed: {changes:?}");
        let text = changes.problems[0].to_string();
        assert!(text.contains("redis.yaml: not valid YAML"), "{text}");
        assert!(text.contains("keeping the 2 object(s)"), "{text}");
        // Fixing the file again applies the new content.
        rewrite(
            &tmp,
            "redis.yaml",
            &REDIS.replace("10.244.1.12", "10.244.1.13"),
        );
        let changes = dir.scan().unwrap();
        assert!(changes.problems.is_empty());
        assert_eq!(
            names(&changes.upserted),
            vec!["EndpointSlice pods/redis-master-1"]
        );
    }

    #[test]
    fn an_invalid_object_keeps_its_last_good_version_and_others_apply() {
        let (tmp, mut dir) = dir_with(&[("redis.yaml", REDIS)]);
        dir.scan().unwrap();
        let edited = REDIS
            .replace(
                "port: 6379, targetPort: 6379",
                "port: 70000, targetPort: 6379",
            )
            .replace("10.244.1.12", "10.244.1.14");
        rewrite(&tmp, "redis.yaml", &edited);
        let changes = dir.scan().unwrap();
        // The slice change applies; the broken Service keeps its previous version.
        assert_eq!(
            names(&changes.upserted),
            vec!["EndpointSlice pods/redis-master-1"]
        );
        assert!(changes.removed.is_empty());
        let text = changes.problems[0].to_string();
        assert!(
            text.contains("Service pods/redis-master: spec.ports[0].port 70000 is out of range"),
            "{text}"
        );
        assert!(text.contains("keeping its last good version"), "{text}");
    }

    #[test]
    fn a_new_invalid_object_is_skipped() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 53, protocol: ICMP}]\n";
        let (_tmp, mut dir) = dir_with(&[("dns.yaml", bad)]);
        let changes = dir.scan().unwrap();
        assert!(changes.upserted.is_empty());
        let text = changes.problems[0].to_string();
        assert!(
            text.contains("Service default/dns: spec.ports[0]: unknown protocol \"ICMP\""),
            "{text}"
        );
        assert!(text.ends_with("skipped"), "{text}");
    }

    #[test]
    fn unknown_fields_are_errors() {
        let typo = REDIS.replace("targetPort: 6379", "targetport: 6379");
        let (_tmp, mut dir) = dir_with(&[("redis.yaml", &typo)]);
        let changes = dir.scan().unwrap();
        assert_eq!(
            names(&changes.upserted),
            vec!["EndpointSlice pods/redis-master-1"]
        );
        let text = changes.problems[0].to_string();
        assert!(
            text.contains("unknown field(s): spec.ports[0].targetport"),
            "{text}"
        );
    }

    #[test]
    fn deleting_a_file_removes_its_objects() {
        let (tmp, mut dir) = dir_with(&[("redis.yaml", REDIS)]);
        dir.scan().unwrap();
        fs::remove_file(tmp.path().join("redis.yaml")).unwrap();
        let changes = dir.scan().unwrap();
        assert_eq!(changes.removed.len(), 2);
    }

    #[test]
    fn objects_defined_in_two_files_are_reported_and_the_first_wins() {
        let (tmp, mut dir) = dir_with(&[("a.yaml", REDIS)]);
        dir.scan().unwrap();
        rewrite(&tmp, "b.yaml", &REDIS.replace("10.96.0.100", "10.96.0.200"));
        let changes = dir.scan().unwrap();
        assert!(changes.upserted.is_empty());
        assert_eq!(changes.problems.len(), 2);
        assert!(
            changes.problems[0].to_string().contains("also defined in"),
            "{}",
            changes.problems[0]
        );
        // Removing the first file hands the objects to the second.
        fs::remove_file(tmp.path().join("a.yaml")).unwrap();
        let changes = dir.scan().unwrap();
        assert!(changes.removed.is_empty());
        let ips: Vec<String> = changes
            .upserted
            .iter()
            .filter_map(|o| match o {
                Object::Service(s) => Some(s.cluster_ips[0].to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ips, vec!["10.96.0.200"]);
    }

    #[test]
    fn subdirectories_json_and_editor_files() {
        let json = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"pods"},"spec":{"clusterIP":"10.96.0.80","ports":[{"port":80}]}}"#;
        let (_tmp, mut dir) = dir_with(&[
            ("sub/web.json", json),
            (".redis.yaml.swp", "garbage: ["),
            ("notes.txt", "hi"),
        ]);
        let changes = dir.scan().unwrap();
        assert!(changes.problems.is_empty(), "{:?}", changes.problems);
        assert_eq!(names(&changes.upserted), vec!["Service pods/web"]);
    }

    #[test]
    fn targeted_rescans_read_only_the_named_files() {
        let (tmp, mut dir) = dir_with(&[
            ("redis.yaml", REDIS),
            ("other.yaml", &REDIS.replace("redis-master", "other")),
        ]);
        dir.scan().unwrap();
        rewrite(
            &tmp,
            "redis.yaml",
            &REDIS.replace("10.244.1.12", "10.244.1.13"),
        );
        let paths = BTreeSet::from([
            tmp.path().join("redis.yaml"),
            tmp.path().join(".redis.yaml.tmp"),
        ]);
        let changes = dir.scan_paths(&paths).unwrap();
        assert_eq!(changes.files_read, 1);
        assert_eq!(
            names(&changes.upserted),
            vec!["EndpointSlice pods/redis-master-1"]
        );
        fs::remove_file(tmp.path().join("other.yaml")).unwrap();
        let changes = dir
            .scan_paths(&BTreeSet::from([tmp.path().join("other.yaml")]))
            .unwrap();
        assert_eq!(changes.removed.len(), 2);
        // A new subdirectory means a full scan.
        fs::create_dir(tmp.path().join("more")).unwrap();
        fs::write(
            tmp.path().join("more/web.yaml"),
            REDIS.replace("redis-master", "web"),
        )
        .unwrap();
        let changes = dir
            .scan_paths(&BTreeSet::from([tmp.path().join("more")]))
            .unwrap();
        assert_eq!(changes.upserted.len(), 2);
    }

    #[test]
    fn alias_bombs_are_refused_with_the_document_named() {
        // "Billion laughs": nine levels of ten aliases each expand to 10^9 strings.
        let mut text = String::from("a0: &a0 [lol]\n");
        for level in 1..10 {
            let refs = vec![format!("*a{}", level - 1); 10].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        let (objects, problems) = parse_text(&text);
        assert!(objects.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .message
                .contains("not valid YAML in the document starting at line 1"),
            "{problems:?}"
        );
    }

    #[test]
    fn empty_and_comment_only_documents_are_skipped() {
        let text = "# nothing here\n---\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n";
        let (objects, problems) = parse_text(text);
        assert_eq!(objects.len(), 1, "{problems:?}");
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn documents_split_at_markers_only() {
        let text = "a: 1\n---\nb: |\n  ---not a marker\n--- {c: 3}\r\n---\t[4]\n";
        let pieces = split_documents(text);
        let starts: Vec<usize> = pieces.iter().map(|(line, _)| *line).collect();
        assert_eq!(starts, vec![1, 2, 5, 6]);
        assert_eq!(pieces[1].1, "---\nb: |\n  ---not a marker\n");
        let values: Vec<Value> = pieces.iter().map(|(_, t)| parse_yaml(t).unwrap()).collect();
        assert_eq!(values[2]["c"], Value::from(3));
        assert!(split_documents("").is_empty());
        assert_eq!(split_documents("---\na: 1\n").len(), 1);
    }

    #[test]
    fn many_documents_parse_in_parallel_in_file_order() {
        let mut text = String::new();
        for i in 0..200 {
            text.push_str(&REDIS.replace("redis-master", &format!("svc-{i:03}")));
            text.push_str("---\n");
        }
        let (_tmp, mut dir) = dir_with(&[("many.yaml", &text)]);
        let changes = dir.scan().unwrap();
        assert!(changes.problems.is_empty(), "{:?}", changes.problems);
        assert_eq!(changes.upserted.len(), 400);
        // A YAML error in document 150 names its line and keeps the file's objects.
        let broken = text.replacen("  name: svc-150-1\n", "  name: svc-150-1\n  bad: [\n", 1);
        let (_tmp, mut dir) = dir_with(&[("many.yaml", &broken)]);
        let changes = dir.scan().unwrap();
        assert!(changes.upserted.is_empty());
        assert!(
            changes.problems[0]
                .message
                .contains("document starting at line"),
            "{}",
            changes.problems[0]
        );
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let err = ManifestDir::new("/nonexistent/lb-manifests").unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/lb-manifests does not exist")
        );
    }
}

#[cfg(test)]
mod size_limit_tests {
    use super::*;

    #[test]
    fn a_file_over_the_limit_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yaml");
        // Sparse: no disk, but 64 MiB + 1 of zeros to whoever reads it.
        fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let err = read_bounded(&big).unwrap_err().to_string();
        assert!(err.contains("larger than 64 MiB"), "{err}");
        let small = dir.path().join("small.yaml");
        fs::write(&small, "kind: Service\n").unwrap();
        assert_eq!(read_bounded(&small).unwrap(), "kind: Service\n");
    }
}
