//! `xlb run`: the agent. One reconcile loop: sources (the config file, Kubernetes,
//! health checks, the kernel's routes) give the desired state, and the sinks (the
//! maps, the XDP attachments, the neighbour table) are brought to it.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, error, info, warn};

use crate::{
    cli::RunArgs,
    config::{Config, ServiceConfig},
    dataplane::Dataplane,
    health,
    metrics::AgentMetrics,
    nexthop::NextHops,
    status,
};

/// How often the routes to the backends are looked up again (`snat: auto` and the
/// managed neighbour entries follow address and route changes within this).
const ROUTE_REFRESH_SECS: u32 = 5;
/// How long the first apply waits for the backends' next hops to resolve before the
/// program is attached, and how long a reload waits for new ones.
const STARTUP_RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const RELOAD_RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What `xlb run` keeps between events: the config file's contents (the base), the
/// services Kubernetes wants, the health of checked backends, and the probes.
struct Agent {
    dp: Dataplane,
    /// The last config file that applied, with the command line's overrides.
    base: Config,
    /// In Kubernetes mode: the services from the API; `None` until the first sync, and
    /// nothing is applied before it (the pinned maps keep the state of the last agent).
    k8s: Option<Vec<ServiceConfig>>,
    kubernetes: bool,
    /// What is programmed now: the base's services and then Kubernetes'.
    config: Option<Config>,
    health: BTreeMap<health::BackendKey, bool>,
    checker: Option<health::Checker>,
    health_tx: UnboundedSender<health::Transition>,
    metrics: AgentMetrics,
    snat_overrides: (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>),
    /// Seconds since the last conntrack sweep, and the datapath counters last seen.
    since_sweep: u32,
    last_counters: BTreeMap<&'static str, u64>,
    /// While the datapath's flood guard is on: since when, and its two counters then.
    flood_since: Option<(std::time::Instant, u64, u64)>,
    conntrack_max: u32,
    /// Routes and next hops of the backends: SNAT sources, managed neighbours.
    nexthops: NextHops,
    since_routes: u32,
    max_config_bytes: u64,
    /// --decap, added to every config.
    decap: bool,
    /// The route sink (announce.rs), when announcing is configured.
    routes: Option<crate::announce::RouteSink>,
    /// The L2 sink (l2.rs): ARP/NDP answers on these interfaces.
    l2: Option<crate::l2::L2Sink>,
    /// In Kubernetes: which VIPs this node owns on L2 (a Lease per VIP).
    leases: Option<crate::k8s::lease::VipLeases>,
    /// In Kubernetes: Events on the Services whose VIPs this node announces.
    events: Option<crate::k8s::controller::AnnounceEvents>,
    /// The file as last adopted, to the Kubernetes controller (None without it).
    base_tx: Option<tokio::sync::watch::Sender<Config>>,
    /// The drain switch as last seen, to log its changes.
    drained: bool,
}

impl Agent {
    /// Programs the maps for `cfg` as the health checks see it.
    fn apply(&mut self, cfg: &Config) -> Result<crate::dataplane::ApplySummary> {
        let started = std::time::Instant::now();
        let cfg = self
            .nexthops
            .effective(&health::effective(cfg, &self.health));
        let summary = self.dp.apply(&cfg)?;
        self.metrics
            .map_update_seconds
            .observe(started.elapsed().as_secs_f64());
        if summary.backends_removed > 0 {
            // At once, not at the next sweep: a removed backend's id may be given to a
            // new backend by the next apply, and its old flows must not follow it there.
            if let Err(e) = crate::conntrack::sweep(&mut self.dp, &cfg.timeouts) {
                warn!("conntrack sweep after removing backends failed: {e:#}");
            }
        }
        Ok(summary)
    }

