//! Push-triggered syncs: webhook receivers on the agent's HTTP server.
//!
//! - `POST /hooks/gitlab`: GitLab push and tag push events, authenticated by the
//!   `X-Gitlab-Token` header (the project webhook's "Secret token").
//! - `POST /hooks/github`: GitHub `push` events, authenticated by `X-Hub-Signature-256`
//!   (HMAC-SHA256 of the body with the webhook's secret); `ping` is answered.
//! - `POST /hooks/generic`: `Authorization: Bearer <secret>`, a JSON body
//!   `{"project": "group/app", "ref": "refs/heads/main"}` (both optional: without `project`
//!   every project is triggered), for CI jobs and other servers.
//! - `POST /hooks/registry`: an OCI registry's notifications (CNCF distribution's envelope,
//!   which GitLab's container registry and Harbor send too), `Authorization: Bearer
//!   <secret>` (the endpoint's `headers:`); each manifest push with a tag wakes the `oci://`
//!   projects of that repository following that tag.
//!
//! A push that names a manifest project (by path or by URL) and the ref it follows wakes
//! that project's worker at once, instead of at its next poll; a push to the configuration
//! repository reloads the configuration. The worker then resolves the ref itself: a push
//! only says *when* to look, never *what* to apply, so a forged or replayed push can cost a
//! ref listing and nothing else.
//!
//! Bounded: bodies up to [`MAX_BODY_BYTES`], [`RATE_PER_SECOND`] requests per second (burst
//! [`RATE_BURST`]) across all hooks, checked before authentication. Every request is
//! counted in `/metrics` (`sluice_webhook_requests_total{provider,result}`). The secret is
//! compared in constant time and never logged.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::config::GitRef;
use crate::observability::Metrics;

/// Largest accepted request body (GitLab caps a push payload's commit list at 20).
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// Sustained webhook requests per second, all providers together.
pub const RATE_PER_SECOND: f64 = 10.0;
/// Requests allowed in a burst above the sustained rate.
pub const RATE_BURST: f64 = 40.0;

/// Something a push can wake: a project's worker, or the configuration loader.
#[derive(Debug, Clone)]
pub struct Target {
    /// The manifest project's id as configured (a path like `group/app`, or a URL); for the
    /// configuration repository, its URL.
    pub id: String,
    /// The repository's URL (a project path resolved against the git base URL).
    pub url: String,
    /// The ref it follows.
    pub git_ref: GitRef,
    /// Woken on a matching push. A wake-up while the worker is busy is kept for when it
    /// next waits, and counted.
    pub wake: Arc<Wake>,
}

/// A wake-up signal that also counts pushes, so a worker can tell that one arrived while
/// it was busy even if the wake-up itself was consumed by a wait it then abandoned.
#[derive(Default)]
pub struct Wake {
    notify: Notify,
    pushes: std::sync::atomic::AtomicU64,
    /// Where a push goes instead, for a project another replica syncs.
    forward: Option<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wake")
            .field("pushes", &self.pushes())
            .field("forward", &self.forward.is_some())
            .finish()
    }
}

impl Wake {
    /// A wake-up that calls `forward` on every push (a project whose worker runs on
    /// another replica: the push is passed on to it).
    #[must_use]
    pub fn forwarding(forward: impl Fn() + Send + Sync + 'static) -> Wake {
        Wake {
            forward: Some(Box::new(forward)),
            ..Wake::default()
        }
    }

    /// Signals a push.
    pub fn push(&self) {
        self.pushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
        if let Some(f) = &self.forward {
            f();
        }
    }

    /// How many pushes were signalled so far.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves at the next push (at once when one came since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// The targets the agent registers and the receivers wake.
#[derive(Debug, Default)]
pub struct Triggers {
    targets: Mutex<Vec<Target>>,
}

impl Triggers {
    /// Replaces the registered targets (the agent calls this when its workers change).
    pub fn set(&self, targets: Vec<Target>) {
        *self.targets.lock().unwrap_or_else(|e| e.into_inner()) = targets;
    }

