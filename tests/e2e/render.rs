//! Rendering: Kustomize and Helm in the WebAssembly sandbox give what the native CLIs of the
//! same versions print (`kustomize build`, `helm template`, built from the Go module proxy by
//! `tests/cluster/build-cli.sh`), compared as sets of objects; charts and overlays sync,
//! change and prune against the real control plane; hostile inputs fail with their origin
//! and change nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_agent::config::ManifestProject;
use sluice_agent::select::{self, Dir, SelectedFile};
use sluice_agent::{decode, render};
use sluice_testenv::cluster;

use crate::support::{Fixture, renderers, settings, sync_once};

/// Writes `files` under `dir`.
fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
}

fn context() -> render::Context {
    render::Context {
        renderers: Some(renderers()),
        capabilities: None,
        keys: None,
    }
}

fn parse_project(yaml: &str) -> ManifestProject {
    sluice_agent::config::parse(yaml, "test/config")
        .expect("config")
        .manifest_projects
        .remove(0)
}

/// Objects as sorted JSON texts: a set to compare.
fn canonical(files: &[SelectedFile]) -> Vec<String> {
    let mut objects: Vec<String> = decode::decode(files, "p", "c")
        .expect("decode")
        .into_iter()
        .map(|o| o.value().to_string())
        .collect();
    objects.sort();
    objects
}

/// What sluice renders for `project` in `dir`.
fn sluice(dir: &Path, project: &ManifestProject) -> Result<Vec<SelectedFile>, render::Error> {
    let tree = Dir::walk(dir).expect("walk");
    render::render(&tree, project, &select::Limits::default(), &context())
}

/// What a native CLI prints, as one file; panics with its stderr when it fails.
fn native(cli: &str, args: &[&str], dir: &Path) -> Result<Vec<SelectedFile>, String> {
    let out = Command::new(cluster::reference_cli(cli))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the native CLI");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(vec![SelectedFile {
        path: "native.yaml".into(),
        bytes: out.stdout,
        renderer: None,
    }])
}

/// A base, a component and two overlays using what overlays use: name prefixes and
/// suffixes, namespaces, labels, annotations, images, replicas, ConfigMap and Secret
/// generators (hashed names and the references to them), strategic-merge and JSON 6902
/// patches, components and replacements.
fn kustomize_corpus(dir: &Path) {
    write(
        dir,
        &[
            (
                "base/kustomization.yaml",
                "resources:\n- deployment.yaml\n- service.yaml\ncommonAnnotations:\n  team: web\nconfigMapGenerator:\n- name: app-config\n  literals: [LOG_LEVEL=info]\n  files: [app.properties]\nsecretGenerator:\n- name: app-secret\n  literals: [password=hunter2]\n",
            ),
            (
                "base/deployment.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n        image: nginx:1.25\n        env:\n        - {name: MODE, value: placeholder}\n        envFrom:\n        - configMapRef: {name: app-config}\n        - secretRef: {name: app-secret}\n",
            ),
            (
                "base/service.yaml",
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector: {app: web}\n  ports:\n  - port: 80\n    targetPort: 8080\n",
            ),
            ("base/app.properties", "color=blue\nsize=large\n"),
            (
                "components/monitoring/kustomization.yaml",
                "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\nresources:\n- dashboard.yaml\npatches:\n- patch: |-\n    apiVersion: apps/v1\n    kind: Deployment\n    metadata:\n      name: web\n      annotations:\n        prometheus.io/scrape: \"true\"\n",
            ),
            (
                "components/monitoring/dashboard.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dashboard\ndata:\n  panel: requests\n",
            ),
            (
                "overlays/prod/kustomization.yaml",
                "namespace: prod\nnamePrefix: prod-\nnameSuffix: -v1\nlabels:\n- pairs: {env: prod}\n  includeSelectors: true\nresources:\n- ../../base\ncomponents:\n- ../../components/monitoring\nimages:\n- name: nginx\n  newName: registry.example.com/nginx\n  newTag: \"1.27\"\nreplicas:\n- name: web\n  count: 3\npatches:\n- path: resources.yaml\n- target: {kind: Service, name: web}\n  patch: |-\n    - op: replace\n      path: /spec/ports/0/port\n      value: 8080\nconfigMapGenerator:\n- name: app-config\n  behavior: merge\n  literals: [LOG_LEVEL=warn]\nreplacements:\n- source: {kind: ConfigMap, name: dashboard, fieldPath: data.panel}\n  targets:\n  - select: {kind: Deployment, name: web}\n    fieldPaths:\n    - spec.template.spec.containers.[name=web].env.[name=MODE].value\n",
            ),
            (
                "overlays/prod/resources.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  template:\n    spec:\n      containers:\n      - name: web\n        resources:\n          limits: {memory: 256Mi}\n",
            ),
            (
                "overlays/dev/kustomization.yaml",
                "namespace: dev\nresources:\n- ../../base\npatches:\n- target: {kind: Deployment}\n  patch: |-\n    - op: replace\n      path: /spec/replicas\n      value: 0\n",
            ),
        ],
    );
}

