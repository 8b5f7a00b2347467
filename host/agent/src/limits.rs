//! What a project may create: its own `limits:` (sluice's extension of the manifest
//! project entry) and, whatever the configuration says, never the agent's own objects.
//!
//! Pure, and checked after the plugins, before any request: a commit, or a transformer's
//! output, that breaks a limit applies nothing and prunes nothing, and the error names each
//! object, where it came from, and the rule. The API server's RBAC still bounds what the
//! agent's identity may do; limits bound what each project may ask of it.

use globset::{Glob, GlobSet, GlobSetBuilder};

use sluice_model::object::{ObjRef, Object};

/// A project's limits (`limits:` in its entry). The default allows everything.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Where namespaced objects may go, and which Namespaces may be created (globs);
    /// `None`: anywhere.
    namespaces: Option<Patterns>,
    /// Only these kinds (empty: any).
    allowed_kinds: Vec<KindPattern>,
    /// Never these kinds; a denial wins over an allowance.
    denied_kinds: Vec<KindPattern>,
}

impl PartialEq for Limits {
    fn eq(&self, other: &Self) -> bool {
        self.namespaces.as_ref().map(|p| &p.text) == other.namespaces.as_ref().map(|p| &p.text)
            && self.allowed_kinds == other.allowed_kinds
            && self.denied_kinds == other.denied_kinds
    }
}

#[derive(Debug, Clone)]
struct Patterns {
    text: Vec<String>,
    set: GlobSet,
}

/// A kind as written in `allowed_kinds` and `denied_kinds`: `Kind` (any group),
/// `group/Kind`, or `group/*`; the core group is written `core`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindPattern {
    /// `None`: any group.
    group: Option<String>,
    /// `None`: any kind of the group.
    kind: Option<String>,
}

