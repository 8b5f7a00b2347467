//! Plugins for `sluice:plugin@0.2.0` (`wit/v0.2/plugin.wit`): the objects stay in the
//! host, and a plugin reads and writes single fields through [`Fields`].
//!
//! Write the plugin's logic once, generic over [`Fields`] (or [`Object`] to add objects):
//! natively it runs on `serde_json::Value`s, in tests and benchmarks, and in the component
//! on the host's object handles, exported with [`crate::export_transformer_v2!`] or
//! [`crate::export_validator_v2!`]. Both implementations share the write semantics of
//! [`crate::pointer`].
//!
//! ```ignore
//! use sluice_plugin_sdk::v2::{Object, Transformer, object_ref};
//! use sluice_plugin_sdk::{Context, Finding, FindingBuilder};
//!
//! struct AddTeamLabel;
//!
//! impl Transformer for AddTeamLabel {
//!     type Config = ();
//!     fn transform<O: Object>(_: &(), _: &Context, objects: &mut Vec<O>) -> Result<(), Vec<Finding>> {
//!         for (i, o) in objects.iter_mut().enumerate() {
//!             if let Err(e) = o.set_str("/metadata/labels/team", "platform") {
//!                 return Err(vec![FindingBuilder::error(e).object_ref(object_ref(i, o)).build()]);
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! sluice_plugin_sdk::export_transformer_v2!(AddTeamLabel, "../../wit/v0.2");
//! ```

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{CONTAINER_LISTS, Context, Finding, ObjectRef, Origin, pod_spec_pointer, pointer};

