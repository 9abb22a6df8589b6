//! Churn under load: long-lived TCP connections and UDP streams keep talking through
//! xlb while a loop adds, removes, reweights, drains and restores backends by config
//! reload. Flows whose backend remains never fail or move; flows of removed backends
//! are rebalanced (UDP continues elsewhere, TCP reconnects elsewhere); afterwards the
//! conntrack and reverse-NAT maps empty out.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_common::{ConnValue, ReverseNat, MAP_CONNTRACK, MAP_REVERSE_NAT};
use xlb::flows::FlowTable;
use xlb_tests::{
    cfg::{Cfg, Svc, Timeouts},
    privileged,
    topology::{LbLab, VIP4},
    traffic::{backend_index, connect, parse_reply, Conn},
};

const BACKENDS: usize = 4;

fn config(lab: &LbLab, weights: &[Option<u32>]) -> Cfg {
    let with_backends = |svc: Svc| {
        weights.iter().enumerate().fold(svc, |svc, (i, w)| match w {
            Some(w) => svc.weighted(lab.backend(i, false), *w),
            None => svc,
        })
    };
    Cfg::new()
        .snat4(lab.snat4)
        .timeouts(Timeouts {
            tcp_idle: 30,
            tcp_closing: 1,
            udp_idle: 3,
            gc_interval: 1,
            ..Default::default()
        })
        .service(with_backends(Svc::tcp("web", VIP4, 80)))
        .service(with_backends(Svc::udp("dns", VIP4, 53)))
}

fn udp_exchange(s: &UdpSocket, vip: SocketAddr, msg: &str) -> std::io::Result<usize> {
    s.send_to(msg.as_bytes(), vip)?;
    let mut buf = [0u8; 256];
    let (n, _) = s.recv_from(&mut buf)?;
    let (name, echoed) = parse_reply(&buf[..n]).ok_or(std::io::ErrorKind::InvalidData)?;
    assert_eq!(echoed, msg.as_bytes());
    Ok(backend_index(&name))
}

fn entries(pin: &std::path::Path) -> (usize, usize) {
    let ct = FlowTable::<ConnValue>::from_pin(&pin.join(MAP_CONNTRACK)).unwrap();
    let rv = FlowTable::<ReverseNat>::from_pin(&pin.join(MAP_REVERSE_NAT)).unwrap();
    (ct.entries().count(), rv.entries().count())
}

