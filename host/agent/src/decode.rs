//! Manifest files → objects with their origin.
//!
//! Each file is a stream of YAML documents (JSON is YAML too); empty documents are skipped
//! and `List` kinds are flattened into their items. Parsing runs under budgets (aliases,
//! depth, nodes), so a hostile file cannot exhaust memory with an alias bomb. Every object
//! keeps its [`Origin`]: project, commit, path, document index and line.
//!
//! Errors are collected, not stopped at: one bad file does not hide another.
//!
//! [`set_namespaces`] then applies agentk's namespace rules using the cluster's scopes
//! ([`Scopes`], built by the caller from discovery plus the CRDs in the same set).

use std::collections::HashMap;

use serde_json::Value;
use serde_saphyr::Spanned;

use sluice_model::object::{Name, ObjRef, Object, Origin, group_of};
use sluice_model::scopes::Scopes;

/// One problem in one place. Not retryable: the commit must change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct Error {
    /// File path.
    pub path: String,
    /// 1-based line (0 when unknown).
    pub line: u64,
    /// What is wrong, naming the object when there is one.
    pub message: String,
}

/// Every problem found in a set of files.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("failed to decode manifest objects: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct Errors(pub Vec<Error>);

/// Decodes every file. `project` and `commit` go into each object's [`Origin`].
///
/// # Errors
/// [`Errors`] with one entry per malformed document or object.
pub fn decode(
    files: &[crate::select::SelectedFile],
    project: &str,
    commit: &str,
) -> Result<Vec<Object>, Errors> {
    decode_with(files, project, commit, None)
}

