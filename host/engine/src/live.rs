//! Live state: what the cluster holds of the projects' objects, kept from watches that run
//! for as long as the agent does and are shared by all its projects.
//!
//! [`Live`] runs one watch per resource and namespace that some project's applied objects
//! are in (a resource and namespace holding one of a project's objects is watched by name,
//! as the waits did). Its first list is the only one: after it, the API server streams
//! changes, and a push's sync, its health wait and the drift watch after it read the state
//! the watches keep instead of listing every object again. Per object it holds only what
//! those readers need ([`Entry`]): the kstatus input of its last state (compact JSON), its
//! drift [`Fingerprint`], and its last few resourceVersions.
//!
//! **After a write.** A state delivered before a sync's write may arrive after it, so a
//! reader of an object the sync wrote uses the state only once the store caught up with
//! the write ([`caught_up`], pure). Resource versions of one resource compare as integers
//! (KEP-5504, stable since Kubernetes 1.35): the store caught up once the object's state,
//! or the newest version the watch delivered when the object is absent, is at or past the
//! version the write returned. For versions that do not compare (an aggregated API of its
//! own), the store caught up when it delivered that very version among the object's last
//! few, or delivered the object (or its absence) from a list that began after the writes.
//!
//! The watches read with the agent's identity, also for a project that applies with a
//! `service_account` of its own (as the drift watches did): they only read objects the
//! project applied. A watch whose resource and namespace no project uses any more stops
//! ([`Live::track`] replaces a project's set).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject};
use kube::discovery::ApiCapabilities;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::{Semaphore, broadcast};

use crate::cluster::{Cluster, list_in_turn};
use crate::drift::Fingerprint;
use sluice_model::object::ObjRef;

/// The namespace of a scope that watches a namespaced resource in every namespace: one
/// watch (one connection) however many namespaces the projects use. Its objects are keyed
/// `namespace/name` ([`Scope::key`]).
pub const ALL: &str = "*";

/// Past this many namespaces of one resource among the projects' objects, the resource is
/// watched in every namespace at once ([`ALL`]) instead of one watch per namespace (unless
/// the watches are [`Live::per_namespace`]); past this many objects of a cluster-scoped
/// resource watched by name, the whole resource is watched. 1,000 projects in a namespace
/// each held 6,000 watches, each a connection of its own, and 1.1 GiB.
pub const WIDE_AFTER: usize = 4;

/// How many of an object's last resourceVersions an entry keeps: a reader that looks for
/// the version its write returned finds it even when controllers wrote a few times since.
const VERSIONS: usize = 4;

/// How many deleted objects a watch remembers, for a wait on a write whose object was
/// deleted before the wait looked (in a namespace where Pods come and go, the deleted are
/// many; the waits need the last few).
const GONE: usize = 256;

/// Notices queued for a reader that is behind; past that it is told it lagged and looks at
/// everything again.
const NOTICES: usize = 4096;

/// One watch: a resource in a namespace (empty for cluster-scoped ones; [`ALL`] for a
/// namespaced resource watched in every namespace), or one object of it by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    /// The resource's apiVersion.
    pub api_version: String,
    /// The resource's plural.
    pub plural: String,
    /// The namespace; empty for a cluster-scoped resource.
    pub namespace: String,
    /// The one object watched, when the scope is watched by name.
    pub name: Option<String>,
}

impl Scope {
    /// The key of the object `namespace/name` in this scope's watch: its name, or in a
    /// scope of every namespace, `namespace/name`.
    #[must_use]
    pub fn key(&self, namespace: &str, name: &str) -> String {
        if self.namespace == ALL {
            format!("{namespace}/{name}")
        } else {
            name.to_string()
        }
    }
}

/// What a watch keeps of one object.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its last resourceVersions, newest first.
    versions: VecDeque<Box<str>>,
    /// Its drift fingerprint.
    pub fingerprint: Fingerprint,
    /// What kstatus reads of it (`wait::judged_value`), as compact JSON.
    pub judged: Box<str>,
    /// When the list that delivered this state began; `None` for a watch event.
    listed: Option<Instant>,
}

