//! Leadership through a `coordination.k8s.io/v1` Lease, as agentk does it: only the holder of
//! the Lease (`sluice-<agent name>-lock`; agentk's is `agent-<agent id>-lock`, which sluice
//! never touches, so an agentk kept for its other features keeps its own leader) runs the
//! GitOps workers, so an old and a new agent never apply at once during a rollout, and extra
//! replicas wait as hot standbys.
//!
//! agentk's timings: lease duration 15 s, renew deadline 10 s, retry period 2 s. Writes use
//! the Lease's `resourceVersion`, so two candidates never both win a round.
//!
//! As client-go does, a lease is judged expired by this replica's own clock: by how long ago
//! *it saw the record change*, never by the `renewTime` another replica's clock wrote (clock
//! skew, or a `renewTime` in the future, cannot steal or freeze the lease). Every Lease call
//! has a timeout, and a leader whose renewal does not succeed within the renew deadline
//! stops its work before the lease can expire for the others. `decide` is the rule.

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
    /// Lease name (sluice: `sluice-<agent name>-lock`; agentk: `agent-<agent id>-lock`).
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
    let mut seen: Option<Seen> = None;
    tokio::pin!(shutdown);
    loop {
        // Wait until we hold the lease.
        loop {
            match tokio::time::timeout(cfg.renew_deadline, try_acquire(&api, &cfg, &mut seen)).await
            {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    warn!(lease = %cfg.name, error = %e, "failed to read or write the leader lease")
                }
                Err(_) => warn!(lease = %cfg.name, "the leader lease did not answer in time"),
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
            _ = keep(&api, &cfg, &mut seen) => warn!(lease = %cfg.name, "lost leadership; stopping the workers"),
            _ = &mut shutdown => {
                release(&api, &cfg).await;
                return;
            }
        }
    }
}

/// Renews every retry period; returns when someone else holds the lease, or when no renewal
/// succeeded within the renew deadline (each call is cut off at the deadline, so the work
/// stops before the lease expires for the other replicas).
async fn keep(api: &Api<Lease>, cfg: &Config, seen: &mut Option<Seen>) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.retry_period).await;
        let left = cfg.renew_deadline.saturating_sub(last_renewal.elapsed());
        match tokio::time::timeout(left, try_acquire(api, cfg, seen)).await {
            Ok(Ok(true)) => last_renewal = tokio::time::Instant::now(),
            Ok(Ok(false)) => return,
            Ok(Err(e)) => warn!(lease = %cfg.name, error = %e, "failed to renew the leader lease"),
            Err(_) => {}
        }
        if last_renewal.elapsed() >= cfg.renew_deadline {
            warn!(lease = %cfg.name, "could not renew the leader lease before the deadline");
            return;
        }
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// The Lease record as far as leadership goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<String>,
    transitions: i32,
    duration: Duration,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            transitions: spec.lease_transitions.unwrap_or(0),
            duration: Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15))
                    .unwrap_or(15)
                    .max(1),
            ),
        }
    }
}

/// The record this replica last saw, and when (by its own monotonic clock) it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    record: Record,
    since: tokio::time::Instant,
}

/// What to do with the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// It is ours: renew it.
    Renew,
    /// It is free, or its holder stopped renewing: take it.
    Take,
    /// Someone else holds it.
    Wait,
}

/// client-go's rule. `seen` is updated when the record changed; the holder's lease has
/// expired when the record has not changed for its duration *by this replica's clock*.
fn decide(
    record: &Record,
    seen: &mut Option<Seen>,
    now: tokio::time::Instant,
    identity: &str,
) -> Decision {
    if seen.as_ref().is_none_or(|s| s.record != *record) {
        *seen = Some(Seen {
            record: record.clone(),
            since: now,
        });
    }
    if record.holder == identity {
        return Decision::Renew;
    }
    if record.holder.is_empty() {
        return Decision::Take;
    }
    let since = seen.as_ref().map_or(now, |s| s.since);
    if now.duration_since(since) > record.duration {
        Decision::Take
    } else {
        Decision::Wait
    }
}

/// Takes or renews the lease when it is ours, free or expired. `Ok(false)`: someone else
/// holds it (or won the race for it).
async fn try_acquire(
    api: &Api<Lease>,
    cfg: &Config,
    seen: &mut Option<Seen>,
) -> Result<bool, kube::Error> {
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
    let record = Record::of(spec);
    match decide(&record, seen, tokio::time::Instant::now(), &cfg.identity) {
        Decision::Wait => return Ok(false),
        Decision::Renew => {}
        Decision::Take => {
            spec.holder_identity = Some(cfg.identity.clone());
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(record.transitions.saturating_add(1));
            spec.lease_duration_seconds = Some(cfg.lease_duration.as_secs() as i32);
        }
    }
    spec.renew_time = Some(now());
    // replace() sends the resourceVersion we read: a concurrent writer makes this a 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up so a standby does not wait for it to expire (within the renew
/// deadline; a Lease that does not answer expires by itself).
async fn release(api: &Api<Lease>, cfg: &Config) {
    let _ = tokio::time::timeout(cfg.renew_deadline, release_now(api, cfg)).await;
}

async fn release_now(api: &Api<Lease>, cfg: &Config) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str, renew: &str) -> Record {
        Record {
            holder: holder.into(),
            renew_time: Some(renew.into()),
            transitions: 3,
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn expiry_is_judged_by_when_this_replica_saw_the_record_change() {
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut seen = None;
        // (record, seconds since t0, decision): a holder renewing in the future (clock
        // skew) never freezes the lease, an old renewTime never steals a live one.
        let table = [
            (record("other", "2099-01-01T00:00:00Z"), 0, Decision::Wait),
            (record("other", "2099-01-01T00:00:00Z"), 10, Decision::Wait),
            (record("other", "2099-01-01T00:00:00Z"), 16, Decision::Take),
            (record("other", "1970-01-01T00:00:00Z"), 17, Decision::Wait),
            (record("other", "1970-01-01T00:00:02Z"), 30, Decision::Wait),
            (record("other", "1970-01-01T00:00:02Z"), 46, Decision::Take),
            (record("me", "1970-01-01T00:00:02Z"), 46, Decision::Renew),
            (record("", "1970-01-01T00:00:02Z"), 47, Decision::Take),
        ];
        for (i, (r, t, want)) in table.into_iter().enumerate() {
            assert_eq!(decide(&r, &mut seen, at(t), "me"), want, "row {i}");
        }
    }

    #[test]
    fn transitions_never_overflow() {
        let spec = LeaseSpec {
            lease_transitions: Some(i32::MAX),
            lease_duration_seconds: Some(-5),
            ..LeaseSpec::default()
        };
        let r = Record::of(&spec);
        assert_eq!(r.transitions.saturating_add(1), i32::MAX);
        assert_eq!(r.duration, Duration::from_secs(15));
    }
}
