//! Work shared across replicas. Each manifest project belongs to one of a fixed number of
//! shards ([`shard_of`]: SHA-256 of its id); each shard is owned by at most one replica at a
//! time, and only the owner runs that shard's workers.
//!
//! Replicas agree through **one** `coordination.k8s.io/v1` Lease, `sluice-<agent>-shards`,
//! whose annotation `sluice.dev/shards` holds the [`Table`]: the owner of every shard and a
//! heartbeat per replica. Every retry period (2 s) each replica reads the Lease, bumps its
//! heartbeat, gives up shards above its fair share, takes free ones up to it, and writes the
//! Lease back with the `resourceVersion` it read (a concurrent writer makes it a conflict,
//! and it tries again on a fresh read). So the Lease writes per minute are the replicas
//! times 30, whatever the number of projects.
//!
//! **Expiry** is judged as client-go judges a Lease: a replica whose heartbeat has not
//! changed for the lease duration (15 s) *by the observer's own monotonic clock* is gone;
//! its shards are freed and taken. Wall clocks are never compared.
//!
//! **Fencing.** Every write a worker makes goes through its shard's [`Gate`]: it is refused
//! unless this replica holds the shard and its last successful heartbeat began less than
//! the renew deadline (10 s) ago. Another replica sees that heartbeat only after it was
//! written, and waits the lease duration from then, so the old owner's writes stop at least
//! `lease duration - renew deadline` (5 s) before a new owner may start. A shard given up
//! on purpose (a replica joined) is revoked first: new writes are refused and the ones in
//! flight are awaited before the Lease says it is free.
//!
//! `decide` is the rule, table-tested below; `run` is the loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{info, warn};

/// The Lease annotation that holds the [`Table`].
pub const ANNOTATION: &str = "sluice.dev/shards";

/// Shards in a new table: divides evenly among 1, 2, 3, 4 and 6 replicas.
pub const DEFAULT_SHARDS: u16 = 12;

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespace of the Lease (the pod's namespace, `POD_NAMESPACE`).
    pub namespace: String,
    /// Lease name: `sluice-<agent>-shards`.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Shards of a table this replica creates; an existing table keeps its own count.
    pub shards: u16,
    /// A replica whose heartbeat is unchanged this long is gone. Default 15 s.
    pub lease_duration: Duration,
    /// Writes stop when no heartbeat succeeded for this long. Default 10 s.
    pub renew_deadline: Duration,
    /// How often the table is read and the heartbeat written. Default 2 s.
    pub retry_period: Duration,
    /// The single-leader Lease of sluice 0.4 (`sluice-<agent>-lock`): while a live holder
    /// has it, this replica takes no shard, so a rolling update from 0.4 never has two
    /// writers.
    pub legacy_lock: Option<String>,
    /// Added to the wall-clock times this replica writes (tests stand in a skewed clock
    /// with it; no decision reads a wall clock).
    pub clock_offset: i64,
}

impl Config {
    /// agentk's Lease timings and [`DEFAULT_SHARDS`].
    #[must_use]
    pub fn new(namespace: &str, name: &str, identity: &str) -> Config {
        Config {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            shards: DEFAULT_SHARDS,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            legacy_lock: None,
            clock_offset: 0,
        }
    }
}

/// The shard of a project: the first 8 bytes of the SHA-256 of its id, modulo `shards`.
/// Fixed across versions and machines: replicas of different builds agree.
#[must_use]
pub fn shard_of(project_id: &str, shards: u16) -> u16 {
    let digest = Sha256::digest(project_id.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(head) % u64::from(shards.max(1))) as u16
}

/// Who owns what, as stored in the Lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Table {
    /// The owner of each shard by index; empty: free.
    pub owners: Vec<String>,
    /// Each live replica's heartbeat, bumped by the replica on every write.
    pub members: BTreeMap<String, u64>,
    /// Projects a push webhook reached on a replica that does not sync them: the owner of
    /// each one's shard wakes its worker and takes it off the list.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub wakes: BTreeSet<String>,
}