/// What a watch says of an object.
#[derive(Debug)]
pub enum Seen<'a> {
    /// Its watch has not finished its first list (or no project tracks its scope).
    Unlisted {
        /// Why the watch failed last, while it retries.
        error: Option<&'a str>,
    },
    /// It does not exist.
    Absent {
        /// The resourceVersions of its last states before it was deleted, if the watch saw
        /// it deleted.
        versions: Option<&'a VecDeque<Box<str>>>,
        /// When the last completed list began.
        listed: Option<Instant>,
        /// The newest resourceVersion the watch delivered.
        newest: Option<&'a str>,
    },
    /// Its last state.
    Present(&'a Entry),
}

/// Whether `seen` is a state at or after a write that returned `version`, given that every
/// write of the sync had returned by `wrote` (the module doc says why each rule holds).
pub fn caught_up(seen: &Seen<'_>, version: &str, wrote: Instant) -> bool {
    let at_or_past = |v: &str| compare_versions(v, version).map(|o| o.is_ge());
    let after_writes = |listed: Option<Instant>| listed.is_some_and(|at| at > wrote);
    let among = |vs: &VecDeque<Box<str>>| vs.iter().any(|v| &**v == version);
    match seen {
        Seen::Unlisted { .. } => false,
        Seen::Present(e) => match e.versions.front().and_then(|v| at_or_past(v)) {
            Some(past) => past,
            None => among(&e.versions) || after_writes(e.listed),
        },
        Seen::Absent {
            versions,
            listed,
            newest,
        } => {
            newest.and_then(at_or_past) == Some(true)
                || versions.is_some_and(among)
                || after_writes(*listed)
        }
    }
}

/// Compares two resourceVersions of one resource as Kubernetes does
/// (`k8s.io/apimachinery/pkg/util/resourceversion.CompareResourceVersion`): positive
/// integers without leading zeros, of any length. `None` when either is not one.
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let valid =
        |v: &str| !v.is_empty() && !v.starts_with('0') && v.bytes().all(|c| c.is_ascii_digit());
    (valid(a) && valid(b)).then(|| a.len().cmp(&b.len()).then_with(|| a.cmp(b)))
}

/// A change the watches saw.
#[derive(Debug, Clone)]
pub enum Notice {
    /// An object of the scope changed, appeared or went.
    Changed(Arc<Scope>, String),
    /// The scope's watch finished a (re)list: look at all of its objects.
    Listed(Arc<Scope>),
}

/// A reader's objects by scope and name: which of them a [`Notice`] concerns.
#[derive(Debug, Default)]
pub struct Index<'a> {
    by_scope: HashMap<&'a Scope, HashMap<String, usize>>,
    len: usize,
}

