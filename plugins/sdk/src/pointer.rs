//! Field access by JSON Pointer (RFC 6901) on `serde_json::Value`, with the write
//! semantics of `sluice:plugin@0.2.0`'s `object.set` and `object.remove`.
//!
//! The host implements the contract's object handles with these functions, and
//! [`crate::Fields`] for `Value` uses them too, so a plugin tested natively on values
//! behaves as it does in the host. Reads follow [`Value::pointer`] exactly, without its
//! two allocations per token: a plugin's reads are most of what it does.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// One token, unescaped (`~1` is `/`, `~0` is `~`); borrowed when there is nothing to
/// unescape.
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

/// The escaped tokens of `pointer`, as written.
fn raw_tokens(pointer: &str) -> Result<std::str::Split<'_, char>, String> {
    match pointer.strip_prefix('/') {
        Some(rest) => Ok(rest.split('/')),
        None => Err(format!(
            "{pointer:?} is not a JSON Pointer: it must be empty or start with /"
        )),
    }
}

/// The unescaped tokens of `pointer`.
///
/// # Errors
/// When `pointer` is neither empty nor starts with `/`.
pub fn tokens(pointer: &str) -> Result<Vec<Cow<'_, str>>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    Ok(raw_tokens(pointer)?.map(unescape).collect())
}

/// The value at `pointer`, as [`Value::pointer`] finds it.
pub fn get<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        return Some(doc);
    }
    raw_tokens(pointer)
        .ok()?
        .try_fold(doc, |at, token| match at {
            Value::Object(map) => map.get(unescape(token).as_ref()),
            Value::Array(items) => index(token).and_then(|i| items.get(i)),
            _ => None,
        })
}

