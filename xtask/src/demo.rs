//! The demo: a client, the LB running xlb, and three backends in network namespaces.
//! Real TCP and UDP flows go to a VIP; the live per-backend distribution is shown;
//! then one backend is removed and the demo shows that only its flows moved.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result};
use xlb_tests::{
    topology::{LbLab, Network, VIP4},
    traffic::parse_reply,
};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Rounds of traffic before and after removing a backend (one per second).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Flows of each protocol.
    #[arg(long, default_value_t = 24)]
    flows: usize,
}

enum Flow {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Flow {
    /// One request; the name of the backend that answered, or None if the flow broke.
    fn ping(&mut self, vip_udp: SocketAddr) -> Option<String> {
        let mut buf = [0u8; 256];
        let n = match self {
            Flow::Tcp(s) => {
                s.write_all(b"ping").ok()?;
                s.read(&mut buf).ok()?
            }
            Flow::Udp(s) => {
                s.send_to(b"ping", vip_udp).ok()?;
                s.recv_from(&mut buf).ok()?.0
            }
        };
        parse_reply(&buf[..n]).map(|(name, _)| name)
    }
}

fn bar(counts: &BTreeMap<String, usize>, backends: &[&str]) -> String {
    backends
        .iter()
        .map(|b| {
            let n = counts.get(*b).copied().unwrap_or(0);
            format!("{b} {:<24} {n:>3}", "#".repeat(n))
        })
        .collect::<Vec<_>>()
        .join("  ")
}

/// Set by SIGINT or SIGTERM: the demo stops at its next step and returns, so every
/// namespace, pin and file it made is removed by their destructors (a signal's default
/// action would kill it with all of them left behind).
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn stopping() -> Result<()> {
    if STOP.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("interrupted: cleaning up (namespaces, pins, config file)");
    }
    Ok(())
}

/// Sleeps `d` in short steps, returning early with an error when a signal came.
fn pause(d: Duration) -> Result<()> {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        stopping()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    stopping()
}

pub fn run(args: DemoArgs) -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::env::set_var("XLB_BIN", crate::workspace_root().join("target/debug/xlb"));
    println!(
        "== xlb demo: client ns -> LB ns (xlb, XDP) -> backends b0 b1 b2 (two-arm, Maglev NAT)"
    );
    // The network as deployed: no static neighbours, untuned veths, `snat: auto`, and
    // xlb with its default flags.
    let lab = LbLab::two_arm_on(3, Network::AsDeployed)?;
    lab.write_config(&[0, 1, 2])?;
    let life = Duration::from_secs(30 + 2 * args.rounds as u64);
    let servers = lab.start_backends(life)?;
    let mut agent = lab.agent().start()?;
    let mode = if agent.logs().contains("mode=\"native\"") {
        "native"
    } else {
        "generic"
    };
    println!(
        "   xlb attached to {} in {mode} XDP mode; VIP {VIP4} tcp/80 and udp/53",
        lab.iface_arg()
    );

    let tcp_vip: SocketAddr = format!("{VIP4}:80").parse()?;
    let udp_vip: SocketAddr = format!("{VIP4}:53").parse()?;
    let mut flows = Vec::new();
    for _ in 0..args.flows {
        stopping()?;
        let s = lab
            .client
            .run(move || TcpStream::connect_timeout(&tcp_vip, Duration::from_secs(5)))??;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        flows.push(Flow::Tcp(s));
        let u = lab.client.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        u.set_read_timeout(Some(Duration::from_secs(2)))?;
        flows.push(Flow::Udp(u));
    }
    let names = ["b0", "b1", "b2"];
    let round = |label: &str, flows: &mut Vec<Flow>| -> Vec<Option<String>> {
        let got: Vec<Option<String>> = flows.iter_mut().map(|f| f.ping(udp_vip)).collect();
        let mut counts = BTreeMap::new();
        for name in got.iter().flatten() {
            *counts.entry(name.clone()).or_insert(0) += 1;
        }
        let broken = got.iter().filter(|g| g.is_none()).count();
        println!(
            "   {label:<14} flows per backend: {}  broken: {broken}",
            bar(&counts, &names)
        );
        got
    };
    let mut before = Vec::new();
    for r in 0..args.rounds {
        before = round(&format!("round {}", r + 1), &mut flows);
        pause(Duration::from_secs(1))?;
    }

    println!("== removing backend b1 (config rewritten, SIGHUP: live reload)");
    lab.write_config(&[0, 2])?;
    agent.reload()?;
    let mut after = Vec::new();
    for r in 0..args.rounds {
        after = round(&format!("after, round {}", r + 1), &mut flows);
        pause(Duration::from_secs(1))?;
    }
    let (mut stayed, mut moved_from_b1, mut moved_other) = (0, 0, 0);
    for (b, a) in before.iter().zip(&after) {
        match (b.as_deref(), a.as_deref()) {
            (Some(x), Some(y)) if x == y => stayed += 1,
            (Some("b1"), _) => moved_from_b1 += 1,
            _ => moved_other += 1,
        }
    }
    println!(
        "== result: {stayed} flows stayed on their backend; {moved_from_b1} flows were on b1 and moved \
         (UDP re-balanced, TCP reset by the new backend); {moved_other} other flows moved"
    );
    let status = std::process::Command::new(xlb_tests::agent::xlb_bin()?)
        .args(["status", "--pin-path"])
        .arg(&agent.pin_path)
        .output()
        .context("xlb status")?;
    println!("== xlb status");
    print!("{}", String::from_utf8_lossy(&status.stdout));
    println!("== tearing down namespaces");
    drop(flows);
    drop(agent);
    drop(servers);
    Ok(())
}
