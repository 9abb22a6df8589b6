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
    agent::Agent,
    topology::{LbLab, VIP4},
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

pub fn run(args: DemoArgs) -> Result<()> {
    std::env::set_var("XLB_BIN", crate::workspace_root().join("target/debug/xlb"));
    println!(
        "== xlb demo: client ns -> LB ns (xlb, XDP) -> backends b0 b1 b2 (two-arm, Maglev NAT)"
    );
    let lab = LbLab::two_arm(3)?;
    lab.write_config(&[0, 1, 2])?;
    let life = Duration::from_secs(30 + 2 * args.rounds as u64);
    let servers = lab.start_backends(life)?;
    let cfg = lab.config_path.to_string_lossy().into_owned();
    let mut agent = Agent::start(
        &lab.lb,
        &[
            "--iface",
            &lab.iface_arg(),
            "--xdp-mode",
            "auto",
            "--config",
            &cfg,
        ],
    )?;
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
        std::thread::sleep(Duration::from_secs(1));
        got
    };
    let mut before = Vec::new();
    for r in 0..args.rounds {
        before = round(&format!("round {}", r + 1), &mut flows);
    }

    println!("== removing backend b1 (config rewritten, SIGHUP: live reload)");
    lab.write_config(&[0, 2])?;
    agent.reload()?;
    let mut after = Vec::new();
    for r in 0..args.rounds {
        after = round(&format!("after, round {}", r + 1), &mut flows);
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
