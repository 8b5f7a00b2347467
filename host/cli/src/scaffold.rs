//! `sluice plugin new NAME --lang LANG`: a plugin project that builds and passes its own
//! test. It starts from the repository's `no-latest-tag` example in that language (the
//! examples are the templates, so what is generated is what CI builds and tests), renamed,
//! with:
//!
//! - the contract it is written against (`wit/plugin.wit`: `sluice:plugin@0.2.0`, but
//!   0.1.0 for JavaScript, whose calls into the host are slow; Go writes a KRM function,
//!   which needs none);
//! - `toolchain.sh`, the pinned toolchains (installed from the package registries on first
//!   use, cached under `~/.cache/sluice`), and `build.sh`, which builds `<name>.wasm`;
//! - `plugin-test.yaml` and `fixtures/`, which `sluice plugin test plugin-test.yaml` runs.

use std::path::Path;

/// A language `plugin new` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// wit-bindgen, target wasm32-wasip2.
    Rust,
    /// componentize-py.
    Python,
    /// componentize-js.
    Javascript,
    /// clang for wasm32-wasi, wit-bindgen's C bindings, wasm-tools.
    C,
    /// A KRM function (Go, GOOS=wasip1).
    Go,
}

const EXAMPLE: &str = "no-latest-tag";
const TOOLCHAIN: &str = include_str!("../../../examples/plugins/toolchain.sh");
const WIT_V2: &str = include_str!("../../../wit/v0.2/plugin.wit");
const WIT_V1: &str = include_str!("../../../wit/plugin.wit");

/// The example's files in `lang`: (path in the project, content).
fn sources(lang: Lang) -> Vec<(&'static str, &'static str)> {
    macro_rules! example {
        ($lang:literal, $file:literal) => {
            (
                $file,
                include_str!(concat!(
                    "../../../examples/plugins/",
                    $lang,
                    "/no-latest-tag/",
                    $file
                )),
            )
        };
    }
    match lang {
        Lang::Rust => vec![
            example!("rust", "Cargo.toml"),
            example!("rust", "Cargo.lock"),
            example!("rust", "src/lib.rs"),
        ],
        Lang::Python => vec![example!("python", "app.py")],
        Lang::Javascript => vec![example!("javascript", "plugin.js")],
        Lang::C => vec![example!("c", "plugin.c")],
        Lang::Go => vec![
            example!("go", "main.go"),
            example!("go", "go.mod"),
            example!("go", "go.sum"),
        ],
    }
}

/// The line of `build.sh` that builds the module.
fn build_line(lang: Lang, name: &str) -> String {
    let out = format!("\"$PWD/{name}.wasm\"");
    match lang {
        Lang::Rust => format!("rust_component . {out}"),
        Lang::Python => format!("python_component . \"$PWD/wit\" validator {out}"),
        Lang::Javascript => format!("javascript_component plugin.js \"$PWD/wit\" validator {out}"),
        Lang::C => format!("c_component . \"$PWD/wit\" validator {out}"),
        Lang::Go => format!("go_function . {out}"),
    }
}

/// Whether `name` can name a plugin, a crate and a module: a lower-case DNS label.
fn valid_name(name: &str) -> bool {
    sluice_model::object::is_dns_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
}

