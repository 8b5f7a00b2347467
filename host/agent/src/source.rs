//! Git: which commit a ref points at, and the files of that commit.
//!
//! sluice talks to git servers itself with gix, over https (basic auth or token),
//! ssh and `file://`. Each repository has a bare cache directory; files are read straight
//! from the commit's tree, never from a worktree, so nothing on disk can be swapped under a
//! sync and symlinks are never followed.
//!
//! Polling is cheap: [`Source::resolve`] asks for the ref advertisement only (protocol v2
//! `ls-refs`); [`Source::fetch`] downloads objects only when the commit is not in the cache,
//! shallow (depth 1) into an empty cache.
//! Both block; call them from `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::bstr::ByteSlice;
use gix::remote::fetch::Shallow;

use crate::config::GitRef;

/// What went wrong talking to git. All variants are retryable with backoff except
/// [`Error::RefNotFound`] (the ref may appear later, so that one is retried too, but slowly).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listing the remote's refs failed (network, authentication, not found).
    #[error("failed to list refs of {url}: {message}")]
    ListRefs {
        /// Repository URL without credentials.
        url: String,
        /// Cause.
        message: String,
    },
    /// The ref does not exist on the remote.
    #[error("failed to resolve {git_ref} in {url}: no such ref")]
    RefNotFound {
        /// Repository URL without credentials.
        url: String,
        /// The ref.
        git_ref: String,
    },
    /// Fetching objects failed.
    #[error("failed to fetch {url}: {message}")]
    Fetch {
        /// Repository URL without credentials.
        url: String,
        /// Cause.
        message: String,
    },
    /// The commit or its tree could not be read from the cache.
    #[error("failed to read commit {commit} of {url}: {message}")]
    Read {
        /// Repository URL without credentials.
        url: String,
        /// Commit id (or the ref when no commit was known yet).
        commit: String,
        /// Cause.
        message: String,
    },
    /// An artifact has no signature by the keys the project names.
    #[error("refused: {message}")]
    Unverified {
        /// Repository URL without credentials.
        url: String,
        /// What was looked for and found (names the reference and the keys).
        message: String,
    },
    /// A fetch ran past its deadline and was interrupted.
    #[error("fetching {url} took longer than {after:?} and was interrupted")]
    TimedOut {
        /// Repository URL without credentials.
        url: String,
        /// The deadline.
        after: std::time::Duration,
    },
    /// The local cache directory could not be used.
    #[error("failed to open the git cache {path}: {message}")]
    Cache {
        /// Cache directory.
        path: PathBuf,
        /// Cause.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Username and password (or token) for HTTP basic auth. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (GitLab accepts anything non-empty with a token, e.g. `oauth2`).
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One remote repository and its local cache.
#[derive(Debug, Clone)]
pub struct Source {
    url: String,
    cache: PathBuf,
    credentials: Option<Credentials>,
    /// Extra trusted CA certificates (PEM) for https, e.g. a self-hosted GitLab's CA.
    ca_pem: Option<Vec<u8>>,
    /// An `oci://` registry spoken to over plain HTTP (`--insecure-registry`).
    plain_http: bool,
    /// A Docker `config.json` holding registry credentials (`--registry-config`).
    registry_config: Option<PathBuf>,
    /// The cosign keys an `oci://` artifact must be signed with (`verify:`).
    keys: Option<std::sync::Arc<crate::cosign::Keys>>,
}

/// The files of one commit (or OCI artifact), read from the cache.
pub struct Snapshot {
    /// Commit id (hex), or an artifact's digest (`sha256:…`).
    pub commit: String,
    /// An artifact's `org.opencontainers.image.revision` (the git revision CI built it
    /// from), shown beside its digest; `None` for git.
    pub revision: Option<String>,
    files: Files,
    entries: Vec<TreeEntry>,
}

/// Where a snapshot's contents are.
enum Files {
    /// A git repository's objects.
    Git(Box<gix::Repository>),
    /// An unpacked artifact: the contents in the entries' order (`TreeEntry::id` is the
    /// index).
    Artifact(Vec<Vec<u8>>),
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("commit", &self.commit)
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// A non-directory entry of a commit's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Repository-relative path with `/` separators.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Blob id (hex) of files and symlinks.
    pub id: String,
}

/// The kinds of tree entries that matter for selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular or executable file.
    File,
    /// A symbolic link (never followed).
    Symlink,
    /// A submodule (a commit of another repository; not fetched).
    Submodule,
}

