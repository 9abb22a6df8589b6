//! `externalTrafficPolicy: Local` health checks, answered as kube-proxy answers them:
//! on the Service's healthCheckNodePort, 200 while this node has a ready endpoint of
//! the Service and 503 while it has none, with the count in a small JSON body.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, Router};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::translate::HealthPort;

#[derive(Default)]
pub struct HealthPorts {
    served: BTreeMap<u16, (Arc<Mutex<HealthPort>>, JoinHandle<()>)>,
}

impl HealthPorts {
    /// Serves exactly `wanted`: new ports start, gone ones stop, counts update.
    pub async fn update(&mut self, wanted: &BTreeMap<u16, HealthPort>) {
        self.served.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "stopped a health check node port");
            }
            keep
        });
        for (port, hp) in wanted {
            if let Some((current, _)) = self.served.get(port) {
                *current.lock().unwrap() = hp.clone();
                continue;
            }
            // Dual-stack socket: IPv4 and IPv6 checks alike.
            let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, *port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, service = %hp.service, "cannot serve the health check node port: {e}");
                    continue;
                }
            };
            let shared = Arc::new(Mutex::new(hp.clone()));
            let app = Router::new().fallback(answer).with_state(shared.clone());
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            info!(port, service = %hp.service, "serving a health check node port");
            self.served.insert(*port, (shared, task));
        }
    }
}

impl Drop for HealthPorts {
    fn drop(&mut self) {
        for (_, task) in self.served.values() {
            task.abort();
        }
    }
}

async fn answer(State(hp): State<Arc<Mutex<HealthPort>>>) -> impl IntoResponse {
    let hp = hp.lock().unwrap().clone();
    let (ns, name) = hp.service.split_once('/').unwrap_or(("", &hp.service));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": hp.local_endpoints,
    });
    let code = if hp.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
}