impl<'a> Index<'a> {
    /// Indexes `objects` (a scope and the object's namespace and name each, `None`: not
    /// watched) by position.
    pub fn new(
        objects: impl ExactSizeIterator<Item = (Option<&'a Scope>, &'a str, &'a str)>,
    ) -> Self {
        let len = objects.len();
        let mut by_scope: HashMap<&'a Scope, HashMap<String, usize>> = HashMap::new();
        for (i, (scope, namespace, name)) in objects.enumerate() {
            if let Some(scope) = scope {
                by_scope
                    .entry(scope)
                    .or_default()
                    .insert(scope.key(namespace, name), i);
            }
        }
        Index { by_scope, len }
    }

    /// Adds to `dirty` the objects to look at again after what `recv` returned: the one
    /// that changed, those of a scope that listed, all of them when the reader lagged
    /// behind. `false` when the notices ended (the watches are gone).
    pub fn touched(
        &self,
        notice: Result<Notice, broadcast::error::RecvError>,
        dirty: &mut Vec<usize>,
    ) -> bool {
        match notice {
            Ok(Notice::Changed(scope, name)) => {
                if let Some(&i) = self.by_scope.get(&*scope).and_then(|m| m.get(&name)) {
                    dirty.push(i);
                }
            }
            Ok(Notice::Listed(scope)) => {
                if let Some(m) = self.by_scope.get(&*scope) {
                    dirty.extend(m.values());
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => dirty.extend(0..self.len),
            Err(broadcast::error::RecvError::Closed) => return false,
        }
        true
    }
}

/// The watches' state, shared by every project of the agent; cloning shares it. Dropping
/// the last clone stops the watches.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scopes = self.inner.scopes.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("Live").field("scopes", &scopes).finish()
    }
}

struct Inner {
    scopes: Mutex<HashMap<Arc<Scope>, Arc<Watched>>>,
    /// Per project, the scopes its objects are in.
    interest: Mutex<HashMap<String, HashSet<Arc<Scope>>>>,
    notices: broadcast::Sender<Notice>,
    /// One watch lists at a time (`cluster::list_in_turn`).
    turn: Arc<Semaphore>,
    /// Never watch a resource in every namespace (the agent may list only some).
    per_namespace: bool,
}

/// One running watch and what it delivered.
struct Watched {
    data: Arc<Mutex<Data>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one watch delivered.
#[derive(Debug, Default)]
struct Data {
    /// When the last completed list began; `None` until the first list is done.
    listed: Option<Instant>,
    objects: HashMap<String, Entry>,
    /// The (re)list under way: when it began, and what it delivered so far.
    listing: Option<(Instant, HashMap<String, Entry>)>,
    /// The versions of the last [`GONE`] objects the watch saw deleted since its last
    /// list, oldest first.
    gone: VecDeque<(String, VecDeque<Box<str>>)>,
    /// Why the watch failed last, until it delivers again.
    error: Option<String>,
    /// The newest resourceVersion it delivered (when they compare).
    newest: Option<Box<str>>,
    /// A watch of every namespace: objects are keyed `namespace/name`.
    wide: bool,
}

/// A project's objects in the watches' terms: the scope of each (`None`: a kind the
/// cluster does not serve).
#[derive(Debug, Clone, Default)]
pub struct Tracked {
    /// By object, in the order given to [`Live::track`].
    pub scopes: Vec<Option<Arc<Scope>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: use it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Live {
    /// No watches yet; [`Live::track`] starts them. Call within a tokio runtime.
    pub fn new() -> Live {
        Live::with_wide(true)
    }

    /// As [`Live::new`], but never a watch of every namespace: for an agent whose RBAC
    /// lets it list only the namespaces it syncs into.
    pub fn per_namespace() -> Live {
        Live::with_wide(false)
    }

    fn with_wide(wide: bool) -> Live {
        Live {
            inner: Arc::new(Inner {
                scopes: Mutex::default(),
                interest: Mutex::default(),
                notices: broadcast::channel(NOTICES).0,
                turn: Arc::new(Semaphore::new(1)),
                per_namespace: !wide,
            }),
        }
    }

    /// Makes `objects` the project's tracked set: starts the watches they need and stops
    /// those no project needs any more (a project's earlier set is replaced).
    pub fn track(&self, project: &str, cluster: &Cluster, objects: &[ObjRef]) -> Tracked {
        let (groups, _unserved) = cluster.by_resource(objects);
        let mut scopes: Vec<Option<Arc<Scope>>> = vec![None; objects.len()];
        let mut wanted: Vec<(Arc<Scope>, ApiResource, ApiCapabilities)> = Vec::new();
        let wide = self.wide_resources(project, &groups, objects);
        for g in groups {
            let resource = (g.resource.api_version.clone(), g.resource.plural.clone());
            let scope = if wide.contains(&resource) {
                // Namespaced: every namespace at once; cluster-scoped: the whole resource,
                // not object by object.
                let namespace = if g.namespace.is_empty() {
                    String::new()
                } else {
                    ALL.into()
                };
                Scope {
                    api_version: resource.0,
                    plural: resource.1,
                    namespace,
                    name: None,
                }
            } else {
                Scope {
                    api_version: resource.0,
                    plural: resource.1,
                    namespace: g.namespace.clone(),
                    name: match g.members.as_slice() {
                        [only] => Some(objects[*only].name.to_string()),
                        _ => None,
                    },
                }
            };
            let scope = Arc::new(scope);
            for &i in &g.members {
                scopes[i] = Some(scope.clone());
            }
            wanted.push((scope, g.resource, g.caps));
        }
        let mut all = lock(&self.inner.scopes);
        // The scopes are shared: one already running keeps its Arc (readers compare them).
        let mut canonical: HashMap<Arc<Scope>, Arc<Scope>> = HashMap::new();
        for (scope, resource, caps) in wanted {
            let key = match all.get_key_value(&scope) {
                Some((key, _)) => key.clone(),
                None => {
                    let watched = self.start(cluster, scope.clone(), &resource, &caps);
                    all.insert(scope.clone(), Arc::new(watched));
                    scope.clone()
                }
            };
            canonical.insert(scope, key);
        }
        for s in scopes.iter_mut().flatten() {
            *s = canonical[&*s].clone();
        }
        let mut interest = lock(&self.inner.interest);
        interest.insert(project.to_string(), canonical.into_values().collect());
        let used: HashSet<&Arc<Scope>> = interest.values().flatten().collect();
        all.retain(|s, _| used.contains(s));
        Tracked { scopes }
    }

    /// The namespaced resources to watch in every namespace: those whose objects, among
    /// every other project's and these `groups`, are in more than [`WIDE_AFTER`]
    /// namespaces, or that some project already watches that way.
    fn wide_resources(
        &self,
        project: &str,
        groups: &[crate::cluster::ResourceGroup],
        objects: &[ObjRef],
    ) -> HashSet<(String, String)> {
        if self.inner.per_namespace {
            return HashSet::new();
        }
        // Namespaced resources: their namespaces; cluster-scoped ones: the names watched
        // one by one (a Namespace per project).
        let mut spread: HashMap<(String, String), HashSet<String>> = HashMap::new();
        let mut wide = HashSet::new();
        let interest = lock(&self.inner.interest);
        let others = interest
            .iter()
            .filter(|(p, _)| p.as_str() != project)
            .flat_map(|(_, scopes)| scopes.iter());
        for s in others {
            let resource = (s.api_version.clone(), s.plural.clone());
            match (s.namespace.as_str(), &s.name) {
                (ALL, _) | ("", None) => {
                    wide.insert(resource);
                }
                ("", Some(name)) => {
                    spread.entry(resource).or_default().insert(name.clone());
                }
                (ns, _) => {
                    spread.entry(resource).or_default().insert(ns.to_string());
                }
            }
        }
        for g in groups {
            let entry = spread
                .entry((g.resource.api_version.clone(), g.resource.plural.clone()))
                .or_default();
            if g.namespace.is_empty() {
                entry.extend(g.members.iter().map(|&i| objects[i].name.to_string()));
            } else {
                entry.insert(g.namespace.clone());
            }
        }
        wide.extend(
            spread
                .into_iter()
                .filter(|(_, n)| n.len() > WIDE_AFTER)
                .map(|(r, _)| r),
        );
        wide
    }

    /// Stops tracking a project's objects (it was removed from the configuration).
    pub fn forget(&self, project: &str) {
        let mut all = lock(&self.inner.scopes);
        let mut interest = lock(&self.inner.interest);
        interest.remove(project);
        let used: HashSet<&Arc<Scope>> = interest.values().flatten().collect();
        all.retain(|s, _| used.contains(s));
    }

    /// The notices of changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.inner.notices.subscribe()
    }

