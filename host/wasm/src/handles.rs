//! The objects of one `sluice:plugin@0.2.0` call, held by the host: the `object`
//! resource's handles index [`Objects`], and its methods read and write single fields
//! by JSON Pointer with the SDK's [`pointer`] semantics (the same functions a plugin's
//! native build runs on).
//!
//! Bounds: what a transformer writes into the host (`set`, `set-string`, `parse`) counts
//! against its output limit, so a plugin cannot grow the host's memory past it; reads are
//! bounded by the guest's own memory cap, as their results land there. A validator's
//! objects are read-only, and dropping their handles keeps them.

use serde_json::Value;
use sluice_plugin_sdk::pointer;
use wasmtime::component::Resource;

use super::Tree;
use super::bindings::v2::Origin as WitOrigin;
use super::bindings::v2::transformer::sluice::plugin::{host, types};
use super::sandbox::State;
use sluice_model::object::{Name, Origin};

/// The `object` resource's host type. A handle's rep is the index of its [`Slot`].
pub struct Handle;

/// One object of a call, whether the guest still holds it, and whether a write may have
/// changed its identity (apiVersion, kind, metadata.name): the host checks only those
/// objects when the plugin returns them. Inputs come checked, `parse` checks what it makes.
#[derive(Debug)]
struct Slot {
    object: Tree,
    live: bool,
    identity_written: bool,
}

/// Whether a write at `pointer` can change an object's identity fields: it is one of them
/// or holds one. (A write below `/metadata/name` or `/kind` fails on the string there.)
fn touches_identity(pointer: &str) -> bool {
    matches!(
        pointer,
        "" | "/apiVersion" | "/kind" | "/metadata" | "/metadata/name"
    )
}

/// The objects of one call.
#[derive(Debug, Default)]
pub struct Objects {
    slots: Vec<Slot>,
    /// How many slots are the call's input, in order (the rest are `parse`d).
    inputs: usize,
    read_only: bool,
    /// Bytes written into the host this call, and the most allowed.
    written: usize,
    limit: usize,
    /// Project and commit, for the origins of objects a plugin makes.
    project: Name,
    commit: Name,
}

/// Why a validator's `set` fails.
const READ_ONLY: &str = "a validator's objects are read-only";

impl Objects {
    /// Holds `objects` for a call; the handles to pass, in order.
    pub fn hold(
        objects: Vec<Tree>,
        read_only: bool,
        limit: usize,
        project: &str,
        commit: &str,
    ) -> (Objects, Vec<Resource<Handle>>) {
        let handles = (0..objects.len())
            .map(|i| Resource::new_own(i as u32))
            .collect();
        let objects = Objects {
            inputs: objects.len(),
            slots: objects
                .into_iter()
                .map(|object| Slot {
                    object,
                    live: true,
                    identity_written: false,
                })
                .collect(),
            read_only,
            written: 0,
            limit,
            project: project.into(),
            commit: commit.into(),
        };
        (objects, handles)
    }

    /// The object a handle names. The component model only lets a guest pass handles the
    /// host gave it, so a rep is always a slot; a released one reads as null.
    fn value(&self, handle: &Resource<Handle>) -> &Value {
        static NULL: Value = Value::Null;
        self.slots
            .get(handle.rep() as usize)
            .filter(|s| s.live)
            .map_or(&NULL, |s| s.object.value())
    }

    /// Counts `bytes` written into the host against the output limit.
    fn write(&mut self, bytes: usize) -> Result<(), String> {
        if self.read_only {
            return Err(READ_ONLY.into());
        }
        let after = self.written.saturating_add(bytes);
        if after > self.limit {
            return Err(format!(
                "the plugin wrote {after} bytes into its objects, more than its output limit of {} bytes",
                self.limit
            ));
        }
        self.written = after;
        Ok(())
    }

    /// The object a handle names, to write at `pointer`.
    fn value_mut(&mut self, handle: &Resource<Handle>, pointer: &str) -> Option<&mut Value> {
        let slot = self
            .slots
            .get_mut(handle.rep() as usize)
            .filter(|s| s.live)?;
        slot.identity_written |= touches_identity(pointer);
        Some(slot.object.value_mut())
    }

    /// Takes the object a returned handle names (once; a second take is none), and whether
    /// a write may have changed its identity.
    pub fn take(&mut self, handle: &Resource<Handle>) -> Option<(Tree, bool)> {
        let slot = self.slots.get_mut(handle.rep() as usize)?;
        if !slot.live {
            return None;
        }
        slot.live = false;
        let object = std::mem::replace(&mut slot.object, Tree::new(Value::Null, Origin::default()));
        Some((object, slot.identity_written))
    }

    /// The origin of input `index`, for findings (kept after its handle is dropped).
    pub fn origin(&self, index: usize) -> Option<Origin> {
        (index < self.inputs).then(|| self.slots[index].object.origin.clone())
    }

    /// The input objects, in order: what a validator's call leaves (read-only, so
    /// unchanged whatever the call did).
    pub fn into_inputs(mut self) -> Vec<Tree> {
        self.slots.truncate(self.inputs);
        self.slots.into_iter().map(|s| s.object).collect()
    }
}

