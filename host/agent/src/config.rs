//! The agent configuration: agentk's `.gitlab/agents/<name>/config.yaml`, read strictly.
//!
//! Every key of agentk's `gitops.manifest_projects[]` is honoured with agentk's defaults
//! (`docs/configuration.md` lists them). agentk's other top-level sections (`ci_access`,
//! `user_access`, `remote_development`, `container_scanning`, `flux`) are accepted and
//! ignored, so existing files load unchanged; [`AgentConfig::ignored_sections`] names them so
//! the caller can warn once each. Unknown keys and invalid values are errors that name the
//! key and the line.
//!
//! ```
//! let config = sluice_agent::config::parse(
//!     "gitops:\n  manifest_projects:\n  - id: group/app\n    default_namespace: apps\n",
//!     "group/agent-config",
//! )
//! .unwrap();
//! assert_eq!(config.manifest_projects[0].id, "group/app");
//! assert_eq!(config.manifest_projects[0].paths, ["**/*.{yaml,yml,json}"]);
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;
pub use sluice_model::policy::{DryRunStrategy, InventoryPolicy, PropagationPolicy};

/// agentk's limit on the size of a configuration file (kas `max_configuration_file_size`).
pub const MAX_CONFIG_BYTES: usize = 128 * 1024;

/// The glob agentk uses when a manifest project lists no paths.
pub const DEFAULT_GLOB: &str = "**/*.{yaml,yml,json}";

/// A configuration that could not be loaded. Not retryable: the file must change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML is malformed, a key is unknown or a value is invalid.
    #[error("failed to parse agent configuration {origin}: {message}")]
    Invalid {
        /// Where the configuration came from (file path or repository and commit).
        origin: String,
        /// What is wrong, with the key and line.
        message: String,
    },
    /// The file is larger than agentk's limit.
    #[error(
        "failed to parse agent configuration {origin}: file is {size} bytes, the limit is {MAX_CONFIG_BYTES}"
    )]
    TooBig {
        /// Where the configuration came from.
        origin: String,
        /// Its size in bytes.
        size: usize,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A loaded agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// `gitops.manifest_projects[]`, with defaults applied.
    pub manifest_projects: Vec<ManifestProject>,
    /// `observability.logging.level` (default `info`).
    pub log_level: LogLevel,
    /// agentk sections present in the file that sluice accepts and ignores.
    pub ignored_sections: Vec<&'static str>,
    /// `plugins:` (sluice's own section): every plugin, in the order transformers run.
    pub plugins: Vec<sluice_wasm::Spec>,
    /// Per plugin whose module comes from a registry: the file of the public keys its
    /// signature must verify with (`plugins[].verify.key`, a path like `module`'s).
    pub plugin_keys: BTreeMap<String, String>,
}

/// One `gitops.manifest_projects[]` entry with agentk's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestProject {
    /// Project path (`group/sub/project`) or full git URL; defaults to the configuration
    /// project. Also the project's identity: two entries with the same id are an error.
    /// Never holds credentials: a URL's `user:token@` is moved to [`Self::credentials`]
    /// when the file is parsed, so the id is safe in logs, metrics, inventories and plugins.
    pub id: String,
    /// Credentials that were written into the id's URL (`https://user:token@host/…`).
    /// `Debug` redacts the secret.
    pub credentials: Option<crate::source::Credentials>,
    /// Which ref to follow (default: the default branch).
    pub git_ref: GitRef,
    /// Namespace for namespaced objects without one, and of the inventory (default `default`).
    pub default_namespace: String,
    /// Globs selecting manifest files (default [`DEFAULT_GLOB`]).
    pub paths: Vec<String>,
    /// How long to wait for applied objects to become healthy (default 3600 s; 0 = no limit).
    pub reconcile_timeout: Duration,
    /// Dry-run strategy (default none).
    pub dry_run_strategy: DryRunStrategy,
    /// Delete objects that left git (default true).
    pub prune: bool,
    /// How long to wait for pruned objects to disappear (default 3600 s).
    pub prune_timeout: Duration,
    /// Propagation policy of prune deletes (default foreground).
    pub prune_propagation_policy: PropagationPolicy,
    /// Which live objects may be taken over (default must_match).
    pub inventory_policy: InventoryPolicy,
    /// Names of the plugins this project uses (`plugins:` in the entry; default: all).
    pub plugins: Option<Vec<String>>,
    /// What the project may create (`limits:` in the entry; default: anything its
    /// inventory policy and the agent's RBAC allow).
    pub limits: crate::limits::Limits,
    /// The ServiceAccount whose identity the project's objects are read, dry-run, applied,
    /// pruned and waited on with (`service_account:` in the entry, `name` in the project's
    /// default namespace or `namespace/name`; Kubernetes impersonation, like Flux's
    /// `serviceAccountName`). None: the agent's own identity.
    pub service_account: Option<ServiceAccount>,
    /// Rendered with Helm from a chart instead of read as files (`helm:` in the entry, or
    /// an agentk `gitops.charts[]` entry).
    pub chart: Option<Chart>,
    /// The repository to fetch when it is not [`Self::id`]: agentk's charts are keyed by
    /// their release (`chart:<namespace>/<release>`), and several may come from one project.
    pub repository: Option<String>,
    /// Where the age keys that decrypt the project's SOPS files are (`decryption:` in the
    /// entry). None: a SOPS file fails the sync.
    pub decryption: Option<Decryption>,
    /// The Secret whose keys ending `.pub` (Flux's convention) hold the cosign public keys
    /// an `oci://` artifact must be signed with (`verify:` in the entry). None: not checked.
    pub verify: Option<Decryption>,
}

/// A Secret holding age identities, in its keys ending `.agekey` (Flux's convention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decryption {
    /// The Secret's namespace (default: the project's default namespace).
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
}

impl ManifestProject {
    /// The project (path or URL) whose repository this entry fetches.
    pub fn repository(&self) -> &str {
        self.repository.as_deref().unwrap_or(&self.id)
    }
}

