//! sluice's sync engine: what keeps a cluster equal to a set of objects.
//!
//! Given objects (from anywhere), the engine plans them ([`plan`]: kind order, CRDs and
//! Namespaces first, the prune set), dry-runs and server-side applies them ([`apply`]),
//! records them in an inventory in agentk's and cli-utils' ConfigMap format ([`inventory`]),
//! adopts agentk's inventories ([`takeover`]), deletes what left the set ([`prune`]) and
//! waits for health with kstatus' rules ([`wait`]), reading shared watches ([`live`]) that also
//! report [`drift`]. [`cluster`] is its view of the API server: discovery, scopes, reads.
//!
//! Must not know: git, configuration files, plugins. It is usable as a library the way
//! Flux's `ssa` package and cli-utils are; the agent (`sluice-agent`) drives it.
#![deny(missing_docs)]

pub mod apply;
pub mod cluster;
pub mod drift;
pub mod inventory;
pub mod live;
pub mod plan;
pub mod prune;
pub mod takeover;
pub mod wait;

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
