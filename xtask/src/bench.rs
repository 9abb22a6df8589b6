//! Per-packet cost of the XDP program, side by side with an XDP_PASS baseline, on the
//! same machine in the same run (absolute times on a shared 2-core machine are noise;
//! the ratio and the difference are what to read).
//!
//! BPF_PROG_TEST_RUN, one packet per call (so a NAT program never sees its own
//! output), inside the LB namespace of the two-arm topology so bpf_fib_lookup resolves.
//! The kernel's per-run duration includes its timer overhead, which the XDP_PASS
//! baseline measures; "net" is xlb minus baseline. Every verdict is checked.

use std::net::IpAddr;

use anyhow::{bail, Result};
use xlb::config::Config;
use xlb_tests::{
    packet::{Frame, ACK},
    testrun::{Fixture, XDP_PASS, XDP_REDIRECT},
    topology::{LbLab, VIP4},
};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Calls per case.
    #[arg(long, default_value_t = 20000)]
    packets: u32,
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

pub fn run(args: BenchArgs) -> Result<()> {
    let lab = LbLab::two_arm(3)?;
    lab.write_config(&[0, 1, 2])?;
    let cfg = Config::load(&lab.config_path)?;
    let client_if = lab.lb.ifindex(&lab.lb_ifaces[0])?;
    let backend_if = lab.lb.ifindex(&lab.lb_ifaces[1])?;
    let (client, snat): (IpAddr, IpAddr) = (lab.client4, lab.snat4);
    let n = args.packets;
    let rows = lab.lb.run(move || -> Result<Vec<(String, u64, u64)>> {
        let mut f = Fixture::new()?;
        f.dp.apply(&cfg)?;
        let mut rows = Vec::new();
        // (case, frame for call i, expected verdict)
        type Case = (&'static str, Box<dyn Fn(u32) -> Vec<u8>>, u32, u32);
        let est = Frame::tcp(&client.to_string(), 40000, VIP4, 80).flags(ACK);
        let first = f.run_on(
            &Frame::tcp(&client.to_string(), 40000, VIP4, 80).build(),
            client_if,
        )?;
        let nat_port = u16::from_be_bytes([first.data[34], first.data[35]]);
        let backend = IpAddr::from([
            first.data[30],
            first.data[31],
            first.data[32],
            first.data[33],
        ]);
        let mut reply =
            Frame::tcp(&backend.to_string(), 8080, &snat.to_string(), nat_port).flags(ACK);
        reply.src_mac = [2, 0, 0, 0, 0, 9];
        let cases: Vec<Case> = vec![
            (
                "not a VIP (UDP to the LB itself)",
                Box::new(move |_| {
                    Frame::udp(&client.to_string(), 5000, &snat.to_string(), 9999).build()
                }),
                client_if,
                XDP_PASS,
            ),
            (
                "established TCP flow",
                Box::new(move |_| est.build()),
                client_if,
                XDP_REDIRECT,
            ),
            (
                "new TCP flow (SYN, new source port)",
                Box::new(move |i| {
                    Frame::tcp(&client.to_string(), 10000 + (i % 50000) as u16, VIP4, 80).build()
                }),
                client_if,
                XDP_REDIRECT,
            ),
            (
                "reply (reverse NAT)",
                Box::new(move |_| reply.build()),
                backend_if,
                XDP_REDIRECT,
            ),
        ];
        for (name, frame, ifindex, want) in cases {
            let (mut xlb, mut base) = (
                Vec::with_capacity(n as usize),
                Vec::with_capacity(n as usize),
            );
            for i in 0..n {
                let bytes = frame(i);
                let r = f.run_on(&bytes, ifindex)?;
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
                base.push(f.run_baseline_on(&bytes, ifindex)?.duration.as_nanos() as u64);
            }
            rows.push((name.to_string(), median(xlb), median(base)));
        }
        Ok(rows)
    })??;
    println!("per-packet cost, BPF_PROG_TEST_RUN, median of {n} single-packet runs (ns):");
    println!(
        "{:<40} {:>8} {:>10} {:>8} {:>8}",
        "case", "xlb", "XDP_PASS", "net", "ratio"
    );
    for (name, x, b) in rows {
        println!(
            "{name:<40} {x:>8} {b:>10} {:>8} {:>8.2}",
            x.saturating_sub(b),
            x as f64 / b.max(1) as f64
        );
    }
    println!("(DESIGN.md's reference for Katran on this kind of machine: 135 ns established,");
    println!(" 289 ns new flow, 70 ns not a VIP, 23 ns for XDP_PASS.)");
    Ok(())
}