fn wit_origin(o: &Origin) -> WitOrigin {
    WitOrigin {
        path: o.path.to_string(),
        index: o.doc_index as u32,
        line: o.line as u32,
    }
}

impl types::Host for State {}

impl types::HostObject for State {
    fn parse(&mut self, json: String, origin: WitOrigin) -> Result<Resource<Handle>, String> {
        let objects = &mut self.objects;
        objects.write(json.len() + std::mem::size_of::<Slot>())?;
        let value: Value = serde_json::from_str(&json).map_err(|e| format!("not JSON: {e}"))?;
        if let Some(problem) = super::identity_problem(&value) {
            return Err(problem);
        }
        let rep = u32::try_from(objects.slots.len()).map_err(|_| "too many objects")?;
        objects.slots.push(Slot {
            object: Tree::new(
                value,
                Origin {
                    project: objects.project.clone(),
                    commit: objects.commit.clone(),
                    path: origin.path.into(),
                    doc_index: origin.index as usize,
                    line: u64::from(origin.line),
                    renderer: None,
                },
            ),
            live: true,
            identity_written: false,
        });
        Ok(Resource::new_own(rep))
    }

    fn origin(&mut self, handle: Resource<Handle>) -> WitOrigin {
        self.objects
            .slots
            .get(handle.rep() as usize)
            .map(|s| wit_origin(&s.object.origin))
            .unwrap_or(WitOrigin {
                path: String::new(),
                index: 0,
                line: 0,
            })
    }

    fn get(&mut self, handle: Resource<Handle>, at: String) -> Option<String> {
        pointer::get(self.objects.value(&handle), &at).map(Value::to_string)
    }

    fn get_string(&mut self, handle: Resource<Handle>, at: String) -> Option<String> {
        pointer::get(self.objects.value(&handle), &at)?
            .as_str()
            .map(String::from)
    }

    fn find_strings(&mut self, handle: Resource<Handle>, patterns: Vec<String>) -> types::Found {
        let found = pointer::find_strings(self.objects.value(&handle), &patterns);
        let (text, bounds) = pointer::pack(&found);
        types::Found { text, bounds }
    }

    fn len(&mut self, handle: Resource<Handle>, at: String) -> Option<u32> {
        pointer::len(self.objects.value(&handle), &at).map(|n| n as u32)
    }

    fn keys(&mut self, handle: Resource<Handle>, at: String) -> Option<Vec<String>> {
        pointer::keys(self.objects.value(&handle), &at)
    }

    fn set(&mut self, handle: Resource<Handle>, at: String, json: String) -> Result<(), String> {
        self.objects.write(json.len())?;
        let value: Value = serde_json::from_str(&json)
            .map_err(|e| format!("cannot set {at}: the value is not JSON: {e}"))?;
        set(&mut self.objects, &handle, &at, value)
    }

    fn set_string(
        &mut self,
        handle: Resource<Handle>,
        at: String,
        value: String,
    ) -> Result<(), String> {
        self.objects.write(value.len())?;
        set(&mut self.objects, &handle, &at, Value::String(value))
    }

    fn remove(&mut self, handle: Resource<Handle>, at: String) -> Result<bool, String> {
        if self.objects.read_only {
            return Err(READ_ONLY.into());
        }
        match self.objects.value_mut(&handle, &at) {
            Some(v) => pointer::remove(v, &at),
            None => Ok(false),
        }
    }

    fn to_json(&mut self, handle: Resource<Handle>) -> String {
        self.objects.value(&handle).to_string()
    }

    fn drop(&mut self, handle: Resource<Handle>) -> wasmtime::Result<()> {
        // A validator's objects stay: they go on to the next stage.
        if !self.objects.read_only
            && let Some(slot) = self.objects.slots.get_mut(handle.rep() as usize)
        {
            slot.live = false;
            // (Its origin stays, for findings.)
            let origin = std::mem::take(&mut slot.object.origin);
            slot.object = Tree::new(Value::Null, origin);
        }
        Ok(())
    }
}

fn set(
    objects: &mut Objects,
    handle: &Resource<Handle>,
    at: &str,
    value: Value,
) -> Result<(), String> {
    match objects.value_mut(handle, at) {
        Some(v) => pointer::set(v, at, value),
        None => Err("the object was dropped".into()),
    }
}

impl host::Host for State {
    fn log(&mut self, level: host::Level, message: String) {
        use super::bindings::Level;
        let level = match level {
            host::Level::Debug => Level::Debug,
            host::Level::Info => Level::Info,
            host::Level::Warn => Level::Warn,
            host::Level::Error => Level::Error,
        };
        super::bindings::transformer::sluice::plugin::host::Host::log(self, level, message);
    }
}

#[cfg(test)]
mod tests {
    use super::touches_identity;

    #[test]
    fn only_writes_at_or_above_an_identity_field_can_change_it() {
        for p in ["", "/apiVersion", "/kind", "/metadata", "/metadata/name"] {
            assert!(touches_identity(p), "{p}");
        }
        for p in [
            "/metadata/namespace",
            "/metadata/labels/name",
            "/metadata/annotations",
            "/spec",
            "/kinds",
            "/metadata/names",
            "/data/kind",
        ] {
            assert!(!touches_identity(p), "{p}");
        }
    }
}
