//! Prometheus metrics at `--metrics-addr`: `/metrics` (OpenMetrics 1.0 to scrapers
//! that accept it, Prometheus text 0.0.4 to the rest: the negotiation Prometheus does),
//! `/healthz` (the agent's control loop is making progress: see [`Heartbeat`]) and
//! `/readyz` (the datapath is attached and the config applied).
//!
//! Datapath values are absolute sums over the per-CPU maps, read from the pinned maps
//! at each scrape into a fresh registry; the agent's own metrics (reloads, map update
//! latency) live in [`AgentMetrics`] and are shared into it.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use lb_common::MAP_CONNTRACK;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::status;

type Labels = Vec<(String, String)>;

/// Metrics the agent itself updates.
#[derive(Clone)]
pub struct AgentMetrics {
    /// Config applications (start and reloads) by result: ok | rejected.
    pub config_applies: Family<Labels, Counter>,
    /// Time to program the maps for one config (seconds).
    pub map_update_seconds: Histogram,
    /// Entries the conntrack sweep removed, by why: expired | orphaned.
    pub conntrack_swept: Family<Labels, Counter>,
    pub ready: Arc<AtomicBool>,
    /// The control loop's last turn, for /healthz.
    pub heartbeat: Heartbeat,
}

/// How long the control loop may go without a turn before /healthz fails. It turns at
/// least once a second (housekeeping); one turn waits at most a few seconds (a reload's
/// next-hop resolution, a conntrack sweep).
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(10);

/// When the control loop last turned: the loop beats once per turn, and /healthz fails
/// when the last beat is older than [`HEARTBEAT_LIMIT`]. A loop blocked in a system call
/// (it was, opening a FIFO at the config path) keeps the process and this server alive,
/// so only this can tell.
#[derive(Clone)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds since `start` at the last beat, plus 1; 0 before the first beat.
    last: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// How long since the last beat, if that is longer than `limit`; None while the
    /// loop turns, and before its first beat (start-up).
    pub fn stalled(&self, limit: Duration) -> Option<Duration> {
        let last = self.last.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let age = Duration::from_millis(now.saturating_sub(last));
        (age > limit).then_some(age)
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            config_applies: Family::default(),
            map_update_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            conntrack_swept: Family::default(),
            ready: Arc::new(AtomicBool::new(false)),
            heartbeat: Heartbeat::default(),
        }
    }
}