/// A Helm chart a project renders: what `helm template` is given.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// The chart's directory in the repository (`.` for the root).
    pub path: String,
    /// The release name (`.Release.Name`).
    pub release_name: String,
    /// The release namespace (`.Release.Namespace`), also the project's default namespace.
    pub namespace: String,
    /// Values, merged in order, later ones winning (as `-f a -f b`).
    pub values: Vec<ChartValues>,
    /// Render the chart's `crds/` too (default true, as `helm install` does).
    pub include_crds: bool,
}

/// One source of chart values.
#[derive(Debug, Clone, PartialEq)]
pub enum ChartValues {
    /// Values written in the configuration.
    Inline(serde_json::Value),
    /// A values file in the chart's repository, at the same commit.
    File(String),
}

/// A ServiceAccount a project acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceAccount {
    /// Reads `name` (in `default_namespace`) or `namespace/name`; both parts must be
    /// Kubernetes names (RFC 1123 labels for the namespace, subdomains for the name).
    ///
    /// # Errors
    /// A message saying which part is not a valid name.
    pub fn parse(text: &str, default_namespace: &str) -> Result<ServiceAccount, String> {
        let (namespace, name) = text.split_once('/').unwrap_or((default_namespace, text));
        if !sluice_model::object::is_dns_label(namespace) {
            return Err(format!("{text:?}: {namespace:?} is not a namespace name"));
        }
        if !sluice_model::object::is_dns_subdomain(name) {
            return Err(format!("{text:?}: {name:?} is not a ServiceAccount name"));
        }
        Ok(ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// The user the API server knows it as.
    pub fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// The groups every ServiceAccount token carries.
    pub fn groups(&self) -> [String; 3] {
        [
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".into(),
        ]
    }
}

/// The git ref a manifest project follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GitRef {
    /// The remote's `HEAD`.
    DefaultBranch,
    /// `refs/heads/<name>`.
    Branch(String),
    /// `refs/tags/<name>`.
    Tag(String),
    /// A commit id, or an OCI artifact's digest (`ref: {digest: sha256:…}`): synced once,
    /// never polled.
    Commit(String),
    /// The highest tag a semver range accepts (`ref: {semver: ">=1.0.0 <2.0.0"}`; OCI
    /// sources only).
    Semver(String),
}

impl fmt::Display for GitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitRef::DefaultBranch => f.write_str("HEAD"),
            GitRef::Branch(b) => write!(f, "refs/heads/{b}"),
            GitRef::Tag(t) => write!(f, "refs/tags/{t}"),
            GitRef::Commit(c) => f.write_str(c),
            GitRef::Semver(r) => write!(f, "semver {r}"),
        }
    }
}

sluice_model::string_enum!(
    /// `observability.logging.level`.
    LogLevel {
        /// Everything.
        Debug = "debug",
        /// The default.
        Info = "info",
        /// Warnings and errors.
        Warn = "warn",
        /// Errors only.
        Error = "error",
    } default Info
);

/// The project path of a repository URL (`https://host/group/app.git` → `group/app`), for
/// entries without `id` when the configuration comes from that repository. Any other URL
/// (`file://`) is returned whole, credentials removed.
pub fn project_path(url: &str) -> String {
    let (url, _) = crate::source::split_userinfo(url);
    match url.split_once("://") {
        Some(("https" | "http" | "ssh", rest)) => {
            let path = rest
                .split_once('/')
                .map_or("", |(_, p)| p)
                .trim_matches('/');
            let path = path.strip_suffix(".git").unwrap_or(path);
            if path.is_empty() {
                url.clone()
            } else {
                path.to_string()
            }
        }
        _ => url,
    }
}

/// Parses a configuration file.
///
/// `config_project` is the project the file lives in: the default for a manifest project
/// without `id`.
///
/// # Errors
/// [`Error::Invalid`] names the key and the line of the first problem; [`Error::TooBig`]
/// when the file exceeds agentk's 128 KiB limit.
pub fn parse(text: &str, config_project: &str) -> Result<AgentConfig> {
    parse_with_origin(text, config_project, "config.yaml")
}

/// [`parse`] with a description of where the text came from, used in errors.
pub fn parse_with_origin(text: &str, config_project: &str, origin: &str) -> Result<AgentConfig> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(Error::TooBig {
            origin: origin.to_string(),
            size: text.len(),
        });
    }
    let invalid = |message: String| Error::Invalid {
        origin: origin.to_string(),
        message,
    };
    // An empty file is an empty configuration, as in agentk.
    let file: ConfigurationFile = if text.trim().is_empty() {
        ConfigurationFile::default()
    } else {
        serde_saphyr::from_str_with_options(text, yaml_options())
            .map_err(|e| invalid(e.to_string()))?
    };

    let mut ignored_sections = Vec::new();
    for (name, present) in [
        ("ci_access", file.ci_access.is_some()),
        ("container_scanning", file.container_scanning.is_some()),
        ("user_access", file.user_access.is_some()),
        ("remote_development", file.remote_development.is_some()),
        ("flux", file.flux.is_some()),
    ] {
        if present {
            ignored_sections.push(name);
        }
    }

    let mut manifest_projects: Vec<ManifestProject> = Vec::new();
    let (projects, charts) = file
        .gitops
        .map(|g| (g.manifest_projects, g.charts))
        .unwrap_or_default();
    for mut p in projects {
        let (id, line) = match p.id.take() {
            Some(s) => (s.value, Some(s.referenced.line())),
            None => (config_project.to_string(), None),
        };
        if id.is_empty() {
            return Err(invalid(format!(
                "gitops.manifest_projects[].id at line {}: must not be empty",
                line.unwrap_or(0)
            )));
        }
        // Credentials written into a URL leave the id here, once, so that nothing
        // downstream (logs, metrics, inventory ids, plugin context) can ever show them.
        let (id, credentials) = crate::source::split_userinfo(&id);
        if manifest_projects.iter().any(|m| m.id == id) {
            let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
            return Err(invalid(format!(
                "gitops.manifest_projects[].id{at}: duplicate source id {id:?}"
            )));
        }
        manifest_projects.push(p.into_project(id, credentials).map_err(invalid)?);
    }
    for c in charts {
        let project = c
            .to_project(config_project)
            .map_err(|e| invalid(format!("gitops.charts[{}]: {e}", c.release_name)))?;
        if manifest_projects.iter().any(|m| m.id == project.id) {
            return Err(invalid(format!(
                "gitops.charts[{}]: duplicate release in namespace {:?}",
                c.release_name, project.default_namespace
            )));
        }
        manifest_projects.push(project);
    }
    let (plugins, plugin_keys) = plugin_specs(file.plugins.unwrap_or_default()).map_err(invalid)?;
    for p in &manifest_projects {
        for name in p.plugins.iter().flatten() {
            if !plugins.iter().any(|s| &s.name == name) {
                return Err(invalid(format!(
                    "gitops.manifest_projects[{}].plugins: no plugin named {name:?} in plugins:",
                    p.id
                )));
            }
        }
    }
    let log_level = file
        .observability
        .and_then(|o| o.logging)
        .and_then(|l| l.level)
        .unwrap_or_default();
    Ok(AgentConfig {
        manifest_projects,
        log_level,
        ignored_sections,
        plugins,
        plugin_keys,
    })
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_aliases: 100,
            max_depth: 64,
            max_documents: 1,
        },
    }
}

