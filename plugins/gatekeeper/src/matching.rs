//! A Constraint's `spec.match`, with Gatekeeper's semantics (`pkg/mutation/match` of
//! Gatekeeper v3.23): every criterion given must hold; `namespaces`, `excludedNamespaces`
//! and `name` take `*` at either end; a Namespace object is matched by its own name and
//! labels; `namespaceSelector` reads the labels of the object's Namespace.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// `spec.match` of a Constraint.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Match {
    /// `[{apiGroups, kinds}]`: any entry.
    pub kinds: Vec<Kinds>,
    /// `*`, `Cluster` or `Namespaced`.
    pub scope: Option<String>,
    /// Namespaces the object must be in (wildcards at either end).
    pub namespaces: Vec<String>,
    /// Namespaces the object must not be in.
    pub excluded_namespaces: Vec<String>,
    /// On the object's labels.
    pub label_selector: Option<LabelSelector>,
    /// On the labels of the object's Namespace.
    pub namespace_selector: Option<LabelSelector>,
    /// The object's name (wildcards at either end).
    pub name: Option<String>,
    /// `All`, `Original` or `Generated`: sluice's objects are all original.
    pub source: Option<String>,
}

/// One `kinds` entry.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Kinds {
    /// Empty or `*`: any group.
    pub api_groups: Vec<String>,
    /// Empty or `*`: any kind.
    pub kinds: Vec<String>,
}

/// A Kubernetes label selector (`metav1.LabelSelector`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelSelector {
    /// Exact labels.
    pub match_labels: BTreeMap<String, String>,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    /// Values for `In` and `NotIn`.
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` are selected; an unknown operator, or `In`/`NotIn` without values,
    /// is the error Kubernetes gives for it.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> Result<bool, String> {
        for (k, v) in &self.match_labels {
            if labels.get(k) != Some(v) {
                return Ok(false);
            }
        }
        for r in &self.match_expressions {
            let have = labels.get(&r.key);
            let ok = match r.operator.as_str() {
                "In" | "NotIn" if r.values.is_empty() => {
                    return Err(format!(
                        "labelSelector: values must be non-empty for operator {} on key {}",
                        r.operator, r.key
                    ));
                }
                "In" => have.is_some_and(|v| r.values.contains(v)),
                "NotIn" => have.is_none_or(|v| !r.values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                other => return Err(format!("labelSelector: {other:?} is not a valid operator")),
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Gatekeeper's wildcard: `*x*` contains, `*x` ends with, `x*` starts with, else equal.
pub fn wildcard(pattern: &str, candidate: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(_), Some(_)) if pattern.len() >= 2 => {
            candidate.contains(&pattern[1..pattern.len() - 1])
        }
        (Some(rest), _) => candidate.ends_with(rest),
        (None, Some(rest)) => candidate.starts_with(rest),
        (None, None) => pattern == candidate,
    }
}

/// What matching needs of an object.
pub struct Subject<'a> {
    /// API group (`""` for the core group).
    pub group: &'a str,
    /// Kind.
    pub kind: &'a str,
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.generateName`.
    pub generate_name: &'a str,
    /// `metadata.namespace` (`""` for cluster-scoped objects).
    pub namespace: &'a str,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

