//! Part 1: per-packet cost of the XDP program, side by side with an XDP_PASS baseline
//! in the same run (absolute times on a shared 2-core machine are noise; the ratio and
//! the difference are what to read).
//!
//! BPF_PROG_TEST_RUN, one packet per call (with `repeat` a NAT program would see its
//! own output from the second run on; DESIGN.md), inside the LB namespace of the
//! two-arm topology so bpf_fib_lookup resolves. The kernel's per-run duration includes
//! its timer overhead, which the XDP_PASS baseline measures; "net" is xlb minus
//! baseline. Calls are split in rounds, each round's typical call kept (`typical`:
//! the mean of its calls below their 90th percentile), and the median of the rounds
//! reported. Within a round the two programs run in alternating blocks of
//! calls, not call by call: a call right after the other program's pays for the
//! caches that one used, which doubled XDP_PASS's reading. Every verdict is checked.
//!
//! As the reference measurement of Katran: 100 backends, a Maglev table of 65537, the
//! flood guard off (every flow is inserted), and the new-flow case with 20k and with
//! 200k flows already in the tables.

use std::net::IpAddr;

use anyhow::{bail, Result};
use xlb::config::Config;
use xlb_tests::{
    packet::{Frame, ACK},
    testrun::{Fixture, XDP_PASS, XDP_REDIRECT, XDP_TX},
    topology::{LbLab, VIP4, VIP6},
};

pub fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// A round's typical call: the mean of its calls below their 90th percentile (the rest
/// are mostly interrupts and preemptions). Not their median: a call's duration is read off
/// the kernel's clock, which on some machines advances in steps (10 ns on the 2.6 GHz
/// EPYC VMs seen here: consecutive clock_gettime readings differ by 20 or 30 ns), so
/// the median of single calls is a multiple of the step, while their mean is not
/// biased by it (a call starts at a random point between two steps).
pub fn typical(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    let kept = &v[..(v.len() * 9 / 10).max(1)];
    (kept.iter().sum::<u64>() as f64 / kept.len() as f64).round() as u64
}

#[derive(Clone)]
pub struct Row {
    pub name: &'static str,
    pub xlb_ns: u64,
    pub pass_ns: u64,
}

