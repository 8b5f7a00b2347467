//! Leadership through a `coordination.k8s.io/v1` Lease, as agentk does it: only the holder of
//! `agent-<id>-lock` runs the GitOps workers, so an old and a new agent never apply at once
//! during a rollout, and extra replicas wait as hot standbys.
//!
//! agentk's timings: lease duration 15 s, renew deadline 10 s, retry period 2 s. Writes use
//! the Lease's `resourceVersion`, so two candidates never both win a round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespace of the Lease (agentk: the pod's namespace, `POD_NAMESPACE`).
    pub namespace: String,
    /// Lease name (agentk: `agent-<agent id>-lock`).
    pub name: String,
    /// This candidate's identity (agentk: the pod name, `POD_NAME`).
    pub identity: String,
    /// How long a lease is valid without renewal. Default 15 s.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up. Default 10 s.
    pub renew_deadline: Duration,
    /// How often candidates try and leaders renew. Default 2 s.
    pub retry_period: Duration,
}

impl Config {
    /// agentk's timings for a Lease.
    #[must_use]
    pub fn new(namespace: &str, name: &str, identity: &str) -> Config {
        Config {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Runs `work` while this candidate holds the Lease; when leadership is lost, `work` is
/// dropped (cancelled) and the candidate goes back to waiting. Returns when `work` returns or
/// `shutdown` resolves (then the Lease is released so a standby takes over at once).
///
/// # Cancellation
/// `work` must be cancel-safe at its await points: the agent's is (the next leader re-syncs).
pub async fn run<W, F>(
    client: kube::Client,
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    mut work: W,
) where
    W: FnMut() -> F,
    F: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    tokio::pin!(shutdown);
    loop {
        // Wait until we hold the lease.
        loop {
            match try_acquire(&api, &cfg).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    warn!(lease = %cfg.name, error = %e, "failed to read or write the leader lease")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.retry_period) => {}
                _ = &mut shutdown => return,
            }
        }
        info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
        tokio::select! {
            _ = work() => {
                release(&api, &cfg).await;
                return;
            }
            _ = keep(&api, &cfg) => warn!(lease = %cfg.name, "lost leadership; stopping the workers"),
            _ = &mut shutdown => {
                release(&api, &cfg).await;
                return;
            }
        }
    }
}

/// Renews every retry period; returns when renewal failed for longer than the deadline or
/// someone else holds the lease.
async fn keep(api: &Api<Lease>, cfg: &Config) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.retry_period).await;
        match try_acquire(api, cfg).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => return,
            Err(e) if last_renewal.elapsed() > cfg.renew_deadline => {
                warn!(lease = %cfg.name, error = %e, "could not renew the leader lease before the deadline");
                return;
            }
            Err(_) => {}
        }
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Takes or renews the lease when it is ours, free or expired. `Ok(false)`: someone else
/// holds it (or won the race for it).
async fn try_acquire(api: &Api<Lease>, cfg: &Config) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(cfg.lease_duration.as_secs() as i32),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
        age.as_secs_f64() > duration.as_secs_f64()
    });
    if holder != cfg.identity {
        if !holder.is_empty() && !expired {
            return Ok(false);
        }
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.lease_duration_seconds = Some(cfg.lease_duration.as_secs() as i32);
    }
    spec.renew_time = Some(now());
    // replace() sends the resourceVersion we read: a concurrent writer makes this a 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up so a standby does not wait for it to expire.
async fn release(api: &Api<Lease>, cfg: &Config) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    }
}
