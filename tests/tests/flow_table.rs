//! xlb's own flow table (issue 29, "Must show"), through BPF_PROG_TEST_RUN in the NAT
//! fixtures' namespace (tests/src/natlab.rs):
//!
//! - **Both CPUs at once.** Two threads pinned to CPU 0 and CPU 1 (BPF_PROG_TEST_RUN
//!   runs the program on the calling CPU) send the SYN, an ACK and (nat) the backend's
//!   reply of flows chosen so that both threads' flows share the same buckets of a
//!   64-bucket table, no more of them per bucket than its ways. Once with a flow set
//!   per thread, once with the same flows sent from both threads at once. A thread
//!   whose SYN and ACK were both dropped (a counted port race) retransmits the ACK, a
//!   bounded number of times, as a client's TCP would. Afterwards
//!   every flow is in the table exactly once, every packet of a flow went to one
//!   backend as one source, and every nat reply found its entry.
//! - **A SYN flood with the guard off.** 1,000,000 SYNs from random sources against
//!   1,000 established flows (sending during the flood) and 900 idle ones, on the
//!   default table size, for dsr and for nat: none of the 1,900 is lost (each is still
//!   in the table with its backend, and its next packet goes where its first went).
//!   Then once more with the flood guard at its default. Both runs are printed.
//! - **Eviction by state.** One bucket filled with flows in known states, then new
//!   flows' SYNs: the way given up is the expired one, else the closing one, else the
//!   oldest half-open one, else the least recently seen established one.
//! - **Reading it keeps the agent small.** Scanning the default table (what a sweep,
//!   a scrape and `xlb status` do) adds a window to the reader's RSS, not the table.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Barrier,
    time::Instant,
};

use lb_common::{bucket_of, flow_hash, FlowKey, CT_F_ESTABLISHED, PROTO_TCP};
use xlb::{codec::addr_to_words, config::Config, dataplane::LoadOptions, model::Mode};
use xlb_tests::{
    cfg::{Cfg, Svc},
    natlab::*,
    netns::sh,
    packet::{decode, Frame, TcpFlags, ACK, SYN},
    testrun::{Fixture, RunResult, XDP_DROP, XDP_REDIRECT},
};

const VIP: &str = "192.0.2.10";
const CLIENT: &str = "10.10.0.5";
const SNAT: &str = "10.20.0.1";

/// A forward flow's key as the datapath builds it (ports in network order).
fn flow_key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    let (s, family) = addr_to_words(src);
    let (d, _) = addr_to_words(dst);
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

/// Pins the calling thread to `cpu`, and checks that it runs there.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: the set is ours and fully initialised; the calls have no other
    // preconditions.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning a thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::sched_getcpu(), cpu as i32, "running on CPU {cpu}");
    }
}

/// Where a forwarded frame goes and as whom: (backend address, destination port,
/// source port the backend sees). dsr: the outer destination of the IPIP packet, and
/// the client's own ports inside it.
fn translation(mode: Mode, out: &[u8]) -> (IpAddr, u16, u16) {
    if mode == Mode::Dsr {
        let inner_l4 = 14 + 20 + 20;
        (
            IpAddr::from([out[30], out[31], out[32], out[33]]),
            u16::from_be_bytes([out[inner_l4 + 2], out[inner_l4 + 3]]),
            u16::from_be_bytes([out[inner_l4], out[inner_l4 + 1]]),
        )
    } else {
        let d = decode(out).expect("valid checksums after translation");
        (d.dst, d.dport, d.sport)
    }
}

fn config(mode: Mode, backends: &[String], guard: Option<u32>) -> Config {
    let mut c = Cfg::new().snat4(SNAT).snat6("fd20::1");
    if backends.len() <= BACKENDS_V4.len() {
        // predicted_backend's table size.
        c = c.maglev_table_size(M);
    }
    if let Some(g) = guard {
        c = c.flood_guard(g);
    }
    c.service(
        Svc::tcp("web", VIP, 80)
            .mode(mode)
            .backends(backends.iter().map(String::as_str)),
    )
    .config()
}

// ---------------------------------------------------------------------------------
// Both CPUs at once.
// ---------------------------------------------------------------------------------

/// 256 flows: 64 buckets of 4 ways.
const SMALL_TABLE: u32 = 256;
/// Per round, buckets `b` with `b % 4 == round % 4` are filled: 16 buckets, 64 flows.
const BUCKET_GROUPS: u32 = 4;
const ROUNDS: u32 = 40;
/// The SNAT range (the default): a client port inside it is kept when free, which the
/// plan of the reverse table's buckets counts on.
const PORTS: (u16, u16) = (20000, 32767);

#[derive(Clone, Debug)]
struct Flow {
    frame: Frame,
    key: FlowKey,
    bucket: u32,
    backend: SocketAddr,
}