impl Table {
    /// The table a Lease holds (an empty one when it holds none or it does not parse).
    #[must_use]
    pub fn of(lease: &Lease) -> Table {
        lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION))
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default()
    }

    /// The shards `member` owns.
    #[must_use]
    pub fn owned_by(&self, member: &str) -> BTreeSet<u16> {
        (0u16..)
            .zip(&self.owners)
            .filter(|(_, o)| *o == member)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Each member's heartbeat as this replica last saw it change, and when (monotonic).
type Seen = BTreeMap<String, (u64, Instant)>;

/// The table this replica writes next. Bumps `me`'s heartbeat; drops members whose
/// heartbeat has not changed for `lease` by this replica's clock and frees their shards;
/// gives up `me`'s shards above its fair share (highest first) and takes free ones up to
/// it (lowest first). Never takes a shard a live member holds. `leaving`: give up
/// everything and leave the table.
fn decide(
    mut t: Table,
    seen: &mut Seen,
    now: Instant,
    me: &str,
    lease: Duration,
    leaving: bool,
) -> Table {
    for (m, beat) in &t.members {
        if seen.get(m).is_none_or(|(b, _)| b != beat) {
            seen.insert(m.clone(), (*beat, now));
        }
    }
    seen.retain(|m, _| t.members.contains_key(m));
    t.members
        .retain(|m, _| m == me || seen.get(m).is_none_or(|(_, since)| now - *since <= lease));
    // A replica new to the table only writes its heartbeat this round: replicas started
    // together then all see each other before any takes a shard, instead of the first
    // taking every shard and giving most back a round later.
    let joining = !leaving && !t.members.contains_key(me);
    if leaving {
        t.members.remove(me);
    } else {
        let beat = t.members.entry(me.to_string()).or_insert(0);
        *beat = beat.wrapping_add(1);
    }
    for owner in &mut t.owners {
        if !owner.is_empty() && !t.members.contains_key(owner) {
            owner.clear();
        }
    }
    if leaving || joining || t.owners.is_empty() {
        return t;
    }
    let target = fair_share(&t, me);
    let mine: Vec<usize> = (0..t.owners.len()).filter(|&i| t.owners[i] == me).collect();
    for &i in mine.iter().rev().take(mine.len().saturating_sub(target)) {
        t.owners[i].clear();
    }
    let mut held = mine.len().min(target);
    for owner in &mut t.owners {
        if held >= target {
            break;
        }
        if owner.is_empty() {
            *owner = me.to_string();
            held += 1;
        }
    }
    t
}

/// `me`'s share of the shards: an equal part each, the remainder to the members that hold
/// the most now (then by name), so a balanced table stays as it is.
fn fair_share(t: &Table, me: &str) -> usize {
    let n = t.members.len().max(1);
    let (base, extra) = (t.owners.len() / n, t.owners.len() % n);
    let count = |m: &str| t.owners.iter().filter(|o| *o == m).count();
    let mut order: Vec<&String> = t.members.keys().collect();
    order.sort_by_key(|m| (std::cmp::Reverse(count(m)), *m));
    let rank = order.iter().position(|m| *m == me).unwrap_or(n);
    base + usize::from(rank < extra)
}

/// What this replica holds, shared by the loop and the workers' gates.
#[derive(Debug)]
pub struct Ownership {
    identity: String,
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<Owned>,
    idle: tokio::sync::Notify,
    /// Projects of this replica's shards that a push reached on another replica.
    woken: tokio::sync::watch::Sender<BTreeSet<String>>,
}

#[derive(Debug, Default)]
struct State {
    /// Per held shard: writes are allowed until then.
    until: BTreeMap<u16, Instant>,
    /// Writes in flight per shard.
    inflight: BTreeMap<u16, usize>,
    /// Pushes received here for projects another replica syncs, not yet in the table.
    forward: BTreeSet<String>,
}

/// The shards held, and out of how many.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// The table's shard count (0 until the table was first read).
    pub shards: u16,
    /// The shards this replica holds.
    pub held: BTreeSet<u16>,
}