/// [`decode`], taking the objects of files decoded before from `memo` and leaving in it
/// the files of this call.
///
/// # Errors
/// As [`decode`].
pub fn decode_with(
    files: &[crate::select::SelectedFile],
    project: &str,
    commit: &str,
    memo: Option<&Memo>,
) -> Result<Vec<Object>, Errors> {
    let mut before = memo.map(Memo::take).unwrap_or_default();
    let mut now = HashMap::new();
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let (project, commit) = (Name::from(project), Name::from(commit));
    for file in files {
        let origin = Origin {
            project: project.clone(),
            commit: commit.clone(),
            path: file.path.as_str().into(),
            renderer: file.renderer.clone(),
            ..Origin::default()
        };
        let key = memo.map(|_| content_key(&file.bytes));
        let known = key.and_then(|k| before.remove(&k).or_else(|| now.get(&k).cloned()));
        if let (Some(key), Some(docs)) = (key, known)
            && let Some(objs) = recall(&docs, &origin)
        {
            objects.extend(objs);
            now.insert(key, docs);
            continue;
        }
        match decode_file(&file.bytes, origin, Need::Identity) {
            Ok(objs) => {
                if let Some(key) = key {
                    now.insert(key, memoize(&objs));
                }
                objects.extend(objs);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if let Some(memo) = memo {
        memo.put(now);
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(Errors(errors))
    }
}

/// Files decoded by earlier syncs of one project, by content: a push that changes one file
/// of a thousand decodes one file (YAML with line numbers costs about 40 µs per object;
/// the JSON kept here a tenth of that). Objects are kept as compact JSON text, about the
/// size of the files, not as values; only files that decoded cleanly, and only those of
/// the last commit. Clones share the same memo.
#[derive(Debug, Clone, Default)]
pub struct Memo(std::sync::Arc<std::sync::Mutex<Files>>);

type Files = HashMap<[u8; 32], std::sync::Arc<[Memoized]>>;

/// One object of a decoded file: where it was, and its JSON.
#[derive(Debug)]
struct Memoized {
    doc_index: usize,
    line: u64,
    json: std::sync::Arc<str>,
}

impl Memo {
    fn take(&self) -> Files {
        self.0
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default()
    }

    fn put(&self, files: Files) {
        if let Ok(mut f) = self.0.lock() {
            *f = files;
        }
    }
}

fn content_key(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn memoize(objects: &[Object]) -> std::sync::Arc<[Memoized]> {
    objects
        .iter()
        .map(|o| Memoized {
            doc_index: o.origin.doc_index,
            line: o.origin.line,
            json: o.shared_json(),
        })
        .collect()
}

/// The objects of a memoized file at `origin`; `None` (decode it again) if any text no
/// longer parses, which only a bug could cause.
fn recall(docs: &[Memoized], origin: &Origin) -> Option<Vec<Object>> {
    docs.iter()
        .map(|d| {
            Object::from_json(
                d.json.clone(),
                Origin {
                    doc_index: d.doc_index,
                    line: d.line,
                    ..origin.clone()
                },
            )
        })
        .collect()
}

/// What an object must have to be decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// apiVersion, kind and metadata.name: what applying needs.
    Identity,
    /// A mapping: a test fixture, which `gator verify` reads without a name.
    Mapping,
}

/// The documents of a test fixture, read as manifests are ([`decode`]'s YAML rules, Lists,
/// lines), but asking of each only that it be a mapping: Gatekeeper Suites review objects
/// without `metadata.name`.
///
/// # Errors
/// Malformed YAML, or a document that is not a mapping, with its file and line.
pub fn decode_fixture(file: &crate::select::SelectedFile) -> Result<Vec<Object>, Errors> {
    let origin = Origin {
        path: file.path.as_str().into(),
        ..Origin::default()
    };
    decode_file(&file.bytes, origin, Need::Mapping).map_err(Errors)
}

fn decode_file(bytes: &[u8], origin: Origin, need: Need) -> Result<Vec<Object>, Vec<Error>> {
    let err = |line: u64, message: String| {
        vec![Error {
            path: origin.path.to_string(),
            line,
            message,
        }]
    };
    let text = std::str::from_utf8(bytes).map_err(|e| err(0, format!("file is not UTF-8: {e}")))?;
    let docs: Vec<Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(text, yaml_options(false)).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            err(line, yaml_error(&e.to_string()))
        })?;
    // Where a YAML 1.1 boolean spelling (`n`, `yes`, `off`, …) lands in a field Kubernetes
    // only allows strings in (names, labels, annotations, ConfigMap and Secret data),
    // kubectl fails ("cannot unmarshal bool into … string"); sluice keeps the text there
    // instead. Only documents that have such a scalar pay for the second reading.
    let as_written: Option<Vec<Spanned<Value>>> = docs
        .iter()
        .any(|d| has_bool(&d.value))
        .then(|| serde_saphyr::from_multiple_with_options(text, yaml_options(true)).ok())
        .flatten()
        .filter(|w: &Vec<Spanned<Value>>| w.len() == docs.len());
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (doc_index, mut doc) in docs.into_iter().enumerate() {
        if let Some(written) = as_written.as_ref().and_then(|w| w.get(doc_index)) {
            strings_where_only_strings_fit(&mut doc.value, &written.value);
        }
        let origin = Origin {
            doc_index,
            line: doc.referenced.line(),
            ..origin.clone()
        };
        if doc.value.is_null() {
            continue;
        }
        let mut value = doc.value;
        integral_floats(&mut value);
        let items = match flatten(value) {
            Ok(items) => items,
            Err(message) => {
                errors.push(Error {
                    path: origin.path.to_string(),
                    line: origin.line,
                    message,
                });
                continue;
            }
        };
        for value in items {
            let checked = match need {
                Need::Identity => check(&value),
                Need::Mapping if value.is_object() => Ok(()),
                Need::Mapping => {
                    Err("document is not a mapping; expected a Kubernetes object".into())
                }
            };
            match checked {
                Ok(()) => objects.push(Object::new(&value, origin.clone())),
                Err(message) => errors.push(Error {
                    path: origin.path.to_string(),
                    line: origin.line,
                    message,
                }),
            }
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

/// A `…List` kind with `items` becomes its items; anything else stays itself.
fn flatten(value: Value) -> Result<Vec<Value>, String> {
    let is_list =
        value["kind"].as_str().is_some_and(|k| k.ends_with("List")) && value.get("items").is_some();
    if !is_list {
        return Ok(vec![value]);
    }
    match value {
        Value::Object(mut map) => match map.remove("items") {
            Some(Value::Array(items)) => Ok(items),
            Some(Value::Null) => Ok(Vec::new()),
            _ => Err("List: items must be a list of objects".into()),
        },
        _ => unreachable!("is_list implies an object"),
    }
}

/// The fields every object needs before it can be identified.
fn check(value: &Value) -> Result<(), String> {
    if !value.is_object() {
        return Err("document is not a mapping; expected a Kubernetes object".into());
    }
    let has = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    let mut missing = Vec::new();
    if !has(&value["apiVersion"]) {
        missing.push("apiVersion");
    }
    if !has(&value["kind"]) {
        missing.push("kind");
    }
    if !has(&value["metadata"]["name"]) {
        missing.push("metadata.name");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "object {} is missing {}",
            ObjRef::of(value),
            missing.join(", ")
        ))
    }
}

/// How manifests are read: as kubectl and agentk read them (sigs.k8s.io/yaml, a YAML 1.1
/// reader), so every manifest `kubectl apply --server-side` accepts becomes the same object:
///
/// - YAML 1.1 octals: `defaultMode: 0644` is 420 (a YAML 1.2 reader makes it 644.0);
/// - YAML 1.1 booleans: `yes`/`no`/`on`/`off`/`y`/`n` are booleans, so `readOnly: yes` is
///   `true` as kubectl sends it; except in the fields that only hold strings (names,
///   labels, annotations, ConfigMap and Secret data), where kubectl fails and sluice keeps
///   the text ([`strings_where_only_strings_fit`]). Elsewhere the API server's rejection of
///   a boolean in a string field says to quote the value.
/// - a duplicate key keeps its last value, as sigs.k8s.io/yaml does;
/// - floats with an integral value become integers ([`integral_floats`]), as Go's JSON
///   encoder writes them, so `replicas: 1.0` is accepted.
///
/// Budgets bound what one file may cost: alias expansion, nesting and node count.
fn yaml_options(strict_booleans: bool) -> serde_saphyr::Options {
    serde_saphyr::options! {
        legacy_octal_numbers: true,
        strict_booleans: strict_booleans,
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::LastWins,
        budget: serde_saphyr::budget! {
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_depth: 100,
            max_documents: 10_000,
            max_nodes: 2_000_000,
            // Alias expansion counts: a 4 MiB scalar aliased 900 times stops here, at
            // ~76 MiB peak, instead of 3.6 GB.
            max_total_scalar_bytes: 64 << 20,
        },
    }
}

fn has_bool(v: &Value) -> bool {
    match v {
        Value::Bool(_) => true,
        Value::Array(items) => items.iter().any(has_bool),
        Value::Object(map) => map.values().any(has_bool),
        _ => false,
    }
}

/// In the fields Kubernetes types as strings whatever the kind (metadata name, namespace,
/// labels, annotations; ConfigMap and Secret data), a boolean that was written as a YAML
/// 1.1 spelling (`written`, read with YAML 1.2 booleans, holds it as text) becomes that
/// text again: `name: n` is the Namespace `n`, where kubectl fails.
fn strings_where_only_strings_fit(doc: &mut Value, written: &Value) {
    let text = |a: &mut Value, w: &Value| {
        if a.is_boolean() && w.is_string() {
            *a = w.clone();
        }
    };
    let each = |a: &mut Value, w: &Value| {
        if let (Some(a), Some(w)) = (a.as_object_mut(), w.as_object()) {
            for (k, v) in a.iter_mut() {
                if let Some(wv) = w.get(k) {
                    text(v, wv);
                }
            }
        }
    };
    if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut)
        && let Some(w) = written["items"].as_array()
    {
        for (a, w) in items.iter_mut().zip(w) {
            strings_where_only_strings_fit(a, w);
        }
    }
    for key in ["apiVersion", "kind"] {
        if let Some(a) = doc.get_mut(key) {
            text(a, &written[key]);
        }
    }
    if let Some(meta) = doc.get_mut("metadata") {
        for key in ["name", "namespace", "generateName"] {
            if let Some(a) = meta.get_mut(key) {
                text(a, &written["metadata"][key]);
            }
        }
        for key in ["labels", "annotations"] {
            if let Some(a) = meta.get_mut(key) {
                each(a, &written["metadata"][key]);
            }
        }
    }
    let core_kind = |k: &str| written["apiVersion"] == "v1" && written["kind"] == k;
    if core_kind("ConfigMap") || core_kind("Secret") {
        for key in ["data", "stringData"] {
            if let Some(a) = doc.get_mut(key) {
                each(a, &written[key]);
            }
        }
    }
}

/// Go's `encoding/json` writes a float64 with an integral value without a fraction (`1.0`
/// is `1`), and that is what kubectl sends; the API server then reads it into integer
/// fields. Converting here keeps `replicas: 1.0` or `cpu: 1e3` working as with kubectl.
fn integral_floats(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                // Exact for |f| < 2^53; larger floats stay floats, as their digits are
                // not known to be exact.
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats),
        Value::Object(map) => map.values_mut().for_each(integral_floats),
        _ => {}
    }
}

