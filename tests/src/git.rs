//! A real git server over smart HTTP, and helpers that shape its repositories.
//!
//! The server is a small axum app that runs `git http-backend` as a CGI for every request
//! (the same program nginx + fcgiwrap would run). Repositories whose path starts with
//! `private/` require HTTP basic auth with any user name and the server's token as password
//! (GitLab's token convention); all other repositories are anonymous. Every repository can
//! also be reached as `file://`.
//!
//! Repositories are bare; helpers write commits with plumbing (`hash-object`,
//! `update-index` on a private index, `write-tree`, `commit-tree`, `update-ref`), so moving
//! a branch backwards, deleting a ref or force-pushing is a single ref update.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;

/// Repositories under this prefix need credentials.
pub const PRIVATE_PREFIX: &str = "private/";

/// A running git server.
#[derive(Debug)]
pub struct GitServer {
    root: PathBuf,
    base_url: String,
    https_base_url: String,
    token: String,
    ca_pem: String,
}

static SHARED: OnceLock<Result<GitServer, String>> = OnceLock::new();

/// Response bytes the server sent, per repository (`group/app.git`).
static SERVED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, u64>>> =
    std::sync::LazyLock::new(Default::default);

fn count_served(path: &str, bytes: usize) {
    let repo = match path.trim_start_matches('/').split_once(".git/") {
        Some((repo, _)) => format!("{repo}.git"),
        None => return,
    };
    let mut served = SERVED.lock().unwrap_or_else(|e| e.into_inner());
    *served.entry(repo).or_default() += bytes as u64;
}

/// The git server of this test run, started on first use.
///
/// # Panics
/// When the server cannot start; tests then fail with that reason.
pub fn shared() -> &'static GitServer {
    match SHARED.get_or_init(GitServer::start) {
        Ok(s) => s,
        Err(e) => panic!("the test git server could not start: {e}"),
    }
}

/// One file of a commit.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A regular file with this content.
    File(String, Vec<u8>),
    /// A symbolic link pointing at the target path.
    Symlink(String, String),
}

/// Shorthand for a regular file entry.
pub fn file(path: &str, content: impl AsRef<[u8]>) -> Entry {
    Entry::File(path.to_string(), content.as_ref().to_vec())
}

