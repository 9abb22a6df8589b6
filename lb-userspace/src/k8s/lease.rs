//! One L2 owner per VIP in Kubernetes: a coordination.k8s.io/v1 Lease per VIP,
//! `xlb-vip-<address>` in the agent's namespace, held by the node that answers ARP and
//! neighbour solicitations for it.
//!
//! Each node, once a second, for every VIP it can serve: renews the Leases it holds,
//! takes a Lease that does not exist or has expired (renewTime + leaseDurationSeconds
//! in the past), and leaves the others alone. A write names the resourceVersion it
//! read, so of two nodes that race for one Lease only one wins. A Lease that does not
//! exist yet is created after a delay between 0 and 500 ms drawn from a hash of the VIP
//! and the node's name, so nodes that see VIPs at the same moment share them out
//! rather than one taking all. VIPs this node no longer serves are released (the Lease
//! deleted).
//!
//! With LEASE_SECONDS = 3: a node that stops renewing loses its VIPs at most
//! 3 s (expiry, counted from its last renewal) + 1 s (the others' next look) later.
//!
//! A pass runs in the agent's loop, and kube's client has no read timeout: an API
//! server that takes requests and never answers would hold the loop (reloads, health,
//! sweeps, signals) for good. So a pass is given PASS_BUDGET; one that runs out keeps
//! answering the VIPs this node held, as a failed read does (clients stay served while
//! the API is in trouble; a node that cannot renew loses its Leases to the others by
//! expiry all the same), and the Leases are left alone for PASS_BACKOFF.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, PostParams},
    Api, Client,
};
use tracing::{debug, info, warn};

pub const LEASE_SECONDS: i32 = 3;
/// The longest a pass at the Leases (or their release) may hold the agent's loop.
pub const PASS_BUDGET: Duration = Duration::from_millis(1500);
/// How long the Leases are left alone after a pass ran out of time.
const PASS_BACKOFF: Duration = Duration::from_secs(2);
/// The label on every Lease xlb creates (`xlb uninstall` deletes them by it).
pub const LABEL: (&str, &str) = ("app.kubernetes.io/name", "xlb");
const SPREAD_MS: u64 = 500;

pub fn lease_name(vip: IpAddr) -> String {
    format!(
        "xlb-vip-{}",
        vip.to_string().replace(['.', ':'], "-").trim_matches('-')
    )
}

pub struct VipLeases {
    api: Api<Lease>,
    me: String,
    held: BTreeSet<IpAddr>,
    /// When each free Lease was first seen free (for the spread delay).
    free_since: BTreeMap<IpAddr, Instant>,
    /// Set when a pass ran out of time: no pass before this instant.
    stalled_until: Option<Instant>,
}