// The file's schema. Field names are agentk's; `deny_unknown_fields` is protojson's default.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigurationFile {
    gitops: Option<GitopsSection>,
    observability: Option<ObservabilitySection>,
    // sluice's own section.
    plugins: Option<Vec<PluginSection>>,
    // Accepted and ignored (other agentk modules, or GitLab itself, use them).
    ci_access: Option<IgnoredAny>,
    container_scanning: Option<IgnoredAny>,
    user_access: Option<IgnoredAny>,
    remote_development: Option<IgnoredAny>,
    flux: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GitopsSection {
    #[serde(default)]
    manifest_projects: Vec<ManifestProjectSection>,
    /// agentk's Helm charts (15.4 to 16.3), read as agentk read them.
    #[serde(default)]
    charts: Vec<ChartSection>,
}

/// `helm:` of a manifest project (sluice's extension): render a chart of the project.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HelmSection {
    /// The chart's directory (default: the repository's root).
    chart: Option<String>,
    release_name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    values_files: Vec<String>,
    values: Option<serde_json::Value>,
    include_crds: Option<bool>,
}

impl HelmSection {
    fn chart(self, default_namespace: &str, id: &str) -> Result<Chart, String> {
        let release_name = match self.release_name {
            Some(n) => n,
            // The project's last path component, as `helm install` users name releases.
            None => id
                .trim_end_matches('/')
                .trim_end_matches(".git")
                .rsplit('/')
                .next()
                .unwrap_or(id)
                .to_string(),
        };
        let mut values: Vec<ChartValues> = self
            .values_files
            .into_iter()
            .map(|f| repository_path(&f).map(ChartValues::File))
            .collect::<Result<_, _>>()?;
        match self.values {
            None | Some(serde_json::Value::Null) => {}
            Some(v @ serde_json::Value::Object(_)) => values.push(ChartValues::Inline(v)),
            Some(_) => return Err("values: must be a map".into()),
        }
        Ok(Chart {
            path: repository_path(self.chart.as_deref().unwrap_or("."))?,
            release_name,
            namespace: self
                .namespace
                .unwrap_or_else(|| default_namespace.to_string()),
            values,
            include_crds: self.include_crds.unwrap_or(true),
        })
    }
}

/// A path in the repository, normalized (`./a//b/` is `a/b`, the root is `.`); `..` and
/// absolute paths are refused: a chart or values file is always inside its repository.
fn repository_path(path: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "{path:?}: \"..\" is not allowed; paths are relative to the repository's root"
                ));
            }
            p => parts.push(p),
        }
    }
    if path.starts_with('/') {
        return Err(format!(
            "{path:?}: paths are relative to the repository's root"
        ));
    }
    Ok(if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    })
}

