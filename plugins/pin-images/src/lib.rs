//! `pin-images`: replaces image tags with digests from a lock map, in every pod-spec shape
//! (Pod, Deployment, ReplicaSet, StatefulSet, DaemonSet, Job, CronJob, PodTemplate,
//! ReplicationController; containers, initContainers and ephemeralContainers).
//!
//! Config: `{images: {"nginx:1.27": "sha256:…"}, require_pinned: false}`. With
//! `require_pinned`, an image left without a digest fails the commit.
//!
//! Built against `sluice:plugin@0.2.0`: it reads and writes only the `image` fields.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_plugin_sdk::pointer::field_path;
use sluice_plugin_sdk::v2::{Fields, Object, Transformer, images, object_ref};
use sluice_plugin_sdk::{Context, Finding, FindingBuilder, parse_image};

/// Plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `image:tag` → `sha256:<hex>`.
    pub images: BTreeMap<String, String>,
    /// Reject images that end up without a digest.
    pub require_pinned: bool,
}

/// Checks the configuration.
pub fn check(config: &Config) -> Result<(), String> {
    for (image, digest) in &config.images {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("images[{image:?}]: digest must start with sha256:"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "images[{image:?}]: digest must be sha256: and 64 hex digits"
            ));
        }
    }
    Ok(())
}

/// Pins the images, reading and writing only the `image` fields; returns findings for
/// unpinned images when `require_pinned`.
///
/// # Errors
/// The findings above, or an image field that cannot be written.
pub fn transform<O: Fields>(config: &Config, objects: &mut [O]) -> Result<(), Vec<Finding>> {
    let mut findings = Vec::new();
    for (index, o) in objects.iter_mut().enumerate() {
        let images: Vec<(String, String)> = images(o)
            .into_iter()
            .map(|(at, image)| (at, image.into_owned()))
            .collect();
        for (at, image) in images {
            let (name, tag, digest) = parse_image(&image);
            if digest.is_some() {
                continue;
            }
            let key = format!("{name}:{}", tag.unwrap_or("latest"));
            let finding = |o: &O, message: String| {
                FindingBuilder::error(message)
                    .object_ref(object_ref(index, o))
                    .field(field_path(&at))
                    .rule("pin-images")
                    .build()
            };
            match config
                .images
                .get(&key)
                .or_else(|| config.images.get(&image))
            {
                Some(d) => {
                    let pinned = format!("{image}@{d}");
                    if let Err(e) = o.set_str(&at, &pinned) {
                        return Err(vec![finding(o, e)]);
                    }
                }
                None if config.require_pinned => findings.push(finding(
                    o,
                    format!("image {image} has no digest and none is locked for it"),
                )),
                None => {}
            }
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        Err(findings)
    }
}

/// The plugin, for [`sluice_plugin_sdk::export_transformer_v2!`].
pub struct Plugin;

impl Transformer for Plugin {
    type Config = Config;

    fn check(config: &Config) -> Result<(), String> {
        check(config)
    }

    fn transform<O: Object>(
        config: &Config,
        _: &Context,
        objects: &mut Vec<O>,
    ) -> Result<(), Vec<Finding>> {
        transform(config, objects)
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_transformer_v2!(Plugin, "../../wit/v0.2");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn pins_every_container_list_and_workload_shape() {
        let cfg = Config {
            images: [
                ("nginx:1.27".to_string(), D.to_string()),
                ("busybox:latest".to_string(), D.to_string()),
            ]
            .into(),
            require_pinned: false,
        };
        let mut objs = vec![
            json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"image": "nginx:1.27"}]}}}}}}),
            json!({"kind": "Pod", "spec": {"initContainers": [{"image": "busybox"}], "ephemeralContainers": [{"image": "nginx:1.27"}], "containers": [{"image": "other:1"}]}}),
        ];
        transform(&cfg, &mut objs).expect("no requirement");
        assert_eq!(
            objs[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"],
            format!("nginx:1.27@{D}")
        );
        assert_eq!(
            objs[1]["spec"]["initContainers"][0]["image"],
            format!("busybox@{D}")
        );
        assert_eq!(
            objs[1]["spec"]["ephemeralContainers"][0]["image"],
            format!("nginx:1.27@{D}")
        );
        assert_eq!(objs[1]["spec"]["containers"][0]["image"], "other:1");
    }

    #[test]
    fn require_pinned_reports_the_field() {
        let cfg = Config {
            images: BTreeMap::new(),
            require_pinned: true,
        };
        let mut objs = vec![
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [{"image": "a:1"}, {"image": "b@sha256:x"}]}}}}),
        ];
        let findings = transform(&cfg, &mut objs).unwrap_err();
        assert_eq!(findings.len(), 1);
        assert_eq!(
            findings[0].field.as_deref(),
            Some("spec.template.spec.containers[0].image")
        );
        assert_eq!(
            findings[0].object.as_ref().map(|o| o.name.as_str()),
            Some("d")
        );
    }

    #[test]
    fn digests_are_checked() {
        assert!(
            check(&Config {
                images: [("a:1".into(), "sha256:abc".into())].into(),
                require_pinned: false
            })
            .is_err()
        );
        assert!(
            check(&Config {
                images: [("a:1".into(), D.into())].into(),
                require_pinned: false
            })
            .is_ok()
        );
    }
}
