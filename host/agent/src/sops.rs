//! SOPS: files encrypted with `sops` (YAML or JSON, age recipients) decrypted before decode,
//! their MAC verified, as `sops decrypt` does.
//!
//! The format (getsops/sops v3): every encrypted value is
//! `ENC[AES256_GCM,data:<b64>,iv:<b64>,tag:<b64>,type:<str|int|float|bool|bytes>]`, AES-256-GCM
//! with a 32-byte nonce under the file's data key, its additional data the path of map keys
//! to it, each followed by `:`. The data key is in `sops.age[].enc`, age-encrypted to each
//! recipient. `sops.mac` is the SHA-512 (uppercase hex) of every value in document order
//! (only the encrypted ones, after fixed initial bytes, with `mac_only_encrypted`; booleans
//! as `True`/`False`), encrypted like a value with `sops.lastmodified` as additional data.
//! A file whose MAC does not match was changed after it was encrypted: it is refused.
//!
//! Keys are age identities (`AGE-SECRET-KEY-1...`) from a Kubernetes Secret, in every data
//! key ending `.agekey` (Flux's convention). Decrypted values are returned as the file's
//! text and never logged; errors name the file and never a value.
//!
//! Not supported (an error says so): YAML comments in an encrypted file (sops counts them in
//! the MAC), several YAML documents in one file, and keys other than age (KMS, PGP, Vault).

use std::io::Read;
use std::str::FromStr;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine as _;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::Digest;

/// Why a file could not be decrypted. Never holds a decrypted value.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Error {
    /// The file.
    pub path: String,
    /// Why.
    pub message: String,
}

/// The age identities a project decrypts with.
#[derive(Clone, Default)]
pub struct Keys(Vec<age::x25519::Identity>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} age identities)", self.0.len())
    }
}

impl Keys {
    /// The identities in `texts` (age key files: `AGE-SECRET-KEY-1...` lines, `#`
    /// comments); `source` names where they came from in errors.
    ///
    /// # Errors
    /// A line that is not a comment and not an age identity.
    pub fn parse<'a>(texts: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Keys, String> {
        let mut keys = Vec::new();
        for (name, text) in texts {
            let text = std::str::from_utf8(text).map_err(|_| format!("{name}: not UTF-8"))?;
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                keys.push(
                    age::x25519::Identity::from_str(line)
                        .map_err(|_| format!("{name}: a line is not an age identity"))?,
                );
            }
        }
        Ok(Keys(keys))
    }

    /// How many identities.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// True when `bytes` look like a SOPS file: a top-level `sops` map with a `mac`, and
/// encrypted values. Cheap: decode checks the rest.
pub fn is_encrypted(bytes: &[u8]) -> bool {
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    has(b"ENC[AES256_GCM,") && (has(b"\nsops:") || has(b"\"sops\""))
}

/// Decrypts a SOPS file with `keys`, returning the document as JSON text (which decode
/// reads as YAML), the keys in their order.
///
/// # Errors
/// See [`Error`]: no key fits, the MAC does not match, the file is malformed.
pub fn decrypt(path: &str, bytes: &[u8], keys: &Keys) -> Result<Vec<u8>, Error> {
    let err = |message: String| Error {
        path: path.to_string(),
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| err("not UTF-8".into()))?;
    if text.lines().any(|l| l.trim_start().starts_with('#')) {
        return Err(err(
            "SOPS files with YAML comments are not supported (sops counts them in the MAC); remove the comments and encrypt again".into(),
        ));
    }
    let docs: Vec<Node> = serde_saphyr::from_multiple(text).map_err(|e| err(e.to_string()))?;
    let [Node::Map(mut entries)] = <[Node; 1]>::try_from(docs)
        .map_err(|_| err("a SOPS file must hold exactly one YAML document".into()))?
    else {
        return Err(err("a SOPS file's document must be a map".into()));
    };
    let at = entries
        .iter()
        .position(|(k, _)| k == "sops")
        .ok_or_else(|| err("no sops metadata".into()))?;
    let (_, metadata) = entries.remove(at);
    let meta = Metadata::of(&metadata).map_err(err)?;
    if keys.is_empty() {
        return Err(err(
            "encrypted with SOPS, and no age key was given (the project's decryption.secret; --age-key-file for the CLI)"
                .into(),
        ));
    }
    let data_key = meta.data_key(keys).map_err(err)?;

    let mut hash = sha2::Sha512::new();
    if meta.mac_only_encrypted {
        hash.update(MAC_ONLY_ENCRYPTED_INIT);
    }
    let mut path_keys = Vec::new();
    let mut tree = Node::Map(entries);
    walk(&mut tree, &mut path_keys, &mut |value, keys| {
        let encrypted = matches!(value, Node::Str(s) if s.starts_with("ENC[AES256_GCM,"));
        if encrypted {
            let Node::Str(s) = &*value else {
                unreachable!("checked above")
            };
            let additional = format!("{}:", keys.join(":"));
            *value = decrypt_value(s, &data_key, &additional)?;
        }
        if !meta.mac_only_encrypted || encrypted {
            hash.update(mac_bytes(value));
        }
        Ok(())
    })
    .map_err(err)?;
    let computed = hex::encode_upper(hash.finalize());
    let stored = match decrypt_value(&meta.mac, &data_key, &meta.last_modified).map_err(err)? {
        Node::Str(s) => s,
        _ => return Err(err("sops.mac is not a string".into())),
    };
    if computed != stored {
        return Err(err(
            "MAC mismatch: the file was changed after it was encrypted (encrypt it again with sops)"
                .into(),
        ));
    }
    Ok(serde_json::to_vec(&tree.into_json()).unwrap_or_default())
}

