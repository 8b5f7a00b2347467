//! Shared helpers for the sync tests: manifests, a project pointing at a test repository,
//! one-shot syncs and cluster reads.

use std::time::Duration;

use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use sluice_agent::config::ManifestProject;
use sluice_agent::source::{Credentials, Source};
use sluice_agent::sync::{self, Settings};
use sluice_engine::cluster::Cluster;
use sluice_testenv::git::{self, Repo};

/// Tests that make an API group unavailable (an APIService without a backend), and tests
/// that need complete discovery (the garbage collector, namespace deletion, pruning a
/// Namespace) take turns.
pub static DISCOVERY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Deployment manifest without namespace.
pub fn deployment(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: app\n        image: nginx:1.27\n"
    )
}

/// A ConfigMap manifest without namespace.
pub fn configmap(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: {value:?}\n"
    )
}

/// A manifest project for `repo` with extra config lines (YAML, indented by four spaces).
pub fn project(ns: &str, extra: &str) -> ManifestProject {
    project_with_id("test/project", ns, extra)
}

/// As [`project`], with the project id `id`.
pub fn project_with_id(id: &str, ns: &str, extra: &str) -> ManifestProject {
    let yaml = format!(
        "gitops:\n  manifest_projects:\n  - id: {id}\n    default_namespace: {ns}\n{extra}"
    );
    sluice_agent::config::parse(&yaml, "test/config")
        .expect("test config is valid")
        .manifest_projects
        .remove(0)
}

/// A source for the repository's HTTP URL, with its own cache.
pub fn source(repo: &Repo, credentials: Option<Credentials>) -> (Source, tempfile::TempDir) {
    let cache = tempfile::tempdir().expect("cache dir");
    (
        Source::new(repo.http_url(), cache.path(), credentials),
        cache,
    )
}

/// Settings with a test inventory id.
pub fn settings(inventory_id: &str) -> Settings {
    Settings {
        inventory_id: inventory_id.to_string(),
        field_manager: "sluice".into(),
        cleanup_managers: vec!["agentk".into()],
        concurrency: 8,
        limits: Default::default(),
        allow_empty_prune: false,
        agent: "test".into(),
        plugins: Ok(Vec::new()),
        others: Vec::new(),
        takeover: sluice_agent::sync::Takeover::Agentk { agent_id: None },
        known: Default::default(),
        render_cache: None,
        decoded: None,
        slots: None,
        protected: Default::default(),
        // As the agent: the health wait reads watches kept across the settings' syncs.
        live: Some(sluice_engine::live::Live::new()),
        renderers: Some(renderers()),
        siblings: Vec::new(),
    }
}

/// The test process's renderers (Kustomize, Helm), built by `renderers/build.sh` and
/// compiled once into the user's sluice cache, as the CLI does.
pub fn renderers() -> std::sync::Arc<sluice_wasm::renderer::Renderers> {
    static RENDERERS: std::sync::OnceLock<std::sync::Arc<sluice_wasm::renderer::Renderers>> =
        std::sync::OnceLock::new();
    RENDERERS
        .get_or_init(|| {
            let cache = sluice_model::default_cache_dir().join("wasm");
            std::sync::Arc::new(
                sluice_wasm::renderer::Renderers::new(
                    Some(sluice_testenv::cluster::renderers_dir()),
                    Some(&cache),
                )
                .expect("renderers"),
            )
        })
        .clone()
}

/// Resolves `git_ref` and syncs that commit once.
pub async fn sync_once(
    cluster: &mut Cluster,
    source: &Source,
    project: &ManifestProject,
    settings: &Settings,
) -> Result<sync::Report, sync::Error> {
    let (s, r) = (source.clone(), project.git_ref.clone());
    let commit = tokio::task::spawn_blocking(move || s.resolve(&r))
        .await
        .expect("resolve task")?;
    sync::sync(cluster, source, project, &commit, settings).await
}

