//! `xlb run`: the agent. One reconcile loop (`run`): sources give what they know, the
//! loop merges it into the desired state (`crate::model::Desired`), and each sink
//! brings what it owns to that state, writing the difference.
//!
//! Sources: the config file (`file`), Kubernetes (`k8s`, from the controller's task),
//! health checks (`health`), routes and neighbours (`nexthops`, from netlink events).
//! Sinks (`crate::sink::Sink`): the maps, the announced routes, the L2 answers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use crate::{
    config::Config,
    dataplane::{ApplySummary, Dataplane},
    health,
    metrics::AgentMetrics,
    model::{self, Desired},
    nexthop::NextHops,
    sink::Sink,
};

mod housekeeping;
mod k8s_change;
mod options;
mod run;

pub use options::{KubernetesOptions, MetricsServing, Options};
pub use run::run;

/// Gives the memory an apply freed back to the system: the next reload then starts
/// from the steady state, not from the last one's high-water mark.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's own.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long the first apply waits for the backends' next hops to resolve before the
/// program is attached, and how long a reload waits for new ones.
const STARTUP_RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const RELOAD_RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the loop keeps between events: each source's last word, and the sinks.
struct Agent {
    dp: Dataplane,
    /// The file source: the last config file that applied, with the command line's
    /// overrides.
    file: Config,
    /// The Kubernetes source: its services as last applied; `None` until the first
    /// sync, and nothing is applied before it (the pinned maps keep the state of the
    /// last agent).
    k8s: Option<Vec<Arc<model::Service>>>,
    /// What the controller last said (its updates are changes to this), applied or not.
    k8s_word: Vec<Arc<model::Service>>,
    /// The Kubernetes services in `desired` (those the file and the room left in), by
    /// name, as their source gave them: a change is applied against these.
    k8s_admitted: BTreeMap<String, Arc<model::Service>>,
    kubernetes: bool,
    /// What the sinks were last given: the file's and Kubernetes' services merged, with
    /// the facts resolved; None before the first apply. (The merge before resolving is
    /// made again when a fact changes: a second copy of 100,000 backends, kept, was
    /// the agent's largest use of memory.)
    desired: Option<Desired>,
    /// The health source: the health of checked backends, and the probes.
    health: BTreeMap<health::BackendKey, bool>,
    checker: Option<health::Checker>,
    health_tx: UnboundedSender<health::Transition>,
    /// The routes source: each backend's path, followed by netlink events.
    nexthops: NextHops,
    metrics: AgentMetrics,
    snat_overrides: (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>),
    max_config_bytes: u64,
    /// --decap, added to every config.
    decap: bool,
    /// The route sink (announce.rs), when announcing is configured.
    routes: Option<crate::announce::RouteSink>,
    /// The L2 sink (l2.rs): ARP/NDP answers on these interfaces.
    l2: Option<crate::l2::L2Sink>,
    /// In Kubernetes: Events on the Services whose VIPs this node announces.
    events: Option<crate::k8s::sink::AnnounceEvents>,
    /// The file as last adopted, to the Kubernetes controller (None without it).
    file_tx: Option<tokio::sync::watch::Sender<Desired>>,
    /// The drain switch as last seen, to log its changes.
    drained: bool,
    housekeeping: housekeeping::State,
}

impl Agent {
    /// The config file's settings with the command line's on top.
    /// The file was validated as it was loaded; with a SNAT address of the command
    /// line's, it is checked again (a VIP may not be that address).
    fn with_overrides(&self, mut cfg: Config) -> Result<Config> {
        cfg.decap |= self.decap;
        let (v4, v6) = self.snat_overrides;
        cfg.snat.ipv4 = v4.or(cfg.snat.ipv4);
        cfg.snat.ipv6 = v6.or(cfg.snat.ipv6);
        if v4.is_some() || v6.is_some() {
            cfg.validate()?;
        }
        Ok(cfg)
    }