/// The value at `pointer`, mutable, as [`Value::pointer_mut`] finds it.
pub fn get_mut<'a>(doc: &'a mut Value, pointer: &str) -> Option<&'a mut Value> {
    if pointer.is_empty() {
        return Some(doc);
    }
    raw_tokens(pointer)
        .ok()?
        .try_fold(doc, |at, token| match at {
            Value::Object(map) => map.get_mut(unescape(token).as_ref()),
            Value::Array(items) => index(token).and_then(|i| items.get_mut(i)),
            _ => None,
        })
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
    if pointer.is_empty() {
        *doc = value;
        return Ok(());
    }
    raw_tokens(pointer)?;
    let (parent, last) = pointer.rsplit_once('/').unwrap_or_default();
    let last = unescape(last);
    let mut at = doc;
    let mut depth = 0;
    for token in parent.split('/').skip(1) {
        if at.is_null() {
            *at = Value::Object(Map::new());
        }
        at = match at {
            Value::Object(map) => {
                let key = unescape(token);
                // Looked up twice only when missing: `entry` would allocate the key on
                // every step.
                if !map.contains_key(key.as_ref()) {
                    map.insert(key.clone().into_owned(), Value::Object(Map::new()));
                }
                map.get_mut(key.as_ref()).expect("present: inserted above")
            }
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
        depth += 1;
    }
    if at.is_null() {
        *at = Value::Object(Map::new());
    }
    match at {
        Value::Object(map) => {
            match map.get_mut(last.as_ref()) {
                Some(slot) => *slot = value,
                None => {
                    map.insert(last.into_owned(), value);
                }
            }
            Ok(())
        }
        Value::Array(items) => {
            let len = items.len();
            match (last.as_ref() == "-")
                .then_some(len)
                .or_else(|| index(&last))
            {
                Some(i) if i == len => items.push(value),
                Some(i) if i < len => items[i] = value,
                _ => {
                    return Err(format!(
                        "cannot set {pointer}: the list at {} has {len} items",
                        prefix(pointer, depth)
                    ));
                }
            }
            Ok(())
        }
        other => Err(format!(
            "cannot set {pointer}: {} is {}",
            prefix(pointer, depth),
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
    if pointer.is_empty() {
        return Err("cannot remove the whole object; leave it out of the returned list".into());
    }
    raw_tokens(pointer)?;
    let (parent, last) = pointer.rsplit_once('/').unwrap_or_default();
    Ok(match get_mut(doc, parent) {
        Some(Value::Object(map)) => map.shift_remove(unescape(last).as_ref()).is_some(),
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
    match get(doc, pointer)? {
        Value::Array(items) => Some(items.len()),
        Value::Object(map) => Some(map.len()),
        _ => None,
    }
}

/// The keys of the map at `pointer`, in order.
pub fn keys(doc: &Value, pointer: &str) -> Option<Vec<String>> {
    get(doc, pointer)?
        .as_object()
        .map(|m| m.keys().cloned().collect())
}

/// Every string `patterns` find, with its pointer: pattern by pattern, in document order.
/// In a pattern, a `*` token stands for every item of a list and every key of a map (so a
/// key that is `*` itself is only found by another `*`); a malformed pattern finds nothing.
pub fn find_strings<'a, P: AsRef<str>>(doc: &'a Value, patterns: &[P]) -> Vec<(String, &'a str)> {
    let mut found = Vec::new();
    let mut at = String::new();
    for pattern in patterns {
        let pattern = pattern.as_ref();
        if pattern.is_empty() {
            found.extend(doc.as_str().map(|s| (String::new(), s)));
        } else if let Some(rest) = pattern.strip_prefix('/') {
            walk(doc, rest, &mut at, &mut found);
        }
    }
    found
}

/// Packs what [`find_strings`] found as `sluice:plugin@0.2.0`'s `found` record: every
/// pointer and string one after the other in one text, and the byte offsets between them
/// (0 first). Stops before a match that would take the text past 4 GiB (more than any
/// plugin's memory could take).
pub fn pack(found: &[(String, &str)]) -> (String, Vec<u32>) {
    let mut text = String::with_capacity(found.iter().map(|(a, s)| a.len() + s.len()).sum());
    let mut bounds = Vec::with_capacity(2 * found.len() + 1);
    bounds.push(0);
    for (at, s) in found {
        let (Ok(mid), Ok(end)) = (
            u32::try_from(text.len() + at.len()),
            u32::try_from(text.len() + at.len() + s.len()),
        ) else {
            break;
        };
        text.push_str(at);
        text.push_str(s);
        bounds.extend([mid, end]);
    }
    (text, bounds)
}

/// The matches [`pack`] packed; bounds that do not fall on the text's character
/// boundaries end the list.
pub fn unpack(text: &str, bounds: &[u32]) -> Vec<(String, String)> {
    bounds
        .windows(3)
        .step_by(2)
        .map_while(|w| {
            let [start, mid, end] = [w[0], w[1], w[2]].map(|b| b as usize);
            Some((
                text.get(start..mid)?.to_string(),
                text.get(mid..end)?.to_string(),
            ))
        })
        .collect()
}

/// [`find_strings`] below `value`, reached by pointer `at`, for the tokens `rest`.
fn walk<'a>(value: &'a Value, rest: &str, at: &mut String, found: &mut Vec<(String, &'a str)>) {
    let (token, next) = match rest.split_once('/') {
        Some((token, next)) => (token, Some(next)),
        None => (rest, None),
    };
    let len = at.len();
    let visit = |child: &'a Value, at: &mut String, found: &mut Vec<(String, &'a str)>| {
        match next {
            Some(next) => walk(child, next, at, found),
            None => found.extend(child.as_str().map(|s| (at.clone(), s))),
        }
        at.truncate(len);
    };
    match (value, token) {
        (Value::Object(map), "*") => {
            for (key, child) in map {
                at.push('/');
                at.push_str(&escape(key));
                visit(child, at, found);
            }
        }
        (Value::Array(items), "*") => {
            for (i, child) in items.iter().enumerate() {
                at.push('/');
                at.push_str(&i.to_string());
                visit(child, at, found);
            }
        }
        (Value::Object(map), token) => {
            if let Some(child) = map.get(unescape(token).as_ref()) {
                at.push('/');
                at.push_str(token);
                visit(child, at, found);
            }
        }
        (Value::Array(items), token) => {
            if let Some(child) = index(token).and_then(|i| items.get(i)) {
                at.push('/');
                at.push_str(token);
                visit(child, at, found);
            }
        }
        _ => {}
    }
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
    fn get_finds_what_serde_jsons_pointer_finds() {
        let doc = json!({"a": {"b/c": [0, {"d~e": 1}], "": 2}, "f": null});
        for p in [
            "",
            "/a",
            "/a/b~1c",
            "/a/b~1c/1/d~0e",
            "/a/b~1c/01",
            "/a/b~1c/-",
            "/a/",
            "/f",
            "/f/x",
            "a",
            "/missing/x",
            "/a/b~1c/2",
        ] {
            assert_eq!(get(&doc, p), doc.pointer(p), "{p}");
            let mut copy = doc.clone();
            let mut theirs = doc.clone();
            assert_eq!(get_mut(&mut copy, p), theirs.pointer_mut(p), "{p}");
        }
    }

    #[test]
    fn find_strings_walks_every_item_and_key_a_star_stands_for() {
        let doc = json!({"kind": "Pod", "spec": {
            "initContainers": [{"image": "i"}],
            "containers": [{"image": "a"}, {"image": 5}, {"name": "no-image"}, {"image": "b"}],
            "volumes": [{"image": {"reference": "not a string"}}]},
            "metadata": {"annotations": {"a/b": "x", "c": "y"}}});
        let found = find_strings(
            &doc,
            &[
                "/kind",
                "/spec/*/*/image",
                "/metadata/annotations/*",
                "/nothing/*",
                "bad",
            ],
        );
        assert_eq!(
            found,
            [
                ("/kind".to_string(), "Pod"),
                ("/spec/initContainers/0/image".to_string(), "i"),
                ("/spec/containers/0/image".to_string(), "a"),
                ("/spec/containers/3/image".to_string(), "b"),
                ("/metadata/annotations/a~1b".to_string(), "x"),
                ("/metadata/annotations/c".to_string(), "y"),
            ]
        );
        for (at, s) in &found {
            assert_eq!(get(&doc, at).and_then(Value::as_str), Some(*s), "{at}");
        }
    }

    #[test]
    fn packed_matches_unpack_to_what_was_found() {
        let found = vec![
            ("/kind".to_string(), "Pod"),
            ("/metadata/annotations/é~1x".to_string(), ""),
            (String::new(), "ünïcode"),
        ];
        let (text, bounds) = pack(&found);
        assert_eq!(bounds.len(), 7);
        let back: Vec<(String, String)> = unpack(&text, &bounds);
        let want: Vec<(String, String)> = found
            .iter()
            .map(|(a, s)| (a.clone(), s.to_string()))
            .collect();
        assert_eq!(back, want);
        assert_eq!(unpack("", &[0]), []);
        assert_eq!(unpack("ab", &[0, 1, 9]), [], "out of range ends the list");
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
