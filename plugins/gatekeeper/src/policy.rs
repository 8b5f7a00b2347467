//! ConstraintTemplates compiled with regorus, and the Constraints that use them.
//!
//! A template is checked as Gatekeeper checks it: its name is its CRD kind in lower case,
//! it has one target, `admission.k8s.gatekeeper.sh`, its Rego parses and declares
//! `violation`, and its `libs` are packages under `lib`. The Rego is `targets[0].rego`
//! (Rego v0, as Gatekeeper reads it) or, when absent, a `code` entry with `engine: Rego`
//! (`source.version: v1` reads Rego v1). A template with only CEL
//! (`K8sNativeValidation`) is reported as not supported.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::matching::Match;

/// Where a policy object came from: a file and line, or an object of the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// A file the plugin read: path and 1-based line of the document.
    File(String, u32),
    /// The commit's object at this index.
    Object(usize),
}

impl std::fmt::Display for From {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            From::File(path, line) => write!(f, "{path}:{line}"),
            From::Object(i) => write!(f, "object {i} of the commit"),
        }
    }
}

/// A compiled ConstraintTemplate.
#[derive(Clone)]
pub struct Template {
    /// `metadata.name`.
    pub name: String,
    /// The Constraint kind it defines.
    pub kind: String,
    /// The engine with the template's Rego and libs loaded.
    pub engine: regorus::Engine,
    /// `data.<package>.violation`.
    pub rule: String,
    /// `spec.crd.spec.validation.openAPIV3Schema`: the schema of its Constraints'
    /// `spec.parameters`.
    pub parameters: Option<Value>,
}

/// What a Constraint asks for when it finds a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Reported only (Gatekeeper's audit).
    Dryrun,
    /// Reported as a warning, applied.
    Warn,
    /// Refuses the commit.
    Deny,
}