impl std::str::FromStr for KindPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a kind: write Kind, group/Kind or group/* (the core group is `core`)"
            )
        };
        let (group, kind) = match s.split_once('/') {
            Some((g, k)) if !g.is_empty() && !k.is_empty() && !k.contains('/') => {
                (Some(if g == "core" { "" } else { g }), k)
            }
            Some(_) => return Err(bad()),
            None if !s.is_empty() && s != "*" => (None, s),
            None => return Err(bad()),
        };
        if kind.contains('*') && kind != "*" || group.is_some_and(|g| g.contains('*')) {
            return Err(bad());
        }
        Ok(KindPattern {
            group: group.map(str::to_string),
            kind: (kind != "*").then(|| kind.to_string()),
        })
    }
}

impl KindPattern {
    fn matches(&self, r: &ObjRef) -> bool {
        self.group.as_ref().is_none_or(|g| r.group == *g)
            && self.kind.as_ref().is_none_or(|k| r.kind == *k)
    }
}

impl std::fmt::Display for KindPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind.as_deref().unwrap_or("*");
        match self.group.as_deref() {
            None => f.write_str(kind),
            Some("") => write!(f, "core/{kind}"),
            Some(g) => write!(f, "{g}/{kind}"),
        }
    }
}

impl Limits {
    /// Limits from their configuration: namespace globs and kind patterns.
    ///
    /// # Errors
    /// A glob or kind that does not parse, named.
    pub fn new(
        namespaces: Option<Vec<String>>,
        allowed_kinds: &[String],
        denied_kinds: &[String],
    ) -> Result<Limits, String> {
        let namespaces = match namespaces {
            None => None,
            Some(text) => {
                let mut set = GlobSetBuilder::new();
                for n in &text {
                    set.add(Glob::new(n).map_err(|e| format!("namespace pattern {n:?}: {e}"))?);
                }
                let set = set.build().map_err(|e| e.to_string())?;
                Some(Patterns { text, set })
            }
        };
        let kinds = |list: &[String]| -> Result<Vec<KindPattern>, String> {
            list.iter().map(|k| k.parse()).collect()
        };
        Ok(Limits {
            namespaces,
            allowed_kinds: kinds(allowed_kinds)?,
            denied_kinds: kinds(denied_kinds)?,
        })
    }

    /// Whether these limits allow everything (the default).
    pub fn is_open(&self) -> bool {
        self.namespaces.is_none() && self.allowed_kinds.is_empty() && self.denied_kinds.is_empty()
    }

    /// Why the project may not create `r`, if it may not.
    fn refuses(&self, r: &ObjRef) -> Option<String> {
        if let Some(deny) = self.denied_kinds.iter().find(|p| p.matches(r)) {
            return Some(format!(
                "kind {deny} is in the project's limits.denied_kinds"
            ));
        }
        let allowed = self.allowed_kinds.iter().any(|p| p.matches(r));
        if !self.allowed_kinds.is_empty() && !allowed {
            return Some(format!(
                "kind {}/{} is not in the project's limits.allowed_kinds",
                if r.group.is_empty() { "core" } else { &r.group },
                r.kind
            ));
        }
        let ns = self.namespaces.as_ref()?;
        let is_namespace = r.group.is_empty() && r.kind == "Namespace";
        let (what, name) = if is_namespace {
            ("Namespace", r.name.as_str())
        } else if r.namespace.is_empty() {
            // Cluster-scoped: a project confined to namespaces creates nothing cluster-wide
            // unless its kind is allowed by name.
            return (!allowed).then(|| {
                format!(
                    "cluster-scoped, and the project is limited to namespaces {}; allow its kind in limits.allowed_kinds to create it",
                    ns.text.join(", ")
                )
            });
        } else {
            ("namespace", r.namespace.as_str())
        };
        (!ns.set.is_match(name)).then(|| {
            format!(
                "{what} {name} is not in the project's limits.namespaces ({})",
                ns.text.join(", ")
            )
        })
    }
}

/// The agent's own objects, which no project may create or change: its Lease, and what
/// `sluice generate` installs for it (`sluice-<agent>` and names that start with
/// `sluice-<agent>-`, in its namespace and among cluster-wide RBAC).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Protected {
    /// The agent's namespace (`POD_NAMESPACE`), when it runs in a cluster.
    pub namespace: Option<String>,
    /// The Lease of its leader election.
    pub lease: Option<String>,
    /// The prefix of its installed objects' names (`sluice-<agent>`).
    pub prefix: String,
}

impl Protected {
    /// Why `r` is the agent's own, if it is.
    fn refuses(&self, r: &ObjRef) -> Option<String> {
        let named = r
            .name
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
            || self.lease.as_deref() == Some(r.name.as_str());
        let here = self.namespace.as_ref().is_some_and(|ns| r.namespace == *ns);
        let rbac = r.group == "rbac.authorization.k8s.io" && r.namespace.is_empty();
        if (here || rbac) && named {
            return Some("it is the agent's own: no project may create or change it".into());
        }
        None
    }
}

/// One object a project may not create.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Which object.
    pub obj: ObjRef,
    /// Where it came from (`path:line`).
    pub origin: sluice_model::object::Origin,
    /// Which rule.
    pub message: String,
}

/// Every object of `objects` that `limits` or `protected` refuse.
pub fn check(objects: &[Object], limits: &Limits, protected: &Protected) -> Vec<Violation> {
    objects
        .iter()
        .filter_map(|o| {
            let r = o.obj_ref();
            let message = protected.refuses(&r).or_else(|| limits.refuses(&r))?;
            Some(Violation {
                obj: r,
                origin: o.origin.clone(),
                message,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(group: &str, kind: &str, namespace: &str, name: &str) -> ObjRef {
        ObjRef {
            group: group.into(),
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kinds_parse_as_written_and_bad_ones_are_named() {
        let p: KindPattern = "rbac.authorization.k8s.io/ClusterRoleBinding"
            .parse()
            .expect("parses");
        assert!(p.matches(&r(
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            "",
            "x"
        )));
        assert!(!p.matches(&r("", "ClusterRoleBinding", "", "x")));
        let core: KindPattern = "core/Secret".parse().expect("parses");
        assert!(core.matches(&r("", "Secret", "a", "s")));
        assert!(!core.matches(&r("example.com", "Secret", "a", "s")));
        let any: KindPattern = "admissionregistration.k8s.io/*".parse().expect("parses");
        assert!(any.matches(&r(
            "admissionregistration.k8s.io",
            "ValidatingWebhookConfiguration",
            "",
            "w"
        )));
        assert_eq!(any.to_string(), "admissionregistration.k8s.io/*");
        for bad in [
            "",
            "*",
            "/Kind",
            "group/",
            "a/b/c",
            "group/Dep*",
            "gr*/Kind",
        ] {
            assert!(bad.parse::<KindPattern>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_refuse_by_namespace_and_kind_and_deny_wins() {
        let limits = Limits::new(
            Some(strings(&["team-a", "team-a-*"])),
            &strings(&[
                "apps/*",
                "core/ConfigMap",
                "core/Namespace",
                "networking.k8s.io/IngressClass",
            ]),
            &strings(&["apps/DaemonSet"]),
        )
        .expect("limits");
        let cases = [
            (r("apps", "Deployment", "team-a", "web"), None),
            (r("apps", "Deployment", "team-a-dev", "web"), None),
            (
                r("", "ConfigMap", "team-b", "c"),
                Some(
                    "namespace team-b is not in the project's limits.namespaces (team-a, team-a-*)",
                ),
            ),
            (
                r("apps", "DaemonSet", "team-a", "d"),
                Some("kind apps/DaemonSet is in the project's limits.denied_kinds"),
            ),
            (
                r("", "Secret", "team-a", "s"),
                Some("kind core/Secret is not in the project's limits.allowed_kinds"),
            ),
            (r("", "Namespace", "", "team-a-x"), None),
            (
                r("", "Namespace", "", "kube-system"),
                Some(
                    "Namespace kube-system is not in the project's limits.namespaces (team-a, team-a-*)",
                ),
            ),
            // Cluster-scoped kinds need an allowance by name when namespaces are limited.
            (r("networking.k8s.io", "IngressClass", "", "nginx"), None),
        ];
        for (obj, want) in cases {
            assert_eq!(limits.refuses(&obj).as_deref(), want, "{obj}");
        }
        let confined = Limits::new(Some(strings(&["team-a"])), &[], &[]).expect("limits");
        assert!(
            confined
                .refuses(&r(
                    "rbac.authorization.k8s.io",
                    "ClusterRoleBinding",
                    "",
                    "admin"
                ))
                .is_some_and(|m| m.starts_with(
                    "cluster-scoped, and the project is limited to namespaces team-a"
                ))
        );
        assert!(Limits::default().is_open());
        assert_eq!(
            Limits::default().refuses(&r("", "Secret", "kube-system", "x")),
            None
        );
        assert!(Limits::new(Some(strings(&["a[b"])), &[], &[]).is_err());
        assert!(Limits::new(None, &strings(&["a/b/c"]), &[]).is_err());
    }

    #[test]
    fn the_agents_own_objects_are_refused_whatever_the_limits() {
        let p = Protected {
            namespace: Some("sluice-system".into()),
            lease: Some("sluice-prod-lock".into()),
            prefix: "sluice-prod".into(),
        };
        let refused = [
            r("apps", "Deployment", "sluice-system", "sluice-prod"),
            r(
                "coordination.k8s.io",
                "Lease",
                "sluice-system",
                "sluice-prod-lock",
            ),
            r("", "Secret", "sluice-system", "sluice-prod-git"),
            r(
                "rbac.authorization.k8s.io",
                "ClusterRoleBinding",
                "",
                "sluice-prod-sluice-system",
            ),
            r(
                "rbac.authorization.k8s.io",
                "ClusterRole",
                "",
                "sluice-prod",
            ),
        ];
        for obj in refused {
            assert!(p.refuses(&obj).is_some(), "{obj}");
        }
        let allowed = [
            r("apps", "Deployment", "sluice-system", "web"),
            r("apps", "Deployment", "team-a", "sluice-prod"),
            r(
                "rbac.authorization.k8s.io",
                "ClusterRole",
                "",
                "sluice-production-reader",
            ),
            r("", "Namespace", "", "team-a"),
            // Its namespace is not pruned while it holds the agent (prune's in-use rule).
            r("", "Namespace", "", "sluice-system"),
        ];
        for obj in allowed {
            assert_eq!(p.refuses(&obj), None, "{obj}");
        }
    }
}
