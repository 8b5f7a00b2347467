//! The Kubernetes API as the cluster-facing stages (`apply`, `inventory`, `wait`) see it:
//! a client plus discovery, so any object can be addressed by its manifest alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use tokio::sync::Semaphore;

use kube::api::{Api, DynamicObject};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};

use sluice_model::object::ObjRef;
use sluice_model::scopes::Scopes;

/// Objects of one resource in one namespace ([`Cluster::by_resource`]).
#[derive(Debug, Clone)]
pub struct ResourceGroup {
    /// The resource.
    pub resource: ApiResource,
    /// Its scope and verbs.
    pub caps: ApiCapabilities,
    /// The namespace (empty for a cluster-scoped resource).
    pub namespace: String,
    /// Indices into the objects given.
    pub members: Vec<usize>,
}

/// Discovery failed (the API server's group list could not be read). Retryable.
#[derive(Debug, thiserror::Error)]
#[error("failed to discover the cluster's API resources: {0}")]
pub struct DiscoveryError(#[source] pub kube::Error);

/// Admits one write: a pass held while the write is in flight, or why it is refused.
pub type Admit = std::sync::Arc<
    dyn Fn() -> Result<Box<dyn std::any::Any + Send>, tower::BoxError> + Send + Sync,
>;

/// A client and what the API server serves.
///
/// Discovery tolerates API groups that do not answer (an aggregated API whose APIService is
/// unavailable, e.g. metrics-server down answers 503): like kubectl, Flux and Argo CD, it
/// goes on with the groups that answer and remembers which did not
/// ([`Cluster::unavailable`]), so callers can fail only the objects of those groups and
/// never mistake their kinds for kinds that are gone.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    discovery: std::sync::Arc<Discovery>,
    /// Discovery's answers, indexed once: a sync resolves every object.
    index: std::sync::Arc<Index>,
    /// Groups that failed discovery, with why (naming the APIService).
    unavailable: std::sync::Arc<BTreeMap<String, String>>,
    /// The version and API versions, for renderers (Helm's `.Capabilities`).
    capabilities: std::sync::Arc<sluice_model::Capabilities>,
}

impl Cluster {
    /// The same cluster (discovery shared), every request made as `user` in `groups`:
    /// Kubernetes impersonation, for which the agent's own identity needs the `impersonate`
    /// verb on that user (or ServiceAccount) and those groups. The API server then
    /// authorizes each request as that identity.
    ///
    /// # Errors
    /// When `user` or a group cannot be an HTTP header value.
    pub fn acting_as(&self, user: &str, groups: &[String]) -> Result<Cluster, String> {
        let value = |v: &str| {
            http::HeaderValue::from_str(v).map_err(|_| format!("{v:?} cannot be impersonated"))
        };
        let mut headers = vec![(
            http::HeaderName::from_static("impersonate-user"),
            value(user)?,
        )];
        for group in groups {
            headers.push((
                http::HeaderName::from_static("impersonate-group"),
                value(group)?,
            ));
        }
        let inner = self.client.clone();
        let service = tower::service_fn(move |mut request: http::Request<kube::client::Body>| {
            for (name, value) in &headers {
                request.headers_mut().append(name.clone(), value.clone());
            }
            let inner = inner.clone();
            async move { inner.send(request).await }
        });
        Ok(Cluster {
            client: kube::Client::new(service, self.client.default_namespace()),
            ..self.clone()
        })
    }

    /// The same cluster, every write (any request but a GET: applies and their dry runs,
    /// deletes, inventory updates) admitted by `admit` first: a refusal fails the write
    /// with its message before anything is sent, and the pass it returns is held until the
    /// API server answered. Reads and watches are never gated. Fencing for shared work:
    /// a replica that no longer owns a shard cannot write for it.
    #[must_use]
    pub fn gated(&self, admit: Admit) -> Cluster {
        let inner = self.client.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let inner = inner.clone();
            let pass = if request.method() == http::Method::GET {
                Ok(None)
            } else {
                admit().map(Some)
            };
            async move {
                let _pass = pass.map_err(kube::Error::Service)?;
                inner.send(request).await
            }
        });
        Cluster {
            client: kube::Client::new(service, self.client.default_namespace()),
            ..self.clone()
        }
    }

    /// Takes `other`'s discovery (a handle acting as someone else that refreshed it),
    /// keeping this handle's client.
    pub fn take_discovery(&mut self, other: &Cluster) {
        self.discovery = other.discovery.clone();
        self.index = other.index.clone();
        self.unavailable = other.unavailable.clone();
        self.capabilities = other.capabilities.clone();
    }

    /// The API server's version and every served `group/version` and
    /// `group/version/Kind`, as discovered (Helm's `.Capabilities`).
    pub fn capabilities(&self) -> std::sync::Arc<sluice_model::Capabilities> {
        self.capabilities.clone()
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("unavailable", &self.unavailable)
            .finish_non_exhaustive()
    }
}