/// The round's flows, grouped by bucket (4 each), chosen from the client's ports
/// so that every target bucket of the forward table is full and (nat) no bucket of
/// the reverse table gets more reply entries than it has ways.
fn plan_round(round: u32, buckets: u32, mode: Mode, backends: &[&str]) -> Vec<Vec<Flow>> {
    let ways = lb_common::FLOW_WAYS;
    let targets: Vec<u32> = (0..buckets)
        .filter(|b| b % BUCKET_GROUPS == round % BUCKET_GROUPS)
        .collect();
    let mut groups: HashMap<u32, Vec<Flow>> = targets.iter().map(|&b| (b, Vec::new())).collect();
    let mut reverse_load: HashMap<u32, usize> = HashMap::new();
    let range = (PORTS.1 - PORTS.0 + 1) as u32;
    let snat: IpAddr = SNAT.parse().unwrap();
    let vip: IpAddr = VIP.parse().unwrap();
    let client: IpAddr = CLIENT.parse().unwrap();
    for i in 0..range {
        if groups.values().all(|g| g.len() == ways) {
            break;
        }
        let sport = PORTS.0 + ((round * 997 + i) % range) as u16;
        let key = flow_key(client, sport, vip, 80);
        let bucket = bucket_of(flow_hash(&key, false), buckets);
        let Some(group) = groups.get_mut(&bucket) else {
            continue;
        };
        if group.len() == ways {
            continue;
        }
        let frame = Frame::tcp(CLIENT, sport, VIP, 80);
        let backend = predicted_backend(backends, &frame, PROTO_TCP);
        if mode == Mode::Nat {
            let rkey = flow_key(backend.ip(), backend.port(), snat, sport);
            let rb = bucket_of(flow_hash(&rkey, false), buckets);
            let load = reverse_load.entry(rb).or_default();
            if *load == ways {
                continue;
            }
            *load += 1;
        }
        group.push(Flow {
            frame,
            key,
            bucket,
            backend,
        });
    }
    let mut out: Vec<Vec<Flow>> = groups.into_values().collect();
    out.sort_by_key(|g| g.first().map(|f| f.bucket));
    assert!(
        out.iter().all(|g| g.len() == ways),
        "round {round}: could not fill every target bucket"
    );
    out
}

/// How many times a thread sends a flow's ACK again when its SYN and ACK were both
/// dropped, before it gives up on the flow (its reply is then recorded as lost).
const RETRANSMITS: usize = 16;
/// Retransmits are for the rare preempted lock holder: a datapath that dropped first
/// packets as a rule would show as many of them as flows.
const RETRANSMITS_PER_SCENARIO_MAX: usize = 64;

