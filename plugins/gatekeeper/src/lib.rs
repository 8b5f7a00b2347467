//! `gatekeeper` (validator): evaluates Gatekeeper ConstraintTemplates and their
//! Constraints against a commit's objects, with Gatekeeper's semantics, in the sandbox.
//!
//! Policies come from three places, all used together:
//! - files the plugin is granted (`files:` in the plugin's entry, read-only, e.g. a
//!   `policies/` directory of the configuration repository): every ConstraintTemplate and
//!   Constraint in the YAML/JSON files under `paths` (default: everything granted);
//!   other documents (samples, Suites) are ignored;
//! - the commit itself: its ConstraintTemplates and Constraints are policies, not reviewed;
//! - inline in the config (`templates`, `constraints`), as `sluice plugin test` passes a
//!   Suite's.
//!
//! Each object is reviewed by each Constraint whose `match` selects it, with the input
//! Gatekeeper builds (`input.review`: `object`, `kind` {group, version, kind}, `name`,
//! `namespace`, `operation: CREATE`, `userInfo`; `input.parameters`). `data.inventory` holds
//! the commit's objects (and `inventory` from the config), keyed as Gatekeeper's sync keys
//! them; `namespaceSelector` reads the labels of Namespaces found there. A violation is a
//! finding: `deny` an error (the commit is refused), `warn` a warning, `dryrun` info; its
//! message is Gatekeeper's, `[<constraint>] <msg>`, its rule `<Kind>/<constraint>`.
//!
//! The Rego engine is regorus (Rust, Rego v0 and v1); see `docs/plugins.md` for why.

pub mod matching;
pub mod policy;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};
use sluice_plugin_sdk::{Context, Finding, FindingBuilder, Severity, Validator};

use crate::matching::Subject;
use crate::policy::{Action, Constraint, From, Template};

/// Plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Files or directories to read policies from, in the plugin's view of its granted
    /// files (`/policies`). Default: `/`, everything granted.
    pub paths: Vec<String>,
    /// ConstraintTemplates given inline.
    pub templates: Vec<Value>,
    /// Constraints given inline.
    pub constraints: Vec<Value>,
    /// More objects for `data.inventory` and `namespaceSelector` (e.g. the cluster's
    /// Namespaces).
    pub inventory: Vec<Value>,
    /// Whether the commit's own objects are in `data.inventory` (default true; `sluice
    /// plugin test` turns it off for a Suite's cases, whose inventory is explicit).
    pub inventory_from_objects: bool,
    /// The enforcement points a `scoped` enforcement action is resolved for (default
    /// `validation.gatekeeper.sh`: sluice checks a commit where Gatekeeper's admission
    /// webhook would check each object; `sluice plugin test` uses gator's).
    pub enforcement_points: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            paths: Vec::new(),
            templates: Vec::new(),
            constraints: Vec::new(),
            inventory: Vec::new(),
            inventory_from_objects: true,
            enforcement_points: vec!["validation.gatekeeper.sh".into()],
        }
    }
}

/// A policy object and where it came from.
struct Sourced {
    object: Value,
    from: From,
}

/// Reads `paths` (files, or directories walked in name order) for ConstraintTemplates and
/// Constraints. A file that is not YAML is skipped when it came from a directory walk and an
/// error when named. `paths` empty reads `/`, where the host puts a plugin's granted files;
/// without a grant there is nothing there.
fn read_files(paths: &[String]) -> Result<Vec<Sourced>, String> {
    let defaulted = paths.is_empty();
    let roots: Vec<String> = match (defaulted, cfg!(target_arch = "wasm32")) {
        (true, true) => vec!["/".into()],
        // Natively (tests, benches) `/` is the host's: nothing is granted.
        (true, false) => Vec::new(),
        (false, _) => paths.to_vec(),
    };
    let mut files = Vec::new();
    for root in &roots {
        let path = std::path::Path::new(root);
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => walk(path, &mut files)?,
            Ok(_) => files.push(path.to_path_buf()),
            Err(_) if defaulted => {}
            Err(e) => return Err(format!("{root}: {e}")),
        }
    }
    let mut out = Vec::new();
    for file in files {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{shown}: {e}"))?;
        for (line, value) in documents(&text).map_err(|e| format!("{shown}: not YAML: {e}"))? {
            if policy::is_template(&value) || policy::is_constraint(&value) {
                out.push(Sourced {
                    object: value,
                    from: From::File(shown.clone(), line),
                });
            }
        }
    }
    Ok(out)
}

fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(p);
        }
    }
    Ok(())
}

/// The YAML documents of `text` with the line each starts on; empty ones dropped.
///
/// # Errors
/// The YAML parser's message.
pub fn documents(text: &str) -> Result<Vec<(u32, Value)>, String> {
    let docs: Vec<serde_saphyr::Spanned<Value>> =
        serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    Ok(docs
        .into_iter()
        .filter(|d| !d.value.is_null())
        .map(|d| (d.referenced.line() as u32, d.value))
        .collect())
}

/// Everything the plugin reports about `objects`.
pub fn validate(config: &Config, objects: &[Value]) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut sourced = match read_files(&config.paths) {
        Ok(s) => s,
        Err(e) => return vec![FindingBuilder::error(e).rule("gatekeeper").build()],
    };
    for (list, what) in [
        (&config.templates, "templates"),
        (&config.constraints, "constraints"),
    ] {
        for (i, o) in list.iter().enumerate() {
            sourced.push(Sourced {
                object: o.clone(),
                from: From::File(format!("config.{what}[{i}]"), 0),
            });
        }
    }
    let mut is_policy = vec![false; objects.len()];
    for (i, o) in objects.iter().enumerate() {
        if policy::is_template(o) || policy::is_constraint(o) {
            is_policy[i] = true;
            sourced.push(Sourced {
                object: o.clone(),
                from: From::Object(i),
            });
        }
    }
    // A finding about a policy object: on the commit's object, or naming the file.
    let about = |from: &From, message: String, severity: Severity| {
        let b = match from {
            From::Object(i) => FindingBuilder::error(message).object(*i, &objects[*i]),
            From::File(_, 0) => FindingBuilder::error(message),
            From::File(..) => FindingBuilder::error(format!("{from}: {message}")),
        };
        let mut f = b.rule("gatekeeper").build();
        f.severity = severity;
        f
    };

    let mut templates: BTreeMap<String, Template> = BTreeMap::new();
    for s in sourced.iter().filter(|s| policy::is_template(&s.object)) {
        match Template::compile(&s.object) {
            Ok(t) if templates.contains_key(&t.kind) => found.push(about(
                &s.from,
                format!(
                    "ConstraintTemplate {}: kind {} is defined twice",
                    t.name, t.kind
                ),
                Severity::Error,
            )),
            Ok(t) => {
                templates.insert(t.kind.clone(), t);
            }
            Err(e) => found.push(about(&s.from, e, Severity::Error)),
        }
    }
    let mut constraints = Vec::new();
    for s in sourced.iter().filter(|s| policy::is_constraint(&s.object)) {
        match Constraint::parse(&s.object, &config.enforcement_points) {
            Ok(c) if !templates.contains_key(&c.kind) => found.push(about(
                &s.from,
                format!(
                    "{} {}: no ConstraintTemplate defines kind {}",
                    c.kind, c.name, c.kind
                ),
                Severity::Error,
            )),
            Ok(c) => match policy::check_parameters(
                templates[&c.kind].parameters.as_ref(),
                &c.parameters,
            ) {
                Ok(()) => constraints.push(c),
                Err(e) => found.push(about(
                    &s.from,
                    format!("{} {}: {e}", c.kind, c.name),
                    Severity::Error,
                )),
            },
            Err(e) => found.push(about(&s.from, e, Severity::Error)),
        }
    }
    if constraints.is_empty() {
        return found;
    }

    let inventoried: Vec<&Value> = config
        .inventory
        .iter()
        .chain(
            objects
                .iter()
                .enumerate()
                .filter(|(i, _)| config.inventory_from_objects && !is_policy[*i])
                .map(|(_, o)| o),
        )
        .collect();
    let namespaces: BTreeMap<&str, BTreeMap<String, String>> = inventoried
        .iter()
        .copied()
        .chain(objects)
        .filter(|o| o["kind"] == "Namespace" && o["apiVersion"] == "v1")
        .filter_map(|o| Some((o["metadata"]["name"].as_str()?, matching::labels(o))))
        .collect();
    let data = match regorus::Value::from_json_str(
        &policy::inventory(inventoried.iter().copied()).to_string(),
    ) {
        Ok(d) => d,
        Err(e) => {
            return vec![
                FindingBuilder::error(format!("data.inventory: {e}"))
                    .rule("gatekeeper")
                    .build(),
            ];
        }
    };
    for t in templates.values_mut() {
        if let Err(e) = t.engine.add_data(data.clone()) {
            return vec![
                FindingBuilder::error(format!("data.inventory: {e}"))
                    .rule("gatekeeper")
                    .build(),
            ];
        }
    }

    for (index, object) in objects.iter().enumerate() {
        if is_policy[index] {
            continue;
        }
        let subject = Subject::of(object);
        for c in &constraints {
            let severity = match c.action {
                Some(Action::Deny) => Severity::Error,
                Some(Action::Warn) => Severity::Warning,
                Some(Action::Dryrun) => Severity::Info,
                None => continue,
            };
            // A violation's rule is its Constraint; a Constraint that could not be evaluated
            // on the object is the plugin's own finding (rule `gatekeeper`), at the
            // Constraint's severity.
            let report = |message: String, rule: String| {
                let mut f = FindingBuilder::error(message)
                    .object(index, object)
                    .rule(rule)
                    .build();
                f.severity = severity;
                f
            };
            let violation = |m: String| {
                report(
                    format!("[{}] {m}", c.name),
                    format!("{}/{}", c.kind, c.name),
                )
            };
            let failure = |m: String| report(format!("[{}] {m}", c.name), "gatekeeper".into());
            match c
                .matching
                .matches(&subject, |ns| namespaces.get(ns).cloned())
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    found.push(failure(format!("match: {e}")));
                    continue;
                }
            }
            let template = templates
                .get_mut(&c.kind)
                .expect("constraints have templates");
            match template.violations(&review(object, &c.parameters)) {
                Ok(msgs) => found.extend(msgs.into_iter().map(violation)),
                Err(e) => found.push(failure(format!("evaluation failed: {e}"))),
            }
        }
    }
    found
}