impl Owned {
    /// Whether this replica runs `project_id`'s worker.
    #[must_use]
    pub fn owns(&self, project_id: &str) -> bool {
        self.shards > 0 && self.held.contains(&shard_of(project_id, self.shards))
    }
}

impl Ownership {
    /// Nothing held yet.
    #[must_use]
    pub fn new(identity: &str) -> Arc<Ownership> {
        Arc::new(Ownership {
            identity: identity.to_string(),
            state: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(Owned::default()),
            idle: tokio::sync::Notify::new(),
            woken: tokio::sync::watch::Sender::new(BTreeSet::new()),
        })
    }

    /// Passes a push for `project` (synced by another replica) on to its owner, through
    /// the table at this replica's next round.
    pub fn forward(&self, project: &str) {
        self.lock().forward.insert(project.to_string());
    }

    /// Projects of this replica's shards woken through the table; the receiver sees each
    /// batch (take it with `borrow_and_update`).
    #[must_use]
    pub fn woken(&self) -> tokio::sync::watch::Receiver<BTreeSet<String>> {
        self.woken.subscribe()
    }

    /// This replica's identity (recorded with each sync).
    #[must_use]
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// What is held now; `changed()` on the receiver wakes on every change.
    #[must_use]
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Owned> {
        self.changed.subscribe()
    }

