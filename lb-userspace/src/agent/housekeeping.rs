//! The loop's once-a-second pass: replaced Maglev tables deleted, conntrack swept when
//! due, and the datapath's counters read for what an operator must hear of (ports
//! exhausted, flows re-created, the flood guard).

use std::collections::BTreeMap;

use tracing::{debug, info, warn};

use super::Agent;

/// What the pass keeps between seconds.
#[derive(Default)]
pub(super) struct State {
    /// Seconds since the last conntrack sweep, and the datapath counters last seen.
    since_sweep: u32,
    last_counters: BTreeMap<&'static str, u64>,
    /// Whether the conntrack table was last said to be full (over 90%, until under 85%).
    table_full: bool,
    /// While the datapath's flood guard is on: since when, and its two counters then.
    flood_since: Option<(std::time::Instant, u64, u64)>,
}

impl Agent {
    /// Once a second: delete replaced Maglev tables, sweep conntrack when due, and say in the log when the datapath
    /// hit a full table since the last look.
    pub(super) async fn housekeeping(&mut self) {
        // Replaced Maglev table generations, a second or more after the swap.
        if let Err(e) = self.dp.collect_retired() {
            warn!("deleting replaced Maglev tables failed: {e:#}");
        }
        self.housekeeping.since_sweep += 1;
        let timeouts = self.file.timeouts;
        if self.housekeeping.since_sweep >= timeouts.gc_interval.max(1) {
            self.housekeeping.since_sweep = 0;
            let t = std::time::Instant::now();
            match crate::conntrack::sweep(&mut self.dp, &timeouts) {
                Ok(sweep) => {
                    debug!(
                        ms = t.elapsed().as_millis() as u64,
                        expired = sweep.expired,
                        orphaned = sweep.orphaned,
                        remaining = sweep.remaining,
                        "conntrack swept"
                    );
                    let swept = &self.metrics.conntrack_swept;
                    for (why, n) in [("expired", sweep.expired), ("orphaned", sweep.orphaned)] {
                        swept
                            .get_or_create(&vec![("why".to_owned(), why.to_owned())])
                            .inc_by(n as u64);
                    }
                    let max = self.dp.conntrack_max as usize;
                    // Said when it passes 90% and when it is back under 85%, not at every
                    // sweep between, nor at every sweep of a table that hovers at 90%.
                    let was = self.housekeeping.table_full;
                    let full = if was {
                        sweep.remaining * 100 >= max * 85
                    } else {
                        sweep.remaining * 10 >= max * 9
                    };
                    if full && !was {
                        warn!(entries = sweep.remaining, max, "conntrack is over 90% full: a new flow whose bucket is full takes an expired way, else a closing one, else a half-open one, and only then the least recently seen established flow (xlb_datapath_events_total{{event=\"established_evicted\"}} counts those). A larger --conntrack-max applies to maps created afresh: after a stop by SIGINT or `xlb detach`, which lose the flows");
                    } else if !full && was {
                        info!(
                            entries = sweep.remaining,
                            max, "conntrack is below 85% full again"
                        );
                    }
                    self.housekeeping.table_full = full;
                }
                Err(e) => warn!("conntrack sweep failed: {e:#}"),
            }
        }
        let Ok(counters) = crate::counters::read_global_counters(&self.dp.pin_path) else {
            return;
        };
        let now: BTreeMap<&'static str, u64> =
            counters.into_iter().map(|(k, c)| (k, c.packets)).collect();
        let delta = |name: &str| {
            now.get(name).copied().unwrap_or(0)
                - self
                    .housekeeping
                    .last_counters
                    .get(name)
                    .copied()
                    .unwrap_or(0)
        };
        if !self.housekeeping.last_counters.is_empty() {
            let ports = delta("drop_port_alloc");
            if ports > 0 {
                let s = self.file.snat;
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
        self.housekeeping.last_counters = now;
    }

    /// One line when the flood guard turns on, one when a second passed without it.
    fn log_flood_guard(&mut self, now: &BTreeMap<&'static str, u64>, moved: u64) {
        let get = |name: &str| now.get(name).copied().unwrap_or(0);
        let (stateless, refused) = (get("event_flood_stateless"), get("drop_flood_nat"));
        let limit = self.file.flood_guard.new_flows_per_cpu;
        match (self.housekeeping.flood_since, moved > 0) {
            (None, true) => {
                warn!(limit, "flood guard on: more than {limit} new flows per second on a CPU; dsr and dnat flows are forwarded without conntrack entries (event_flood_stateless), nat flows without an entry are dropped (drop_flood_nat); established flows are unaffected");
                let before = |name: &str| {
                    self.housekeeping
                        .last_counters
                        .get(name)
                        .copied()
                        .unwrap_or(0)
                };
                self.housekeeping.flood_since = Some((
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
                self.housekeeping.flood_since = None;
            }
            _ => {}
        }
    }
}