impl Source {
    /// A source for `url`, cached in a directory under `cache_root` named after the URL.
    /// Credentials written into the URL (`https://user:token@host/…`) are taken out of it
    /// and used as `credentials` (unless those are given), so they never reach logs or
    /// errors, which only ever show the URL.
    pub fn new(url: &str, cache_root: &Path, credentials: Option<Credentials>) -> Source {
        let (url, embedded) = split_userinfo(url);
        let credentials = credentials.or(embedded);
        let url = url.as_str();
        let slug: String = url
            .rsplit('/')
            .next()
            .unwrap_or("repo")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect();
        // A fixed hash: the directory must be found again by the next release too.
        let cache = cache_root.join(format!(
            "{slug}-{}",
            &sluice_model::object::sha256_hex(url)[..16]
        ));
        Source {
            url: url.to_string(),
            cache,
            credentials,
            ca_pem: None,
            plain_http: false,
            registry_config: None,
            keys: None,
        }
    }

    /// Speaks plain HTTP to an `oci://` registry (only when a flag names its host).
    #[must_use]
    pub fn with_plain_http(mut self) -> Source {
        self.plain_http = true;
        self
    }

    /// Reads registry credentials from a Docker `config.json` (when the URL has none).
    #[must_use]
    pub fn with_registry_config(mut self, path: PathBuf) -> Source {
        self.registry_config = Some(path);
        self
    }

    /// Fetches only artifacts signed with one of `keys` ([`crate::oci::verify`]).
    #[must_use]
    pub fn with_keys(mut self, keys: std::sync::Arc<crate::cosign::Keys>) -> Source {
        self.keys = Some(keys);
        self
    }

    pub(crate) fn keys(&self) -> Option<&crate::cosign::Keys> {
        self.keys.as_deref()
    }

    pub(crate) fn registry_config(&self) -> Option<&Path> {
        self.registry_config.as_deref()
    }

    /// Whether this is an OCI repository (`oci://host/repository`), not git.
    pub fn is_oci(&self) -> bool {
        self.url.starts_with("oci://")
    }

    pub(crate) fn cache_dir(&self) -> &Path {
        &self.cache
    }

    pub(crate) fn ca_pem(&self) -> Option<&[u8]> {
        self.ca_pem.as_deref()
    }

    pub(crate) fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub(crate) fn plain_http(&self) -> bool {
        self.plain_http
    }

    /// Also trusts the CA certificates in `pem` for https, besides the system's roots.
    #[must_use]
    pub fn with_ca(mut self, pem: Vec<u8>) -> Source {
        self.ca_pem = Some(pem);
        self
    }

    /// The repository URL (never with credentials).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The commit `git_ref` points at on the remote, from the ref advertisement only, and
    /// of that only the configured ref (protocol v2's `ls-refs` with the ref as its prefix):
    /// a repository with 100,000 tags costs a poll what one with one tag does.
    /// A [`GitRef::Commit`] is returned as given, without contacting the remote.
    ///
    /// # Errors
    /// [`Error::ListRefs`] when the remote cannot be reached or refuses the credentials,
    /// [`Error::RefNotFound`] when the ref does not exist.
    pub fn resolve(&self, git_ref: &GitRef) -> Result<String> {
        if let GitRef::Commit(c) = git_ref {
            return Ok(c.clone());
        }
        if self.is_oci() {
            return crate::oci::resolve(self, git_ref);
        }
        let repo = self.open()?;
        let list_err = |message: String| Error::ListRefs {
            url: self.url.clone(),
            message,
        };
        let remote = self.remote_for(&repo, git_ref).map_err(list_err)?;
        let conn = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(|e| list_err(chain(&e)))?;
        let conn = self.authenticate(conn);
        let (ref_map, _) = conn
            .ref_map(gix::progress::Discard, Default::default())
            .map_err(|e| list_err(chain(&e)))?;
        let wanted = git_ref.to_string();
        for r in &ref_map.remote_refs {
            use gix::protocol::handshake::Ref;
            let (name, object) = match r {
                Ref::Direct {
                    full_ref_name,
                    object,
                }
                | Ref::Peeled {
                    full_ref_name,
                    object,
                    ..
                }
                | Ref::Symbolic {
                    full_ref_name,
                    object,
                    ..
                } => (full_ref_name, object),
                Ref::Unborn { .. } => continue,
            };
            if name.as_bstr() == wanted.as_bytes().as_bstr() {
                return Ok(object.to_hex().to_string());
            }
        }
        Err(Error::RefNotFound {
            url: self.url.clone(),
            git_ref: wanted,
        })
    }