    /// Wakes every target `push` matches; returns their ids.
    fn fire(&self, push: &Push) -> Vec<String> {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets
            .iter()
            .filter(|t| matches(push, t))
            .map(|t| {
                t.wake.push();
                t.id.clone()
            })
            .collect()
    }
}

/// What a push says: which repository (by any of its names) and which ref.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Push {
    /// Project path as the provider names it (`group/app`, `owner/repo`).
    pub path: Option<String>,
    /// The repository's clone and web URLs.
    pub urls: Vec<String>,
    /// The pushed ref (`refs/heads/main`); none from a generic hook that names no ref.
    pub git_ref: Option<String>,
    /// The repository's default branch, when the provider says.
    pub default_branch: Option<String>,
    /// A generic hook without `project`: every target.
    pub everything: bool,
}

/// Whether `push` concerns `target`: the same repository, and the ref the target follows
/// (a commit pin is never woken: it cannot move).
fn matches(push: &Push, target: &Target) -> bool {
    if matches!(target.git_ref, GitRef::Commit(_)) {
        return false;
    }
    if !push.everything {
        let by_path = push.path.as_deref().is_some_and(|p| {
            !target.id.contains("://") && p.eq_ignore_ascii_case(target.id.trim_matches('/'))
        });
        let wanted = repository_key(&target.url);
        let by_url = push.urls.iter().any(|u| repository_key(u) == wanted);
        if !(by_path || by_url) {
            return false;
        }
    }
    let Some(pushed) = &push.git_ref else {
        return true;
    };
    match &target.git_ref {
        GitRef::Branch(b) => pushed == &format!("refs/heads/{b}"),
        GitRef::Tag(t) => pushed == &format!("refs/tags/{t}"),
        GitRef::DefaultBranch if target.url.starts_with("oci://") => {
            pushed == &format!("refs/tags/{}", crate::oci::DEFAULT_TAG)
        }
        GitRef::DefaultBranch => match &push.default_branch {
            Some(b) => pushed == &format!("refs/heads/{b}"),
            None => pushed.starts_with("refs/heads/"),
        },
        GitRef::Semver(_) => pushed.starts_with("refs/tags/"),
        GitRef::Commit(_) => false,
    }
}

/// `host/path` of a repository URL, lower-cased host, without scheme, credentials, port
/// of ssh, `.git` or trailing slash: `https://u:p@GitLab.example.com/g/app.git/` and
/// `git@gitlab.example.com:g/app.git` both give `gitlab.example.com/g/app`.
fn repository_key(url: &str) -> String {
    let url = url.trim();
    let (rest, scp) = match url.split_once("://") {
        Some((_, rest)) => (rest, false),
        None => (url, true),
    };
    let (authority, path) = if scp {
        // scp-like ssh: user@host:path
        rest.split_once(':').unwrap_or((rest, ""))
    } else {
        rest.split_once('/').unwrap_or((rest, ""))
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let host = if url.starts_with("ssh://") || scp {
        host.split(':').next().unwrap_or(host)
    } else {
        host
    };
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    format!("{}/{}", host.to_ascii_lowercase(), path)
}

/// Which receiver a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    Gitlab,
    Github,
    Generic,
    Registry,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Gitlab => "gitlab",
            Provider::Github => "github",
            Provider::Generic => "generic",
            Provider::Registry => "registry",
        }
    }
}

/// Why a request was turned away (the `result` label, and the response).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Rejection {
    #[error("missing or wrong secret")]
    Unauthorized,
    #[error("malformed payload: {0}")]
    BadRequest(String),
}

/// What a request is, once authenticated: a push, or an event to acknowledge and ignore.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Push(Push),
    /// Several pushes in one request (a registry's batch of events).
    Pushes(Vec<Push>),
    Ignored(String),
}