    /// After a failed apply: the running state made again from the sources' last
    /// words (they change only once an apply succeeds); returns the error.
    fn rebuild_after_failed_apply(&mut self, e: anyhow::Error) -> anyhow::Error {
        self.desired = self
            .merged(&self.file, self.k8s.as_ref())
            .map(|i| self.resolved(i));
        e
    }

    /// The file's services and Kubernetes', if it is time to program anything. The
    /// file wins: a Kubernetes service at one of its VIPs, ports and protocols, or past
    /// the room it leaves in the maps, is left out until the controller, which follows
    /// the file through `file_tx`, sends a list that fits (with Events for what it
    /// leaves out).
    fn merged(&self, file: &Config, k8s: Option<&Vec<Arc<model::Service>>>) -> Option<Desired> {
        if self.kubernetes && k8s.is_none() {
            return None;
        }
        let mut d = file.desired();
        d.services.extend(
            self.admitted(file, k8s.map(Vec::as_slice).unwrap_or_default())
                .into_iter()
                .map(Arc::unwrap_or_clone),
        );
        Some(d)
    }

    /// The Kubernetes services that go beside the file's: not at one of its VIPs,
    /// ports and protocols, nor of one of its names, and within the room it leaves.
    fn admitted(&self, file: &Config, k8s: &[Arc<model::Service>]) -> Vec<Arc<model::Service>> {
        let taken: BTreeSet<_> = file
            .services
            .iter()
            .map(|s| (s.vip, s.port, s.protocol, s.encapsulated))
            .collect();
        let names: BTreeSet<&str> = file.services.iter().map(|s| s.name.as_str()).collect();
        let room = (self.dp.max_services as usize).saturating_sub(file.services.len());
        k8s.iter()
            .filter(|s| !taken.contains(&s.slot()) && !names.contains(s.name.as_str()))
            .take(room)
            .cloned()
            .collect()
    }

    /// Tells the Kubernetes controller the file as it now stands.
    fn publish_file(&self) {
        if let Some(tx) = &self.file_tx {
            let now = self.file.desired();
            tx.send_if_modified(|b| {
                if *b == now {
                    return false;
                }
                *b = now;
                true
            });
        }
    }

    /// The intent with what the sources resolved: each backend's health and route
    /// source, and the VIPs to announce.
    fn resolved(&self, mut d: Desired) -> Desired {
        health::resolve(&mut d.services, &self.health);
        self.nexthops.resolve(&mut d.services);
        d.announce = if self.drained {
            BTreeSet::new()
        } else {
            d.servable_vips()
        };
        d
    }

    /// Makes `file` and `k8s` the running state: check the merge, resolve the routes of
    /// new backends, apply it to every sink, then (re)start its health checks, keeping
    /// the health of backends already checked. On error nothing changes.
    async fn adopt(
        &mut self,
        file: Config,
        k8s: Option<Vec<Arc<model::Service>>>,
    ) -> Result<Option<ApplySummary>> {
        // Before the maps: a new backend's SNAT source and resolved next hop must be
        // there for its first packet; at start they get longer to resolve.
        let wait = if self.desired.is_none() {
            STARTUP_RESOLVE_WAIT
        } else {
            RELOAD_RESOLVE_WAIT
        };
        // The running state is let go before the new one is made: the two at once were
        // the peak of a reload (two copies of 100,000 backends). On an error it is made
        // again from the sources' last words, which change only once this succeeds.
        let running = self.desired.take().is_some();
        match self.adopt_checked(file, k8s, wait).await {
            Err(e) if running && self.desired.is_none() => Err(self.rebuild_after_failed_apply(e)),
            other => other,
        }
    }

