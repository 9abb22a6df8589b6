//! The flood guard as deployed: no static neighbours, default sysctls apart from
//! forwarding, `snat: auto`, `xlb run` with its default flags apart from a config with
//! `flood_guard.new_flows_per_cpu: 50`. A burst of new UDP flows from the client turns
//! the guard on: the agent warns, nat flows above the limit are dropped and counted,
//! and a flow that existed before the burst is answered during it. A second later new
//! flows get entries again.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use xlb_tests::{
    agent::status_json,
    privileged,
    topology::{LbLab, Network, VIP4},
};

const LIMIT: u64 = 50;
const BURST: u64 = 300;
const TRY: Duration = Duration::from_millis(900);

fn counter(pin: &std::path::Path, name: &str) -> u64 {
    status_json(pin).unwrap()["counters"][name]["packets"]
        .as_u64()
        .unwrap_or(0)
}

fn ask(s: &UdpSocket, to: SocketAddr) -> std::io::Result<usize> {
    s.send_to(b"q", to)?;
    let mut buf = [0u8; 256];
    s.recv_from(&mut buf).map(|(n, _)| n)
}

fn fresh_socket() -> UdpSocket {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(TRY)).unwrap();
    s
}

#[test]
fn privileged_as_deployed_flood_guard_drops_new_nat_flows_and_spares_existing_ones() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
    lab.write(&lab.services(&[0, 1, 2]).flood_guard(LIMIT as u32))
        .unwrap();
    let _servers = lab.start_backends(Duration::from_secs(60)).unwrap();
    let mut agent = lab.agent().start().unwrap();
    let vip = SocketAddr::new(VIP4.parse::<IpAddr>().unwrap(), 53);

    let (existing_before, during, dropped_by_burst, after) = lab
        .client
        .run(move || {
            // A flow with its entry, made well before the burst (one try each: the
            // agent resolves the backends' neighbours ahead of time).
            let existing = fresh_socket();
            let before = ask(&existing, vip).is_ok();
            std::thread::sleep(Duration::from_millis(1100));
            // The burst: each datagram from a new port, as fast as one thread sends.
            let burst: Vec<UdpSocket> = (0..BURST).map(|_| fresh_socket()).collect();
            for s in &burst {
                s.send_to(b"q", vip).unwrap();
            }
            // Within the same second: the existing flow is answered.
            let during = ask(&existing, vip).is_ok();
            // Every answer there will be has come by now; unanswered sockets read nothing.
            std::thread::sleep(Duration::from_millis(300));
            let answered = burst
                .iter()
                .filter(|s| {
                    s.set_nonblocking(true).unwrap();
                    let mut buf = [0u8; 64];
                    s.recv_from(&mut buf).is_ok()
                })
                .count() as u64;
            std::thread::sleep(Duration::from_millis(1500));
            let after = ask(&fresh_socket(), vip).is_ok();
            (before, during, BURST - answered, after)
        })
        .unwrap();
    assert!(existing_before, "the flow before the burst was answered");
    assert!(
        during,
        "a flow with an entry is answered while the guard is on\n{}",
        agent.logs()
    );
    agent
        .wait_for_log("flood guard on", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.logs()));
    let dropped = counter(&agent.pin_path, "drop_flood_nat");
    // On one CPU at most LIMIT new flows per second get entries; the burst may straddle
    // a window's end and, if the sender moved, two CPUs' windows: 4 × LIMIT at most.
    assert!(
        dropped >= BURST - 4 * LIMIT,
        "drop_flood_nat {dropped} of a burst of {BURST} at {LIMIT}/s per CPU"
    );
    assert_eq!(
        dropped, dropped_by_burst,
        "every unanswered datagram of the burst is one drop_flood_nat"
    );
    assert!(after, "a new flow a second after the burst is answered");
}