/// (case, frame for call i, ingress interface index, expected verdict, flows in the
/// table before the timed calls: 0 for the cases that reuse one flow)
type Case = (&'static str, Box<dyn Fn(u32) -> Vec<u8>>, u32, u32, u32);

/// Backends of the benchmark's services, as Katran's reference run has them.
pub const BACKENDS: usize = 100;
/// The two table sizes the new-flow case is measured at.
pub const FILLS: [u32; 2] = [20_000, 200_000];

/// The i-th distinct client of a new-flow case: its own source address and port.
pub fn new_client(i: u32) -> (String, u16) {
    (
        format!(
            "10.{}.{}.{}",
            64 + ((i >> 16) & 63),
            (i >> 8) & 0xff,
            i & 0xff
        ),
        10_000 + (i % 50_000) as u16,
    )
}

/// Gives every service `BACKENDS` backends, 10.40.0.2.. and fd40:0::2.., on backend
/// b0's link, with static neighbours so the FIB resolves each (the frames are only
/// timed, never delivered, so one MAC serves them all).
pub fn hundred_backends(lab: &LbLab, cfg: &mut Config) -> Result<()> {
    let mac = "02:00:00:00:00:42";
    let dev = &lab.lb_ifaces[1];
    for i in 0..BACKENDS {
        for addr in [format!("10.40.0.{}", 2 + i), format!("fd40:0::{:x}", 2 + i)] {
            lab.lb.ip(&[
                "neigh",
                "replace",
                &addr,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
    }
    for svc in &mut cfg.services {
        let template = svc.backends[0];
        let v6 = svc.vip.is_ipv6();
        svc.backends = (0..BACKENDS)
            .map(|i| {
                let mut b = template;
                let ip: IpAddr = if v6 {
                    format!("fd40:0::{:x}", 2 + i).parse().unwrap()
                } else {
                    format!("10.40.0.{}", 2 + i).parse().unwrap()
                };
                b.address = std::net::SocketAddr::new(ip, b.address.port());
                b
            })
            .collect();
    }
    Ok(())
}

/// `case`: only the cases whose name contains it (for profiling one path).
pub fn measure(
    packets: u32,
    rounds: u32,
    case: Option<&str>,
    conntrack_max: u32,
) -> Result<Vec<Row>> {
    let load = xlb::dataplane::LoadOptions {
        conntrack_max,
        ..Default::default()
    };
    let lab = LbLab::two_arm(3)?;
    lab.write_config(&[0, 1, 2])?;
    let mut cfg = Config::load(&lab.config_path)?;
    // dsr beside nat, on the same VIP and backends: the service port is the backends'
    // (dsr does not rewrite the packet). Encapsulation is Katran's own work, so this is
    // the like-for-like case.
    let mut dsr = cfg.services[0].clone();
    dsr.name = "tcp-v4-dsr".into();
    dsr.port = xlb_tests::topology::BACKEND_PORT;
    dsr.mode = xlb::model::Mode::Dsr;
    cfg.services.push(dsr);
    // The UDP service again on port 54, restricted to 100 source ranges, the client's
    // the last: what a service with ranges costs an established flow.
    let mut ranged = cfg.services[1].clone();
    ranged.name = "udp-v4-ranges".into();
    ranged.port = 54;
    ranged.allow = (0..99)
        .map(|i| {
            format!("172.{}.{}.0/24", 16 + i / 64, i % 64)
                .parse()
                .unwrap()
        })
        .chain([ipnet::IpNet::from(lab.client4)])
        .collect();
    cfg.services.push(ranged);
    // A stateless dsr UDP service (`conntrack: false`, Katran's LRU bypass): every
    // packet is balanced by Maglev, none writes an entry.
    let mut stateless = cfg.services[1].clone();
    stateless.name = "udp-v4-dsr-stateless".into();
    stateless.port = xlb_tests::topology::BACKEND_PORT;
    stateless.mode = xlb::model::Mode::Dsr;
    stateless.conntrack = false;
    cfg.services.push(stateless);
    hundred_backends(&lab, &mut cfg)?;
    cfg.maglev_table_size = 65537;
    // Every new flow inserted, as Katran's reference run with its rate limit raised.
    cfg.flood_guard.new_flows_per_cpu = 0;
    cfg.validate()?;
    let client_if = lab.lb.ifindex(&lab.lb_ifaces[0])?;
    let backend_if = lab.lb.ifindex(&lab.lb_ifaces[1])?;
    let (client, snat, client6) = (lab.client4, lab.snat4, lab.client6);
    let case = case.map(str::to_owned);
    let rows = lab.lb.run(move || -> Result<Vec<Row>> {
        let mut f = Fixture::with_options(&load)?;
        f.apply(&cfg)?;
        // Flows to establish first: their later packets are the established cases.
        let open_frame = |f: &mut Fixture, frame: &[u8]| -> Result<Vec<u8>> {
            let r = f.run_on(frame, client_if)?;
            if r.verdict != XDP_REDIRECT {
                bail!("opening a flow: verdict {}", r.verdict);
            }
            Ok(r.data)
        };
        let open = |f: &mut Fixture, frame: Frame| open_frame(f, &frame.build());
        let c4 = client.to_string();
        let c6 = client6.to_string();
        let fwd = open(&mut f, Frame::tcp(&c4, 40000, VIP4, 80))?;
        open(&mut f, Frame::udp(&c4, 40001, VIP4, 53))?;
        open(&mut f, Frame::tcp(&c6, 40002, VIP6, 80))?;
        let dsr_port = xlb_tests::topology::BACKEND_PORT;
        open(&mut f, Frame::tcp(&c4, 40003, VIP4, dsr_port))?;
        let est_dsr = Frame::tcp(&c4, 40003, VIP4, dsr_port).flags(ACK);
        open(&mut f, Frame::udp(&c4, 40005, VIP4, 54))?;
        let est_ranged = Frame::udp(&c4, 40005, VIP4, 54);
        // A datagram in fragments: its first opens the flow and records the ports; the
        // case is a later fragment, which follows them.
        let mut big = Frame::udp(&c4, 40004, VIP4, 53);
        big.payload = vec![0x5a; 3000];
        let frags = xlb_tests::fragment::fragment(&big.build(), 1400, 0x4242);
        open_frame(&mut f, &frags[0])?;
        let later = frags[1].clone();
        let est_dsr_one_arm = est_dsr.clone();
        let nat_port = u16::from_be_bytes([fwd[34], fwd[35]]);
        let backend = IpAddr::from([fwd[30], fwd[31], fwd[32], fwd[33]]);
        let mut reply =
            Frame::tcp(&backend.to_string(), 8080, &snat.to_string(), nat_port).flags(ACK);
        reply.src_mac = [2, 0, 0, 0, 0, 9];
        let est4_one_arm = Frame::tcp(&c4, 40000, VIP4, 80).flags(ACK);
        let (est4, udp4, est6) = (
            Frame::tcp(&c4, 40000, VIP4, 80).flags(ACK),
            Frame::udp(&c4, 40001, VIP4, 53),
            Frame::tcp(&c6, 40002, VIP6, 80).flags(ACK),
        );
        let (c4a, snat_s) = (c4.clone(), snat.to_string());
        let stateless_one = Frame::udp(&c4, 40006, VIP4, dsr_port);
        let stateless_new = move |i: u32| {
            let (src, sport) = new_client(i);
            Frame::udp(&src, sport, VIP4, dsr_port).build()
        };
        let syn = |port: u16| {
            move |i: u32| {
                let (src, sport) = new_client(i);
                Frame::tcp(&src, sport, VIP4, port).build()
            }
        };
        let cases: Vec<Case> = vec![
            (
                "not a VIP (UDP to the LB itself)",
                Box::new(move |_| Frame::udp(&c4a, 5000, &snat_s, 9999).build()),
                client_if,
                XDP_PASS,
                0,
            ),
            (
                "established TCP flow (IPv4)",
                Box::new(move |_| est4.build()),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "established UDP flow (IPv4)",
                Box::new(move |_| udp4.build()),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "established TCP flow (IPv6)",
                Box::new(move |_| est6.build()),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "established UDP flow (IPv4), service with 100 source ranges",
                Box::new(move |_| est_ranged.build()),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "later fragment of a datagram (UDP, IPv4)",
                Box::new(move |_| later.clone()),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "reply (reverse NAT)",
                Box::new(move |_| reply.build()),
                backend_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "dsr: established TCP flow (IPv4, IP-in-IP)",
                Box::new(move |_| est_dsr.build()),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            // One-arm: the packet comes in on the backends' link, so it leaves by XDP_TX,
            // as Katran's do, where two-arm pays for a bpf_redirect call.
            (
                "one-arm: established TCP flow (IPv4, XDP_TX)",
                Box::new(move |_| est4_one_arm.build()),
                backend_if,
                XDP_TX,
                0,
            ),
            (
                "dsr one-arm: established TCP flow (IPv4, IP-in-IP, XDP_TX)",
                Box::new(move |_| est_dsr_one_arm.build()),
                backend_if,
                XDP_TX,
                0,
            ),
            (
                "dsr stateless: UDP datagram of one flow (conntrack: false)",
                Box::new(move |_| stateless_one.build()),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "dsr stateless: UDP datagram of a new flow (conntrack: false)",
                Box::new(stateless_new),
                client_if,
                XDP_REDIRECT,
                0,
            ),
            (
                "dsr: new TCP flow (SYN), 20k flows in the table",
                Box::new(syn(dsr_port)),
                client_if,
                XDP_REDIRECT,
                FILLS[0],
            ),
            (
                "dsr: new TCP flow (SYN), 200k flows in the table",
                Box::new(syn(dsr_port)),
                client_if,
                XDP_REDIRECT,
                FILLS[1],
            ),
            (
                "new TCP flow (SYN), 20k flows in the table",
                Box::new(syn(80)),
                client_if,
                XDP_REDIRECT,
                FILLS[0],
            ),
            (
                "new TCP flow (SYN), 200k flows in the table",
                Box::new(syn(80)),
                client_if,
                XDP_REDIRECT,
                FILLS[1],
            ),
        ];
        let mut rows = Vec::new();
        for (name, frame, ifindex, want, fill) in cases {
            if case.as_deref().is_some_and(|c| !name.contains(c)) {
                continue;
            }
            // New-flow cases: each round loads the program afresh (empty tables: the
            // entries deleted from an LRU map leave its free lists in a state that
            // makes inserts dearer, which emptying by syscalls did to this case
            // before), fills the tables with `fill` flows through the program itself,
            // then times fill/10 more new flows, so the table stays within 10% of its
            // nominal size.
            let per_round = if fill > 0 {
                fill / 10
            } else {
                (packets / rounds).max(1)
            };
            // Warm-up, not measured: the first calls of a case pay for cold caches.
            for i in 0..2_000u32.min(per_round) {
                f.run_on(&frame(u32::MAX - i), ifindex)?;
                f.run_baseline_on(&frame(u32::MAX - i), ifindex)?;
            }
            let (mut xr, mut br) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                if fill > 0 {
                    f = Fixture::with_options(&load)?;
                    f.apply(&cfg)?;
                    for i in 0..fill {
                        let r = f.run_on(&frame(i), ifindex)?;
                        if r.verdict != want {
                            bail!("{name}: filling, flow {i}: verdict {}", r.verdict);
                        }
                    }
                }
                let (x, b) = time_round(&mut f, &*frame, fill, per_round, ifindex, want, name)?;
                xr.push(x);
                br.push(b);
            }
            rows.push(Row {
                name,
                xlb_ns: median(xr),
                pass_ns: median(br),
            });
        }
        Ok(rows)
    })??;

    Ok(rows)
}

/// Calls of one program in a row, before the other program's block.
const BLOCK: u32 = 256;

/// One round: `calls` single-packet calls of xlb and of the XDP_PASS baseline, in
/// alternating blocks of `BLOCK`, every verdict checked. Returns the two typical calls
/// (ns, `typical`).
pub fn time_round(
    f: &mut Fixture,
    frame: &dyn Fn(u32) -> Vec<u8>,
    first: u32,
    calls: u32,
    ifindex: u32,
    want: u32,
    name: &str,
) -> Result<(u64, u64)> {
    let (mut xlb, mut base) = (
        Vec::with_capacity(calls as usize),
        Vec::with_capacity(calls as usize),
    );
    // A case whose frame never changes builds it once; one that changes builds a block
    // of frames ahead, outside the timed calls.
    let fixed = (frame(first) == frame(first + 1)).then(|| frame(first));
    let mut start = first;
    while start < first + calls {
        let end = (start + BLOCK).min(first + calls);
        let frames: Vec<Vec<u8>> = match &fixed {
            Some(b) => vec![b.clone()],
            None => (start..end).map(frame).collect(),
        };
        let at = |i: u32| -> &[u8] { frames.get((i - start) as usize).unwrap_or(&frames[0]) };
        for i in start..end {
            let r = f.run_on(at(i), ifindex)?;
            if r.verdict != want {
                let drops: Vec<_> = xlb::counters::read_global_counters(f.pin_path())?
                    .into_iter()
                    .filter(|(k, c)| k.starts_with("drop_") && c.packets > 0)
                    .collect();
                bail!(
                    "{name}: call {i}: verdict {} instead of {want}; drops so far: {drops:?}",
                    r.verdict
                );
            }
            xlb.push(r.duration.as_nanos() as u64);
        }
        for i in start..end {
            base.push(f.run_baseline_on(at(i), ifindex)?.duration.as_nanos() as u64);
        }
        start = end;
    }
    Ok((typical(xlb), typical(base)))
}