    /// The config file's settings with the command line's SNAT addresses on top.
    fn with_overrides(&self, mut cfg: Config) -> Result<Config> {
        cfg.decap |= self.decap;
        let (v4, v6) = self.snat_overrides;
        cfg.snat.ipv4 = v4.or(cfg.snat.ipv4);
        cfg.snat.ipv6 = v6.or(cfg.snat.ipv6);
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config to program for this base and these Kubernetes services, if it is
    /// time to program anything.
    /// The file's services and Kubernetes'. The file wins: a Kubernetes service at one
    /// of its VIPs, ports and protocols, or past the room it leaves in the maps, is left
    /// out until the controller, which follows the file through `base_tx`, sends a list
    /// that fits (with Events for what it leaves out). Without this a reload that adds
    /// file services would be rejected for the Kubernetes list made before it.
    fn merged(&self, base: &Config, k8s: Option<&Vec<ServiceConfig>>) -> Option<Config> {
        if self.kubernetes && k8s.is_none() {
            return None;
        }
        let mut cfg = base.clone();
        let taken: std::collections::BTreeSet<_> = base
            .services
            .iter()
            .map(crate::k8s::controller::service_slot)
            .collect();
        let names: std::collections::BTreeSet<&String> =
            base.services.iter().map(|s| &s.name).collect();
        let room = (self.dp.max_services as usize).saturating_sub(base.services.len());
        cfg.services.extend(
            k8s.into_iter()
                .flatten()
                .filter(|s| {
                    !taken.contains(&crate::k8s::controller::service_slot(s))
                        && !names.contains(&s.name)
                })
                .take(room)
                .cloned(),
        );
        Some(cfg)
    }

    /// Tells the Kubernetes controller the file as it now stands.
    fn publish_base(&self) {
        if let Some(tx) = &self.base_tx {
            tx.send_if_modified(|b| {
                if *b == self.base {
                    return false;
                }
                *b = self.base.clone();
                true
            });
        }
    }

    /// Makes `base` and `k8s` the running state: validate the merge, apply it, then
    /// (re)start its health checks, keeping the health of backends already checked.
    /// On error nothing changes.
    async fn adopt(
        &mut self,
        base: Config,
        k8s: Option<Vec<ServiceConfig>>,
    ) -> Result<Option<crate::dataplane::ApplySummary>> {
        let Some(cfg) = self.merged(&base, k8s.as_ref()) else {
            // Waiting for Kubernetes: settings an upgrade emptied are written from the
            // file now, before the program is attached (see Dataplane::seed_config).
            if self.dp.seed_config(&base)? {
                info!("datapath settings written ahead of the first Kubernetes sync: the pinned ones were empty");
            }
            self.base = base;
            self.publish_base();
            return Ok(None);
        };
        cfg.validate()?;
        // Before the maps: a new backend's SNAT source and resolved next hop must be
        // there for its first packet.
        let wait = if self.config.is_none() {
            STARTUP_RESOLVE_WAIT
        } else {
            RELOAD_RESOLVE_WAIT
        };
        self.nexthops.refresh(&cfg, wait).await;
        let summary = self.apply(&cfg)?;
        let keys: std::collections::BTreeSet<health::BackendKey> = cfg
            .services
            .iter()
            .filter(|s| s.health_check.is_some())
            .flat_map(|s| s.backends.iter().map(|b| (s.name.clone(), b.address)))
            .collect();
        self.health.retain(|k, _| keys.contains(k));
        self.checker = Some(health::start(&cfg, &self.health, self.health_tx.clone()));
        self.config = Some(cfg);
        self.base = base;
        self.publish_base();
        self.k8s = k8s;
        self.metrics.applied(true);
        Ok(Some(summary))
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
        let adopted = match loaded {
            Ok(base) => self.adopt(base, self.k8s.clone()).await,
            Err(e) => Err(e),
        };
        match adopted {
            Ok(summary) => info!(?summary, "config reloaded"),
            Err(e) => {
                self.metrics.applied(false);
                error!("config reload rejected, keeping the running state: {e:#}");
            }
        }
    }

    async fn kubernetes_changed(&mut self, services: Vec<ServiceConfig>) {
        let n = services.len();
        match self.adopt(self.base.clone(), Some(services)).await {
            Ok(summary) => info!(?summary, services = n, "Kubernetes services applied"),
            Err(e) => {
                self.metrics.applied(false);
                error!("Kubernetes services rejected, keeping the running state: {e:#}");
            }
        }
    }

    /// Once a second: delete replaced Maglev tables, sweep conntrack when due, and say in the log when the datapath
    /// hit a full table since the last look.
    async fn housekeeping(&mut self) {
        self.since_routes += 1;
        if self.since_routes >= ROUTE_REFRESH_SECS {
            self.since_routes = 0;
            if let Some(cfg) = self.config.clone() {
                if self.nexthops.refresh(&cfg, std::time::Duration::ZERO).await {
                    match self.apply(&cfg) {
                        Ok(summary) => {
                            info!(?summary, "routes to backends changed: SNAT sources updated")
                        }
                        Err(e) => error!("applying changed routes failed: {e:#}"),
                    }
                }
            }
        }
        // Replaced Maglev table generations, a second or more after the swap.
        if let Err(e) = self.dp.collect_retired() {
            warn!("deleting replaced Maglev tables failed: {e:#}");
        }
        self.since_sweep += 1;
        let timeouts = self.base.timeouts;
        if self.since_sweep >= timeouts.gc_interval.max(1) {
            self.since_sweep = 0;
            match crate::conntrack::sweep(&mut self.dp, &timeouts) {
                Ok(sweep) => {
                    let swept = &self.metrics.conntrack_swept;
                    for (why, n) in [("expired", sweep.expired), ("orphaned", sweep.orphaned)] {
                        swept
                            .get_or_create(&vec![("why".to_owned(), why.to_owned())])
                            .inc_by(n as u64);
                    }
                    let max = self.conntrack_max as usize;
                    if sweep.remaining * 10 >= max * 9 {
                        warn!(entries = sweep.remaining, max, "conntrack is over 90% full: the least recently used flows are being evicted (they are re-created on their next packet; see xlb_datapath_events_total)");
                    }
                }
                Err(e) => warn!("conntrack sweep failed: {e:#}"),
            }
        }
        let Ok(counters) = status::read_global_counters(&self.dp.pin_path) else {
            return;
        };
        let now: BTreeMap<&'static str, u64> =
            counters.into_iter().map(|(k, c)| (k, c.packets)).collect();
        let delta = |name: &str| {
            now.get(name).copied().unwrap_or(0) - self.last_counters.get(name).copied().unwrap_or(0)
        };
        if !self.last_counters.is_empty() {
            let ports = delta("drop_port_alloc");
            if ports > 0 {
                let s = self.base.snat;
                warn!(dropped = ports, port_min = s.port_min, port_max = s.port_max, "SNAT ports exhausted: new flows to a backend found no free source port and were dropped (drop_port_alloc); widen snat.port_min..port_max or add SNAT addresses");
            }
            let recreated = delta("event_flow_recreated");
            if recreated > 0 {
                warn!(flows = recreated, "TCP flows were re-created mid-stream: their conntrack entries had been evicted (table full) or had expired; ports reclaimed: {}", delta("event_port_reclaimed"));
            }
            let no_backend = delta("drop_no_backend");
            if no_backend > 0 {
                warn!(
                    dropped = no_backend,
                    "new flows to a service without backends were dropped (drop_no_backend)"
                );
            }
            self.log_flood_guard(
                &now,
                delta("event_flood_stateless") + delta("drop_flood_nat"),
            );
        }
        self.last_counters = now;
    }

    /// One line when the flood guard turns on, one when a second passed without it.
    fn log_flood_guard(&mut self, now: &BTreeMap<&'static str, u64>, moved: u64) {
        let get = |name: &str| now.get(name).copied().unwrap_or(0);
        let (stateless, refused) = (get("event_flood_stateless"), get("drop_flood_nat"));
        let limit = self.base.flood_guard.new_flows_per_cpu;
        match (self.flood_since, moved > 0) {
            (None, true) => {
                warn!(limit, "flood guard on: more than {limit} new flows per second on a CPU; dsr and dnat flows are forwarded without conntrack entries (event_flood_stateless), nat flows without an entry are dropped (drop_flood_nat); established flows are unaffected");
                let before = |name: &str| self.last_counters.get(name).copied().unwrap_or(0);
                self.flood_since = Some((
                    std::time::Instant::now(),
                    before("event_flood_stateless"),
                    before("drop_flood_nat"),
                ));
            }
            (Some((since, s0, r0)), false) => {
                info!(
                    seconds = since.elapsed().as_secs(),
                    forwarded_without_state = stateless - s0,
                    nat_dropped = refused - r0,
                    "flood guard off: new flows are below the limit again"
                );
                self.flood_since = None;
            }
            _ => {}
        }
    }

    /// The route sink's pass: the VIPs that can take new flows now, unless drained.
    /// Runs after every change and once a second.
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
        let want = match (&self.config, drained) {
            (Some(cfg), false) => {
                crate::announce::servable_vips(&health::effective(cfg, &self.health))
            }
            _ => Default::default(),
        };
        let mut changes = Vec::new();
        if let Some(l2) = self.l2.as_mut() {
            let owned = match self.leases.as_mut() {
                Some(leases) => leases.update(&want).await,
                None => want.clone(),
            };
            let (taken, given_up) = l2.apply(&mut self.dp, &owned);
            changes.extend(taken.into_iter().map(|v| (v, true, "on L2 (ARP/NDP)")));
            changes.extend(given_up.into_iter().map(|v| (v, false, "on L2 (ARP/NDP)")));
        }
        if let Some(sink) = self.routes.as_mut() {
            let (added, removed) = sink.apply(&want).await;
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
        if let (Some(events), Some(cfg)) = (&self.events, &self.config) {
            for (vip, up, how) in changes {
                events.announced(cfg, vip, up, how).await;
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

    fn health_changed(&mut self, (key, healthy): health::Transition) {
        self.health.insert(key, healthy);
        if let Some(cfg) = self.config.clone() {
            match self.apply(&cfg) {
                Ok(summary) => info!(?summary, "health change applied"),
                Err(e) => error!("applying a health change failed: {e:#}"),
            }
        }
    }
}

/// The signal that came during start-up, if one did (SIGTERM or SIGINT).
fn stop_requested(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Option<&'static str> {
    use futures::FutureExt;
    if term.recv().now_or_never().is_some() {
        Some("SIGTERM")
    } else if int.recv().now_or_never().is_some() {
        Some("SIGINT")
    } else {
        None
    }
}

/// Ends a start that a signal interrupted, before anything was attached: the maps this
/// start created are unpinned (no datapath used them); an earlier agent's, adopted, are
/// left as they were, still forwarding through its pinned links.
fn stop_during_start(
    sig: &str,
    dp: Dataplane,
    pin_path: &std::path::Path,
    adopting: bool,
) -> Result<()> {
    drop(dp);
    if adopting {
        warn!(
            signal = sig,
            "stopped during start-up, before attaching: the pinned datapath found there is left as it was"
        );
        return Ok(());
    }
    let removed = crate::dataplane::detach_all(pin_path)
        .with_context(|| format!("{sig} during start-up: removing the pins this start made"))?;
    warn!(
        signal = sig,
        pins = removed.len(),
        "stopped during start-up, before attaching: the maps this start pinned are removed"
    );
    Ok(())
}

pub async fn run(args: RunArgs) -> Result<()> {
    // First of all: a SIGTERM or SIGINT during start-up must not end the process by its
    // default action, halfway, with maps pinned and nothing said (stop_during_start).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Everything that can be checked is checked before anything is touched: a failed
    // start leaves no maps pinned and no config written.
    let max_bytes = args.max_config_bytes;
    let file = args
        .config
        .as_deref()
        .map(|p| Config::load_limited(p, max_bytes))
        .transpose()?;
    for iface in &args.ifaces {
        check_interface(iface)?;
    }
    crate::privileges::check()?;
    let client = if args.kubernetes {
        Some(
            kube::Client::try_default()
                .await
                .context("connecting to Kubernetes (no in-cluster config, and KUBECONFIG or ~/.kube/config gave none that works)")?,
        )
    } else {
        None
    };
    // Announcing: the flags win over the file. Checked before anything is touched.
    let l2_ifaces = if args.announce_l2.is_empty() {
        file.as_ref()
            .and_then(|f| f.announce.l2.as_ref())
            .map(|l| l.interfaces.clone())
            .unwrap_or_default()
    } else {
        args.announce_l2.clone()
    };
    for iface in &l2_ifaces {
        if !args.ifaces.contains(iface) {
            anyhow::bail!("--announce-l2 {iface}: xlb is not attached there (add it to --iface): the answers come from the XDP program");
        }
    }
    let table = args.announce_routes_table.or_else(|| {
        file.as_ref()
            .and_then(|f| f.announce.routes.map(|r| r.table))
    });
    let routes = match table {
        Some(t) => Some(crate::announce::RouteSink::new(t).await?),
        None => None,
    };
    let log_level = crate::ebpf_log::level_from_filter();
    let load = crate::dataplane::LoadOptions {
        log_level,
        conntrack_max: args.conntrack_max,
        max_services: args.max_services,
        max_backends: args.max_backends,
        fragments_max: args.fragments_max,
    };
    // Pins already there are an earlier agent's running datapath: a start that stops
    // early leaves them as they are.
    let adopting = args.pin_path.join(lb_common::MAP_SERVICES).exists();
    let mut dp = Dataplane::load(&args.pin_path, &load)?;
    if let Some(sig) = stop_requested(&mut term, &mut int) {
        return stop_during_start(sig, dp, &args.pin_path, adopting);
    }
    if crate::ebpf_log::spawn(&mut dp.ebpf, log_level)?.is_some() {
        info!(
            level = log_level,
            "forwarding the XDP program's logs to target xlb::ebpf"
        );
    }
    let metrics = AgentMetrics::default();
    match args.metrics_addr {
        // Asked for: failing to serve it is an error.
        Some(crate::cli::MetricsAddr(Some(addr))) => {
            crate::metrics::serve(addr, args.pin_path.clone(), metrics.clone()).await?;
            info!(%addr, "serving /metrics, /healthz, /readyz");
        }
        Some(crate::cli::MetricsAddr(None)) => info!("metrics off"),
        // The default: the port may be another agent's (one per namespace), so a
        // failure is only worth a warning.
        None => {
            let addr = crate::cli::DEFAULT_METRICS_ADDR
                .parse()
                .expect("a valid address");
            match crate::metrics::serve(addr, args.pin_path.clone(), metrics.clone()).await {
                Ok(()) => info!(%addr, "serving /metrics, /healthz, /readyz"),
                Err(e) => warn!("not serving metrics at the default {addr}: {e:#}"),
            }
        }
    }
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    let nexthops = NextHops::new()?;
    let mut neighbour_requests = spawn_neighbour_requests(&mut dp)?;
    let mut agent = Agent {
        dp,
        base: Config::default(),
        k8s: None,
        kubernetes: args.kubernetes,
        config: None,
        health: BTreeMap::new(),
        checker: None,
        health_tx,
        metrics,
        snat_overrides: (args.snat_ipv4, args.snat_ipv6),
        since_sweep: 0,
        last_counters: BTreeMap::new(),
        flood_since: None,
        conntrack_max: args.conntrack_max,
        nexthops,
        since_routes: 0,
        max_config_bytes: max_bytes,
        decap: args.decap,
        routes,
        l2: None,
        leases: None,
        events: None,
        base_tx: None,
        drained: false,
    };
    let base = agent.with_overrides(file.unwrap_or_default())?;
    let services = base.services.len();
    if let Some(summary) = agent.adopt(base, None).await? {
        info!(?summary, services, "config applied");
    }
    // Applying waits for the backends' neighbours (up to 5 s): the likeliest moment
    // for a signal to come, and the last before anything is attached.
    if let Some(sig) = stop_requested(&mut term, &mut int) {
        return stop_during_start(sig, agent.dp, &args.pin_path, adopting);
    }
    let lease_client = client.clone();
    if let Some(c) = &client {
        agent.events = Some(crate::k8s::controller::AnnounceEvents::new(
            c.clone(),
            args.node_name.clone(),
        ));
    }
    let mut k8s_rx = if args.kubernetes {
        let client = client.expect("made above when --kubernetes is given");
        let opts = crate::k8s::translate::Options {
            class: args.served.lb_class.clone(),
            default_class: args.served.default_class,
            node_name: args.node_name.clone(),
            pools: args.ipam_pool.clone(),
            cluster_forwarding: args.cluster_forwarding,
        };
        info!(class = %opts.class, default_class = opts.default_class, node = ?opts.node_name,
              pools = ?opts.pools, "watching Kubernetes Services and EndpointSlices");
        let (base_tx, base_rx) = tokio::sync::watch::channel(agent.base.clone());
        agent.base_tx = Some(base_tx);
        Some(crate::k8s::controller::spawn(
            client,
            opts,
            base_rx,
            agent.dp.max_services as usize,
        ))
    } else {
        None
    };
    for iface in &args.ifaces {
        agent.dp.attach(iface, args.xdp_mode)?;
    }
    if !l2_ifaces.is_empty() {
        agent.l2 = Some(crate::l2::L2Sink::new(&l2_ifaces, &args.ifaces)?);
        if let Some(client) = lease_client {
            let me = args
                .node_name
                .clone()
                .context("--announce-l2 with --kubernetes needs --node-name (the Lease holder)")?;
            agent.leases = Some(crate::k8s::lease::VipLeases::new(
                client,
                &args.served.lease_namespace,
                &me,
            ));
        }
    }
    // A restart announces again, whatever an earlier `xlb drain` said.
    if agent.routes.is_some() || agent.l2.is_some() {
        crate::announce::set_drained(&args.pin_path, false)?;
        agent.record_announced();
        agent.announce().await;
    }
    let mut hup = signal(SignalKind::hangup())?;
    agent
        .metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(pin_path = %args.pin_path.display(), "xlb running");
    // The config file is watched by content, once a second: robust to editors that
    // replace the file, and a file being written is retried until it validates. Read
    // as SIGHUP reads it: bounded, regular files only, never blocking; a path that
    // cannot be read so is rejected, and said once per distinct problem.
    let read = |p: &std::path::Path| crate::config::read_limited(p, max_bytes);
    let mut last_seen = args.config.as_deref().and_then(|p| read(p).ok());
    let mut last_problem: Option<String> = None;
    let mut watch = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut housekeeping = tokio::time::interval(std::time::Duration::from_secs(1));
    let detach = loop {
        // Once per turn (at least once a second: housekeeping): /healthz fails when the
        // loop stops turning.
        agent.metrics.heartbeat.beat();
        tokio::select! {
            _ = term.recv() => break args.detach_on_exit,
            _ = int.recv() => break true,
            _ = hup.recv() => {
                agent.reload(args.config.as_deref()).await;
                agent.announce().await;
            }
            Some(req) = neighbour_requests.recv() => {
                debug!(addr = %req.1, ifindex = req.0, "the datapath found a next hop unresolved");
                agent.nexthops.request(req.0, req.1).await;
            }
            Some(change) = health_rx.recv() => {
                agent.health_changed(change);
                agent.announce().await;
            }
            _ = housekeeping.tick() => {
                agent.housekeeping().await;
                agent.announce().await;
            }
            Some(services) = async { k8s_rx.as_mut()?.recv().await } => {
                agent.kubernetes_changed(services).await;
                agent.announce().await;
            }
            _ = watch.tick(), if args.config.is_some() => {
                match args.config.as_deref().map(read) {
                    None => {}
                    Some(Ok(now)) => {
                        last_problem = None;
                        if last_seen.as_ref() != Some(&now) {
                            info!("config file changed");
                            last_seen = Some(now);
                            agent.reload(args.config.as_deref()).await;
                            agent.announce().await;
                        }
                    }
                    Some(Err(e)) => {
                        let problem = format!("{e:#}");
                        if last_problem.as_ref() != Some(&problem) {
                            agent.metrics.applied(false);
                            error!("config file rejected, keeping the running state: {problem}");
                            last_problem = Some(problem);
                        }
                    }
                }
            }
        }
    };
    agent.checker = None;
    if detach {
        // Withdrawn first: nothing may send traffic here once the program is gone.
        if let Some(sink) = agent.routes.as_mut() {
            sink.apply(&Default::default()).await;
            agent.record_announced();
        }
        if let Some(l2) = agent.l2.as_mut() {
            l2.clear(&mut agent.dp);
        }
        if let Some(leases) = agent.leases.as_mut() {
            leases.release_all().await;
        }
        agent.dp.detach()?;
        // And the maps, as `xlb detach` does: with no program left they serve no packet,
        // and the conntrack table alone holds ~100 bytes per flow of kernel memory
        // (94 MB at the defaults) until someone removes it.
        match crate::dataplane::detach_all(&args.pin_path) {
            Ok(removed) => info!(
                pin_path = %args.pin_path.display(),
                pins = removed.len(),
                "detached, and removed xlb's pins"
            ),
            Err(e) => warn!(
                pin_path = %args.pin_path.display(),
                "detached, but the maps stay pinned ({e:#}); `xlb detach --pin-path {}` removes them",
                args.pin_path.display()
            ),
        }
    } else {
        let pinned = agent
            .dp
            .attached
            .iter()
            .all(|(iface, _)| args.pin_path.join(format!("link_{iface}")).exists());
        if agent.dp.private_pins {
            warn!(pin_path = %args.pin_path.display(), "exiting; the pins live in this process's own mount namespace, so the datapath ends with it");
        } else if !pinned {
            warn!(pin_path = %args.pin_path.display(), "exiting; some attachments are no longer pinned (removed by hand?): those interfaces are detached when this process exits");
        } else {
            info!(pin_path = %args.pin_path.display(), "exiting; the datapath stays attached and pinned for the next agent (xlb detach removes it)");
        }
    }
    Ok(())
}

/// Reads the datapath's requests to resolve a next hop (XLB_NEIGH_REQ) on a task of its
/// own, and hands them on as (ifindex, address), at most once a second per next hop.
fn spawn_neighbour_requests(
    dp: &mut Dataplane,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<(u32, std::net::IpAddr)>> {
    use aya::maps::RingBuf;
    use lb_common::NeighbourRequest;
    let map = dp
        .ebpf
        .take_map(lb_common::MAP_NEIGHBOUR_REQUESTS)
        .context("the neighbour request ring is missing from the program")?;
    let ring = RingBuf::try_from(map)?;
    // SAFETY: the ring owns its map's file descriptor, which stays open and the same
    // for as long as the ring (moved into the AsyncFd) lives.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("polling the neighbour request ring: {e}"))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut last: BTreeMap<(u32, std::net::IpAddr), std::time::Instant> = BTreeMap::new();
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<NeighbourRequest>() {
                    continue;
                }
                // SAFETY: the datapath writes exactly one NeighbourRequest per record
                // (length checked); read_unaligned makes no alignment assumption.
                let req: NeighbourRequest =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let addr = crate::dataplane::words_to_addr(&req.addr, req.family);
                let now = std::time::Instant::now();
                let key = (req.ifindex, addr);
                if last
                    .get(&key)
                    .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(1))
                {
                    continue;
                }
                last.insert(key, now);
                if last.len() > 4096 {
                    last.retain(|_, t| now.duration_since(*t) < std::time::Duration::from_secs(1));
                }
                if tx.send(key).is_err() {
                    return;
                }
            }
            guard.clear_ready();
        }
    });
    Ok(rx)
}

/// An interface name that exists in this network namespace.
fn check_interface(iface: &str) -> Result<()> {
    if iface.is_empty() {
        anyhow::bail!("--iface: an empty interface name");
    }
    if iface.len() >= libc::IFNAMSIZ {
        anyhow::bail!("--iface {iface:?}: longer than an interface name can be (15 bytes)");
    }
    let name = std::ffi::CString::new(iface).context("--iface: a NUL byte in the name")?;
    // SAFETY: if_nametoindex reads a valid C string.
    if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
        anyhow::bail!(
            "--iface {iface}: no such interface in this network namespace (`ip link` lists them; one in another namespace cannot be attached from here)"
        );
    }
    Ok(())
}
