//! `sluice plugin test`: runs plugins on fixtures, without a cluster, and compares what they
//! report (and output) with what the fixtures expect. Two kinds of file, told apart by
//! their `kind`:
//!
//! - Gatekeeper's `Suite` (`test.gatekeeper.sh/v1alpha1`), unchanged, run with the
//!   first-party `gatekeeper` plugin (`--gatekeeper MODULE`): each test's template and
//!   constraint, each case's object and inventory, each assertion's `violations`
//!   (`yes`, `no` or a count) of violations whose message matches `message` (a regular
//!   expression), as `gator verify` counts them; `invalid: true` expects the template or
//!   constraint to be refused; `skip` skips.
//! - sluice's `PluginTest` (`sluice.dev/v1alpha1`): a chain (`plugins:`, the agent
//!   configuration's entries, modules relative to the file) and `cases`, each with
//!   `objects` (a file of manifests), the `findings` expected (all of them, any order; each
//!   entry's `severity`, `rule`, `object` (`Kind/name`) and `message` (a regular expression)
//!   must match one finding) and optionally the `output` expected (a file of manifests the
//!   chain's output must equal).
//!
//! Paths inside a file are relative to it. Directories are searched for `*.yaml` files of
//! either kind; other files are ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_agent::config;
use sluice_agent::decode;
use sluice_agent::select::SelectedFile;
use sluice_model::object::Object;
use sluice_wasm::{self as plugins, Finding, Mode, Runtime};

/// How to run.
#[derive(Debug, Default)]
pub struct Options {
    /// The gatekeeper plugin's module, for Suites.
    pub gatekeeper: Option<PathBuf>,
}

/// One case's result.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// The test file.
    pub file: String,
    /// The test's name.
    pub test: String,
    /// The case's name (empty for a test-level result such as `invalid`).
    pub case: String,
    /// `pass`, `fail` or `skip`.
    pub result: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Runs every test file under `paths`.
///
/// # Errors
/// A path that cannot be read, or a Suite without `--gatekeeper`; a malformed test file is a
/// failed result, not an error.
pub fn run(paths: &[PathBuf], opts: &Options) -> Result<Vec<CaseResult>, String> {
    let runtime = Runtime::for_cli()?;
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    if files.is_empty() {
        return Err("no Suite or PluginTest files found".into());
    }
    let mut out = Vec::new();
    for (file, doc) in files {
        let shown = file.display().to_string();
        let failed = |message: String| CaseResult {
            file: shown.clone(),
            test: String::new(),
            case: String::new(),
            result: "fail",
            message: Some(message),
        };
        let results = match doc["kind"].as_str() {
            Some("Suite") => {
                let Some(module) = &opts.gatekeeper else {
                    return Err(format!(
                        "{shown}: a Gatekeeper Suite needs the gatekeeper plugin: --gatekeeper MODULE"
                    ));
                };
                let bytes =
                    std::fs::read(module).map_err(|e| format!("{}: {e}", module.display()))?;
                serde_json::from_value::<Suite>(doc)
                    .map_err(|e| format!("not a Suite: {e}"))
                    .map(|s| suite(&runtime, &bytes, &file, &s))
            }
            _ => serde_json::from_value::<PluginTest>(doc)
                .map_err(|e| format!("not a PluginTest: {e}"))
                .map(|t| plugin_test(&runtime, &file, &t)),
        };
        match results {
            Ok(r) => out.extend(r),
            Err(e) => out.push(failed(e)),
        }
    }
    Ok(out)
}