/// Discovery's resources by group and kind (the preferred or latest version's, as kube's
/// `recommended_kind` picks; the first of a kind wins, as there) and by `apiVersion` and
/// kind (as `resolve_gvk` finds them). kube's lookups copy a version's whole resource list
/// per call, which at 10,000 objects was a sixth of a sync's CPU.
struct Index {
    preferred: HashMap<String, HashMap<String, (ApiResource, ApiCapabilities)>>,
    by_version: HashMap<String, HashMap<String, (ApiResource, ApiCapabilities)>>,
}

impl Index {
    fn of(discovery: &Discovery) -> Index {
        let mut index = Index {
            preferred: HashMap::new(),
            by_version: HashMap::new(),
        };
        for group in discovery.groups() {
            let recommended = group.preferred_version_or_latest();
            for version in group.versions() {
                let resources = group.versioned_resources(version);
                if version == recommended {
                    let preferred = index.preferred.entry(group.name().to_string()).or_default();
                    for (ar, caps) in &resources {
                        preferred
                            .entry(ar.kind.clone())
                            .or_insert_with(|| (ar.clone(), caps.clone()));
                    }
                }
                let by_kind = index.by_version.entry(api_version(group.name(), version));
                let by_kind = by_kind.or_default();
                for (ar, caps) in resources {
                    by_kind.entry(ar.kind.clone()).or_insert((ar, caps));
                }
            }
        }
        index
    }
}

fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// How long discovery may take (group list, then the resources of every group).
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one group's probe may take before the group counts as unavailable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Cluster {
    /// Runs discovery. Groups that fail are left out and listed in
    /// [`Cluster::unavailable`].
    ///
    /// # Errors
    /// When the API server cannot be reached or its group list (`/api`, `/apis`) fails.
    pub async fn connect(client: kube::Client) -> Result<Cluster, DiscoveryError> {
        // A group removed between the probes and the discovery run (a CRD deleted meanwhile)
        // answers 404: discover again, a few times, rather than fail every project.
        let mut attempt = 0;
        loop {
            match Cluster::discover(client.clone()).await {
                Err(DiscoveryError(kube::Error::Api(s))) if s.code == 404 && attempt < 3 => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn discover(client: kube::Client) -> Result<Cluster, DiscoveryError> {
        let deadline = |e| DiscoveryError(kube::Error::Service(Box::new(e)));
        // kube's client retries a 503 up to 15 times with growing pauses (minutes in all),
        // so a group that does not answer would stall a plain discovery run. Each group's
        // versions are probed first, in parallel, each within PROBE_TIMEOUT; discovery then
        // runs without the groups that failed. 2N+3 requests for N groups, only at start,
        // after CRDs were established, and after a failed sync.
        let groups = tokio::time::timeout(DISCOVERY_TIMEOUT, client.list_api_groups())
            .await
            .map_err(deadline)?
            .map_err(DiscoveryError)?;
        let probes = groups.groups.iter().map(|g| {
            let client = client.clone();
            async move {
                let mut failures = Vec::new();
                for v in &g.versions {
                    let probe = tokio::time::timeout(
                        PROBE_TIMEOUT,
                        client.list_api_group_resources(&v.group_version),
                    )
                    .await;
                    let name = format!("{}.{}", v.version, g.name);
                    let message = match probe {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => crate::apply::api_message(&e),
                        // The retries hide the server's answer: the APIService says why.
                        Err(_) => apiservice_condition(&client, &name)
                            .await
                            .unwrap_or_else(|| format!("no answer within {PROBE_TIMEOUT:?}")),
                    };
                    failures.push(format!("APIService {name}: {message}"));
                }
                (!failures.is_empty()).then(|| {
                    (
                        g.name.clone(),
                        format!(
                            "API group {} is unavailable ({})",
                            g.name,
                            failures.join("; ")
                        ),
                    )
                })
            }
        });
        let unavailable: BTreeMap<String, String> = futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect();
        let excluded: Vec<&str> = unavailable.keys().map(String::as_str).collect();
        let discovery = tokio::time::timeout(
            DISCOVERY_TIMEOUT,
            Discovery::new(client.clone()).exclude(&excluded).run(),
        )
        .await
        .map_err(deadline)?
        .map_err(DiscoveryError)?;
        for why in unavailable.values() {
            tracing::warn!(reason = %why, "discovery is partial: objects of this API group are not synced until it answers");
        }
        // One more request: only Helm charts read it, and an error leaves Helm's default.
        let kube_version =
            match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
                Ok(Ok(info)) => info.git_version,
                _ => String::new(),
            };
        let index = Index::of(&discovery);
        let mut api_versions: Vec<String> = index
            .by_version
            .iter()
            .flat_map(|(gv, kinds)| {
                std::iter::once(gv.clone()).chain(kinds.keys().map(move |k| format!("{gv}/{k}")))
            })
            .collect();
        api_versions.sort();
        Ok(Cluster {
            client,
            capabilities: sluice_model::Capabilities {
                kube_version,
                api_versions,
            }
            .into(),
            index: index.into(),
            discovery: discovery.into(),
            unavailable: unavailable.into(),
        })
    }

    /// Runs discovery again (after CRDs were established).
    ///
    /// # Errors
    /// When the API server cannot be reached.
    pub async fn refresh(&mut self) -> Result<(), DiscoveryError> {
        *self = Cluster::connect(self.client.clone()).await?;
        Ok(())
    }

    /// API groups that did not answer discovery, with a message naming the APIService.
    pub fn unavailable(&self) -> &BTreeMap<String, String> {
        &self.unavailable
    }

    /// Why `group` is unavailable, if it is.
    pub fn unavailable_group(&self, group: &str) -> Option<&str> {
        self.unavailable.get(group).map(String::as_str)
    }

    /// The client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Which kinds are namespaced, for `decode::set_namespaces`.
    pub fn scopes(&self) -> Scopes {
        let mut scopes = Scopes::default();
        for group in self.discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                scopes.insert(&ar.group, &ar.kind, caps.scope == Scope::Namespaced);
            }
        }
        scopes
    }

    /// The resource serving `apiVersion`/`kind`, if the server knows it.
    pub fn resolve(&self, api_version: &str, kind: &str) -> Option<(ApiResource, ApiCapabilities)> {
        self.serves(api_version, kind).cloned()
    }

    /// Whether the server serves `apiVersion`/`kind`, without a copy of its resource.
    pub fn serves(&self, api_version: &str, kind: &str) -> Option<&(ApiResource, ApiCapabilities)> {
        self.index.by_version.get(api_version)?.get(kind)
    }

    /// The preferred resource for a group and kind (for objects known only by [`ObjRef`]).
    pub fn resolve_ref(&self, r: &ObjRef) -> Option<(ApiResource, ApiCapabilities)> {
        self.preferred(&r.group, &r.kind).cloned()
    }

    fn preferred(&self, group: &str, kind: &str) -> Option<&(ApiResource, ApiCapabilities)> {
        self.index.preferred.get(group)?.get(kind)
    }

    /// `objects` by resource and namespace, as indices into `objects` (what a watch per
    /// resource and namespace covers), and the indices of those whose kind the cluster
    /// does not serve.
    pub fn by_resource(&self, objects: &[ObjRef]) -> (Vec<ResourceGroup>, Vec<usize>) {
        let mut groups: BTreeMap<(&str, &str, &str), ResourceGroup> = BTreeMap::new();
        let mut unserved = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            let Some((resource, caps)) = self.preferred(&o.group, &o.kind) else {
                unserved.push(i);
                continue;
            };
            let namespace = match caps.scope {
                Scope::Namespaced => o.namespace.as_str(),
                Scope::Cluster => "",
            };
            let key = (
                resource.api_version.as_str(),
                resource.plural.as_str(),
                namespace,
            );
            match groups.get_mut(&key) {
                Some(group) => group.members.push(i),
                None => {
                    groups.insert(
                        key,
                        ResourceGroup {
                            resource: resource.clone(),
                            caps: caps.clone(),
                            namespace: namespace.to_string(),
                            members: vec![i],
                        },
                    );
                }
            }
        }
        (groups.into_values().collect(), unserved)
    }

    /// A dynamic API for one resource in one namespace (ignored for cluster-scoped ones).
    pub fn api(
        &self,
        ar: &ApiResource,
        caps: &ApiCapabilities,
        namespace: &str,
    ) -> Api<DynamicObject> {
        match caps.scope {
            Scope::Namespaced => Api::namespaced_with(self.client.clone(), namespace, ar),
            Scope::Cluster => Api::all_with(self.client.clone(), ar),
        }
    }

    /// The API for an object known only by reference.
    pub fn api_for_ref(&self, r: &ObjRef) -> Option<Api<DynamicObject>> {
        self.resolve_ref(r)
            .map(|(ar, caps)| self.api(&ar, &caps, &r.namespace))
    }

    /// The objects in namespace `ns` that are not in `owned` and that the cluster did not
    /// make for something (no owner references, not an Event, not the `default`
    /// ServiceAccount or `kube-root-ca.crt` every namespace gets, not a Service's Endpoints).
    /// One metadata-only LIST per namespaced kind that can be listed.
    ///
    /// # Errors
    /// A LIST that fails or takes longer than 30 s.
    pub async fn foreign_objects(
        &self,
        ns: &str,
        owned: &std::collections::BTreeSet<ObjRef>,
    ) -> Result<Vec<ObjRef>, String> {
        let made_by_cluster = |group: &str, kind: &str, name: &str| {
            matches!(
                (group, kind, name),
                (_, "Event", _)
                    | ("", "Endpoints", _)
                    | ("", "ServiceAccount", "default")
                    | ("", "ConfigMap", "kube-root-ca.crt")
            )
        };
        let mut foreign = Vec::new();
        for group in self.discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                if caps.scope != Scope::Namespaced
                    || !caps.supports_operation(kube::discovery::verbs::LIST)
                {
                    continue;
                }
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
                let list =
                    tokio::time::timeout(DISCOVERY_TIMEOUT, api.list_metadata(&Default::default()))
                        .await
                        .map_err(|_| format!("listing {} timed out", ar.plural))?
                        .map_err(|e| {
                            format!(
                                "failed to list {}: {}",
                                ar.plural,
                                crate::apply::api_message(&e)
                            )
                        })?;
                for item in list.items {
                    let name = item.metadata.name.clone().unwrap_or_default();
                    let r = ObjRef {
                        group: ar.group.as_str().into(),
                        kind: ar.kind.as_str().into(),
                        namespace: ns.into(),
                        name: name.into(),
                    };
                    let controlled = item
                        .metadata
                        .owner_references
                        .as_ref()
                        .is_some_and(|o| !o.is_empty());
                    if !controlled
                        && !made_by_cluster(&r.group, &r.kind, &r.name)
                        && !owned.contains(&r)
                    {
                        foreign.push(r);
                    }
                }
            }
        }
        Ok(foreign)
    }

    /// The live object, if it exists (`None` also when its kind is not served).
    ///
    /// # Errors
    /// API failures other than not-found.
    pub async fn get(&self, r: &ObjRef) -> Result<Option<serde_json::Value>, kube::Error> {
        let Some(api) = self.api_for_ref(r) else {
            return Ok(None);
        };
        let live = api.get_opt(&r.name).await?;
        Ok(live.map(|o| serde_json::to_value(o).unwrap_or_default()))
    }
}