impl AgentMetrics {
    pub fn applied(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.config_applies
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Packets, bytes and new flows, as three counter families with the same labels.
#[derive(Default)]
struct TrafficFamilies {
    packets: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    new_flows: Family<Labels, Counter>,
}

impl TrafficFamilies {
    fn add(&self, l: &Labels, t: &status::TrafficView) {
        self.packets.get_or_create(l).inc_by(t.packets);
        self.bytes.get_or_create(l).inc_by(t.bytes);
        self.new_flows.get_or_create(l).inc_by(t.new_flows);
    }

    /// Registers `{what}_packets`, `{what}_bytes` and `{what}_new_flows`.
    fn register(self, reg: &mut Registry, what: &str) {
        reg.register(
            format!("{what}_packets"),
            format!("Packets per {what} (both directions)"),
            self.packets,
        );
        reg.register(
            format!("{what}_bytes"),
            format!("Bytes per {what} (both directions)"),
            self.bytes,
        );
        reg.register(
            format!("{what}_new_flows"),
            format!("New flows per {what}"),
            self.new_flows,
        );
    }
}

/// The text exposition of every metric.
pub fn render(pin_path: &std::path::Path, agent: &AgentMetrics) -> Result<String> {
    let mut reg = Registry::with_prefix("xlb");

    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION").into())]))
        .set(1);
    reg.register("build_info", "xlb build information", build);

    let reasons = Family::<Labels, Counter>::default();
    let reason_bytes = Family::<Labels, Counter>::default();
    let events = Family::<Labels, Counter>::default();
    for (name, c) in crate::counters::read_global_counters(pin_path)? {
        if let Some(event) = name.strip_prefix("event_") {
            let l = labels(&[("event", event.to_string())]);
            events.get_or_create(&l).inc_by(c.packets);
            continue;
        }
        let l = labels(&[("reason", name.to_string())]);
        reasons.get_or_create(&l).inc_by(c.packets);
        reason_bytes.get_or_create(&l).inc_by(c.bytes);
    }
    reg.register(
        "datapath_events",
        "Datapath events besides a packet's reason: flows re-created mid-stream (conntrack \
         entry evicted or expired), SNAT ports reclaimed by their own flow, forwarded frames the \
         kernel then failed to send (redirect_failed)",
        events,
    );
    reg.register(
        "datapath_packets",
        "Packets by what the datapath saw or did with them",
        reasons,
    );
    reg.register(
        "datapath_bytes",
        "Bytes by what the datapath saw or did with them",
        reason_bytes,
    );

    let services = TrafficFamilies::default();
    let backends = TrafficFamilies::default();
    let healthy = Family::<Labels, Gauge>::default();
    let weight = Family::<Labels, Gauge>::default();
    let denied = Family::<Labels, Counter>::default();
    let ranges = Family::<Labels, Gauge>::default();
    for svc in status::read_services(pin_path)? {
        let s = labels(&[
            ("service", svc.name.clone()),
            ("vip", svc.vip.clone()),
            ("port", svc.port.to_string()),
            ("protocol", svc.protocol.to_string()),
        ]);
        services.add(&s, &svc.stats);
        denied.get_or_create(&s).inc_by(svc.stats.denied);
        if let Some(r) = &svc.allow {
            ranges.get_or_create(&s).set(r.len() as i64);
        }
        for b in &svc.backends {
            let mut l = s.clone();
            l.push(("backend".into(), b.address.clone()));
            backends.add(&l, &b.stats);
            healthy.get_or_create(&l).set(b.healthy as i64);
            weight.get_or_create(&l).set(b.weight as i64);
        }
    }
    services.register(&mut reg, "service");
    backends.register(&mut reg, "backend");
    reg.register(
        "backend_healthy",
        "1 if the backend passes its health check (or has none)",
        healthy,
    );
    reg.register(
        "backend_weight",
        "The backend's configured weight (0: draining, no new flows)",
        weight,
    );
    reg.register(
        "service_denied",
        "Packets dropped because their source is outside the service's source ranges",
        denied,
    );
    reg.register(
        "service_source_ranges",
        "Source ranges a restricted service admits (absent: the service admits everyone; 0: no one)",
        ranges,
    );
    let fragments = status::fragment_fill(pin_path);
    let records = Gauge::<i64>::default();
    records.set(fragments.entries as i64);
    reg.register(
        "fragment_records",
        "Fragmented datagrams whose later fragments the datapath can follow now",
        records,
    );
    let records_max = Gauge::<i64>::default();
    records_max.set(fragments.max as i64);
    reg.register(
        "fragment_records_max",
        "Records the fragment map holds (--fragments-max); the oldest goes first when full",
        records_max,
    );

    let announced = Family::<Labels, Gauge>::default();
    for (vip, table, since) in crate::announce::read_announced(pin_path) {
        announced
            .get_or_create(&labels(&[
                ("vip", vip.to_string()),
                ("table", table.to_string()),
            ]))
            .set(since as i64);
    }
    reg.register(
        "vip_announced_since_seconds",
        "VIPs announced as host routes (docs/announce.md), by when (seconds since the epoch)",
        announced,
    );

    let ct = Gauge::<i64>::default();
    ct.set(conntrack_entries(pin_path)? as i64);
    reg.register(
        "conntrack_entries",
        "Entries in the connection-tracking map (live and idle)",
        ct,
    );

    reg.register(
        "config_applies",
        "Config applications (start and reloads) by result",
        agent.config_applies.clone(),
    );
    reg.register(
        "map_update_seconds",
        "Time to program the maps for one config",
        agent.map_update_seconds.clone(),
    );
    reg.register(
        "conntrack_swept",
        "Conntrack and reply entries the agent's sweep removed, by why",
        agent.conntrack_swept.clone(),
    );

    let mut out = String::new();
    encode(&mut out, &reg).context("encoding metrics")?;
    Ok(out)
}

/// Counts the conntrack table's flows from its buckets' header lines, through its
/// mapping (no syscall per entry).
fn conntrack_entries(pin_path: &std::path::Path) -> Result<usize> {
    Ok(crate::flows::Conntrack::from_pin(&pin_path.join(MAP_CONNTRACK))?.occupied())
}

#[derive(Clone)]
struct Shared {
    pin_path: PathBuf,
    agent: AgentMetrics,
}

/// The OpenMetrics media type, served to scrapers that ask for it.
pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format 0.0.4, served to everyone else.
pub const TEXT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an Accept header asks for OpenMetrics (Prometheus sends
/// `application/openmetrics-text;version=1.0.0;q=0.5,...,text/plain;version=0.0.4;q=0.3,...`).
/// A q of 0 refuses it.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let mut params = part.split(';').map(str::trim);
        let media = params.next().unwrap_or("");
        let refused = params.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// The OpenMetrics body that prometheus-client writes, as Prometheus text 0.0.4: no
/// `# EOF` or `# UNIT` lines, and each counter family's HELP and TYPE under the name its
/// samples carry (`…_total`), which is what a 0.0.4 parser matches them by (under the
/// bare family name, Prometheus and promtool saw counters without type or help).
/// `info` families become gauges (0.0.4 has no info type).
pub fn openmetrics_to_text(body: &str) -> String {
    let mut counters = std::collections::BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(body.len());
    for line in body.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("HELP", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("TYPE", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) && !name.ends_with("_total") {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                };
                let tail = if kind == "TYPE" && tail == "info" {
                    "gauge"
                } else {
                    tail
                };
                out.push_str(&format!("# {kind} {name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

async fn metrics(State(s): State<Shared>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(wants_openmetrics);
    match tokio::task::spawn_blocking(move || render(&s.pin_path, &s.agent)).await {
        Ok(Ok(body)) if openmetrics => {
            (StatusCode::OK, [("content-type", OPENMETRICS_TYPE)], body).into_response()
        }
        Ok(Ok(body)) => (
            StatusCode::OK,
            [("content-type", TEXT_TYPE)],
            openmetrics_to_text(&body),
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if s.agent.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    match s.agent.heartbeat.stalled(HEARTBEAT_LIMIT) {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(age) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "unhealthy: the control loop has made no progress for {:.1} s (limit {} s): it handles no reload, signal or health change\n",
                age.as_secs_f64(),
                HEARTBEAT_LIMIT.as_secs()
            ),
        ),
    }
}

/// Binds `addr` (so a bad address fails `xlb run` at once) and serves in the background.
pub async fn serve(addr: SocketAddr, pin_path: PathBuf, agent: AgentMetrics) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics address {addr}"))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Shared { pin_path, agent });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_healthy_until_the_loop_stalls() {
        let hb = Heartbeat::default();
        assert_eq!(hb.stalled(HEARTBEAT_LIMIT), None, "before the first beat");
        hb.beat();
        assert_eq!(hb.stalled(HEARTBEAT_LIMIT), None, "just beaten");
        // A loop that last turned 20 s ago.
        let old = Heartbeat {
            start: Instant::now() - Duration::from_secs(20),
            last: Arc::new(AtomicU64::new(1)),
        };
        let age = old.stalled(HEARTBEAT_LIMIT).expect("stalled");
        assert!(age >= Duration::from_secs(19), "{age:?}");
        old.beat();
        assert_eq!(old.stalled(HEARTBEAT_LIMIT), None, "turning again");
    }

    #[test]
    fn text_format_names_counters_by_their_samples_and_drops_openmetrics_lines() {
        let om = "# HELP xlb_service_packets Packets per service.\n# TYPE xlb_service_packets counter\nxlb_service_packets_total{service=\"web\"} 3\n# HELP xlb_build_info xlb build information.\n# TYPE xlb_build_info gauge\nxlb_build_info{version=\"0.1.0\"} 1\n# UNIT xlb_map_update_seconds seconds\n# EOF\n";
        let text = openmetrics_to_text(om);
        assert_eq!(
            text,
            "# HELP xlb_service_packets_total Packets per service.\n# TYPE xlb_service_packets_total counter\nxlb_service_packets_total{service=\"web\"} 3\n# HELP xlb_build_info xlb build information.\n# TYPE xlb_build_info gauge\nxlb_build_info{version=\"0.1.0\"} 1\n"
        );
    }

    #[test]
    fn openmetrics_only_for_scrapers_that_accept_it() {
        // Prometheus 2.x's own Accept header.
        assert!(wants_openmetrics("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(
            "application/openmetrics-text;q=0, text/plain"
        ));
    }
}
