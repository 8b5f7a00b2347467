//! sluice: a pull-mode GitOps agent for Kubernetes.
//!
//! sluice reads GitLab agentk's configuration (`.gitlab/agents/<name>/config.yaml`), fetches
//! the manifest repositories itself, and keeps the cluster equal to what git says. Data takes
//! one path, one module per stage, each handing a plain value to the next:
//!
//! [`config`] → [`source`] → [`select`] → [`decode`] → (plugins) → [`limits`] → [`plan`] → [`apply`] →
//! [`inventory`] → [`wait`] → [`report`]
//!
//! [`agent`] runs that path per manifest project whenever the commit changes or the re-apply
//! timer fires, and records each outcome with [`history`] (Events, last sync), which
//! [`status`] reads back. Its health waits and [`drift`] read the [`live`] watches, kept
//! across syncs and shared by all projects. [`install`] generates the manifests that
//! install the agent. Start reading at [`agent`].
#![deny(missing_docs)]

pub mod agent;
pub mod apply;
pub mod cluster;
pub mod config;
pub mod decode;
pub mod drift;
pub mod history;
pub mod install;
pub mod inventory;
pub mod leader;
pub mod limits;
pub mod live;
pub mod object;
pub mod observability;
pub mod plan;
pub mod plugins;
pub mod render;
pub mod report;
pub mod select;
pub mod source;
pub mod status;
pub mod sync;
pub mod wait;
pub mod webhook;

/// Selects rustls' `ring` provider for the process. Two providers end up linked (kube uses
/// ring, gix's HTTP client aws-lc-rs), and rustls then refuses to guess; call this once
/// before building a Kubernetes client. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The `User-Agent` of sluice's requests to the API server (`sluice/<version>`), so audit
/// logs and API priority and fairness can tell sluice apart from agentk and kubectl.
pub const USER_AGENT: &str = concat!("sluice/", env!("CARGO_PKG_VERSION"));

/// Why no Kubernetes client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Neither KUBECONFIG nor the in-cluster environment gave a configuration.
    #[error("no Kubernetes configuration (KUBECONFIG or in-cluster): {0}")]
    Config(#[source] kube::config::InferConfigError),
    /// The configuration could not be turned into a client.
    #[error("failed to build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A Kubernetes client from KUBECONFIG or the in-cluster environment, sending
/// [`USER_AGENT`].
///
/// # Errors
/// [`ClientError`] when no configuration is found or it is unusable.
pub async fn kube_client() -> Result<kube::Client, ClientError> {
    let mut config = kube::Config::infer().await.map_err(ClientError::Config)?;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    kube::Client::try_from(config).map_err(ClientError::Client)
}

/// The version of this build, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
