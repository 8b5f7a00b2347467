//! Field access by JSON Pointer (RFC 6901) on `serde_json::Value`, with the write
//! semantics of `sluice:plugin@0.2.0`'s `object.set` and `object.remove`.
//!
//! The host implements the contract's object handles with these functions, and
//! [`crate::Fields`] for `Value` uses them too, so a plugin tested natively on values
//! behaves as it does in the host. Reads are serde_json's own [`Value::pointer`].

use std::borrow::Cow;

use serde_json::{Map, Value};

/// The unescaped tokens of `pointer` (`~1` is `/`, `~0` is `~`).
///
/// # Errors
/// When `pointer` is neither empty nor starts with `/`.
pub fn tokens(pointer: &str) -> Result<Vec<Cow<'_, str>>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "{pointer:?} is not a JSON Pointer: it must be empty or start with /"
        ));
    };
    Ok(rest
        .split('/')
        .map(|t| {
            if t.contains('~') {
                Cow::Owned(t.replace("~1", "/").replace("~0", "~"))
            } else {
                Cow::Borrowed(t)
            }
        })
        .collect())
}

/// The list index a token names: digits without a leading zero (RFC 6901).
fn index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// What a value is, for errors.
fn what(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// The first `n` tokens of `pointer`, as written.
fn prefix(pointer: &str, n: usize) -> &str {
    let end = pointer
        .match_indices('/')
        .nth(n)
        .map_or(pointer.len(), |(i, _)| i);
    &pointer[..end]
}

/// Sets the value at `pointer` to `value`. Missing maps on the way, and nulls, become
/// maps; in a list, a token on the way must be an existing index, and the last one an
/// existing index, `-` or the list's length (both append). The empty pointer replaces the
/// whole document.
///
/// # Errors
/// When the pointer is malformed, or a scalar or a missing list item is in the way; the
/// message names the pointer and what is there.
pub fn set(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let tokens = tokens(pointer)?;
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    let mut at = doc;
    for (depth, token) in parents.iter().enumerate() {
        if at.is_null() {
            *at = Value::Object(Map::new());
        }
        at = match at {
            Value::Object(map) => map
                .entry(token.as_ref())
                .or_insert_with(|| Value::Object(Map::new())),
            Value::Array(items) => {
                let len = items.len();
                match index(token).and_then(|i| items.get_mut(i)) {
                    Some(item) => item,
                    None => {
                        return Err(format!(
                            "cannot set {pointer}: {} is not an item of the list at {} ({len} items)",
                            prefix(pointer, depth + 1),
                            prefix(pointer, depth)
                        ));
                    }
                }
            }
            other => {
                return Err(format!(
                    "cannot set {pointer}: {} is {}",
                    prefix(pointer, depth),
                    what(other)
                ));
            }
        };
    }
    if at.is_null() {
        *at = Value::Object(Map::new());
    }
    match at {
        Value::Object(map) => {
            map.insert(last.clone().into_owned(), value);
            Ok(())
        }
        Value::Array(items) => {
            let len = items.len();
            match (last.as_ref() == "-")
                .then_some(len)
                .or_else(|| index(last))
            {
                Some(i) if i == len => items.push(value),
                Some(i) if i < len => items[i] = value,
                _ => {
                    return Err(format!(
                        "cannot set {pointer}: the list at {} has {len} items",
                        prefix(pointer, parents.len())
                    ));
                }
            }
            Ok(())
        }
        other => Err(format!(
            "cannot set {pointer}: {} is {}",
            prefix(pointer, parents.len()),
            what(other)
        )),
    }
}

/// Removes the value at `pointer`, keeping the order of what stays; false when nothing was
/// there.
///
/// # Errors
/// When the pointer is malformed or empty (an object cannot remove itself).
pub fn remove(doc: &mut Value, pointer: &str) -> Result<bool, String> {
    let tokens = tokens(pointer)?;
    let Some(last) = tokens.last() else {
        return Err("cannot remove the whole object; leave it out of the returned list".into());
    };
    let parent = prefix(pointer, tokens.len() - 1);
    Ok(match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.shift_remove(last.as_ref()).is_some(),
        Some(Value::Array(items)) => match index(last) {
            Some(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    })
}

/// How many items the list, or keys the map, at `pointer` has; none for a scalar or
/// nothing.
pub fn len(doc: &Value, pointer: &str) -> Option<usize> {
    match doc.pointer(pointer)? {
        Value::Array(items) => Some(items.len()),
        Value::Object(map) => Some(map.len()),
        _ => None,
    }
}

/// The keys of the map at `pointer`, in order.
pub fn keys(doc: &Value, pointer: &str) -> Option<Vec<String>> {
    doc.pointer(pointer)?
        .as_object()
        .map(|m| m.keys().cloned().collect())
}

/// A finding's field path for a pointer: `/spec/containers/0/image` is
/// `spec.containers[0].image` (tokens that are list indexes become `[i]`).
pub fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for token in tokens(pointer).unwrap_or_default() {
        if index(&token).is_some() {
            out.push_str(&format!("[{token}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&token);
        }
    }
    out
}

/// Escapes a map key as one pointer token (`/` is `~1`, `~` is `~0`).
pub fn escape(key: &str) -> Cow<'_, str> {
    if key.contains(['/', '~']) {
        Cow::Owned(key.replace('~', "~0").replace('/', "~1"))
    } else {
        Cow::Borrowed(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_creates_maps_on_the_way_and_appends_to_lists() {
        let mut doc = json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}});
        set(&mut doc, "/metadata/namespace", json!("prod")).expect("a new key");
        set(
            &mut doc,
            "/metadata/annotations/config.kubernetes.io~1depends-on",
            json!("x"),
        )
        .expect("maps made on the way");
        set(&mut doc, "/spec/ports/0/port", json!(8080)).expect("an existing item");
        set(&mut doc, "/spec/ports/-", json!({"port": 9090})).expect("appended");
        set(&mut doc, "/spec/ports/2", json!({"port": 9091})).expect("appended at len");
        assert_eq!(
            doc,
            json!({"metadata": {"name": "a", "namespace": "prod",
                                "annotations": {"config.kubernetes.io/depends-on": "x"}},
                   "spec": {"ports": [{"port": 8080}, {"port": 9090}, {"port": 9091}]}})
        );
        set(&mut doc, "", json!({"kind": "X"})).expect("the whole document");
        assert_eq!(doc, json!({"kind": "X"}));
    }

    #[test]
    fn set_names_what_is_in_the_way() {
        let mut doc = json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}});
        let before = doc.clone();
        assert_eq!(
            set(&mut doc, "/metadata/name/x", json!(1)),
            Err("cannot set /metadata/name/x: /metadata/name is a string".into())
        );
        assert_eq!(
            set(&mut doc, "/spec/ports/3/port", json!(1)),
            Err("cannot set /spec/ports/3/port: /spec/ports/3 is not an item of the list at /spec/ports (1 items)".into())
        );
        assert_eq!(
            set(&mut doc, "/spec/ports/01", json!(1)),
            Err("cannot set /spec/ports/01: the list at /spec/ports has 1 items".into())
        );
        assert_eq!(
            set(&mut doc, "metadata", json!(1)),
            Err("\"metadata\" is not a JSON Pointer: it must be empty or start with /".into())
        );
        assert_eq!(doc, before, "a refused set changes nothing");
    }

    #[test]
    fn remove_keeps_the_order_of_what_stays() {
        let mut doc = json!({"a": 1, "b": 2, "c": {"x~y": [1, 2, 3]}});
        assert_eq!(remove(&mut doc, "/a"), Ok(true));
        assert_eq!(remove(&mut doc, "/c/x~0y/1"), Ok(true));
        assert_eq!(remove(&mut doc, "/c/x~0y/7"), Ok(false));
        assert_eq!(remove(&mut doc, "/nothing/here"), Ok(false));
        assert!(remove(&mut doc, "").is_err());
        assert_eq!(doc, json!({"b": 2, "c": {"x~y": [1, 3]}}));
        assert_eq!(
            doc.as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["b".to_string(), "c".to_string()])
        );
    }

    #[test]
    fn reads_and_field_paths() {
        let doc = json!({"spec": {"containers": [{"image": "a"}, {"image": "b"}]}, "k": 1});
        assert_eq!(len(&doc, "/spec/containers"), Some(2));
        assert_eq!(len(&doc, "/spec"), Some(1));
        assert_eq!(len(&doc, "/k"), None);
        assert_eq!(keys(&doc, ""), Some(vec!["spec".into(), "k".into()]));
        assert_eq!(
            field_path("/spec/containers/1/image"),
            "spec.containers[1].image"
        );
        assert_eq!(
            field_path("/metadata/annotations/a~1b"),
            "metadata.annotations.a/b"
        );
        assert_eq!(
            escape("config.kubernetes.io/depends-on"),
            "config.kubernetes.io~1depends-on"
        );
        assert_eq!(escape("a~b"), "a~0b");
    }
}
