//! `sluice generate`: its output applies with `kubectl apply --server-side`, and the agent
//! running as the generated ServiceAccount (a TokenRequest token, no admin credentials) can
//! sync the README demo; the namespaced variant cannot touch any other namespace.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use sluice_testenv::git::file;
use sluice_testenv::{cluster, git, wasm};

fn run(bin: &Path, args: &[&str], stdin: &[u8], kubeconfig: &Path) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `sluice generate ARGS` (the token on stdin), applied with `kubectl apply --server-side`.
fn generate_and_apply(args: &[&str], token: &str) -> String {
    let admin = &cluster::shared().kubeconfig;
    let mut all = vec!["generate", "--git-token-file", "-"];
    all.extend_from_slice(args);
    let manifests = ok(
        &run(&wasm::sluice_binary(), &all, token.as_bytes(), admin),
        "sluice generate",
    );
    assert!(!manifests.contains(token), "the token is in base64 only");
    let kubectl = cluster::build().expect("binaries").join("kubectl");
    ok(
        &run(
            &kubectl,
            &["apply", "--server-side", "-f", "-"],
            manifests.as_bytes(),
            admin,
        ),
        "kubectl apply --server-side",
    );
    manifests
}

/// A kubeconfig for ServiceAccount `sa` in `ns`: a token from the TokenRequest API, the test
/// cluster's server and CA, no client certificate.
async fn kubeconfig_for(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    dir: &Path,
) -> std::path::PathBuf {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let token = sas
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("a token")
        .token
        .expect("a token");
    let admin = kube::config::Kubeconfig::read_from(&cluster::shared().kubeconfig)
        .expect("admin kubeconfig");
    let c = admin.clusters[0].cluster.as_ref().expect("cluster");
    let path = dir.join(format!("{ns}-{sa}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
            c.server.as_deref().expect("server"),
            c.certificate_authority.as_deref().expect("CA file"),
        ),
    )
    .expect("write kubeconfig");
    path
}

fn demo() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nginx/deployment.yaml"),
    )
    .expect("examples/nginx/deployment.yaml")
}

#[tokio::test]
async fn the_generated_install_applies_and_its_rbac_is_enough_for_the_demo_and_no_more() {
    let client = cluster::client().await;
    let target = cluster::namespace(&client, "gen").await;
    let other = cluster::namespace(&client, "gen-other").await;
    let agent_ns = format!("{target}-agent");
    let server = git::shared();
    let config_repo = server.create_repo(&format!("group/{target}-agents"));
    let demo_repo = server.create_repo(&format!("group/{target}-demo"));
    demo_repo.commit("main", &[file("deployment.yaml", demo())], "nginx");
    let elsewhere = server.create_repo(&format!("group/{target}-elsewhere"));
    elsewhere.commit(
        "main",
        &[file(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
        )],
        "x",
    );
    config_repo.commit(
        "main",
        &[file(
            ".gitlab/agents/gen/sluice.yaml",
            format!(
                "gitops:\n  manifest_projects:\n  - id: group/{target}-demo\n    default_namespace: {target}\n    reconcile_timeout: 120s\n  - id: group/{target}-elsewhere\n    default_namespace: {other}\n"
            ),
        )],
        "two projects",
    );

    // The least-privilege variant, for `target` only.
    let manifests = generate_and_apply(
        &[
            "--agent-name",
            "gen",
            "--agent-namespace",
            &agent_ns,
            "--config-repo",
            config_repo.http_url(),
            "--git-base-url",
            server.base_url(),
            "--rbac",
            "namespaced",
            "--namespace",
            &target,
            "--replicas",
            "2",
        ],
        "glpat-not-really-a-token",
    );
    assert!(!manifests.contains("ClusterRole"), "{manifests}");
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &agent_ns);
    let agent = deploys
        .get("sluice-gen")
        .await
        .expect("the agent's Deployment");
    assert_eq!(agent.spec.and_then(|s| s.replicas), Some(2));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &agent_ns);
    let token = secrets
        .get("sluice-gen-git")
        .await
        .expect("token Secret")
        .data
        .unwrap_or_default();
    assert_eq!(
        token.get("token").map(|b| b.0.as_slice()),
        Some(&b"glpat-not-really-a-token"[..])
    );

    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = kubeconfig_for(&client, &agent_ns, "sluice-gen", dir.path()).await;
    let cache = dir.path().join("cache").display().to_string();
    let sync = |kubeconfig: &Path| {
        run(
            &wasm::sluice_binary(),
            &[
                "sync",
                "--config-repo",
                config_repo.http_url(),
                "--agent-name",
                "gen",
                "--git-base-url",
                server.base_url(),
                "--cache-dir",
                &cache,
            ],
            b"",
            kubeconfig,
        )
    };
    let out = sync(&kubeconfig);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "one project is outside the grant: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |project: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(project))
            .unwrap_or_else(|| panic!("no row for {project}: {stdout}"))
            .to_string()
    };
    let demo_row = row(&format!("group/{target}-demo"));
    assert!(
        demo_row.contains(" True ") && demo_row.contains("created=2"),
        "{stdout}"
    );
    let refused = row(&format!("group/{target}-elsewhere"));
    assert!(
        refused.contains(" False ") && refused.contains("forbidden"),
        "{stdout}"
    );
    let in_target: Api<Deployment> = Api::namespaced(client.clone(), &target);
    assert!(
        in_target.get_opt("nginx").await.expect("get").is_some(),
        "the demo is synced"
    );
    let in_other: Api<ConfigMap> = Api::namespaced(client.clone(), &other);
    let names: Vec<String> = in_other
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert_eq!(names, ["kube-root-ca.crt"], "nothing written in {other}");

    // The default variant (cluster-admin, as agentk's install) syncs both.
    let admin_ns = format!("{target}-admin");
    generate_and_apply(
        &[
            "--agent-name",
            "gen",
            "--agent-namespace",
            &admin_ns,
            "--config-repo",
            config_repo.http_url(),
            "--git-base-url",
            server.base_url(),
        ],
        "another-token",
    );
    let kubeconfig = kubeconfig_for(&client, &admin_ns, "sluice-gen", dir.path()).await;
    let out = sync(&kubeconfig);
    ok(&out, "sync as the cluster-admin ServiceAccount");
    assert!(in_other.get_opt("x").await.expect("get").is_some());
}