/// What one packet did: (flow, what, verdict, translation if forwarded).
type Seen = (usize, &'static str, u32, Option<(IpAddr, u16, u16)>);

/// The reply of `flow` from its backend to the source port it saw.
fn reply_frame(lab: &Lab, flow: &Flow, nat_port: u16) -> Frame {
    let mut r = flow.frame.clone().flags(ACK);
    r.src = flow.backend.ip();
    r.sport = flow.backend.port();
    r.dst = SNAT.parse().unwrap();
    r.dport = nat_port;
    r.src_mac = backend_mac(flow.backend.ip());
    r.dst_mac = lab.backend_side_mac;
    r
}

/// One thread's part of a round: per flow, the SYN, an ACK, the reply (nat), another
/// ACK; every packet run on this thread's CPU.
fn drive(f: &Fixture, lab: &Lab, mode: Mode, flows: &[(usize, &Flow)]) -> Vec<Seen> {
    let mut seen = Vec::new();
    for &(i, flow) in flows {
        let mut nat_port = None;
        for what in ["syn", "ack", "reply", "ack2"] {
            if what == "reply" {
                if mode != Mode::Nat {
                    continue;
                }
                // The port this thread's packets were given; none if both dropped.
                let Some(port) = nat_port else {
                    seen.push((i, what, u32::MAX, None));
                    continue;
                };
                let frame = reply_frame(lab, flow, port).build();
                let r = f.run_shared_on(&frame, lab.backend_if).unwrap();
                let back = (r.verdict == XDP_REDIRECT).then(|| {
                    let d = decode(&r.data).expect("valid checksums after reverse NAT");
                    assert_eq!(
                        (d.src_mac, d.dst_mac),
                        (lab.client_side_mac, CLIENT_MAC),
                        "flow {i}: the reply leaves towards the client"
                    );
                    (d.src, d.sport, d.dst, d.dport)
                });
                // Recorded as (source, source port, destination port): checked below.
                seen.push((i, what, r.verdict, back.map(|(s, sp, _, dp)| (s, sp, dp))));
                if let Some((_, _, dst, _)) = back {
                    assert_eq!(
                        dst, flow.frame.src,
                        "flow {i}: the reply goes to the client"
                    );
                }
                continue;
            }
            let frame = if what == "syn" {
                flow.frame.build()
            } else {
                flow.frame.clone().flags(ACK).build()
            };
            let r: RunResult = f.run_shared_on(&frame, lab.client_if).unwrap();
            let t = (r.verdict == XDP_REDIRECT).then(|| translation(mode, &r.data));
            if let Some(t) = t {
                nat_port.get_or_insert(t.2);
            }
            seen.push((i, what, r.verdict, t));
            // Both dropped: the other CPU held the flow's bucket throughout, as it can
            // when it is preempted inside BPF_PROG_TEST_RUN (which, unlike XDP in NAPI,
            // runs preemptibly). The client's TCP retransmits, a bounded number of times.
            if what == "ack" {
                for k in 0..RETRANSMITS {
                    if nat_port.is_some() {
                        break;
                    }
                    // Backing off as TCP does (1, 2, 4, 8 ms, then 8 ms), about 100 ms
                    // in all: longer than a preempted lock holder's time slice.
                    std::thread::sleep(std::time::Duration::from_millis(1 << k.min(3)));
                    let r = f.run_shared_on(&frame, lab.client_if).unwrap();
                    let t = (r.verdict == XDP_REDIRECT).then(|| translation(mode, &r.data));
                    if let Some(t) = t {
                        nat_port.get_or_insert(t.2);
                    }
                    seen.push((i, "retransmitted ack", r.verdict, t));
                }
            }
        }
    }
    seen
}

#[derive(Default, Debug)]
struct Totals {
    rounds: u32,
    flows: usize,
    packets: usize,
    dropped: usize,
    replies: usize,
    retransmits: usize,
    busy: u64,
    port_alloc_drops: u64,
    recreated: u64,
    reclaimed: u64,
}

/// `ROUNDS` rounds of one scenario on a fresh 64-bucket table: `shared`, both threads
/// send every flow; else each sends half of every bucket's flows.
fn concurrent_rounds(lab: &Lab, mode: Mode, shared: bool) -> Totals {
    let backends: Vec<String> = BACKENDS_V4
        .iter()
        .map(|b| b.replace(":8080", ":80"))
        .collect();
    let backend_refs: Vec<&str> = backends.iter().map(String::as_str).collect();
    let mut f = Fixture::with_options(&LoadOptions {
        conntrack_max: SMALL_TABLE,
        ..Default::default()
    })
    .unwrap();
    f.apply(&config(mode, &backends, None)).unwrap();
    let ct = f.dp.conntrack().unwrap();
    let rev = f.dp.reverse_nat().unwrap();
    let buckets = ct.buckets();
    assert_eq!(buckets as usize * lb_common::FLOW_WAYS, ct.capacity());
    assert_eq!(buckets, 64, "--conntrack-max {SMALL_TABLE}: 64 buckets");
    let name = format!(
        "{} {}",
        mode.name(),
        if shared { "shared" } else { "disjoint" }
    );
    let mut totals = Totals::default();
    for round in 0..ROUNDS {
        let groups = plan_round(round, buckets, mode, &backend_refs);
        let flows: Vec<&Flow> = groups.iter().flatten().collect();
        // Thread A: ways 0 and 1 of each bucket (or all), thread B: ways 2 and 3 (or
        // all). Both go through the buckets in the same order, so that they meet in
        // the same bucket at once.
        let part = |first: bool| -> Vec<(usize, &Flow)> {
            flows
                .iter()
                .enumerate()
                .filter(|(i, _)| shared || (i % 4 < 2) == first)
                .map(|(i, f)| (i, *f))
                .collect()
        };
        let (a, b) = (part(true), part(false));
        let before = read_counters(&f);
        let barrier = Barrier::new(2);
        let fix = &f;
        let (seen_a, seen_b) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                pin_to_cpu(0);
                barrier.wait();
                drive(fix, lab, mode, &a)
            });
            let tb = s.spawn(|| {
                pin_to_cpu(1);
                barrier.wait();
                drive(fix, lab, mode, &b)
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let after = read_counters(&f);
        let delta = |name: &str| after[name] - before[name];

        // Every packet forwarded went where the flow's others went, as one source.
        let mut per_flow: HashMap<usize, (IpAddr, u16, u16)> = HashMap::new();
        let mut dropped = 0;
        for &(i, what, verdict, t) in seen_a.iter().chain(&seen_b) {
            totals.packets += 1;
            if what == "retransmitted ack" {
                totals.retransmits += 1;
            }
            let flow = flows[i];
            if what == "reply" {
                totals.replies += 1;
                assert_eq!(
                    (verdict, t),
                    (
                        XDP_REDIRECT,
                        Some((flow.frame.dst, flow.frame.dport, flow.frame.sport))
                    ),
                    "{name}, round {round}, flow {i} (bucket {}): the nat reply found its \
                     entry and went back to the client from the VIP",
                    flow.bucket
                );
                continue;
            }
            match (verdict, t) {
                (XDP_REDIRECT, Some(t)) => {
                    assert_eq!(
                        SocketAddr::new(t.0, t.1),
                        flow.backend,
                        "{name}, round {round}, flow {i} {what}: Maglev's backend"
                    );
                    let first = *per_flow.entry(i).or_insert(t);
                    assert_eq!(
                        t, first,
                        "{name}, round {round}, flow {i} {what}: one backend and one source"
                    );
                }
                (XDP_DROP, _) => dropped += 1,
                (v, _) => panic!("{name}, round {round}, flow {i} {what}: verdict {v}"),
            }
        }
        // A packet is dropped only when its flow's SNAT port could not be had: another
        // CPU took it for the same flow a moment earlier, or held the bucket too long.
        assert_eq!(
            dropped as u64,
            delta("drop_port_alloc"),
            "{name}, round {round}: every drop is a counted port race"
        );
        if !shared {
            assert!(
                dropped as u64 <= delta("event_flow_table_busy"),
                "{name}, round {round}: flows of their own: a drop only when a bucket \
                 was busy ({dropped} dropped, {} busy)",
                delta("event_flow_table_busy")
            );
        }
        assert_eq!(
            per_flow.len(),
            flows.len(),
            "{name}, round {round}: every flow forwarded"
        );

        // The table: every flow once, nothing else.
        let mut count: HashMap<FlowKey, (usize, lb_common::ConnValue)> = HashMap::new();
        for e in ct.entries() {
            count.entry(e.key).or_insert((0, e.value)).0 += 1;
        }
        for (i, flow) in flows.iter().enumerate() {
            let (n, v) = count.get(&flow.key).copied().unwrap_or_default();
            assert_eq!(n, 1, "{name}, round {round}, flow {i}: in the table once");
            if mode == Mode::Nat {
                assert_eq!(
                    u16::from_be(v.nat_port),
                    per_flow[&i].2,
                    "{name}, round {round}, flow {i}: the entry's port is the one used"
                );
            }
        }
        assert_eq!(
            count.len(),
            flows.len(),
            "{name}, round {round}: no other entries"
        );
        let reverse: Vec<_> = rev.entries().collect();
        if mode == Mode::Nat {
            let mut rcount: HashMap<FlowKey, usize> = HashMap::new();
            for e in &reverse {
                *rcount.entry(e.key).or_default() += 1;
            }
            for (i, flow) in flows.iter().enumerate() {
                let port = per_flow[&i].2;
                assert_eq!(
                    port, flow.frame.sport,
                    "{name}, round {round}, flow {i}: the client's port was free and kept \
                     (the plan of the reverse table's buckets counts on it)"
                );
                let rkey = flow_key(
                    flow.backend.ip(),
                    flow.backend.port(),
                    SNAT.parse().unwrap(),
                    port,
                );
                assert_eq!(
                    rcount.get(&rkey).copied().unwrap_or(0),
                    1,
                    "{name}, round {round}, flow {i}: its reply entry, once"
                );
            }
            assert_eq!(
                reverse.len(),
                flows.len(),
                "{name}, round {round}: reply entries"
            );
        } else {
            assert!(reverse.is_empty(), "{name}: dsr makes no reply entry");
        }

        // And afterwards, from one thread: each flow's next packet and its reply.
        for (i, flow) in flows.iter().enumerate() {
            let r = f
                .run_on(&flow.frame.clone().flags(ACK).build(), lab.client_if)
                .unwrap();
            assert_eq!(
                r.verdict, XDP_REDIRECT,
                "{name}, round {round}, flow {i} after"
            );
            assert_eq!(
                translation(mode, &r.data),
                per_flow[&i],
                "{name}, round {round}, flow {i} after"
            );
            if mode == Mode::Nat {
                let reply = reply_frame(lab, flow, per_flow[&i].2).build();
                let r = f.run_on(&reply, lab.backend_if).unwrap();
                assert_eq!(
                    r.verdict, XDP_REDIRECT,
                    "{name}, round {round}, flow {i}: reply after"
                );
                assert_back_to_client(lab, &decode(&r.data).unwrap(), &flow.frame);
            }
        }

        // Emptied for the next round, by the agent's removal (nothing else runs now).
        for e in ct.entries().collect::<Vec<_>>() {
            assert!(ct.remove(&e), "{name}: removing a flow nothing else writes");
        }
        for e in rev.entries().collect::<Vec<_>>() {
            assert!(rev.remove(&e), "{name}: removing a reply entry");
        }
        assert_eq!((ct.occupied(), rev.occupied()), (0, 0), "{name}: emptied");

        totals.rounds += 1;
        totals.flows += flows.len();
        totals.dropped += dropped;
        totals.busy += delta("event_flow_table_busy");
        totals.port_alloc_drops += delta("drop_port_alloc");
        totals.recreated += delta("event_flow_recreated");
        totals.reclaimed += delta("event_port_reclaimed");
    }
    totals
}

fn read_counters(f: &Fixture) -> HashMap<&'static str, u64> {
    xlb::counters::read_global_counters(f.pin_path())
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.packets))
        .collect()
}

