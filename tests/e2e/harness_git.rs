//! The git server: clones over smart HTTP (anonymous and with a token), refusals, file://.

use std::process::{Command, Output};

use sluice_testenv::git::{self, file};

fn clone(url: &str) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new("git")
        .args(["-c", "credential.helper=", "clone", "--quiet", url])
        .arg(dir.path().join("c"))
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .output()
        .expect("run git clone");
    (out, dir)
}

fn with_credentials(url: &str, user: &str, password: &str) -> String {
    url.replacen("http://", &format!("http://{user}:{password}@"), 1)
}

#[test]
fn anonymous_repository_clones_over_http() {
    let repo = git::shared().create_repo("group/public-app");
    let commit = repo.commit("main", &[file("app/cm.yaml", "kind: ConfigMap\n")], "first");

    let (out, dir) = clone(repo.http_url());
    assert!(
        out.status.success(),
        "clone failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cloned = std::fs::read_to_string(dir.path().join("c/app/cm.yaml")).expect("file in clone");
    assert_eq!(cloned, "kind: ConfigMap\n");
    let head = Command::new("git")
        .arg("-C")
        .arg(dir.path().join("c"))
        .args(["rev-parse", "HEAD"])
        .output()
        .expect("rev-parse");
    assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), commit);
}

#[test]
fn private_repository_needs_the_token() {
    let server = git::shared();
    let repo = server.create_repo("private/team-app");
    repo.commit("main", &[file("a.yaml", "x: 1\n")], "first");

    let (out, dir) = clone(&with_credentials(repo.http_url(), "oauth2", server.token()));
    assert!(
        out.status.success(),
        "clone with token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("c/a.yaml").exists());

    let (out, _) = clone(repo.http_url());
    assert!(
        !out.status.success(),
        "clone without credentials must be refused"
    );
    let (out, _) = clone(&with_credentials(repo.http_url(), "oauth2", "wrong-token"));
    assert!(
        !out.status.success(),
        "clone with a wrong token must be refused"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Authentication failed") || stderr.contains("401"),
        "unexpected refusal: {stderr}"
    );
}

#[test]
fn refs_move_tag_delete_and_force_push() {
    let repo = git::shared().create_repo("group/refs");
    let first = repo.commit("main", &[file("a.yaml", "v: 1\n")], "first");
    let second = repo.commit("main", &[file("a.yaml", "v: 2\n")], "second");
    repo.tag("v1", &first);
    assert_eq!(
        repo.resolve("refs/tags/v1").as_deref(),
        Some(first.as_str())
    );

    // Force-push: main moves to a commit that does not descend from it.
    let rewritten = repo.commit_tree(&[file("a.yaml", "v: 3\n")], Some(&first), "rewritten");
    repo.set_ref("refs/heads/main", &rewritten);
    assert_eq!(
        repo.resolve("refs/heads/main").as_deref(),
        Some(rewritten.as_str())
    );
    assert_ne!(rewritten, second);

    repo.delete_ref("refs/tags/v1");
    assert_eq!(repo.resolve("refs/tags/v1"), None);

    let (out, dir) = clone(&repo.file_url());
    assert!(
        out.status.success(),
        "file:// clone failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("c/a.yaml")).expect("file"),
        "v: 3\n"
    );
}