/// A Constraint.
#[derive(Debug, Clone)]
pub struct Constraint {
    /// Its kind (the template's).
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.match`.
    pub matching: Match,
    /// `spec.parameters` (`{}` when none).
    pub parameters: Value,
    /// `spec.enforcementAction`, resolved; none when a `scoped` one names none of the
    /// enforcement points the plugin stands for (the constraint is not enforced here).
    pub action: Option<Action>,
}

/// The target every template must name.
pub const TARGET: &str = "admission.k8s.gatekeeper.sh";

/// Whether `object` is a ConstraintTemplate.
pub fn is_template(object: &Value) -> bool {
    object["kind"] == "ConstraintTemplate"
        && object["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("templates.gatekeeper.sh/"))
}

/// Whether `object` is a Constraint.
pub fn is_constraint(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("constraints.gatekeeper.sh/"))
}

impl Template {
    /// Compiles a ConstraintTemplate.
    ///
    /// # Errors
    /// What Gatekeeper would refuse it for, with the Rego parser's line and column.
    pub fn compile(object: &Value) -> Result<Template, String> {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let kind = object["spec"]["crd"]["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if kind.is_empty() {
            return Err(format!(
                "ConstraintTemplate {name:?}: spec.crd.spec.names.kind is required"
            ));
        }
        if name != kind.to_lowercase() {
            return Err(format!(
                "ConstraintTemplate {name:?}: its name must be its kind in lower case ({:?})",
                kind.to_lowercase()
            ));
        }
        let at = |what: String| format!("ConstraintTemplate {name}: {what}");
        let targets = object["spec"]["targets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let [target] = targets.as_slice() else {
            return Err(at(format!(
                "expected exactly one target, found {}",
                targets.len()
            )));
        };
        if target["target"] != TARGET {
            return Err(at(format!(
                "target {} is not supported; only {TARGET}",
                target["target"]
            )));
        }
        let (rego, libs, v0) = source(target).ok_or_else(|| {
            let cel = target["code"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["engine"] == "K8sNativeValidation");
            at(if cel {
                "only CEL (K8sNativeValidation) code: sluice evaluates Rego, not CEL".into()
            } else {
                "no Rego (targets[0].rego or a code entry with engine Rego)".into()
            })
        })?;
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(v0);
        if v0 {
            deprecated_builtins(&mut engine).map_err(|e| at(format!("rego: {e}")))?;
        }
        // Gatekeeper's rego drivers raise built-in errors as evaluation errors.
        engine.set_strict_builtin_errors(false);
        let path = format!("{name}.rego");
        let package = engine
            .add_policy(path.clone(), rego)
            .map_err(|e| at(format!("rego: {}", one_line(&e))))?;
        for (i, lib) in libs.into_iter().enumerate() {
            let lib_path = format!("{name}.libs[{i}].rego");
            let pkg = engine
                .add_policy(lib_path, lib)
                .map_err(|e| at(format!("libs[{i}]: {}", one_line(&e))))?;
            if !(pkg == "data.lib" || pkg.starts_with("data.lib.")) {
                return Err(at(format!(
                    "libs[{i}]: package {} must be under lib",
                    pkg.trim_start_matches("data.")
                )));
            }
        }
        let declares = engine
            .has_declared_rule_rooted_at(&path, "violation")
            .map_err(|e| at(format!("rego: {e}")))?;
        if !declares {
            return Err(at("rego: no violation rule".into()));
        }
        let parameters = object["spec"]["crd"]["spec"]["validation"]["openAPIV3Schema"].clone();
        Ok(Template {
            name,
            kind,
            engine,
            rule: format!("{package}.violation"),
            parameters: (!parameters.is_null()).then_some(parameters),
        })
    }

    /// The violations of one review: each a message (`msg`) and the Rego's `details`.
    ///
    /// # Errors
    /// An evaluation error (a conflict, a built-in's error), or a violation without `msg`.
    pub fn violations(&mut self, input: &Value) -> Result<Vec<String>, String> {
        let input = regorus::Value::from_json_str(&input.to_string()).map_err(|e| e.to_string())?;
        self.engine.set_input(input);
        let result = self
            .engine
            .eval_rule(self.rule.clone())
            .map_err(|e| e.to_string())?;
        let items: Vec<regorus::Value> = match &result {
            regorus::Value::Undefined => Vec::new(),
            regorus::Value::Set(s) => s.iter().cloned().collect(),
            regorus::Value::Array(a) => a.iter().cloned().collect(),
            other => return Err(format!("violation is not a set: {other}")),
        };
        items
            .into_iter()
            .map(|v| match &v["msg"] {
                regorus::Value::String(s) => Ok(s.to_string()),
                regorus::Value::Undefined => Err(format!("a violation without msg: {v}")),
                other => Ok(other.to_string()),
            })
            .collect()
    }
}

/// Checks a Constraint's `spec.parameters` against its template's schema as the API server
/// checks a Constraint against the CRD Gatekeeper makes of it (and `gator` does): a field the
/// schema does not declare is unknown (no schema at all declares none), and a value of another
/// type than declared is invalid.
///
/// # Errors
/// Every problem, Kubernetes-style: `unknown fields: [spec.parameters.x]`,
/// `spec.parameters.y: must be of type integer`.
pub fn check_parameters(schema: Option<&Value>, parameters: &Value) -> Result<(), String> {
    let mut unknown = Vec::new();
    let mut invalid = Vec::new();
    let empty = parameters.is_null() || parameters.as_object().is_some_and(|m| m.is_empty());
    match schema {
        None if !empty => unknown.push("spec.parameters".to_string()),
        None => {}
        Some(s) => walk_schema(s, parameters, "spec.parameters", &mut unknown, &mut invalid),
    }
    if !unknown.is_empty() {
        invalid.insert(0, format!("unknown fields: [{}]", unknown.join(", ")));
    }
    match invalid.is_empty() {
        true => Ok(()),
        false => Err(format!("invalid Constraint: {}", invalid.join("; "))),
    }
}

fn walk_schema(
    schema: &Value,
    value: &Value,
    at: &str,
    unknown: &mut Vec<String>,
    invalid: &mut Vec<String>,
) {
    if value.is_null() || schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    let fits = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !fits {
        invalid.push(format!(
            "{at}: must be of type {}",
            schema["type"].as_str().unwrap_or("?")
        ));
        return;
    }
    if let (Some(map), Some(props)) = (value.as_object(), schema["properties"].as_object()) {
        for (k, v) in map {
            match props.get(k) {
                Some(s) => walk_schema(s, v, &format!("{at}.{k}"), unknown, invalid),
                None if schema.get("additionalProperties").is_some() => {}
                None => unknown.push(format!("{at}.{k}")),
            }
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            walk_schema(schema, v, &format!("{at}[{i}]"), unknown, invalid);
        }
    }
}

/// OPA's built-ins deprecated in Rego v0 and gone from v1, which regorus does not have but
/// Gatekeeper (OPA v1 in v0 mode) still runs: the gatekeeper-library's older templates call
/// `re_match` and `any`/`all`.
fn deprecated_builtins(engine: &mut regorus::Engine) -> anyhow::Result<()> {
    use regorus::Value as V;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    fn items(v: &V) -> anyhow::Result<Vec<V>> {
        match v {
            V::Array(a) => Ok(a.iter().cloned().collect()),
            V::Set(s) => Ok(s.iter().cloned().collect()),
            other => anyhow::bail!("expected an array or a set, got {other}"),
        }
    }
    fn string(v: &V) -> anyhow::Result<&str> {
        match v {
            V::String(s) => Ok(s),
            other => anyhow::bail!("expected a string, got {other}"),
        }
    }
    // Compiled once per pattern: policies call it in loops over `data.inventory`.
    let compiled: Arc<Mutex<HashMap<String, regex::Regex>>> = Arc::default();
    engine.add_extension(
        "re_match".into(),
        2,
        Box::new(move |a: Vec<V>| {
            let pattern = string(&a[0])?;
            let mut cache = compiled
                .lock()
                .map_err(|_| anyhow::anyhow!("regex cache poisoned"))?;
            if !cache.contains_key(pattern) {
                if cache.len() >= 256 {
                    cache.clear();
                }
                cache.insert(pattern.to_string(), regex::Regex::new(pattern)?);
            }
            Ok(V::from(cache[pattern].is_match(string(&a[1])?)))
        }),
    )?;
    engine.add_extension(
        "any".into(),
        1,
        Box::new(|a: Vec<V>| Ok(V::from(items(&a[0])?.iter().any(|v| *v == V::from(true))))),
    )?;
    engine.add_extension(
        "all".into(),
        1,
        Box::new(|a: Vec<V>| Ok(V::from(items(&a[0])?.iter().all(|v| *v == V::from(true))))),
    )?;
    engine.add_extension(
        "set_diff".into(),
        2,
        Box::new(|a: Vec<V>| {
            let drop = items(&a[1])?;
            Ok(V::from(
                items(&a[0])?
                    .into_iter()
                    .filter(|v| !drop.contains(v))
                    .collect::<std::collections::BTreeSet<V>>(),
            ))
        }),
    )?;
    engine.add_extension(
        "cast_array".into(),
        1,
        Box::new(|a: Vec<V>| Ok(V::from(items(&a[0])?))),
    )?;
    engine.add_extension(
        "cast_set".into(),
        1,
        Box::new(|a: Vec<V>| {
            Ok(V::from(
                items(&a[0])?
                    .into_iter()
                    .collect::<std::collections::BTreeSet<V>>(),
            ))
        }),
    )?;
    Ok(())
}

/// regorus's parse error (`--> file:line:col`, the source line, a caret, `error: what`) on
/// one line: `line L column C: what`.
fn one_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let at = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("--> "))
        .and_then(|l| {
            let mut parts = l.rsplitn(3, ':');
            let col = parts.next()?;
            let line = parts.next()?;
            Some(format!("line {line} column {col}: "))
        })
        .unwrap_or_default();
    let what = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .unwrap_or(text.trim());
    format!("{at}{what}")
}

/// The Rego of a target, its libs, and whether it is Rego v0.
fn source(target: &Value) -> Option<(String, Vec<String>, bool)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    if let Some(rego) = target["rego"].as_str().filter(|r| !r.trim().is_empty()) {
        return Some((rego.to_string(), strings(&target["libs"]), true));
    }
    let code = target["code"]
        .as_array()?
        .iter()
        .find(|c| c["engine"] == "Rego")?;
    let src = &code["source"];
    let rego = src["rego"].as_str()?.to_string();
    Some((rego, strings(&src["libs"]), src["version"] != "v1"))
}

impl Constraint {
    /// Reads a Constraint; `points` are the enforcement points a `scoped` action is
    /// resolved for.
    ///
    /// # Errors
    /// A malformed `match`, or an enforcement action Gatekeeper does not know.
    pub fn parse(object: &Value, points: &[String]) -> Result<Constraint, String> {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let at = |what: String| format!("{kind} {name}: {what}");
        let spec = &object["spec"];
        let matching: Match = match &spec["match"] {
            Value::Null => Match::default(),
            m => serde_json::from_value(m.clone()).map_err(|e| at(format!("spec.match: {e}")))?,
        };
        let action = match spec["enforcementAction"].as_str().unwrap_or("deny") {
            "" | "deny" => Some(Action::Deny),
            "warn" => Some(Action::Warn),
            "dryrun" => Some(Action::Dryrun),
            "scoped" => scoped(&spec["scopedEnforcementActions"], points),
            other => return Err(at(format!("unrecognized enforcementAction {other:?}"))),
        };
        let parameters = match &spec["parameters"] {
            Value::Null => Value::Object(Default::default()),
            p => p.clone(),
        };
        Ok(Constraint {
            kind,
            name,
            matching,
            parameters,
            action,
        })
    }
}

/// The most severe of the scoped actions whose enforcement points include one of `points`
/// (or `*`).
fn scoped(actions: &Value, points: &[String]) -> Option<Action> {
    actions
        .as_array()?
        .iter()
        .filter(|a| {
            a["enforcementPoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| {
                    p["name"]
                        .as_str()
                        .is_some_and(|n| n == "*" || points.iter().any(|x| x == n))
                })
        })
        .filter_map(|a| match a["action"].as_str()? {
            "deny" => Some(Action::Deny),
            "warn" => Some(Action::Warn),
            "dryrun" => Some(Action::Dryrun),
            _ => None,
        })
        .max()
}

/// Gatekeeper's `data.inventory`: cluster-scoped objects at
/// `cluster[<apiVersion>][<kind>][<name>]`, namespaced ones at
/// `namespace[<namespace>][<apiVersion>][<kind>][<name>]`.
pub fn inventory<'a>(objects: impl IntoIterator<Item = &'a Value>) -> Value {
    /// apiVersion → kind → name → object.
    type ByKind = BTreeMap<String, BTreeMap<String, serde_json::Map<String, Value>>>;
    let mut cluster: ByKind = BTreeMap::new();
    let mut namespaced: BTreeMap<String, ByKind> = BTreeMap::new();
    for o in objects {
        let (Some(api), Some(kind), Some(name)) = (
            o["apiVersion"].as_str(),
            o["kind"].as_str(),
            o["metadata"]["name"].as_str(),
        ) else {
            continue;
        };
        let by_kind = match o["metadata"]["namespace"]
            .as_str()
            .filter(|n| !n.is_empty())
        {
            Some(ns) => namespaced
                .entry(ns.to_string())
                .or_default()
                .entry(api.to_string())
                .or_default(),
            None => cluster.entry(api.to_string()).or_default(),
        };
        by_kind
            .entry(kind.to_string())
            .or_default()
            .insert(name.to_string(), o.clone());
    }
    serde_json::json!({"inventory": {"cluster": cluster, "namespace": namespaced}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(rego: &str) -> Value {
        json!({"apiVersion": "templates.gatekeeper.sh/v1", "kind": "ConstraintTemplate",
            "metadata": {"name": "k8sdemo"},
            "spec": {"crd": {"spec": {"names": {"kind": "K8sDemo"}}},
                "targets": [{"target": TARGET, "rego": rego}]}})
    }

    #[test]
    fn a_template_evaluates_its_violations() {
        let mut t = Template::compile(&template(
            "package k8sdemo\nviolation[{\"msg\": msg}] {\n  input.review.object.metadata.name == input.parameters.name\n  msg := sprintf(\"%v is taken\", [input.parameters.name])\n}",
        ))
        .unwrap();
        assert_eq!(t.rule, "data.k8sdemo.violation");
        let input =
            json!({"review": {"object": {"metadata": {"name": "a"}}}, "parameters": {"name": "a"}});
        assert_eq!(t.violations(&input).unwrap(), ["a is taken"]);
        let input =
            json!({"review": {"object": {"metadata": {"name": "b"}}}, "parameters": {"name": "a"}});
        assert!(t.violations(&input).unwrap().is_empty());
    }

    #[test]
    fn a_bad_template_is_refused_naming_why() {
        let err = Template::compile(&template(
            "package k8sdemo\nviolation[{\"msg\": msg}] {\n  msg := \n}",
        ))
        .err()
        .unwrap();
        assert_eq!(
            err,
            "ConstraintTemplate k8sdemo: rego: line 2 column 25: expecting }"
        );
        let err = Template::compile(&template("package k8sdemo\ndeny[msg] { msg := \"x\" }"))
            .err()
            .unwrap();
        assert_eq!(err, "ConstraintTemplate k8sdemo: rego: no violation rule");
        let mut t = template("package k8sdemo\nviolation[{\"msg\": \"x\"}] { true }");
        t["metadata"]["name"] = json!("other");
        let err = Template::compile(&t).err().unwrap();
        assert!(err.contains("must be its kind in lower case"), "{err}");
    }

    #[test]
    fn enforcement_actions_resolve_like_gatekeeper() {
        let admission = ["validation.gatekeeper.sh".to_string()];
        let parse = |spec: Value, points: &[String]| {
            Constraint::parse(
                &json!({"kind": "K8sDemo", "metadata": {"name": "c"}, "spec": spec}),
                points,
            )
        };
        let c = |spec: Value| parse(spec, &admission);
        assert_eq!(c(json!({})).unwrap().action, Some(Action::Deny));
        let warn = json!({"enforcementAction": "warn"});
        assert_eq!(c(warn).unwrap().action, Some(Action::Warn));
        let dryrun = json!({"enforcementAction": "dryrun"});
        assert_eq!(c(dryrun).unwrap().action, Some(Action::Dryrun));
        let scoped = json!({"enforcementAction": "scoped", "scopedEnforcementActions": [
            {"action": "warn", "enforcementPoints": [{"name": "validation.gatekeeper.sh"}]},
            {"action": "deny", "enforcementPoints": [{"name": "audit.gatekeeper.sh"}]}]});
        assert_eq!(c(scoped.clone()).unwrap().action, Some(Action::Warn));
        let gator = ["gator.gatekeeper.sh".to_string()];
        assert_eq!(
            parse(scoped, &gator).unwrap().action,
            None,
            "not enforced there"
        );
        assert_eq!(
            c(json!({"enforcementAction": "block"})).err().unwrap(),
            "K8sDemo c: unrecognized enforcementAction \"block\""
        );
    }

    #[test]
    fn parameters_are_checked_against_the_templates_schema() {
        let schema = json!({"type": "object", "properties": {
            "labels": {"type": "array", "items": {"type": "string"}},
            "max": {"type": "integer"}}});
        assert_eq!(
            check_parameters(Some(&schema), &json!({"labels": ["a"], "max": 3})),
            Ok(())
        );
        assert_eq!(
            check_parameters(
                Some(&schema),
                &json!({"labels": [1], "max": "3", "extra": true})
            ),
            Err(
                "invalid Constraint: unknown fields: [spec.parameters.extra]; \
                 spec.parameters.labels[0]: must be of type string; \
                 spec.parameters.max: must be of type integer"
                    .into()
            )
        );
        assert_eq!(
            check_parameters(None, &json!({"foo": "bar"})),
            Err("invalid Constraint: unknown fields: [spec.parameters]".into())
        );
        assert_eq!(check_parameters(None, &json!({})), Ok(()));
    }

    #[test]
    fn the_inventory_is_keyed_as_gatekeeper_keys_it() {
        let objs = [
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i", "namespace": "a"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
        ];
        let inv = inventory(&objs);
        assert_eq!(
            inv["inventory"]["namespace"]["a"]["networking.k8s.io/v1"]["Ingress"]["i"]["kind"],
            "Ingress"
        );
        assert_eq!(
            inv["inventory"]["cluster"]["v1"]["Namespace"]["a"]["metadata"]["name"],
            "a"
        );
    }
}
