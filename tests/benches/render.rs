//! The renderers (Kustomize and Helm compiled to WebAssembly, run in sluice's sandbox)
//! beside the native CLIs of the same versions, in one run:
//!
//! `cargo bench -p sluice-testenv --bench render`
//!
//! Inputs: the chart `helm create` writes; a chart of 60 templates with two subcharts; an
//! overlay over three bases. For each, the median wall time of 15 runs of:
//!
//! - `native`: the `helm template` / `kustomize build` process (its start included), as
//!   Argo CD's repo-server runs it;
//! - `sluice CLI`: the `sluice render` process (release build; start, mapping the
//!   precompiled renderer, rendering, decoding, printing), when `target/release/sluice`
//!   exists (`cargo build --release -p sluice`);
//! - `warm`: one render inside a running process (what an agent pays per render: a fresh
//!   sandboxed instance, the Go runtime's start, the render), the in-memory memo cleared;
//! - `memo`: the same request again (a resync of an unchanged commit): no render.
//!
//! Then the cold costs: compiling each renderer from its module (what `sluice renderers
//! compile` does once per image), and mapping the precompiled artefact.
//!
//! No timing assertions: speed goals live here, not in tests.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_agent::config::ManifestProject;
use sluice_agent::render;
use sluice_agent::select::{self, Dir};
use sluice_testenv::cluster;
use sluice_wasm::renderer::Renderers;

/// The agent's allocator (host/cli/src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 15;

