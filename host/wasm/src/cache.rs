//! The render cache: a plugin chain's outcome kept on disk, so a resync or a restart does
//! not run the plugins again over the same input.
//!
//! The key is the SHA-256 of everything the outcome depends on: the sluice version, the
//! subject (agent, project, commit), each plugin in order (module digest, name,
//! configuration, limits, mode, failure policy) and the input objects with their origins.
//! Keying on the input (after discovery's namespace rules, not only on the commit) means a
//! cluster whose scopes changed gets a fresh run, never a stale one.
//!
//! Only deterministic chains are cached: no plugin of the chain may hold a capability
//! (with clocks, random, network or the environment its output can differ between runs),
//! and an outcome where a plugin failed and was skipped (`failure_policy: ignore`) is not
//! stored, as the failure may be passing. Refusals are errors and never stored.
//!
//! One entry per project, `<dir>/<sha256(project)[..32]>-<key>.json`: storing an entry
//! removes the project's older ones, so the cache holds at most one outcome per project.
//! A missing, unreadable or corrupt entry is a miss, never an error. The directory is the
//! agent's own cache, as trusted as its git cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{Finding, Outcome, Plugin, Spec, Subject};
use sluice_model::object::{ObjRef, Object, Origin, sha256_hex};

/// Bumped when the stored format or what the key covers changes.
const FORMAT: &str = "sluice-render-cache/1";

/// Plugin chain outcomes on disk, one per project.
#[derive(Debug, Clone)]
pub struct OutcomeCache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    objects: Vec<StoredObject>,
    findings: Vec<StoredFinding>,
}

#[derive(Serialize, Deserialize)]
struct StoredObject {
    value: serde_json::Value,
    origin: Origin,
}

#[derive(Serialize, Deserialize)]
struct StoredFinding {
    plugin: String,
    severity: String,
    message: String,
    object: Option<ObjRef>,
    origin: Option<Origin>,
    field: Option<String>,
    proposed_value: Option<String>,
    rule: Option<String>,
}

