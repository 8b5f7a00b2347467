//! Write sluice plugins in Rust.
//!
//! Two contracts: `sluice:plugin@0.1.0` (`wit/plugin.wit` in the sluice repository), where
//! objects cross into the plugin as JSON text, and `sluice:plugin@0.2.0` (`wit/v0.2`),
//! where they stay in the host and the plugin reads and writes fields through handles:
//! see [`v2`], the faster one. This crate generates the bindings and adds what every
//! plugin needs:
//! typed configuration ([`parse_config`]), the pod specs inside workloads ([`pod_specs_mut`], [`containers`]) and
//! findings ([`FindingBuilder`]).
//!
//! A transformer is a type implementing [`Transformer`], exported with
//! [`export_transformer!`]; a validator implements [`Validator`] and uses
//! [`export_validator!`]. Build with `cargo build --release --target wasm32-wasip2`: the
//! result is a component sluice loads directly.
//!
//! ```ignore
//! use sluice_plugin_sdk::{Context, Finding, Origin, Transformer};
//!
//! struct AddTeamLabel;
//!
//! impl Transformer for AddTeamLabel {
//!     type Config = ();
//!     fn transform(_: &(), _: &Context, objects: &mut Vec<(serde_json::Value, Origin)>) -> Result<(), Vec<Finding>> {
//!         for (o, _) in objects.iter_mut() {
//!             o["metadata"]["labels"]["team"] = "platform".into();
//!         }
//!         Ok(())
//!     }
//! }
//!
//! sluice_plugin_sdk::export_transformer!(AddTeamLabel, "../../wit");
//! ```
#![deny(missing_docs)]

pub mod pointer;
pub mod v2;

#[cfg(feature = "bindings")]
#[doc(hidden)]
pub use wit_bindgen;

#[doc(hidden)]
pub use serde_json::Value as __Value;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Blocks the commit (validators in `enforce` mode; transformers always).
    Error,
    /// Reported only.
    Warning,
    /// Reported only.
    Info,
}