    /// What the watch of `scope` says of the object `name`.
    pub fn with<R>(&self, scope: &Scope, name: &str, f: impl FnOnce(Seen<'_>) -> R) -> R {
        let data = lock(&self.inner.scopes).get(scope).map(|w| w.data.clone());
        let Some(data) = data else {
            return f(Seen::Unlisted { error: None });
        };
        let data = lock(&data);
        let Some(listed) = data.listed else {
            return f(Seen::Unlisted {
                error: data.error.as_deref(),
            });
        };
        match data.objects.get(name) {
            Some(e) => f(Seen::Present(e)),
            None => f(Seen::Absent {
                versions: data.deleted(name),
                listed: Some(listed),
                newest: data.newest.as_deref(),
            }),
        }
    }

    /// How many watches run, for the logs and tests.
    pub fn watches(&self) -> usize {
        lock(&self.inner.scopes).len()
    }

    fn start(
        &self,
        cluster: &Cluster,
        scope: Arc<Scope>,
        resource: &ApiResource,
        caps: &ApiCapabilities,
    ) -> Watched {
        let wide = scope.namespace == ALL;
        let api = cluster.api(resource, caps, if wide { "" } else { &scope.namespace });
        let mut config = watcher::Config::default().page_size(crate::cluster::WATCH_PAGE);
        if let Some(name) = &scope.name {
            config = config.fields(&format!("metadata.name={name}"));
        }
        let data = Arc::new(Mutex::new(Data {
            wide,
            ..Data::default()
        }));
        let events = list_in_turn(
            watcher(api, config).default_backoff(),
            self.inner.turn.clone(),
        );
        let (shared, notices, resource) =
            (data.clone(), self.inner.notices.clone(), resource.clone());
        let task = tokio::spawn(async move {
            let mut events = events.boxed();
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(e) => {
                        // The resource was served and is no longer (its CRD was deleted,
                        // as when a commit prunes a CRD with its resources): none of its
                        // objects exists, and readers waiting for a deletion see them
                        // gone instead of waiting for a list that keeps failing. A
                        // resource that was never listed (a CRD just created) is waited
                        // for as before.
                        if not_served(&e) && lock(&shared).listed.is_some() {
                            let mut data = lock(&shared);
                            data.objects.clear();
                            data.listing = None;
                            data.listed = Some(Instant::now());
                            data.error = None;
                            drop(data);
                            let _ = notices.send(Notice::Listed(scope.clone()));
                            continue;
                        }
                        // The watcher retries with backoff; readers say why they wait.
                        lock(&shared).error = Some(e.to_string());
                        continue;
                    }
                };
                let notice = {
                    let mut data = lock(&shared);
                    data.error = None;
                    data.take(event, &resource, Instant::now())
                };
                if let Some(notice) = notice {
                    // No receiver: no reader at the moment, nothing to tell.
                    let _ = notices.send(match notice {
                        Some(name) => Notice::Changed(scope.clone(), name),
                        None => Notice::Listed(scope.clone()),
                    });
                }
            }
        });
        Watched { data, task }
    }
}

/// Whether a watch failed because its resource is not served at all (404 on the list).
fn not_served(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

impl Default for Live {
    fn default() -> Self {
        Live::new()
    }
}

impl Entry {
    fn of(
        o: DynamicObject,
        resource: &ApiResource,
        listed: Option<Instant>,
        wide: bool,
    ) -> Option<(String, Entry)> {
        let name = match (wide, &o.metadata.namespace) {
            (true, Some(ns)) => format!("{ns}/{}", o.metadata.name.as_deref()?),
            _ => o.metadata.name.clone()?,
        };
        let version: Box<str> = o
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default()
            .into();
        let fingerprint = Fingerprint::of(&o.metadata);
        let judged = crate::wait::judged_value(o, resource).to_string().into();
        Some((
            name,
            Entry {
                versions: VecDeque::from([version]),
                fingerprint,
                judged,
                listed,
            },
        ))
    }

    /// Takes the place of `old`, keeping its versions after its own, and when the list
    /// that delivered an earlier state began (this state is newer than that one).
    fn after(mut self, old: Option<Entry>) -> Entry {
        if let Some(old) = old {
            self.listed = self.listed.or(old.listed);
            for v in old.versions {
                if self.versions.len() == VERSIONS {
                    break;
                }
                if !self.versions.contains(&v) {
                    self.versions.push_back(v);
                }
            }
        }
        self
    }
}

impl Data {
    /// The versions of `name` before the watch saw it deleted, if it did lately.
    fn deleted(&self, name: &str) -> Option<&VecDeque<Box<str>>> {
        self.gone
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Takes in one watch event; what to tell readers: `Some(Some(name))` an object
    /// changed, `Some(None)` a list completed, `None` nothing yet.
    fn take(
        &mut self,
        event: watcher::Event<DynamicObject>,
        resource: &ApiResource,
        now: Instant,
    ) -> Option<Option<String>> {
        if let watcher::Event::InitApply(o) | watcher::Event::Apply(o) | watcher::Event::Delete(o) =
            &event
            && let Some(v) = o.metadata.resource_version.as_deref()
        {
            let newer = match &self.newest {
                Some(n) => compare_versions(v, n).is_some_and(|o| o.is_gt()),
                None => compare_versions(v, v).is_some(),
            };
            if newer {
                self.newest = Some(v.into());
            }
        }
        match event {
            watcher::Event::Init => {
                self.listing = Some((now, HashMap::new()));
                None
            }
            watcher::Event::InitApply(o) => {
                if let Some((began, listing)) = &mut self.listing
                    && let Some((name, entry)) = Entry::of(o, resource, Some(*began), self.wide)
                {
                    listing.insert(name, entry);
                }
                None
            }
            watcher::Event::InitDone => {
                let (began, listing) = self.listing.take().unwrap_or((now, HashMap::new()));
                let mut objects = HashMap::with_capacity(listing.len());
                for (name, entry) in listing {
                    let old = self.objects.remove(&name);
                    objects.insert(name, entry.after(old));
                }
                self.objects = objects;
                self.gone.clear();
                self.listed = Some(began);
                Some(None)
            }
            watcher::Event::Apply(o) => {
                let (name, entry) = Entry::of(o, resource, None, self.wide)?;
                let old = self.objects.remove(&name);
                self.gone.retain(|(n, _)| *n != name);
                self.objects.insert(name.clone(), entry.after(old));
                Some(Some(name))
            }
            watcher::Event::Delete(o) => {
                let (name, entry) = Entry::of(o, resource, None, self.wide)?;
                let old = self.objects.remove(&name);
                if self.gone.len() == GONE {
                    self.gone.pop_front();
                }
                self.gone
                    .push_back((name.clone(), entry.after(old).versions));
                Some(Some(name))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource() -> ApiResource {
        ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
        }
    }

    fn cm(name: &str, rv: &str) -> DynamicObject {
        let mut o = DynamicObject::new(name, &resource());
        o.metadata.resource_version = Some(rv.into());
        o
    }

    fn seen<R>(data: &Data, name: &str, f: impl FnOnce(Seen<'_>) -> R) -> R {
        match (data.listed, data.objects.get(name)) {
            (None, _) => f(Seen::Unlisted { error: None }),
            (Some(_), Some(e)) => f(Seen::Present(e)),
            (Some(at), None) => f(Seen::Absent {
                versions: data.deleted(name),
                listed: Some(at),
                newest: data.newest.as_deref(),
            }),
        }
    }

    #[test]
    fn a_notice_touches_the_objects_it_concerns() {
        let scope = |ns: &str| Scope {
            api_version: "v1".into(),
            plural: "configmaps".into(),
            namespace: ns.into(),
            name: None,
        };
        let (a, b, all) = (
            Arc::new(scope("a")),
            Arc::new(scope("b")),
            Arc::new(scope(ALL)),
        );
        let objects = [
            (Some(&*a), "a", "x"),
            (None, "a", "x"),
            (Some(&*a), "a", "y"),
            (Some(&*b), "b", "x"),
            (Some(&*all), "c", "x"),
        ];
        let index = Index::new(objects.into_iter());
        // In a watch of every namespace, objects are known by namespace and name.
        let mut dirty = Vec::new();
        assert!(index.touched(Ok(Notice::Changed(all.clone(), "c/x".into())), &mut dirty));
        assert!(index.touched(Ok(Notice::Changed(all.clone(), "x".into())), &mut dirty));
        assert_eq!(dirty, [4]);
        dirty.clear();
        assert!(index.touched(Ok(Notice::Changed(a.clone(), "y".into())), &mut dirty));
        assert!(index.touched(Ok(Notice::Changed(b.clone(), "y".into())), &mut dirty));
        assert_eq!(dirty, [2]);
        dirty.clear();
        assert!(index.touched(Ok(Notice::Listed(a.clone())), &mut dirty));
        dirty.sort();
        assert_eq!(dirty, [0, 2]);
        dirty.clear();
        let lagged = Err(broadcast::error::RecvError::Lagged(3));
        assert!(index.touched(lagged, &mut dirty));
        assert_eq!(dirty, [0, 1, 2, 3, 4]);
        assert!(!index.touched(Err(broadcast::error::RecvError::Closed), &mut dirty));
    }

    #[test]
    fn resource_versions_compare_as_kubernetes_compares_them() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("9", "10"), Some(Less));
        assert_eq!(compare_versions("123", "123"), Some(Equal));
        assert_eq!(
            compare_versions("1000000000000000000000", "999"),
            Some(Greater)
        );
        for invalid in ["", "0", "012", "12a", "-1"] {
            assert_eq!(compare_versions(invalid, "1"), None, "{invalid:?}");
        }
    }

    /// Versions that compare: a state, or the absence of an object, counts once the watch
    /// delivered the write's version or a later one.
    #[test]
    fn a_write_is_caught_up_with_at_its_version_or_past_it() {
        use watcher::Event::*;
        let t0 = Instant::now();
        let ar = resource();
        let mut data = Data::default();
        assert_eq!(data.take(Init, &ar, t0), None);
        data.take(InitApply(cm("a", "10")), &ar, t0);
        assert!(seen(&data, "a", |s| matches!(s, Seen::Unlisted { .. })));
        assert_eq!(data.take(InitDone, &ar, t0), Some(None));
        let wrote = t0 + std::time::Duration::from_millis(5);
        // "a" was written (version 11) and "b" created (12); the watch has not delivered
        // either yet: the stale state of "a" and the absence of "b" do not count.
        assert!(!seen(&data, "a", |s| caught_up(&s, "11", wrote)));
        assert!(!seen(&data, "b", |s| caught_up(&s, "12", wrote)));
        // The write, then two writes of a controller after it: past the version.
        for rv in ["11", "13", "15"] {
            data.take(Apply(cm("a", rv)), &ar, wrote);
        }
        assert!(seen(&data, "a", |s| caught_up(&s, "11", wrote)));
        // Created, then deleted before anyone looked: the deletion is past the creation.
        data.take(Apply(cm("b", "12")), &ar, wrote);
        assert_eq!(
            data.take(Delete(cm("b", "16")), &ar, wrote),
            Some(Some("b".into()))
        );
        assert!(seen(&data, "b", |s| matches!(s, Seen::Absent { .. })
            && caught_up(&s, "12", wrote)));
        // An object the watch has not seen past its write is not caught up, whatever the
        // time of the lists.
        let later = wrote + std::time::Duration::from_millis(5);
        assert!(!seen(&data, "a", |s| caught_up(&s, "17", t0)));
        assert!(!seen(&data, "c", |s| caught_up(&s, "17", t0)));
        data.take(Init, &ar, later);
        data.take(InitApply(cm("a", "15")), &ar, later);
        data.take(InitApply(cm("c", "17")), &ar, later);
        data.take(InitDone, &ar, later);
        assert!(seen(&data, "c", |s| caught_up(&s, "17", wrote)));
        assert!(!seen(&data, "c", |s| caught_up(&s, "18", wrote)));
    }

    /// Versions that do not compare: the write's version among the object's last few, or a
    /// list that began after the writes.
    #[test]
    fn without_comparable_versions_a_write_is_caught_up_with_by_its_version_or_a_later_list() {
        use watcher::Event::*;
        let t0 = Instant::now();
        let ar = resource();
        let mut data = Data::default();
        data.take(Init, &ar, t0);
        data.take(InitApply(cm("a", "v10")), &ar, t0);
        data.take(InitDone, &ar, t0);
        let wrote = t0 + std::time::Duration::from_millis(5);
        assert!(!seen(&data, "a", |s| caught_up(&s, "v11", wrote)));
        assert!(!seen(&data, "b", |s| caught_up(&s, "v12", wrote)));
        // The write, and a controller's write after it: still among the last versions.
        data.take(Apply(cm("a", "v11")), &ar, wrote);
        data.take(Apply(cm("a", "v13")), &ar, wrote);
        assert!(seen(&data, "a", |s| caught_up(&s, "v11", wrote)));
        // Created, then deleted before anyone looked: the deletion of that version counts.
        data.take(Apply(cm("b", "v12")), &ar, wrote);
        data.take(Delete(cm("b", "v14")), &ar, wrote);
        assert!(seen(&data, "b", |s| caught_up(&s, "v12", wrote)));
        // A re-list that began after the writes counts whatever it delivered, and so do
        // the states after it; one that began before them does not.
        let later = wrote + std::time::Duration::from_millis(5);
        data.take(Init, &ar, later);
        data.take(InitApply(cm("c", "v20")), &ar, later);
        data.take(InitDone, &ar, later);
        assert!(seen(&data, "c", |s| caught_up(&s, "v19", wrote)));
        assert!(!seen(&data, "c", |s| caught_up(&s, "v19", later)));
        for rv in 30..40 {
            data.take(Apply(cm("c", &format!("v{rv}"))), &ar, later);
        }
        assert!(seen(&data, "c", |s| caught_up(&s, "v19", wrote)));
        // "a" was not listed again: deleted since, which a list after the writes tells.
        assert!(seen(&data, "a", |s| matches!(s, Seen::Absent { .. })
            && caught_up(&s, "v11", wrote)));
        // No more than VERSIONS versions are kept, newest first.
        assert_eq!(data.objects["c"].versions.len(), VERSIONS);
        assert_eq!(&*data.objects["c"].versions[0], "v39");
        // Only the last GONE deletions are remembered.
        for i in 0..=GONE {
            data.take(Delete(cm(&format!("d-{i}"), "v50")), &ar, later);
        }
        assert!(data.deleted("d-0").is_none());
        assert!(data.deleted(&format!("d-{GONE}")).is_some());
        assert_eq!(data.gone.len(), GONE);
    }
}
