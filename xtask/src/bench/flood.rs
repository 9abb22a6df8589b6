//! Part 5: a SYN flood from random sources against established flows, with the flood
//! guard off and at its default, in one run.
//!
//! BPF_PROG_TEST_RUN in the LB namespace, on one CPU (the guard counts per CPU), with
//! the per-packet part's service (nat, 100 backends, M=65537) and the default
//! conntrack size (lb_common::CONNTRACK_MAX flows). First 1,000 established flows (SYN
//! and ACK); then the flood, SYNs from a
//! new source address each, as fast as one thread sends them. 100 of the established
//! flows send a packet after every 10,000 flood SYNs ("active"); the other 900 one
//! second after the flood ("idle"), when the guard's window has passed. A packet of an established flow is lost when it is not
//! forwarded with the flow's original translation (backend and SNAT port): a backend
//! would see a different 4-tuple, and the connection would break.

use std::{net::IpAddr, time::Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use xlb::config::Config;
use xlb_tests::{
    packet::{Frame, ACK},
    testrun::{Fixture, XDP_DROP, XDP_REDIRECT},
    topology::{LbLab, VIP4},
};

const ESTABLISHED: u32 = 1_000;
const ACTIVE: u32 = 100;
const CHECK_EVERY: u32 = 10_000;

#[derive(Serialize)]
pub struct Run {
    pub guard: u32,
    pub syns: u32,
    pub seconds: f64,
    pub syn_rate: f64,
    pub flood_forwarded: u64,
    pub flood_dropped: u64,
    /// The flood's drops by their counters' reasons (`drop_*` that moved during it),
    /// e.g. the guard's `drop_flood_nat`, or `drop_port_alloc` where a backend's SNAT
    /// ports ran short.
    pub drop_reasons: Vec<(String, u64)>,
    pub active_checks: u64,
    pub active_lost: u64,
    pub idle_lost: u64,
    pub conntrack_entries: usize,
}

/// The datapath's drop counters (`drop_*`), by name.
fn drops(f: &Fixture) -> Result<Vec<(String, u64)>> {
    Ok(xlb::counters::read_global_counters(f.pin_path())?
        .into_iter()
        .filter(|(name, _)| name.starts_with("drop_"))
        .map(|(name, c)| (name.to_owned(), c.packets))
        .collect())
}

/// Where a forwarded frame went and as whom: (destination, source port).
fn translation(out: &[u8]) -> (IpAddr, u16) {
    (
        IpAddr::from([out[30], out[31], out[32], out[33]]),
        u16::from_be_bytes([out[34], out[35]]),
    )
}

pub fn measure(syns: u32) -> Result<Vec<Run>> {
    let lab = LbLab::two_arm(3)?;
    lab.write_config(&[0, 1, 2])?;
    let mut cfg = Config::load(&lab.config_path)?;
    super::per_packet::hundred_backends(&lab, &mut cfg)?;
    cfg.maglev_table_size = 65537;
    let client_if = lab.lb.ifindex(&lab.lb_ifaces[0])?;
    let client = lab.client4.to_string();
    lab.lb.run(move || -> Result<Vec<Run>> {
        super::pin_to_this_cpu()?;
        let mut runs = Vec::new();
        // Off, the default, and a rate at which the flood's entries over its few
        // seconds stay below the table's size.
        for guard in [
            0,
            xlb::model::FloodGuard::default().new_flows_per_cpu,
            20_000,
        ] {
            let mut cfg = cfg.clone();
            cfg.flood_guard.new_flows_per_cpu = guard;
            let mut f = Fixture::new()?;
            f.apply(&cfg)?;
            let mut est = Vec::new();
            for i in 0..ESTABLISHED {
                let syn = Frame::tcp(&client, 20_000 + i as u16, VIP4, 80);
                let r = f.run_on(&syn.build(), client_if)?;
                if r.verdict != XDP_REDIRECT {
                    bail!("establishing flow {i}: verdict {}", r.verdict);
                }
                // The handshake's ACK: the flow is established, not half-open (a full
                // bucket gives up half-open flows first, a flood's SYNs among them).
                let ack = syn.flags(ACK).build();
                let r2 = f.run_on(&ack, client_if)?;
                if r2.verdict != XDP_REDIRECT || translation(&r2.data) != translation(&r.data) {
                    bail!("establishing flow {i}: its ACK went elsewhere");
                }
                est.push((ack, translation(&r.data)));
            }
            // The guard's window starts afresh: the flood begins a second later.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let drops_before = drops(&f)?;
            let (mut forwarded, mut dropped, mut checks, mut active_lost) = (0, 0, 0, 0);
            let started = Instant::now();
            for i in 0..syns {
                let (src, sport) = super::per_packet::new_client(i);
                let r = f.run_on(&Frame::tcp(&src, sport, VIP4, 80).build(), client_if)?;
                match r.verdict {
                    XDP_REDIRECT => forwarded += 1,
                    XDP_DROP => dropped += 1,
                    v => bail!("flood SYN {i}: verdict {v}"),
                }
                if i % CHECK_EVERY == CHECK_EVERY - 1 {
                    for (ack, was) in &est[..ACTIVE as usize] {
                        checks += 1;
                        let r = f.run_on(ack, client_if)?;
                        if r.verdict != XDP_REDIRECT || translation(&r.data) != *was {
                            active_lost += 1;
                        }
                    }
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            // The flood's drops (its SYNs, and any active check lost with them).
            let drop_reasons = drops(&f)?
                .into_iter()
                .map(|(name, n)| {
                    let before = drops_before.iter().find(|(b, _)| *b == name);
                    (name, n - before.map_or(0, |(_, b)| *b))
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            // A second later, when a retransmission would come: the guard's window has
            // passed, so what is lost now is the flow itself, not one packet.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let mut idle_lost = 0;
            for (ack, was) in &est[ACTIVE as usize..] {
                let r = f.run_on(ack, client_if)?;
                if r.verdict != XDP_REDIRECT || translation(&r.data) != *was {
                    idle_lost += 1;
                }
            }
            let entries = f.dp.conntrack()?.entries().count();

            runs.push(Run {
                guard,
                syns,
                seconds,
                syn_rate: syns as f64 / seconds,
                flood_forwarded: forwarded,
                flood_dropped: dropped,
                drop_reasons,
                active_checks: checks,
                active_lost,
                idle_lost,
                conntrack_entries: entries,
            });
        }
        Ok(runs)
    })?
}
