//! Health of applied objects, by kstatus rules, within a deadline.
//!
//! [`status`] computes one object's status from its live state (pure); [`wait_current`]
//! polls until every object is `Current` (or `Failed`), and [`wait_gone`] until pruned
//! objects are `NotFound`. A newer commit cancels a wait by dropping its future.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;
use crate::object::ObjRef;

/// kstatus statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Status {
    /// Reconciled and healthy.
    Current,
    /// Still progressing.
    InProgress,
    /// Will not become healthy without a change.
    Failed,
    /// Being deleted.
    Terminating,
    /// Does not exist.
    NotFound,
}

/// Health after a wait, per object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Health {
    /// Which object.
    pub obj: ObjRef,
    /// Its last status.
    pub status: Status,
    /// Why, when not Current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The kstatus status of a live object.
pub fn status(live: &Value) -> (Status, Option<String>) {
    if !live["metadata"]["deletionTimestamp"].is_null() {
        return (Status::Terminating, None);
    }
    let generation = live["metadata"]["generation"].as_i64();
    let observed = live["status"]["observedGeneration"].as_i64();
    if let (Some(g), Some(o)) = (generation, observed)
        && o < g
    {
        return (
            Status::InProgress,
            Some(format!("observed generation {o} < generation {g}")),
        );
    }
    let s = &live["status"];
    let int = |v: &Value| v.as_i64().unwrap_or(0);
    let condition = |t: &str| {
        s["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .cloned()
    };
    let is_true = |t: &str| condition(t).is_some_and(|c| c["status"] == "True");
    let kind = live["kind"].as_str().unwrap_or_default();
    let progress = |m: String| (Status::InProgress, Some(m));
    match kind {
        "Deployment" => {
            let want = live["spec"]["replicas"].as_i64().unwrap_or(1);
            if condition("Progressing").is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded") {
                return (Status::Failed, Some("progress deadline exceeded".into()));
            }
            if int(&s["updatedReplicas"]) < want {
                return progress(format!(
                    "updated replicas {}/{want}",
                    int(&s["updatedReplicas"])
                ));
            }
            if int(&s["replicas"]) > want {
                return progress(format!(
                    "pending termination: {} replicas, want {want}",
                    int(&s["replicas"])
                ));
            }
            if int(&s["availableReplicas"]) < want || !is_true("Available") {
                return progress(format!(
                    "available replicas {}/{want}",
                    int(&s["availableReplicas"])
                ));
            }
            (Status::Current, None)
        }
        "StatefulSet" | "ReplicaSet" => {
            let want = live["spec"]["replicas"].as_i64().unwrap_or(1);
            if int(&s["readyReplicas"]) < want {
                return progress(format!(
                    "ready replicas {}/{want}",
                    int(&s["readyReplicas"])
                ));
            }
            if kind == "StatefulSet"
                && int(&s["updatedReplicas"]) < want
                && live["spec"]["updateStrategy"]["type"] != "OnDelete"
            {
                return progress(format!(
                    "updated replicas {}/{want}",
                    int(&s["updatedReplicas"])
                ));
            }
            (Status::Current, None)
        }
        "DaemonSet" => {
            let want = int(&s["desiredNumberScheduled"]);
            if s.is_null()
                || int(&s["numberAvailable"]) < want
                || int(&s["updatedNumberScheduled"]) < want
            {
                return progress(format!("available {}/{want}", int(&s["numberAvailable"])));
            }
            (Status::Current, None)
        }
        "Job" => {
            if is_true("Failed") {
                return (Status::Failed, Some("job failed".into()));
            }
            if is_true("Complete") || s["startTime"].is_string() {
                return (Status::Current, None);
            }
            progress("job not started".into())
        }
        "PersistentVolumeClaim" => match s["phase"].as_str() {
            Some("Bound") => (Status::Current, None),
            p => progress(format!("phase {}", p.unwrap_or("unknown"))),
        },
        "Service" => {
            if live["spec"]["type"] == "LoadBalancer"
                && s["loadBalancer"]["ingress"]
                    .as_array()
                    .is_none_or(|i| i.is_empty())
            {
                return progress("waiting for a load balancer".into());
            }
            (Status::Current, None)
        }
        "CustomResourceDefinition" => {
            if is_true("Established") {
                (Status::Current, None)
            } else {
                progress("not established".into())
            }
        }
        "Pod" => match s["phase"].as_str() {
            Some("Succeeded") => (Status::Current, None),
            Some("Failed") => (Status::Failed, Some("pod failed".into())),
            _ if is_true("Ready") => (Status::Current, None),
            p => progress(format!("phase {}", p.unwrap_or("unknown"))),
        },
        _ => {
            if is_true("Stalled") {
                return (
                    Status::Failed,
                    condition("Stalled").and_then(|c| c["message"].as_str().map(String::from)),
                );
            }
            if is_true("Reconciling") {
                return progress("reconciling".into());
            }
            match condition("Ready") {
                Some(c) if c["status"] == "False" => {
                    progress(c["message"].as_str().unwrap_or("not ready").to_string())
                }
                _ => (Status::Current, None),
            }
        }
    }
}