    async fn adopt_checked(
        &mut self,
        file: Config,
        k8s: Option<Vec<Arc<model::Service>>>,
        wait: std::time::Duration,
    ) -> Result<Option<ApplySummary>> {
        let Some(intent) = self.merged(&file, k8s.as_ref()) else {
            // Waiting for Kubernetes: settings an upgrade emptied are written from the
            // file now, before the program is attached (see Dataplane::seed_config).
            if self.dp.seed_config(&file.settings())? {
                info!("datapath settings written ahead of the first Kubernetes sync: the pinned ones were empty");
            }
            self.file = file;
            self.publish_file();
            return Ok(None);
        };
        // The file's services were checked as it loaded, and each of Kubernetes' on its
        // own; together, once there are both.
        if k8s.as_ref().is_some_and(|k| !k.is_empty()) {
            model::validate::services(&intent.services, &intent.settings.snat.addresses())?;
        }
        intent.check_capacity(self.dp.max_services, self.dp.max_backends)?;
        // Only new backends' routes are looked up.
        let targets: BTreeSet<IpAddr> = intent
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.target()))
            .collect();
        let t = std::time::Instant::now();
        self.nexthops.track(&targets, wait).await;
        debug!(
            backends = targets.len(),
            ms = t.elapsed().as_millis() as u64,
            "routes of new backends looked up"
        );
        // The checked services as their sources gave them: resolving takes an unhealthy
        // backend out, and its probe must go on.
        let checked: Vec<model::Service> = intent
            .services
            .iter()
            .filter(|s| s.health_check.is_some())
            .cloned()
            .collect();
        let desired = self.resolved(intent);
        let t = std::time::Instant::now();
        // On an error `adopt` makes the running state again (this one is dropped first).
        let summary = self.apply_maps(&desired)?;
        debug!(ms = t.elapsed().as_millis() as u64, "maps applied");
        self.desired = Some(desired);
        // Only once the new state is applied: a rejected one leaves the running
        // backends' routes followed and their health known.
        self.nexthops.forget(&targets).await;
        let keys: BTreeSet<health::BackendKey> = checked
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (s.name.clone(), b.address)))
            .collect();
        self.health.retain(|k, _| keys.contains(k));
        self.checker = Some(health::start(
            &checked,
            &self.health,
            self.health_tx.clone(),
        ));
        self.k8s_admitted = self
            .admitted(&file, k8s.as_deref().unwrap_or_default())
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        self.file = file;
        self.publish_file();
        self.k8s = k8s;
        self.metrics.applied(true);
        trim_heap();
        Ok(Some(summary))
    }

    /// The maps sink, timed. A removed backend's id is not given out again before a
    /// conntrack sweep has deleted its flows (the next one, within gc_interval); when
    /// no other id is free, the sweep is made now and the apply tried again.
    fn apply_maps(&mut self, desired: &Desired) -> Result<ApplySummary> {
        let started = std::time::Instant::now();
        let summary = match self.dp.apply(desired) {
            Err(e)
                if self.dp.freed_backends() > 0
                    && format!("{e:#}").contains("no free backend id") =>
            {
                crate::conntrack::sweep(&mut self.dp, &desired.settings.timeouts)?;
                self.dp.apply(desired)?
            }
            Err(e) => {
                // What the maps hold is read back at the next apply, without the ids
                // waiting for a sweep: their flows go now.
                if let Err(e) = crate::conntrack::sweep(&mut self.dp, &desired.settings.timeouts) {
                    warn!("conntrack sweep after a failed apply failed: {e:#}");
                }
                return Err(e);
            }
            Ok(s) => s,
        };
        self.metrics
            .map_update_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(summary)
    }

    /// A source of facts changed (health, routes): the intent resolved again, to the
    /// maps, then announced. `applied` and `failed` are the log's words for it.
    async fn reconcile(&mut self, applied: &str, failed: &str) {
        if self.desired.is_none() {
            return;
        }
        let Some(intent) = self.merged(&self.file, self.k8s.as_ref()) else {
            return;
        };
        let desired = self.resolved(intent);
        match self.apply_maps(&desired) {
            Ok(summary) => {
                info!(?summary, "{applied}");
                self.desired = Some(desired);
            }
            Err(e) => error!("{failed}: {e:#}"),
        }
        self.announce().await;
    }

    /// Applies the config file again. A file that does not load or validate is
    /// rejected whole and the running state stays exactly as it was.
    async fn reload(&mut self, path: Option<&std::path::Path>) {
        let Some(path) = path else {
            warn!("SIGHUP: no --config to reload");
            return;
        };
        let loaded = Config::load_limited(path, self.max_config_bytes)
            .and_then(|cfg| self.with_overrides(cfg));
        let had = self.file.services.len();
        let adopted = match loaded {
            Ok(file) => self.adopt(file, self.k8s.clone()).await,
            Err(e) => Err(e),
        };
        match adopted {
            Ok(summary) => {
                if had > 0 && self.file.services.is_empty() {
                    warn!(
                        removed = had,
                        "the config file now has no services: every service it had is removed"
                    );
                }
                match summary {
                    Some(summary) => info!(?summary, "config reloaded"),
                    None => info!("config reloaded (applied with the first Kubernetes sync)"),
                }
            }
            Err(e) => {
                self.metrics.applied(false);
                error!("config reload rejected, keeping the running state: {e:#}");
            }
        }
    }

    async fn kubernetes_changed(&mut self, update: crate::k8s::controller::Update) {
        let n = update.order.len();
        self.k8s_word = update.services(&self.k8s_word);
        let adopted = if self.k8s.is_some() && self.desired.is_some() {
            self.adopt_k8s_change().await
        } else {
            self.adopt(self.file.clone(), Some(self.k8s_word.clone()))
                .await
        };
        match adopted {
            Ok(summary) => info!(?summary, services = n, "Kubernetes services applied"),
            Err(e) => {
                self.metrics.applied(false);
                error!("Kubernetes services rejected, keeping the running state: {e:#}");
            }
        }
    }

    /// The announcing sinks' pass: the VIPs that can take new flows now, unless
    /// drained. Runs after every change and once a second.
    async fn announce(&mut self) {
        if self.routes.is_none() && self.l2.is_none() {
            return;
        }
        let drained = crate::announce::is_drained(&self.dp.pin_path);
        if drained != self.drained {
            self.drained = drained;
            if drained {
                info!("drained: withdrawing every VIP; established flows keep being forwarded");
            } else {
                info!("undrained: announcing again");
            }
        }
        if let Some(d) = self.desired.as_mut() {
            d.announce = if drained {
                BTreeSet::new()
            } else {
                d.servable_vips()
            };
        }
        let empty = Desired::default();
        let desired = self.desired.as_ref().unwrap_or(&empty);
        let mut changes = Vec::new();
        if let Some(l2) = self.l2.as_mut() {
            if let Ok((taken, given_up)) = l2.apply(desired).await {
                changes.extend(taken.into_iter().map(|v| (v, true, "on L2 (ARP/NDP)")));
                changes.extend(given_up.into_iter().map(|v| (v, false, "on L2 (ARP/NDP)")));
            }
        }
        if let Some(sink) = self.routes.as_mut() {
            if let Ok((added, removed)) = sink.apply(desired).await {
                if !added.is_empty() || !removed.is_empty() {
                    self.record_announced();
                }
                changes.extend(added.into_iter().map(|v| (v, true, "as a route for BGP")));
                changes.extend(
                    removed
                        .into_iter()
                        .map(|v| (v, false, "as a route for BGP")),
                );
            }
        }
        if let Some(events) = &self.events {
            for (vip, up, how) in changes {
                events.announced(desired, vip, up, how);
            }
        }
    }

    fn record_announced(&self) {
        if let Some(sink) = &self.routes {
            if let Err(e) =
                crate::announce::record(&self.dp.pin_path, sink.table(), sink.announced())
            {
                warn!("recording the announced VIPs for status failed: {e:#}");
            }
        }
    }

    async fn health_changed(&mut self, (key, healthy): health::Transition) {
        self.health.insert(key, healthy);
        self.reconcile("health change applied", "applying a health change failed")
            .await;
    }

    /// A route, address, link or neighbour changed: the paths it can affect are looked
    /// up again, and applied if one changed.
    async fn routes_changed(&mut self, event: crate::nexthop::Event) {
        if self.nexthops.changed(&event).await {
            self.reconcile(
                "routes to backends changed: SNAT sources updated",
                "applying changed routes failed",
            )
            .await;
        }
    }
}