/// Reading and writing an object's fields by JSON Pointer (RFC 6901).
pub trait Fields {
    /// The value at `pointer`.
    fn get(&self, pointer: &str) -> Option<Value>;
    /// The string at `pointer`; none when absent or not a string.
    fn get_str(&self, pointer: &str) -> Option<Cow<'_, str>>;
    /// Every string `patterns` find, with its pointer ([`pointer::find_strings`]): one
    /// crossing into the host for many reads.
    fn find_strings(&self, patterns: &[&str]) -> Vec<(String, Cow<'_, str>)>;
    /// Items of the list, or keys of the map, at `pointer`.
    fn len(&self, pointer: &str) -> Option<usize>;
    /// Keys of the map at `pointer`, in order.
    fn keys(&self, pointer: &str) -> Option<Vec<String>>;
    /// Sets the value at `pointer` ([`pointer::set`]'s semantics).
    ///
    /// # Errors
    /// What is in the way; for a validator's objects, that they are read-only.
    fn set(&mut self, pointer: &str, value: Value) -> Result<(), String>;
    /// Sets a string at `pointer`.
    ///
    /// # Errors
    /// As [`Fields::set`].
    fn set_str(&mut self, pointer: &str, value: &str) -> Result<(), String>;
    /// Removes the value at `pointer`; false when nothing was there.
    ///
    /// # Errors
    /// A malformed or empty pointer; for a validator's objects, that they are read-only.
    fn remove(&mut self, pointer: &str) -> Result<bool, String>;
    /// The whole object.
    fn to_value(&self) -> Value;
}

/// An object a transformer can also make: [`Fields`] plus a constructor and an origin.
pub trait Object: Fields + Sized {
    /// A new object (a JSON object with apiVersion, kind and metadata.name).
    ///
    /// # Errors
    /// Why the host refused it.
    fn parse(value: &Value, origin: &Origin) -> Result<Self, String>;
    /// Where it came from (natively, on a `Value`, always the default).
    fn origin(&self) -> Origin;
}

impl Fields for Value {
    fn get(&self, pointer: &str) -> Option<Value> {
        pointer::get(self, pointer).cloned()
    }
    fn get_str(&self, pointer: &str) -> Option<Cow<'_, str>> {
        pointer::get(self, pointer)?.as_str().map(Cow::Borrowed)
    }
    fn find_strings(&self, patterns: &[&str]) -> Vec<(String, Cow<'_, str>)> {
        pointer::find_strings(self, patterns)
            .into_iter()
            .map(|(at, s)| (at, Cow::Borrowed(s)))
            .collect()
    }
    fn len(&self, pointer: &str) -> Option<usize> {
        pointer::len(self, pointer)
    }
    fn keys(&self, pointer: &str) -> Option<Vec<String>> {
        pointer::keys(self, pointer)
    }
    fn set(&mut self, pointer: &str, value: Value) -> Result<(), String> {
        pointer::set(self, pointer, value)
    }
    fn set_str(&mut self, pointer: &str, value: &str) -> Result<(), String> {
        pointer::set(self, pointer, Value::String(value.to_string()))
    }
    fn remove(&mut self, pointer: &str) -> Result<bool, String> {
        pointer::remove(self, pointer)
    }
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl Object for Value {
    fn parse(value: &Value, _: &Origin) -> Result<Self, String> {
        Ok(value.clone())
    }
    fn origin(&self) -> Origin {
        Origin::default()
    }
}

/// A finding's reference to the object at `index`, read in one [`Fields::find_strings`].
pub fn object_ref(index: usize, o: &impl Fields) -> ObjectRef {
    const IDENTITY: [&str; 4] = [
        "/apiVersion",
        "/kind",
        "/metadata/namespace",
        "/metadata/name",
    ];
    let mut r = ObjectRef {
        index: index as u32,
        ..ObjectRef::default()
    };
    for (at, s) in o.find_strings(&IDENTITY) {
        let field = match at.as_str() {
            "/apiVersion" => &mut r.api_version,
            "/kind" => &mut r.kind,
            "/metadata/namespace" => &mut r.namespace,
            "/metadata/name" => &mut r.name,
            _ => continue,
        };
        *field = s.into_owned();
    }
    r
}

/// The pointer of every container (init, regular, ephemeral) of a workload, e.g.
/// `/spec/template/spec/containers/0`; empty for anything else.
pub fn containers(o: &impl Fields) -> Vec<String> {
    let Some(base) = o.get_str("/kind").and_then(|k| pod_spec_pointer(&k)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for list in CONTAINER_LISTS {
        let at = format!("{base}/{list}");
        for i in 0..o.len(&at).unwrap_or(0) {
            out.push(format!("{at}/{i}"));
        }
    }
    out
}

/// Where an image is in a workload: every shape's pod spec (see [`crate::pod_spec_path`]),
/// any list in it, any item.
const IMAGE_PATTERNS: [&str; 5] = [
    "/kind",
    "/spec/*/*/image",
    "/spec/template/spec/*/*/image",
    "/spec/jobTemplate/spec/template/spec/*/*/image",
    "/template/spec/*/*/image",
];

/// Every container image of a workload (init, regular, ephemeral), with the pointer of
/// its `image` field (e.g. `/spec/template/spec/containers/0/image`); empty for anything
/// else. One [`Fields::find_strings`], so one crossing into the host per object.
pub fn images<O: Fields>(o: &O) -> Vec<(String, Cow<'_, str>)> {
    let mut found = o.find_strings(&IMAGE_PATTERNS).into_iter();
    let Some(base) = found
        .next()
        .filter(|(at, _)| at == "/kind")
        .and_then(|(_, kind)| pod_spec_pointer(&kind))
    else {
        return Vec::new();
    };
    found
        .filter(|(at, _)| {
            // `<base>/<list>/<index>/image`, and only the container lists.
            at.strip_prefix(base)
                .and_then(|rest| rest.strip_prefix('/'))
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(list, rest)| {
                    CONTAINER_LISTS.contains(&list)
                        && rest
                            .strip_suffix("/image")
                            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                })
        })
        .collect()
}

/// A transformer for `sluice:plugin@0.2.0`. Export it with
/// [`crate::export_transformer_v2!`].
pub trait Transformer {
    /// The plugin's configuration (`config:` in the agent configuration).
    type Config: DeserializeOwned + Default;