    /// The gate of `shard`, for the clients of its workers.
    #[must_use]
    pub fn gate(self: &Arc<Self>, shard: u16) -> Gate {
        Gate {
            ownership: self.clone(),
            shard,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops `shards`' writes: new ones are refused at once; returns when the ones in
    /// flight ended (or after `wait`: a write cannot outlive its own deadline anyway).
    async fn revoke(&self, shards: &BTreeSet<u16>, wait: Duration) {
        {
            let mut s = self.lock();
            for shard in shards {
                s.until.remove(shard);
            }
        }
        let _ = tokio::time::timeout(wait, async {
            loop {
                let idle = self.idle.notified();
                if shards
                    .iter()
                    .all(|s| self.lock().inflight.get(s).copied().unwrap_or(0) == 0)
                {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }

    /// Holds exactly `held` (of `shards`), writable until `until`.
    fn hold(&self, shards: u16, held: &BTreeSet<u16>, until: Instant) {
        {
            let mut s = self.lock();
            s.until = held.iter().map(|&h| (h, until)).collect();
        }
        self.changed.send_if_modified(|o| {
            let new = Owned {
                shards,
                held: held.clone(),
            };
            let changed = *o != new;
            *o = new;
            changed
        });
    }

    /// Lets nothing be written any more (the heartbeat stopped, or this replica left).
    async fn drop_all(&self, wait: Duration) {
        let all: BTreeSet<u16> = self.lock().until.keys().copied().collect();
        self.revoke(&all, wait).await;
        let shards = self.changed.borrow().shards;
        self.changed.send_if_modified(|o| {
            let changed = !o.held.is_empty();
            *o = Owned {
                shards,
                held: BTreeSet::new(),
            };
            changed
        });
    }
}

/// Admits a shard's writes while this replica holds the shard within its deadline.
#[derive(Debug, Clone)]
pub struct Gate {
    ownership: Arc<Ownership>,
    shard: u16,
}

/// A write in flight: counted until dropped.
#[derive(Debug)]
pub struct Pass {
    ownership: Arc<Ownership>,
    shard: u16,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut s = self.ownership.lock();
        if let Some(n) = s.inflight.get_mut(&self.shard) {
            *n = n.saturating_sub(1);
        }
        drop(s);
        self.ownership.idle.notify_waiters();
    }
}

/// A write was refused: this replica does not hold the shard (any more).
#[derive(Debug, thiserror::Error)]
#[error(
    "replica {identity} does not hold shard {shard} (its lease ended or the shard moved to another replica); write refused"
)]
pub struct Fenced {
    identity: String,
    shard: u16,
}

impl Gate {
    /// A pass for one write, or [`Fenced`].
    ///
    /// # Errors
    /// [`Fenced`] when the shard is not held or its deadline has passed.
    pub fn admit(&self) -> Result<Pass, Fenced> {
        let mut s = self.ownership.lock();
        match s.until.get(&self.shard) {
            Some(until) if Instant::now() < *until => {
                *s.inflight.entry(self.shard).or_insert(0) += 1;
                Ok(Pass {
                    ownership: self.ownership.clone(),
                    shard: self.shard,
                })
            }
            _ => Err(Fenced {
                identity: self.ownership.identity.clone(),
                shard: self.shard,
            }),
        }
    }

    /// The shard.
    #[must_use]
    pub fn shard(&self) -> u16 {
        self.shard
    }
}

/// Takes part in the table until `shutdown` resolves, keeping `ownership` up to date; then
/// stops every write, gives its shards up and leaves the table (so the others take them at
/// once instead of after the lease duration).
pub async fn run(
    client: kube::Client,
    cfg: Config,
    ownership: Arc<Ownership>,
    shutdown: impl Future<Output = ()>,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut seen = Seen::new();
    let mut legacy = cfg
        .legacy_lock
        .clone()
        .map(|name| Legacy { name, seen: None });
    let mut last_beat = Instant::now();
    let mut held = BTreeSet::new();
    tokio::pin!(shutdown);
    loop {
        if let Some(l) = &mut legacy {
            match tokio::time::timeout(cfg.renew_deadline, l.held_by_another(&api, &cfg)).await {
                Ok(false) => {
                    info!(lease = %l.name, "the single-leader lease of an earlier version is free; sharing work");
                    legacy = None;
                }
                Ok(true) => {}
                Err(_) => warn!(lease = %l.name, "the single-leader lease did not answer in time"),
            }
        }
        if legacy.is_none() {
            let started = Instant::now();
            match round(&api, &cfg, &ownership, &mut seen, &held, false).await {
                Ok(now_held) => {
                    last_beat = started;
                    if now_held != held {
                        info!(lease = %cfg.name, identity = %cfg.identity, shards = ?now_held, "shards held");
                    }
                    held = now_held;
                }
                Err(e) => warn!(lease = %cfg.name, error = %e, "failed to renew the shard lease"),
            }
            if last_beat.elapsed() >= cfg.renew_deadline && !held.is_empty() {
                warn!(lease = %cfg.name, "could not renew the shard lease before the deadline; stopping every write");
                ownership.drop_all(cfg.renew_deadline).await;
                held.clear();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.retry_period) => {}
            _ = &mut shutdown => break,
        }
    }
    ownership.drop_all(cfg.renew_deadline).await;
    // Leave: the others take the shards at their next round.
    let _ = round(&api, &cfg, &ownership, &mut seen, &held, true).await;
    info!(lease = %cfg.name, identity = %cfg.identity, "left the shard table");
}

/// One read-decide-write of the table (tried again at once on a conflict, a few times),
/// each call within the renew deadline. Returns the shards held after it.
async fn round(
    api: &Api<Lease>,
    cfg: &Config,
    ownership: &Ownership,
    seen: &mut Seen,
    held: &BTreeSet<u16>,
    leaving: bool,
) -> Result<BTreeSet<u16>, String> {
    let started = Instant::now();
    let deadline = started + cfg.renew_deadline;
    for _ in 0..4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let read = tokio::time::timeout(left, api.get_opt(&cfg.name))
            .await
            .map_err(|_| "the shard lease did not answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        let (mut lease, table) = match read {
            Some(lease) => {
                let mut table = Table::of(&lease);
                if table.owners.is_empty() {
                    table.owners = vec![String::new(); usize::from(cfg.shards.max(1))];
                }
                (lease, table)
            }
            None => (
                Lease {
                    metadata: ObjectMeta {
                        name: Some(cfg.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec::default()),
                },
                Table {
                    owners: vec![String::new(); usize::from(cfg.shards.max(1))],
                    ..Table::default()
                },
            ),
        };
        let shards = u16::try_from(table.owners.len()).unwrap_or(u16::MAX);
        let next = decide(
            table,
            seen,
            Instant::now(),
            &cfg.identity,
            cfg.lease_duration,
            leaving,
        );
        let mut next = next;
        // Pushes received here go into the table; those for our shards come out of it.
        let forwarded: BTreeSet<String> = ownership.lock().forward.clone();
        next.wakes.extend(forwarded.iter().cloned());
        let ours: BTreeSet<String> = next
            .wakes
            .iter()
            .filter(|p| next.owners.get(usize::from(shard_of(p, shards))) == Some(&cfg.identity))
            .cloned()
            .collect();
        next.wakes.retain(|p| !ours.contains(p));
        let next_held = next.owned_by(&cfg.identity);
        // Shards given up stop writing before the Lease says they are free.
        let given_up: BTreeSet<u16> = held.difference(&next_held).copied().collect();
        if !given_up.is_empty() {
            ownership.revoke(&given_up, cfg.renew_deadline).await;
        }
        lease
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(
                ANNOTATION.into(),
                serde_json::to_string(&next).unwrap_or_default(),
            );
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(cfg.identity.clone());
        spec.renew_time = Some(MicroTime(wall_clock(cfg.clock_offset)));
        spec.lease_duration_seconds = Some(cfg.lease_duration.as_secs() as i32);
        let left = deadline.saturating_duration_since(Instant::now());
        let write = async {
            if lease.metadata.resource_version.is_some() {
                api.replace(&cfg.name, &PostParams::default(), &lease).await
            } else {
                api.create(&PostParams::default(), &lease).await
            }
        };
        match tokio::time::timeout(left, write).await {
            Ok(Ok(_)) => {
                if !leaving {
                    ownership.hold(shards, &next_held, started + cfg.renew_deadline);
                }
                ownership.lock().forward.retain(|p| !forwarded.contains(p));
                if !ours.is_empty() {
                    ownership.woken.send_replace(ours);
                }
                return Ok(next_held);
            }
            // Another replica wrote first: read again.
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the shard lease did not answer in time".into()),
        }
    }
    Err("the shard lease kept changing under this replica (conflicts)".into())
}

fn wall_clock(offset: i64) -> k8s_openapi::jiff::Timestamp {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(offset))
        .unwrap_or(now)
}

/// The single-leader Lease of an earlier version, watched until it is free.
struct Legacy {
    name: String,
    seen: Option<(String, Instant)>,
}

impl Legacy {
    /// Whether a live holder other than this replica has it: its record changed within
    /// the lease duration by this replica's clock.
    async fn held_by_another(&mut self, api: &Api<Lease>, cfg: &Config) -> bool {
        let lease = match api.get_opt(&self.name).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return false,
            // Not ours to read: no earlier install of this agent can be holding it.
            Err(kube::Error::Api(s)) if s.code == 403 => {
                warn!(lease = %self.name, "not allowed to read the single-leader lease; not waiting for it");
                return false;
            }
            Err(e) => {
                warn!(lease = %self.name, error = %e, "failed to read the single-leader lease");
                return true;
            }
        };
        let spec = lease.spec.unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        if holder.is_empty() || holder == cfg.identity {
            return false;
        }
        let record = format!("{holder} {:?}", spec.renew_time.map(|t| t.0.to_string()));
        let now = Instant::now();
        if self.seen.as_ref().is_none_or(|(r, _)| *r != record) {
            self.seen = Some((record, now));
        }
        let since = self.seen.as_ref().map_or(now, |(_, t)| *t);
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
        );
        now - since <= duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(owners: &[&str], members: &[(&str, u64)]) -> Table {
        Table {
            owners: owners.iter().map(|s| s.to_string()).collect(),
            members: members.iter().map(|(m, b)| (m.to_string(), *b)).collect(),
            wakes: BTreeSet::new(),
        }
    }

    const LEASE: Duration = Duration::from_secs(15);

    #[test]
    fn a_project_always_lands_in_the_same_shard() {
        // Fixed values: a change here moves projects between replicas of mixed versions.
        assert_eq!(shard_of("group/app", 12), shard_of("group/app", 12));
        let spread: BTreeSet<u16> = (0..200).map(|i| shard_of(&format!("p{i}"), 12)).collect();
        assert_eq!(spread.len(), 12, "200 projects reach every shard");
        assert_eq!(shard_of("x", 0), 0, "no shards: no division by zero");
        assert_eq!(
            [
                shard_of("group/app", 12),
                shard_of("p0", 12),
                shard_of("p1", 7)
            ],
            [FIXED_APP, FIXED_P0, FIXED_P1]
        );
    }
    // The SHA-256 of the ids, reduced (checked with Python's hashlib): never to change.
    const FIXED_APP: u16 = 8;
    const FIXED_P0: u16 = 4;
    const FIXED_P1: u16 = 2;

    #[test]
    fn a_lone_replica_takes_every_shard_and_a_second_gets_half_back() {
        let t0 = Instant::now();
        let mut a = Seen::new();
        let mut b = Seen::new();
        // A new member's first round only registers it.
        let t = decide(table(&[""; 4], &[]), &mut a, t0, "a", LEASE, false);
        assert_eq!(t, table(&[""; 4], &[("a", 1)]));
        let t = decide(t, &mut a, t0, "a", LEASE, false);
        assert_eq!(t, table(&["a"; 4], &[("a", 2)]));
        // b joins: takes nothing held by a live member.
        let t = decide(t, &mut b, t0, "b", LEASE, false);
        assert_eq!(t, table(&["a"; 4], &[("a", 2), ("b", 1)]));
        let t = decide(t, &mut b, t0, "b", LEASE, false);
        assert_eq!(t, table(&["a"; 4], &[("a", 2), ("b", 2)]));
        // a gives its excess back (highest shards first), b takes it.
        let t = decide(t, &mut a, t0, "a", LEASE, false);
        assert_eq!(t, table(&["a", "a", "", ""], &[("a", 3), ("b", 2)]));
        let t = decide(t, &mut b, t0, "b", LEASE, false);
        assert_eq!(t, table(&["a", "a", "b", "b"], &[("a", 3), ("b", 3)]));
        // Balanced: more rounds change nothing but the heartbeats.
        let t = decide(t, &mut a, t0, "a", LEASE, false);
        assert_eq!(t.owners, ["a", "a", "b", "b"]);
    }

    #[test]
    fn replicas_starting_together_split_the_shards_without_moving_any_twice() {
        let t0 = Instant::now();
        let (mut a, mut b, mut c) = (Seen::new(), Seen::new(), Seen::new());
        let mut t = table(&[""; 12], &[]);
        // Each registers in its first round, then takes its share.
        for (seen, me) in [(&mut a, "a"), (&mut b, "b"), (&mut c, "c")] {
            t = decide(t, seen, t0, me, LEASE, false);
        }
        assert!(t.owners.iter().all(String::is_empty), "{t:?}");
        for (seen, me) in [(&mut a, "a"), (&mut b, "b"), (&mut c, "c")] {
            t = decide(t, seen, t0, me, LEASE, false);
        }
        for me in ["a", "b", "c"] {
            assert_eq!(t.owners.iter().filter(|o| *o == me).count(), 4, "{t:?}");
        }
    }

    #[test]
    fn a_silent_replica_loses_its_shards_after_the_lease_by_the_observers_clock() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Seen::new();
        let start = table(&["a", "a", "b", "b"], &[("a", 7), ("b", 3)]);
        // a's heartbeat stays at 7: b waits the full lease from when it first saw 7.
        let t = decide(start.clone(), &mut b, at(0), "b", LEASE, false);
        assert_eq!(t.owners, ["a", "a", "b", "b"]);
        let t = decide(t, &mut b, at(15), "b", LEASE, false);
        assert_eq!(
            t.owners,
            ["a", "a", "b", "b"],
            "15 s is not more than the lease"
        );
        let t = decide(t, &mut b, at(16), "b", LEASE, false);
        assert_eq!(t, table(&["b"; 4], &[("b", 6)]));

        // a heartbeat that moved restarts the wait, however old or new a wall clock says.
        let mut b = Seen::new();
        let t = decide(start.clone(), &mut b, at(0), "b", LEASE, false);
        let mut moved = t.clone();
        moved.members.insert("a".into(), 8);
        let t = decide(moved, &mut b, at(14), "b", LEASE, false);
        let t = decide(t, &mut b, at(20), "b", LEASE, false);
        assert_eq!(t.owners, ["a", "a", "b", "b"]);
        let t = decide(t, &mut b, at(30), "b", LEASE, false);
        assert_eq!(t.owners, ["b"; 4]);
    }