/// sluice's Kustomize gives the objects `kustomize build` (same version, native) gives, for
/// each overlay of the corpus.
#[tokio::test]
async fn kustomize_renders_what_kustomize_build_prints() {
    let dir = tempfile::tempdir().expect("dir");
    kustomize_corpus(dir.path());
    for overlay in ["overlays/prod", "overlays/dev", "base"] {
        let project = parse_project(&format!(
            "gitops:\n  manifest_projects:\n  - id: p\n    paths: [{{glob: \"{overlay}/**\"}}]\n"
        ));
        let ours = sluice(dir.path(), &project).expect("sluice renders");
        let theirs = native("kustomize", &["build", overlay], dir.path()).expect("kustomize build");
        let (ours, theirs) = (canonical(&ours), canonical(&theirs));
        eprintln!("{overlay}: {} objects", theirs.len());
        assert!(theirs.len() >= 3, "{overlay}: the corpus renders objects");
        assert_eq!(ours, theirs, "{overlay}: sluice and kustomize build differ");
    }
    // Every object names the file it came from and the renderer.
    let project = parse_project(
        "gitops:\n  manifest_projects:\n  - id: p\n    paths: [{glob: \"overlays/prod/**\"}]\n",
    );
    let files = sluice(dir.path(), &project).expect("render");
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for expected in [
        "base/deployment.yaml",
        "base/service.yaml",
        "components/monitoring/dashboard.yaml",
        "base/kustomization.yaml",
    ] {
        assert!(paths.contains(&expected), "{expected} in {paths:?}");
    }
    assert!(
        files
            .iter()
            .all(|f| f.renderer.as_deref() == Some("kustomize v5.8.2"))
    );
}

/// A chart with what charts have: a subchart directory, a packaged subchart (.tgz), a
/// library chart, CRDs, `.Files.Get` and `.Files.Glob`, `tpl`, `required`, `include`,
/// a values file over the defaults, a NOTES.txt and a test hook.
fn helm_corpus(dir: &Path) {
    let chart = dir.join("charts/app");
    write(
        &chart,
        &[
            (
                "Chart.yaml",
                "apiVersion: v2\nname: app\nversion: 1.2.3\nappVersion: \"4.5\"\ndependencies:\n- name: sub\n  version: 0.1.0\n- name: packed\n  version: 0.1.0\n- name: common\n  version: 0.1.0\n",
            ),
            (
                "values.yaml",
                "name: app\nreplicas: 1\ngreeting: \"hello {{ .Release.Name }}\"\nsub:\n  color: blue\npacked:\n  enabled: true\n",
            ),
            ("values-prod.yaml", "replicas: 3\nsub:\n  color: red\n"),
            ("files/config.ini", "[server]\nport = 8080\n"),
            ("files/a.txt", "alpha"),
            ("files/b.txt", "beta"),
            (
                "templates/deployment.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}-{{ required \"name is required\" .Values.name }}\n  labels:\n{{ include \"common.labels\" . | indent 4 }}\nspec:\n  replicas: {{ .Values.replicas }}\n  selector:\n    matchLabels: {app: {{ .Values.name }}}\n  template:\n    metadata:\n      labels: {app: {{ .Values.name }}}\n    spec:\n      containers:\n      - name: app\n        image: \"nginx:{{ .Chart.AppVersion }}\"\n        env:\n        - name: GREETING\n          value: {{ tpl .Values.greeting . | quote }}\n        - name: KUBE\n          value: {{ .Capabilities.KubeVersion.Version | quote }}\n",
            ),
            (
                "templates/config.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-files\n  namespace: {{ .Release.Namespace }}\ndata:\n  config.ini: |-\n{{ .Files.Get \"files/config.ini\" | indent 4 }}\n{{ (.Files.Glob \"files/*.txt\").AsConfig | indent 2 }}\n",
            ),
            (
                "templates/NOTES.txt",
                "Thank you for installing {{ .Chart.Name }}.\n",
            ),
            (
                "templates/tests/test.yaml",
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {{ .Release.Name }}-test\n  annotations:\n    helm.sh/hook: test\nspec:\n  containers:\n  - name: t\n    image: busybox\n",
            ),
            (
                "crds/widgets.yaml",
                "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.com\nspec:\n  group: example.com\n  names: {kind: Widget, plural: widgets, singular: widget}\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}\n",
            ),
            (
                "charts/sub/Chart.yaml",
                "apiVersion: v2\nname: sub\nversion: 0.1.0\n",
            ),
            (
                "charts/sub/templates/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-sub\ndata:\n  color: {{ .Values.color }}\n  global: {{ .Values.global | toJson | quote }}\n",
            ),
            (
                "charts/common/Chart.yaml",
                "apiVersion: v2\nname: common\nversion: 0.1.0\ntype: library\n",
            ),
            (
                "charts/common/templates/_labels.tpl",
                "{{- define \"common.labels\" -}}\napp.kubernetes.io/name: {{ .Chart.Name }}\napp.kubernetes.io/instance: {{ .Release.Name }}\nhelm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}\n{{- end -}}\n",
            ),
        ],
    );
    // The packaged subchart, made by the real `helm package`.
    let src = dir.join("packed-src/packed");
    write(
        &src,
        &[
            (
                "Chart.yaml",
                "apiVersion: v2\nname: packed\nversion: 0.1.0\n",
            ),
            (
                "templates/svc.yaml",
                "{{- if .Values.enabled }}\napiVersion: v1\nkind: Service\nmetadata:\n  name: {{ .Release.Name }}-packed\nspec:\n  ports:\n  - port: 80\n{{- end }}\n",
            ),
        ],
    );
    let charts = chart.join("charts");
    let out = Command::new(cluster::reference_cli("helm"))
        .args(["package", src.to_str().expect("utf-8"), "-d"])
        .arg(&charts)
        .output()
        .expect("helm package");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(dir.join("packed-src")).expect("rm");
}

