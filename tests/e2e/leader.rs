//! Leader election through a real Lease: one holder works, a standby takes over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use sluice_agent::leader::{self, Config};
use sluice_testenv::cluster;

use crate::support::eventually;

fn candidate(
    client: kube::Client,
    ns: &str,
    id: &str,
) -> (Arc<AtomicBool>, tokio::sync::oneshot::Sender<()>) {
    let working = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cfg = Config {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(200),
        ..Config::new(ns, "agent-test-lock", id)
    };
    let flag = working.clone();
    tokio::spawn(async move {
        leader::run(
            client,
            cfg,
            async {
                let _ = stopped.await;
            },
            || {
                let flag = flag.clone();
                async move {
                    flag.store(true, Ordering::SeqCst);
                    // Cleared when leadership ends and this future is dropped.
                    struct Clear(Arc<AtomicBool>);
                    impl Drop for Clear {
                        fn drop(&mut self) {
                            self.0.store(false, Ordering::SeqCst);
                        }
                    }
                    let _clear = Clear(flag);
                    std::future::pending::<()>().await
                }
            },
        )
        .await;
    });
    (working, stop)
}

#[tokio::test]
async fn only_the_lease_holder_works_and_a_standby_takes_over() {
    let client = cluster::client().await;
    let ns = cluster::namespace(&client, "lease").await;
    let (a, stop_a) = candidate(client.clone(), &ns, "pod-a");
    eventually("pod-a leads", Duration::from_secs(20), || async {
        a.load(Ordering::SeqCst).then_some(())
    })
    .await;
    let (b, _stop_b) = candidate(client.clone(), &ns, "pod-b");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        a.load(Ordering::SeqCst) && !b.load(Ordering::SeqCst),
        "exactly one leader"
    );

    stop_a.send(()).expect("stop pod-a");
    eventually("pod-b takes over", Duration::from_secs(20), || async {
        b.load(Ordering::SeqCst).then_some(())
    })
    .await;
    assert!(!a.load(Ordering::SeqCst));
    let leases: Api<Lease> = Api::namespaced(client, &ns);
    let holder = leases
        .get("agent-test-lock")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("pod-b"));
}