/// Authenticates a request and reads its push. Pure: headers and body in, event out.
fn parse(
    provider: Provider,
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Event, Rejection> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match provider {
        Provider::Gitlab => {
            let token = header("x-gitlab-token").ok_or(Rejection::Unauthorized)?;
            if !equal(token.as_bytes(), secret.as_bytes()) {
                return Err(Rejection::Unauthorized);
            }
            let event = header("x-gitlab-event").unwrap_or_default();
            if event != "Push Hook" && event != "Tag Push Hook" {
                return Ok(Event::Ignored(format!("event {event:?} is not a push")));
            }
            push(
                &json(body)?,
                "project",
                "path_with_namespace",
                &["git_http_url", "git_ssh_url", "web_url", "http_url", "url"],
            )
        }
        Provider::Github => {
            let signature = header("x-hub-signature-256")
                .and_then(|s| s.strip_prefix("sha256="))
                .and_then(|h| hex::decode(h).ok())
                .ok_or(Rejection::Unauthorized)?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .map_err(|_| Rejection::Unauthorized)?;
            mac.update(body);
            mac.verify_slice(&signature)
                .map_err(|_| Rejection::Unauthorized)?;
            let event = header("x-github-event").unwrap_or_default();
            if event != "push" {
                return Ok(Event::Ignored(format!("event {event:?} is not a push")));
            }
            push(
                &json(body)?,
                "repository",
                "full_name",
                &["clone_url", "ssh_url", "html_url", "git_url"],
            )
        }
        Provider::Registry => {
            let token = header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .ok_or(Rejection::Unauthorized)?;
            if !equal(token.trim().as_bytes(), secret.as_bytes()) {
                return Err(Rejection::Unauthorized);
            }
            registry_pushes(&json(body)?)
        }
        Provider::Generic => {
            let token = header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .ok_or(Rejection::Unauthorized)?;
            if !equal(token.trim().as_bytes(), secret.as_bytes()) {
                return Err(Rejection::Unauthorized);
            }
            let v = if body.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                json(body)?
            };
            let project = str_at(&v, "project");
            Ok(Event::Push(Push {
                everything: project.is_none(),
                urls: project.iter().cloned().collect(),
                path: project,
                git_ref: str_at(&v, "ref"),
                default_branch: None,
            }))
        }
    }
}

/// A registry's notification envelope (`{"events": [...]}`): each `push` of a manifest with
/// a tag is a push of `refs/tags/<tag>` to `oci://<request.host>/<target.repository>`; pulls,
/// deletes and pushes by digest alone are not.
fn registry_pushes(v: &Value) -> Result<Event, Rejection> {
    let events = v["events"]
        .as_array()
        .ok_or_else(|| Rejection::BadRequest("no \"events\"".into()))?;
    let pushes: Vec<Push> = events
        .iter()
        .filter(|e| str_at(e, "action").as_deref() == Some("push"))
        .filter_map(|e| {
            let target = &e["target"];
            let tag = str_at(target, "tag")?;
            let repository = str_at(target, "repository")?;
            let host = str_at(&e["request"], "host")?;
            Some(Push {
                path: None,
                urls: vec![format!("oci://{host}/{repository}")],
                git_ref: Some(format!("refs/tags/{tag}")),
                default_branch: None,
                everything: false,
            })
        })
        .collect();
    if pushes.is_empty() {
        return Ok(Event::Ignored("no tagged manifest push".into()));
    }
    Ok(Event::Pushes(pushes))
}

/// A GitLab or GitHub push payload: the repository under `repo` (GitLab also repeats its
/// URLs under `repository`), its path under `path`, its URLs under `urls`, and `ref`.
fn push(v: &Value, repo: &str, path: &str, urls: &[&str]) -> Result<Event, Rejection> {
    let r = &v[repo];
    Ok(Event::Push(Push {
        path: str_at(r, path),
        urls: urls
            .iter()
            .filter_map(|k| str_at(r, k).or_else(|| str_at(&v["repository"], k)))
            .collect(),
        git_ref: Some(str_at(v, "ref").ok_or_else(|| Rejection::BadRequest("no \"ref\"".into()))?),
        default_branch: str_at(r, "default_branch"),
        everything: false,
    }))
}

fn equal(a: &[u8], b: &[u8]) -> bool {
    !b.is_empty() && bool::from(a.ct_eq(b))
}

fn json(body: &[u8]) -> Result<Value, Rejection> {
    serde_json::from_slice(body).map_err(|e| Rejection::BadRequest(e.to_string()))
}

fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key)?.as_str().map(str::to_string)
}