impl GitServer {
    fn start() -> Result<GitServer, String> {
        let root = crate::procs::fresh_run_dir("sluice-git")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("failed to bind: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let tls_listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("failed to bind: {e}"))?;
        tls_listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let tls_port = tls_listener.local_addr().map_err(|e| e.to_string())?.port();
        let (ca_pem, cert_pem, key_pem) = crate::pki::serving_cert_pem()?;
        let token = format!("glpat-test-{:016x}", random_u64());
        let state = (root.clone(), token.clone());
        let tls_state = state.clone();
        // Its own runtime on its own thread: every #[tokio::test] has a runtime that ends
        // with the test, and the server must outlive them all.
        std::thread::Builder::new()
            .name("git-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the git server");
                rt.block_on(async move {
                    // Test certificates need a crypto provider; ring, as the rest of the run.
                    let _ = rustls::crypto::ring::default_provider().install_default();
                    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
                        cert_pem.into_bytes(),
                        key_pem.into_bytes(),
                    )
                    .await
                    .expect("TLS config for the git server");
                    let app = axum::Router::new()
                        .fallback(move |m, u, h, b| serve(tls_state.clone(), m, u, h, b));
                    let https = axum_server::from_tcp_rustls(tls_listener, tls)
                        .expect("https listener")
                        .serve(app.into_make_service());
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("listener into tokio");
                    let app = axum::Router::new()
                        .fallback(move |m, u, h, b| serve(state.clone(), m, u, h, b));
                    let http = axum::serve(listener, app);
                    let (a, b) = tokio::join!(http, https);
                    a.expect("git server (http)");
                    b.expect("git server (https)");
                });
            })
            .map_err(|e| format!("failed to spawn the git server thread: {e}"))?;
        Ok(GitServer {
            root,
            base_url: format!("http://127.0.0.1:{port}"),
            https_base_url: format!("https://127.0.0.1:{tls_port}"),
            token,
            ca_pem,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `https://127.0.0.1:<port>`, serving the same repositories with a certificate from
    /// [`GitServer::ca_pem`]. Credentials only travel over this one: git clients (gix among
    /// them) refuse to send them in clear text.
    pub fn https_base_url(&self) -> &str {
        &self.https_base_url
    }

    /// The CA certificate (PEM) that signed the https certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The token that opens `private/` repositories.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Creates an empty bare repository `<path>.git` (e.g. `group/app` or `private/app`)
    /// with `main` as its default branch.
    pub fn create_repo(&self, path: &str) -> Repo {
        let dir = self.root.join(format!("{path}.git"));
        std::fs::create_dir_all(&dir).expect("repo dir");
        git(
            &dir,
            &["init", "--bare", "--quiet", "--initial-branch=main"],
            None,
        );
        Repo {
            path: path.to_string(),
            dir,
            http: format!("{}/{path}.git", self.base_url),
            https: format!("{}/{path}.git", self.https_base_url),
        }
    }
}

/// A bare repository on the server.
#[derive(Debug, Clone)]
pub struct Repo {
    /// Project path, e.g. `group/app`.
    pub path: String,
    dir: PathBuf,
    http: String,
    https: String,
}

impl Repo {
    /// `http://127.0.0.1:<port>/<path>.git`.
    pub fn http_url(&self) -> &str {
        &self.http
    }

    /// `https://127.0.0.1:<port>/<path>.git`.
    pub fn https_url(&self) -> &str {
        &self.https
    }

    /// `file:///…/<path>.git`.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// Response bytes the server has sent for this repository so far (ref listings and
    /// packs), over http and https.
    pub fn bytes_served(&self) -> u64 {
        let served = SERVED.lock().unwrap_or_else(|e| e.into_inner());
        served
            .get(&format!("{}.git", self.path))
            .copied()
            .unwrap_or(0)
    }

    /// Writes `count` tags (`refs/tags/t0` …) on `commit` at once, as packed refs: a
    /// repository with a long history of releases.
    pub fn pack_tags(&self, count: usize, commit: &str) {
        use std::fmt::Write;
        let mut refs: Vec<String> = (0..count).map(|i| format!("refs/tags/t{i}")).collect();
        refs.sort();
        let mut text = String::from("# pack-refs with: peeled fully-peeled sorted \n");
        for r in refs {
            let _ = writeln!(text, "{commit} {r}");
        }
        std::fs::write(self.dir.join("packed-refs"), text).expect("write packed-refs");
    }

    /// The bare repository's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Commits exactly `entries` (the whole tree) on top of `branch` (or as its first
    /// commit) and moves `branch` to it. Returns the commit id.
    pub fn commit(&self, branch: &str, entries: &[Entry], message: &str) -> String {
        let parent = self.resolve(&format!("refs/heads/{branch}"));
        let commit = self.commit_tree(entries, parent.as_deref(), message);
        self.set_ref(&format!("refs/heads/{branch}"), &commit);
        commit
    }

    /// Writes a commit with `entries` and `parent` without moving any ref.
    pub fn commit_tree(&self, entries: &[Entry], parent: Option<&str>, message: &str) -> String {
        let index = self.dir.join(format!("index-{:x}", random_u64()));
        let env = [("GIT_INDEX_FILE", index.to_str().expect("utf-8 temp path"))];
        for entry in entries {
            let (mode, path, data) = match entry {
                Entry::File(p, d) => ("100644", p, d.clone()),
                Entry::Symlink(p, target) => ("120000", p, target.as_bytes().to_vec()),
            };
            let blob = git_env(
                &self.dir,
                &["hash-object", "-w", "--stdin"],
                Some(&data),
                &env,
            );
            git_env(
                &self.dir,
                &[
                    "update-index",
                    "--add",
                    "--cacheinfo",
                    &format!("{mode},{blob},{path}"),
                ],
                None,
                &env,
            );
        }
        let tree = git_env(&self.dir, &["write-tree"], None, &env);
        let _ = std::fs::remove_file(&index);
        let mut args = vec!["commit-tree", &tree, "-m", message];
        if let Some(p) = parent {
            args.extend(["-p", p]);
        }
        git(&self.dir, &args, None)
    }

    /// Points `refname` at `commit`, whatever it pointed at before (a force-push).
    pub fn set_ref(&self, refname: &str, commit: &str) {
        git(&self.dir, &["update-ref", refname, commit], None);
    }

    /// Creates or moves the lightweight tag `name`.
    pub fn tag(&self, name: &str, commit: &str) {
        self.set_ref(&format!("refs/tags/{name}"), commit);
    }

    /// Deletes `refname`.
    pub fn delete_ref(&self, refname: &str) {
        git(&self.dir, &["update-ref", "-d", refname], None);
    }

    /// The commit `refname` points at, if it exists.
    pub fn resolve(&self, refname: &str) -> Option<String> {
        let out = Command::new("git")
            .current_dir(&self.dir)
            .args(["rev-parse", "--verify", "--quiet", refname])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    git_env(dir, args, stdin, &[])
}

fn git_env(dir: &Path, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> String {
    use std::io::Write;
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .envs(env.iter().copied())
        .env("GIT_AUTHOR_NAME", "sluice tests")
        .env("GIT_AUTHOR_EMAIL", "tests@sluice.invalid")
        .env("GIT_COMMITTER_NAME", "sluice tests")
        .env("GIT_COMMITTER_EMAIL", "tests@sluice.invalid")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("failed to run git {args:?}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(data) = stdin {
        input.write_all(data).expect("write to git");
    }
    drop(input);
    let out = child.wait_with_output().expect("git output");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn serve(
    (root, token): (PathBuf, String),
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let user = basic_auth_password(&headers)
        .filter(|(_, pw)| *pw == token)
        .map(|(u, _)| u);
    if path.trim_start_matches('/').starts_with(PRIVATE_PREFIX) && user.is_none() {
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"sluice-test\"")
            .body(Body::from("authentication required\n"))
            .expect("static response");
    }
    let header = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", &path)
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header(header::CONTENT_TYPE))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header(header::CONTENT_ENCODING))
        .env(
            "GIT_PROTOCOL",
            headers
                .get("git-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        )
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_USER", user.unwrap_or_default())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    match run_cgi(cmd, &body).await {
        Ok((resp, bytes)) => {
            count_served(&path, bytes);
            resp
        }
        Err(e) => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from(format!("git http-backend failed: {e}\n")))
            .expect("static response"),
    }
}

/// The CGI's response, and the size of its body.
async fn run_cgi(
    mut cmd: tokio::process::Command,
    body: &[u8],
) -> std::io::Result<(Response, usize)> {
    use tokio::io::AsyncWriteExt;
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = body.to_vec();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = child.wait_with_output().await?;
    let _ = writer.await;
    // CGI output: headers, a blank line, the body.
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        });
    let Some((end, sep)) = split else {
        return Err(std::io::Error::other(format!(
            "no CGI headers; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    };
    let head = String::from_utf8_lossy(&out.stdout[..end]).into_owned();
    let mut resp = Response::builder();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
            resp = resp.status(code);
        } else {
            resp = resp.header(name.trim(), value);
        }
    }
    let body = out.stdout[end + sep..].to_vec();
    let bytes = body.len();
    let resp = resp.body(Body::from(body)).map_err(std::io::Error::other)?;
    Ok((resp, bytes))
}

/// `(user, password)` from an `Authorization: Basic …` header.
fn basic_auth_password(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    use base64::Engine;
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?,
    )
    .ok()?;
    let (user, pw) = decoded.split_once(':')?;
    Some((user.to_string(), pw.to_string()))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