#[test]
fn privileged_flow_table_both_cpus_insert_and_look_up_in_the_same_buckets() {
    in_lab(|lab| {
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(
            ncpu >= 2,
            "this test needs two CPUs, the machine has {ncpu}"
        );
        let mut report = serde_json::Map::new();
        for mode in [Mode::Nat, Mode::Dsr] {
            for shared in [false, true] {
                let t = concurrent_rounds(lab, mode, shared);
                let name = format!(
                    "{}_{}",
                    mode.name(),
                    if shared { "shared" } else { "disjoint" }
                );
                println!("both CPUs, {name}: {t:?}");
                assert!(
                    t.retransmits <= RETRANSMITS_PER_SCENARIO_MAX,
                    "{name}: {} retransmitted ACKs for {} flows: first packets are being \
                     dropped as a rule",
                    t.retransmits,
                    t.flows
                );
                report.insert(
                    name,
                    serde_json::json!({"rounds": t.rounds, "flows": t.flows, "packets": t.packets,
                        "dropped_port_race": t.dropped, "nat_replies": t.replies,
                        "retransmitted_acks": t.retransmits,
                        "flow_table_busy": t.busy, "flow_recreated": t.recreated,
                        "port_reclaimed": t.reclaimed, "lost": 0, "duplicated": 0}),
                );
            }
        }
        xlb_tests::report("flow_table_both_cpus", serde_json::Value::Object(report));
    });
}

// ---------------------------------------------------------------------------------
// The flood.
// ---------------------------------------------------------------------------------

const ACTIVE: usize = 1_000;
const IDLE: usize = 900;
const SYNS: u32 = 1_000_000;
/// The active flows send a packet after every this many flood SYNs.
const CHECK_EVERY: u32 = 100_000;
/// Backends of the flood's service (as the bench's): 10.20.0.2 to 10.20.0.101.
const FLOOD_BACKENDS: usize = 100;

