//! Part 1: per-packet cost of the XDP program, side by side with an XDP_PASS baseline
//! in the same run (absolute times on a shared 2-core machine are noise; the ratio and
//! the difference are what to read).
//!
//! BPF_PROG_TEST_RUN, one packet per call (with `repeat` a NAT program would see its
//! own output from the second run on; DESIGN.md), inside the LB namespace of the
//! two-arm topology so bpf_fib_lookup resolves. The kernel's per-run duration includes
//! its timer overhead, which the XDP_PASS baseline measures; "net" is xlb minus
//! baseline. Calls are split in rounds, each round's median kept, and the median of
//! the rounds reported. Every verdict is checked.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use xlb::config::Config;
use xlb_tests::{
    packet::{Frame, ACK},
    testrun::{Fixture, XDP_PASS, XDP_REDIRECT},
    topology::{LbLab, VIP4, VIP6},
};

/// Empties the conntrack and reverse-NAT maps (outside the measured calls).
pub fn clear_flows(f: &mut Fixture) -> Result<()> {
    use lb_common::{ConnValue, ReverseNat, MAP_CONNTRACK, MAP_REVERSE_NAT};
    clear::<ConnValue>(f, MAP_CONNTRACK)?;
    clear::<ReverseNat>(f, MAP_REVERSE_NAT)
}

fn clear<V: aya::Pod>(f: &mut Fixture, name: &str) -> Result<()> {
    use aya::maps::{HashMap, MapData};
    let map = f.dp.ebpf.map_mut(name).context("flow map")?;
    let mut m = HashMap::<&mut MapData, lb_common::FlowKey, V>::try_from(map)?;
    let keys: Vec<_> = m.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = m.remove(&k);
    }
    Ok(())
}

pub fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[derive(Clone)]
pub struct Row {
    pub name: &'static str,
    pub xlb_ns: u64,
    pub pass_ns: u64,
}