/// What sops hashes first with `mac_only_encrypted` (getsops/sops `MACOnlyEncryptedInitialization`).
const MAC_ONLY_ENCRYPTED_INIT: [u8; 32] = [
    0x8a, 0x3f, 0xd2, 0xad, 0x54, 0xce, 0x66, 0x52, 0x7b, 0x10, 0x34, 0xf3, 0xd1, 0x47, 0xbe, 0x0b,
    0x0b, 0x97, 0x5b, 0x3b, 0xf4, 0x4f, 0x72, 0xc6, 0xfd, 0xad, 0xec, 0x81, 0x76, 0xf2, 0x7d, 0x69,
];

struct Metadata {
    age: Vec<String>,
    last_modified: String,
    mac: String,
    mac_only_encrypted: bool,
}

impl Metadata {
    fn of(node: &Node) -> Result<Metadata, String> {
        let Node::Map(fields) = node else {
            return Err("sops metadata is not a map".into());
        };
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let text = |k: &str| match get(k) {
            Some(Node::Str(s)) => Ok(s.clone()),
            _ => Err(format!("sops.{k} is missing")),
        };
        let age = match get("age") {
            Some(Node::Seq(items)) => items
                .iter()
                .filter_map(|i| match i {
                    Node::Map(f) => f
                        .iter()
                        .find(|(n, _)| n == "enc")
                        .and_then(|(_, v)| match v {
                            Node::Str(s) => Some(s.clone()),
                            _ => None,
                        }),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        if age.is_empty() {
            return Err(
                "the file has no age recipients; sluice decrypts with age keys only (not KMS, PGP or Vault)"
                    .into(),
            );
        }
        Ok(Metadata {
            age,
            last_modified: text("lastmodified")?,
            mac: text("mac")?,
            mac_only_encrypted: matches!(get("mac_only_encrypted"), Some(Node::Bool(true))),
        })
    }

    fn data_key(&self, keys: &Keys) -> Result<Vec<u8>, String> {
        for enc in &self.age {
            let reader = age::armor::ArmoredReader::new(enc.as_bytes());
            let Ok(decryptor) = age::Decryptor::new(reader) else {
                continue;
            };
            let identities = keys.0.iter().map(|i| i as &dyn age::Identity);
            if let Ok(mut plain) = decryptor.decrypt(identities) {
                let mut key = Vec::new();
                if plain.read_to_end(&mut key).is_ok() && key.len() == 32 {
                    return Ok(key);
                }
            }
        }
        Err(format!(
            "none of the project's {} age keys decrypts this file's data key",
            keys.len()
        ))
    }
}

/// One `ENC[...]` value, decrypted and typed.
fn decrypt_value(text: &str, key: &[u8], additional: &str) -> Result<Node, String> {
    let inner = text
        .strip_prefix("ENC[AES256_GCM,")
        .and_then(|t| t.strip_suffix(']'))
        .ok_or("a value is not ENC[AES256_GCM,...]")?;
    let mut parts = std::collections::BTreeMap::new();
    for part in inner.split(',') {
        let (k, v) = part.split_once(':').ok_or("a value is malformed")?;
        parts.insert(k, v);
    }
    let b64 = |k: &str| {
        parts
            .get(k)
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .ok_or_else(|| format!("a value's {k} is malformed"))
    };
    let (data, iv, tag) = (b64("data")?, b64("iv")?, b64("tag")?);
    if iv.len() != 32 || tag.len() != 16 {
        return Err("a value's iv or tag has the wrong length".into());
    }
    type Cipher = aes_gcm::AesGcm<aes_gcm::aes::Aes256, aes_gcm::aead::consts::U32>;
    let cipher = Cipher::new_from_slice(key).map_err(|_| "the data key is not 32 bytes")?;
    let mut message = data;
    message.extend_from_slice(&tag);
    let plain = cipher
        .decrypt(
            aes_gcm::aead::generic_array::GenericArray::from_slice(&iv),
            Payload {
                msg: &message,
                aad: additional.as_bytes(),
            },
        )
        .map_err(|_| {
            "a value does not decrypt: the file was changed after it was encrypted".to_string()
        })?;
    let plain = String::from_utf8(plain).map_err(|_| "a value is not UTF-8")?;
    Ok(match parts.get("type").copied().unwrap_or("str") {
        "int" => Node::Int(plain.parse().map_err(|_| "an int value does not parse")?),
        "float" => Node::Float(plain.parse().map_err(|_| "a float value does not parse")?),
        "bool" => Node::Bool(plain.eq_ignore_ascii_case("true") || plain == "1"),
        "str" | "bytes" => Node::Str(plain),
        other => return Err(format!("values of type {other} are not supported")),
    })
}

/// The bytes sops hashes for a value (`sops.ToBytes`).
fn mac_bytes(value: &Node) -> Vec<u8> {
    match value {
        Node::Str(s) => s.as_bytes().to_vec(),
        Node::Int(i) => i.to_string().into_bytes(),
        Node::Float(f) => go_float(*f).into_bytes(),
        Node::Bool(true) => b"True".to_vec(),
        Node::Bool(false) => b"False".to_vec(),
        Node::Null | Node::Map(_) | Node::Seq(_) => Vec::new(),
    }
}

/// Go's `strconv.FormatFloat(f, 'f', -1, 64)`: the shortest decimal that reads back as
/// `f`, never an exponent (Rust's `Display` for `f64` is the same).
fn go_float(f: f64) -> String {
    format!("{f}")
}

/// What [`walk`] does with each leaf: the leaf and the map keys leading to it.
type Leaf<'a> = dyn FnMut(&mut Node, &[String]) -> Result<(), String> + 'a;

/// Visits every leaf in document order with the map keys leading to it (items of a list
/// share their list's path, as in sops).
fn walk(node: &mut Node, path: &mut Vec<String>, leaf: &mut Leaf<'_>) -> Result<(), String> {
    match node {
        Node::Map(entries) => {
            for (k, v) in entries {
                path.push(k.clone());
                walk(v, path, leaf)?;
                path.pop();
            }
            Ok(())
        }
        Node::Seq(items) => items.iter_mut().try_for_each(|i| walk(i, path, leaf)),
        Node::Null => Ok(()),
        _ => leaf(node, path),
    }
}

/// A YAML document with its map keys in order (sops hashes values in document order).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Map(Vec<(String, Node)>),
    Seq(Vec<Node>),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

impl Node {
    fn into_json(self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            // Once decrypted, the order of keys no longer matters.
            Node::Map(entries) => Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, v.into_json()))
                    .collect(),
            ),
            Node::Seq(items) => Value::Array(items.into_iter().map(Node::into_json).collect()),
            Node::Str(s) => Value::String(s),
            Node::Int(i) => Value::from(i),
            Node::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
            Node::Bool(b) => Value::Bool(b),
            Node::Null => Value::Null,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a YAML value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Node, E> {
                Ok(Node::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Node, E> {
                Ok(Node::Int(i))
            }
            fn visit_u64<E: de::Error>(self, u: u64) -> Result<Node, E> {
                i64::try_from(u)
                    .map(Node::Int)
                    .map_err(|_| E::custom("integer out of range"))
            }
            fn visit_f64<E>(self, f: f64) -> Result<Node, E> {
                Ok(Node::Float(f))
            }
            fn visit_str<E>(self, s: &str) -> Result<Node, E> {
                Ok(Node::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Node, E> {
                Ok(Node::Str(s))
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Node>()? {
                    entries.push((k, v));
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_hash_as_sops_hashes_them() {
        assert_eq!(mac_bytes(&Node::Bool(true)), b"True");
        assert_eq!(mac_bytes(&Node::Int(-3)), b"-3");
        assert_eq!(mac_bytes(&Node::Float(1.5)), b"1.5");
        assert_eq!(mac_bytes(&Node::Float(1e21)), b"1000000000000000000000");
        assert_eq!(mac_bytes(&Node::Str("x".into())), b"x");
    }

    #[test]
    fn documents_keep_their_order_and_only_sops_files_are_taken() {
        let doc: Node = serde_saphyr::from_str("b: 1\na: [x, {c: true}]\n").expect("yaml");
        let mut seen = Vec::new();
        let mut tree = doc;
        walk(&mut tree, &mut Vec::new(), &mut |v, p| {
            seen.push((p.join(":"), mac_bytes(v)));
            Ok(())
        })
        .expect("walk");
        assert_eq!(
            seen,
            [
                ("b".to_string(), b"1".to_vec()),
                ("a".to_string(), b"x".to_vec()),
                ("a:c".to_string(), b"True".to_vec())
            ]
        );
        assert!(is_encrypted(
            b"data:\n  a: ENC[AES256_GCM,data:x]\nsops:\n  mac: y\n"
        ));
        assert!(!is_encrypted(b"data:\n  a: plain\n"));
    }

    #[test]
    fn a_file_without_keys_or_age_recipients_is_refused_without_its_values() {
        let file = b"data:\n  a: ENC[AES256_GCM,data:AAAA,iv:AAAA,tag:AAAA,type:str]\nsops:\n  lastmodified: \"2024-01-01T00:00:00Z\"\n  mac: ENC[AES256_GCM,data:AAAA,iv:AAAA,tag:AAAA,type:str]\n";
        let e = decrypt("s.yaml", file, &Keys::default()).expect_err("no age");
        assert!(e.to_string().contains("age keys only"), "{e}");
        assert!(Keys::parse([("k.agekey", &b"# created\nnot-a-key\n"[..])]).is_err());
    }
}
