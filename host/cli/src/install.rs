//! `sluice generate`: the manifests that install the agent in a cluster, as agentk's
//! `cli generate` printed them: Namespace, ServiceAccount, RBAC, the git token Secret, the
//! Deployment and a Service for its HTTP port.
//!
//! Two RBAC variants:
//! - [`Rbac::ClusterAdmin`] (the default, as agentk's install): the ServiceAccount is bound
//!   to `cluster-admin`, so projects may hold any object, cluster-scoped ones included.
//! - [`Rbac::Namespaced`]: only what syncing into the given namespaces needs: a Role per
//!   namespace over every namespaced resource there (apply, prune, inventory ConfigMaps,
//!   Events), and the shard Lease in the agent's own namespace. Discovery needs
//!   no grant (`system:discovery` is bound to every authenticated user). Nothing
//!   cluster-scoped can be created, and no other namespace can be read or changed.
//!
//! The Deployment runs non-root with a read-only root filesystem, probes `/liveness` and
//! `/readiness`, and always shares work through the shard Lease (`POD_NAMESPACE`,
//! [`sluice_agent::shards`]): each project is synced by one replica at a time, so the old
//! and the new pod of a rolling update never sync the same project at once, and
//! `--replicas N` spreads the projects over N pods.

use serde_json::{Value, json};

/// Which permissions the agent gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rbac {
    /// `cluster-admin`, as agentk's install.
    ClusterAdmin,
    /// Only these namespaces.
    Namespaced(Vec<String>),
}

/// Where the agent's configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFrom {
    /// A configuration repository (`--config-repo`): `.gitlab/agents/<name>/sluice.yaml`,
    /// else `config.yaml`, followed on its default branch.
    Repo(String),
    /// A configuration file's text, installed as a ConfigMap (`--config`).
    File(String),
}

/// What to install.
#[derive(Debug, Clone)]
pub struct Params {
    /// Agent name (`--agent-name`): the configuration path and inventory id prefix.
    pub agent_name: String,
    /// The namespace the agent runs in.
    pub namespace: String,
    /// Container image.
    pub image: String,
    /// Replicas sharing the projects, 1 to [`MAX_REPLICAS`].
    pub replicas: u32,
    /// Permissions.
    pub rbac: Rbac,
    /// Configuration.
    pub config: ConfigFrom,
    /// Base URL project paths resolve against.
    pub git_base_url: String,
    /// The git token, if the repositories need one (it goes into a Secret only).
    pub git_token: Option<String>,
    /// The push webhooks' secret, if they are wanted (a Secret only).
    pub webhook_secret: Option<String>,
    /// A `kubernetes.io/dockerconfigjson` Secret of the agent's namespace (the kind image
    /// pulls use) holding the credentials of the registries `oci://` sources come from.
    pub registry_secret: Option<String>,
}

/// The default image: this version's.
pub fn default_image() -> String {
    format!("registry.example.com/sluice:{}", crate::VERSION)
}

/// Why no manifests were generated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name Kubernetes would refuse.
    #[error(
        "{what} {value:?} is not a valid Kubernetes name (lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit)"
    )]
    InvalidName {
        /// Which flag.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// `--rbac namespaced` without namespaces.
    #[error("--rbac namespaced needs the namespaces the agent may sync into (--namespace a,b)")]
    NoNamespaces,
    /// Replicas out of range.
    #[error("--replicas must be 1 to 12 (the shards of a table; more would get no work), got {0}")]
    Replicas(u32),
}

/// Labels of everything generated; `app.kubernetes.io/name: sluice` never matches
/// agentk's chart (`gitlab-agent`), so the two install side by side.
fn labels(p: &Params) -> Value {
    json!({
        "app.kubernetes.io/name": "sluice",
        "app.kubernetes.io/instance": p.agent_name,
        "app.kubernetes.io/version": crate::VERSION,
    })
}

fn selector(p: &Params) -> Value {
    json!({"app.kubernetes.io/name": "sluice", "app.kubernetes.io/instance": p.agent_name})
}