/// A token bucket: `rate` per second, up to `burst` at once.
#[derive(Debug)]
struct RateLimit {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    fn new(rate: f64, burst: f64) -> Self {
        RateLimit {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token at `now`; false when none is left.
    fn take(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = *state;
        let refilled = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate)
            .min(self.burst);
        if refilled < 1.0 {
            *state = (refilled, now.max(last));
            return false;
        }
        *state = (refilled - 1.0, now.max(last));
        true
    }
}

/// The receivers' shared state.
pub struct Receiver {
    secret: SecretString,
    triggers: Arc<Triggers>,
    metrics: Arc<Metrics>,
    limit: RateLimit,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl Receiver {
    /// Receivers that authenticate with `secret`, wake `triggers` and count in `metrics`.
    pub fn new(secret: SecretString, triggers: Arc<Triggers>, metrics: Arc<Metrics>) -> Self {
        Receiver {
            secret,
            triggers,
            metrics,
            limit: RateLimit::new(RATE_PER_SECOND, RATE_BURST),
        }
    }

    fn receive(&self, provider: Provider, headers: &HeaderMap, body: &[u8]) -> Response {
        let (result, response) = if !self.limit.take(Instant::now()) {
            (
                "rate_limited",
                (StatusCode::TOO_MANY_REQUESTS, "too many webhook requests\n").into_response(),
            )
        } else {
            match parse(provider, self.secret.expose_secret(), headers, body) {
                Err(Rejection::Unauthorized) => {
                    tracing::warn!(
                        provider = provider.name(),
                        "webhook request refused: missing or wrong secret"
                    );
                    (
                        "unauthorized",
                        (StatusCode::UNAUTHORIZED, "missing or wrong secret\n").into_response(),
                    )
                }
                Err(Rejection::BadRequest(why)) => (
                    "bad_request",
                    (
                        StatusCode::BAD_REQUEST,
                        format!("malformed payload: {why}\n"),
                    )
                        .into_response(),
                ),
                Ok(Event::Ignored(why)) => (
                    "ignored",
                    (
                        StatusCode::OK,
                        axum::Json(serde_json::json!({"ignored": why})),
                    )
                        .into_response(),
                ),
                Ok(event @ (Event::Push(_) | Event::Pushes(_))) => {
                    let pushes = match event {
                        Event::Push(p) => vec![p],
                        Event::Pushes(p) => p,
                        Event::Ignored(_) => Vec::new(),
                    };
                    let mut woken = Vec::new();
                    for push in &pushes {
                        woken.extend(self.triggers.fire(push));
                        tracing::info!(provider = provider.name(), git_ref = ?push.git_ref, triggered = ?woken, "webhook push received");
                    }
                    let status = if woken.is_empty() {
                        StatusCode::OK
                    } else {
                        StatusCode::ACCEPTED
                    };
                    (
                        if woken.is_empty() {
                            "no_match"
                        } else {
                            "triggered"
                        },
                        (status, axum::Json(serde_json::json!({"triggered": woken})))
                            .into_response(),
                    )
                }
            }
        };
        self.metrics.record_webhook(provider.name(), result);
        response
    }
}

/// Connections the receiver serves at once, and from one peer address: a flood from one
/// address cannot take the slots GitLab's pushes need.
pub const BOUNDS: crate::http::Bounds = crate::http::Bounds {
    connections: 64,
    per_peer: 8,
};

/// Serves the receivers ([`routes`]) on `listener`, a port of their own (`:9292` by default,
/// Flux's receiver port), within [`BOUNDS`] and the timeouts of [`crate::http`], until the
/// task is dropped.
///
/// # Errors
/// See [`crate::http::serve`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    receiver: Arc<Receiver>,
) -> std::io::Result<()> {
    crate::http::serve(listener, routes(receiver), BOUNDS).await
}

/// The `/hooks/*` routes.
pub fn routes(receiver: Arc<Receiver>) -> axum::Router {
    let route = |provider: Provider| {
        axum::routing::post(
            move |State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes| async move {
                r.receive(provider, &headers, &body)
            },
        )
    };
    axum::Router::new()
        .route("/hooks/gitlab", route(Provider::Gitlab))
        .route("/hooks/github", route(Provider::Github))
        .route("/hooks/generic", route(Provider::Generic))
        .route("/hooks/registry", route(Provider::Registry))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn target(id: &str, url: &str, git_ref: GitRef) -> Target {
        Target {
            id: id.into(),
            url: url.into(),
            git_ref,
            wake: Arc::new(Wake::default()),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    const GITLAB_PUSH: &str = r#"{"object_kind":"push","ref":"refs/heads/main",
        "project":{"path_with_namespace":"group/app","git_http_url":"https://gitlab.example.com/group/app.git",
                   "git_ssh_url":"git@gitlab.example.com:group/app.git","default_branch":"main"}}"#;

    #[test]
    fn repository_keys_ignore_scheme_credentials_case_and_suffixes() {
        for url in [
            "https://gitlab.example.com/group/app.git",
            "https://oauth2:secret@GitLab.Example.com/group/app/",
            "git@gitlab.example.com:group/app.git",
            "ssh://git@gitlab.example.com:2222/group/app.git",
            "http://gitlab.example.com/group/app",
        ] {
            assert_eq!(repository_key(url), "gitlab.example.com/group/app", "{url}");
        }
        assert_ne!(
            repository_key("https://gitlab.example.com/group/app-2.git"),
            "gitlab.example.com/group/app"
        );
        // A port of https is part of the host: another server.
        assert_eq!(
            repository_key("https://git.local:8443/g/a.git"),
            "git.local:8443/g/a"
        );
    }

    #[test]
    fn a_push_wakes_the_projects_of_its_repository_and_ref_only() {
        let url = "https://gitlab.example.com/group/app.git";
        let push = match parse(
            Provider::Gitlab,
            "s3cret",
            &headers(&[
                ("x-gitlab-token", "s3cret"),
                ("x-gitlab-event", "Push Hook"),
            ]),
            GITLAB_PUSH.as_bytes(),
        ) {
            Ok(Event::Push(p)) => p,
            other => panic!("{other:?}"),
        };
        let branch = |b: &str| GitRef::Branch(b.into());
        assert!(matches(
            &push,
            &target("group/app", url, GitRef::DefaultBranch)
        ));
        assert!(matches(&push, &target("group/app", url, branch("main"))));
        assert!(matches(&push, &target(url, url, branch("main"))), "by URL");
        assert!(matches(
            &push,
            &target("GROUP/App", "https://x/GROUP/App.git", branch("main"))
        ));
        assert!(!matches(&push, &target("group/app", url, branch("prod"))));
        assert!(!matches(
            &push,
            &target("group/app", url, GitRef::Tag("main".into()))
        ));
        assert!(!matches(
            &push,
            &target("group/app", url, GitRef::Commit("a".repeat(40)))
        ));
        assert!(!matches(
            &push,
            &target(
                "group/other",
                "https://gitlab.example.com/group/other.git",
                branch("main")
            )
        ));
        // The default branch is known from the payload: a push to another branch is not it.
        let feature = Push {
            git_ref: Some("refs/heads/feature".into()),
            ..push.clone()
        };
        assert!(!matches(
            &feature,
            &target("group/app", url, GitRef::DefaultBranch)
        ));
    }

    #[test]
    fn gitlab_needs_its_token_and_ignores_other_events() {
        let body = GITLAB_PUSH.as_bytes();
        for h in [
            headers(&[("x-gitlab-event", "Push Hook")]),
            headers(&[("x-gitlab-token", "wrong"), ("x-gitlab-event", "Push Hook")]),
            headers(&[("x-gitlab-token", ""), ("x-gitlab-event", "Push Hook")]),
        ] {
            assert_eq!(
                parse(Provider::Gitlab, "s3cret", &h, body),
                Err(Rejection::Unauthorized)
            );
        }
        assert!(matches!(
            parse(
                Provider::Gitlab,
                "s3cret",
                &headers(&[
                    ("x-gitlab-token", "s3cret"),
                    ("x-gitlab-event", "Issue Hook")
                ]),
                body
            ),
            Ok(Event::Ignored(_))
        ));
        assert!(matches!(
            parse(
                Provider::Gitlab,
                "s3cret",
                &headers(&[
                    ("x-gitlab-token", "s3cret"),
                    ("x-gitlab-event", "Push Hook")
                ]),
                b"{not json"
            ),
            Err(Rejection::BadRequest(_))
        ));
        // An empty configured secret never authenticates anything.
        assert_eq!(
            parse(
                Provider::Gitlab,
                "",
                &headers(&[("x-gitlab-token", ""), ("x-gitlab-event", "Push Hook")]),
                body
            ),
            Err(Rejection::Unauthorized)
        );
    }

    #[test]
    fn a_registry_notification_wakes_the_projects_of_its_repository_and_tag() {
        // As CNCF distribution sends it (one pull, one tagged push, one push by digest).
        let body = br#"{"events": [
            {"action": "pull", "target": {"repository": "group/app", "tag": "v1"}, "request": {"host": "registry.example:5050"}},
            {"action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": "group/app", "digest": "sha256:0", "tag": "v2"}, "request": {"host": "registry.example:5050"}},
            {"action": "push", "target": {"repository": "group/app", "digest": "sha256:1"}, "request": {"host": "registry.example:5050"}}
        ]}"#;
        let auth = headers(&[("authorization", "Bearer s3cret")]);
        let Ok(Event::Pushes(pushes)) = parse(Provider::Registry, "s3cret", &auth, body) else {
            panic!("a push");
        };
        assert_eq!(pushes.len(), 1);
        let url = "oci://registry.example:5050/group/app";
        assert!(matches(
            &pushes[0],
            &target(url, url, GitRef::Tag("v2".into()))
        ));
        assert!(!matches(
            &pushes[0],
            &target(url, url, GitRef::Tag("v1".into()))
        ));
        assert!(matches(
            &pushes[0],
            &target(url, url, GitRef::Semver(">=1".into()))
        ));
        assert!(
            !matches(&pushes[0], &target(url, url, GitRef::DefaultBranch)),
            "latest only"
        );
        let other = "oci://registry.example:5050/group/other";
        assert!(!matches(
            &pushes[0],
            &target(other, other, GitRef::Tag("v2".into()))
        ));
        assert_eq!(
            parse(
                Provider::Registry,
                "s3cret",
                &headers(&[("authorization", "Bearer no")]),
                body
            ),
            Err(Rejection::Unauthorized)
        );
        assert!(matches!(
            parse(Provider::Registry, "s3cret", &auth, br#"{"events": []}"#),
            Ok(Event::Ignored(_))
        ));
    }

