//! xlb balancing real TCP and UDP through network namespaces: client → LB (xlb) → three
//! backends, two-arm, in native and generic XDP mode, over IPv4 and IPv6.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use lb_common::{flow_hash, FlowKey, PROTO_TCP, PROTO_UDP};
use xlb::{
    codec::addr_to_words,
    maglev::{build, WeightedBackend},
};
use xlb_tests::{
    agent::Start,
    netns::Netns,
    privileged,
    topology::{LbLab, VIP4, VIP6},
    traffic::{backend_index, connect, parse_reply, tcp_echo, Conn},
};

const M: u32 = 16381;

/// The backend index Maglev picks for this flow, computed in userspace with the same
/// flow hash as the datapath.
fn predict(
    lab: &LbLab,
    live: &[usize],
    client: IpAddr,
    sport: u16,
    vip: SocketAddr,
    proto: u8,
) -> usize {
    let addr = |i: usize| lab.backend(i, vip.is_ipv6());
    let bs: Vec<WeightedBackend> = live
        .iter()
        .map(|&i| WeightedBackend {
            addr: addr(i),
            weight: 1,
        })
        .collect();
    let table = build(&bs, M).unwrap();
    let (src, family) = addr_to_words(client);
    let (dst, _) = addr_to_words(vip.ip());
    let key = FlowKey {
        src,
        dst,
        sport: sport.to_be(),
        dport: vip.port().to_be(),
        proto,
        family,
        _pad: [0; 2],
    };
    live[table[(flow_hash(&key, false) % M) as usize] as usize]
}

fn udp_exchange(client: &Netns, vip: SocketAddr, msg: &str) -> (u16, usize) {
    let msg = msg.to_owned();
    client
        .run(move || {
            let bind: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .unwrap();
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(msg.as_bytes(), vip).unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("UDP to {vip}: {e}"));
            assert_eq!(from, vip, "the UDP answer comes from the VIP");
            let (name, echoed) = parse_reply(&buf[..n]).unwrap();
            assert_eq!(echoed, msg.as_bytes());
            (s.local_addr().unwrap().port(), backend_index(&name))
        })
        .unwrap()
}