/// The install manifests, in apply order.
///
/// # Errors
/// [`Error`] for names Kubernetes would refuse and inconsistent flags.
pub fn manifests(p: &Params) -> Result<Vec<Value>, Error> {
    for (what, value) in [
        ("--agent-namespace", &p.namespace),
        ("--agent-name", &p.agent_name),
    ] {
        if !sluice_model::object::is_dns_label(value) {
            return Err(Error::InvalidName {
                what,
                value: value.clone(),
            });
        }
    }
    if let Rbac::Namespaced(namespaces) = &p.rbac {
        if namespaces.is_empty() {
            return Err(Error::NoNamespaces);
        }
        if let Some(bad) = namespaces
            .iter()
            .find(|n| !sluice_model::object::is_dns_label(n))
        {
            return Err(Error::InvalidName {
                what: "--namespace",
                value: bad.clone(),
            });
        }
    }
    if !(1..=MAX_REPLICAS).contains(&p.replicas) {
        return Err(Error::Replicas(p.replicas));
    }
    let name = format!("sluice-{}", p.agent_name);
    let ns = &p.namespace;
    let meta = |n: &str| json!({"name": n, "namespace": ns, "labels": labels(p)});
    let mut out = vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": ns, "labels": labels(p)}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(&name)}),
    ];
    // `data`, base64 as the API stores it (server-side apply of `stringData` leaves
    // ownership behind on later applies).
    let secret = |suffix: &str, key: &str, value: &str| {
        let encoded =
            serde_json::to_value(k8s_openapi::ByteString(value.trim().as_bytes().to_vec()))
                .unwrap_or_default();
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta(&format!("{name}-{suffix}")),
               "type": "Opaque", "data": {key: encoded}})
    };
    if let Some(token) = &p.git_token {
        out.push(secret("git", "token", token));
    }
    if let Some(webhook) = &p.webhook_secret {
        out.push(secret("webhook", "secret", webhook));
    }
    if let ConfigFrom::File(text) = &p.config {
        out.push(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(&format!("{name}-config")),
                        "data": {"config.yaml": text}}));
    }
    let subject = json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}]);
    match &p.rbac {
        Rbac::ClusterAdmin => out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{name}-{ns}"), "labels": labels(p)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": subject,
        })),
        Rbac::Namespaced(namespaces) => {
            for target in namespaces {
                let m = json!({"name": name, "namespace": target, "labels": labels(p)});
                out.push(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": m,
                    "rules": [{"apiGroups": ["*"], "resources": ["*"],
                               "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}],
                }));
                out.push(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": m,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                    "subjects": subject,
                }));
            }
        }
    }
    if !matches!(&p.rbac, Rbac::Namespaced(n) if n.contains(ns)) {
        // Shared work: only its own shard Lease (and Leases to create it), in its namespace,
        // and reading the single-leader Lease of sluice 0.4 (a rollout waits for it).
        let lease_role = format!("{name}-leader-election");
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(&lease_role),
            "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "resourceNames": [shards_lease_name(&p.agent_name)], "verbs": ["get", "update"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "resourceNames": [lease_name(&p.agent_name)], "verbs": ["get"]},
            ],
        }));
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(&lease_role),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": lease_role},
            "subjects": subject,
        }));
    }
    let mut ports = vec![json!({"name": "http", "port": 8080, "targetPort": "http"})];
    if p.webhook_secret.is_some() {
        ports.push(json!({"name": "webhook", "port": WEBHOOK_PORT, "targetPort": "webhook"}));
    }
    out.push(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta(&name),
        "spec": {"selector": selector(p), "ports": ports},
    }));
    out.push(deployment(p, &name));
    Ok(out)
}

/// The port of the push webhooks (`sluice run --webhook-listen-address`), apart from the
/// probes' and metrics' port 8080.
pub const WEBHOOK_PORT: u16 = 9292;

/// The single-leader Lease of sluice 0.4, `sluice-<agent>-lock` (never one of agentk's,
/// `agent-<numeric id>-lock`): replicas of this version wait while a live 0.4 holds it.
pub fn lease_name(agent: &str) -> String {
    format!("sluice-{agent}-lock")
}

/// The shard Lease of agent `agent`: `sluice-<agent>-shards` ([`sluice_agent::shards`]).
pub fn shards_lease_name(agent: &str) -> String {
    format!("sluice-{agent}-shards")
}

/// The most replicas `sluice generate` installs: the shards of a default table.
pub const MAX_REPLICAS: u32 = sluice_agent::shards::DEFAULT_SHARDS as u32;

