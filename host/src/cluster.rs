//! The Kubernetes API as the cluster-facing stages (`apply`, `inventory`, `wait`) see it:
//! a client plus discovery, so any object can be addressed by its manifest alone.

use kube::api::{Api, DynamicObject};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};

use crate::decode::Scopes;
use crate::object::ObjRef;

/// Discovery failed. Retryable.
#[derive(Debug, thiserror::Error)]
#[error("failed to discover the cluster's API resources: {0}")]
pub struct DiscoveryError(#[source] pub kube::Error);

/// A client and what the API server serves.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    discovery: std::sync::Arc<Discovery>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

impl Cluster {
    /// Runs discovery.
    ///
    /// # Errors
    /// When the API server cannot be reached.
    pub async fn connect(client: kube::Client) -> Result<Cluster, DiscoveryError> {
        let discovery = Discovery::new(client.clone())
            .run()
            .await
            .map_err(DiscoveryError)?;
        Ok(Cluster {
            client,
            discovery: discovery.into(),
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
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        self.discovery
            .resolve_gvk(&GroupVersionKind::gvk(group, version, kind))
    }

    /// The preferred resource for a group and kind (for objects known only by [`ObjRef`]).
    pub fn resolve_ref(&self, r: &ObjRef) -> Option<(ApiResource, ApiCapabilities)> {
        self.discovery
            .groups()
            .find(|g| g.name() == r.group)
            .and_then(|g| g.recommended_kind(&r.kind))
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
