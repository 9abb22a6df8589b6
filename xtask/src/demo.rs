//! The demo: two namespaces joined by a veth, `xlb run` attached on the server side,
//! real TCP and UDP traffic, and the live counters from `xlb status`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use xlb_tests::{
    agent::Agent,
    netns::{veth_pair, Netns},
    traffic::{tcp_echo, tcp_request, udp_echo, udp_request},
};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How long to drive traffic.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
}

pub fn run(args: DemoArgs) -> Result<()> {
    std::env::set_var("XLB_BIN", crate::workspace_root().join("target/debug/xlb"));
    println!("== xlb demo: client ns <-veth-> server ns with xlb attached (native XDP)");
    let client = Netns::new("demoC")?;
    let server = Netns::new("demoS")?;
    let (_c, s) = veth_pair(&client, &["10.99.0.1/24"], &server, &["10.99.0.2/24"])?;
    let agent = Agent::start(&server, &["--iface", &s.name, "--xdp-mode", "auto"])?;
    let tcp: SocketAddr = "10.99.0.2:8080".parse()?;
    let udp: SocketAddr = "10.99.0.2:5353".parse()?;
    let life = Duration::from_secs(args.seconds + 5);
    let _t = tcp_echo(&server, tcp, "server", life)?;
    let _u = udp_echo(&server, udp, "server", life)?;

    let start = Instant::now();
    let mut next_report = start;
    let (mut tcp_ok, mut udp_ok) = (0u64, 0u64);
    while start.elapsed() < Duration::from_secs(args.seconds) {
        tcp_ok += tcp_request(&client, tcp, b"hello over tcp").is_ok() as u64;
        udp_ok += udp_request(&client, udp, b"hello over udp").is_ok() as u64;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let st = agent.status()?;
            let c = |k: &str| st["counters"][k]["packets"].as_u64().unwrap_or(0);
            println!(
                "t={:>2}s  requests ok: tcp {tcp_ok:>5} udp {udp_ok:>5} | xlb saw: ipv4/tcp {:>6} ipv4/udp {:>6} passed(not a VIP) {:>6}",
                start.elapsed().as_secs(),
                c("seen_ipv4_tcp"),
                c("seen_ipv4_udp"),
                c("pass_not_vip"),
            );
        }
    }
    println!("== final counters (xlb status):");
    let out = std::process::Command::new(xlb_tests::agent::xlb_bin()?)
        .args(["status", "--pin-path"])
        .arg(&agent.pin_path)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("== tearing down namespaces");
    Ok(())
}