    #[test]
    fn shares_are_even_and_a_balanced_table_is_left_alone() {
        // (owners, members, me, expected owners after me's round)
        let t0 = Instant::now();
        type Row<'a> = (&'a [&'a str], &'a [&'a str], &'a str, &'a [&'a str]);
        let rows: &[Row] = &[
            // 5 shards over 2: the one holding more keeps the extra shard.
            (
                &["a", "a", "a", "b", "b"],
                &["a", "b"],
                "a",
                &["a", "a", "a", "b", "b"],
            ),
            (
                &["a", "a", "a", "b", "b"],
                &["a", "b"],
                "b",
                &["a", "a", "a", "b", "b"],
            ),
            // a third member: a and b give one each.
            (
                &["a", "a", "a", "b", "b", "b"],
                &["a", "b", "c"],
                "a",
                &["a", "a", "", "b", "b", "b"],
            ),
            (
                &["a", "a", "", "b", "b", "b"],
                &["a", "b", "c"],
                "b",
                &["a", "a", "", "b", "b", ""],
            ),
            (
                &["a", "a", "", "b", "b", ""],
                &["a", "b", "c"],
                "c",
                &["a", "a", "c", "b", "b", "c"],
            ),
            // a shard owned by someone not in the table is free.
            (&["x", "a"], &["a"], "a", &["a", "a"]),
            // more members than shards: some hold none.
            (&["a", "b"], &["a", "b", "c"], "c", &["a", "b"]),
        ];
        for (i, (owners, members, me, want)) in rows.iter().enumerate() {
            let members: Vec<(&str, u64)> = members.iter().map(|m| (*m, 1)).collect();
            let t = decide(
                table(owners, &members),
                &mut Seen::new(),
                t0,
                me,
                LEASE,
                false,
            );
            assert_eq!(t.owners, *want, "row {i}");
        }
    }