/// sluice's Helm gives the objects `helm template --skip-tests --include-crds` (same
/// version, native) gives: for a chart as `helm create` writes it, and for the corpus chart
/// with a values file; a `required` value that is missing fails both with Helm's message.
#[tokio::test]
async fn helm_renders_what_helm_template_prints() {
    let dir = tempfile::tempdir().expect("dir");
    helm_corpus(dir.path());
    let out = Command::new(cluster::reference_cli("helm"))
        .args(["create", "charts/created"])
        .current_dir(dir.path())
        .output()
        .expect("helm create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cases: [(&str, &str, &[&str]); 3] = [
        ("charts/created", "", &[]),
        ("charts/app", "", &[]),
        (
            "charts/app",
            "      values_files: [charts/app/values-prod.yaml]\n      values: {greeting: \"hi {{ .Release.Namespace }}\"}\n",
            &[
                "-f",
                "charts/app/values-prod.yaml",
                "--set",
                "greeting=hi {{ .Release.Namespace }}",
            ],
        ),
    ];
    for (chart, values, flags) in cases {
        let project = parse_project(&format!(
            "gitops:\n  manifest_projects:\n  - id: p\n    default_namespace: shop\n    helm:\n      chart: {chart}\n      release_name: web\n{values}"
        ));
        let ours = sluice(dir.path(), &project).expect("sluice renders");
        let mut args = vec![
            "template",
            "web",
            chart,
            "--namespace",
            "shop",
            "--skip-tests",
            "--include-crds",
        ];
        args.extend_from_slice(flags);
        let theirs = native("helm", &args, dir.path()).expect("helm template");
        let (ours, theirs) = (canonical(&ours), canonical(&theirs));
        eprintln!("{chart} {flags:?}: {} objects", theirs.len());
        assert!(theirs.len() >= 3, "{chart}: the chart renders objects");
        assert_eq!(
            ours, theirs,
            "{chart} {flags:?}: sluice and helm template differ"
        );
    }

    // Origins: the template, under the chart's directory, and the renderer.
    let project = parse_project(
        "gitops:\n  manifest_projects:\n  - id: p\n    helm:\n      chart: charts/app\n      release_name: web\n",
    );
    let files = sluice(dir.path(), &project).expect("render");
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for expected in [
        "charts/app/templates/deployment.yaml",
        "charts/app/charts/sub/templates/cm.yaml",
        "charts/app/charts/packed/templates/svc.yaml",
        "charts/app/crds/widgets.yaml",
    ] {
        assert!(paths.contains(&expected), "{expected} in {paths:?}");
    }
    assert!(
        !paths.iter().any(|p| p.contains("tests/")),
        "test hooks are skipped"
    );

    // A missing required value: both fail, and sluice says what Helm says.
    let project = parse_project(
        "gitops:\n  manifest_projects:\n  - id: p\n    helm:\n      chart: charts/app\n      release_name: web\n      values: {name: null}\n",
    );
    let err = sluice(dir.path(), &project)
        .expect_err("required value")
        .to_string();
    let theirs = native(
        "helm",
        &["template", "web", "charts/app", "--set", "name=null"],
        dir.path(),
    )
    .expect_err("helm fails too");
    assert!(err.contains("name is required"), "{err}");
    assert!(theirs.contains("name is required"), "{theirs}");
    assert!(err.starts_with("charts/app: helm v4.3.2: "), "{err}");
}

