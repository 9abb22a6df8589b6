use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use xlb::{
    cli::{Cli, Command, MaglevArgs, RunArgs, StatusArgs},
    config::{Config, ServiceConfig},
    dataplane::Dataplane,
    health, maglev,
    metrics::AgentMetrics,
    status,
};

fn main() -> std::process::ExitCode {
    // Errors are for people: one line per cause, no backtrace.
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Status(args) => status_cmd(args),
        Command::Maglev(args) => maglev_cmd(args),
        Command::Detach(args) => {
            for name in xlb::dataplane::detach_all(&args.pin_path)? {
                println!("removed {name}");
            }
            Ok(())
        }
        Command::CheckConfig(args) => {
            let cfg = xlb::config::Config::load(&args.file)?;
            cfg.check_capacity(args.max_services, args.max_backends)
                .with_context(|| format!("{}: does not fit the maps", args.file.display()))?;
            let backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: ok ({} services, {backends} backends)",
                args.file.display(),
                cfg.services.len()
            );
            Ok(())
        }
    }
}

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
    conntrack_max: u32,
}

impl Agent {
    /// Programs the maps for `cfg` as the health checks see it.
    fn apply(&mut self, cfg: &Config) -> Result<xlb::dataplane::ApplySummary> {
        let started = std::time::Instant::now();
        let summary = self.dp.apply(&health::effective(cfg, &self.health))?;
        self.metrics
            .map_update_seconds
            .observe(started.elapsed().as_secs_f64());
        if summary.backends_removed > 0 {
            // At once, not at the next sweep: a removed backend's id may be given to a
            // new backend by the next apply, and its old flows must not follow it there.
            if let Err(e) = xlb::conntrack::sweep(&mut self.dp, &cfg.timeouts) {
                warn!("conntrack sweep after removing backends failed: {e:#}");
            }
        }
        Ok(summary)
    }