/// The Internet checksum of `parts` (each of even length).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for p in parts {
        for w in p.chunks(2) {
            sum += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Rewrites a built IPv4 TCP frame's source address and port, checksums included.
fn resource(frame: &mut [u8], src: [u8; 4], sport: u16) {
    frame[26..30].copy_from_slice(&src);
    frame[34..36].copy_from_slice(&sport.to_be_bytes());
    frame[24..26].fill(0);
    let c = checksum(&[&frame[14..34]]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame[50..52].fill(0);
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&frame[26..34]);
    pseudo[9] = PROTO_TCP;
    pseudo[10..].copy_from_slice(&((frame.len() - 34) as u16).to_be_bytes());
    let c = checksum(&[&pseudo, &frame[34..]]);
    frame[50..52].copy_from_slice(&c.to_be_bytes());
}

/// splitmix64: the flood's sources, the same in every run.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Default)]
struct FloodRun {
    mode: &'static str,
    guard: String,
    syns: u32,
    seconds: f64,
    flood_forwarded: u64,
    flood_dropped: u64,
    active_checks: u64,
    /// Packets of active flows, during the flood, not forwarded as the flow's first.
    active_lost_during: u64,
    /// Flows not in the table once, with their backend, or whose next packet went
    /// elsewhere, after the flood.
    active_lost: usize,
    idle_lost: usize,
    flow_evicted: u64,
    established_evicted: u64,
    flow_table_busy: u64,
    port_alloc_drops: u64,
    flood_stateless: u64,
    flood_nat_drops: u64,
    conntrack_occupied: usize,
    reverse_occupied: usize,
    capacity: usize,
}

struct Established {
    ack: Vec<u8>,
    key: FlowKey,
    backend_id: u32,
    t: (IpAddr, u16, u16),
}

fn flood_run(lab: &Lab, mode: Mode, guard: Option<u32>, backends: &[String]) -> FloodRun {
    let mut f = Fixture::new().unwrap();
    f.apply(&config(mode, backends, guard)).unwrap();
    let ct = f.dp.conntrack().unwrap();
    let rev = f.dp.reverse_nat().unwrap();
    assert_eq!(
        ct.capacity(),
        xlb::dataplane::LoadOptions::default().conntrack_max as usize,
        "the agent's default table size"
    );
    let client: IpAddr = CLIENT.parse().unwrap();
    let vip: IpAddr = VIP.parse().unwrap();
    let label = format!(
        "{}, guard {}",
        mode.name(),
        guard.map_or("default".to_owned(), |g| g.to_string())
    );

    // 1,900 flows, the handshake completed (SYN, then ACK).
    let mut est = Vec::new();
    for i in 0..ACTIVE + IDLE {
        let sport = 20_000 + i as u16;
        let syn = Frame::tcp(CLIENT, sport, VIP, 80);
        let r = f.run_on(&syn.build(), lab.client_if).unwrap();
        assert_eq!(r.verdict, XDP_REDIRECT, "{label}: SYN of flow {i}");
        let t = translation(mode, &r.data);
        let ack = syn.flags(ACK).build();
        let r = f.run_on(&ack, lab.client_if).unwrap();
        assert_eq!(r.verdict, XDP_REDIRECT, "{label}: ACK of flow {i}");
        assert_eq!(translation(mode, &r.data), t, "{label}: flow {i}'s ACK");
        let key = flow_key(client, sport, vip, 80);
        let e = ct
            .get(&key)
            .unwrap_or_else(|| panic!("{label}: flow {i} in the table"));
        assert_ne!(
            e.value.flags & CT_F_ESTABLISHED,
            0,
            "{label}: flow {i} established"
        );
        est.push(Established {
            ack,
            key,
            backend_id: e.value.backend_id,
            t,
        });
    }
    let before = read_counters(&f);

    // The flood: SYNs from random sources in 100.64.0.0/10, random ports.
    let mut frame = Frame::tcp("100.64.0.1", 1024, VIP, 80).build();
    let mut rng = 0x5eed_f100d_u64;
    let mut run = FloodRun {
        mode: mode.name(),
        guard: guard.map_or("default".to_owned(), |g| g.to_string()),
        syns: SYNS,
        capacity: ct.capacity(),
        ..Default::default()
    };
    let started = Instant::now();
    for i in 0..SYNS {
        let r = next_random(&mut rng);
        let src = [100, 64 | ((r >> 16) as u8 & 63), (r >> 8) as u8, r as u8];
        let sport = 1024 + ((r >> 32) % 64_512) as u16;
        resource(&mut frame, src, sport);
        if i < 4 {
            decode(&frame).expect("the flood's frames are valid");
        }
        match f.run_on(&frame, lab.client_if).unwrap().verdict {
            XDP_REDIRECT => run.flood_forwarded += 1,
            XDP_DROP => run.flood_dropped += 1,
            v => panic!("{label}: flood SYN {i}: verdict {v}"),
        }
        if i % CHECK_EVERY == CHECK_EVERY - 1 {
            for e in &est[..ACTIVE] {
                run.active_checks += 1;
                let r = f.run_on(&e.ack, lab.client_if).unwrap();
                if r.verdict != XDP_REDIRECT || translation(mode, &r.data) != e.t {
                    run.active_lost_during += 1;
                }
            }
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    let after = read_counters(&f);
    let delta = |name: &str| after[name] - before[name];
    run.flow_evicted = delta("event_flow_evicted");
    run.established_evicted = delta("event_established_evicted");
    run.flow_table_busy = delta("event_flow_table_busy");
    run.port_alloc_drops = delta("drop_port_alloc");
    run.flood_stateless = delta("event_flood_stateless");
    run.flood_nat_drops = delta("drop_flood_nat");
    run.conntrack_occupied = ct.occupied();
    run.reverse_occupied = rev.occupied();

    // Afterwards: each flow in the table once, with its backend, before its next
    // packet (which could re-create it); then that packet goes where its first went.
    let mut count: HashMap<FlowKey, (usize, u32)> = HashMap::new();
    for e in ct.entries().filter(|e| e.key.src == est[0].key.src) {
        count.entry(e.key).or_insert((0, e.value.backend_id)).0 += 1;
    }
    for (i, e) in est.iter().enumerate() {
        let kept = count.get(&e.key) == Some(&(1, e.backend_id)) && {
            let r = f.run_on(&e.ack, lab.client_if).unwrap();
            r.verdict == XDP_REDIRECT && translation(mode, &r.data) == e.t
        };
        if !kept {
            eprintln!(
                "{label}: flow {i} lost: in the table {:?} (backend id was {})",
                count.get(&e.key),
                e.backend_id
            );
            if i < ACTIVE {
                run.active_lost += 1;
            } else {
                run.idle_lost += 1;
            }
        }
    }
    assert_eq!(
        run.flood_forwarded + run.flood_dropped,
        SYNS as u64,
        "{label}: every SYN has a verdict"
    );
    run
}

#[test]
fn privileged_flow_table_syn_flood_loses_no_established_or_idle_flow() {
    in_lab(|lab| {
        // The flood guard counts per CPU: one CPU throughout.
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        pin_to_cpu(cpu as usize);
        // 100 backends on the backend side, as the bench has them: nat's reply
        // 5-tuples (backend × SNAT port) then outnumber the flood.
        let mut batch = String::new();
        for i in BACKENDS_V4.len()..FLOOD_BACKENDS {
            batch += &format!(
                "neigh replace 10.20.0.{} lladdr 02:bb:00:00:01:{:02x} dev bside nud permanent\n",
                2 + i,
                i
            );
        }
        let file = std::env::temp_dir().join(format!("{}.ip", xlb_tests::unique_name("xft")));
        let _rm = xlb_tests::RemoveOnDrop(file.clone());
        std::fs::write(&file, batch).unwrap();
        sh("ip", &["-batch", file.to_str().unwrap()]).unwrap();
        let backends: Vec<String> = (0..FLOOD_BACKENDS)
            .map(|i| format!("10.20.0.{}:80", 2 + i))
            .collect();
        let mut runs = Vec::new();
        for mode in [Mode::Dsr, Mode::Nat] {
            for guard in [Some(0), None] {
                let run = flood_run(lab, mode, guard, &backends);
                println!("SYN flood: {run:?}");
                runs.push(run);
            }
        }
        xlb_tests::report(
            "flow_table_syn_flood",
            serde_json::json!(runs
                .iter()
                .map(|r| serde_json::json!({
                    "mode": r.mode, "guard": r.guard, "syns": r.syns, "seconds": r.seconds,
                    "flood_forwarded": r.flood_forwarded, "flood_dropped": r.flood_dropped,
                    "active_lost_during": r.active_lost_during, "active_lost": r.active_lost,
                    "idle_lost": r.idle_lost, "event_flow_evicted": r.flow_evicted,
                    "event_established_evicted": r.established_evicted,
                    "event_flow_table_busy": r.flow_table_busy,
                    "conntrack_occupied": r.conntrack_occupied, "capacity": r.capacity,
                }))
                .collect::<Vec<_>>()),
        );
        for r in &runs {
            assert_eq!(
                (r.active_lost_during, r.active_lost, r.idle_lost),
                (0, 0, 0),
                "{} flood, guard {}: established flows lost (packets during the flood, \
                 then flows of the {ACTIVE} active and the {IDLE} idle): {r:?}",
                r.mode,
                r.guard
            );
        }
    });
}

/// The process's resident memory, in KiB (VmRSS: its own pages and the mapped ones).
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The agent reads the default tables (144 MiB each) through a window: a sweep, a
/// scrape or `xlb status` must not add the whole table to its RSS (mapping all of it
/// did: the agent's peak RSS read 350 MiB at 1,000 × 100).
#[test]
fn privileged_flow_table_reading_it_keeps_the_agents_rss_small() {
    in_lab(|_lab| {
        let f = Fixture::new().unwrap();
        let before = rss_kib();
        let ct = f.dp.conntrack().unwrap();
        let rev = f.dp.reverse_nat().unwrap();
        let value = lb_common::ConnValue {
            backend_id: 1,
            flags: CT_F_ESTABLISHED,
            ..Default::default()
        };
        let vip: IpAddr = VIP.parse().unwrap();
        let mut written = 0;
        // Flows spread over the whole table: every window is read.
        for i in 0..50_000u32 {
            let src = IpAddr::from([10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            if ct.insert(&flow_key(src, 40_000, vip, 80), &value) {
                written += 1;
            }
        }
        let mut peak = rss_kib();
        let mut read = 0;
        for (n, _) in ct.entries().enumerate() {
            read += 1;
            if n % 5_000 == 0 {
                peak = peak.max(rss_kib());
            }
        }
        assert_eq!(read, written, "every flow written is read back");
        assert_eq!(ct.occupied(), written);
        peak = peak.max(rss_kib());
        assert_eq!(rev.occupied(), 0);
        peak = peak.max(rss_kib());
        let grew_mib = peak.saturating_sub(before) / 1024;
        println!(
            "flow table read: {written} flows over {} buckets; RSS grew {grew_mib} MiB",
            ct.buckets()
        );
        assert!(
            grew_mib < 32,
            "reading a {} MiB table added {grew_mib} MiB to the RSS",
            (ct.buckets() as usize
                * std::mem::size_of::<lb_common::FlowBucket<lb_common::ConnValue>>())
                >> 20
        );
    });
}

// ---------------------------------------------------------------------------------
// A table of the earlier flow hash, carried over at an upgrade.
// ---------------------------------------------------------------------------------

/// The flow hash that tables without the format word (lb_common::FLOW_TABLE_FORMAT)
/// are bucketed by: ten murmur3 rounds, as xlb had it up to commit b589409. Kept here
/// as the definition of that format.
fn earlier_flow_hash(key: &FlowKey) -> u32 {
    fn mix(mut h: u32, w: u32) -> u32 {
        let k = w
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13);
        h.wrapping_mul(5).wrapping_add(0xe654_6b64)
    }
    let mut h = 0x5851_f42d;
    for w in key.src.iter().chain(&key.dst) {
        h = mix(h, *w);
    }
    h = mix(h, (key.sport as u32) | ((key.dport as u32) << 16));
    h = mix(h, key.proto as u32);
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Moves every flow of table `name` to the bucket the earlier hash gives it, and
/// clears the format word: the table as an agent of the earlier hash left it. Returns
/// the keys moved (a flow whose earlier bucket is full stays out of the table).
fn as_the_earlier_hash_left_it<V: Copy + PartialEq + std::fmt::Debug>(
    f: &mut Fixture,
    name: &str,
    entries: Vec<(FlowKey, V)>,
) -> Vec<(FlowKey, V)>
where
    lb_common::FlowBucket<V>: aya::Pod,
{
    use aya::maps::Array;
    let mut table: Array<_, lb_common::FlowBucket<V>> =
        Array::try_from(f.dp.ebpf.map_mut(name).unwrap()).unwrap();
    let buckets = table.len();
    for b in 0..buckets {
        table.set(b, zeroed_bucket(), 0).unwrap();
    }
    let mut moved = Vec::new();
    for (key, value) in entries {
        let hash = earlier_flow_hash(&key);
        let b = bucket_of(hash, buckets);
        let mut bucket = table.get(&b, 0).unwrap();
        let Some(way) = (0..lb_common::FLOW_WAYS).find(|&w| bucket.words[w] == 0) else {
            continue;
        };
        bucket.words[way] = (lb_common::flow_tag(hash) as u64) << 32 | 2;
        bucket.ways[way].key = key;
        bucket.ways[way].value = value;
        table.set(b, bucket, 0).unwrap();
        moved.push((key, value));
    }
    let first = table.get(&0, 0).unwrap();
    assert_eq!(first.format, 0, "{name}: cleared with the rest");
    moved
}

/// An all-zero bucket: an empty way everywhere, and no format word.
fn zeroed_bucket<V: Copy>() -> lb_common::FlowBucket<V> {
    // SAFETY: FlowBucket is plain integers and arrays of them (its Pod impl says so),
    // for which all-zero bytes are a value.
    unsafe { std::mem::zeroed() }
}

/// An agent of the earlier hash ran `FLOWS` flows; this version loads on its pins.
fn earlier_hash_carried(lab: &Lab, mode: Mode) -> serde_json::Value {
    const FLOWS: u16 = 300;
    let opts = LoadOptions {
        conntrack_max: 4096,
        ..Default::default()
    };
    let backends: Vec<String> = BACKENDS_V4
        .iter()
        .map(|b| b.replace(":8080", ":80"))
        .collect();
    let mut f = Fixture::with_options(&opts).unwrap();
    f.apply(&config(mode, &backends, None)).unwrap();
    let frames: Vec<Frame> = (0..FLOWS)
        .map(|i| Frame::tcp(CLIENT, PORTS.0 + i, VIP, 80))
        .collect();
    let mut before = Vec::new();
    for frame in &frames {
        assert_eq!(
            f.run_shared_on(&frame.build(), lab.client_if)
                .unwrap()
                .verdict,
            XDP_REDIRECT
        );
        let r = f
            .run_shared_on(&frame.clone().flags(ACK).build(), lab.client_if)
            .unwrap();
        assert_eq!(r.verdict, XDP_REDIRECT, "{}: the flow's ACK", mode.name());
        before.push(translation(mode, &r.data));
    }
    let flows: Vec<_> =
        f.dp.conntrack()
            .unwrap()
            .entries()
            .map(|e| (e.key, e.value))
            .collect();
    let replies: Vec<_> =
        f.dp.reverse_nat()
            .unwrap()
            .entries()
            .map(|e| (e.key, e.value))
            .collect();
    assert_eq!(
        flows.len(),
        FLOWS as usize,
        "{}: one entry per flow",
        mode.name()
    );
    let flows = as_the_earlier_hash_left_it(&mut f, lb_common::MAP_CONNTRACK, flows);
    let replies = as_the_earlier_hash_left_it(&mut f, lb_common::MAP_REVERSE_NAT, replies);
    // What this test guards against: adopted as it is, this version would look for
    // the flows in other buckets and find almost none.
    let ct = f.dp.conntrack().unwrap();
    let found_in_place = flows.iter().filter(|(k, _)| ct.get(k).is_some()).count();
    assert!(
        found_in_place * 10 < flows.len(),
        "{}: {found_in_place} of {} flows found without the carry-over: the hashes agree too often for this test to show anything",
        mode.name(),
        flows.len()
    );
    drop(ct);
    let recreated_before = read_counters(&f)["event_flow_recreated"];

    let f = Fixture::on_pins(f.keep_pins(), &opts).unwrap();
    let (ct, rev) = (f.dp.conntrack().unwrap(), f.dp.reverse_nat().unwrap());
    assert!(
        ct.current_format().unwrap() && rev.current_format().unwrap(),
        "stamped"
    );
    for (k, v) in &flows {
        assert_eq!(
            ct.get(k).map(|e| e.value),
            Some(*v),
            "{}: flow {k:?} carried",
            mode.name()
        );
    }
    for (k, v) in &replies {
        assert_eq!(
            rev.get(k).map(|e| e.value),
            Some(*v),
            "{}: reply entry {k:?} carried",
            mode.name()
        );
    }
    assert_eq!(
        ct.occupied(),
        flows.len(),
        "{}: nothing else in the table",
        mode.name()
    );
    drop((ct, rev));
    let carried: Vec<FlowKey> = flows.iter().map(|(k, _)| *k).collect();
    let mut kept = 0;
    for (frame, was) in frames.iter().zip(&before) {
        let key = flow_key(
            CLIENT.parse().unwrap(),
            frame.sport,
            VIP.parse().unwrap(),
            80,
        );
        if !carried.contains(&key) {
            continue;
        }
        let r = f
            .run_shared_on(&frame.clone().flags(ACK).build(), lab.client_if)
            .unwrap();
        assert_eq!(r.verdict, XDP_REDIRECT);
        assert_eq!(
            translation(mode, &r.data),
            *was,
            "{}: the flow keeps its backend and source",
            mode.name()
        );
        kept += 1;
    }
    let recreated = read_counters(&f)["event_flow_recreated"] - recreated_before;
    assert_eq!(recreated, 0, "{}: no flow made afresh", mode.name());
    serde_json::json!({"flows": FLOWS, "carried": flows.len(), "replies_carried": replies.len(),
        "found_without_carry": found_in_place, "kept_backend_and_source": kept, "recreated": recreated})
}

/// Upgrading from a version of the earlier flow hash: its pinned tables have the
/// same layout, so only the format word tells them apart. Their flows are carried
/// into new tables, each into the bucket of its new hash, and keep their backends
/// and (nat) their source ports.
#[test]
fn privileged_flow_table_of_the_earlier_hash_is_carried_into_new_buckets() {
    in_lab(|lab| {
        let mut report = serde_json::Map::new();
        for mode in [Mode::Nat, Mode::Dsr] {
            let r = earlier_hash_carried(lab, mode);
            println!("{}: {r}", mode.name());
            report.insert(mode.name().to_owned(), r);
        }
        xlb_tests::report(
            "flow_table_earlier_hash_carried",
            serde_json::Value::Object(report),
        );
    });
}

// ---------------------------------------------------------------------------------
// Eviction by state, in one bucket.
// ---------------------------------------------------------------------------------

/// A full bucket gives up a way in this order: an expired one, a closing one (FIN or
/// RST seen), a half-open one (SYN only; the oldest first), and only then the least
/// recently seen established one. Each row: the flows in one bucket of the 64-bucket
/// table, by state, then the new flow's SYN, then which flow lost its way and the
/// eviction counters. The datapath's clock is coarse (a tick of up to 10 ms), so
/// packets whose order matters are 30 ms apart.
#[test]
fn privileged_flow_table_full_bucket_gives_up_ways_by_state() {
    in_lab(|lab| {
        let backends: Vec<String> = BACKENDS_V4
            .iter()
            .map(|b| b.replace(":8080", ":80"))
            .collect();
        let mut f = Fixture::with_options(&LoadOptions {
            conntrack_max: SMALL_TABLE,
            ..Default::default()
        })
        .unwrap();
        let timeouts = xlb_tests::cfg::Timeouts {
            tcp_idle: 3600,
            tcp_closing: 60,
            udp_idle: 60,
            // Long enough that no half-open flow expires while the rows run (0.15 s
            // at most between a flow's SYN and its row), short enough to wait out.
            tcp_syn: 2,
            ..Default::default()
        };
        let cfg = Cfg::new()
            .snat4(SNAT)
            .maglev_table_size(M)
            .timeouts(timeouts)
            .service(
                Svc::tcp("web", VIP, 80)
                    .mode(Mode::Dsr)
                    .backends(backends.iter().map(String::as_str)),
            )
            .config();
        f.apply(&cfg).unwrap();
        let ct = f.dp.conntrack().unwrap();
        let buckets = ct.buckets();
        // Nine flows of one bucket, named by letter.
        let (client, vip): (IpAddr, IpAddr) = (CLIENT.parse().unwrap(), VIP.parse().unwrap());
        let target = bucket_of(flow_hash(&flow_key(client, 40000, vip, 80), false), buckets);
        let ports: Vec<u16> = (40000..60000u16)
            .filter(|&p| {
                bucket_of(flow_hash(&flow_key(client, p, vip, 80), false), buckets) == target
            })
            .take(9)
            .collect();
        assert_eq!(ports.len(), 9, "nine client ports of bucket {target}");
        let port = |name: char| ports[(name as u8 - b'A') as usize];
        let send = |f: &Fixture, name: char, flags: TcpFlags| {
            let frame = Frame::tcp(CLIENT, port(name), VIP, 80).flags(flags).build();
            let r = f.run_shared_on(&frame, lab.client_if).unwrap();
            assert_eq!(r.verdict, XDP_REDIRECT, "flow {name}: forwarded");
            std::thread::sleep(std::time::Duration::from_millis(30));
        };
        const FIN: TcpFlags = TcpFlags {
            syn: false,
            ack: true,
            fin: true,
            rst: false,
        };
        let in_bucket = || -> String {
            let mut names: Vec<char> = ct
                .entries()
                .map(|e| {
                    let p = u16::from_be(e.key.sport);
                    let i = ports.iter().position(|&q| q == p).expect("a flow of ours");
                    (b'A' + i as u8) as char
                })
                .collect();
            names.sort();
            names.into_iter().collect()
        };
        let evictions = |f: &Fixture| {
            let c = read_counters(f);
            (c["event_flow_evicted"], c["event_established_evicted"])
        };

        // A and D established, B closing, C half-open.
        for (name, flags) in [('A', SYN), ('A', ACK), ('B', SYN), ('B', ACK), ('B', FIN)] {
            send(&f, name, flags);
        }
        send(&f, 'C', SYN);
        send(&f, 'D', SYN);
        send(&f, 'D', ACK);
        assert_eq!(in_bucket(), "ABCD", "four flows fill the bucket");
        let start = evictions(&f);
        let evicted = |f: &Fixture| {
            let now = evictions(f);
            (now.0 - start.0, now.1 - start.1)
        };

        // Each row: the new flow, what is left, (state evictions, established ones).
        let rows: [(char, &str, (u64, u64)); 3] = [
            // The closing way goes before the half-open one and the established ones.
            ('E', "ACDE", (1, 0)),
            // Then the half-open ways, the oldest (C) first.
            ('F', "ADEF", (2, 0)),
            ('G', "ADFG", (3, 0)),
        ];
        for (new, left, (state, est)) in rows {
            send(&f, new, SYN);
            assert_eq!(in_bucket(), left, "{new}'s SYN into a full bucket");
            assert_eq!(
                evicted(&f),
                (state, est),
                "{new}: evictions counted by state"
            );
        }

        // All established now: F, G, then A and D seen again; the least recently
        // seen (F) goes, and is counted as an established flow lost.
        for name in ['F', 'G', 'A', 'D'] {
            send(&f, name, ACK);
        }
        send(&f, 'H', SYN);
        assert_eq!(
            in_bucket(),
            "ADGH",
            "the least recently seen established way"
        );
        assert_eq!(evicted(&f), (3, 1));

        // An expired way goes first of all: H (half-open) outlives the SYN timeout
        // while A closes; I's SYN takes H's way, not the closing A's.
        send(&f, 'A', FIN);
        std::thread::sleep(std::time::Duration::from_millis(2_300));
        send(&f, 'I', SYN);
        assert_eq!(
            in_bucket(),
            "ADGI",
            "the expired way goes before the closing one"
        );
        assert_eq!(
            evicted(&f),
            (3, 1),
            "an expired way's reuse is not counted as an eviction"
        );
    });
}
