//! The agent's HTTP servers, hardened for ports anyone in the cluster may reach: HTTP/1
//! only, request headers within [`HEADER_TIMEOUT`] (slowloris), every connection closed
//! after [`CONNECTION_TIMEOUT`], and at most [`Bounds`] connections at once, in all and
//! per peer address (more are closed as soon as they are accepted).
//!
//! Two servers use it, on ports of their own so that one cannot starve the other: the
//! probes and metrics (`observability`, for the kubelet and Prometheus) and the push
//! receivers (`webhook`, for GitLab), as Flux's notification-controller serves its
//! receiver apart from its metrics and probes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open, keep-alive included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// How many connections a server holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// In all.
    pub connections: usize,
    /// From one peer address.
    pub per_peer: usize,
}

/// Serves `app` on `listener` within `bounds` until the task is dropped.
///
/// # Errors
/// Never returns otherwise; accept errors (out of file descriptors, a reset before
/// accept) are logged and retried.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    bounds: Bounds,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(bounds.connections));
    let peers = Peers::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "failed to accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(peer_slot) = peers.take(peer.ip(), bounds.per_peer) else {
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // HTTP/1 only: protocol sniffing would wait for a first byte with no timeout.
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .http1_only();
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop((slot, peer_slot));
        });
    }
}

/// Open connections per peer address.
#[derive(Debug, Default, Clone)]
struct Peers(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl Peers {
    /// One more connection from `ip`, unless it holds `max` already; released on drop.
    fn take(&self, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

struct PeerSlot {
    peers: Peers,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_share_and_gets_it_back() {
        let peers = Peers::default();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let held: Vec<PeerSlot> = (0..2).filter_map(|_| peers.take(a, 2)).collect();
        assert_eq!(held.len(), 2);
        assert!(peers.take(a, 2).is_none(), "a third from the same peer");
        assert!(peers.take(b, 2).is_some(), "another peer is not affected");
        drop(held);
        assert!(peers.take(a, 2).is_some());
        assert!(
            peers.0.lock().unwrap().is_empty(),
            "released slots leave no entry"
        );
    }
}