    /// Checks the configuration beyond what deserialization checks. Default: accept.
    fn check(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Changes `objects` in place (fields, and the list itself: add with
    /// [`Object::parse`], remove, reorder), or returns findings explaining why it cannot.
    fn transform<O: Object>(
        config: &Self::Config,
        ctx: &Context,
        objects: &mut Vec<O>,
    ) -> Result<(), Vec<Finding>>;
}

/// A validator for `sluice:plugin@0.2.0`. Export it with [`crate::export_validator_v2!`].
pub trait Validator {
    /// The plugin's configuration.
    type Config: DeserializeOwned + Default;

    /// Checks the configuration beyond what deserialization checks. Default: accept.
    fn check(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Findings about `objects`; empty means everything passed.
    fn validate<O: Fields>(config: &Self::Config, ctx: &Context, objects: &[O]) -> Vec<Finding>;
}

/// Exports a [`Transformer`] as the component's `transformer` world of
/// `sluice:plugin@0.2.0`.
///
/// The second argument is the path of the `wit/v0.2` directory relative to the plugin
/// crate's `Cargo.toml` (`"../../wit/v0.2"` inside the sluice repository).
#[macro_export]
macro_rules! export_transformer_v2 {
    ($plugin:ty, $wit:literal) => {
        #[doc(hidden)]
        #[allow(clippy::all, reason = "wit-bindgen's generated code")]
        mod __sluice_transformer_v2 {
            #[allow(unused_imports)]
            use super::*;
            $crate::wit_bindgen::generate!({
                path: $wit,
                world: "transformer",
                runtime_path: "::sluice_plugin_sdk::wit_bindgen::rt",
                // Imports take borrowed arguments (`&[&str]` for a list of strings):
                // nothing is copied to make a call into the host.
                ownership: Borrowing { duplicate_if_necessary: false },
            });
            use sluice::plugin::types as wit;

            $crate::__fields_of_handle!(wit);

            impl $crate::v2::Object for wit::Object {
                fn parse(value: &$crate::__Value, origin: &$crate::Origin) -> Result<Self, String> {
                    wit::Object::parse(
                        &value.to_string(),
                        &wit::Origin { path: origin.path.clone(), index: origin.index, line: origin.line },
                    )
                }
                fn origin(&self) -> $crate::Origin {
                    let o = wit::Object::origin(self);
                    $crate::Origin { path: o.path, index: o.index, line: o.line }
                }
            }

            struct Export;
            impl Guest for Export {
                fn validate_config(config: String) -> Result<(), String> {
                    let c = $crate::parse_config::<<$plugin as $crate::v2::Transformer>::Config>(&config)?;
                    <$plugin as $crate::v2::Transformer>::check(&c)
                }
                fn transform(ctx: wit::Context, objects: Vec<wit::Object>) -> Result<Vec<wit::Object>, Vec<wit::Finding>> {
                    let config = $crate::parse_config::<<$plugin as $crate::v2::Transformer>::Config>(&ctx.config)
                        .map_err(|e| vec![__finding($crate::FindingBuilder::error(e).build())])?;
                    let c = $crate::Context { agent: ctx.agent, project: ctx.project, commit: ctx.commit };
                    let mut objects = objects;
                    <$plugin as $crate::v2::Transformer>::transform(&config, &c, &mut objects)
                        .map_err(|fs| fs.into_iter().map(__finding).collect::<Vec<_>>())?;
                    Ok(objects)
                }
            }
            $crate::__finding_conversion!(wit);
            export!(Export);
        }
    };
}

/// Exports a [`Validator`] as the component's `validator` world of
/// `sluice:plugin@0.2.0`. See [`crate::export_transformer_v2!`] for the arguments.
#[macro_export]
macro_rules! export_validator_v2 {
    ($plugin:ty, $wit:literal) => {
        #[doc(hidden)]
        #[allow(clippy::all, reason = "wit-bindgen's generated code")]
        mod __sluice_validator_v2 {
            #[allow(unused_imports)]
            use super::*;
            $crate::wit_bindgen::generate!({
                path: $wit,
                world: "validator",
                runtime_path: "::sluice_plugin_sdk::wit_bindgen::rt",
                ownership: Borrowing { duplicate_if_necessary: false },
            });
            use sluice::plugin::types as wit;

            $crate::__fields_of_handle!(wit);

            struct Export;
            impl Guest for Export {
                fn validate_config(config: String) -> Result<(), String> {
                    let c = $crate::parse_config::<<$plugin as $crate::v2::Validator>::Config>(&config)?;
                    <$plugin as $crate::v2::Validator>::check(&c)
                }
                fn validate(ctx: wit::Context, objects: Vec<wit::Object>) -> Vec<wit::Finding> {
                    let config = match $crate::parse_config::<<$plugin as $crate::v2::Validator>::Config>(&ctx.config) {
                        Ok(c) => c,
                        Err(e) => return vec![__finding($crate::FindingBuilder::error(e).build())],
                    };
                    let c = $crate::Context { agent: ctx.agent, project: ctx.project, commit: ctx.commit };
                    <$plugin as $crate::v2::Validator>::validate(&config, &c, &objects)
                        .into_iter()
                        .map(__finding)
                        .collect()
                }
            }
            $crate::__finding_conversion!(wit);
            export!(Export);
        }
    };
}

/// [`Fields`] for the host's object handle.
#[doc(hidden)]
#[macro_export]
macro_rules! __fields_of_handle {
    ($wit:ident) => {
        impl $crate::v2::Fields for $wit::Object {
            fn get(&self, pointer: &str) -> Option<$crate::__Value> {
                $wit::Object::get(self, pointer).and_then(|t| $crate::__decode(&t).ok())
            }
            fn get_str(&self, pointer: &str) -> Option<::std::borrow::Cow<'_, str>> {
                $wit::Object::get_string(self, pointer).map(::std::borrow::Cow::Owned)
            }
            fn find_strings(
                &self,
                patterns: &[&str],
            ) -> Vec<(String, ::std::borrow::Cow<'_, str>)> {
                let found = $wit::Object::find_strings(self, patterns);
                $crate::pointer::unpack(&found.text, &found.bounds)
                    .into_iter()
                    .map(|(at, s)| (at, ::std::borrow::Cow::Owned(s)))
                    .collect()
            }
            fn len(&self, pointer: &str) -> Option<usize> {
                $wit::Object::len(self, pointer).map(|n| n as usize)
            }
            fn keys(&self, pointer: &str) -> Option<Vec<String>> {
                $wit::Object::keys(self, pointer)
            }
            fn set(&mut self, pointer: &str, value: $crate::__Value) -> Result<(), String> {
                $wit::Object::set(self, pointer, &value.to_string())
            }
            fn set_str(&mut self, pointer: &str, value: &str) -> Result<(), String> {
                $wit::Object::set_string(self, pointer, value)
            }
            fn remove(&mut self, pointer: &str) -> Result<bool, String> {
                $wit::Object::remove(self, pointer)
            }
            fn to_value(&self) -> $crate::__Value {
                $crate::__decode(&$wit::Object::to_json(self)).unwrap_or_default()
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_image_patterns_cover_every_workload_shape() {
        for (kinds, _, base) in crate::POD_SPECS {
            let pattern = format!("{base}/*/*/image");
            assert!(
                IMAGE_PATTERNS.contains(&pattern.as_str()),
                "{kinds:?}: {pattern}"
            );
        }
        assert_eq!(IMAGE_PATTERNS.len(), crate::POD_SPECS.len() + 1);
    }

    #[test]
    fn containers_and_references_read_field_by_field() {
        let cron = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c", "namespace": "n"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {
                "containers": [{"image": "a"}, {"image": "b"}], "initContainers": [{"image": "i"}]}}}}}});
        assert_eq!(
            containers(&cron),
            [
                "/spec/jobTemplate/spec/template/spec/initContainers/0",
                "/spec/jobTemplate/spec/template/spec/containers/0",
                "/spec/jobTemplate/spec/template/spec/containers/1",
            ]
        );
        assert!(containers(&json!({"kind": "ConfigMap"})).is_empty());
        let found: Vec<(String, String)> = images(&cron)
            .into_iter()
            .map(|(at, s)| (at, s.into_owned()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "/spec/jobTemplate/spec/template/spec/containers/0/image".to_string(),
                    "a".to_string()
                ),
                (
                    "/spec/jobTemplate/spec/template/spec/containers/1/image".to_string(),
                    "b".to_string()
                ),
                (
                    "/spec/jobTemplate/spec/template/spec/initContainers/0/image".to_string(),
                    "i".to_string()
                ),
            ],
            "in document order"
        );
        let odd = json!({"kind": "Pod", "spec": {"volumes": [{"image": "not a container"}], "containers": [{"image": "c"}]},
                         "template": {"spec": {"containers": [{"image": "not this shape"}]}}});
        assert_eq!(
            images(&odd)
                .into_iter()
                .map(|(at, _)| at)
                .collect::<Vec<_>>(),
            ["/spec/containers/0/image"]
        );
        assert_eq!(
            object_ref(3, &cron),
            ObjectRef {
                index: 3,
                api_version: "batch/v1".into(),
                kind: "CronJob".into(),
                namespace: "n".into(),
                name: "c".into()
            }
        );
    }
}