    #[test]
    fn github_needs_the_bodys_hmac() {
        // GitHub's documented example: secret "It's a Secret to Everybody", payload
        // "Hello, World!".
        let secret = "It's a Secret to Everybody";
        let signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let h = |sig: &str| headers(&[("x-hub-signature-256", sig), ("x-github-event", "ping")]);
        assert!(matches!(
            parse(Provider::Github, secret, &h(signature), b"Hello, World!"),
            Ok(Event::Ignored(_))
        ));
        assert_eq!(
            parse(Provider::Github, secret, &h(signature), b"Hello, World?"),
            Err(Rejection::Unauthorized)
        );
        assert_eq!(
            parse(Provider::Github, "another", &h(signature), b"Hello, World!"),
            Err(Rejection::Unauthorized)
        );
        assert_eq!(
            parse(Provider::Github, secret, &h("sha1=abc"), b"Hello, World!"),
            Err(Rejection::Unauthorized)
        );
    }

    #[test]
    fn the_generic_hook_names_a_project_or_means_all() {
        let auth = headers(&[("authorization", "Bearer s3cret")]);
        let all = match parse(Provider::Generic, "s3cret", &auth, b"") {
            Ok(Event::Push(p)) => p,
            other => panic!("{other:?}"),
        };
        assert!(matches(
            &all,
            &target("a/b", "https://x/a/b.git", GitRef::DefaultBranch)
        ));
        let one = match parse(
            Provider::Generic,
            "s3cret",
            &auth,
            br#"{"project":"a/b","ref":"refs/heads/main"}"#,
        ) {
            Ok(Event::Push(p)) => p,
            other => panic!("{other:?}"),
        };
        assert!(matches(
            &one,
            &target("a/b", "https://x/a/b.git", GitRef::Branch("main".into()))
        ));
        assert!(!matches(
            &one,
            &target("a/c", "https://x/a/c.git", GitRef::Branch("main".into()))
        ));
        assert_eq!(
            parse(
                Provider::Generic,
                "s3cret",
                &headers(&[("authorization", "Bearer nope")]),
                b""
            ),
            Err(Rejection::Unauthorized)
        );
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_sustained_rate() {
        let limit = RateLimit::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| limit.take(t0)));
        assert!(!limit.take(t0));
        assert!(!limit.take(t0 + Duration::from_millis(50)));
        assert!(limit.take(t0 + Duration::from_millis(120)));
        assert!(!limit.take(t0 + Duration::from_millis(130)));
        // Refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| limit.take(later)));
        assert!(!limit.take(later));
    }

    #[test]
    fn a_wake_up_is_kept_until_the_worker_waits() {
        let triggers = Triggers::default();
        let t = target("a/b", "https://x/a/b.git", GitRef::DefaultBranch);
        let wake = t.wake.clone();
        triggers.set(vec![t]);
        let fired = triggers.fire(&Push {
            everything: true,
            ..Push::default()
        });
        assert_eq!(fired, ["a/b"]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), wake.notified())
                .await
                .expect("the permit was stored");
        });
    }
}
