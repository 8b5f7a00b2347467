//! What operators scrape and probe: `/metrics` (OpenMetrics text), `/liveness` and
//! `/readiness`, on agentk's listen address (`:8080` by default), so an agentk Deployment's
//! probes and scrape annotations keep working after the image is swapped. The push
//! webhooks have a port of their own (`webhook::serve`).
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
struct WebhookLabels {
    provider: String,
    result: String,
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
    webhooks: Family<WebhookLabels, Counter>,
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
        let webhooks = Family::<WebhookLabels, Counter>::default();
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
        registry.register(
            "webhook_requests",
            "Webhook requests by provider and result (triggered, no_match, ignored, unauthorized, bad_request, rate_limited)",
            webhooks.clone(),
        );
        Metrics {
            registry,
            syncs,
            duration,
            objects,
            last_success,
            webhooks,
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
        actions: &[sluice_engine::apply::ObjectResult],
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

    /// Records one webhook request (`/hooks/*`).
    pub fn record_webhook(&self, provider: &str, result: &str) {
        self.webhooks
            .get_or_create(&WebhookLabels {
                provider: provider.into(),
                result: result.into(),
            })
            .inc();
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

/// Connections served at once; more are closed when accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves `/metrics`, `/liveness` and `/readiness` on `listener` until the task is dropped,
/// within [`MAX_CONNECTIONS`] and the timeouts of [`crate::http`]. The port is
/// unauthenticated and often reachable from the whole cluster, so no client can hold it;
/// the push webhooks are served on a port of their own (`webhook::serve`), so a flood there
/// never fails the kubelet's probes here.
///
/// # Errors
/// See [`crate::http::serve`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let bounds = crate::http::Bounds {
        connections: MAX_CONNECTIONS,
        per_peer: MAX_CONNECTIONS,
    };
    crate::http::serve(listener, router(metrics), bounds).await
}

fn router(metrics: Arc<Metrics>) -> axum::Router {
    let m = metrics.clone();
    axum::Router::new()
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
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    /// Closed by the server: the read ends (EOF or reset) instead of waiting.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn slow_and_surplus_clients_cannot_hold_the_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, Arc::new(Metrics::default())));
        assert!(get(addr, "/liveness").await.starts_with("HTTP/1.1 200"));

        // Slowloris: half a request, never finished, is cut off after the header timeout.
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        assert!(
            closed_within(
                &mut slow,
                crate::http::HEADER_TIMEOUT + Duration::from_secs(3)
            )
            .await
        );

        // Every slot held by an idle connection: one more is closed at once...
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut surplus = TcpStream::connect(addr).await.expect("connect");
        assert!(closed_within(&mut surplus, Duration::from_secs(2)).await);
        // ...and the port serves again once the idle ones time out.
        for s in &mut idle {
            assert!(closed_within(s, crate::http::HEADER_TIMEOUT + Duration::from_secs(3)).await);
        }
        assert!(get(addr, "/liveness").await.starts_with("HTTP/1.1 200"));
        server.abort();
    }

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