/// Polls until every object is Current or Failed, or until `timeout` (zero: no limit).
pub async fn wait_current(cluster: &Cluster, objects: &[ObjRef], timeout: Duration) -> Vec<Health> {
    poll(
        cluster,
        objects,
        timeout,
        |live| match live {
            Some(v) => status(v),
            None => (Status::NotFound, Some("not found".into())),
        },
        |s| matches!(s, Status::Current | Status::Failed),
    )
    .await
}

/// Polls until every object is NotFound, or until `timeout` (zero: no limit).
pub async fn wait_gone(cluster: &Cluster, objects: &[ObjRef], timeout: Duration) -> Vec<Health> {
    poll(
        cluster,
        objects,
        timeout,
        |live| match live {
            Some(_) => (Status::Terminating, None),
            None => (Status::NotFound, None),
        },
        |s| s == Status::NotFound,
    )
    .await
}

async fn poll(
    cluster: &Cluster,
    objects: &[ObjRef],
    timeout: Duration,
    judge: impl Fn(Option<&Value>) -> (Status, Option<String>),
    done: impl Fn(Status) -> bool,
) -> Vec<Health> {
    let start = Instant::now();
    let mut health: Vec<Health> = objects
        .iter()
        .map(|o| Health {
            obj: o.clone(),
            status: Status::InProgress,
            message: None,
        })
        .collect();
    loop {
        for h in health.iter_mut().filter(|h| !done(h.status)) {
            match cluster.get(&h.obj).await {
                Ok(live) => (h.status, h.message) = judge(live.as_ref()),
                Err(e) => h.message = Some(format!("failed to read: {e}")),
            }
        }
        if health.iter().all(|h| done(h.status))
            || (!timeout.is_zero() && start.elapsed() >= timeout)
        {
            return health;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deployment_rules() {
        let base =
            json!({"kind": "Deployment", "metadata": {"generation": 2}, "spec": {"replicas": 2}});
        let mut d = base.clone();
        d["status"] = json!({"observedGeneration": 1});
        assert_eq!(status(&d).0, Status::InProgress);
        d["status"] = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2,
                             "conditions": [{"type": "Available", "status": "True"}]});
        assert_eq!(status(&d).0, Status::Current);
        d["status"]["availableReplicas"] = json!(1);
        assert_eq!(
            status(&d),
            (Status::InProgress, Some("available replicas 1/2".into()))
        );
        d["status"]["conditions"] = json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]);
        assert_eq!(status(&d).0, Status::Failed);
    }

    #[test]
    fn generic_and_simple_kinds() {
        assert_eq!(
            status(&json!({"kind": "ConfigMap", "metadata": {}})).0,
            Status::Current
        );
        let cr = json!({"kind": "Widget", "metadata": {}, "status": {"conditions": [{"type": "Ready", "status": "False", "message": "x"}]}});
        assert_eq!(status(&cr), (Status::InProgress, Some("x".into())));
        assert_eq!(status(&json!({"kind": "PersistentVolumeClaim", "metadata": {}, "status": {"phase": "Bound"}})).0, Status::Current);
        assert_eq!(status(&json!({"kind": "Job", "metadata": {}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}})).0, Status::Failed);
        assert_eq!(
            status(&json!({"kind": "X", "metadata": {"deletionTimestamp": "t"}})).0,
            Status::Terminating
        );
    }
}