    #[test]
    fn a_leaving_replica_frees_its_shards_and_leaves() {
        let t = decide(
            table(&["a", "b"], &[("a", 1), ("b", 1)]),
            &mut Seen::new(),
            Instant::now(),
            "a",
            LEASE,
            true,
        );
        assert_eq!(t, table(&["", "b"], &[("b", 1)]));
    }

    #[tokio::test]
    async fn the_gate_refuses_writes_after_the_deadline_and_revoke_waits_for_those_in_flight() {
        let own = Ownership::new("a");
        let gate = own.gate(3);
        assert!(gate.admit().is_err(), "nothing held yet");
        own.hold(
            12,
            &BTreeSet::from([3]),
            Instant::now() + Duration::from_secs(60),
        );
        assert!(own.subscribe().borrow().owns_shard(3));
        let pass = gate.admit().expect("held");
        let revoked = {
            let own = own.clone();
            tokio::spawn(async move {
                own.revoke(&BTreeSet::from([3]), Duration::from_secs(30))
                    .await;
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = gate.admit().expect_err("revoked: no new write");
        assert_eq!(
            err.to_string(),
            "replica a does not hold shard 3 (its lease ended or the shard moved to another replica); write refused"
        );
        assert!(!revoked.is_finished(), "waits for the write in flight");
        let released = Instant::now();
        drop(pass);
        assert!(revoked.await.expect("revoke") >= released);

        own.hold(
            12,
            &BTreeSet::from([3]),
            Instant::now() - Duration::from_millis(1),
        );
        assert!(gate.admit().is_err(), "past the deadline");
    }

    impl Owned {
        fn owns_shard(&self, s: u16) -> bool {
            self.held.contains(&s)
        }
    }
}