/// One agentk `gitops.charts[]` entry (ChartCF).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChartSection {
    release_name: String,
    source: ChartSourceSection,
    #[serde(default)]
    values: Vec<ChartValuesSection>,
    namespace: Option<String>,
    /// Helm's release history length. sluice keeps no Helm releases (its inventory is the
    /// record of what a chart applied), so it is accepted and ignored.
    #[allow(dead_code)] // reason: accepted for compatibility, deliberately unused
    max_history: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChartSourceSection {
    project: ChartProjectSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChartProjectSection {
    id: Option<String>,
    path: Option<String>,
    r#ref: Option<RefSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChartValuesSection {
    inline: Option<serde_json::Value>,
    file: Option<ChartValuesFileSection>,
    url: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChartValuesFileSection {
    project_id: Option<String>,
    r#ref: Option<RefSection>,
    file: String,
}

impl ChartSection {
    fn to_project(&self, config_project: &str) -> Result<ManifestProject, String> {
        if self.release_name.is_empty() {
            return Err("release_name must not be empty".into());
        }
        let source = &self.source.project;
        let repository = source
            .id
            .clone()
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| config_project.to_string());
        let (repository, credentials) = crate::source::split_userinfo(&repository);
        let git_ref = source
            .r#ref
            .as_ref()
            .map(|r| r.0.clone())
            .unwrap_or(GitRef::DefaultBranch);
        let mut values = Vec::new();
        for v in &self.values {
            match (&v.inline, &v.file, &v.url) {
                (Some(inline @ serde_json::Value::Object(_)), None, None) => {
                    values.push(ChartValues::Inline(inline.clone()));
                }
                (Some(_), None, None) => return Err("values[].inline: must be a map".into()),
                (None, Some(f), None) => {
                    let same_project = f
                        .project_id
                        .as_deref()
                        .is_none_or(|p| crate::source::split_userinfo(p).0 == repository);
                    let same_ref = f.r#ref.as_ref().is_none_or(|r| r.0 == git_ref);
                    if !same_project || !same_ref {
                        return Err(format!(
                            "values[].file {:?}: sluice reads values files from the chart's own project and ref only (commit the file beside the chart)",
                            f.file
                        ));
                    }
                    values.push(ChartValues::File(repository_path(&f.file)?));
                }
                (None, None, Some(_)) => {
                    return Err("values[].url: sluice fetches no values over the network; commit the file and use values[].file".into());
                }
                _ => return Err("values[]: set exactly one of inline, file, url".into()),
            }
        }
        let namespace = self
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        Ok(ManifestProject {
            id: format!("chart:{namespace}/{}", self.release_name),
            credentials,
            git_ref,
            default_namespace: namespace.clone(),
            paths: Vec::new(),
            reconcile_timeout: Duration::from_secs(3600),
            dry_run_strategy: DryRunStrategy::default(),
            prune: true,
            prune_timeout: Duration::from_secs(3600),
            prune_propagation_policy: PropagationPolicy::default(),
            // The objects agentk's Helm release made carry no inventory annotation: the
            // chart adopts them, as it would under agentk.
            inventory_policy: InventoryPolicy::AdoptIfNoInventory,
            plugins: None,
            limits: crate::limits::Limits::default(),
            service_account: None,
            decryption: None,
            verify: None,
            chart: Some(Chart {
                path: repository_path(source.path.as_deref().unwrap_or("."))?,
                release_name: self.release_name.clone(),
                namespace,
                values,
                include_crds: true,
            }),
            repository: Some(repository),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestProjectSection {
    id: Option<Spanned<String>>,
    default_namespace: Option<String>,
    paths: Option<Vec<PathSection>>,
    reconcile_timeout: Option<ProtoDuration>,
    dry_run_strategy: Option<DryRunStrategy>,
    prune: Option<bool>,
    prune_timeout: Option<ProtoDuration>,
    prune_propagation_policy: Option<PropagationPolicy>,
    inventory_policy: Option<InventoryPolicy>,
    r#ref: Option<RefSection>,
    // sluice's extension: which plugins this project uses.
    plugins: Option<Vec<String>>,
    // sluice's extension: what the project may create.
    limits: Option<ProjectLimitsSection>,
    // sluice's extension: whose identity the project's objects are written with.
    service_account: Option<String>,
    // sluice's extension: render a Helm chart of the project.
    helm: Option<HelmSection>,
    // sluice's extension: the age keys of the project's SOPS files.
    decryption: Option<DecryptionSection>,
    // sluice's extension: the cosign keys an OCI artifact must be signed with.
    verify: Option<VerifySection>,
}

/// `verify:` of an `oci://` manifest project (sluice's extension; Flux's `spec.verify`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifySection {
    /// Only `cosign`.
    #[serde(default = "cosign")]
    provider: String,
    secret: String,
    namespace: Option<String>,
}

fn cosign() -> String {
    "cosign".into()
}

/// `decryption:` of a manifest project (sluice's extension).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecryptionSection {
    secret: String,
    namespace: Option<String>,
}

impl ManifestProjectSection {
    /// The entry with agentk's defaults applied; `id` is checked and credential-free.
    fn into_project(
        self,
        id: String,
        credentials: Option<crate::source::Credentials>,
    ) -> Result<ManifestProject, String> {
        let at = |key: &str, e: String| format!("gitops.manifest_projects[{id}].{key}: {e}");
        let paths = match self.paths {
            Some(paths) if !paths.is_empty() => paths.into_iter().map(|p| p.glob).collect(),
            _ => vec![DEFAULT_GLOB.to_string()],
        };
        let limits = match self.limits {
            None => crate::limits::Limits::default(),
            Some(l) => crate::limits::Limits::new(l.namespaces, &l.allowed_kinds, &l.denied_kinds)
                .map_err(|e| at("limits", e.to_string()))?,
        };
        let default_namespace = self
            .default_namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let service_account = self
            .service_account
            .map(|s| ServiceAccount::parse(&s, &default_namespace))
            .transpose()
            .map_err(|e| at("service_account", e))?;
        let chart = self
            .helm
            .map(|h| h.chart(&default_namespace, &id))
            .transpose()
            .map_err(|e| at("helm", e))?;
        let decryption = match self.decryption {
            Some(d) if d.secret.is_empty() => {
                return Err(at("decryption.secret", "must not be empty".into()));
            }
            Some(d) => Some(Decryption {
                namespace: d.namespace.unwrap_or_else(|| default_namespace.clone()),
                secret: d.secret,
            }),
            None => None,
        };
        let verify = match self.verify {
            Some(v) if v.provider != "cosign" => {
                return Err(at(
                    "verify.provider",
                    format!("{:?}: only cosign is supported", v.provider),
                ));
            }
            Some(_) if !id.starts_with("oci://") => {
                return Err(at(
                    "verify",
                    "signatures are verified for OCI artifacts (oci://…) only".into(),
                ));
            }
            Some(v) if v.secret.is_empty() => {
                return Err(at("verify.secret", "must not be empty".into()));
            }
            Some(v) => Some(Decryption {
                namespace: v.namespace.unwrap_or_else(|| default_namespace.clone()),
                secret: v.secret,
            }),
            None => None,
        };
        let git_ref = self.r#ref.map(|r| r.0).unwrap_or(GitRef::DefaultBranch);
        match (&git_ref, id.starts_with("oci://")) {
            (GitRef::Branch(_), true) => {
                return Err(at(
                    "ref",
                    "an OCI repository has tags and digests, not branches".into(),
                ));
            }
            (GitRef::Semver(_), false) => {
                return Err(at(
                    "ref",
                    "semver ranges are for OCI repositories (oci://…)".into(),
                ));
            }
            (GitRef::Commit(c), true) if !crate::oci::is_digest(c) => {
                return Err(at(
                    "ref",
                    "an OCI artifact is pinned by digest, not commit".into(),
                ));
            }
            _ => {}
        }
        if id.starts_with("oci://") && crate::oci::parse_url(&id).is_none() {
            return Err(at(
                "id",
                "not an OCI repository (oci://host/repository, the tag in ref:)".into(),
            ));
        }
        Ok(ManifestProject {
            id,
            credentials,
            git_ref,
            default_namespace,
            paths,
            reconcile_timeout: self
                .reconcile_timeout
                .map_or(Duration::from_secs(3600), |d| d.0),
            dry_run_strategy: self.dry_run_strategy.unwrap_or_default(),
            prune: self.prune.unwrap_or(true),
            prune_timeout: self
                .prune_timeout
                .map_or(Duration::from_secs(3600), |d| d.0),
            prune_propagation_policy: self.prune_propagation_policy.unwrap_or_default(),
            inventory_policy: self.inventory_policy.unwrap_or_default(),
            plugins: self.plugins,
            limits,
            service_account,
            chart,
            repository: None,
            decryption,
            verify,
        })
    }
}

/// `limits:` of a manifest project (sluice's extension).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectLimitsSection {
    namespaces: Option<Vec<String>>,
    #[serde(default)]
    allowed_kinds: Vec<String>,
    #[serde(default)]
    denied_kinds: Vec<String>,
}

/// One `plugins:` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginSection {
    name: String,
    module: String,
    sha256: Option<String>,
    config: Option<serde_json::Value>,
    limits: Option<LimitsSection>,
    #[serde(default)]
    capabilities: Vec<sluice_wasm::Capability>,
    #[serde(default)]
    failure_policy: sluice_wasm::FailurePolicy,
    #[serde(default)]
    mode: sluice_wasm::Mode,
    // sluice's extension for modules from registries: the keys their signature must
    // verify with.
    verify: Option<PluginVerifySection>,
    // Files of the configuration repository the plugin may read (read-only, at `/`).
    #[serde(default)]
    files: Vec<String>,
}

/// `plugins[].verify`: a file of cosign public keys (PEM), a path like `module`'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginVerifySection {
    #[serde(default = "cosign")]
    provider: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    timeout: Option<ProtoDuration>,
    memory_mib: Option<usize>,
    max_output_mib: Option<usize>,
}