impl VipLeases {
    pub fn new(client: Client, namespace: &str, me: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            me: me.to_owned(),
            held: BTreeSet::new(),
            free_since: BTreeMap::new(),
            stalled_until: None,
        }
    }

    fn spread_delay(&self, vip: IpAddr) -> Duration {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (vip, &self.me).hash(&mut h);
        Duration::from_millis(h.finish() % SPREAD_MS)
    }

    fn lease(
        &self,
        vip: IpAddr,
        rv: Option<String>,
        transitions: i32,
        acquired: Option<MicroTime>,
    ) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(vip)),
                resource_version: rv,
                labels: Some([(LABEL.0.to_owned(), LABEL.1.to_owned())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.me.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// Renews, takes and releases Leases within PASS_BUDGET (module comment); returns
    /// the VIPs this node answers for now.
    pub async fn pass(&mut self, candidates: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        let held_of = |held: &BTreeSet<IpAddr>| held.intersection(candidates).copied().collect();
        match self.stalled_until {
            Some(t) if Instant::now() < t => return held_of(&self.held),
            _ => {}
        }
        match tokio::time::timeout(PASS_BUDGET, self.update(candidates)).await {
            Ok(owned) => {
                if self.stalled_until.take().is_some() {
                    info!("the Kubernetes API server answers again: the VIP Leases are renewed");
                }
                owned
            }
            Err(_) => {
                if self.stalled_until.is_none() {
                    warn!(
                        budget = ?PASS_BUDGET,
                        "renewing the VIP Leases took longer than {PASS_BUDGET:?}: the Kubernetes API server is not answering; this node goes on answering for the VIPs it held, and tries again every {PASS_BACKOFF:?}"
                    );
                }
                self.stalled_until = Some(Instant::now() + PASS_BACKOFF);
                held_of(&self.held)
            }
        }
    }

    /// Renews, takes and releases Leases; returns the VIPs this node owns now.
    /// Cancellable at any await: `held` changes only once a write is answered.
    async fn update(&mut self, candidates: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        let pp = PostParams::default();
        for vip in self.held.clone() {
            if !candidates.contains(&vip) {
                self.release(vip).await;
            }
        }
        let mut owned = BTreeSet::new();
        for &vip in candidates {
            let name = lease_name(vip);
            let current = match self.api.get_opt(&name).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(%vip, "reading the VIP's Lease failed: {e}");
                    // Unknown: keep answering what we held; a partitioned node's Lease
                    // expires for the others anyway.
                    if self.held.contains(&vip) {
                        owned.insert(vip);
                    }
                    continue;
                }
            };
            let spec = current
                .as_ref()
                .and_then(|l| l.spec.clone())
                .unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let expired = spec.renew_time.as_ref().is_none_or(|t| {
                let age_ms = Timestamp::now().as_millisecond() - t.0.as_millisecond();
                age_ms > spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS) as i64 * 1000
            });
            let mine = current.is_some() && holder == self.me;
            if !(mine || current.is_none() || holder.is_empty() || expired) {
                self.free_since.remove(&vip);
                self.held.remove(&vip);
                continue;
            }
            // The spread delay only for Leases no one has held yet: a takeover of an
            // expired one is a failover, and waits for nothing.
            if current.is_none() {
                let since = *self.free_since.entry(vip).or_insert_with(Instant::now);
                if since.elapsed() < self.spread_delay(vip) {
                    continue;
                }
            }
            let result = match &current {
                None => self.api.create(&pp, &self.lease(vip, None, 0, None)).await,
                Some(l) => {
                    let transitions = spec.lease_transitions.unwrap_or(0) + (!mine) as i32;
                    let acquired = if mine {
                        spec.acquire_time.clone()
                    } else {
                        None
                    };
                    let rv = l.metadata.resource_version.clone();
                    self.api
                        .replace(&name, &pp, &self.lease(vip, rv, transitions, acquired))
                        .await
                }
            };
            match result {
                Ok(_) => {
                    if !mine {
                        info!(%vip, lease = %name, previous = %holder, "took the VIP's Lease: answering for it on L2");
                    }
                    self.free_since.remove(&vip);
                    self.held.insert(vip);
                    owned.insert(vip);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    debug!(%vip, "another node wrote the VIP's Lease first");
                    self.held.remove(&vip);
                }
                Err(e) => {
                    warn!(%vip, "writing the VIP's Lease failed: {e}");
                    if self.held.contains(&vip) {
                        owned.insert(vip);
                    }
                }
            }
        }
        owned
    }

    async fn release(&mut self, vip: IpAddr) {
        let name = lease_name(vip);
        if let Ok(Some(l)) = self.api.get_opt(&name).await {
            let holder = l.spec.as_ref().and_then(|s| s.holder_identity.clone());
            if holder.as_deref() == Some(self.me.as_str()) {
                match self.api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => info!(%vip, lease = %name, "released the VIP's Lease"),
                    Err(e) => warn!(%vip, "releasing the VIP's Lease failed: {e}"),
                }
            }
        }
        self.held.remove(&vip);
    }

    /// Releases every Lease held (drain, detach), within PASS_BUDGET: a Lease not
    /// released expires.
    pub async fn release_all(&mut self) {
        let all = async {
            for vip in self.held.clone() {
                self.release(vip).await;
            }
        };
        if tokio::time::timeout(PASS_BUDGET, all).await.is_err() {
            warn!("releasing the VIP Leases took longer than {PASS_BUDGET:?}: the Kubernetes API server is not answering; they expire in {LEASE_SECONDS} s instead");
        }
    }
}