/// The test files at `path`: the file itself, or the `*.yaml` files of either kind below a
/// directory, in name order (walked as the CLI walks a local configuration's files).
fn collect(path: &Path, out: &mut Vec<(PathBuf, Value)>) -> Result<(), String> {
    let shown = path.display();
    if path.is_dir() {
        for rel in sluice_agent::agent::local_files(path, "")? {
            let p = path.join(rel);
            if p.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && let Ok(text) = std::fs::read_to_string(&p)
                && let Ok(doc) = serde_saphyr::from_str::<Value>(&text)
                && is_test(&doc)
            {
                out.push((p, doc));
            }
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    let doc: Value = serde_saphyr::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
    if !is_test(&doc) {
        return Err(format!(
            "{shown}: neither a Gatekeeper Suite (test.gatekeeper.sh/v1alpha1) nor a PluginTest (sluice.dev/v1alpha1)"
        ));
    }
    out.push((path.to_path_buf(), doc));
    Ok(())
}

fn is_test(doc: &Value) -> bool {
    matches!(
        (doc["apiVersion"].as_str(), doc["kind"].as_str()),
        (Some("test.gatekeeper.sh/v1alpha1"), Some("Suite"))
            | (Some("sluice.dev/v1alpha1"), Some("PluginTest"))
    )
}

/// The manifests of a file, decoded as the agent decodes a project's files, except that
/// an object needs no name (`gator verify` reviews objects without one).
fn objects(base: &Path, rel: &str) -> Result<Vec<Object>, String> {
    let path = base.join(rel);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = SelectedFile {
        path: rel.to_string(),
        bytes,
        renderer: None,
    };
    decode::decode_fixture(&file).map_err(|e| e.to_string())
}

/// Runs `chain` over `objects`, validators in audit mode so every finding comes back; a
/// refusal (a transformer's or a KRM function's error results) is its findings and no
/// output.
fn run_chain(
    chain: &[Arc<plugins::Plugin>],
    objects: Vec<Object>,
) -> Result<plugins::Outcome, String> {
    let subject = plugins::Subject {
        agent: "sluice-plugin-test".into(),
        project: "test".into(),
        commit: "fixture".into(),
    };
    match plugins::run(chain, &subject, objects) {
        Ok(outcome) => Ok(outcome),
        Err(plugins::Error::Denied(findings)) => Ok(plugins::Outcome {
            findings,
            ..plugins::Outcome::default()
        }),
        Err(e) => Err(e.to_string()),
    }
}

// ---- Gatekeeper Suites ----

#[derive(Debug, Deserialize)]
struct Suite {
    #[serde(default)]
    tests: Vec<SuiteTest>,
    #[serde(default)]
    skip: bool,
}

#[derive(Debug, Deserialize)]
struct SuiteTest {
    #[serde(default)]
    name: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    constraint: String,
    #[serde(default)]
    cases: Vec<SuiteCase>,
    #[serde(default)]
    expansion: String,
    #[serde(default)]
    invalid: bool,
    #[serde(default)]
    skip: bool,
}

#[derive(Debug, Deserialize)]
struct SuiteCase {
    #[serde(default)]
    name: String,
    #[serde(default)]
    object: String,
    #[serde(default)]
    inventory: Vec<String>,
    #[serde(default)]
    assertions: Vec<Assertion>,
    #[serde(default)]
    skip: bool,
}

#[derive(Debug, Deserialize)]
struct Assertion {
    violations: Option<Value>,
    message: Option<String>,
}

fn one_object(base: &Path, rel: &str) -> Result<Value, String> {
    let mut found = objects(base, rel)?;
    match found.len() {
        1 => Ok(found.remove(0).value()),
        n => Err(format!("{rel}: expected exactly one object, found {n}")),
    }
}

fn gatekeeper(
    runtime: &Runtime,
    module: &[u8],
    config: Value,
) -> Result<Arc<plugins::Plugin>, String> {
    let spec = plugins::Spec {
        name: "gatekeeper".into(),
        config,
        mode: Mode::Audit,
        limits: plugins::Limits {
            timeout: std::time::Duration::from_secs(30),
            ..plugins::Limits::default()
        },
        ..plugins::Spec::default()
    };
    runtime
        .load(&spec, module)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn suite(runtime: &Runtime, module: &[u8], file: &Path, s: &Suite) -> Vec<CaseResult> {
    let base = file.parent().unwrap_or(Path::new("."));
    let shown = file.display().to_string();
    let result = |test: &str, case: &str, outcome: Result<bool, String>| CaseResult {
        file: shown.clone(),
        test: test.to_string(),
        case: case.to_string(),
        result: match &outcome {
            Ok(true) => "pass",
            Ok(false) => "skip",
            Err(_) => "fail",
        },
        message: outcome.err(),
    };
    let mut out = Vec::new();
    for t in &s.tests {
        if s.skip || t.skip {
            out.push(result(&t.name, "", Ok(false)));
            continue;
        }
        if !t.expansion.is_empty() {
            let e = format!(
                "expansion {}: Gatekeeper's ExpansionTemplates are not supported by sluice",
                t.expansion
            );
            out.push(result(&t.name, "", Err(e)));
            continue;
        }
        let policies = one_object(base, &t.template)
            .and_then(|template| Ok((template, one_object(base, &t.constraint)?)));
        let (template, constraint) = match policies {
            Ok(p) => p,
            Err(e) => {
                out.push(result(&t.name, "", Err(e)));
                continue;
            }
        };
        let config = |inventory: Vec<Value>| {
            // gator's enforcement point, so scoped enforcement actions resolve as gator's.
            json!({"templates": [template], "constraints": [constraint],
                "inventory": inventory, "inventory_from_objects": false,
                "enforcement_points": ["gator.gatekeeper.sh"]})
        };
        if t.invalid {
            let outcome = match gatekeeper(runtime, module, config(Vec::new())) {
                Err(_) => Ok(true),
                Ok(_) => Err(
                    "expected the template or the constraint to be refused; both were accepted"
                        .into(),
                ),
            };
            out.push(result(&t.name, "", outcome));
            continue;
        }
        for c in &t.cases {
            if c.skip {
                out.push(result(&t.name, &c.name, Ok(false)));
                continue;
            }
            out.push(result(
                &t.name,
                &c.name,
                case(runtime, module, base, &config, c).map(|()| true),
            ));
        }
    }
    out
}

fn case(
    runtime: &Runtime,
    module: &[u8],
    base: &Path,
    config: &dyn Fn(Vec<Value>) -> Value,
    c: &SuiteCase,
) -> Result<(), String> {
    if c.object.is_empty() {
        return Err("the case names no object".into());
    }
    if c.assertions.is_empty() {
        return Err("the case has no assertions".into());
    }
    let object = objects(base, &c.object)?;
    if object.len() != 1 {
        return Err(format!(
            "{}: expected exactly one object, found {}",
            c.object,
            object.len()
        ));
    }
    let mut inventory = Vec::new();
    for rel in &c.inventory {
        inventory.extend(objects(base, rel)?.into_iter().map(|o| o.value()));
    }
    let plugin = gatekeeper(runtime, module, config(inventory))?;
    let outcome = run_chain(&[plugin], object)?;
    let mut messages = Vec::new();
    for f in &outcome.findings {
        // The plugin's own findings (a policy that did not load or could not be
        // evaluated) are errors of the case, as gator's are.
        if f.rule.as_deref() == Some("gatekeeper") {
            return Err(f.message.clone());
        }
        // `[<constraint>] <msg>`: the policy's own message is what assertions match.
        let msg = f
            .message
            .split_once("] ")
            .map_or(f.message.as_str(), |(_, m)| m);
        messages.push(msg.to_string());
    }
    for a in &c.assertions {
        let pattern = match &a.message {
            Some(m) => Some(regex::Regex::new(m).map_err(|e| format!("message {m:?}: {e}"))?),
            None => None,
        };
        let matching = messages
            .iter()
            .filter(|m| pattern.as_ref().is_none_or(|p| p.is_match(m)))
            .count();
        let containing = a
            .message
            .as_ref()
            .map(|m| format!(" containing {m:?}"))
            .unwrap_or_default();
        // YAML 1.1 reads a bare `yes`/`no` as a boolean; gator means the words.
        let want = match a.violations.clone() {
            None | Some(Value::Bool(true)) => json!("yes"),
            Some(Value::Bool(false)) => json!("no"),
            Some(v) => v,
        };
        let ok = match &want {
            Value::String(s) if s == "yes" => matching > 0,
            Value::String(s) if s == "no" => matching == 0,
            Value::Number(n) if n.as_u64().is_some() => n.as_u64() == Some(matching as u64),
            other => {
                return Err(format!(
                    "assertion violations {other}: must be a nonnegative integer, \"yes\", or \"no\""
                ));
            }
        };
        if !ok {
            let wanted = match &want {
                Value::String(s) if s == "yes" => "at least 1".to_string(),
                Value::String(_) => "none".to_string(),
                n => format!("exactly {n}"),
            };
            return Err(format!(
                "got {matching} violations{containing} but want {wanted}: got messages {messages:?}"
            ));
        }
    }
    Ok(())
}

// ---- sluice PluginTests ----

#[derive(Debug, Deserialize)]
struct PluginTest {
    metadata: Option<Value>,
    plugins: Vec<Value>,
    #[serde(default)]
    cases: Vec<PluginCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginCase {
    name: String,
    objects: String,
    #[serde(default)]
    findings: Vec<Expected>,
    output: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    severity: Option<String>,
    rule: Option<String>,
    object: Option<String>,
    message: Option<String>,
}

fn plugin_test(runtime: &Runtime, file: &Path, t: &PluginTest) -> Vec<CaseResult> {
    let base = file.parent().unwrap_or(Path::new("."));
    let shown = file.display().to_string();
    let name = t
        .metadata
        .as_ref()
        .and_then(|m| m["name"].as_str())
        .unwrap_or_default()
        .to_string();
    let result = |case: &str, outcome: Result<(), String>| CaseResult {
        file: shown.clone(),
        test: name.clone(),
        case: case.to_string(),
        result: if outcome.is_ok() { "pass" } else { "fail" },
        message: outcome.err(),
    };
    let chain = match load_chain(runtime, base, &shown, &t.plugins) {
        Ok(c) => c,
        Err(e) => return vec![result("", Err(e))],
    };
    t.cases
        .iter()
        .map(|c| result(&c.name, plugin_case(&chain, base, c)))
        .collect()
}

/// The chain of a PluginTest, parsed as the agent parses `plugins:` and loaded in audit
/// mode.
fn load_chain(
    runtime: &Runtime,
    base: &Path,
    shown: &str,
    entries: &[Value],
) -> Result<Vec<Arc<plugins::Plugin>>, String> {
    let text = json!({"plugins": entries}).to_string();
    let cfg = config::parse_with_origin(&text, "test", shown).map_err(|e| e.to_string())?;
    cfg.plugins
        .iter()
        .map(|spec| {
            let mut spec = spec.clone();
            spec.mode = Mode::Audit;
            spec.granted = sluice_agent::agent::grant_local_files(
                &spec,
                base,
                &sluice_model::default_cache_dir(),
            )?;
            let path = base.join(&spec.module);
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            runtime
                .load(&spec, &bytes)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn plugin_case(chain: &[Arc<plugins::Plugin>], base: &Path, c: &PluginCase) -> Result<(), String> {
    let outcome = run_chain(chain, objects(base, &c.objects)?)?;
    let mut unmatched: Vec<&Finding> = outcome.findings.iter().collect();
    for e in &c.findings {
        let pattern = match &e.message {
            Some(m) => Some(regex::Regex::new(m).map_err(|err| format!("message {m:?}: {err}"))?),
            None => None,
        };
        let hit = unmatched.iter().position(|f| {
            e.severity.as_deref().is_none_or(|s| s == f.severity)
                && e.rule
                    .as_deref()
                    .is_none_or(|r| f.rule.as_deref() == Some(r))
                && e.object.as_deref().is_none_or(|o| {
                    f.object
                        .as_ref()
                        .is_some_and(|r| format!("{}/{}", r.kind, r.name) == o)
                })
                && pattern.as_ref().is_none_or(|p| p.is_match(&f.message))
        });
        match hit {
            Some(i) => {
                unmatched.remove(i);
            }
            None => {
                return Err(format!(
                    "no finding matches {e:?}; found: {}",
                    listing(&outcome.findings)
                ));
            }
        }
    }
    if !unmatched.is_empty() {
        return Err(format!(
            "unexpected findings: {}",
            listing(&unmatched.into_iter().cloned().collect::<Vec<_>>())
        ));
    }
    if let Some(rel) = &c.output {
        let want: Vec<Value> = objects(base, rel)?.iter().map(Object::value).collect();
        let got: Vec<Value> = outcome.objects.iter().map(Object::value).collect();
        if want != got {
            let show = |v: &[Value]| serde_json::to_string_pretty(v).unwrap_or_default();
            let (want, got) = (show(&want), show(&got));
            let diff = similar::TextDiff::from_lines(&want, &got)
                .unified_diff()
                .header(rel, "output")
                .to_string();
            return Err(format!("the output differs from {rel}:\n{diff}"));
        }
    }
    Ok(())
}

fn listing(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "none".into();
    }
    findings
        .iter()
        .map(|f| format!("[{}] {}", f.severity, f.message))
        .collect::<Vec<_>>()
        .join("; ")
}