/// The plugins' specs, and per plugin the key file its module's signature must verify with.
fn plugin_specs(
    sections: Vec<PluginSection>,
) -> Result<(Vec<sluice_wasm::Spec>, BTreeMap<String, String>), String> {
    let mut specs: Vec<sluice_wasm::Spec> = Vec::new();
    let mut keys = BTreeMap::new();
    for p in sections {
        let at = format!("plugins[{}]", p.name);
        if p.name.is_empty() {
            return Err("plugins[].name must not be empty".into());
        }
        if specs.iter().any(|s| s.name == p.name) {
            return Err(format!("{at}: duplicate plugin name"));
        }
        if p.module.starts_with("http://") {
            return Err(format!(
                "{at}.module: plain http is not allowed; use https:// with sha256"
            ));
        }
        if p.module.starts_with("oci://") {
            crate::oci::ModuleRef::parse(&p.module).map_err(|e| format!("{at}.module: {e}"))?;
        }
        match &p.verify {
            Some(v) if v.provider != "cosign" => {
                return Err(format!("{at}.verify.provider: only cosign is supported"));
            }
            Some(_) if !p.module.starts_with("oci://") => {
                return Err(format!(
                    "{at}.verify: signatures are verified for modules from registries (oci://…); pin a file or https module by sha256"
                ));
            }
            Some(v) => {
                keys.insert(p.name.clone(), v.key.clone());
            }
            None => {}
        }
        if p.module.starts_with("https://") && p.sha256.is_none() {
            return Err(format!(
                "{at}.sha256: required when module is an https:// URL"
            ));
        }
        if let Some(h) = &p.sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("{at}.sha256: expected 64 hex digits"));
        }
        for f in &p.files {
            let clean = f.trim_start_matches('/').trim_end_matches('/');
            if clean.is_empty()
                || clean
                    .split('/')
                    .any(|c| c == ".." || c == "." || c.is_empty())
            {
                return Err(format!(
                    "{at}.files: {f:?} must be a path in the configuration repository, without . or .."
                ));
            }
        }
        let defaults = sluice_wasm::Limits::default();
        let limits = match p.limits {
            Some(l) => sluice_wasm::Limits {
                timeout: l.timeout.map_or(defaults.timeout, |d| d.0),
                memory_bytes: l.memory_mib.map_or(defaults.memory_bytes, |m| m << 20),
                max_output_bytes: l
                    .max_output_mib
                    .map_or(defaults.max_output_bytes, |m| m << 20),
            },
            None => defaults,
        };
        specs.push(sluice_wasm::Spec {
            name: p.name,
            module: p.module,
            sha256: p.sha256.map(|h| h.to_ascii_lowercase()),
            config: p.config.unwrap_or(serde_json::Value::Null),
            limits,
            capabilities: p.capabilities,
            failure_policy: p.failure_policy,
            mode: p.mode,
            files: p.files,
            granted: None,
        });
    }
    Ok((specs, keys))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathSection {
    glob: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObservabilitySection {
    logging: Option<LoggingSection>,
    // agentk accepts it; sluice has no profiler.
    #[allow(dead_code)] // reason: accepted for compatibility, deliberately unused
    google_profiler: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggingSection {
    level: Option<LogLevel>,
    #[allow(dead_code)] // reason: agentk's gRPC log level; sluice speaks no gRPC
    grpc_level: Option<LogLevel>,
}

/// `ref:` with exactly one of `branch`, `tag`, `commit` (git), or `tag`, `digest`,
/// `semver` (OCI).
#[derive(Debug)]
struct RefSection(GitRef);

impl<'de> Deserialize<'de> for RefSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            branch: Option<String>,
            tag: Option<String>,
            commit: Option<String>,
            digest: Option<String>,
            semver: Option<String>,
        }
        let raw = Raw::deserialize(d)?;
        if let Some(d) = &raw.digest
            && !crate::oci::is_digest(d)
        {
            return Err(de::Error::custom(format!(
                "ref: digest {d:?} is not sha256: followed by 64 hexadecimal digits"
            )));
        }
        let set: Vec<GitRef> = [
            raw.branch.map(GitRef::Branch),
            raw.tag.map(GitRef::Tag),
            raw.commit.map(GitRef::Commit),
            raw.digest.map(GitRef::Commit),
            raw.semver.map(GitRef::Semver),
        ]
        .into_iter()
        .flatten()
        .collect();
        match <[GitRef; 1]>::try_from(set) {
            Ok([GitRef::Branch(s) | GitRef::Tag(s) | GitRef::Commit(s) | GitRef::Semver(s)])
                if s.is_empty() =>
            {
                Err(de::Error::custom(
                    "ref: branch, tag, commit, digest or semver must not be empty",
                ))
            }
            Ok([r]) => Ok(RefSection(r)),
            Err(_) => Err(de::Error::custom(
                "ref: set exactly one of branch, tag, commit (git) or tag, digest, semver (oci://)",
            )),
        }
    }
}