impl OutcomeCache {
    /// A cache in `dir` (created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> OutcomeCache {
        OutcomeCache { dir: dir.into() }
    }

    /// The key of running `plugins` over `objects`, or `None` when the chain is not
    /// deterministic (a plugin holds a capability) or empty.
    pub fn key(plugins: &[Arc<Plugin>], subject: &Subject, objects: &[Object]) -> Option<String> {
        let chain: Vec<(&Spec, &str)> = plugins
            .iter()
            .map(|p| (&p.spec, p.sha256.as_str()))
            .collect();
        key(&chain, subject, objects)
    }

    fn prefix(project: &str) -> String {
        sha256_hex(project)[..32].to_string()
    }

    fn path(&self, project: &str, key: &str) -> PathBuf {
        self.dir
            .join(format!("{}-{key}.json", Self::prefix(project)))
    }

    /// The stored outcome for `key`, if any. Never fails: anything unreadable is a miss.
    pub fn get(&self, project: &str, key: &str) -> Option<Outcome> {
        let path = self.path(project, key);
        let bytes = std::fs::read(&path).ok()?;
        let entry: Entry = match serde_json::from_slice(&bytes) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "render cache entry unreadable; running the plugins");
                return None;
            }
        };
        let findings = entry
            .findings
            .into_iter()
            .map(|f| {
                Some(Finding {
                    severity: severity(&f.severity)?,
                    plugin: f.plugin,
                    message: f.message,
                    object: f.object,
                    origin: f.origin,
                    field: f.field,
                    proposed_value: f.proposed_value,
                    rule: f.rule,
                })
            })
            .collect::<Option<Vec<Finding>>>()?;
        Some(Outcome {
            objects: entry
                .objects
                .into_iter()
                .map(|o| Object::new(&o.value, o.origin))
                .collect(),
            findings,
            skipped: Vec::new(),
            cached: true,
        })
    }

    /// Stores `outcome` under `key` as the project's only entry. Outcomes with a skipped
    /// plugin are not stored. Failing to write is logged, never an error.
    pub fn put(&self, project: &str, key: &str, outcome: &Outcome) {
        if !outcome.skipped.is_empty() {
            return;
        }
        if let Err(e) = self.write(project, key, outcome) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not store the render cache entry");
        }
    }

    fn write(&self, project: &str, key: &str, outcome: &Outcome) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let entry = EntryRef {
            objects: outcome
                .objects
                .iter()
                .map(|o| {
                    Ok(StoredObjectRef {
                        value: serde_json::from_str(o.json())?,
                        origin: &o.origin,
                    })
                })
                .collect::<Result<_, serde_json::Error>>()?,
            findings: &outcome.findings,
        };
        // Written beside, then renamed: a reader never sees half an entry.
        let path = self.path(project, key);
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        serde_json::to_writer(&mut out, &entry)?;
        std::io::Write::flush(&mut out)?;
        drop(out);
        std::fs::rename(&partial, &path)?;
        // The project's older entries go: one outcome per project.
        let prefix = format!("{}-", Self::prefix(project));
        for old in std::fs::read_dir(&self.dir)?.flatten() {
            let name = old.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && old.path() != path {
                let _ = std::fs::remove_file(old.path());
            }
        }
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The key of running the chain (each plugin's spec and module digest, in order) over
/// `objects`: `None` when the chain is empty or a plugin holds a capability.
fn key(chain: &[(&Spec, &str)], subject: &Subject, objects: &[Object]) -> Option<String> {
    if chain.is_empty() || chain.iter().any(|(s, _)| !s.capabilities.is_empty()) {
        return None;
    }
    let mut h = sha2::Sha256::new();
    // Every field is length-prefixed, so no two inputs write the same bytes.
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(FORMAT.as_bytes());
    field(env!("CARGO_PKG_VERSION").as_bytes());
    for s in [subject.agent.as_str(), &subject.project, &subject.commit] {
        field(s.as_bytes());
    }
    field(&(chain.len() as u64).to_le_bytes());
    for (spec, digest) in chain {
        field(digest.as_bytes());
        field(spec.name.as_bytes());
        // Maps keep the order they were written in (serde_json's `preserve_order`, for
        // memory): sorted, the same config gives the same text however it was written.
        let mut config = spec.config.clone();
        config.sort_all_objects();
        field(config.to_string().as_bytes());
        field(
            spec.granted
                .as_ref()
                .map_or("", |g| g.sha256.as_str())
                .as_bytes(),
        );
        field(
            format!(
                "{:?}/{}/{}/{:?}/{:?}",
                spec.limits.timeout,
                spec.limits.memory_bytes,
                spec.limits.max_output_bytes,
                spec.mode,
                spec.failure_policy
            )
            .as_bytes(),
        );
    }
    field(&(objects.len() as u64).to_le_bytes());
    for o in objects {
        field(o.json().as_bytes());
        field(o.origin.path.as_bytes());
        field(&(o.origin.doc_index as u64).to_le_bytes());
        field(&o.origin.line.to_le_bytes());
    }
    Some(hex::encode(h.finalize()))
}

/// What [`OutcomeCache::write`] stores, borrowed from the outcome (the same shape as
/// [`Entry`]: `Finding` serialises with the field names `StoredFinding` reads).
#[derive(Serialize)]
struct EntryRef<'a> {
    objects: Vec<StoredObjectRef<'a>>,
    findings: &'a [Finding],
}

#[derive(Serialize)]
struct StoredObjectRef<'a> {
    /// The object's text as it is (the same JSON as [`StoredObject::value`]).
    value: &'a serde_json::value::RawValue,
    origin: &'a Origin,
}

