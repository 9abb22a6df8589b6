//! Part 4: does the per-packet cost stay flat as the tables grow? The established
//! TCP flow of part 1, timed the same way (single-packet BPF_PROG_TEST_RUN beside
//! XDP_PASS), with 1 to 10,000 services configured, and with the conntrack table
//! holding 1k to 1M other flows.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use xlb::dataplane::LoadOptions;
use xlb_tests::{
    cfg::Svc,
    packet::{Frame, ACK},
    testrun::{Fixture, XDP_REDIRECT},
    topology::{LbLab, VIP4},
};

use super::{
    control_plane::mem_available_kib,
    per_packet::{median, time_round},
};

#[derive(Serialize, Clone)]
pub struct Point {
    pub size: u64,
    pub xlb_ns: u64,
    pub xdp_pass_ns: u64,
    pub net_ns: u64,
}

#[derive(Serialize, Clone)]
pub struct Results {
    pub calls_per_point: u32,
    pub rounds: u32,
    pub vips: Vec<Point>,
    pub conntrack: Vec<Point>,
    /// Kernel memory the service maps took at the largest VIP count (MemAvailable drop).
    pub vips_kernel_memory_mib: f64,
}

fn timed(
    f: &mut Fixture,
    est: &Frame,
    ifindex: u32,
    calls: u32,
    rounds: u32,
    size: u64,
) -> Result<Point> {
    let bytes = est.build();
    let frame = move |_| bytes.clone();
    // Warm-up, not measured.
    time_round(
        f,
        &frame,
        0,
        2_000.min(calls),
        ifindex,
        XDP_REDIRECT,
        "warm-up",
    )?;
    let (mut xr, mut br) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let (x, b) = time_round(
            f,
            &frame,
            r * calls,
            calls / rounds,
            ifindex,
            XDP_REDIRECT,
            "established",
        )?;
        xr.push(x);
        br.push(b);
    }
    let (x, b) = (median(xr), median(br));
    Ok(Point {
        size,
        xlb_ns: x,
        xdp_pass_ns: b,
        net_ns: x.saturating_sub(b),
    })
}

pub fn measure(vips: &[usize], flows: &[usize], calls: u32, rounds: u32) -> Result<Results> {
    let lab = LbLab::two_arm(1)?;
    let ifindex = lab.lb.ifindex(&lab.lb_ifaces[0])?;
    let client = lab.client4.to_string();
    let syn = Frame::tcp(&client, 40000, VIP4, 80);
    let est = Frame::tcp(&client, 40000, VIP4, 80).flags(ACK);
    let backend = lab.backend(0, false);

    let mut vip_points = Vec::new();
    let mut kmem = 0.0;
    for &n in vips {
        // n services in all: the lab's four, and more VIPs on port 80.
        let more = (0..n.saturating_sub(4)).map(|i| {
            let vip = std::net::Ipv4Addr::from(0x0ac8_0000u32 + i as u32);
            Svc::tcp(format!("x{i}"), vip, 80).backends([backend])
        });
        let cfg = lab.services(&[0]).services(more).config();
        let opts = LoadOptions {
            max_services: (n as u32).next_power_of_two().max(256),
            ..Default::default()
        };
        let (point, mem) = lab.lb.run_scoped(|| -> Result<(Point, f64)> {
            let mut f = Fixture::with_options(&opts)?;
            let before = mem_available_kib()?;
            f.apply(&cfg)?;
            let mem = before.saturating_sub(mem_available_kib()?) as f64 / 1024.0;
            if f.run_on(&syn.build(), ifindex)?.verdict != XDP_REDIRECT {
                bail!("opening the flow with {n} services");
            }
            Ok((
                timed(
                    &mut f,
                    &est,
                    ifindex,
                    calls,
                    rounds,
                    cfg.services.len() as u64,
                )?,
                mem,
            ))
        })??;
        println!(
            "  {:>7} services:      xlb {:>5} ns, XDP_PASS {:>4} ns, net {:>5} ns",
            point.size, point.xlb_ns, point.xdp_pass_ns, point.net_ns
        );
        kmem = mem;
        vip_points.push(point);
    }

    let max_flows = flows.iter().copied().max().unwrap_or(1) as u32;
    let opts = LoadOptions {
        conntrack_max: (2 * max_flows).next_power_of_two().max(1024),
        ..Default::default()
    };
    let cfg = lab.services(&[0]).config();
    let flows = flows.to_vec();
    let ct_points = lab.lb.run_scoped(|| -> Result<Vec<Point>> {
        let mut f = Fixture::with_options(&opts)?;
        f.apply(&cfg)?;
        if f.run_on(&syn.build(), ifindex)?.verdict != XDP_REDIRECT {
            bail!("opening the flow");
        }
        let (key, value) = {
            let ct = f.dp.conntrack().context("conntrack")?;
            let e = ct
                .entries()
                .next()
                .context("the flow is not in conntrack")?;
            (e.key, e.value)
        };
        let mut filled = 1usize;
        // Other clients' addresses, one per attempt: a flow whose bucket is full (the
        // table is never more than half full here) is skipped for the next address.
        let mut next_src = 0u32;
        let mut points = Vec::new();
        for &n in &flows {
            {
                let ct = f.dp.conntrack().context("conntrack")?;
                let attempts = 4 * n as u32;
                while filled < n && next_src < attempts {
                    // Other clients' flows to the same service.
                    let src = std::net::Ipv4Addr::from(0x0ac9_0000u32 + next_src);
                    next_src += 1;
                    let mut k = key;
                    k.src = xlb::codec::addr_to_words(src.into()).0;
                    if ct.insert(&k, &value) {
                        filled += 1;
                    }
                }
                if filled < n {
                    bail!("the conntrack table took {filled} of {n} flows");
                }
            }
            let p = timed(&mut f, &est, ifindex, calls, rounds, n as u64)?;
            if f.dp.conntrack().context("conntrack")?.get(&key).is_none() {
                bail!("the measured flow was evicted from conntrack at {n} flows");
            }
            println!(
                "  {:>7} conntrack flows: xlb {:>5} ns, XDP_PASS {:>4} ns, net {:>5} ns",
                p.size, p.xlb_ns, p.xdp_pass_ns, p.net_ns
            );
            points.push(p);
        }
        Ok(points)
    })??;
    Ok(Results {
        calls_per_point: calls,
        rounds,
        vips: vip_points,
        conntrack: ct_points,
        vips_kernel_memory_mib: kmem,
    })
}