fn balance_through_namespaces(lab: LbLab, mode: &str) {
    lab.write_config(&[0, 1, 2]).unwrap();
    let life = Duration::from_secs(60);
    let servers = lab.start_backends(life).unwrap();
    let lb_server = tcp_echo(&lab.lb, SocketAddr::new(lab.snat4, 9000), "lb", life).unwrap();
    // One-arm native: XDP_TX on a veth needs an XDP program on its peer; a second,
    // config-less xlb there passes everything.
    let _peer_xdp = match (&lab.switch, &lab.lb_switch_port, mode) {
        (Some(sw), Some(port), "native") => {
            let empty = xlb_tests::empty_config();
            Some(
                Start::new(sw, port)
                    .xdp_mode("native")
                    .config(empty.path())
                    .start()
                    .unwrap(),
            )
        }
        _ => None,
    };
    let mut agent = lab.agent().xdp_mode(mode).start().unwrap();

    // Short flows over both families: every one succeeds (so the checksums are right),
    // and lands where Maglev, computed in userspace, says it should.
    let all = [0, 1, 2];
    for (vip_ip, client_ip) in [(VIP4, lab.client4), (VIP6, lab.client6)] {
        let tcp_vip = SocketAddr::new(vip_ip.parse().unwrap(), 80);
        let udp_vip = SocketAddr::new(vip_ip.parse().unwrap(), 53);
        let mut used = [0usize; 3];
        for i in 0..30 {
            let mut c = connect(&lab.client, tcp_vip);
            let got = c.exchange(&format!("tcp-{i}")).unwrap();
            assert_eq!(
                got,
                predict(&lab, &all, client_ip, c.sport, tcp_vip, PROTO_TCP),
                "TCP flow from port {}",
                c.sport
            );
            used[got] += 1;
        }
        for i in 0..30 {
            let (sport, got) = udp_exchange(&lab.client, udp_vip, &format!("udp-{i}"));
            assert_eq!(
                got,
                predict(&lab, &all, client_ip, sport, udp_vip, PROTO_UDP),
                "UDP flow from port {sport}"
            );
            used[got] += 1;
        }
        assert!(
            used.iter().all(|&n| n > 0),
            "{vip_ip}: every backend got flows: {used:?}"
        );
    }

    // Long-lived connections survive removing and re-adding a backend (config reload):
    // only the removed backend's flows move.
    let tcp_vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    // Client ports are random, so open connections until at least 3 are on b1 and 3
    // elsewhere (bounded: 60 misses in a row would have odds of about 1e-9).
    let mut long: Vec<(Conn, usize)> = Vec::new();
    let enough = |long: &Vec<(Conn, usize)>| {
        let on_b1 = long.iter().filter(|(_, b)| *b == 1).count();
        on_b1 >= 3 && long.len() - on_b1 >= 3
    };
    for i in 0..60 {
        if enough(&long) {
            break;
        }
        let mut c = connect(&lab.client, tcp_vip);
        let b = c.exchange(&format!("hello-{i}")).unwrap();
        long.push((c, b));
    }
    assert!(enough(&long), "need flows on b1 and elsewhere");
    lab.write_config(&[0, 2]).unwrap();
    agent.reload().unwrap();
    for (c, b) in long.iter_mut().filter(|(_, b)| *b != 1) {
        assert_eq!(
            c.exchange("after-remove").unwrap(),
            *b,
            "an established flow moved"
        );
    }
    let client4 = lab.client4;
    for i in 0..15 {
        let mut c = connect(&lab.client, tcp_vip);
        let got = c.exchange(&format!("new-{i}")).unwrap();
        assert_ne!(got, 1, "a removed backend got a new flow");
        assert_eq!(
            got,
            predict(&lab, &[0, 2], client4, c.sport, tcp_vip, PROTO_TCP)
        );
    }
    lab.write_config(&[0, 1, 2]).unwrap();
    agent.reload().unwrap();
    for (c, b) in long.iter_mut().filter(|(_, b)| *b != 1) {
        assert_eq!(
            c.exchange("after-add").unwrap(),
            *b,
            "an established flow moved when a backend came back"
        );
    }

    // Traffic for the LB host itself is untouched.
    let mut own = connect(&lab.client, SocketAddr::new(lab.snat4, 9000));
    own.stream.write_all(b"own").unwrap();
    let mut buf = [0u8; 64];
    let n = own.stream.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"lb|own");

    let st = agent.status().unwrap();
    let tcp4 = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vip"] == VIP4 && s["port"] == 80)
        .unwrap();
    let backend_flows = |addr: &str| {
        tcp4["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == addr)
            .map(|b| b["stats"]["new_flows"].as_u64().unwrap())
    };
    let per_backend: Vec<Option<u64>> = (0..3)
        .map(|i| backend_flows(&lab.backend(i, false).to_string()))
        .collect();
    // 30 short + the long-lived + 15 new, plus the flows that were on b1 and got
    // rebalanced when they spoke again (none: they stayed silent). In the service's
    // totals: b1's flows stayed there when it was removed, and b1 came back from zero.
    assert_eq!(
        tcp4["stats"]["new_flows"].as_u64().unwrap(),
        30 + long.len() as u64 + 15,
        "new flows in the service's totals: {tcp4}"
    );
    assert_eq!(
        per_backend[1],
        Some(0),
        "b1, back after its removal: {tcp4}"
    );
    let counted: u64 = per_backend.iter().flatten().sum();
    assert!(
        counted < 30 + long.len() as u64 + 15,
        "the backends' own counters hold b1's flows from before its removal too: {tcp4}"
    );
    assert!(st["counters"]["fwd_reverse"]["packets"].as_u64().unwrap() > 0);
    drop((servers, lb_server));
}

#[test]
fn privileged_two_arm_native_balances_tcp_udp_v4_v6() {
    if !privileged() {
        return;
    }
    balance_through_namespaces(LbLab::two_arm(3).unwrap(), "native");
}

#[test]
fn privileged_two_arm_generic_balances_tcp_udp_v4_v6() {
    if !privileged() {
        return;
    }
    balance_through_namespaces(LbLab::two_arm(3).unwrap(), "generic");
}

#[test]
fn privileged_one_arm_native_balances_tcp_udp_v4_v6() {
    if !privileged() {
        return;
    }
    balance_through_namespaces(LbLab::one_arm(3).unwrap(), "native");
}

#[test]
fn privileged_one_arm_generic_balances_tcp_udp_v4_v6() {
    if !privileged() {
        return;
    }
    balance_through_namespaces(LbLab::one_arm(3).unwrap(), "generic");
}