/// Every file of the project for `name` in `lang`, with its content.
pub fn files(name: &str, lang: Lang) -> Result<Vec<(String, String)>, String> {
    if !valid_name(name) {
        return Err(format!(
            "{name:?}: a plugin name is lower-case letters, digits and '-', starting with a letter"
        ));
    }
    let mut out: Vec<(String, String)> = sources(lang)
        .into_iter()
        .map(|(path, text)| {
            let text = text
                .replace("../../../../wit/v0.2", "wit")
                .replace("../../../../wit ", "wit ")
                .replace(EXAMPLE, name)
                .replace(&EXAMPLE.replace('-', "_"), &name.replace('-', "_"));
            (path.to_string(), text)
        })
        .collect();
    // The contract the example is written against: 0.2.0, but JavaScript's on 0.1.0
    // (see its example); a KRM function needs none.
    match lang {
        Lang::Go => {}
        Lang::Javascript => out.push(("wit/plugin.wit".into(), WIT_V1.into())),
        _ => out.push(("wit/plugin.wit".into(), WIT_V2.into())),
    }
    out.push(("toolchain.sh".into(), TOOLCHAIN.into()));
    out.push((
        "build.sh".into(),
        format!(
            "#!/usr/bin/env bash\n\
             # Builds {name}.wasm with the pinned toolchain of toolchain.sh (installed on first\n\
             # use, cached under ~/.cache/sluice). Then: sluice plugin test plugin-test.yaml\n\
             set -euo pipefail\n\
             cd \"$(dirname \"$0\")\"\n\
             # shellcheck source=toolchain.sh\n\
             . ./toolchain.sh\n\
             {}\n\
             echo \"built $PWD/{name}.wasm\"\n",
            build_line(lang, name)
        ),
    ));
    // A KRM function's results carry no rule id.
    let rule = match lang {
        Lang::Go => String::new(),
        _ => format!(", rule: {name}"),
    };
    out.push((
        "plugin-test.yaml".into(),
        format!(
            "# sluice plugin test plugin-test.yaml: runs {name}.wasm on the fixtures and compares\n\
             # what it reports with what each case expects (every finding, in any order).\n\
             apiVersion: sluice.dev/v1alpha1\n\
             kind: PluginTest\n\
             metadata:\n  name: {name}\n\
             plugins:\n\
             - name: {name}\n  module: {name}.wasm\n\
             cases:\n\
             - name: an image on the latest tag is refused\n  objects: fixtures/latest.yaml\n  findings:\n  \
             - {{severity: error{rule}, object: Deployment/web, message: 'image nginx:latest uses the latest tag'}}\n\
             - name: pinned images pass\n  objects: fixtures/pinned.yaml\n  findings: []\n"
        ),
    ));
    let deployment = |images: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: shop\n\
             spec:\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n\
             \x20   spec:\n      containers:\n{images}"
        )
    };
    out.push((
        "fixtures/latest.yaml".into(),
        deployment(
            "      - {name: web, image: \"nginx:latest\"}\n      - {name: proxy, image: \"envoyproxy/envoy:v1.31.0\"}\n",
        ),
    ));
    out.push((
        "fixtures/pinned.yaml".into(),
        deployment("      - {name: web, image: \"nginx:1.27\"}\n"),
    ));
    out.push((
        "README.md".into(),
        format!(
            "# {name}\n\nA sluice plugin, started from the `no-latest-tag` example by `sluice plugin new`.\n\n\
             ```sh\n./build.sh                              # {name}.wasm\n\
             sluice plugin test plugin-test.yaml     # the fixtures' cases\n\
             sluice plugin inspect {name}.wasm       # world, contract version, imports\n```\n\n\
             Then name it in the agent configuration (`plugins: [{{name: {name}, module: …}}]`); \
             docs/plugins.md in the sluice repository describes the contract and the configuration.\n"
        ),
    ));
    Ok(out)
}

/// Writes the project into `dir`, which must not exist or be empty.
///
/// # Errors
/// An invalid name, a non-empty directory, or a write that failed.
pub fn write(dir: &Path, name: &str, lang: Lang) -> Result<Vec<String>, String> {
    let files = files(name, lang)?;
    if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!("{}: not empty", dir.display()));
    }
    let mut written = Vec::new();
    for (path, text) in files {
        let at = dir.join(&path);
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&at, text).map_err(|e| format!("{}: {e}", at.display()))?;
        if path.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", at.display()))?;
        }
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_renames_the_example_and_points_at_its_own_contract() {
        let rust = files("team-policy", Lang::Rust).unwrap();
        let get = |p: &str| &rust.iter().find(|(path, _)| path == p).unwrap().1;
        assert!(get("Cargo.toml").contains("name = \"team-policy\""));
        assert!(get("src/lib.rs").contains("path: \"wit\""));
        assert!(get("src/lib.rs").contains("const RULE: &str = \"team-policy\";"));
        assert!(get("build.sh").contains("rust_component . \"$PWD/team-policy.wasm\""));
        assert!(get("plugin-test.yaml").contains("rule: team-policy"));
        assert!(get("wit/plugin.wit").contains("package sluice:plugin@0.2.0;"));
        let go = files("team-policy", Lang::Go).unwrap();
        assert!(
            go.iter()
                .any(|(p, t)| p == "go.mod" && t.contains("plugins/team-policy"))
        );
        assert!(!go.iter().any(|(p, _)| p.starts_with("wit/")));
        let js = files("team-policy", Lang::Javascript).unwrap();
        let get = |p: &str| &js.iter().find(|(path, _)| path == p).unwrap().1;
        assert!(get("wit/plugin.wit").contains("package sluice:plugin@0.1.0;"));
        assert!(get("plugin.js").contains("componentize-js --wit wit --world-name validator"));
    }

    #[test]
    fn names_must_be_lower_case_labels() {
        for bad in ["Team", "1policy", "a_b", "", "a/b"] {
            assert!(files(bad, Lang::Python).is_err(), "{bad}");
        }
    }
}