/// (case, frame for call i, ingress interface index, expected verdict)
type Case = (&'static str, Box<dyn Fn(u32) -> Vec<u8>>, u32, u32);

/// `case`: only the cases whose name contains it (for profiling one path).
pub fn measure(packets: u32, rounds: u32, case: Option<&str>) -> Result<Vec<Row>> {
    let lab = LbLab::two_arm(3)?;
    lab.write_config(&[0, 1, 2])?;
    let mut cfg = Config::load(&lab.config_path)?;
    // dsr beside nat, on the same VIP and backends: the service port is the backends'
    // (dsr does not rewrite the packet). Encapsulation is Katran's own work, so this is
    // the like-for-like case.
    let mut dsr = cfg.services[0].clone();
    dsr.name = "tcp-v4-dsr".into();
    dsr.port = xlb_tests::topology::BACKEND_PORT;
    dsr.mode = xlb::config::Mode::Dsr;
    cfg.services.push(dsr);
    cfg.validate()?;
    let client_if = lab.lb.ifindex(&lab.lb_ifaces[0])?;
    let backend_if = lab.lb.ifindex(&lab.lb_ifaces[1])?;
    let (client, snat, client6) = (lab.client4, lab.snat4, lab.client6);
    let case = case.map(str::to_owned);
    let rows = lab.lb.run(move || -> Result<Vec<Row>> {
        let mut f = Fixture::new()?;
        f.dp.apply(&cfg)?;
        // Flows to establish first: their later packets are the established cases.
        let open = |f: &mut Fixture, frame: Frame| -> Result<Vec<u8>> {
            let r = f.run_on(&frame.build(), client_if)?;
            if r.verdict != XDP_REDIRECT {
                bail!("opening a flow: verdict {}", r.verdict);
            }
            Ok(r.data)
        };
        let c4 = client.to_string();
        let c6 = client6.to_string();
        let fwd = open(&mut f, Frame::tcp(&c4, 40000, VIP4, 80))?;
        open(&mut f, Frame::udp(&c4, 40001, VIP4, 53))?;
        open(&mut f, Frame::tcp(&c6, 40002, VIP6, 80))?;
        let dsr_port = xlb_tests::topology::BACKEND_PORT;
        open(&mut f, Frame::tcp(&c4, 40003, VIP4, dsr_port))?;
        let est_dsr = Frame::tcp(&c4, 40003, VIP4, dsr_port).flags(ACK);
        let c4d = c4.clone();
        let nat_port = u16::from_be_bytes([fwd[34], fwd[35]]);
        let backend = IpAddr::from([fwd[30], fwd[31], fwd[32], fwd[33]]);
        let mut reply =
            Frame::tcp(&backend.to_string(), 8080, &snat.to_string(), nat_port).flags(ACK);
        reply.src_mac = [2, 0, 0, 0, 0, 9];
        let (est4, udp4, est6) = (
            Frame::tcp(&c4, 40000, VIP4, 80).flags(ACK),
            Frame::udp(&c4, 40001, VIP4, 53),
            Frame::tcp(&c6, 40002, VIP6, 80).flags(ACK),
        );
        let (c4a, snat_s) = (c4.clone(), snat.to_string());
        let c4b = c4.clone();
        let cases: Vec<Case> = vec![
            (
                "not a VIP (UDP to the LB itself)",
                Box::new(move |_| Frame::udp(&c4a, 5000, &snat_s, 9999).build()),
                client_if,
                XDP_PASS,
            ),
            (
                "established TCP flow (IPv4)",
                Box::new(move |_| est4.build()),
                client_if,
                XDP_REDIRECT,
            ),
            (
                "established UDP flow (IPv4)",
                Box::new(move |_| udp4.build()),
                client_if,
                XDP_REDIRECT,
            ),
            (
                "established TCP flow (IPv6)",
                Box::new(move |_| est6.build()),
                client_if,
                XDP_REDIRECT,
            ),
            (
                "reply (reverse NAT)",
                Box::new(move |_| reply.build()),
                backend_if,
                XDP_REDIRECT,
            ),
            (
                "dsr: established TCP flow (IPv4, IP-in-IP)",
                Box::new(move |_| est_dsr.build()),
                client_if,
                XDP_REDIRECT,
            ),
            (
                "dsr: new TCP flow (SYN, new source port)",
                Box::new(move |i| {
                    Frame::tcp(&c4d, 10000 + (i % 50000) as u16, VIP4, dsr_port).build()
                }),
                client_if,
                XDP_REDIRECT,
            ),
            (
                "new TCP flow (SYN, new source port)",
                Box::new(move |i| Frame::tcp(&c4b, 10000 + (i % 50000) as u16, VIP4, 80).build()),
                client_if,
                XDP_REDIRECT,
            ),
        ];
        let mut rows = Vec::new();
        for (name, frame, ifindex, want) in cases {
            if case.as_deref().is_some_and(|c| !name.contains(c)) {
                continue;
            }
            // New flows use up SNAT ports (12768 per backend): those cases run in rounds
            // of at most 20k, with the flow tables emptied between rounds (dsr's too, so
            // the two see tables of the same size). They run last, as emptying the
            // tables ends the flows the other cases use.
            let new_flows = name.contains("new TCP flow");
            let case_rounds = if new_flows {
                rounds.max(packets.div_ceil(20_000))
            } else {
                rounds
            };
            let per_round = (packets / case_rounds).max(1);
            // Warm-up, not measured: the first calls of a case pay for cold caches.
            for i in 0..2_000u32.min(per_round) {
                f.run_on(&frame(u32::MAX - i), ifindex)?;
                f.run_baseline_on(&frame(u32::MAX - i), ifindex)?;
            }
            if new_flows {
                clear_flows(&mut f)?;
            }
            let (mut xr, mut br) = (Vec::new(), Vec::new());
            for round in 0..case_rounds {
                if new_flows {
                    clear_flows(&mut f)?;
                }
                let (x, b) = time_round(
                    &mut f,
                    &*frame,
                    round * per_round,
                    per_round,
                    ifindex,
                    want,
                    name,
                )?;
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

/// One round: `calls` single-packet calls of xlb and of the XDP_PASS baseline,
/// alternating, every verdict checked. Returns the two medians (ns).
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
    // A case whose frame never changes builds it once: building one per call between
    // the timed runs would evict the caches the runs use (both programs alike).
    let fixed = (frame(first) == frame(first + 1)).then(|| frame(first));
    let mut built;
    for i in first..first + calls {
        let bytes: &[u8] = match &fixed {
            Some(b) => b,
            None => {
                built = frame(i);
                &built
            }
        };
        let r = f.run_on(bytes, ifindex)?;
        if r.verdict != want {
            let drops: Vec<_> = xlb::status::read_global_counters(f.pin_path())?
                .into_iter()
                .filter(|(k, c)| k.starts_with("drop_") && c.packets > 0)
                .collect();
            bail!(
                "{name}: call {i}: verdict {} instead of {want}; drops so far: {drops:?}",
                r.verdict
            );
        }
        xlb.push(r.duration.as_nanos() as u64);
        base.push(f.run_baseline_on(bytes, ifindex)?.duration.as_nanos() as u64);
    }
    Ok((median(xlb), median(base)))
}