/// The path of a checked-out corpus, for committing: every file under `dir`.
fn entries(dir: &Path) -> Vec<sluice_testenv::git::Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<sluice_testenv::git::Entry>) {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        names.sort();
        for path in names {
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under root");
                out.push(sluice_testenv::git::file(
                    rel.to_str().expect("utf-8"),
                    std::fs::read(&path).expect("read"),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

fn value_of(files: &[sluice_testenv::git::Entry], path: &str) -> String {
    files
        .iter()
        .find_map(|e| match e {
            sluice_testenv::git::Entry::File(p, bytes) if p == path => {
                Some(String::from_utf8(bytes.clone()).expect("utf-8"))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{path} in the corpus"))
}

fn replace(files: &mut Vec<sluice_testenv::git::Entry>, path: &str, text: Option<String>) {
    files.retain(|e| !matches!(e, sluice_testenv::git::Entry::File(p, _) if p == path));
    if let Some(text) = text {
        files.push(sluice_testenv::git::file(path, text));
    }
}

async fn deployment_replicas(client: &kube::Client, ns: &str, name: &str) -> Option<i64> {
    let api = crate::support::api(client, ns, "apps/v1", "Deployment", "deployments");
    api.get_opt(name)
        .await
        .expect("get")
        .map(|d| d.data["spec"]["replicas"].as_i64().unwrap_or(-1))
}

async fn exists(client: &kube::Client, ns: &str, kind: &str, plural: &str, name: &str) -> bool {
    let v = if kind == "Deployment" {
        "apps/v1"
    } else {
        "v1"
    };
    crate::support::api(client, ns, v, kind, plural)
        .get_opt(name)
        .await
        .expect("get")
        .is_some()
}

/// A Kustomize overlay syncs (objects named, labelled and scaled as the overlay says, the
/// generated ConfigMap under its hashed name), then a commit that drops a resource from the
/// base prunes it.
#[tokio::test]
async fn a_kustomize_overlay_syncs_and_prunes_what_left_the_base() {
    let mut fx = Fixture::new("kust").await;
    let dir = tempfile::tempdir().expect("dir");
    kustomize_corpus(dir.path());
    let mut files = entries(dir.path());
    // The overlay's namespace is the test's.
    let kust = value_of(&files, "overlays/prod/kustomization.yaml")
        .replace("namespace: prod", &format!("namespace: {}", fx.ns));
    replace(&mut files, "overlays/prod/kustomization.yaml", Some(kust));
    fx.repo.commit("main", &files, "overlay");
    let project = crate::support::project(&fx.ns, "    paths: [{glob: \"overlays/prod/**\"}]\n");
    let settings = settings(&format!("kust-{}", fx.ns));
    let report = sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("sync");
    assert_eq!(
        deployment_replicas(&fx.client, &fx.ns, "prod-web-v1").await,
        Some(3)
    );
    assert!(exists(&fx.client, &fx.ns, "Service", "services", "prod-web-v1").await);
    let generated = report
        .results
        .iter()
        .find(|r| r.obj.name.starts_with("prod-app-config-v1-"))
        .expect("the generated ConfigMap was applied");
    let origin = generated.origin.as_ref().expect("origin");
    assert_eq!(origin.renderer.as_deref(), Some("kustomize v5.8.2"));

    // The base drops its Service: the overlay's output no longer has it, and it is pruned.
    let base = value_of(&files, "base/kustomization.yaml").replace("- service.yaml\n", "");
    replace(&mut files, "base/kustomization.yaml", Some(base));
    let patched = value_of(&files, "overlays/prod/kustomization.yaml").replace(
        "- target: {kind: Service, name: web}\n  patch: |-\n    - op: replace\n      path: /spec/ports/0/port\n      value: 8080\n",
        "",
    );
    replace(
        &mut files,
        "overlays/prod/kustomization.yaml",
        Some(patched),
    );
    fx.repo.commit("main", &files, "drop the service");
    sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("second sync");
    assert!(!exists(&fx.client, &fx.ns, "Service", "services", "prod-web-v1").await);
    assert_eq!(
        deployment_replicas(&fx.client, &fx.ns, "prod-web-v1").await,
        Some(3)
    );
}

/// A chart configured as agentk configured it (`gitops.charts[]`, values inline and from a
/// file of the chart's project) syncs with the cluster's Capabilities; a values change is
/// applied; a template removed from the chart is pruned. The same chart from sluice's own
/// `helm:` section renders the same objects.
#[tokio::test]
async fn an_agentk_chart_syncs_changes_values_and_prunes_a_removed_template() {
    let mut fx = Fixture::new("chart").await;
    let chart = [
        ("charts/web/Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\n".to_string()),
        (
            "charts/web/values.yaml",
            "replicas: 1\ncolor: blue\n".to_string(),
        ),
        (
            "charts/web/templates/deployment.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}\nspec:\n  replicas: {{ .Values.replicas }}\n  selector:\n    matchLabels: {app: {{ .Release.Name }}}\n  template:\n    metadata:\n      labels: {app: {{ .Release.Name }}}\n    spec:\n      containers:\n      - name: app\n        image: nginx:1.27\n".to_string(),
        ),
        (
            "charts/web/templates/config.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\ndata:\n  color: {{ .Values.color }}\n  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n  apps: {{ .Capabilities.APIVersions.Has \"apps/v1/Deployment\" | quote }}\n".to_string(),
        ),
        ("env/prod.yaml", "color: green\n".to_string()),
    ];
    let files = |chart: &[(&str, String)]| -> Vec<sluice_testenv::git::Entry> {
        chart
            .iter()
            .map(|(p, t)| sluice_testenv::git::file(p, t))
            .collect()
    };
    fx.repo.commit("main", &files(&chart), "chart");
    let repo_id = format!("group/{}", fx.ns);
    let config = |replicas: u32| {
        format!(
            "gitops:\n  charts:\n  - release_name: web\n    namespace: {ns}\n    max_history: 3\n    source:\n      project:\n        id: {repo_id}\n        path: charts/web\n    values:\n    - file:\n        project_id: {repo_id}\n        file: env/prod.yaml\n    - inline:\n        replicas: {replicas}\n",
            ns = fx.ns
        )
    };
    let project = sluice_agent::config::parse(&config(2), "test/config")
        .expect("agentk's chart config")
        .manifest_projects
        .remove(0);
    assert_eq!(project.id, format!("chart:{}/web", fx.ns));
    assert_eq!(project.repository(), repo_id);
    let settings = settings(&format!("chart-{}", fx.ns));
    sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("sync");
    assert_eq!(
        deployment_replicas(&fx.client, &fx.ns, "web").await,
        Some(2)
    );
    let cm = crate::support::api(&fx.client, &fx.ns, "v1", "ConfigMap", "configmaps")
        .get("web-config")
        .await
        .expect("configmap");
    assert_eq!(
        cm.data["data"]["color"], "green",
        "the values file wins over the chart's"
    );
    assert_eq!(cm.data["data"]["apps"], "true");
    let served = fx.cluster.capabilities().kube_version.clone();
    assert!(served.starts_with("v1."), "{served}");
    assert_eq!(
        cm.data["data"]["kube"]
            .as_str()
            .map(|v| served.starts_with(v)),
        Some(true),
        "the chart sees the cluster's version ({served}), not Helm's default"
    );

    // A values change.
    let project = sluice_agent::config::parse(&config(4), "test/config")
        .expect("config")
        .manifest_projects
        .remove(0);
    sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("values change");
    assert_eq!(
        deployment_replicas(&fx.client, &fx.ns, "web").await,
        Some(4)
    );

    // A template removed from the chart: its object is pruned.
    let without: Vec<(&str, String)> = chart
        .iter()
        .filter(|(p, _)| !p.ends_with("config.yaml"))
        .cloned()
        .collect();
    fx.repo.commit("main", &files(&without), "drop the config");
    sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("template removed");
    assert!(!exists(&fx.client, &fx.ns, "ConfigMap", "configmaps", "web-config").await);
    assert_eq!(
        deployment_replicas(&fx.client, &fx.ns, "web").await,
        Some(4)
    );

    // sluice's own section, same chart and values: the same objects.
    let own = crate::support::project_with_id(
        &repo_id,
        &fx.ns,
        "    helm:\n      chart: charts/web\n      release_name: web\n      values_files: [env/prod.yaml]\n      values: {replicas: 4}\n",
    );
    let tree_dir = tempfile::tempdir().expect("dir");
    for (p, t) in &without {
        write(tree_dir.path(), &[(*p, t.as_str())]);
    }
    let a = canonical(&sluice(tree_dir.path(), &own).expect("own section"));
    let b = canonical(&sluice(tree_dir.path(), &project).expect("agentk section"));
    assert_eq!(a, b);
}

/// What each Argo CD advisory did with a renderer run as a process: here each fails with
/// its origin, within the renderer's limits, and nothing reaches the cluster.
#[tokio::test]
async fn hostile_charts_and_overlays_fail_with_their_origin_and_change_nothing() {
    let mut fx = Fixture::new("hostile").await;
    let ok_chart = |extra: &[(&str, &str)]| -> Vec<sluice_testenv::git::Entry> {
        let mut files = vec![
            sluice_testenv::git::file(
                "chart/Chart.yaml",
                "apiVersion: v2\nname: c\nversion: 0.1.0\n",
            ),
            sluice_testenv::git::file(
                "chart/templates/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: innocent\n",
            ),
            sluice_testenv::git::file("secret/token", "s3cr3t-of-another-project"),
        ];
        for (p, t) in extra {
            files.retain(|e| !matches!(e, sluice_testenv::git::Entry::File(q, _) if q == p));
            files.push(sluice_testenv::git::file(p, t));
        }
        files
    };
    let chart_project = crate::support::project(
        &fx.ns,
        "    helm:\n      chart: chart\n      release_name: h\n",
    );
    let settings = settings(&format!("hostile-{}", fx.ns));
    let started = std::time::Instant::now();
    let cases: Vec<(&str, Vec<sluice_testenv::git::Entry>, &str)> = vec![
        (
            // CVE-2022-24731, CVE-2023-40026: a template reads a file outside its chart.
            ".Files.Get outside the chart",
            ok_chart(&[(
                "chart/templates/leak.yaml",
                "{{- if or (.Files.Get \"../secret/token\") (.Files.Get \"/etc/passwd\") (.Files.Get \"../../secret/token\") }}\n{{- fail \"LEAKED\" }}\n{{- else }}\n{{- fail \"nothing outside the chart is readable\" }}\n{{- end }}\n",
            )]),
            "nothing outside the chart is readable",
        ),
        (
            // include recursion.
            "include recursion",
            ok_chart(&[(
                "chart/templates/loop.yaml",
                "{{- define \"loop\" }}{{ include \"loop\" . }}{{ end }}{{ include \"loop\" . }}\n",
            )]),
            "loop",
        ),
        (
            // CVE-2022-31016: output without end.
            "1 GiB of output",
            ok_chart(&[(
                "chart/templates/big.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n{{- range $i := until 100000000 }}\n  k{{ $i }}: {{ repeat 100 \"x\" }}\n{{- end }}\n",
            )]),
            "chart: helm v4.3.2: failed: ",
        ),
        (
            // A chart repository over the network.
            "a dependency not committed",
            ok_chart(&[(
                "chart/Chart.yaml",
                "apiVersion: v2\nname: c\nversion: 0.1.0\ndependencies:\n- name: redis\n  version: 1.0.0\n  repository: https://charts.example.com\n",
            )]),
            "helm dependency build",
        ),
    ];
    for (what, files, expected) in cases {
        fx.repo.commit("main", &files, what);
        let err = sync_once(&mut fx.cluster, &fx.src, &chart_project, &settings)
            .await
            .expect_err(what)
            .to_string();
        eprintln!("{what}: {err}");
        assert!(err.contains(expected), "{what}: {err}");
        assert!(
            err.contains("chart: helm v4.3.2"),
            "{what} names the chart: {err}"
        );
        assert!(!err.contains("s3cr3t"), "{what}: {err}");
    }

    // CVE-2023-40584: a packaged subchart that unpacks to 300 MiB (300 KB committed).
    let bomb_dir = tempfile::tempdir().expect("dir");
    let script = "set -e; mkdir -p bomb/templates; printf 'apiVersion: v2\\nname: bomb\\nversion: 0.1.0\\n' > bomb/Chart.yaml; head -c 300M /dev/zero > bomb/templates/zero.txt; tar czf bomb-0.1.0.tgz bomb; rm -r bomb";
    let made = Command::new("sh")
        .args(["-c", script])
        .current_dir(bomb_dir.path())
        .status()
        .expect("sh");
    assert!(made.success());
    let tgz = std::fs::read(bomb_dir.path().join("bomb-0.1.0.tgz")).expect("tgz");
    assert!(tgz.len() < 1 << 20, "{} bytes", tgz.len());
    let mut files = ok_chart(&[(
        "chart/Chart.yaml",
        "apiVersion: v2\nname: c\nversion: 0.1.0\ndependencies:\n- name: bomb\n  version: 0.1.0\n",
    )]);
    files.push(sluice_testenv::git::file(
        "chart/charts/bomb-0.1.0.tgz",
        tgz,
    ));
    fx.repo.commit("main", &files, "bomb");
    let err = sync_once(&mut fx.cluster, &fx.src, &chart_project, &settings)
        .await
        .expect_err("decompression bomb")
        .to_string();
    eprintln!("a decompression bomb: {err}");
    assert!(err.starts_with("chart: helm v4.3.2: "), "{err}");

    // A symlink in a chart is refused before Helm runs; values from outside the
    // repository are refused when the configuration is read.
    fx.repo.commit(
        "main",
        &{
            let mut f = ok_chart(&[]);
            f.push(sluice_testenv::git::Entry::Symlink(
                "chart/templates/passwd.yaml".into(),
                "../../../../etc/passwd".into(),
            ));
            f
        },
        "symlink",
    );
    let err = sync_once(&mut fx.cluster, &fx.src, &chart_project, &settings)
        .await
        .expect_err("symlink")
        .to_string();
    assert!(
        err.contains("chart/templates/passwd.yaml: is a symbolic link"),
        "{err}"
    );
    let err = sluice_agent::config::parse(
        "gitops:\n  manifest_projects:\n  - id: p\n    helm:\n      values_files: [../../etc/passwd]\n",
        "c",
    )
    .expect_err("values path traversal (CVE-2022-24348)")
    .to_string();
    assert!(err.contains("\"..\" is not allowed"), "{err}");

    // Kustomize: a remote base, an exec plugin, a base through a symlink out of the
    // repository.
    let overlay = |kustomization: &str| {
        vec![
            sluice_testenv::git::file("app/kustomization.yaml", kustomization),
            sluice_testenv::git::file(
                "app/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: innocent\n",
            ),
            sluice_testenv::git::Entry::Symlink("links/outside".into(), "/etc".into()),
        ]
    };
    let kust_project = crate::support::project(&fx.ns, "    paths: [{glob: \"app/**\"}]\n");
    for (what, kustomization, expected) in [
        (
            "a remote base",
            "resources:\n- cm.yaml\n- https://github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v5.8.2\n",
            "app: kustomize v5.8.2:",
        ),
        (
            "an exec plugin",
            "resources:\n- cm.yaml\ntransformers:\n- |-\n  apiVersion: example.com/v1\n  kind: Run\n  metadata:\n    name: run\n    annotations:\n      config.kubernetes.io/function: |\n        exec:\n          path: /bin/sh\n",
            "app: kustomize v5.8.2:",
        ),
        (
            "a symlink out of the repository",
            "resources:\n- cm.yaml\n- ../links/outside/passwd\n",
            "app: kustomize v5.8.2:",
        ),
    ] {
        fx.repo.commit("main", &overlay(kustomization), what);
        let err = sync_once(&mut fx.cluster, &fx.src, &kust_project, &settings)
            .await
            .expect_err(what)
            .to_string();
        eprintln!("{what}: {err}");
        assert!(err.contains(expected), "{what}: {err}");
    }
    eprintln!("all hostile cases in {:?}", started.elapsed());

    // After the refusals, Kustomize renders again at once: a refused render's instance is
    // not reused (after a remote base, the next render in it hung until its deadline).
    let good = sluice_testenv::git::file(
        "app/kustomization.yaml",
        "resources:\n- cm.yaml\nnamePrefix: good-\n",
    );
    fx.repo
        .commit("main", &[good, overlay("")[1].clone()], "a good overlay");
    let again = std::time::Instant::now();
    sync_once(&mut fx.cluster, &fx.src, &kust_project, &settings)
        .await
        .expect("the next render");
    assert!(
        again.elapsed() < std::time::Duration::from_secs(20),
        "the next render took {:?}",
        again.elapsed()
    );
    assert!(
        exists(
            &fx.client,
            &fx.ns,
            "ConfigMap",
            "configmaps",
            "good-innocent"
        )
        .await
    );

    // Nothing of any of it reached the cluster.
    for name in ["innocent", "leak", "big"] {
        assert!(
            !exists(&fx.client, &fx.ns, "ConfigMap", "configmaps", name).await,
            "{name} was applied"
        );
    }
}

/// Encrypts `text` (a file named `name`) with the real `sops` for `recipient`.
fn sops_encrypt(name: &str, text: &str, recipient: &str, rule: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    let out = Command::new(cluster::reference_cli("sops"))
        .args(["encrypt", "--age", recipient])
        .args(rule)
        .arg(&path)
        // sops reads .sops.yaml upwards from the file: the temporary directory has none.
        .current_dir(dir.path())
        .output()
        .expect("sops encrypt");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

async fn key_secret(client: &kube::Client, ns: &str, name: &str, identity: &str) {
    use k8s_openapi::api::core::v1::Secret;
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), ns);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"age.agekey": format!("# created by the test\n{identity}\n")},
    }))
    .expect("secret");
    api.patch(
        name,
        &kube::api::PatchParams::apply("test").force(),
        &kube::api::Patch::Apply(&secret),
    )
    .await
    .expect("key secret");
}

/// SOPS files encrypted by the real `sops` (YAML with `encrypted_regex`, JSON with
/// `encrypted_suffix`) are decrypted with the age key of the Secret the project names and
/// applied; a file changed after encryption, a key that does not fit and a missing Secret
/// each fail naming the file or the Secret, apply nothing of the commit, and no decrypted
/// value appears in an error or the report.
#[tokio::test]
async fn sops_encrypted_secrets_apply_and_tampered_or_unkeyed_ones_change_nothing() {
    use age::secrecy::ExposeSecret;
    let mut fx = Fixture::new("sops").await;
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    key_secret(
        &fx.client,
        &fx.ns,
        "sops-age",
        identity.to_string().expose_secret(),
    )
    .await;

    let yaml = sops_encrypt(
        "db.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  labels:\n    app: web\ntype: Opaque\nstringData:\n  password: hunter2\ndata:\n  token: c2VjcmV0LXRva2Vu\n",
        &recipient,
        &["--encrypted-regex", "^(data|stringData)$"],
    );
    assert!(!yaml.contains("hunter2") && yaml.contains("ENC[AES256_GCM,"));
    let json = sops_encrypt(
        "api.json",
        r#"{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api"}, "stringData": {"api_token": "tok-123", "region": "eu"}}"#,
        &recipient,
        &["--encrypted-suffix", "_token"],
    );
    assert!(json.contains("\"region\": \"eu\"") && !json.contains("tok-123"));
    let project = crate::support::project(&fx.ns, "    decryption:\n      secret: sops-age\n");
    let settings = settings(&format!("sops-{}", fx.ns));
    fx.repo.commit(
        "main",
        &[
            sluice_testenv::git::file("db.yaml", &yaml),
            sluice_testenv::git::file("api.json", &json),
        ],
        "secrets",
    );
    let report = sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("sync");
    let secrets = crate::support::api(&fx.client, &fx.ns, "v1", "Secret", "secrets");
    let db = secrets.get("db").await.expect("db");
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    assert_eq!(db.data["data"]["password"], b64("hunter2"));
    assert_eq!(db.data["data"]["token"], "c2VjcmV0LXRva2Vu");
    let api = secrets.get("api").await.expect("api");
    assert_eq!(api.data["data"]["api_token"], b64("tok-123"));
    assert_eq!(api.data["data"]["region"], b64("eu"));
    let origin = report
        .results
        .iter()
        .find(|r| r.obj.name == "db")
        .and_then(|r| r.origin.clone())
        .expect("origin");
    assert_eq!(origin.renderer.as_deref(), Some(render::SOPS));
    assert!(!format!("{report:?}").contains("hunter2"));

    // Tampered: a label changed after encryption. Nothing of the commit is applied.
    let tampered = yaml.replace("app: web", "app: evil");
    fx.repo.commit(
        "main",
        &[
            sluice_testenv::git::file("db.yaml", &tampered),
            sluice_testenv::git::file("api.json", &json),
            sluice_testenv::git::file("new.yaml", crate::support::configmap("new", "1")),
        ],
        "tampered",
    );
    let err = sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect_err("tampered")
        .to_string();
    assert!(err.starts_with("db.yaml: MAC mismatch"), "{err}");
    assert!(!exists(&fx.client, &fx.ns, "ConfigMap", "configmaps", "new").await);
    let labels = secrets.get("db").await.expect("db").metadata.labels;
    assert_eq!(
        labels.unwrap_or_default().get("app").map(String::as_str),
        Some("web")
    );

    // A key that does not fit, then no Secret at all.
    let other = age::x25519::Identity::generate();
    key_secret(
        &fx.client,
        &fx.ns,
        "sops-age",
        other.to_string().expose_secret(),
    )
    .await;
    fx.repo.commit(
        "main",
        &[
            sluice_testenv::git::file("db.yaml", &yaml),
            sluice_testenv::git::file("new.yaml", crate::support::configmap("new", "1")),
        ],
        "other key",
    );
    let err = sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect_err("wrong key")
        .to_string();
    assert!(
        err.contains("db.yaml: none of the project's 1 age keys decrypts"),
        "{err}"
    );
    let absent = crate::support::project(&fx.ns, "    decryption:\n      secret: absent\n");
    let err = sync_once(&mut fx.cluster, &fx.src, &absent, &settings)
        .await
        .expect_err("no secret")
        .to_string();
    assert_eq!(
        err,
        format!("decryption keys: Secret {}/absent: not found", fx.ns)
    );
    assert!(!exists(&fx.client, &fx.ns, "ConfigMap", "configmaps", "new").await);
    assert!(
        secrets.get_opt("api").await.expect("api").is_some(),
        "nothing was pruned"
    );
}

/// `sluice render`, `validate` and `diff` on all three kinds: a Kustomize overlay, a chart
/// directory, and a SOPS file (masked unless `--show-secrets`; refused without a key).
#[tokio::test]
async fn the_cli_renders_validates_and_diffs_overlays_charts_and_sops_files() {
    use age::secrecy::ExposeSecret;
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "clirender").await;
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path();
    kustomize_corpus(root);
    let dev = std::fs::read_to_string(root.join("overlays/dev/kustomization.yaml")).expect("read");
    write(
        root,
        &[
            (
                "overlays/dev/kustomization.yaml",
                &dev.replace("namespace: dev", &format!("namespace: {ns}")),
            ),
            (
                "kust.yaml",
                &format!(
                    "gitops:\n  manifest_projects:\n  - id: k\n    default_namespace: {ns}\n    paths: [{{glob: \"overlays/dev/**\"}}]\n"
                ),
            ),
            (
                "chart/Chart.yaml",
                "apiVersion: v2\nname: c\nversion: 0.1.0\n",
            ),
            (
                "chart/templates/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\ndata:\n  a: \"1\"\n",
            ),
            (
                "chart.yaml",
                &format!(
                    "gitops:\n  manifest_projects:\n  - id: c\n    default_namespace: {ns}\n    helm: {{chart: chart, release_name: web}}\n"
                ),
            ),
        ],
    );
    let identity = age::x25519::Identity::generate();
    let key = root.join("key.txt");
    std::fs::write(&key, identity.to_string().expose_secret()).expect("key");
    let encrypted = sops_encrypt(
        "s.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  password: hunter2\n",
        &identity.to_public().to_string(),
        &["--encrypted-regex", "^(data|stringData)$"],
    );
    write(root, &[("secrets/s.yaml", &encrypted)]);
    write(
        root,
        &[(
            "sops.yaml",
            &format!(
                "gitops:\n  manifest_projects:\n  - id: s\n    default_namespace: {ns}\n    paths: [{{glob: \"secrets/**\"}}]\n"
            ),
        )],
    );
    let sluice = |args: &[&str]| {
        let out = Command::new(sluice_testenv::wasm::sluice_binary())
            .args(args)
            .current_dir(root)
            .env("SLUICE_RENDERERS_DIR", cluster::renderers_dir())
            .env("KUBECONFIG", &cluster::shared().kubeconfig)
            .env_remove("SOPS_AGE_KEY_FILE")
            .output()
            .expect("run sluice");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let key = key.to_str().expect("utf-8");

    let (code, out, err) = sluice(&["render", ".", "--config", "kust.yaml", "-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("\"replicas\": 0") && out.contains("app-config-"),
        "{out}"
    );
    let (code, out, err) = sluice(&["render", "chart"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("name: release-name-cm"), "{out}");
    let (code, _, err) = sluice(&["validate", ".", "--config", "chart.yaml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("1 objects valid"), "{err}");

    let (code, _, err) = sluice(&["render", ".", "--config", "sops.yaml"]);
    assert_eq!(code, Some(1), "no key: {err}");
    assert!(
        err.contains("secrets/s.yaml: encrypted with SOPS, and no age key was given"),
        "{err}"
    );
    let (code, out, err) = sluice(&[
        "render",
        ".",
        "--config",
        "sops.yaml",
        "--age-key-file",
        key,
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("*** (decrypted") && !out.contains("hunter2"),
        "{out}"
    );
    let (code, out, _) = sluice(&[
        "render",
        ".",
        "--config",
        "sops.yaml",
        "--age-key-file",
        key,
        "--show-secrets",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("password: hunter2"), "{out}");

    // diff: all three against the cluster, exit 1 (changes), no decrypted value printed.
    for (config, expected) in [
        ("kust.yaml", format!("+++ git/Deployment/{ns}/web")),
        ("chart.yaml", format!("+++ git/ConfigMap/{ns}/web-cm")),
        ("sops.yaml", format!("+++ git/Secret/{ns}/s")),
    ] {
        let (code, out, err) = sluice(&[
            "diff",
            ".",
            "--config",
            config,
            "--inventory-id",
            "cli-render",
            "--age-key-file",
            key,
        ]);
        assert_eq!(code, Some(1), "{config}: {err}");
        assert!(out.contains(&expected), "{config}: {out}");
        assert!(!out.contains("hunter2"), "{config}: {out}");
    }
}

/// A chart from sluice's own `helm:` section syncs with its values files and inline values,
/// and its CRDs (`crds/`) come first, so its custom resources apply in the same sync.
#[tokio::test]
async fn a_chart_from_sluices_own_section_syncs_with_its_crds_and_values() {
    let mut fx = Fixture::new("ownchart").await;
    let crd_group = format!("{}.example.com", fx.ns);
    let files = vec![
        sluice_testenv::git::file(
            "deploy/chart/Chart.yaml",
            "apiVersion: v2\nname: app\nversion: 0.1.0\n",
        ),
        sluice_testenv::git::file("deploy/chart/values.yaml", "size: small\ncolor: blue\n"),
        sluice_testenv::git::file(
            "deploy/chart/crds/gadget.yaml",
            format!(
                "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: gadgets.{crd_group}\nspec:\n  group: {crd_group}\n  names: {{kind: Gadget, plural: gadgets, singular: gadget}}\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n"
            ),
        ),
        sluice_testenv::git::file(
            "deploy/chart/templates/gadget.yaml",
            format!(
                "apiVersion: {crd_group}/v1\nkind: Gadget\nmetadata:\n  name: {{{{ .Release.Name }}}}-gadget\nspec:\n  size: {{{{ .Values.size }}}}\n  color: {{{{ .Values.color }}}}\n"
            ),
        ),
        sluice_testenv::git::file("deploy/prod.yaml", "size: large\n"),
    ];
    fx.repo.commit("main", &files, "chart with a CRD");
    let project = crate::support::project(
        &fx.ns,
        "    helm:\n      chart: deploy/chart\n      release_name: shop\n      values_files: [deploy/prod.yaml]\n      values: {color: red}\n",
    );
    let settings = settings(&format!("ownchart-{}", fx.ns));
    sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("sync");
    let gadgets = crate::support::api(
        &fx.client,
        &fx.ns,
        &format!("{crd_group}/v1"),
        "Gadget",
        "gadgets",
    );
    let gadget = gadgets
        .get("shop-gadget")
        .await
        .expect("the custom resource");
    assert_eq!(
        gadget.data["spec"]["size"], "large",
        "the values file over the chart's"
    );
    assert_eq!(
        gadget.data["spec"]["color"], "red",
        "inline values over the files"
    );
    // The CRD is the project's: when both leave the chart, the Gadget and the CRD are
    // pruned.
    fx.repo.commit(
        "main",
        &[
            sluice_testenv::git::file(
                "deploy/chart/Chart.yaml",
                "apiVersion: v2\nname: app\nversion: 0.1.0\n",
            ),
            sluice_testenv::git::file(
                "deploy/chart/templates/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-left\n",
            ),
            sluice_testenv::git::file("deploy/prod.yaml", "size: large\n"),
        ],
        "the CRD and its resource leave the chart",
    );
    let report = sync_once(&mut fx.cluster, &fx.src, &project, &settings)
        .await
        .expect("prune");
    let pruned: Vec<String> = report
        .results
        .iter()
        .filter(|r| r.action == sluice_engine::apply::Action::Pruned)
        .map(|r| r.obj.kind.to_string())
        .collect();
    assert_eq!(pruned.len(), 2, "{pruned:?}");
    let crds = crate::support::api_all(
        &fx.client,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
    );
    assert!(
        crds.get_opt(&format!("gadgets.{crd_group}"))
            .await
            .expect("get")
            .is_none_or(|c| c.metadata.deletion_timestamp.is_some())
    );
}
