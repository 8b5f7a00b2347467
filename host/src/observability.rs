//! What operators scrape and probe: `/metrics` (OpenMetrics text), `/liveness` and
//! `/readiness`, on agentk's listen address (`:8080` by default), so an agentk Deployment's
//! probes and scrape annotations keep working after the image is swapped.
//!
//! Workers record each sync in [`Metrics`]; the server only reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of per-project series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    project: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectLabels {
    project: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    project: String,
    action: String,
}

/// The agent's metrics and readiness.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    syncs: Family<SyncLabels, Counter>,
    duration: Family<ProjectLabels, Histogram>,
    objects: Family<ActionLabels, Counter>,
    last_success: Family<ProjectLabels, Gauge>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let syncs = Family::<SyncLabels, Counter>::default();
        let duration = Family::<ProjectLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0])
        });
        let objects = Family::<ActionLabels, Counter>::default();
        let last_success = Family::<ProjectLabels, Gauge>::default();
        registry.register(
            "syncs",
            "Syncs by project and result (success, failure, canceled)",
            syncs.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Duration of syncs, including the health wait",
            duration.clone(),
        );
        registry.register(
            "objects",
            "Objects by project and action of the syncs that finished",
            objects.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful sync of each project",
            last_success.clone(),
        );
        Metrics {
            registry,
            syncs,
            duration,
            objects,
            last_success,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records one sync: `result` is `success`, `failure` or `canceled`.
    pub fn record_sync(
        &self,
        project: &str,
        result: &str,
        took: Duration,
        actions: &[crate::apply::ObjectResult],
    ) {
        self.syncs
            .get_or_create(&SyncLabels {
                project: project.into(),
                result: result.into(),
            })
            .inc();
        self.duration
            .get_or_create(&ProjectLabels {
                project: project.into(),
            })
            .observe(took.as_secs_f64());
        for r in actions {
            let action = format!("{:?}", r.action).to_lowercase();
            self.objects
                .get_or_create(&ActionLabels {
                    project: project.into(),
                    action,
                })
                .inc();
        }
        if result == "success" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.last_success
                .get_or_create(&ProjectLabels {
                    project: project.into(),
                })
                .set(now.as_secs() as i64);
        }
    }

    /// Marks the agent ready (configuration loaded, workers started).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/liveness` and `/readiness` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let m = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/liveness", axum::routing::get(|| async { "ok" }))
        .route(
            "/readiness",
            axum::routing::get(move || {
                let ready = metrics.ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_are_counted_by_project_and_result() {
        let m = Metrics::default();
        m.record_sync("g/app", "success", Duration::from_millis(300), &[]);
        m.record_sync("g/app", "failure", Duration::from_millis(10), &[]);
        let text = m.encode();
        assert!(
            text.contains("sluice_syncs_total{project=\"g/app\",result=\"success\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sluice_syncs_total{project=\"g/app\",result=\"failure\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sluice_sync_duration_seconds_count{project=\"g/app\"} 2"),
            "{text}"
        );
    }
}