/// Gatekeeper's input for reviewing `object`.
pub fn review(object: &Value, parameters: &Value) -> Value {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let mut review = json!({
        "kind": {"group": group, "version": version, "kind": object["kind"]},
        "object": object,
        "operation": "CREATE",
        "userInfo": {},
    });
    for (key, at) in [("name", "name"), ("namespace", "namespace")] {
        if let Some(v) = object["metadata"][at].as_str().filter(|v| !v.is_empty()) {
            review[key] = json!(v);
        }
    }
    json!({"review": review, "parameters": parameters})
}

/// The plugin, for [`sluice_plugin_sdk::export_validator!`].
pub struct Plugin;

impl Validator for Plugin {
    type Config = Config;

    fn check(config: &Config) -> Result<(), String> {
        let mut schemas = BTreeMap::new();
        for t in &config.templates {
            let t = Template::compile(t)?;
            schemas.insert(t.kind, t.parameters);
        }
        for c in &config.constraints {
            let c = Constraint::parse(c, &config.enforcement_points)?;
            if let Some(schema) = schemas.get(&c.kind) {
                policy::check_parameters(schema.as_ref(), &c.parameters)
                    .map_err(|e| format!("{} {}: {e}", c.kind, c.name))?;
            }
        }
        Ok(())
    }

