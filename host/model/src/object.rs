//! The value every stage passes on: a manifest object with the place it came from.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// Where an object was written: project, commit, file, document, line. Every object and
/// every result carries one, so its strings are shared [`Name`]s.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// Manifest project id (path or URL).
    pub project: Name,
    /// Commit id.
    pub commit: Name,
    /// Repository-relative file path.
    pub path: Name,
    /// Index of the document in the file (0-based, empty documents not counted).
    pub doc_index: usize,
    /// 1-based line where the document (or List item) starts; for a rendered object, in
    /// the renderer's output for [`Self::path`].
    pub line: u64,
    /// The renderer that made the object from [`Self::path`] (a Helm template, a
    /// Kustomize resource or kustomization), with its version: `helm v4.3.2`. None: the
    /// file itself holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renderer: Option<Name>,
}

/// A DNS-1123 label, as Namespace names and most object names must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (dot-separated labels), as ServiceAccount and most object names
/// may be.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.renderer {
            None => write!(f, "{}:{}", self.path, self.line),
            Some(r) => write!(f, "{} (rendered by {r})", self.path),
        }
    }
}

/// A Kubernetes object from git, held as compact JSON text.
///
/// Every stage of a sync holds all of a commit's objects at once, so they are kept as the
/// text they would be sent as (a bench Deployment is about 400 bytes of JSON, and several
/// kilobytes as a `serde_json::Value` tree) with their identity fields beside it. A stage
/// that reads or changes more than the identity parses one object at a time
/// ([`Object::value`], [`Object::edit`]). The text is shared: clones, and the decode memo,
/// point at the same bytes.
#[derive(Clone, PartialEq)]
pub struct Object {
    json: Arc<str>,
    head: Head,
    /// Where it came from.
    pub origin: Origin,
}

/// The fields every stage reads, taken out of the text once. They are [`Name`]s, so the
/// identities a sync makes of an object ([`Object::obj_ref`]) share them.
#[derive(Debug, Clone, PartialEq, Default)]
struct Head {
    api_version: Name,
    group: Name,
    kind: Name,
    name: Name,
    /// Empty when unset.
    namespace: Name,
}

impl Head {
    fn of(value: &Value) -> Head {
        fn text(v: &Value) -> &str {
            v.as_str().unwrap_or_default()
        }
        Head::new(
            text(&value["apiVersion"]),
            text(&value["kind"]),
            text(&value["metadata"]["name"]),
            text(&value["metadata"]["namespace"]),
        )
    }

    fn new(api_version: &str, kind: &str, name: &str, namespace: &str) -> Head {
        Head {
            group: Name::recent(group_of(api_version)),
            api_version: Name::recent(api_version),
            kind: Name::recent(kind),
            name: name.into(),
            namespace: Name::recent(namespace),
        }
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Object")
            .field("json", &&*self.json)
            .field("origin", &self.origin)
            .finish()
    }
}

impl Object {
    /// The object of a manifest value.
    pub fn new(value: &Value, origin: Origin) -> Object {
        Object {
            json: value.to_string().into(),
            head: Head::of(value),
            origin,
        }
    }