/// What most sync tests start from: a client, a fresh namespace, a repository named after
/// it, a source for that repository, and a connected cluster handle.
pub struct Fixture {
    /// Admin client.
    pub client: kube::Client,
    /// The test's namespace (also the repository name, `group/<ns>`).
    pub ns: String,
    /// The manifest repository.
    pub repo: Repo,
    /// A source for it over HTTP.
    pub src: Source,
    /// Discovery and client for `sluice_agent::sync`.
    pub cluster: Cluster,
    /// The source's cache; removed when the test ends.
    pub cache: tempfile::TempDir,
}

impl Fixture {
    /// Sets everything up; `prefix` names the namespace.
    pub async fn new(prefix: &str) -> Fixture {
        let client = sluice_testenv::cluster::client().await;
        let ns = sluice_testenv::cluster::namespace(&client, prefix).await;
        let repo = sluice_testenv::git::shared().create_repo(&format!("group/{ns}"));
        let (src, cache) = source(&repo, None);
        let cluster = Cluster::connect(client.clone()).await.expect("discovery");
        Fixture {
            client,
            ns,
            repo,
            src,
            cluster,
            cache,
        }
    }
}

/// A connected cluster handle.
pub async fn cluster() -> Cluster {
    Cluster::connect(sluice_testenv::cluster::client().await)
        .await
        .expect("discovery")
}

/// A namespaced dynamic API.
pub fn api(
    client: &kube::Client,
    ns: &str,
    api_version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resource(api_version, kind, plural))
}

/// A cluster-scoped dynamic API.
pub fn api_all(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &resource(api_version, kind, plural))
}

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The inventory ConfigMap's keys, sorted.
pub async fn inventory_keys(client: &kube::Client, ns: &str, name: &str) -> Vec<String> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("inventory {ns}/{name} missing: {e}"));
    cm.data.unwrap_or_default().into_keys().collect()
}

/// Polls `check` every 250 ms until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Agent options for tests: the shared git server, a 500 ms poll, agentk takeover on.
pub fn options(agent: &str, cache: &std::path::Path) -> sluice_agent::agent::Options {
    sluice_agent::agent::Options {
        agent_name: agent.into(),
        git_base_url: git::shared().base_url().into(),
        config_project: "test/config".into(),
        credentials: Default::default(),
        poll_interval: Duration::from_millis(500),
        reapply_interval: Duration::from_secs(300),
        cache_dir: cache.into(),
        field_manager: "sluice".into(),
        concurrency: 8,
        inventory_ids: Default::default(),
        takeover: sluice_agent::sync::Takeover::Agentk { agent_id: None },
        cleanup_managers: vec!["agentk".into()],
        allow_empty_prune: false,
        git_ca: None,
        registries: Default::default(),
        plugin_cache_dir: None,
        renderers: Some(renderers()),
        limits: Default::default(),
        protected: Default::default(),
        metrics: Default::default(),
        triggers: Default::default(),
        ownership: None,
        per_namespace_watches: false,
        sync_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(8)),
    }
}

/// Records a sync's outcome as the agent does after each sync ([`sluice_agent::history`]).
pub async fn record(
    history: &mut sluice_agent::history::History,
    project: &ManifestProject,
    settings: &Settings,
    result: &sync::Report,
) {
    let inventory = sluice_engine::inventory::InventoryRef::default_for(
        &settings.inventory_id,
        &project.default_namespace,
    );
    history
        .record(&sluice_agent::history::Outcome {
            project: &project.id,
            commit: &result.commit,
            inventory: &inventory,
            elapsed: Duration::from_secs(1),
            result: Ok(result),
        })
        .await;
}

/// sluice's Events about the ConfigMap `name` in `ns`, as `(type, reason, message)`.
pub async fn sluice_events(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Vec<(String, String, String)> {
    use k8s_openapi::api::core::v1::Event;
    let api: kube::Api<Event> = kube::Api::namespaced(client.clone(), ns);
    api.list(&kube::api::ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.reporting_component.as_deref() == Some(sluice_agent::history::CONTROLLER))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect()
}
