//! `xlb run`'s start-up, and the loop that turns events into the agent's calls.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};

use super::{Agent, MetricsServing, Options};
use crate::{config::Config, dataplane::Dataplane, metrics::AgentMetrics, nexthop::NextHops};

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

/// Runs `f` on a thread of its own that does not take the signals the agent handles
/// (SIGTERM, SIGINT, SIGHUP). The verifier gives up a load when a signal is pending on
/// its thread, and aya then loads the program again with the verifier's log on, about
/// 4 s a try at this program's size: a SIGTERM during the load took 12 s to act on.
/// Blocked there, the signal goes to another thread (the runtime's handler), the load
/// completes, and the start's next check finds it.
fn without_handled_signals<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: the set is initialised by sigemptyset before it is read, and the
            // mask changed is this new thread's alone.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                    libc::sigaddset(&mut set, sig);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
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

pub async fn run(args: Options) -> Result<()> {
    // First of all: a SIGTERM or SIGINT during start-up must not end the process by its
    // default action, halfway, with maps pinned and nothing said (stop_during_start).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // A SIGHUP too (a reload racing a restart): by its default action it would end the
    // process the same way. Taken here, it is a reload once the agent runs.
    let mut hup = signal(SignalKind::hangup())?;
    // Everything that can be checked is checked before anything is touched: a failed
    // start leaves no maps pinned and no config written.
    let max_bytes = args.max_config_bytes;
    let t = std::time::Instant::now();
    let file = args
        .config
        .as_deref()
        .map(|p| Config::load_limited(p, max_bytes))
        .transpose()?;
    debug!(ms = t.elapsed().as_millis() as u64, "config file read");
    for iface in &args.ifaces {
        check_interface(iface)?;
    }
    crate::privileges::check()?;
    let client = if args.kubernetes.is_some() {
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
        asked: args.sizes_asked,
    };
    // Pins already there are an earlier agent's running datapath: a start that stops
    // early leaves them as they are.
    let adopting = args.pin_path.join(lb_common::MAP_SERVICES).exists();
    let mut dp = without_handled_signals(|| Dataplane::load(&args.pin_path, &load))?;
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
    match args.metrics {
        MetricsServing::At(addr) => {
            crate::metrics::serve(addr, args.pin_path.clone(), metrics.clone()).await?;
            info!(%addr, "serving /metrics, /healthz, /readyz");
        }
        MetricsServing::Off => info!("metrics off"),
        MetricsServing::Default(addr) => {
            match crate::metrics::serve(addr, args.pin_path.clone(), metrics.clone()).await {
                Ok(()) => info!(%addr, "serving /metrics, /healthz, /readyz"),
                Err(e) => warn!("not serving metrics at the default {addr}: {e:#}"),
            }
        }
    }
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    let nexthops = NextHops::new()?;
    let mut neighbour_requests = spawn_neighbour_requests(&mut dp)?;
    let mut route_events = crate::nexthop::subscribe()?;
    let mut agent = Agent {
        dp,
        file: Config::default(),
        k8s: None,
        k8s_word: Vec::new(),
        k8s_admitted: Default::default(),
        kubernetes: args.kubernetes.is_some(),
        desired: None,
        health: BTreeMap::new(),
        checker: None,
        health_tx,
        nexthops,
        metrics,
        snat_overrides: (args.snat_ipv4, args.snat_ipv6),
        max_config_bytes: max_bytes,
        decap: args.decap,
        routes,
        l2: None,
        events: None,
        file_tx: None,
        drained: false,
        housekeeping: Default::default(),
    };
    let file = agent.with_overrides(file.unwrap_or_default())?;
    // Adopted maps: backend ids the last agent cleared may still have flows (it kept
    // them out of use until its next sweep, which this agent cannot know of). One sweep
    // now, before any id is given out again.
    if adopting {
        if let Err(e) = crate::conntrack::sweep(&mut agent.dp, &file.timeouts) {
            warn!("conntrack sweep of the adopted maps failed: {e:#}");
        }
    }
    let services = file.services.len();
    if let Some(summary) = agent.adopt(file, None).await? {
        info!(?summary, services, "config applied");
    }
    // Applying waits for the backends' neighbours (up to 5 s): the likeliest moment
    // for a signal to come, and the last before anything is attached.
    if let Some(sig) = stop_requested(&mut term, &mut int) {
        return stop_during_start(sig, agent.dp, &args.pin_path, adopting);
    }
    let lease_client = client.clone();
    let events = client
        .as_ref()
        .map(|c| crate::k8s::events::EventWriter::spawn(c.clone(), args.node_name.clone()));
    if let Some(events) = &events {
        agent.events = Some(crate::k8s::sink::AnnounceEvents::new(
            events.clone(),
            args.node_name.clone(),
        ));
    }
    let mut k8s_rx = if let Some(k8s) = &args.kubernetes {
        let client = client.expect("made above when --kubernetes is given");
        let opts = k8s.translate.clone();
        info!(class = %opts.class, default_class = opts.default_class, node = ?opts.node_name,
              pools = ?opts.pools, "watching Kubernetes Services and EndpointSlices");
        let (file_tx, file_rx) = tokio::sync::watch::channel(agent.file.desired());
        agent.file_tx = Some(file_tx);
        Some(crate::k8s::controller::spawn(
            client,
            events.expect("made with the client"),
            opts,
            file_rx,
            agent.dp.max_services as usize,
        ))
    } else {
        None
    };
    for iface in &args.ifaces {
        agent.dp.attach(iface, args.xdp_mode)?;
    }
    if !l2_ifaces.is_empty() {
        let leases = match lease_client {
            Some(client) => {
                let me = args.node_name.clone().context(
                    "--announce-l2 with --kubernetes needs --node-name (the Lease holder)",
                )?;
                let namespace = args
                    .kubernetes
                    .as_ref()
                    .map_or("xlb-system", |k| k.lease_namespace.as_str());
                Some(crate::k8s::lease::VipLeases::new(client, namespace, &me))
            }
            None => None,
        };
        agent.l2 = Some(crate::l2::L2Sink::new(
            &l2_ifaces,
            &args.ifaces,
            &mut agent.dp.ebpf,
            leases,
        )?);
    }
    // A restart announces again, whatever an earlier `xlb drain` said.
    if agent.routes.is_some() || agent.l2.is_some() {
        crate::announce::set_drained(&args.pin_path, false)?;
        agent.record_announced();
        agent.announce().await;
    }
    agent
        .metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(pin_path = %args.pin_path.display(), "xlb running");
    // The config file is watched by content: robust to editors that replace the file,
    // and a file being written is retried until it validates. Once a second its
    // metadata is compared (a stat: reading a 6 MB file every second was most of the
    // idle agent's work), and it is read only when that changed. Read as SIGHUP reads
    // it: bounded, regular files only, never blocking; a path that cannot be read so
    // is rejected, and said once per distinct problem.
    let read = |p: &std::path::Path| crate::config::read_limited(p, max_bytes);
    let mut last_seen = args
        .config
        .as_deref()
        .and_then(|p| read(p).ok())
        .map(digest);
    let mut last_stat = args.config.as_deref().map(crate::config::fingerprint);
    let mut settling = false;
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
                // What SIGHUP reads, the watcher has seen: it does not load it again.
                if let Some(p) = args.config.as_deref() {
                    last_stat = Some(crate::config::fingerprint(p));
                    last_seen = read(p).ok().map(digest);
                    settling = false;
                }
                agent.reload(args.config.as_deref()).await;
                agent.announce().await;
            }
            Some(req) = neighbour_requests.recv() => {
                debug!(addr = %req.1, ifindex = req.0, "the datapath found a next hop unresolved");
                agent.nexthops.request(req.0, req.1).await;
            }
            Some(change) = health_rx.recv() => {
                agent.health_changed(change).await;
            }
            Some(event) = route_events.recv() => {
                agent.routes_changed(event).await;
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
                let stat = args.config.as_deref().map(crate::config::fingerprint);
                if stat != last_stat {
                    // Read once it has not changed for a tick: a file written in place
                    // (truncated, then written) must not be applied half-written, and
                    // an empty or cut file can parse.
                    last_stat = stat;
                    settling = true;
                    continue;
                }
                if !settling && last_problem.is_none() {
                    continue;
                }
                settling = false;
                match args.config.as_deref().map(read) {
                    None => {}
                    Some(Ok(bytes)) => {
                        last_problem = None;
                        let now = digest(bytes);
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
            sink.set_routes(&Default::default()).await;
            agent.record_announced();
        }
        if let Some(l2) = agent.l2.as_mut() {
            l2.clear().await;
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

/// What the watcher keeps of the file's contents: a 6 MB file held as bytes to compare
/// was as much memory as the maps' mirror.
fn digest(bytes: Vec<u8>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
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
                let addr = crate::codec::words_to_addr(&req.addr, req.family);
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