#[test]
fn privileged_churn_under_load_moves_only_removed_backends_flows() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(BACKENDS).unwrap();
    let mut weights: Vec<Option<u32>> = vec![Some(1), Some(1), Some(1), None];
    lab.write(&config(&lab, &weights)).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(120)).unwrap();
    let mut agent = lab.agent().xdp_mode("generic").start().unwrap();
    let tcp_vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let udp_vip: SocketAddr = format!("{VIP4}:53").parse().unwrap();

    const FLOWS: usize = 12;
    let mut tcp: Vec<(Conn, usize)> = (0..FLOWS)
        .map(|i| {
            let mut c = connect(&lab.client, tcp_vip);
            let b = c.exchange(&format!("t{i}")).unwrap();
            (c, b)
        })
        .collect();
    let mut udp: Vec<(UdpSocket, usize)> = (0..FLOWS)
        .map(|i| {
            let s = lab
                .client
                .run(|| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    s
                })
                .unwrap();
            let b = udp_exchange(&s, udp_vip, &format!("u{i}")).unwrap();
            (s, b)
        })
        .collect();

    let mut rng = 0x00c0_ffee_u64;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    const ROUNDS: usize = 24;
    let (mut failures, mut tcp_rebalanced, mut udp_rebalanced, mut exchanges) = (0, 0, 0, 0);
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        let i = next(BACKENDS);
        let active = weights.iter().filter(|w| w.is_some_and(|w| w > 0)).count();
        let op = match weights[i] {
            None => {
                weights[i] = Some(1);
                "add"
            }
            Some(w) if w > 0 && active <= 1 => {
                weights[i] = Some(w % 3 + 1);
                "reweight"
            }
            Some(0) => {
                weights[i] = if next(2) == 0 { Some(1) } else { None };
                if weights[i].is_some() {
                    "undrain"
                } else {
                    "remove drained"
                }
            }
            Some(w) => match next(3) {
                0 => {
                    weights[i] = None;
                    "remove"
                }
                1 => {
                    weights[i] = Some(0);
                    "drain"
                }
                _ => {
                    weights[i] = Some(w % 3 + 1);
                    "reweight"
                }
            },
        };
        *ops.entry(op).or_default() += 1;
        lab.write(&config(&lab, &weights)).unwrap();
        agent
            .reload()
            .unwrap_or_else(|e| panic!("round {round} ({op} b{i}): {e:#}"));

        for (k, (c, b)) in tcp.iter_mut().enumerate() {
            exchanges += 1;
            let present = weights[*b].is_some();
            match c.exchange(&format!("r{round} t{k}")) {
                Ok(got) if present => {
                    if got != *b {
                        failures += 1;
                        eprintln!("round {round}: TCP flow {k} moved b{b} → b{got}");
                    }
                }
                Err(e) if present => {
                    failures += 1;
                    eprintln!("round {round}: TCP flow {k} on b{b} (still present) failed: {e}");
                }
                _ => {
                    // Its backend is gone: the connection cannot survive; a new one
                    // lands on a backend that takes new flows.
                    let mut fresh = connect(&lab.client, tcp_vip);
                    let nb = fresh.exchange(&format!("r{round} t{k} again")).unwrap();
                    assert!(
                        weights[nb].is_some_and(|w| w > 0),
                        "reconnected to b{nb}, which takes no new flows"
                    );
                    *c = fresh;
                    *b = nb;
                    tcp_rebalanced += 1;
                }
            }
        }
        for (k, (s, b)) in udp.iter_mut().enumerate() {
            exchanges += 1;
            let present = weights[*b].is_some();
            match udp_exchange(s, udp_vip, &format!("r{round} u{k}")) {
                Ok(got) if present => {
                    if got != *b {
                        failures += 1;
                        eprintln!("round {round}: UDP flow {k} moved b{b} → b{got}");
                    }
                }
                Ok(got) => {
                    assert!(
                        weights[got].is_some_and(|w| w > 0),
                        "UDP flow {k} rebalanced to b{got}, which takes no new flows"
                    );
                    *b = got;
                    udp_rebalanced += 1;
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("round {round}: UDP flow {k} failed: {e}");
                }
            }
        }
    }
    println!(
        "churn: {ROUNDS} rounds {ops:?}, {} flows, {exchanges} exchanges, {tcp_rebalanced} TCP and {udp_rebalanced} UDP flows rebalanced, failures: {failures}",
        2 * FLOWS
    );
    xlb_tests::report(
        "churn",
        serde_json::json!({"rounds": ROUNDS, "flows": 2 * FLOWS, "exchanges": exchanges,
                           "tcp_rebalanced": tcp_rebalanced, "udp_rebalanced": udp_rebalanced, "failures": failures}),
    );
    assert_eq!(
        failures,
        0,
        "flows whose backend remained failed or moved:\n{}",
        agent.logs()
    );
    assert!(
        tcp_rebalanced + udp_rebalanced > 0,
        "the loop removed backends with flows on them"
    );

    // Afterwards: close everything; the closing and idle timeouts and the sweep empty
    // the tables (tcp_closing 1 s, udp_idle 3 s, sweep every second).
    drop(tcp);
    drop(udp);
    let start = Instant::now();
    loop {
        let (ct, rv) = entries(&agent.pin_path);
        if ct == 0 && rv == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "left behind: {ct} conntrack, {rv} reverse-NAT entries"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.logs().contains("config reloaded"));
}