fn deployment(p: &Params, name: &str) -> Value {
    let mut args = vec!["run".to_string(), format!("--agent-name={}", p.agent_name)];
    if matches!(p.rbac, Rbac::Namespaced(_)) {
        // It may list only its namespaces: never a watch of every namespace.
        args.push("--per-namespace-watches".into());
    }
    let mut volumes = vec![
        json!({"name": "cache", "emptyDir": {}}),
        json!({"name": "tmp", "emptyDir": {}}),
    ];
    let mut mounts = vec![
        json!({"name": "cache", "mountPath": "/var/cache/sluice"}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    match &p.config {
        ConfigFrom::Repo(url) => args.push(format!("--config-repo={url}")),
        ConfigFrom::File(_) => {
            args.push("--config=/etc/sluice/config/config.yaml".into());
            volumes
                .push(json!({"name": "config", "configMap": {"name": format!("{name}-config")}}));
            mounts.push(
                json!({"name": "config", "mountPath": "/etc/sluice/config", "readOnly": true}),
            );
        }
    }
    args.push(format!("--git-base-url={}", p.git_base_url));
    if p.git_token.is_some() {
        args.push("--git-token-file=/etc/sluice/git/token".into());
        volumes.push(json!({"name": "git", "secret": {"secretName": format!("{name}-git"), "defaultMode": 0o440}}));
        mounts.push(json!({"name": "git", "mountPath": "/etc/sluice/git", "readOnly": true}));
    }
    if let Some(secret) = &p.registry_secret {
        args.push("--registry-config=/etc/sluice/registry/config.json".into());
        volumes.push(json!({"name": "registry", "secret": {
            "secretName": secret, "defaultMode": 0o440,
            "items": [{"key": ".dockerconfigjson", "path": "config.json"}]
        }}));
        mounts.push(
            json!({"name": "registry", "mountPath": "/etc/sluice/registry", "readOnly": true}),
        );
    }
    let mut ports = vec![json!({"name": "http", "containerPort": 8080})];
    if p.webhook_secret.is_some() {
        args.push("--webhook-secret-file=/etc/sluice/webhook/secret".into());
        ports.push(json!({"name": "webhook", "containerPort": WEBHOOK_PORT}));
        volumes.push(json!({"name": "webhook", "secret": {"secretName": format!("{name}-webhook"), "defaultMode": 0o440}}));
        mounts
            .push(json!({"name": "webhook", "mountPath": "/etc/sluice/webhook", "readOnly": true}));
    }
    args.extend([
        "--cache-dir=/var/cache/sluice".to_string(),
        format!("--lease-name={}", shards_lease_name(&p.agent_name)),
    ]);
    let probe =
        |path: &str| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": 10});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": p.namespace, "labels": labels(p)},
        "spec": {
            "replicas": p.replicas,
            "selector": {"matchLabels": selector(p)},
            "template": {
                "metadata": {"labels": labels(p)},
                "spec": {
                    "serviceAccountName": name,
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "sluice",
                        "image": p.image,
                        "args": args,
                        "env": [
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "ports": ports,
                        "livenessProbe": probe("/liveness"),
                        "readinessProbe": probe("/readiness"),
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "128Mi"},
                            "limits": {"memory": "512Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    })
}

/// The manifests as one YAML stream.
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).unwrap_or_default()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rbac: Rbac) -> Params {
        Params {
            agent_name: "prod".into(),
            namespace: "sluice-system".into(),
            image: "registry.example.com/sluice:0.1.0".into(),
            replicas: 1,
            rbac,
            config: ConfigFrom::Repo("https://gitlab.example.com/ops/agents.git".into()),
            git_base_url: "https://gitlab.example.com".into(),
            git_token: Some("glpat-secret\n".into()),
            webhook_secret: None,
            registry_secret: None,
        }
    }

    #[test]
    fn a_registry_secret_is_mounted_as_the_registry_config() {
        let out = manifests(&Params {
            registry_secret: Some("gitlab-registry".into()),
            ..params(Rbac::ClusterAdmin)
        })
        .expect("valid");
        let pod = &out.last().expect("deployment")["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert!(
            c["args"]
                .as_array()
                .expect("args")
                .contains(&json!("--registry-config=/etc/sluice/registry/config.json"))
        );
        assert!(
            pod["volumes"]
                .as_array()
                .expect("volumes")
                .contains(&json!({
                    "name": "registry",
                    "secret": {"secretName": "gitlab-registry", "defaultMode": 0o440,
                               "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}
                }))
        );
    }

    #[test]
    fn a_webhook_secret_goes_into_its_own_secret_and_turns_the_hooks_on() {
        let out = manifests(&Params {
            webhook_secret: Some("s3cr3t-value\n".into()),
            ..params(Rbac::ClusterAdmin)
        })
        .expect("valid");
        let hook = out
            .iter()
            .find(|o| o["metadata"]["name"] == "sluice-prod-webhook")
            .expect("the webhook Secret");
        assert_eq!(hook["data"]["secret"], "czNjcjN0LXZhbHVl");
        assert!(!to_yaml(&out).contains("s3cr3t-value"));
        let deployment = out.last().expect("deployment");
        let c = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert!(
            c["args"]
                .as_array()
                .expect("args")
                .contains(&json!("--webhook-secret-file=/etc/sluice/webhook/secret"))
        );
        assert!(c["volumeMounts"].as_array().expect("mounts").contains(
            &json!({"name": "webhook", "mountPath": "/etc/sluice/webhook", "readOnly": true})
        ));
        // The receivers have a port of their own, in the Pod and the Service.
        assert_eq!(
            c["ports"],
            json!([{"name": "http", "containerPort": 8080}, {"name": "webhook", "containerPort": 9292}])
        );
        let service = out
            .iter()
            .find(|o| o["kind"] == "Service")
            .expect("Service");
        assert_eq!(
            service["spec"]["ports"][1],
            json!({"name": "webhook", "port": 9292, "targetPort": "webhook"})
        );
        let without = manifests(&params(Rbac::ClusterAdmin)).expect("valid");
        let service = without
            .iter()
            .find(|o| o["kind"] == "Service")
            .expect("Service");
        assert_eq!(
            service["spec"]["ports"].as_array().map(Vec::len),
            Some(1),
            "no webhook port without a secret"
        );
    }

    fn kinds(objects: &[Value]) -> Vec<String> {
        objects
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or(""),
                    o["metadata"]["namespace"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    #[test]
    fn cluster_admin_by_default_as_agentk_installs() {
        let out = manifests(&params(Rbac::ClusterAdmin)).expect("valid");
        assert_eq!(
            kinds(&out),
            [
                "Namespace/",
                "ServiceAccount/sluice-system",
                "Secret/sluice-system",
                "ClusterRoleBinding/",
                "Role/sluice-system",
                "RoleBinding/sluice-system",
                "Service/sluice-system",
                "Deployment/sluice-system",
            ]
        );
        assert_eq!(out[3]["roleRef"]["name"], "cluster-admin");
        // The token is in the Secret only, trimmed and base64 encoded, never in args.
        assert_eq!(out[2]["data"]["token"], "Z2xwYXQtc2VjcmV0");
        let text = to_yaml(&out);
        assert!(!text.contains("glpat-secret"), "{text}");
        let pod = &out[7]["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/liveness");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readiness");
        assert_eq!(c["env"][0]["name"], "POD_NAMESPACE");
        assert!(
            c["args"]
                .as_array()
                .expect("args")
                .contains(&json!("--lease-name=sluice-prod-shards"))
        );
    }

    #[test]
    fn namespaced_rbac_grants_only_the_named_namespaces() {
        let out =
            manifests(&params(Rbac::Namespaced(vec!["web".into(), "db".into()]))).expect("valid");
        let k = kinds(&out);
        assert!(!k.iter().any(|k| k.starts_with("Cluster")), "{k:?}");
        for ns in ["web", "db"] {
            assert!(
                k.contains(&format!("Role/{ns}")) && k.contains(&format!("RoleBinding/{ns}")),
                "{k:?}"
            );
        }
        assert_eq!(
            manifests(&params(Rbac::Namespaced(vec![])))
                .map_err(|e| e.to_string())
                .err(),
            Some(
                "--rbac namespaced needs the namespaces the agent may sync into (--namespace a,b)"
                    .into()
            )
        );
        assert!(manifests(&params(Rbac::Namespaced(vec!["Bad_NS".into()]))).is_err());
    }
}