/// The object a finding concerns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectRef {
    /// Index in the list the plugin received.
    pub index: u32,
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` (empty when cluster-scoped).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

/// One observation, in the KRM functions `results` shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// One sentence.
    pub message: String,
    /// The object concerned.
    pub object: Option<ObjectRef>,
    /// Field path, e.g. `spec.template.spec.containers[0].image`.
    pub field: Option<String>,
    /// Proposed value for the field (JSON text).
    pub proposed_value: Option<String>,
    /// Rule id.
    pub rule: Option<String>,
}

/// Where an object was written in git.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// File path.
    pub path: String,
    /// Document index.
    pub index: u32,
    /// Line (0 when unknown).
    pub line: u32,
}

/// What a sync is about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    /// Agent name.
    pub agent: String,
    /// Manifest project.
    pub project: String,
    /// Commit id.
    pub commit: String,
}

/// A plugin that may change the object list. Export it with [`export_transformer!`].
pub trait Transformer {
    /// The plugin's configuration (`config:` in the agent configuration).
    type Config: DeserializeOwned + Default;

    /// Checks the configuration beyond what deserialization checks. Default: accept.
    fn check(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Changes `objects` in place (values and origins; add or remove entries freely), or
    /// returns findings explaining why it cannot.
    fn transform(
        config: &Self::Config,
        ctx: &Context,
        objects: &mut Vec<(Value, Origin)>,
    ) -> Result<(), Vec<Finding>>;
}

/// A plugin that only reports. Export it with [`export_validator!`].
pub trait Validator {
    /// The plugin's configuration.
    type Config: DeserializeOwned + Default;

    /// Checks the configuration beyond what deserialization checks. Default: accept.
    fn check(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Findings about `objects`; empty means everything passed.
    fn validate(config: &Self::Config, ctx: &Context, objects: &[Value]) -> Vec<Finding>;
}

/// Parses a plugin's configuration; `null` (no `config:` given) becomes `T::default()`.
///
/// # Errors
/// The serde message, meant for `validate-config`'s error string.
pub fn parse_config<T: DeserializeOwned + Default>(json: &str) -> Result<T, String> {
    let value: Value =
        serde_json::from_str(json).map_err(|e| format!("config is not JSON: {e}"))?;
    if value.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(value).map_err(|e| format!("invalid config: {e}"))
}

/// A finding's reference to an object.
pub fn object_ref(index: usize, value: &Value) -> ObjectRef {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    ObjectRef {
        index: index as u32,
        api_version: s(&value["apiVersion"]),
        kind: s(&value["kind"]),
        namespace: s(&value["metadata"]["namespace"]),
        name: s(&value["metadata"]["name"]),
    }
}

/// Builds a [`Finding`].
#[derive(Debug, Clone)]
pub struct FindingBuilder(Finding);

impl FindingBuilder {
    /// A finding of the given severity.
    pub fn new(severity: Severity, message: impl Into<String>) -> Self {
        FindingBuilder(Finding {
            severity,
            message: message.into(),
            object: None,
            field: None,
            proposed_value: None,
            rule: None,
        })
    }
    /// An error finding.
    pub fn error(message: impl Into<String>) -> Self {
        Self::new(Severity::Error, message)
    }
    /// A warning finding.
    pub fn warning(message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, message)
    }
    /// The object concerned.
    #[must_use]
    pub fn object(mut self, index: usize, value: &Value) -> Self {
        self.0.object = Some(object_ref(index, value));
        self
    }
    /// The object concerned, as a reference already read (see [`v2::object_ref`]).
    #[must_use]
    pub fn object_ref(mut self, object: ObjectRef) -> Self {
        self.0.object = Some(object);
        self
    }
    /// The field concerned.
    #[must_use]
    pub fn field(mut self, path: impl Into<String>) -> Self {
        self.0.field = Some(path.into());
        self
    }
    /// A proposed value for the field.
    #[must_use]
    pub fn proposed(mut self, value: &Value) -> Self {
        self.0.proposed_value = Some(value.to_string());
        self
    }
    /// The rule id.
    #[must_use]
    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.0.rule = Some(rule.into());
        self
    }
    /// The finding.
    pub fn build(self) -> Finding {
        self.0
    }
}

/// Exports a [`Transformer`] as the component's `transformer` world.
///
/// The second argument is the path of the `wit/` directory relative to the plugin crate's
/// `Cargo.toml` (`"../../wit"` inside the sluice repository).
#[macro_export]
macro_rules! export_transformer {
    ($plugin:ty, $wit:literal) => {
        #[doc(hidden)]
        #[allow(clippy::all, reason = "wit-bindgen's generated code")]
        mod __sluice_transformer {
            #[allow(unused_imports)]
            use super::*;
            $crate::wit_bindgen::generate!({
                path: $wit,
                world: "transformer",
                runtime_path: "::sluice_plugin_sdk::wit_bindgen::rt",
            });
            use sluice::plugin::types as wit;

            struct Export;
            impl Guest for Export {
                fn validate_config(config: String) -> Result<(), String> {
                    let c = $crate::parse_config::<<$plugin as $crate::Transformer>::Config>(&config)?;
                    <$plugin as $crate::Transformer>::check(&c)
                }
                fn transform(ctx: wit::Context, objects: Vec<wit::Object>) -> Result<Vec<wit::Object>, Vec<wit::Finding>> {
                    let config = $crate::parse_config::<<$plugin as $crate::Transformer>::Config>(&ctx.config)
                        .map_err(|e| vec![__finding($crate::FindingBuilder::error(e).build())])?;
                    let mut items = Vec::with_capacity(objects.len());
                    for o in objects {
                        let value = $crate::__decode(&o.json)
                            .map_err(|e| vec![__finding($crate::FindingBuilder::error(e).build())])?;
                        items.push((value, $crate::Origin { path: o.origin.path, index: o.origin.index, line: o.origin.line }));
                    }
                    let c = $crate::Context { agent: ctx.agent, project: ctx.project, commit: ctx.commit };
                    <$plugin as $crate::Transformer>::transform(&config, &c, &mut items)
                        .map_err(|fs| fs.into_iter().map(__finding).collect::<Vec<_>>())?;
                    Ok(items
                        .into_iter()
                        .map(|(v, o)| wit::Object { json: v.to_string(), origin: wit::Origin { path: o.path, index: o.index, line: o.line } })
                        .collect())
                }
            }
            $crate::__finding_conversion!(wit);
            export!(Export);
        }
    };
}

/// Exports a [`Validator`] as the component's `validator` world. See
/// [`export_transformer!`] for the arguments.
#[macro_export]
macro_rules! export_validator {
    ($plugin:ty, $wit:literal) => {
        #[doc(hidden)]
        #[allow(clippy::all, reason = "wit-bindgen's generated code")]
        mod __sluice_validator {
            #[allow(unused_imports)]
            use super::*;
            $crate::wit_bindgen::generate!({
                path: $wit,
                world: "validator",
                runtime_path: "::sluice_plugin_sdk::wit_bindgen::rt",
            });
            use sluice::plugin::types as wit;

            struct Export;
            impl Guest for Export {
                fn validate_config(config: String) -> Result<(), String> {
                    let c = $crate::parse_config::<<$plugin as $crate::Validator>::Config>(&config)?;
                    <$plugin as $crate::Validator>::check(&c)
                }
                fn validate(ctx: wit::Context, objects: Vec<wit::Object>) -> Vec<wit::Finding> {
                    let config = match $crate::parse_config::<<$plugin as $crate::Validator>::Config>(&ctx.config) {
                        Ok(c) => c,
                        Err(e) => return vec![__finding($crate::FindingBuilder::error(e).build())],
                    };
                    let mut values = Vec::with_capacity(objects.len());
                    for o in &objects {
                        match $crate::__decode(&o.json) {
                            Ok(v) => values.push(v),
                            Err(e) => return vec![__finding($crate::FindingBuilder::error(e).build())],
                        }
                    }
                    let c = $crate::Context { agent: ctx.agent, project: ctx.project, commit: ctx.commit };
                    <$plugin as $crate::Validator>::validate(&config, &c, &values).into_iter().map(__finding).collect()
                }
            }
            $crate::__finding_conversion!(wit);
            export!(Export);
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __finding_conversion {
    ($wit:ident) => {
        fn __finding(f: $crate::Finding) -> $wit::Finding {
            $wit::Finding {
                severity: match f.severity {
                    $crate::Severity::Error => $wit::Severity::Error,
                    $crate::Severity::Warning => $wit::Severity::Warning,
                    $crate::Severity::Info => $wit::Severity::Info,
                },
                message: f.message,
                object: f.object.map(|o| $wit::ObjectRef {
                    index: o.index,
                    api_version: o.api_version,
                    kind: o.kind,
                    namespace: o.namespace,
                    name: o.name,
                }),
                field: f.field,
                proposed_value: f.proposed_value,
                rule: f.rule,
            }
        }
    };
}

/// Runs `f` over the values of `objects` (origins kept in place): the usual shape of a
/// transformer that changes objects but never adds or removes them.
pub fn with_values<R>(objects: &mut [(Value, Origin)], f: impl FnOnce(&mut [Value]) -> R) -> R {
    let mut values: Vec<Value> = objects.iter_mut().map(|(v, _)| std::mem::take(v)).collect();
    let result = f(&mut values);
    for ((slot, _), v) in objects.iter_mut().zip(values) {
        *slot = v;
    }
    result
}

#[doc(hidden)]
pub fn __decode(json: &str) -> Result<Value, String> {
    serde_json::from_str(json).map_err(|e| format!("object is not JSON: {e}"))
}

/// Where each workload kind keeps its pod spec: as field names, and as a JSON Pointer.
const POD_SPECS: [(&[&str], &[&str], &str); 4] = [
    (&["Pod"], &["spec"], "/spec"),
    (
        &[
            "Deployment",
            "ReplicaSet",
            "StatefulSet",
            "DaemonSet",
            "Job",
            "ReplicationController",
        ],
        &["spec", "template", "spec"],
        "/spec/template/spec",
    ),
    (
        &["CronJob"],
        &["spec", "jobTemplate", "spec", "template", "spec"],
        "/spec/jobTemplate/spec/template/spec",
    ),
    (&["PodTemplate"], &["template", "spec"], "/template/spec"),
];

/// Where the pod spec of each workload kind lives.
pub fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    POD_SPECS
        .iter()
        .find(|(kinds, _, _)| kinds.contains(&kind))
        .map(|(_, path, _)| *path)
}

/// Where the pod spec of each workload kind lives, as a JSON Pointer (`/spec/template/spec`).
pub fn pod_spec_pointer(kind: &str) -> Option<&'static str> {
    POD_SPECS
        .iter()
        .find(|(kinds, _, _)| kinds.contains(&kind))
        .map(|(_, _, pointer)| *pointer)
}

/// The pod template's metadata of each workload kind (not for Pods themselves).
pub fn pod_template_metadata_mut(value: &mut Value) -> Option<&mut Value> {
    let path = pod_spec_path(value["kind"].as_str()?)?;
    let (_, parent) = path.split_last()?;
    if parent.is_empty() {
        return None;
    }
    let mut v = value;
    for key in parent {
        v = v.get_mut(*key)?;
    }
    Some(
        v.as_object_mut()?
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default())),
    )
}

/// The object's pod spec, if it is a workload, with its field path.
pub fn pod_spec_mut(value: &mut Value) -> Option<(String, &mut Value)> {
    let path = pod_spec_path(value["kind"].as_str()?)?;
    let mut v = value;
    for key in path {
        v = v.get_mut(*key)?;
    }
    v.is_object().then(|| (path.join("."), v))
}

/// Same as [`pod_spec_mut`], read-only.
pub fn pod_spec(value: &Value) -> Option<(String, &Value)> {
    let path = pod_spec_path(value["kind"].as_str()?)?;
    let mut v = value;
    for key in path {
        v = v.get(*key)?;
    }
    v.is_object().then(|| (path.join("."), v))
}

/// The container lists of a pod spec.
pub const CONTAINER_LISTS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];

/// Every container of a pod spec with its field path (`containers[0]`, …).
pub fn containers(spec: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    for list in CONTAINER_LISTS {
        if let Some(items) = spec[list].as_array() {
            for (i, c) in items.iter().enumerate() {
                out.push((format!("{list}[{i}]"), c));
            }
        }
    }
    out
}

/// One container of one workload, found by [`all_containers`].
#[derive(Debug, Clone)]
pub struct ContainerAt<'a> {
    /// Index of the object in the list the plugin received.
    pub index: usize,
    /// The object.
    pub object: &'a Value,
    /// The container's field path in its object, e.g. `spec.template.spec.containers[0]`.
    pub path: String,
    /// The container.
    pub container: &'a Value,
}

/// Every container (init, regular, ephemeral) of every workload in `objects`.
pub fn all_containers(objects: &[Value]) -> Vec<ContainerAt<'_>> {
    let mut out = Vec::new();
    for (index, object) in objects.iter().enumerate() {
        if let Some((base, spec)) = pod_spec(object) {
            out.extend(
                containers(spec)
                    .into_iter()
                    .map(|(p, container)| ContainerAt {
                        index,
                        object,
                        path: format!("{base}.{p}"),
                        container,
                    }),
            );
        }
    }
    out
}

/// Every container of a pod spec, mutable, with its field path.
pub fn containers_mut(spec: &mut Value) -> Vec<(String, &mut Value)> {
    let mut out = Vec::new();
    let Some(map) = spec.as_object_mut() else {
        return out;
    };
    for (list, items) in map.iter_mut() {
        if !CONTAINER_LISTS.contains(&list.as_str()) {
            continue;
        }
        if let Some(items) = items.as_array_mut() {
            for (i, c) in items.iter_mut().enumerate() {
                out.push((format!("{list}[{i}]"), c));
            }
        }
    }
    out
}

/// Splits an image reference into (name, tag, digest).
pub fn parse_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    // A ':' after the last '/' is a tag; one before it belongs to a registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last_slash..].rfind(':') {
        Some(i) => (
            &rest[..last_slash + i],
            Some(&rest[last_slash + i + 1..]),
            digest,
        ),
        None => (rest, None, digest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn image_references() {
        assert_eq!(parse_image("nginx"), ("nginx", None, None));
        assert_eq!(parse_image("nginx:1.27"), ("nginx", Some("1.27"), None));
        assert_eq!(
            parse_image("reg:5000/a/b:v1@sha256:ab"),
            ("reg:5000/a/b", Some("v1"), Some("sha256:ab"))
        );
        assert_eq!(parse_image("reg:5000/a/b"), ("reg:5000/a/b", None, None));
    }

    #[test]
    fn pod_specs_of_every_workload_shape() {
        let cron = json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"image": "a"}], "initContainers": [{"image": "b"}]}}}}}});
        let (path, spec) = pod_spec(&cron).expect("cronjob pod spec");
        assert_eq!(path, "spec.jobTemplate.spec.template.spec");
        let found: Vec<String> = containers(spec).into_iter().map(|(p, _)| p).collect();
        assert_eq!(found, ["initContainers[0]", "containers[0]"]);
        assert!(pod_spec(&json!({"kind": "ConfigMap"})).is_none());
    }
}
