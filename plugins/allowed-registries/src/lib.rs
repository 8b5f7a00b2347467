//! `allowed-registries` (validator): images must come from listed registries.
//!
//! Config: `{registries: ["registry.example.com", "docker.io/library"]}`. Each entry is a
//! registry host (with its port, if any), optionally followed by a repository path prefix.
//! Image references are normalised the way container runtimes do (`nginx` is
//! `docker.io/library/nginx`, `index.docker.io` is `docker.io`, tags and digests are not part
//! of the name); an image is allowed when its host equals an entry's host exactly and, if the
//! entry has a path, its repository is that path or below it. So `registry.example.com`
//! does not admit `registry.example.com.evil.io/x` and `docker.io/library` does not admit
//! `docker.io/library-evil/x`. A trailing `/` on an entry is ignored.

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_sdk::{Finding, FindingBuilder, all_containers};

/// Plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Allowed prefixes.
    pub registries: Vec<String>,
}

/// Checks the configuration.
pub fn check(config: &Config) -> Result<(), String> {
    if config.registries.is_empty() {
        Err("registries must list at least one prefix".into())
    } else {
        Ok(())
    }
}

/// An image reference's registry host and repository path, normalised: `nginx:1.27` is
/// (`docker.io`, `library/nginx`); `localhost:5000/a/b@sha256:…` is (`localhost:5000`, `a/b`).
pub fn parse(image: &str) -> (String, String) {
    let name = image.split('@').next().unwrap_or_default();
    let (host, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_ascii_lowercase(), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    // A tag is a `:` in the last path component (a port is in the host).
    let path = match path.rsplit_once('/') {
        Some((dir, last)) => format!("{dir}/{}", last.split(':').next().unwrap_or_default()),
        None => path.split(':').next().unwrap_or_default().to_string(),
    };
    let host = if host == "index.docker.io" || host == "registry-1.docker.io" {
        "docker.io".to_string()
    } else {
        host
    };
    let path = if host == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    (host, path)
}

/// The fully qualified form of an image reference, without tag or digest.
pub fn qualify(image: &str) -> String {
    let (host, path) = parse(image);
    format!("{host}/{path}")
}

/// Whether `image` is allowed by the entry `allowed` (`host[/path prefix]`).
pub fn allows(allowed: &str, image: &str) -> bool {
    let allowed = allowed.trim().trim_end_matches('/');
    let (host, prefix) = allowed.split_once('/').unwrap_or((allowed, ""));
    let host = match host.to_ascii_lowercase().as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    };
    let (image_host, path) = parse(image);
    image_host == host
        && (prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/")))
}

/// Reports images from other registries.
pub fn validate(config: &Config, objects: &[Value]) -> Vec<Finding> {
    all_containers(objects)
        .into_iter()
        .filter_map(|c| {
            let image = c.container["image"].as_str()?;
            if config.registries.iter().any(|r| allows(r, image)) {
                return None;
            }
            let message = format!(
                "image {image} is not from an allowed registry ({})",
                config.registries.join(", ")
            );
            Some(
                FindingBuilder::error(message)
                    .object(c.index, c.object)
                    .field(format!("{}.image", c.path))
                    .rule("allowed-registries")
                    .build(),
            )
        })
        .collect()
}

/// The plugin, for [`sluice_plugin_sdk::export_validator!`].
pub struct Plugin;

impl sluice_plugin_sdk::Validator for Plugin {
    type Config = Config;

    fn check(config: &Config) -> Result<(), String> {
        check(config)
    }

    fn validate(
        config: &Config,
        _: &sluice_plugin_sdk::Context,
        objects: &[Value],
    ) -> Vec<sluice_plugin_sdk::Finding> {
        validate(config, objects)
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_validator!(Plugin, "../../wit");

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registries_are_matched_on_the_qualified_name() {
        assert_eq!(qualify("nginx"), "docker.io/library/nginx");
        assert_eq!(qualify("bitnami/redis"), "docker.io/bitnami/redis");
        assert_eq!(qualify("reg.example.com/a/b:1"), "reg.example.com/a/b");
        assert_eq!(qualify("localhost:5000/a@sha256:00"), "localhost:5000/a");
        assert_eq!(
            qualify("index.docker.io/nginx:1"),
            "docker.io/library/nginx"
        );
        let pod = json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"image": "nginx:1"}, {"image": "evil.io/x"}, {"image": "reg.example.com/app"}]}});
        let found = validate(
            &Config {
                registries: vec!["docker.io/library/".into(), "reg.example.com/".into()],
            },
            &[pod],
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].field.as_deref(), Some("spec.containers[1].image"));
    }

    #[test]
    fn hosts_and_paths_match_exactly_not_as_text_prefixes() {
        let cases = [
            ("registry.example.com", "registry.example.com/x:1.0", true),
            (
                "registry.example.com",
                "registry.example.com.evil.io/x:1.0",
                false,
            ),
            (
                "registry.example.com/",
                "registry.example.com.evil.io/x",
                false,
            ),
            (
                "registry.example.com",
                "evil.io/registry.example.com/x",
                false,
            ),
            ("registry.example.com:5000", "registry.example.com/x", false),
            (
                "registry.example.com:5000",
                "registry.example.com:5000/x",
                true,
            ),
            ("REGISTRY.example.com", "registry.example.com/x", true),
            ("docker.io/library", "nginx", true),
            ("docker.io/library/", "docker.io/nginx:1", true),
            ("docker.io/library", "docker.io/library-evil/x", false),
            ("docker.io/library", "bitnami/redis", false),
            ("docker.io", "bitnami/redis", true),
            ("docker.io", "index.docker.io/bitnami/redis", true),
            (
                "reg.example.com/team",
                "reg.example.com/team/app@sha256:00",
                true,
            ),
            ("reg.example.com/team", "reg.example.com/teamx/app", false),
        ];
        for (allowed, image, want) in cases {
            assert_eq!(allows(allowed, image), want, "{allowed} vs {image}");
        }
    }
}