    /// [`Self::resolve`] on the blocking pool within `deadline`.
    ///
    /// # Errors
    /// As [`Self::resolve`], and [`Error::ListRefs`] when the deadline passes.
    pub async fn resolve_within(
        &self,
        git_ref: &GitRef,
        deadline: std::time::Duration,
    ) -> Result<String> {
        let (source, git_ref) = (self.clone(), git_ref.clone());
        let list_err = |message: String| Error::ListRefs {
            url: self.url.clone(),
            message,
        };
        match tokio::time::timeout(
            deadline,
            tokio::task::spawn_blocking(move || source.resolve(&git_ref)),
        )
        .await
        {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(list_err(format!("the task failed: {e}"))),
            Err(_) => Err(list_err(format!("no answer within {deadline:?}"))),
        }
    }

    /// The files of `commit`, fetching from the remote if the cache does not have it.
    ///
    /// # Errors
    /// [`Error::Fetch`] when the download fails, [`Error::Read`] when the commit is still
    /// missing afterwards or its tree cannot be read.
    pub fn fetch(&self, commit: &str) -> Result<Snapshot> {
        self.fetch_until(commit, &AtomicBool::new(false))
    }

    /// [`Self::fetch`] on the blocking pool within `deadline`, then `then` on the snapshot
    /// there too (a snapshot stays on its thread). When the deadline passes, the transfer is
    /// interrupted (gix checks the flag on every read of the pack, and every read has
    /// reqwest's 30 s timeout), so a slow or stalled server cannot hold a thread for long.
    ///
    /// # Errors
    /// As [`Self::fetch`], [`Error::TimedOut`], and what `then` returns.
    pub async fn fetch_within<T, E>(
        &self,
        commit: &str,
        deadline: std::time::Duration,
        then: impl FnOnce(Snapshot) -> std::result::Result<T, E> + Send + 'static,
    ) -> std::result::Result<T, E>
    where
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let interrupt = std::sync::Arc::new(AtomicBool::new(false));
        let (source, commit, flag) = (self.clone(), commit.to_string(), interrupt.clone());
        let task = tokio::task::spawn_blocking(move || then(source.fetch_until(&commit, &flag)?));
        match tokio::time::timeout(deadline, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(E::from(Error::Fetch {
                url: self.url.clone(),
                message: format!("the fetch task failed: {e}"),
            })),
            Err(_) => {
                interrupt.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(E::from(Error::TimedOut {
                    url: self.url.clone(),
                    after: deadline,
                }))
            }
        }
    }

    /// [`Self::fetch`], stopping the transfer when `interrupt` becomes true.
    fn fetch_until(&self, commit: &str, interrupt: &AtomicBool) -> Result<Snapshot> {
        if self.is_oci() {
            return crate::oci::fetch(self, commit, interrupt);
        }
        let repo = self.open()?;
        let read_err = |message: String| Error::Read {
            url: self.url.clone(),
            commit: commit.to_string(),
            message,
        };
        let id = match gix::ObjectId::from_hex(commit.as_bytes()) {
            Ok(id) => {
                self.ensure_commit(&repo, id, interrupt)?;
                id
            }
            // A short commit id (`ref.commit: abc1234`, which kas handed to Gitaly as a
            // revision): the remote cannot be asked for a prefix, so look for it in the
            // cache, and fetch the whole history once if it is not there.
            Err(_) => match self.find_prefix(&repo, commit).map_err(read_err)? {
                Some(id) => id,
                None => {
                    self.download(&repo, Shallow::NoChange, interrupt)?;
                    if repo.is_shallow().unwrap_or(true) {
                        self.download(&repo, Shallow::undo(), interrupt)?;
                    }
                    self.find_prefix(&repo, commit)
                        .map_err(read_err)?
                        .ok_or_else(|| read_err("no commit with this id".into()))?
                }
            },
        };
        let mut recorder = gix::traverse::tree::Recorder::default();
        {
            let commit_obj = repo.find_commit(id).map_err(|e| read_err(chain(&e)))?;
            let tree = commit_obj.tree().map_err(|e| read_err(chain(&e)))?;
            tree.traverse()
                .breadthfirst(&mut recorder)
                .map_err(|e| read_err(chain(&e)))?;
        }
        let entries = recorder
            .records
            .into_iter()
            .filter_map(|e| {
                use gix::object::tree::EntryKind as K;
                let kind = match e.mode.kind() {
                    K::Blob | K::BlobExecutable => EntryKind::File,
                    K::Link => EntryKind::Symlink,
                    K::Commit => EntryKind::Submodule,
                    K::Tree => return None,
                };
                Some(TreeEntry {
                    path: e.filepath.to_str_lossy().into_owned(),
                    kind,
                    id: e.oid.to_hex().to_string(),
                })
            })
            .collect();
        Ok(Snapshot {
            commit: id.to_hex().to_string(),
            revision: None,
            files: Files::Git(Box::new(repo)),
            entries,
        })
    }

    /// Fetches until `id` is in the cache.
    fn ensure_commit(
        &self,
        repo: &gix::Repository,
        id: gix::ObjectId,
        interrupt: &AtomicBool,
    ) -> Result<()> {
        if repo.find_commit(id).is_err() {
            // An empty cache fetches only the tips (depth 1); later fetches extend from the
            // local shallow boundary. A commit older than the boundary (a `commit:` ref, or a
            // branch moved back) needs the history: then, and only then, unshallow.
            let empty = repo.head_id().is_err()
                && repo
                    .references()
                    .ok()
                    .and_then(|r| r.all().ok().map(|mut i| i.next().is_none()))
                    .unwrap_or(true);
            let depth = std::num::NonZeroU32::new(1).expect("1 is not zero");
            let shallow = if empty {
                Shallow::DepthAtRemote(depth)
            } else {
                Shallow::NoChange
            };
            self.download(repo, shallow, interrupt)?;
            if repo.find_commit(id).is_err() && repo.is_shallow().unwrap_or(true) {
                self.download(repo, Shallow::undo(), interrupt)?;
            }
        }
        Ok(())
    }

    /// The commit whose id starts with `prefix` (at least 4 hex digits), if the cache has
    /// exactly one; an ambiguous prefix is an error.
    fn find_prefix(
        &self,
        repo: &gix::Repository,
        prefix: &str,
    ) -> Result<Option<gix::ObjectId>, String> {
        if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "not a commit id: {prefix:?} (expected 4 to 40 hexadecimal digits)"
            ));
        }
        let prefix = gix::hash::Prefix::from_hex(&prefix.to_ascii_lowercase())
            .map_err(|e| format!("not a commit id: {e}"))?;
        match repo.objects.lookup_prefix(prefix, None) {
            Ok(Some(Ok(id))) if repo.find_commit(id).is_ok() => Ok(Some(id)),
            Ok(Some(Ok(_))) => Err("the id names an object that is not a commit".into()),
            Ok(Some(Err(()))) => Err("the short commit id is ambiguous; write more digits".into()),
            Ok(None) => Ok(None),
            Err(e) => Err(chain(&e)),
        }
    }

    fn download(
        &self,
        repo: &gix::Repository,
        shallow: Shallow,
        interrupt: &AtomicBool,
    ) -> Result<()> {
        let fetch_err = |message: String| Error::Fetch {
            url: self.url.clone(),
            message,
        };
        let remote = self.remote(repo).map_err(fetch_err)?;
        let conn = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(|e| fetch_err(chain(&e)))?;
        let conn = self.authenticate(conn);
        conn.prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| fetch_err(chain(&e)))?
            .with_shallow(shallow)
            .receive(gix::progress::Discard, interrupt)
            .map_err(|e| fetch_err(chain(&e)))?;
        Ok(())
    }

    fn open(&self) -> Result<gix::Repository> {
        let cache_err = |message: String| Error::Cache {
            path: self.cache.clone(),
            message,
        };
        if self.cache.join("HEAD").exists() {
            gix::open(&self.cache).map_err(|e| cache_err(chain(&e)))
        } else {
            std::fs::create_dir_all(&self.cache).map_err(|e| cache_err(chain(&e)))?;
            gix::init_bare(&self.cache).map_err(|e| cache_err(chain(&e)))
        }
    }

    fn remote<'r>(&self, repo: &'r gix::Repository) -> Result<gix::Remote<'r>, String> {
        repo.remote_at(self.url.as_str())
            .and_then(|r| {
                r.with_refspecs(
                    [
                        "+HEAD:refs/remotes/origin/HEAD",
                        "+refs/heads/*:refs/remotes/origin/*",
                        "+refs/tags/*:refs/tags/*",
                    ],
                    gix::remote::Direction::Fetch,
                )
            })
            .map_err(|e| chain(&e))
    }

    /// The remote with one refspec, for `git_ref` alone, and no implicit tags: the server
    /// is asked to list that ref only.
    fn remote_for<'r>(
        &self,
        repo: &'r gix::Repository,
        git_ref: &GitRef,
    ) -> Result<gix::Remote<'r>, String> {
        let spec = match git_ref {
            GitRef::DefaultBranch | GitRef::Commit(_) => "+HEAD:refs/remotes/origin/HEAD".into(),
            GitRef::Semver(r) => {
                return Err(format!(
                    "semver ranges ({r}) are for OCI repositories; name a branch or tag"
                ));
            }
            GitRef::Branch(b) => format!("+refs/heads/{b}:refs/remotes/origin/{b}"),
            GitRef::Tag(t) => format!("+refs/tags/{t}:refs/tags/{t}"),
        };
        repo.remote_at(self.url.as_str())
            .map(|r| r.with_fetch_tags(gix::remote::fetch::Tags::None))
            .and_then(|r| r.with_refspecs([spec.as_str()], gix::remote::Direction::Fetch))
            .map_err(|e| chain(&e))
    }

    /// Hands our credentials (and nothing from the environment or a prompt) and our CA to
    /// gix. gix refuses to send credentials over plain `http://`; sluice keeps that.
    fn authenticate<'a, 'r>(
        &self,
        conn: gix::remote::Connection<
            'a,
            'static,
            'r,
            Box<dyn gix::protocol::transport::client::blocking_io::Transport + Send>,
        >,
    ) -> gix::remote::Connection<
        'a,
        'static,
        'r,
        Box<dyn gix::protocol::transport::client::blocking_io::Transport + Send>,
    > {
        let creds = self.credentials.clone();
        let conn = match &self.ca_pem {
            Some(pem) => conn.with_transport_options(Box::new(http_options(pem.clone()))),
            None => conn,
        };
        conn.with_credentials(move |action| match (action, &creds) {
            (gix::credentials::helper::Action::Get(ctx), Some(c)) => {
                Ok(Some(gix::credentials::protocol::Outcome {
                    identity: gix::sec::identity::Account {
                        username: c.username.clone(),
                        password: c.password.clone(),
                        oauth_refresh_token: None,
                    },
                    next: ctx.into(),
                }))
            }
            _ => Ok(None),
        })
    }
}