    /// The object of a JSON text that [`Object::json`] gave (the decode memo's), sharing
    /// it; `None` if it does not parse.
    pub fn from_json(json: Arc<str>, origin: Origin) -> Option<Object> {
        /// Only what [`Head`] holds; the rest of the text is skipped, not built.
        #[derive(serde::Deserialize)]
        struct Text<'a> {
            #[serde(rename = "apiVersion", borrow, default)]
            api_version: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            metadata: Meta<'a>,
        }
        #[derive(serde::Deserialize, Default)]
        struct Meta<'a> {
            #[serde(borrow, default)]
            name: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            namespace: std::borrow::Cow<'a, str>,
        }
        let t: Text = serde_json::from_str(&json).ok()?;
        let head = Head::new(
            &t.api_version,
            &t.kind,
            &t.metadata.name,
            &t.metadata.namespace,
        );
        Some(Object { json, head, origin })
    }

    /// The compact JSON text: what a server-side apply sends.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The text, shared.
    pub fn shared_json(&self) -> Arc<str> {
        self.json.clone()
    }

    /// The manifest as a value, parsed from the text.
    pub fn value(&self) -> Value {
        // The text was written from a value (or checked to parse): it parses.
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }

    /// Changes the manifest: parses it, lets `change` edit the value, and keeps the result.
    pub fn edit<R>(&mut self, change: impl FnOnce(&mut Value) -> R) -> R {
        let mut value = self.value();
        let r = change(&mut value);
        self.json = value.to_string().into();
        self.head = Head::of(&value);
        r
    }

    /// Its identity (group, kind, namespace, name).
    pub fn obj_ref(&self) -> ObjRef {
        ObjRef {
            group: self.head.group.clone(),
            kind: self.head.kind.clone(),
            namespace: self.head.namespace.clone(),
            name: self.head.name.clone(),
        }
    }

    /// `apiVersion`.
    pub fn api_version(&self) -> &str {
        &self.head.api_version
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        &self.head.kind
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.head.name
    }

    /// `metadata.namespace`, if set and non-empty.
    pub fn namespace(&self) -> Option<&str> {
        Some(&*self.head.namespace).filter(|s| !s.is_empty())
    }

    /// An annotation's value (read from the text; only the metadata is built).
    pub fn annotation(&self, key: &str) -> Option<String> {
        self.metadata_map("annotations", key)
    }

    /// A label's value (read as [`Object::annotation`]).
    pub fn label(&self, key: &str) -> Option<String> {
        self.metadata_map("labels", key)
    }

    fn metadata_map(&self, map: &str, key: &str) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Text {
            #[serde(default)]
            metadata: Option<Value>,
        }
        // serde_json wrote the text and escapes only quotes, backslashes and control
        // characters: a key of plain text is in it as written, or not at all.
        let plain = !key.chars().any(|c| c == '"' || c == '\\' || c.is_control());
        if plain && !self.json.contains(key) {
            return None;
        }
        let t: Text = serde_json::from_str(&self.json).ok()?;
        t.metadata?.get(map)?.get(key)?.as_str().map(str::to_string)
    }
}

/// An annotation of a JSON object.
pub fn annotation<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value["metadata"]["annotations"][key].as_str()
}

/// A string shared by every copy: an identity is cloned into many sets and maps during a
/// sync (plan, inventory, results, waits), and a clone of a `Name` is a reference count,
/// not a copy. Compares, hashes and orders as the `str` it holds.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Name(Arc<str>);

impl Name {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `s` as a `Name`, shared with an equal one made recently on this thread: a commit's
    /// objects repeat a few apiVersions, kinds and namespaces thousands of times.
    fn recent(s: &str) -> Name {
        /// How many recent names a thread keeps (a linear scan of short strings).
        const KEPT: usize = 32;
        thread_local! {
            static RECENT: std::cell::RefCell<std::collections::VecDeque<Name>> =
                const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
        }
        RECENT.with(|recent| {
            let mut recent = recent.borrow_mut();
            if let Some(n) = recent.iter().find(|n| n.as_str() == s) {
                return n.clone();
            }
            let n = Name::from(s);
            if recent.len() == KEPT {
                recent.pop_back();
            }
            recent.push_front(n.clone());
            n
        })
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(s.into())
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name(s.into())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Name {
        Name(s.as_str().into())
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0.to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        String::deserialize(d).map(Name::from)
    }
}

/// An object's identity without version, as cli-utils' `ObjMetadata`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ObjRef {
    /// API group (`""` for core).
    pub group: Name,
    /// Kind.
    pub kind: Name,
    /// Namespace (`""` for cluster-scoped).
    pub namespace: Name,
    /// Name.
    pub name: Name,
}

