//! Active health checks (static mode): one task per checked backend, probing from the
//! LB host, with rise/fall thresholds. Transitions are sent to the agent's main loop,
//! which re-applies the config with the unhealthy backends out of the Maglev tables.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc::UnboundedSender,
    task::JoinHandle,
    time::timeout,
};
use tracing::{info, warn};

use crate::model::{CheckKind, HealthCheck, Service};

/// (service name, backend address).
pub type BackendKey = (String, SocketAddr);

/// A change of health: the backend and whether it is healthy now.
pub type Transition = (BackendKey, bool);

/// The running probes; dropping it stops them.
#[derive(Default)]
pub struct Checker {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts a probe per checked backend. `known` carries the health of backends that
/// were already being checked (so a reload does not reset them); others start healthy,
/// so a (re)started agent never empties a service before the first probes.
pub fn start(
    services: &[Service],
    known: &BTreeMap<BackendKey, bool>,
    tx: UnboundedSender<Transition>,
) -> Checker {
    let mut tasks = Vec::new();
    for svc in services {
        let Some(hc) = &svc.health_check else {
            continue;
        };
        for b in &svc.backends {
            let key = (svc.name.clone(), b.address);
            let healthy = known.get(&key).copied().unwrap_or(true);
            tasks.push(tokio::spawn(probe_loop(
                key,
                hc.clone(),
                healthy,
                tx.clone(),
            )));
        }
    }
    Checker { tasks }
}

async fn probe_loop(
    key: BackendKey,
    hc: HealthCheck,
    mut healthy: bool,
    tx: UnboundedSender<Transition>,
) {
    let target = SocketAddr::new(key.1.ip(), hc.port.unwrap_or(key.1.port()));
    let mut interval = tokio::time::interval(Duration::from_millis(hc.interval_ms));
    let (mut ups, mut downs) = (0u32, 0u32);
    loop {
        interval.tick().await;
        let ok = probe(target, &hc).await;
        if ok {
            (ups, downs) = (ups + 1, 0);
        } else {
            (ups, downs) = (0, downs + 1);
        }
        let now = if healthy {
            downs < hc.fall
        } else {
            ups >= hc.rise
        };
        if now != healthy {
            healthy = now;
            if healthy {
                info!(service = key.0, backend = %key.1, "backend healthy");
            } else {
                warn!(service = key.0, backend = %key.1, probe = %target, "backend unhealthy");
            }
            if tx.send((key.clone(), healthy)).is_err() {
                return;
            }
        }
    }
}

async fn probe(target: SocketAddr, hc: &HealthCheck) -> bool {
    let limit = Duration::from_millis(hc.timeout_ms);
    let attempt = async {
        let mut stream = TcpStream::connect(target).await.ok()?;
        if hc.kind == CheckKind::Tcp {
            return Some(true);
        }
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: xlb-health\r\n\r\n",
            hc.path(),
            target.ip()
        );
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        // "HTTP/1.x NNN ...": 2xx and 3xx are healthy.
        let status = std::str::from_utf8(&buf[..n])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .to_owned();
        Some(status.starts_with('2') || status.starts_with('3'))
    };
    matches!(timeout(limit, attempt).await, Ok(Some(true)))
}

/// Resolves the backends' health: unhealthy ones out of the Maglev tables (weight 0,
/// flagged unhealthy), or removed where established flows are not kept.
pub fn resolve(services: &mut [Service], health: &BTreeMap<BackendKey, bool>) {
    if health.values().all(|h| *h) {
        return;
    }
    for svc in services {
        let keep = svc
            .health_check
            .as_ref()
            .is_none_or(|hc| hc.keep_established);
        let name = svc.name.clone();
        svc.backends.retain_mut(|b| {
            if health
                .get(&(name.clone(), b.address))
                .copied()
                .unwrap_or(true)
            {
                return true;
            }
            b.healthy = false;
            b.weight = 0;
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn check(kind: CheckKind, path: &str) -> HealthCheck {
        HealthCheck {
            kind,
            port: None,
            path: Some(path.into()),
            interval_ms: 1000,
            timeout_ms: 300,
            rise: 1,
            fall: 1,
            keep_established: true,
        }
    }

    /// A one-shot HTTP server on 127.0.0.1 answering with `status`.
    async fn http_server(status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_status_decides() {
        assert!(
            probe(
                http_server("200 OK").await,
                &check(CheckKind::Http, "/healthz")
            )
            .await
        );
        assert!(probe(http_server("302 Found").await, &check(CheckKind::Http, "/")).await);
        assert!(
            !probe(
                http_server("503 Service Unavailable").await,
                &check(CheckKind::Http, "/")
            )
            .await
        );
    }

    #[tokio::test]
    async fn refused_and_silent_are_unhealthy() {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        assert!(!probe(closed, &check(CheckKind::Tcp, "/")).await);
        // Accepts but never answers: the HTTP check times out.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let _conn = l.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert!(
            probe(silent, &check(CheckKind::Tcp, "/")).await,
            "TCP connect succeeds"
        );
        assert!(
            !probe(silent, &check(CheckKind::Http, "/")).await,
            "HTTP times out"
        );
    }
}