impl<'a> Subject<'a> {
    /// The fields of `object`.
    pub fn of(object: &'a Value) -> Subject<'a> {
        let str_at = |v: &'a Value| v.as_str().unwrap_or_default();
        let api_version = str_at(&object["apiVersion"]);
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        Subject {
            group,
            kind: str_at(&object["kind"]),
            name: str_at(&object["metadata"]["name"]),
            generate_name: str_at(&object["metadata"]["generateName"]),
            namespace: str_at(&object["metadata"]["namespace"]),
            labels: labels(object),
        }
    }

    fn is_namespace(&self) -> bool {
        self.kind == "Namespace" && self.group.is_empty()
    }
}

/// `metadata.labels` as strings.
pub fn labels(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

impl Match {
    /// Whether the constraint applies to `object`. `namespace_labels` gives the labels of a
    /// Namespace by name (the commit's and the inventory's Namespaces), for
    /// `namespaceSelector`.
    ///
    /// # Errors
    /// An invalid selector, or a `namespaceSelector` on an object whose Namespace is not
    /// known (Gatekeeper's "missing Namespace").
    pub fn matches(
        &self,
        object: &Subject<'_>,
        namespace_labels: impl Fn(&str) -> Option<BTreeMap<String, String>>,
    ) -> Result<bool, String> {
        let kind_ok = self.kinds.is_empty()
            || self.kinds.iter().any(|k| {
                let any = |list: &[String], want: &str| {
                    list.is_empty() || list.iter().any(|x| x == "*" || x == want)
                };
                any(&k.kinds, object.kind) && any(&k.api_groups, object.group)
            });
        if !kind_ok {
            return Ok(false);
        }
        let is_namespace = object.is_namespace();
        let has_namespace = !object.namespace.is_empty();
        match self.scope.as_deref() {
            Some("Cluster") if !is_namespace && has_namespace => return Ok(false),
            Some("Namespaced") if is_namespace || !has_namespace => return Ok(false),
            _ => {}
        }
        // The namespace `namespaces` and `excludedNamespaces` test: a Namespace's own name,
        // else the object's namespace; cluster-scoped objects pass both.
        let ns = if is_namespace {
            Some(object.name)
        } else if has_namespace {
            Some(object.namespace)
        } else {
            None
        };
        if let Some(ns) = ns {
            if !self.namespaces.is_empty() && !self.namespaces.iter().any(|p| wildcard(p, ns)) {
                return Ok(false);
            }
            if self.excluded_namespaces.iter().any(|p| wildcard(p, ns)) {
                return Ok(false);
            }
        }
        if let Some(sel) = &self.label_selector
            && !sel.matches(&object.labels)?
        {
            return Ok(false);
        }
        if let Some(sel) = &self.namespace_selector {
            if is_namespace {
                if !sel.matches(&object.labels)? {
                    return Ok(false);
                }
            } else if has_namespace {
                let Some(labels) = namespace_labels(object.namespace) else {
                    return Err(format!(
                        "namespaceSelector: Namespace {} is in neither the commit nor the inventory",
                        object.namespace
                    ));
                };
                if !sel.matches(&labels)? {
                    return Ok(false);
                }
            }
        }
        if let Some(name) = self.name.as_deref().filter(|n| !n.is_empty()) {
            // Gatekeeper's `MatchesGenerateName`: a pattern ending in `*` also matches the
            // prefix an object asks its name to be generated from.
            let generated = name.ends_with('*') && wildcard(name, object.generate_name);
            if !wildcard(name, object.name) && !generated {
                return Ok(false);
            }
        }
        match self.source.as_deref() {
            None | Some("All" | "Original") => Ok(true),
            Some("Generated") => Ok(false),
            Some(other) => Err(format!("invalid source field {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Match {
        serde_json::from_value(v).unwrap()
    }

    fn matches(spec: Value, object: Value) -> Result<bool, String> {
        let prod: BTreeMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        m(spec).matches(&Subject::of(&object), |ns| {
            (ns == "prod").then(|| prod.clone())
        })
    }

    fn pod(ns: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": ns, "labels": {"app": "web"}}})
    }

    #[test]
    fn wildcards_match_at_either_end() {
        assert!(wildcard("kube-*", "kube-system"));
        assert!(wildcard("*-system", "kube-system"));
        assert!(wildcard("*be-sy*", "kube-system"));
        assert!(wildcard("prod", "prod"));
        assert!(!wildcard("prod", "prod-2"));
        assert!(wildcard("*", "anything"));
    }

    #[test]
    fn kinds_match_by_group_and_kind() {
        let spec = json!({"kinds": [{"apiGroups": ["apps"], "kinds": ["Deployment"]}]});
        let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "a"}});
        assert_eq!(matches(spec.clone(), deploy), Ok(true));
        assert_eq!(matches(spec, pod("a")), Ok(false));
        assert_eq!(
            matches(
                json!({"kinds": [{"apiGroups": [""], "kinds": ["*"]}]}),
                pod("a")
            ),
            Ok(true)
        );
        assert_eq!(
            matches(json!({"kinds": [{"kinds": ["Pod"]}]}), pod("a")),
            Ok(true)
        );
    }

    #[test]
    fn namespaces_and_exclusions_use_a_namespace_own_name() {
        let ns =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}});
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}});
        assert_eq!(
            matches(json!({"excludedNamespaces": ["kube-*"]}), ns.clone()),
            Ok(false)
        );
        assert_eq!(
            matches(json!({"namespaces": ["kube-system"]}), ns),
            Ok(true)
        );
        assert_eq!(
            matches(json!({"namespaces": ["prod"]}), pod("dev")),
            Ok(false)
        );
        assert_eq!(
            matches(json!({"namespaces": ["prod"]}), pod("prod")),
            Ok(true)
        );
        // Cluster-scoped objects are in no namespace: both pass.
        assert_eq!(
            matches(json!({"namespaces": ["prod"]}), role.clone()),
            Ok(true)
        );
        assert_eq!(
            matches(json!({"excludedNamespaces": ["*"]}), role),
            Ok(true)
        );
    }

    #[test]
    fn scope_tells_cluster_from_namespaced() {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}});
        assert_eq!(matches(json!({"scope": "Cluster"}), ns.clone()), Ok(true));
        assert_eq!(matches(json!({"scope": "Namespaced"}), ns), Ok(false));
        assert_eq!(matches(json!({"scope": "Namespaced"}), pod("a")), Ok(true));
        assert_eq!(matches(json!({"scope": "Cluster"}), pod("a")), Ok(false));
        assert_eq!(matches(json!({"scope": "*"}), pod("a")), Ok(true));
    }

    #[test]
    fn selectors_read_the_object_and_its_namespace() {
        let sel = json!({"labelSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}});
        assert_eq!(matches(sel, pod("a")), Ok(true));
        let sel = json!({"labelSelector": {"matchLabels": {"app": "db"}}});
        assert_eq!(matches(sel, pod("a")), Ok(false));
        let sel = json!({"labelSelector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}});
        assert_eq!(matches(sel, pod("a")), Ok(true));
        let nsel = json!({"namespaceSelector": {"matchLabels": {"env": "prod"}}});
        assert_eq!(matches(nsel.clone(), pod("prod")), Ok(true));
        assert_eq!(
            matches(nsel, pod("elsewhere")),
            Err(
                "namespaceSelector: Namespace elsewhere is in neither the commit nor the inventory"
                    .into()
            )
        );
        let bad =
            json!({"labelSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}});
        assert!(
            matches(bad, pod("a"))
                .unwrap_err()
                .contains("values must be non-empty")
        );
    }

    #[test]
    fn name_matches_the_name_or_a_generate_name_prefix() {
        assert_eq!(matches(json!({"name": "web-*"}), pod("a")), Ok(true));
        assert_eq!(matches(json!({"name": "db"}), pod("a")), Ok(false));
        let generated = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "job-", "namespace": "a"}});
        assert_eq!(matches(json!({"name": "job-*"}), generated), Ok(true));
    }
}
