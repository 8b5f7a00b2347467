//! The value every stage passes on: a manifest object with the place it came from.

use std::fmt;

use serde_json::Value;

/// Where an object was written: project, commit, file, document, line.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// Manifest project id (path or URL).
    pub project: String,
    /// Commit id.
    pub commit: String,
    /// Repository-relative file path.
    pub path: String,
    /// Index of the document in the file (0-based, empty documents not counted).
    pub doc_index: usize,
    /// 1-based line where the document (or List item) starts.
    pub line: u64,
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
        write!(f, "{}:{}", self.path, self.line)
    }
}

/// A Kubernetes object from git.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// The manifest as JSON.
    pub value: Value,
    /// Where it came from.
    pub origin: Origin,
}

impl Object {
    /// Its identity (group, kind, namespace, name).
    pub fn obj_ref(&self) -> ObjRef {
        ObjRef::of(&self.value)
    }

    /// `apiVersion`.
    pub fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or_default()
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// `metadata.namespace`, if set and non-empty.
    pub fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"]
            .as_str()
            .filter(|s| !s.is_empty())
    }

    /// An annotation's value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        annotation(&self.value, key)
    }
}

/// An annotation of a JSON object.
pub fn annotation<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value["metadata"]["annotations"][key].as_str()
}

/// An object's identity without version, as cli-utils' `ObjMetadata`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ObjRef {
    /// API group (`""` for core).
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace (`""` for cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjRef {
    /// The identity of a manifest.
    pub fn of(value: &Value) -> ObjRef {
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        ObjRef {
            group: group_of(api_version).to_string(),
            kind: value["kind"].as_str().unwrap_or_default().to_string(),
            namespace: value["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            name: value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
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