    /// The config file's settings with the command line's SNAT addresses on top.
    fn with_overrides(&self, mut cfg: Config) -> Result<Config> {
        let (v4, v6) = self.snat_overrides;
        cfg.snat.ipv4 = v4.or(cfg.snat.ipv4);
        cfg.snat.ipv6 = v6.or(cfg.snat.ipv6);
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config to program for this base and these Kubernetes services, if it is
    /// time to program anything.
    fn merged(&self, base: &Config, k8s: Option<&Vec<ServiceConfig>>) -> Option<Config> {
        if self.kubernetes && k8s.is_none() {
            return None;
        }
        let mut cfg = base.clone();
        cfg.services.extend(k8s.into_iter().flatten().cloned());
        Some(cfg)
    }

    /// Makes `base` and `k8s` the running state: validate the merge, apply it, then
    /// (re)start its health checks, keeping the health of backends already checked.
    /// On error nothing changes.
    fn adopt(
        &mut self,
        base: Config,
        k8s: Option<Vec<ServiceConfig>>,
    ) -> Result<Option<xlb::dataplane::ApplySummary>> {
        let Some(cfg) = self.merged(&base, k8s.as_ref()) else {
            self.base = base;
            return Ok(None);
        };
        cfg.validate()?;
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
        self.k8s = k8s;
        self.metrics.applied(true);
        Ok(Some(summary))
    }

    /// Applies the config file again. A file that does not load or validate is
    /// rejected whole and the running state stays exactly as it was.
    fn reload(&mut self, path: Option<&std::path::Path>) {
        let Some(path) = path else {
            warn!("SIGHUP: no --config to reload");
            return;
        };
        let loaded = Config::load(path).and_then(|cfg| self.with_overrides(cfg));
        match loaded.and_then(|base| self.adopt(base, self.k8s.clone())) {
            Ok(summary) => info!(?summary, "config reloaded"),
            Err(e) => {
                self.metrics.applied(false);
                error!("config reload rejected, keeping the running state: {e:#}");
            }
        }
    }

    fn kubernetes_changed(&mut self, services: Vec<ServiceConfig>) {
        let n = services.len();
        match self.adopt(self.base.clone(), Some(services)) {
            Ok(summary) => info!(?summary, services = n, "Kubernetes services applied"),
            Err(e) => {
                self.metrics.applied(false);
                error!("Kubernetes services rejected, keeping the running state: {e:#}");
            }
        }
    }

    /// Once a second: delete replaced Maglev tables, sweep conntrack when due, and say in the log when the datapath
    /// hit a full table since the last look.
    fn housekeeping(&mut self) {
        // Replaced Maglev table generations, a second or more after the swap.
        if let Err(e) = self.dp.collect_retired() {
            warn!("deleting replaced Maglev tables failed: {e:#}");
        }
        self.since_sweep += 1;
        let timeouts = self.base.timeouts;
        if self.since_sweep >= timeouts.gc_interval.max(1) {
            self.since_sweep = 0;
            match xlb::conntrack::sweep(&mut self.dp, &timeouts) {
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
        }
        self.last_counters = now;
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

async fn run(args: RunArgs) -> Result<()> {
    // A bad file stops us before anything is touched.
    let file = args.config.as_deref().map(Config::load).transpose()?;
    let log_level = xlb::ebpf_log::level_from_filter();
    let load = xlb::dataplane::LoadOptions {
        log_level,
        conntrack_max: args.conntrack_max,
        max_services: args.max_services,
        max_backends: args.max_backends,
    };
    let mut dp = Dataplane::load(&args.pin_path, &load)?;
    if xlb::ebpf_log::spawn(&mut dp.ebpf, log_level)?.is_some() {
        info!(
            level = log_level,
            "forwarding the XDP program's logs to target xlb::ebpf"
        );
    }
    let metrics = AgentMetrics::default();
    match args.metrics_addr {
        // Asked for: failing to serve it is an error.
        Some(xlb::cli::MetricsAddr(Some(addr))) => {
            xlb::metrics::serve(addr, args.pin_path.clone(), metrics.clone()).await?;
            info!(%addr, "serving /metrics, /healthz, /readyz");
        }
        Some(xlb::cli::MetricsAddr(None)) => info!("metrics off"),
        // The default: the port may be another agent's (one per namespace), so a
        // failure is only worth a warning.
        None => {
            let addr = xlb::cli::DEFAULT_METRICS_ADDR
                .parse()
                .expect("a valid address");
            match xlb::metrics::serve(addr, args.pin_path.clone(), metrics.clone()).await {
                Ok(()) => info!(%addr, "serving /metrics, /healthz, /readyz"),
                Err(e) => warn!("not serving metrics at the default {addr}: {e:#}"),
            }
        }
    }
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
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
        conntrack_max: args.conntrack_max,
    };
    let base = agent.with_overrides(file.unwrap_or_default())?;
    let services = base.services.len();
    if let Some(summary) = agent.adopt(base, None)? {
        info!(?summary, services, "config applied");
    }
    let mut k8s_rx = if args.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
        let opts = xlb::k8s::translate::Options {
            class: args.lb_class.clone(),
            default_class: args.default_class,
            node_name: args.node_name.clone(),
            pools: args.ipam_pool.clone(),
        };
        info!(class = %opts.class, default_class = opts.default_class, node = ?opts.node_name,
              pools = ?opts.pools, "watching Kubernetes Services and EndpointSlices");
        Some(xlb::k8s::controller::spawn(
            client,
            opts,
            agent.base.clone(),
            agent.dp.max_services as usize,
        ))
    } else {
        None
    };
    for iface in &args.ifaces {
        agent.dp.attach(iface, args.xdp_mode)?;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    agent
        .metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(pin_path = %args.pin_path.display(), "xlb running");
    // The config file is watched by content, once a second: robust to editors that
    // replace the file, and a file being written is retried until it validates.
    let read = |p: &std::path::Path| std::fs::read(p).ok();
    let mut last_seen = args.config.as_deref().and_then(read);
    let mut watch = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut housekeeping = tokio::time::interval(std::time::Duration::from_secs(1));
    let detach = loop {
        tokio::select! {
            _ = term.recv() => break args.detach_on_exit,
            _ = int.recv() => break true,
            _ = hup.recv() => agent.reload(args.config.as_deref()),
            Some(change) = health_rx.recv() => agent.health_changed(change),
            _ = housekeeping.tick() => agent.housekeeping(),
            Some(services) = async { k8s_rx.as_mut()?.recv().await } => {
                agent.kubernetes_changed(services)
            }
            _ = watch.tick(), if args.config.is_some() => {
                let now = args.config.as_deref().and_then(read);
                if now.is_some() && now != last_seen {
                    info!("config file changed");
                    last_seen = now;
                    agent.reload(args.config.as_deref());
                }
            }
        }
    };
    agent.checker = None;
    if detach {
        agent.dp.detach()?;
        info!("detached");
    } else {
        info!(pin_path = %args.pin_path.display(), "exiting; the datapath stays attached and pinned for the next agent (xlb detach removes it)");
    }
    Ok(())
}

fn status_cmd(args: StatusArgs) -> Result<()> {
    let st = status::read(&args.pin_path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", status::render_text(&st));
    }
    Ok(())
}

fn maglev_cmd(args: MaglevArgs) -> Result<()> {
    let table = maglev::build(&args.backends, args.table_size)?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Backend {
            address: String,
            weight: u32,
        }
        #[derive(serde::Serialize)]
        struct Out {
            table_size: u32,
            backends: Vec<Backend>,
            table: Vec<u32>,
        }
        let backends = args
            .backends
            .iter()
            .map(|b| Backend {
                address: b.addr.to_string(),
                weight: b.weight,
            })
            .collect();
        let out = Out {
            table_size: args.table_size,
            backends,
            table,
        };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let counts = maglev::slot_counts(&table, args.backends.len());
    let active: Vec<_> = counts
        .iter()
        .zip(&args.backends)
        .filter(|(_, b)| b.weight > 0)
        .collect();
    let total_weight: u64 = active.iter().map(|(_, b)| b.weight as u64).sum();
    println!(
        "Maglev table: M={} slots, {} backends ({} active)",
        args.table_size,
        args.backends.len(),
        active.len()
    );
    println!(
        "{:<44} {:>6} {:>8} {:>8} {:>9}",
        "backend", "weight", "slots", "share", "vs ideal"
    );
    let mut worst: f64 = 0.0;
    for (b, &c) in args.backends.iter().zip(&counts) {
        let share = c as f64 / args.table_size as f64;
        let ideal = b.weight as f64 / total_weight as f64;
        let ratio = if ideal > 0.0 { share / ideal } else { 0.0 };
        worst = worst.max(ratio);
        println!(
            "{:<44} {:>6} {:>8} {:>7.3}% {:>8.4}x",
            b.addr.to_string(),
            b.weight,
            c,
            share * 100.0,
            ratio
        );
    }
    println!("max/average share (weighted): {worst:.4}");
    Ok(())
}