/// The parser's message, or for a budget breach, which limit was hit and what to do.
fn yaml_error(message: &str) -> String {
    let first = first_line(message);
    let Some((_, breach)) = first.split_once("budget breached: ") else {
        return format!("invalid YAML: {first}");
    };
    let limit = breach
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or_default();
    let what = match limit {
        "ScalarBytes" => {
            "the file expands to more than 64 MiB of text (anchors and aliases count each time they are used)"
        }
        "Aliases" => "more than 1,000 aliases",
        "Anchors" => "more than 1,000 anchors",
        "Depth" => "nesting deeper than 100 levels",
        "Documents" => "more than 10,000 documents",
        "Nodes" => "more than 2,000,000 nodes",
        _ => "a parser limit",
    };
    format!(
        "refusing to read the file: {what} ({limit} budget); split it into smaller files, or repeat large values instead of aliasing them"
    )
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// agentk's `SetNamespaces`: namespaced objects without a namespace get
/// `default_namespace`; cluster-scoped objects with a namespace and unknown kinds are errors.
///
/// # Errors
/// [`Errors`] naming every offending object with its file and line.
pub fn set_namespaces(
    objects: &mut [Object],
    default_namespace: &str,
    scopes: &Scopes,
) -> Result<(), Errors> {
    let mut errors = Vec::new();
    for o in objects.iter_mut() {
        let group = group_of(o.api_version()).to_string();
        let at = |message: String| Error {
            path: o.origin.path.to_string(),
            line: o.origin.line,
            message,
        };
        match scopes.namespaced(&group, o.kind()) {
            Some(true) if o.namespace().is_none() => {
                o.edit(|v| {
                    v["metadata"]["namespace"] = Value::String(default_namespace.to_string());
                });
            }
            Some(true) => {}
            Some(false) if o.namespace().is_some() => {
                errors.push(at(format!(
                    "{}: resource is cluster-scoped but has a non-empty namespace",
                    o.obj_ref()
                )));
            }
            Some(false) => {
                // Drop an explicit empty namespace so identities compare equal.
                if o.json().contains("\"namespace\"") {
                    o.edit(|v| {
                        if let Some(m) = v["metadata"].as_object_mut() {
                            m.remove("namespace");
                        }
                    });
                }
            }
            None => errors.push(at(format!(
                "{}: unknown kind {} in {}; is its CRD installed or part of this commit?",
                o.obj_ref(),
                o.kind(),
                o.api_version()
            ))),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Errors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::SelectedFile;

    fn file(path: &str, text: &str) -> SelectedFile {
        SelectedFile {
            path: path.into(),
            bytes: text.as_bytes().to_vec(),
            renderer: None,
        }
    }

    #[test]
    fn remembered_files_decode_to_the_same_objects_and_changed_ones_anew() {
        let a = "a: 1\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {on: yes, n: 0644}\nx: 1.0\n";
        let b = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Secret, metadata: {name: s}}\n";
        let bad = "apiVersion: v1\nkind: ConfigMap\n";
        let memo = Memo::default();
        let files = [file("a.yaml", a), file("b.yaml", b), file("copy/b.yaml", b)];
        // A first object without kind fails the first file; the rest is memoized.
        assert!(decode_with(&files, "p", "c1", Some(&memo)).is_err());
        let files = [
            file("a.yaml", &a[5..]),
            file("b.yaml", b),
            file("copy/b.yaml", b),
        ];
        let first = decode_with(&files, "p", "c1", Some(&memo)).expect("decodes");
        assert_eq!(first, decode(&files, "p", "c1").expect("decodes"));
        assert_eq!(
            memo.0.lock().expect("lock").len(),
            2,
            "one entry per content"
        );
        // The next commit: the same objects from the memo, with the new commit and paths.
        let again = decode_with(&files, "p", "c2", Some(&memo)).expect("decodes");
        assert_eq!(again, decode(&files, "p", "c2").expect("decodes"));
        assert_eq!(again[2].origin.path, "copy/b.yaml");
        // A changed file is decoded again; a file that fails is an error, memo or not.
        let files = [
            file("a.yaml", &a[5..].replace("1.0", "2.0")),
            file("b.yaml", bad),
        ];
        let err = decode_with(&files, "p", "c3", Some(&memo)).expect_err("b.yaml fails");
        assert_eq!(err, decode(&files, "p", "c3").expect_err("fails"));
        assert_eq!(
            memo.0.lock().expect("lock").len(),
            1,
            "only this call's files stay"
        );
        let files = [file("a.yaml", &a[5..].replace("1.0", "2.0"))];
        let objects = decode_with(&files, "p", "c4", Some(&memo)).expect("decodes");
        assert_eq!(objects[0].value()["x"], 2);
    }

    #[test]
    fn multi_document_yaml_keeps_origins() {
        let objs = decode(
            &[file("app/a.yaml", "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n---\n# c\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\n")],
            "g/p",
            "abc",
        )
        .expect("decode");
        assert_eq!(objs.len(), 2);
        assert_eq!(
            objs[0].origin,
            Origin {
                project: "g/p".into(),
                commit: "abc".into(),
                path: "app/a.yaml".into(),
                doc_index: 0,
                line: 2,
                renderer: None,
            }
        );
        assert_eq!(objs[1].kind(), "Service");
        assert_eq!(objs[1].origin.line, 8);
    }

    #[test]
    fn json_and_lists() {
        let objs = decode(
            &[file("l.json", r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}},{"apiVersion":"v1","kind":"Secret","metadata":{"name":"y"}}]}"#)],
            "p",
            "c",
        )
        .expect("decode");
        assert_eq!(
            objs.iter().map(|o| o.kind()).collect::<Vec<_>>(),
            ["ConfigMap", "Secret"]
        );
    }

    #[test]
    fn errors_name_file_and_line_and_are_all_reported() {
        let e = decode(
            &[
                file(
                    "bad.yaml",
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n",
                ),
                file(
                    "noname.yaml",
                    "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
                ),
            ],
            "p",
            "c",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        assert_eq!(e.0[0].path, "bad.yaml");
        assert!(e.0[0].line >= 4, "{e}");
        assert!(e.0[0].message.starts_with("invalid YAML"), "{e}");
        assert_eq!(
            e.0[1].to_string(),
            "noname.yaml:1: object ConfigMap/ is missing metadata.name"
        );
    }

    #[test]
    fn yaml_1_1_booleans_stay_text_where_only_text_fits() {
        let objs = decode(
            &[file(
                "n.yaml",
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: n\n  labels: {on: off, quoted: \"true\"}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: yes, b: \"no\"}\n---\napiVersion: example.com/v1\nkind: X\nmetadata: {name: x}\nspec: {enabled: yes, data: {a: yes}}\n",
            )],
            "p",
            "c",
        )
        .expect("decode");
        assert_eq!(objs[0].name(), "n");
        assert_eq!(
            objs[0].value()["metadata"]["labels"],
            serde_json::json!({"on": "off", "quoted": "true"})
        );
        assert_eq!(
            objs[1].value()["data"],
            serde_json::json!({"a": "yes", "b": "no"})
        );
        assert_eq!(
            objs[2].value()["spec"],
            serde_json::json!({"enabled": true, "data": {"a": true}}),
            "elsewhere a YAML 1.1 boolean is a boolean, as kubectl reads it"
        );
    }

    #[test]
    fn scalars_read_as_kubectl_reads_them() {
        let objs = decode(
            &[file(
                "a.yaml",
                "apiVersion: v1\nkind: X\nmetadata: {name: \"n\"}\nspec:\n  octal: 0644\n  zero: 0\n  hex: 0x1F\n  float: 1.0\n  exp: 1e3\n  half: 0.5\n  yes: yes\n  off: off\n  t: true\n  quoted: \"0644\"\n  date: 2024-01-02\n  nul: ~\n  dup: 1\n  dup: 2\n",
            )],
            "p",
            "c",
        )
        .expect("decode");
        assert_eq!(
            objs[0].value()["spec"],
            serde_json::json!({"octal": 420, "zero": 0, "hex": 31, "float": 1, "exp": 1000, "half": 0.5,
                "yes": true, "off": false, "t": true, "quoted": "0644", "date": "2024-01-02", "nul": null, "dup": 2})
        );
    }

    #[test]
    fn alias_bombs_hit_the_budget() {
        let mut bomb = String::from("a: &a [x,x,x,x,x,x,x,x,x,x]\n");
        for i in 0..20 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("a{}", i - 1)
            };
            bomb.push_str(&format!("b{i}: &a{i} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        }
        assert!(decode(&[file("bomb.yaml", &bomb)], "p", "c").is_err());
    }

    #[test]
    fn an_anchored_scalar_aliased_many_times_is_refused_fast() {
        // 4 MiB behind one anchor, 900 aliases: 3.6 GB if expanded.
        let mut text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata:\n  a: &big {}\n",
            "x".repeat(4 << 20)
        );
        for i in 0..900 {
            text.push_str(&format!("  k{i}: *big\n"));
        }
        let start = std::time::Instant::now();
        let e = decode(&[file("bomb.yaml", &text)], "p", "c").unwrap_err();
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        let text = e.to_string();
        assert!(
            text.starts_with("failed to decode manifest objects: bomb.yaml:"),
            "{text}"
        );
        assert!(
            text.contains("refusing to read the file: the file expands to more than 64 MiB of text (anchors and aliases count each time they are used) (ScalarBytes budget); split it into smaller files"),
            "{text}"
        );
    }

    #[test]
    fn namespaces_follow_agentk_rules() {
        let mut scopes = Scopes::default();
        scopes.insert("", "ConfigMap", true);
        scopes.insert("", "Namespace", false);
        let mut objs = decode(
            &[file(
                "a.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b, namespace: other}\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: widgets.example.com}\nspec: {group: example.com, scope: Namespaced, names: {kind: Widget}}\n",
            )],
            "p",
            "c",
        )
        .expect("decode");
        scopes.insert("apiextensions.k8s.io", "CustomResourceDefinition", false);
        scopes.add_crds(&objs);
        set_namespaces(&mut objs, "apps", &scopes).expect("namespaces");
        assert_eq!(objs[0].namespace(), Some("apps"));
        assert_eq!(objs[1].namespace(), Some("other"));
        assert_eq!(objs[2].namespace(), Some("apps"));

        let mut bad = decode(
            &[file(
                "ns.yaml",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, namespace: ns1}\n",
            )],
            "p",
            "c",
        )
        .expect("decode");
        let e = set_namespaces(&mut bad, "apps", &scopes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "failed to decode manifest objects: ns.yaml:1: Namespace/ns1/x: resource is cluster-scoped but has a non-empty namespace"
        );
    }
}