impl ObjRef {
    /// The identity of a manifest.
    pub fn of(value: &Value) -> ObjRef {
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        ObjRef {
            group: group_of(api_version).into(),
            kind: value["kind"].as_str().unwrap_or_default().into(),
            namespace: value["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .into(),
            name: value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .into(),
        }
    }
}

/// Every message formats an object as `Kind/namespace/name` (or `Kind/name` when
/// cluster-scoped), like kubectl and Flux.
impl fmt::Display for ObjRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The SHA-256 of `text`, in lowercase hex: the one hash for anything persisted (ids,
/// names, cache directories), stable across Rust releases unlike `DefaultHasher`.
pub fn sha256_hex(text: &str) -> String {
    sha256_bytes_hex(text.as_bytes())
}

/// The SHA-256 of `bytes`, in lowercase hex (module digests).
pub fn sha256_bytes_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The group part of an `apiVersion` (`apps/v1` → `apps`, `v1` → ``).
pub fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_its_compact_text_with_its_identity_beside() {
        let v = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop",
                "labels": {"app": "web"}, "annotations": {"a/b": "1", "say \"hi\"": "2"}},
            "spec": {"note": "labels app a/b", "replicas": 2, "ratio": 0.5}});
        let o = Object::new(&v, Origin::default());
        // The text is what serde_json writes for the value: digests of earlier releases,
        // made from values, stay the same.
        assert_eq!(o.json(), v.to_string());
        assert_eq!(o.value(), v);
        assert_eq!(
            (o.api_version(), o.kind(), o.name(), o.namespace()),
            ("apps/v1", "Deployment", "web", Some("shop"))
        );
        assert_eq!(o.obj_ref(), ObjRef::of(&v));
        // Read from the text: present, absent (though the key is in the text elsewhere),
        // and a key with characters serde_json escapes.
        assert_eq!(o.annotation("a/b").as_deref(), Some("1"));
        assert_eq!(o.label("app").as_deref(), Some("web"));
        assert_eq!(o.label("a/b"), None);
        assert_eq!(o.annotation("say \"hi\"").as_deref(), Some("2"));
        assert_eq!(o.annotation("missing"), None);
        // The same text read back (the decode memo) is the same object, sharing the text.
        let again = Object::from_json(o.shared_json(), Origin::default()).expect("parses");
        assert_eq!(again, o);
        assert!(Object::from_json("{not json".into(), Origin::default()).is_none());
        // An edit keeps text and identity in step.
        let mut moved = o.clone();
        moved.edit(|v| v["metadata"]["namespace"] = "other".into());
        assert_eq!(moved.namespace(), Some("other"));
        assert_eq!(moved.value()["metadata"]["namespace"], "other");
        assert_eq!(o.namespace(), Some("shop"), "a clone is its own object");
        let mut bare = Object::new(
            &serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": ""}}),
            Origin::default(),
        );
        assert_eq!(bare.namespace(), None, "an empty namespace is none");
        bare.edit(|v| v["metadata"].as_object_mut().map(|m| m.remove("namespace")));
        assert_eq!(bare.obj_ref().namespace, "");
    }

    #[test]
    fn identities_of_an_object_share_their_strings() {
        let v = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}});
        let o = Object::new(&v, Origin::default());
        let (a, b) = (o.obj_ref(), o.obj_ref());
        assert!(Arc::ptr_eq(&a.name.0, &b.name.0) && Arc::ptr_eq(&a.group.0, &b.group.0));
        // Another object of the same kind and namespace shares those too.
        let mut w = v.clone();
        w["metadata"]["name"] = "db".into();
        let c = Object::new(&w, Origin::default()).obj_ref();
        assert!(Arc::ptr_eq(&a.kind.0, &c.kind.0) && Arc::ptr_eq(&a.namespace.0, &c.namespace.0));
        assert!(!Arc::ptr_eq(&a.name.0, &c.name.0) && c.name == "db");
        assert_eq!((a.group.as_str(), a.kind.as_str()), ("apps", "Deployment"));
        // A Name is its text: equality, order and hash as a str, serialised as a string.
        let web = String::from("web");
        assert!(a.name == "web" && a.name == *"web" && a.name == web);
        let (x, y) = (Name::from("a"), Name::from("b"));
        assert!(x < y);
        let set: std::collections::HashSet<Name> = [a.name.clone()].into();
        assert!(set.contains("web"));
        let json = serde_json::to_string(&a).expect("serialises");
        assert_eq!(
            json,
            r#"{"group":"apps","kind":"Deployment","namespace":"shop","name":"web"}"#
        );
        assert_eq!(serde_json::from_str::<ObjRef>(&json).expect("parses"), a);
        assert_eq!(
            format!("{} {:?}", a.kind, a.kind),
            "Deployment \"Deployment\""
        );
    }

    #[test]
    fn identity_formats_like_kubectl() {
        let v = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}});
        assert_eq!(ObjRef::of(&v).to_string(), "Deployment/shop/web");
        let v = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}});
        let r = ObjRef::of(&v);
        assert_eq!(
            (r.group.as_str(), r.to_string().as_str()),
            ("", "Namespace/shop")
        );
    }
}
