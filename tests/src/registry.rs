//! A real OCI registry (CNCF distribution, built by `cluster/build-cli.sh registry` at the
//! version `cluster/versions.env` pins) with TLS from a throw-away CA and htpasswd (bcrypt)
//! authentication, as registries are run; and `flux push artifact`'s push path
//! (`tools/fluxpush`), as GitLab's CI pushes.
//!
//! A [`Registry`] is the test's own: its process is tied to the thread that started it
//! (the test's), [`Registry::stop`] and [`Registry::start`] take it away and bring it back
//! on the same port with the same contents.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::procs::{fresh_run_dir, log_tail, spawn_tied};

/// The user the registry's htpasswd knows.
pub const USER: &str = "ci";
/// Its password.
pub const PASSWORD: &str = "registry-password-1";

/// One running registry.
pub struct Registry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// The CA that signed its certificate (PEM).
    pub ca_pem: String,
    /// The CA as a file (for `flux`, through `SSL_CERT_FILE`).
    pub ca_file: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Registry {
    /// Builds (once per version), configures and starts a registry on a free port.
    ///
    /// # Errors
    /// When it cannot be built or does not answer within 30 s; the message quotes its log.
    pub async fn start_new(name: &str) -> Result<Registry, String> {
        Registry::start_notifying(name, None).await
    }

    /// As [`Self::start_new`], sending its notifications (a push, a pull, …) to `url` with
    /// `Authorization: Bearer <secret>`, as a registry's `notifications.endpoints` does.
    ///
    /// # Errors
    /// As [`Self::start_new`].
    pub async fn start_notifying(
        name: &str,
        notify: Option<(&str, &str)>,
    ) -> Result<Registry, String> {
        let bin = crate::cluster::reference_cli("registry");
        let dir = fresh_run_dir(&format!("sluice-registry-{name}"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let (ca_pem, cert, key) = crate::pki::serving_cert_pem()?;
        let write = |file: &str, text: &str| {
            std::fs::write(dir.join(file), text).map_err(|e| format!("{file}: {e}"))
        };
        write("ca.pem", &ca_pem)?;
        write("cert.pem", &cert)?;
        write("key.pem", &key)?;
        let hash = bcrypt::hash(PASSWORD, 5).map_err(|e| format!("bcrypt: {e}"))?;
        write("htpasswd", &format!("{USER}:{hash}\n"))?;
        let d = dir.display();
        write(
            "config.yml",
            &format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {d}/cert.pem\n    key: {d}/key.pem\n\
                 auth:\n  htpasswd:\n    realm: sluice-test\n    path: {d}/htpasswd\n{}",
                notify
                    .map(|(url, secret)| format!(
                        "notifications:\n  endpoints:\n  - name: sluice\n    url: {url}\n    headers:\n      Authorization: [Bearer {secret}]\n    timeout: 2s\n    threshold: 3\n    backoff: 1s\n"
                    ))
                    .unwrap_or_default()
            ),
        )?;
        let mut registry = Registry {
            host: format!("127.0.0.1:{port}"),
            ca_file: dir.join("ca.pem"),
            ca_pem,
            dir,
            bin,
            child: None,
        };
        registry.start().await?;
        Ok(registry)
    }

    /// Starts the process again after [`Self::stop`] (same port, same contents).
    ///
    /// # Errors
    /// As [`Self::start_new`].
    pub async fn start(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg(self.dir.join("config.yml"))
            // distribution v3 exports traces by default; nothing listens for them here.
            .env("OTEL_TRACES_EXPORTER", "none");
        let log = self.dir.join("registry.log");
        let mut child = spawn_tied(cmd, &log).map_err(|e| format!("registry: {e}"))?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the registry exited ({status}); its log:\n{}",
                    log_tail(&log, 30)
                ));
            }
            if tokio::net::TcpStream::connect(&self.host).await.is_ok() {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                return Err(format!(
                    "the registry did not listen within 30 s; its log:\n{}",
                    log_tail(&log, 30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the process (SIGKILL); its contents stay.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A Docker `config.json` holding this registry's credentials (what a
    /// `kubernetes.io/dockerconfigjson` Secret's `.dockerconfigjson` holds), written into
    /// the registry's directory.
    pub fn docker_config(&self) -> PathBuf {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        let path = self.dir.join("docker-config.json");
        let json = serde_json::json!({"auths": {self.host.clone(): {"auth": auth}}});
        std::fs::write(&path, json.to_string()).expect("write the docker config");
        path
    }

    /// `oci://<host>/<repository>`.
    pub fn url(&self, repository: &str) -> String {
        format!("oci://{}/{repository}", self.host)
    }

    /// Pushes `dir` as `oci://<host>/<repository>:<tag>` the way `flux push artifact
    /// --source=<source> --revision=<revision> --creds=…` does (GitLab's CI template), and
    /// returns the digest.
    ///
    /// # Panics
    /// When the push fails; the message quotes its output.
    pub fn flux_push(
        &self,
        repository: &str,
        tag: &str,
        dir: &Path,
        source: &str,
        revision: &str,
    ) -> String {
        let fluxpush = crate::cluster::reference_cli("fluxpush");
        let out = Command::new(fluxpush)
            .arg(format!("{}:{tag}", self.url(repository)))
            .arg(format!("--path={}", dir.display()))
            .arg(format!("--source={source}"))
            .arg(format!("--revision={revision}"))
            .arg(format!("--creds={USER}:{PASSWORD}"))
            // Go reads extra roots from here on Linux: the push trusts the test CA.
            .env("SSL_CERT_FILE", &self.ca_file)
            .env("HOME", &self.dir)
            .output()
            .expect("fluxpush runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "flux push artifact failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = stdout.trim().to_string();
        assert!(digest.starts_with("sha256:"), "not a digest: {digest}");
        digest
    }
}

/// How `cosign sign` stores the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFormat {
    /// cosign v3's default: a sigstore bundle attached as a referrer.
    Bundle,
    /// The legacy `sha256-<hex>.sig` tag (`--new-bundle-format=false`).
    Legacy,
}

impl Registry {
    /// A cosign key pair made by `cosign generate-key-pair` (empty password) in `dir`:
    /// `(<dir>/<name>.key, <dir>/<name>.pub)`.
    ///
    /// # Panics
    /// When cosign fails; the message quotes its output.
    pub fn cosign_key_pair(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let out = self
            .cosign(dir)
            .args(["generate-key-pair", "--output-key-prefix", name])
            .output()
            .expect("cosign runs");
        assert!(
            out.status.success(),
            "cosign generate-key-pair failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.pub")),
        )
    }

    /// Signs `<host>/<repository>@<digest>` with `key` as `cosign sign --key` does,
    /// offline: no transparency log, no certificate authority.
    ///
    /// # Panics
    /// When cosign fails; the message quotes its output.
    pub fn cosign_sign(&self, repository: &str, digest: &str, key: &Path, format: SignatureFormat) {
        let dir = self.dir.join("cosign");
        std::fs::create_dir_all(&dir).expect("cosign dir");
        let mut cmd = self.cosign(&dir);
        cmd.args(["sign", "--yes", "--key"]).arg(key);
        match format {
            SignatureFormat::Bundle => {
                // A signing config without services: no Fulcio, Rekor or TSA.
                let config = dir.join("signing-config.json");
                if !config.exists() {
                    let out = self
                        .cosign(&dir)
                        .args(["signing-config", "create", "--out"])
                        .arg(&config)
                        .output()
                        .expect("cosign runs");
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                cmd.arg("--signing-config").arg(&config);
            }
            SignatureFormat::Legacy => {
                cmd.args([
                    "--new-bundle-format=false",
                    "--use-signing-config=false",
                    "--tlog-upload=false",
                ]);
            }
        }
        let out = cmd
            .arg(format!("{}/{repository}@{digest}", self.host))
            .output()
            .expect("cosign runs");
        assert!(
            out.status.success(),
            "cosign sign failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// cosign, run in `dir`, trusting the test CA and logged in to this registry.
    fn cosign(&self, dir: &Path) -> Command {
        let docker = self.dir.join("docker");
        std::fs::create_dir_all(&docker).expect("docker config dir");
        std::fs::copy(self.docker_config(), docker.join("config.json")).expect("docker config");
        let mut cmd = Command::new(crate::cluster::reference_cli("cosign"));
        cmd.current_dir(dir)
            .env("SSL_CERT_FILE", &self.ca_file)
            .env("DOCKER_CONFIG", &docker)
            .env("HOME", &self.dir)
            .env("COSIGN_PASSWORD", "")
            .env("COSIGN_YES", "true");
        cmd
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