fn severity(s: &str) -> Option<&'static str> {
    ["error", "warning", "info"].into_iter().find(|k| *k == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Outcome {
        let origin = Origin {
            project: "group/app".into(),
            commit: "c".repeat(40).into(),
            path: "a.yaml".into(),
            doc_index: 1,
            line: 7,
            renderer: None,
        };
        Outcome {
            objects: vec![Object::new(
                &serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}),
                origin.clone(),
            )],
            findings: vec![Finding {
                plugin: "p".into(),
                severity: "warning",
                message: "m".into(),
                object: Some(ObjRef {
                    group: "".into(),
                    kind: "ConfigMap".into(),
                    namespace: "ns".into(),
                    name: "a".into(),
                }),
                origin: Some(origin),
                field: Some("data".into()),
                proposed_value: None,
                rule: None,
            }],
            skipped: Vec::new(),
            cached: false,
        }
    }

    #[test]
    fn an_outcome_comes_back_as_stored_and_only_the_latest_per_project_is_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let cache = OutcomeCache::new(dir.path().join("rendered"));
        assert!(cache.get("group/app", "k1").is_none());
        cache.put("group/app", "k1", &outcome());
        cache.put("group/other", "k1", &outcome());
        // A new cache on the same directory, as after a restart.
        let again = OutcomeCache::new(dir.path().join("rendered"));
        let got = again.get("group/app", "k1").expect("hit");
        assert!(got.cached);
        assert_eq!(got.objects, outcome().objects);
        assert_eq!(got.findings, outcome().findings);
        again.put("group/app", "k2", &outcome());
        assert!(again.get("group/app", "k1").is_none());
        assert!(again.get("group/app", "k2").is_some());
        assert!(again.get("group/other", "k1").is_some());
        assert_eq!(std::fs::read_dir(cache.dir()).expect("dir").count(), 2);
    }

    fn spec(config: serde_json::Value) -> Spec {
        Spec {
            name: "set-labels".into(),
            module: "set_labels.wasm".into(),
            sha256: None,
            config,
            limits: super::super::Limits::default(),
            capabilities: Vec::new(),
            failure_policy: super::super::FailurePolicy::Fail,
            mode: super::super::Mode::Enforce,
            ..Spec::default()
        }
    }

    #[test]
    fn the_key_is_fixed_and_changes_with_everything_the_outcome_depends_on() {
        let subject = Subject {
            agent: "a".into(),
            project: "group/app".into(),
            commit: "c".repeat(40).into(),
        };
        let objects = outcome().objects;
        let base = spec(serde_json::json!({"labels": {"a": "1", "b": "2"}}));
        let k = |chain: &[(&Spec, &str)], subject: &Subject, objects: &[Object]| {
            key(chain, subject, objects).expect("deterministic chain")
        };
        let first = k(&[(&base, "d1")], &subject, &objects);
        assert_eq!(first.len(), 64);
        // The same config written in another key order is the same config.
        let reordered = spec(serde_json::json!({"labels": {"b": "2", "a": "1"}}));
        assert_eq!(k(&[(&reordered, "d1")], &subject, &objects), first);

        let other_config = spec(serde_json::json!({"labels": {"a": "1"}}));
        let mut moved = objects.clone();
        moved[0].origin.line += 1;
        let mut edited = objects.clone();
        edited[0].edit(|v| v["data"] = serde_json::json!({"x": "y"}));
        let other_commit = Subject {
            commit: "d".repeat(40).into(),
            ..subject.clone()
        };
        let audit = Spec {
            mode: super::super::Mode::Audit,
            ..base.clone()
        };
        let other_files = Spec {
            granted: Some(super::super::Granted {
                dir: "/x".into(),
                sha256: "f2".into(),
            }),
            ..base.clone()
        };
        let variants = [
            k(&[(&base, "d2")], &subject, &objects),
            k(&[(&other_config, "d1")], &subject, &objects),
            k(&[(&audit, "d1")], &subject, &objects),
            k(&[(&other_files, "d1")], &subject, &objects),
            k(&[(&base, "d1"), (&base, "d1")], &subject, &objects),
            k(&[(&base, "d1")], &other_commit, &objects),
            k(&[(&base, "d1")], &subject, &moved),
            k(&[(&base, "d1")], &subject, &edited),
            k(&[(&base, "d1")], &subject, &[]),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, first, "variant {i}");
        }

        // No key (no caching) for an empty chain or one holding a capability.
        assert_eq!(key(&[], &subject, &objects), None);
        let clocks = Spec {
            capabilities: vec![super::super::Capability::Clocks],
            ..base.clone()
        };
        assert_eq!(
            key(&[(&base, "d1"), (&clocks, "d3")], &subject, &objects),
            None
        );
    }

    #[test]
    fn a_corrupt_entry_or_a_skipped_plugin_is_a_miss() {
        let dir = tempfile::tempdir().expect("dir");
        let cache = OutcomeCache::new(dir.path());
        std::fs::write(cache.path("group/app", "k"), b"{not json").expect("write");
        assert!(cache.get("group/app", "k").is_none());
        let mut skipped = outcome();
        skipped.skipped.push("p".into());
        cache.put("group/app", "k2", &skipped);
        assert!(cache.get("group/app", "k2").is_none());
    }
}