/// `Available=False (<reason>: <message>)` from an APIService's status, if it can be read.
async fn apiservice_condition(client: &kube::Client, name: &str) -> Option<String> {
    let ar = ApiResource {
        group: "apiregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "apiregistration.k8s.io/v1".into(),
        kind: "APIService".into(),
        plural: "apiservices".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let svc = tokio::time::timeout(PROBE_TIMEOUT, api.get(name))
        .await
        .ok()?
        .ok()?;
    let conditions = svc.data["status"]["conditions"].as_array()?.clone();
    let c = conditions.iter().find(|c| c["type"] == "Available")?;
    Some(format!(
        "Available={} ({}: {})",
        c["status"].as_str().unwrap_or("Unknown"),
        c["reason"].as_str().unwrap_or_default(),
        c["message"].as_str().unwrap_or_default()
    ))
}

/// Objects per page of a watch's list (kube's default is 500). A page is decoded whole,
/// managedFields and status included: at 10,000 objects, 100 instead of 500 took the
/// agent's peak RSS from 143.0 to 126.9 MiB, for four list requests more per 500 objects
/// (`docs/performance.md`).
pub const WATCH_PAGE: u32 = 100;

/// A watch whose first list waits its turn: of the watches given the same `turn` (a
/// semaphore of one permit), one lists at a time. A list arrives in pages of whole
/// objects ([`WATCH_PAGE`]), and a sync that watches four resources at once held four
/// pages (at 10,000 objects the agent's peak RSS came from these lists); in turn it holds
/// one. The permit
/// goes at the watch's first `InitDone`, or at its first error, so a watch that cannot list
/// (no access, a kind that went away) never holds the others up; its retries, and
/// every later re-list, take no turn.
pub fn list_in_turn<K: Send + 'static>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    turn: Arc<Semaphore>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static {
    futures::stream::once(async move {
        // The semaphore is never closed; were it, the watch would just not wait.
        let mut permit = turn.acquire_owned().await.ok();
        events.map(move |event| {
            if matches!(event, Ok(watcher::Event::InitDone) | Err(_)) {
                drop(permit.take());
            }
            event
        })
    })
    .flatten()
}