    fn validate(config: &Config, _: &Context, objects: &[Value]) -> Vec<Finding> {
        validate(config, objects)
    }
}

#[cfg(target_arch = "wasm32")]
sluice_plugin_sdk::export_validator!(Plugin, "../../wit");

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED_LABELS: &str = r#"
package k8srequiredlabels

violation[{"msg": msg, "details": {"missing_labels": missing}}] {
  provided := {label | input.review.object.metadata.labels[label]}
  required := {label | label := input.parameters.labels[_]}
  missing := required - provided
  count(missing) > 0
  msg := sprintf("you must provide labels: %v", [missing])
}
"#;

    fn config(action: &str) -> Config {
        Config {
            templates: vec![
                json!({"apiVersion": "templates.gatekeeper.sh/v1", "kind": "ConstraintTemplate",
                "metadata": {"name": "k8srequiredlabels"},
                "spec": {"crd": {"spec": {"names": {"kind": "K8sRequiredLabels"},
                    "validation": {"openAPIV3Schema": {"type": "object", "properties": {"labels": {"type": "array", "items": {"type": "string"}}}}}}},
                    "targets": [{"target": "admission.k8s.gatekeeper.sh", "rego": REQUIRED_LABELS}]}}),
            ],
            constraints: vec![
                json!({"apiVersion": "constraints.gatekeeper.sh/v1beta1", "kind": "K8sRequiredLabels",
                "metadata": {"name": "must-have-owner"},
                "spec": {"enforcementAction": action,
                    "match": {"kinds": [{"apiGroups": ["apps"], "kinds": ["Deployment"]}], "excludedNamespaces": ["kube-*"]},
                    "parameters": {"labels": ["owner"]}}}),
            ],
            paths: vec!["/nonexistent-sluice-test".into()],
            ..Config::default()
        }
    }

    fn deployment(ns: &str, labels: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns, "labels": labels}})
    }

    #[test]
    fn a_violation_names_the_constraint_and_carries_the_policy_message() {
        let mut c = config("deny");
        c.paths.clear();
        let found = validate(
            &c,
            &[
                deployment("a", json!({})),
                deployment("a", json!({"owner": "x"})),
                deployment("kube-system", json!({})),
            ],
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].message,
            r#"[must-have-owner] you must provide labels: {"owner"}"#
        );
        assert_eq!(found[0].severity, Severity::Error);
        assert_eq!(
            found[0].rule.as_deref(),
            Some("K8sRequiredLabels/must-have-owner")
        );
        assert_eq!(found[0].object.as_ref().map(|o| o.index), Some(0));
    }

    #[test]
    fn enforcement_actions_set_the_severity() {
        let mut c = config("warn");
        c.paths.clear();
        assert_eq!(
            validate(&c, &[deployment("a", json!({}))])[0].severity,
            Severity::Warning
        );
        let mut c = config("dryrun");
        c.paths.clear();
        assert_eq!(
            validate(&c, &[deployment("a", json!({}))])[0].severity,
            Severity::Info
        );
    }

    #[test]
    fn a_named_path_that_is_missing_is_an_error() {
        let found = validate(&config("deny"), &[]);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].message.starts_with("/nonexistent-sluice-test: "),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn policies_in_the_commit_are_used_and_not_reviewed() {
        let c = config("deny");
        let objects = vec![
            c.templates[0].clone(),
            c.constraints[0].clone(),
            deployment("a", json!({})),
        ];
        let found = validate(&Config::default(), &objects);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].object.as_ref().map(|o| o.index), Some(2));
    }

    #[test]
    fn documents_start_at_their_first_line() {
        let text = "# a comment\na: 1\n---\n\n---\n# x\nb: 2\n";
        assert_eq!(
            documents(text).unwrap(),
            [(2, json!({"a": 1})), (7, json!({"b": 2}))]
        );
    }
}