impl Snapshot {
    /// An unpacked OCI artifact: `entries[i]`'s content is `contents[i]`.
    pub(crate) fn artifact(
        digest: String,
        revision: Option<String>,
        entries: Vec<TreeEntry>,
        contents: Vec<Vec<u8>>,
    ) -> Snapshot {
        Snapshot {
            commit: digest,
            revision,
            files: Files::Artifact(contents),
            entries,
        }
    }

    /// Every file, symlink and submodule of the tree, breadth-first (an artifact's in path
    /// order).
    pub fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    /// The size of a blob without reading it.
    pub fn blob_size(&self, id: &str) -> Result<u64> {
        match &self.files {
            Files::Git(repo) => repo
                .find_header(self.oid(id)?)
                .map(|h| h.size())
                .map_err(|e| self.read_err(chain(&e))),
            Files::Artifact(contents) => Ok(self.content(contents, id)?.len() as u64),
        }
    }

    /// A blob's content.
    pub fn read_blob(&self, id: &str) -> Result<Vec<u8>> {
        match &self.files {
            Files::Git(repo) => {
                let blob = repo
                    .find_blob(self.oid(id)?)
                    .map_err(|e| self.read_err(chain(&e)))?;
                Ok(blob.data.clone())
            }
            Files::Artifact(contents) => Ok(self.content(contents, id)?.to_vec()),
        }
    }

