//! A `sluice:plugin@0.2.0` transformer that misuses its object handles as its config says
//! (`{"act": "<what>"}`), so the tests can check what the host allows and what each misuse
//! yields.

use serde::Deserialize;
use serde_json::json;
use sluice_plugin_sdk::v2::{Object, Transformer};
use sluice_plugin_sdk::{Context, Finding, FindingBuilder, Origin};

/// What to do.
#[derive(Debug, Default, Deserialize)]
pub struct Config {
    /// `reshape` (drop the first object, reverse the rest, add a ConfigMap), `strip-name`,
    /// `replace-metadata`,
    /// `bad-set`, `bad-parse`, `flood`, or nothing (pass through).
    #[serde(default)]
    pub act: String,
}

/// The plugin.
pub struct Plugin;

impl Transformer for Plugin {
    type Config = Config;

    fn transform<O: Object>(
        config: &Config,
        _: &Context,
        objects: &mut Vec<O>,
    ) -> Result<(), Vec<Finding>> {
        let report = |what: String| Err(vec![FindingBuilder::error(what).build()]);
        match config.act.as_str() {
            "reshape" => {
                objects.remove(0);
                objects.reverse();
                let made = json!({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "made", "namespace": "dev"}, "data": {"from": "plugin"}});
                let origin = objects.first().map(O::origin).unwrap_or_default();
                let origin = Origin {
                    path: format!("{} (made)", origin.path),
                    ..origin
                };
                objects.push(
                    O::parse(&made, &origin).map_err(|e| vec![FindingBuilder::error(e).build()])?,
                );
            }
            "strip-name" => {
                for o in objects.iter_mut() {
                    o.remove("/metadata/name")
                        .map_err(|e| vec![FindingBuilder::error(e).build()])?;
                }
            }
            // Replaces the whole metadata map: the name goes with it.
            "replace-metadata" => {
                objects[0]
                    .set("/metadata", json!({"namespace": "x"}))
                    .map_err(|e| vec![FindingBuilder::error(e).build()])?;
            }
            "bad-set" => {
                return report(format!("{:?}", objects[0].set_str("/metadata/name/x", "y")));
            }
            "bad-parse" => {
                let incomplete = json!({"apiVersion": "v1", "kind": "ConfigMap"});
                return report(format!(
                    "{:?}",
                    O::parse(&incomplete, &Origin::default()).map(|_| ())
                ));
            }
            // Writes 1 MiB values under new keys until the host refuses.
            "flood" => {
                let big = "x".repeat(1 << 20);
                for i in 0.. {
                    if let Err(e) = objects[0].set_str(&format!("/data/k{i}"), &big) {
                        return report(format!("after {i} writes: {e}"));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_transformer_v2!(Plugin, "../../../wit/v0.2");