fn write(dir: &Path, path: &str, text: &str) {
    let path = dir.join(path);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn median(f: impl FnMut()) -> Duration {
    sluice_testenv::median_time(RUNS, f)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chart of `templates` templates (Deployments, Services and ConfigMaps with helpers),
/// with two subcharts of the same shape.
fn big_chart(dir: &Path, name: &str, templates: usize, subcharts: &[&str]) {
    let deps: String = subcharts
        .iter()
        .map(|s| format!("- name: {s}\n  version: 0.1.0\n"))
        .collect();
    let deps = if deps.is_empty() {
        String::new()
    } else {
        format!("dependencies:\n{deps}")
    };
    write(
        dir,
        "Chart.yaml",
        &format!("apiVersion: v2\nname: {name}\nversion: 0.1.0\n{deps}"),
    );
    write(
        dir,
        "values.yaml",
        "replicas: 2\nimage: nginx:1.27\nlabels: {team: web, tier: front}\n",
    );
    write(
        dir,
        "templates/_helpers.tpl",
        &format!(
            "{{{{- define \"{name}.labels\" -}}}}\n{{{{- range $k, $v := .Values.labels }}}}\n{{{{ $k }}}}: {{{{ $v | quote }}}}\n{{{{- end }}}}\napp.kubernetes.io/instance: {{{{ .Release.Name }}}}\n{{{{- end -}}}}\n"
        ),
    );
    for i in 0..templates {
        let body = match i % 3 {
            0 => format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{{{ .Release.Name }}}}-{name}-{i}\n  labels:\n{{{{ include \"{name}.labels\" . | indent 4 }}}}\nspec:\n  replicas: {{{{ .Values.replicas }}}}\n  selector:\n    matchLabels: {{app: {name}-{i}}}\n  template:\n    metadata:\n      labels: {{app: {name}-{i}}}\n    spec:\n      containers:\n      - name: app\n        image: {{{{ .Values.image | quote }}}}\n"
            ),
            1 => format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {{{{ .Release.Name }}}}-{name}-{i}\n  labels:\n{{{{ include \"{name}.labels\" . | indent 4 }}}}\nspec:\n  selector: {{app: {name}-{i}}}\n  ports:\n  - port: 80\n"
            ),
            _ => format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{{{ .Release.Name }}}}-{name}-{i}\ndata:\n{{{{- range $i, $e := until 10 }}}}\n  key{{{{ $i }}}}: {{{{ printf \"value-%d\" $e | quote }}}}\n{{{{- end }}}}\n"
            ),
        };
        write(dir, &format!("templates/t{i}.yaml"), &body);
    }
    for s in subcharts {
        big_chart(&dir.join("charts").join(s), s, templates / 3, &[]);
    }
}

/// Three bases and an overlay over them with the usual transformations.
fn overlay(dir: &Path) {
    for b in ["web", "api", "worker"] {
        write(
            dir,
            &format!("bases/{b}/kustomization.yaml"),
            &format!(
                "resources: [deployment.yaml, service.yaml]\nconfigMapGenerator:\n- name: {b}-config\n  literals: [A=1, B=2]\n"
            ),
        );
        write(
            dir,
            &format!("bases/{b}/deployment.yaml"),
            &format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {b}\nspec:\n  selector:\n    matchLabels: {{app: {b}}}\n  template:\n    metadata:\n      labels: {{app: {b}}}\n    spec:\n      containers:\n      - name: {b}\n        image: nginx:1.25\n        envFrom: [{{configMapRef: {{name: {b}-config}}}}]\n"
            ),
        );
        write(
            dir,
            &format!("bases/{b}/service.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {b}\nspec:\n  selector: {{app: {b}}}\n  ports: [{{port: 80}}]\n"
            ),
        );
    }
    write(
        dir,
        "overlays/prod/kustomization.yaml",
        "namespace: prod\nnamePrefix: prod-\nlabels:\n- pairs: {env: prod}\nresources: [../../bases/web, ../../bases/api, ../../bases/worker]\nimages:\n- name: nginx\n  newTag: \"1.27\"\nreplicas:\n- name: web\n  count: 3\npatches:\n- target: {kind: Deployment}\n  patch: |-\n    - op: add\n      path: /spec/template/metadata/annotations\n      value: {checked: \"yes\"}\n",
    );
}

fn project(yaml: &str) -> ManifestProject {
    sluice_agent::config::parse(yaml, "bench")
        .expect("config")
        .manifest_projects
        .remove(0)
}

fn main() {
    let renderers_dir = cluster::renderers_dir();
    let (helm, kustomize) = (
        cluster::reference_cli("helm"),
        cluster::reference_cli("kustomize"),
    );
    let work = tempfile::tempdir().expect("dir");
    let root = work.path();
    run(Command::new(&helm)
        .args(["create", "created"])
        .current_dir(root));
    big_chart(&root.join("big"), "big", 60, &["alpha", "beta"]);
    overlay(root);
    write(
        root,
        "kust.yaml",
        "gitops:\n  manifest_projects:\n  - id: bench\n    paths: [{glob: \"overlays/prod/**\"}]\n",
    );

    let before = memory();
    let renderers = Arc::new(Renderers::new(Some(renderers_dir.clone()), None).expect("renderers"));
    renderers.compile_all().expect("the renderers load");
    let loaded = memory();
    let cx = render::Context {
        renderers: Some(renderers.clone()),
        capabilities: None,
        keys: None,
    };
    let tree = Dir::walk(root).expect("walk");
    let limits = select::Limits::default();
    let sluice_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/sluice");
    let sluice_bin = sluice_bin.is_file().then_some(sluice_bin);

    println!(
        "| input | objects | native CLI process | sluice render process | warm render in a running agent | resync (memo) |"
    );
    println!("|---|---|---|---|---|---|");
    let cases: [Case; 3] = [
        (
            "`helm create` chart",
            project(
                "gitops:\n  manifest_projects:\n  - id: bench\n    helm: {chart: created, release_name: release-name, include_crds: false}\n",
            ),
            vec!["template", "created"],
            helm.as_path(),
            vec!["render".into(), root.join("created").display().to_string()],
        ),
        (
            "60 templates, 2 subcharts",
            project(
                "gitops:\n  manifest_projects:\n  - id: bench\n    helm: {chart: big, release_name: release-name, include_crds: false}\n",
            ),
            vec!["template", "big"],
            helm.as_path(),
            vec!["render".into(), root.join("big").display().to_string()],
        ),
        (
            "overlay over 3 bases",
            project(
                "gitops:\n  manifest_projects:\n  - id: bench\n    paths: [{glob: \"overlays/prod/**\"}]\n",
            ),
            vec!["build", "overlays/prod"],
            kustomize.as_path(),
            vec![
                "render".into(),
                root.display().to_string(),
                "--config".into(),
                root.join("kust.yaml").display().to_string(),
            ],
        ),
    ];
    for (name, project, args, cli, sluice_args) in cases {
        let objects = sluice_agent::decode::decode(
            &render::render(&tree, &project, &limits, &cx).expect("render"),
            "bench",
            "c",
        )
        .expect("decode")
        .len();
        let native = median(|| run(Command::new(cli).args(&args).current_dir(root)));
        let process = sluice_bin.as_ref().map(|bin| {
            median(|| {
                run(Command::new(bin)
                    .args(&sluice_args)
                    .env("SLUICE_RENDERERS_DIR", &renderers_dir))
            })
        });
        let warm = median(|| {
            renderers.forget();
            render::render(&tree, &project, &limits, &cx).expect("render");
        });
        let memo = median(|| {
            render::render(&tree, &project, &limits, &cx).expect("render");
        });
        println!(
            "| {name} | {objects} | {:.1} ms | {} | {:.1} ms | {:.2} ms |",
            ms(native),
            process.map_or("(no target/release/sluice)".into(), |p| format!(
                "{:.1} ms",
                ms(p)
            )),
            ms(warm),
            ms(memo),
        );
    }

    let after = memory();
    println!();
    println!(
        "Memory of this process (VmRSS / VmHWM): {:.1} / {:.1} MiB before any renderer; {:.1} / {:.1} MiB with both mapped; {:.1} / {:.1} MiB after the renders above (an instance of each kept warm).",
        before.0, before.1, loaded.0, loaded.1, after.0, after.1
    );
    println!();
    println!(
        "| renderer | module | compile from the module (once per image) | precompiled artefact | map the precompiled artefact |"
    );
    println!("|---|---|---|---|---|");
    for name in ["kustomize", "helm"] {
        let cold = tempfile::tempdir().expect("dir");
        let module = renderers_dir.join(format!("{name}.wasm"));
        std::fs::copy(&module, cold.path().join(format!("{name}.wasm"))).expect("copy");
        let fresh = Renderers::new(Some(cold.path().to_path_buf()), None).expect("renderers");
        let renderer = if name == "helm" {
            sluice_wasm::renderer::Renderer::Helm
        } else {
            sluice_wasm::renderer::Renderer::Kustomize
        };
        let start = Instant::now();
        fresh
            .render(renderer, &serde_json::json!({"files": {}}))
            .ok();
        let compile = start.elapsed();
        let again = Renderers::new(Some(cold.path().to_path_buf()), None).expect("renderers");
        let start = Instant::now();
        again
            .render(renderer, &serde_json::json!({"files": {}}))
            .ok();
        let mapped = start.elapsed();
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
        println!(
            "| {name} | {:.1} MB | {:.1} s (and the first render) | {:.1} MB | {:.0} ms (and the first render) |",
            size(&module),
            compile.as_secs_f64(),
            size(&cold.path().join(format!("{name}.cwasm"))),
            ms(mapped),
        );
    }
}

/// A bench input: its name, the project that renders it, the native CLI and its
/// arguments, and `sluice`'s arguments.
type Case<'a> = (
    &'a str,
    ManifestProject,
    Vec<&'a str>,
    &'a Path,
    Vec<String>,
);

/// This process's resident memory now and at its peak, in MiB (`/proc/self/status`).
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