    fn content<'a>(&self, contents: &'a [Vec<u8>], id: &str) -> Result<&'a [u8]> {
        id.parse::<usize>()
            .ok()
            .and_then(|i| contents.get(i))
            .map(Vec::as_slice)
            .ok_or_else(|| self.read_err(format!("no entry {id}")))
    }

    fn oid(&self, id: &str) -> Result<gix::ObjectId> {
        gix::ObjectId::from_hex(id.as_bytes()).map_err(|e| self.read_err(chain(&e)))
    }

    fn read_err(&self, message: String) -> Error {
        Error::Read {
            url: match &self.files {
                Files::Git(repo) => repo.path().display().to_string(),
                Files::Artifact(_) => "(artifact)".into(),
            },
            commit: self.commit.clone(),
            message,
        }
    }
}

/// `scheme://user:secret@host/path` → (`scheme://host/path`, credentials).
pub(crate) fn split_userinfo(url: &str) -> (String, Option<Credentials>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_string(), None);
    };
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    let stripped = format!("{scheme}://{host}");
    // ssh's user@host is a login, not a secret: keep it in the URL.
    if scheme == "ssh" && !userinfo.contains(':') {
        return (url.to_string(), None);
    }
    let (username, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (
        stripped,
        Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }),
    )
}

/// HTTP transport options whose client also trusts the CA certificates in `pem`.
fn http_options(pem: Vec<u8>) -> gix::protocol::transport::client::blocking_io::http::Options {
    use gix::protocol::transport::client::blocking_io::http;
    let reqwest_options = http::reqwest::Options {
        configure_client: Some(Box::new(move |mut builder| {
            for cert in reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default() {
                builder = builder.add_root_certificate(cert);
            }
            Ok(builder)
        })),
        configure_request: None,
    };
    http::Options {
        backend: Some(std::sync::Arc::new(std::sync::Mutex::new(reqwest_options))),
        ..Default::default()
    }
}