/// A listed or watched object as JSON, with the `apiVersion` and `kind` of its resource:
/// the items of a LIST or WATCH come without them, and [`crate::wait::status`] (like
/// `apply`'s comparison with a dry run) reads `kind`.
pub fn live_value(o: &DynamicObject, ar: &ApiResource) -> serde_json::Value {
    let mut v = serde_json::to_value(o).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        map.insert("apiVersion".into(), ar.api_version.clone().into());
        map.insert("kind".into(), ar.kind.clone().into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use watcher::Event;

    type Events = Vec<Result<Event<&'static str>, watcher::Error>>;

    fn list(items: &[&'static str]) -> Events {
        let mut events = vec![Ok(Event::Init)];
        events.extend(items.iter().map(|i| Ok(Event::InitApply(*i))));
        events.push(Ok(Event::InitDone));
        events.push(Ok(Event::Apply("later")));
        events
    }

    /// What each watch delivered, in the order they were delivered: `(watch, item)`, with
    /// `"init"`, `"done"` and `"error"` for the other events.
    async fn run(watches: Vec<Events>) -> Vec<(usize, &'static str)> {
        let turn = Arc::new(Semaphore::new(1));
        let streams = watches.into_iter().enumerate().map(|(w, events)| {
            list_in_turn(futures::stream::iter(events), turn.clone())
                .map(move |e| {
                    let what = match e {
                        Ok(Event::Init) => "init",
                        Ok(Event::InitApply(i) | Event::Apply(i) | Event::Delete(i)) => i,
                        Ok(Event::InitDone) => "done",
                        Err(_) => "error",
                    };
                    (w, what)
                })
                .boxed()
        });
        futures::stream::select_all(streams).collect().await
    }

    #[tokio::test]
    async fn watches_list_one_at_a_time_and_an_error_frees_the_turn() {
        let got = run(vec![list(&["a1", "a2"]), list(&["b1"])]).await;
        // Nothing of the second list comes before the first list is done.
        let first_done = got.iter().position(|e| *e == (0, "done")).expect("done");
        let second_init = got.iter().position(|e| *e == (1, "init")).expect("init");
        assert!(first_done < second_init, "{got:?}");
        assert_eq!(got.len(), 9, "{got:?}");

        // A watch that fails before its list is done lets the next one list.
        let failing: Events = vec![Ok(Event::Init), Err(watcher::Error::NoResourceVersion)];
        let got = run(vec![failing, list(&["b1"])]).await;
        assert!(got.contains(&(1, "done")), "{got:?}");
        let error = got.iter().position(|e| *e == (0, "error")).expect("error");
        let second_init = got.iter().position(|e| *e == (1, "init")).expect("init");
        assert!(error < second_init, "{got:?}");
    }
}