/// A `google.protobuf.Duration` in JSON form: decimal seconds with an `s` suffix (`3600s`,
/// `1.5s`). `3600` and `1h` are invalid, as in agentk.
#[derive(Debug)]
struct ProtoDuration(Duration);

impl<'de> Deserialize<'de> for ProtoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(ProtoDuration)
            .map_err(de::Error::custom)
    }
}

/// Parses agentk's duration form (`"3600s"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid =
        || format!("invalid duration {s:?}: expected seconds with an s suffix, like \"3600s\"");
    // protobuf's JSON form, as kas parsed it: digits, at most 9 decimals, `s`; no sign,
    // exponent or spaces (a negative timeout means nothing here), at most protobuf's
    // 315,576,000,000 s.
    let secs = s.strip_suffix('s').ok_or_else(invalid)?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 9 || secs.ends_with('.')
    {
        return Err(invalid());
    }
    let whole: u64 = whole
        .parse()
        .ok()
        .filter(|w| *w <= 315_576_000_000)
        .ok_or_else(|| format!("invalid duration {s:?}: at most 315576000000s"))?;
    let nanos: u32 = format!("{frac:0<9}").parse().map_err(|_| invalid())?;
    Ok(Duration::new(whole, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> ManifestProject {
        parse(yaml, "group/agent")
            .expect("valid config")
            .manifest_projects
            .remove(0)
    }

    fn err(yaml: &str) -> String {
        parse(yaml, "group/agent")
            .expect_err("invalid config")
            .to_string()
    }

    #[test]
    fn agentk_charts_are_projects_of_their_own() {
        let cfg = parse(
            "gitops:\n  charts:\n  - release_name: web\n    namespace: shop\n    max_history: 2\n    source:\n      project:\n        id: g/charts\n        path: ./charts//web/\n        ref: {tag: v1}\n    values:\n    - inline: {a: 1}\n    - file: {project_id: g/charts, file: env/prod.yaml}\n  - release_name: api\n    source: {project: {path: api}}\n",
            "group/agent",
        )
        .expect("agentk's charts");
        let [web, api] = <[ManifestProject; 2]>::try_from(cfg.manifest_projects).expect("two");
        assert_eq!(
            (web.id.as_str(), web.repository()),
            ("chart:shop/web", "g/charts")
        );
        assert_eq!(web.git_ref, GitRef::Tag("v1".into()));
        assert_eq!(web.default_namespace, "shop");
        assert_eq!(web.inventory_policy, InventoryPolicy::AdoptIfNoInventory);
        let chart = web.chart.expect("chart");
        assert_eq!(chart.path, "charts/web");
        assert_eq!(
            chart.values,
            [
                ChartValues::Inline(serde_json::json!({"a": 1})),
                ChartValues::File("env/prod.yaml".into())
            ]
        );
        assert!(chart.include_crds);
        assert_eq!(
            (api.id.as_str(), api.repository()),
            ("chart:default/api", "group/agent")
        );

        for (yaml, expected) in [
            ("values:\n    - url: {url: https://x}\n", "values[].url"),
            (
                "values:\n    - file: {project_id: other/p, file: v.yaml}\n",
                "own project and ref only",
            ),
            (
                "values:\n    - file: {file: ../../etc/passwd}\n",
                "\"..\" is not allowed",
            ),
            ("values:\n    - {}\n", "exactly one of inline, file, url"),
        ] {
            let e = err(&format!(
                "gitops:\n  charts:\n  - release_name: web\n    source: {{project: {{path: c}}}}\n    {yaml}"
            ));
            assert!(e.contains(expected), "{yaml}: {e}");
        }
        let dup = err(
            "gitops:\n  charts:\n  - release_name: a\n    source: {project: {path: x}}\n  - release_name: a\n    source: {project: {path: y}}\n",
        );
        assert!(dup.contains("duplicate release"), "{dup}");
    }

    #[test]
    fn helm_and_decryption_are_sluices_extensions_of_a_project() {
        let p = one(
            "gitops:\n  manifest_projects:\n  - id: g/web.git\n    default_namespace: web\n    helm: {values_files: [a.yaml, ./b.yaml], values: {x: 1}, include_crds: false}\n    decryption: {secret: keys}\n",
        );
        let chart = p.chart.expect("chart");
        assert_eq!(
            (chart.path.as_str(), chart.release_name.as_str()),
            (".", "web")
        );
        assert_eq!(chart.namespace, "web");
        assert_eq!(chart.values.len(), 3);
        assert!(!chart.include_crds);
        assert_eq!(
            p.decryption,
            Some(Decryption {
                namespace: "web".into(),
                secret: "keys".into()
            })
        );
        assert!(
            err("gitops:\n  manifest_projects:\n  - helm: {values: [1]}\n")
                .contains("must be a map")
        );
        assert!(
            err("gitops:\n  manifest_projects:\n  - helm: {chart: /etc}\n")
                .contains("relative to the repository")
        );
        assert!(
            err("gitops:\n  manifest_projects:\n  - decryption: {secret: \"\"}\n")
                .contains("must not be empty")
        );
    }

    #[test]
    fn defaults_are_agentks() {
        let p = one("gitops:\n  manifest_projects:\n  - {}\n");
        assert_eq!(p.id, "group/agent");
        assert_eq!(p.git_ref, GitRef::DefaultBranch);
        assert_eq!(p.default_namespace, "default");
        assert_eq!(p.paths, [DEFAULT_GLOB]);
        assert_eq!(p.reconcile_timeout, Duration::from_secs(3600));
        assert_eq!(p.prune_timeout, Duration::from_secs(3600));
        assert_eq!(p.dry_run_strategy, DryRunStrategy::None);
        assert!(p.prune);
        assert_eq!(p.prune_propagation_policy, PropagationPolicy::Foreground);
        assert_eq!(p.inventory_policy, InventoryPolicy::MustMatch);
    }

    #[test]
    fn every_field_is_read() {
        let p = one(concat!(
            "gitops:\n  manifest_projects:\n  - id: platform/manifests\n",
            "    ref: {tag: v1.2.0}\n    default_namespace: apps\n",
            "    paths: [{glob: '/base/**/*.yaml'}, {glob: 'prod/*.json'}]\n",
            "    reconcile_timeout: 600s\n    dry_run_strategy: server\n    prune: false\n",
            "    prune_timeout: 1.5s\n    prune_propagation_policy: orphan\n",
            "    inventory_policy: adopt_all\n",
        ));
        assert_eq!(p.id, "platform/manifests");
        assert_eq!(p.git_ref, GitRef::Tag("v1.2.0".into()));
        assert_eq!(p.paths, ["/base/**/*.yaml", "prod/*.json"]);
        assert_eq!(p.reconcile_timeout, Duration::from_secs(600));
        assert_eq!(p.prune_timeout, Duration::from_millis(1500));
        assert_eq!(p.dry_run_strategy, DryRunStrategy::Server);
        assert!(!p.prune);
        assert_eq!(p.prune_propagation_policy, PropagationPolicy::Orphan);
        assert_eq!(p.inventory_policy, InventoryPolicy::AdoptAll);
    }

    #[test]
    fn empty_strings_mean_default() {
        let p = one(
            "gitops:\n  manifest_projects:\n  - dry_run_strategy: ''\n    inventory_policy: ''\n",
        );
        assert_eq!(p.dry_run_strategy, DryRunStrategy::None);
        assert_eq!(p.inventory_policy, InventoryPolicy::MustMatch);
    }

    #[test]
    fn other_agentk_sections_are_accepted_and_listed() {
        let c = parse(
            "ci_access:\n  projects:\n  - id: a/b\nuser_access:\n  access_as: {agent: {}}\nflux:\n  webhook_receiver_url: http://x\nremote_development:\n  enabled: true\n  some_future_key: 1\ncontainer_scanning:\n  cadence: '0 0 * * *'\n",
            "g/a",
        )
        .expect("valid");
        assert_eq!(
            c.ignored_sections,
            [
                "ci_access",
                "container_scanning",
                "user_access",
                "remote_development",
                "flux"
            ]
        );
        assert!(c.manifest_projects.is_empty());
    }

    #[test]
    fn empty_file_is_empty_config() {
        assert!(
            parse("", "g/a")
                .expect("valid")
                .manifest_projects
                .is_empty()
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err("gitops:\n  manifest_projects:\n  - id: a/b\n    prunee: true\n");
        assert!(e.contains("prunee"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn invalid_values_are_errors_with_line() {
        let e = err("gitops:\n  manifest_projects:\n  - inventory_policy: adopt\n");
        assert!(e.contains("invalid value \"adopt\""), "{e}");
        assert!(e.contains("line 3"), "{e}");
        for bad in [
            "3600",
            "1h",
            "-1s",
            "1e20s",
            "1e3s",
            "+5s",
            "1.s",
            ".5s",
            "1.0000000001s",
            " 1s",
            "99999999999999999999s",
        ] {
            let e = err(&format!(
                "gitops:\n  manifest_projects:\n  - reconcile_timeout: '{bad}'\n"
            ));
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_config_project_is_the_path_of_its_repository() {
        assert_eq!(
            project_path("https://gitlab.example.com/group/sub/agents.git"),
            "group/sub/agents"
        );
        assert_eq!(
            project_path("https://oauth2:t@gitlab.example.com/g/a/"),
            "g/a"
        );
        assert_eq!(project_path("ssh://git@host:22/g/a.git"), "g/a");
        assert_eq!(project_path("file:///srv/a.git"), "file:///srv/a.git");
    }

    #[test]
    fn durations_are_protobuf_seconds() {
        assert_eq!(parse_duration("3600s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.000000001s"), Ok(Duration::from_nanos(1)));
        assert!(parse_duration("315576000001s").is_err());
    }

    #[test]
    fn ref_needs_exactly_one_kind() {
        assert!(
            err("gitops:\n  manifest_projects:\n  - ref: {branch: a, tag: b}\n")
                .contains("exactly one")
        );
        assert!(err("gitops:\n  manifest_projects:\n  - ref: {}\n").contains("exactly one"));
        assert_eq!(
            one("gitops:\n  manifest_projects:\n  - ref: {commit: abc}\n").git_ref,
            GitRef::Commit("abc".into())
        );
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let e = err("gitops:\n  manifest_projects:\n  - id: a/b\n  - id: a/b\n");
        assert!(e.contains("duplicate source id \"a/b\""), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn documented_agentk_examples_load_unchanged() {
        // The shape of GitLab's documented GitOps configuration (gitops/configuration docs,
        // agent 15.7+), with every field and the sibling sections agents usually carry.
        let doc = r#"gitops:
  manifest_projects:
  - id: gitlab-org/cluster-integration/gitlab-agent
    ref:
      branch: production
    default_namespace: my-ns
    paths:
      # Read all YAML files from this directory.
    - glob: '/team1/app1/*.yaml'
      # Read all .yaml files from team2/apps and all subdirectories.
    - glob: '/team2/apps/**/*.yaml'
      # If 'paths' is not specified or is an empty list, the configuration below is used.
    - glob: '/**/*.{yaml,yml,json}'
    reconcile_timeout: 3600s
    dry_run_strategy: none
    prune: true
    prune_timeout: 3600s
    prune_propagation_policy: foreground
    inventory_policy: must_match
ci_access:
  groups:
  - id: my-group
    access_as:
      ci_job: {}
user_access:
  access_as:
    agent: {}
  projects:
  - id: my-group/my-project
observability:
  logging:
    level: debug
    grpc_level: warn
"#;
        let c = parse(doc, "group/agent").expect("documented example loads");
        assert_eq!(
            c.manifest_projects[0].git_ref,
            GitRef::Branch("production".into())
        );
        assert_eq!(c.manifest_projects[0].paths.len(), 3);
        assert_eq!(c.ignored_sections, ["ci_access", "user_access"]);
        parse(include_str!("../../../examples/config.yaml"), "demo/agent")
            .expect("examples/config.yaml loads");
    }

    #[test]
    fn plugins_section_is_read_and_checked() {
        let c = parse(
            "plugins:\n- name: ns\n  module: plugins/set_namespace.wasm\n  config: {namespace: prod}\n  limits: {timeout: 0.5s, memory_mib: 64}\n  capabilities: [clocks]\n- name: policy\n  module: https://example.com/p.wasm\n  sha256: 0000000000000000000000000000000000000000000000000000000000000001\n  mode: audit\n  failure_policy: ignore\ngitops:\n  manifest_projects:\n  - id: a/b\n    plugins: [ns]\n",
            "g/a",
        )
        .expect("valid");
        assert_eq!(c.plugins.len(), 2);
        assert_eq!(
            c.plugins[0].config,
            serde_json::json!({"namespace": "prod"})
        );
        assert_eq!(c.plugins[0].limits.timeout, Duration::from_millis(500));
        assert_eq!(c.plugins[0].limits.memory_bytes, 64 << 20);
        assert_eq!(c.plugins[1].mode, sluice_wasm::Mode::Audit);
        assert_eq!(
            c.manifest_projects[0].plugins.as_deref(),
            Some(&["ns".to_string()][..])
        );
        assert!(
            err("plugins:\n- name: p\n  module: https://x/p.wasm\n").contains("sha256: required")
        );
        assert!(err("plugins:\n- name: p\n  module: a.wasm\ngitops:\n  manifest_projects:\n  - plugins: [q]\n").contains("no plugin named \"q\""));
        assert!(
            err("plugins:\n- name: p\n  module: a.wasm\n  capabilities: [files]\n")
                .contains("files")
        );
    }

    #[test]
    fn project_limits_are_read_and_checked() {
        let c = parse(
            "gitops:\n  manifest_projects:\n  - id: a/b\n    limits:\n      namespaces: [team-a, team-a-*]\n      allowed_kinds: [apps/*, core/ConfigMap]\n      denied_kinds: [apps/DaemonSet]\n  - id: a/c\n",
            "g/a",
        )
        .expect("valid");
        let want = crate::limits::Limits::new(
            Some(vec!["team-a".into(), "team-a-*".into()]),
            &["apps/*".into(), "core/ConfigMap".into()],
            &["apps/DaemonSet".into()],
        )
        .expect("limits");
        assert_eq!(c.manifest_projects[0].limits, want);
        assert!(c.manifest_projects[1].limits.is_open());
        assert_eq!(
            err(
                "gitops:\n  manifest_projects:\n  - id: a/b\n    limits: {denied_kinds: [a/b/c]}\n"
            ),
            "failed to parse agent configuration config.yaml: gitops.manifest_projects[a/b].limits: \"a/b/c\" is not a kind: write Kind, group/Kind or group/* (the core group is `core`)"
        );
        assert!(
            err("gitops:\n  manifest_projects:\n  - id: a/b\n    limits: {namespace: [x]}\n")
                .contains("namespace")
        );
    }

    #[test]
    fn a_projects_service_account_is_read_and_checked() {
        let c = parse(
            "gitops:\n  manifest_projects:\n  - id: a/b\n    default_namespace: team-a\n    service_account: deployer\n  - id: a/c\n    service_account: ops/applier\n  - id: a/d\n",
            "g/a",
        )
        .expect("valid");
        let sa = |ns: &str, name: &str| {
            Some(ServiceAccount {
                namespace: ns.into(),
                name: name.into(),
            })
        };
        assert_eq!(
            c.manifest_projects[0].service_account,
            sa("team-a", "deployer")
        );
        assert_eq!(c.manifest_projects[1].service_account, sa("ops", "applier"));
        assert_eq!(c.manifest_projects[2].service_account, None);
        let user = sa("team-a", "deployer").map(|s| (s.user(), s.groups()));
        assert_eq!(
            user,
            Some((
                "system:serviceaccount:team-a:deployer".to_string(),
                [
                    "system:serviceaccounts".to_string(),
                    "system:serviceaccounts:team-a".to_string(),
                    "system:authenticated".to_string()
                ]
            ))
        );
        assert_eq!(
            err("gitops:\n  manifest_projects:\n  - id: a/b\n    service_account: Deploy_Er\n"),
            "failed to parse agent configuration config.yaml: gitops.manifest_projects[a/b].service_account: \"Deploy_Er\": \"Deploy_Er\" is not a ServiceAccount name"
        );
        assert!(
            err("gitops:\n  manifest_projects:\n  - id: a/b\n    service_account: a/b/c\n")
                .contains("is not a ServiceAccount name")
        );
    }

    #[test]
    fn log_level_is_read() {
        let c = parse(
            "observability:\n  logging:\n    level: debug\n    grpc_level: warn\n",
            "g/a",
        )
        .expect("valid");
        assert_eq!(c.log_level, LogLevel::Debug);
    }
}