/// gix errors carry their causes as a chain; the alternate form prints all of it on one
/// line. (URLs in sluice never carry credentials, so the chain cannot leak them.)
fn chain(e: &impl std::fmt::Display) -> String {
    format!("{e:#}").replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts connections and never answers (a tarpit, or a stalled
    /// proxy): the fetch ends at its deadline, well before reqwest's 30 s read timeout,
    /// and says so.
    #[tokio::test]
    async fn a_fetch_from_a_silent_server_ends_at_its_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                // Silent for 5 s, then gone (so the test's blocking thread ends soon after).
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    drop(stream);
                });
            }
        });
        let cache = tempfile::tempdir().expect("cache");
        let source = Source::new(&format!("http://{addr}/g/p.git"), cache.path(), None);
        let started = std::time::Instant::now();
        let deadline = std::time::Duration::from_secs(2);
        let result = source
            .fetch_within(&"a".repeat(40), deadline, |_| Ok::<_, Error>(()))
            .await;
        let took = started.elapsed();
        match result {
            Err(Error::TimedOut { url, after }) => {
                assert_eq!(url, format!("http://{addr}/g/p.git"));
                assert_eq!(after, deadline);
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("fetched from nothing"),
        }
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
        assert_eq!(
            Error::TimedOut {
                url: "http://h/g/p.git".into(),
                after: deadline
            }
            .to_string(),
            "fetching http://h/g/p.git took longer than 2s and was interrupted"
        );
    }

    #[test]
    fn credentials_in_urls_are_taken_out() {
        let (url, creds) = split_userinfo("https://oauth2:glpat-secret@gitlab.example.com/g/p.git");
        assert_eq!(url, "https://gitlab.example.com/g/p.git");
        assert_eq!(
            creds,
            Some(Credentials {
                username: "oauth2".into(),
                password: "glpat-secret".into()
            })
        );
        assert_eq!(
            split_userinfo("https://gitlab.example.com/g/p.git"),
            ("https://gitlab.example.com/g/p.git".into(), None)
        );
        assert_eq!(
            split_userinfo("ssh://git@host/g/p.git").0,
            "ssh://git@host/g/p.git"
        );
        let s = Source::new("https://u:tok@h/x.git", Path::new("/tmp"), None);
        assert_eq!(s.url(), "https://h/x.git");
        assert!(!format!("{s:?}").contains("tok"));
    }
}
