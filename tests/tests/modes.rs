//! The client's address at the backend, end to end: `dnat` and `dsr` through real
//! namespaces, on a network as deployed (untuned veths, no static neighbours, default
//! sysctls apart from forwarding, `xlb run` with default flags). Each backend answers
//! with the peer address it sees, which must be the client's. For dsr, the backends run
//! `xlb run --decap` and the replies must bypass the LB. And a TCP connection moved
//! from one LB node to another mid-stream (what an ECMP rehash does) survives in dsr
//! and dnat, and cannot in nat.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use xlb_tests::{
    agent::{status_json, Agent},
    cfg::{Cfg, Mode},
    peer::{one_try_each, parse, serve, TCP_PORT, UDP_PORT},
    privileged, report,
    segment::SegmentLab,
    topology::{VIP4, VIP6},
    unique_name, RemoveOnDrop,
};

fn client_addr(lab: &SegmentLab, vip: IpAddr) -> IpAddr {
    if vip.is_ipv4() {
        lab.client4
    } else {
        lab.client6
    }
}

fn pin() -> (PathBuf, RemoveOnDrop) {
    let p = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbm")));
    (p.clone(), RemoveOnDrop(p))
}

fn counter(pin: &std::path::Path, name: &str) -> u64 {
    status_json(pin).unwrap()["counters"][name]["packets"]
        .as_u64()
        .unwrap_or(0)
}

/// An LB node's agent with default flags: only its interface, a config, a pin path.
fn lb_agent(lab: &SegmentLab, k: usize, cfg: &std::path::Path, pin: &std::path::Path) -> Agent {
    lab.lbs[k]
        .agent()
        .config(cfg)
        .pin_path(pin)
        .start()
        .unwrap()
}

fn write_config(cfg: &Cfg) -> (PathBuf, RemoveOnDrop) {
    let p = std::env::temp_dir().join(format!("{}.yaml", unique_name("xmd")));
    cfg.write(&p).unwrap();
    (p.clone(), RemoveOnDrop(p))
}

/// The nonzero datapath counters at a pin path, for failure messages.
fn counters(pin: &std::path::Path) -> String {
    let st = status_json(pin).unwrap_or_default();
    st["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v["packets"].as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k}={}", v["packets"]))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn check_traffic(
    lab: &SegmentLab,
    mode: &str,
    n: usize,
    pins: &[&std::path::Path],
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for vip in [VIP4, VIP6] {
        let vip: IpAddr = vip.parse().unwrap();
        let o = one_try_each(
            &lab.client,
            client_addr(lab, vip),
            vip,
            n,
            lab.backends.len(),
        );
        assert!(
            o.lost == 0,
            "{mode} {vip}: {} of {} exchanges lost (first: {:?})\ncounters:\n{}",
            o.lost,
            2 * n,
            o.first_err,
            pins.iter()
                .map(|p| counters(p))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            o.wrong_peer.is_empty(),
            "{mode} {vip}: the backend saw another address than the client's: {:?}",
            o.wrong_peer
        );
        assert!(
            o.per_backend.iter().all(|&c| c > 0),
            "{mode} {vip}: every backend takes flows: {:?}",
            o.per_backend
        );
        out.insert(
            vip.to_string(),
            serde_json::json!({"exchanges": 2 * n, "lost": o.lost, "per_backend": o.per_backend, "client_address_seen": 2 * n - o.wrong_peer.len()}),
        );
    }
    serde_json::Value::Object(out)
}

#[test]
fn privileged_dnat_backends_see_the_client_as_deployed() {
    if !privileged() {
        return;
    }
    let lab = SegmentLab::new(1, 3).unwrap();
    lab.backends_return_via(0).unwrap();
    let life = Duration::from_secs(60);
    let any = SocketAddr::from(([0u16; 8], UDP_PORT));
    let _servers: Vec<_> = (0..3)
        .flat_map(|i| serve(&lab.backends[i].ns, i, TCP_PORT, &[any], life))
        .collect();
    let (cfg, _c) = write_config(&lab.config(Mode::Dnat, TCP_PORT, UDP_PORT));
    let (p, _g) = pin();
    let agent = lb_agent(&lab, 0, &cfg, &p);
    let counts = check_traffic(&lab, "dnat", 100, &[&p]);
    // The replies came back through the LB and were translated there.
    let reverse = counter(&p, "fwd_reverse");
    assert!(
        reverse >= 400,
        "replies translated back: {reverse}\n{}",
        agent.logs()
    );
    report("modes_dnat", counts);
}

#[test]
fn privileged_dsr_backends_see_the_client_and_replies_bypass_the_lb() {
    if !privileged() {
        return;
    }
    let lab = SegmentLab::new(1, 3).unwrap();
    lab.vips_on_backends().unwrap();
    let life = Duration::from_secs(60);
    // A UDP server answers from the address it is bound to: bound to the VIPs, as a
    // dsr backend's must be.
    let binds = [
        SocketAddr::new(VIP4.parse().unwrap(), UDP_PORT),
        SocketAddr::new(VIP6.parse().unwrap(), UDP_PORT),
    ];
    let _servers: Vec<_> = (0..3)
        .flat_map(|i| serve(&lab.backends[i].ns, i, TCP_PORT, &binds, life))
        .collect();
    let decap = lab.decap_agents();
    let (cfg, _c) = write_config(&lab.config(Mode::Dsr, TCP_PORT, UDP_PORT));
    let (p, _g) = pin();
    let agent = lb_agent(&lab, 0, &cfg, &p);
    let mut pins: Vec<&std::path::Path> = vec![&p];
    pins.extend(decap.iter().map(|a| a.pin_path.as_path()));
    let mut counts = check_traffic(&lab, "dsr", 100, &pins);
    // Nothing came back through the LB: every TCP/UDP packet it saw was one it sent on
    // to a backend, and it translated no reply.
    let seen: u64 = [
        "seen_ipv4_tcp",
        "seen_ipv4_udp",
        "seen_ipv6_tcp",
        "seen_ipv6_udp",
    ]
    .iter()
    .map(|c| counter(&p, c))
    .sum();
    let forwarded = counter(&p, "fwd_forward");
    assert_eq!(counter(&p, "fwd_reverse"), 0, "{}", agent.logs());
    assert_eq!(
        seen, forwarded,
        "TCP/UDP packets at the LB that it did not forward: replies"
    );
    let decapsulated: u64 = decap
        .iter()
        .map(|a| counter(&a.pin_path, "pass_decapsulated"))
        .sum();
    assert_eq!(
        decapsulated, forwarded,
        "every forwarded packet decapsulated by a backend"
    );
    // A full-size datagram no longer fits once encapsulated: the LB answers with ICMP
    // too-big from the VIP, and the client's kernel takes the smaller path MTU.
    for (vip, payload, want) in [(VIP4, 1472, "mtu 1480"), (VIP6, 1452, "mtu 1460")] {
        let to = SocketAddr::new(vip.parse().unwrap(), UDP_PORT);
        lab.client
            .run(move || {
                let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                    .parse()
                    .unwrap();
                let s = std::net::UdpSocket::bind(any).unwrap();
                s.send_to(&vec![0x5a; payload], to).unwrap();
            })
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let out = lab.client.ip(&["route", "get", vip]).unwrap();
            let route = String::from_utf8_lossy(&out.stdout).into_owned();
            if route.contains(want) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{vip}: no {want} learnt by the client: {route}\n{}",
                counters(&p)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(counter(&p, "icmp_too_big_sent"), 2);
    counts["pmtu_learnt_by_client"] = "1480 (IPv4), 1460 (IPv6)".into();
    counts["lb_tcp_udp_packets_seen"] = seen.into();
    counts["lb_forwarded"] = forwarded.into();
    counts["backends_decapsulated"] = decapsulated.into();
    report("modes_dsr", counts);
}

/// Long-lived TCP connections through LB node 0; the router then sends the VIPs to
/// node 1. Returns, per connection, whether it kept working and the backend it reached.
fn move_between_nodes(mode: &str) -> (Vec<bool>, serde_json::Value) {
    let lab = SegmentLab::new(2, 3).unwrap();
    let life = Duration::from_secs(60);
    let binds: Vec<SocketAddr> = if mode == "dsr" {
        lab.vips_on_backends().unwrap();
        vec![]
    } else {
        if mode == "dnat" {
            // The shared return path: the backends answer through node 0, which keeps
            // translating the flows it first saw.
            lab.backends_return_via(0).unwrap();
        }
        vec![]
    };
    let _servers: Vec<_> = (0..3)
        .flat_map(|i| serve(&lab.backends[i].ns, i, TCP_PORT, &binds, life))
        .collect();
    let _decap = if mode == "dsr" {
        lab.decap_agents()
    } else {
        Vec::new()
    };
    let (cfg, _c) = write_config(&lab.config(xlb_tests::cfg::mode(mode), TCP_PORT, UDP_PORT));
    let (p0, _g0) = pin();
    let (p1, _g1) = pin();
    let _a0 = lb_agent(&lab, 0, &cfg, &p0);
    let _a1 = lb_agent(&lab, 1, &cfg, &p1);
    let vips: Vec<IpAddr> = [VIP4, VIP4, VIP6, VIP6]
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    let mut conns: Vec<TcpStream> = vips
        .iter()
        .map(|&vip| {
            lab.client
                .run(move || {
                    let s = TcpStream::connect_timeout(
                        &SocketAddr::new(vip, TCP_PORT),
                        Duration::from_secs(3),
                    )
                    .unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    s
                })
                .unwrap()
        })
        .collect();
    let exchange = |s: &mut TcpStream, msg: &str| -> Option<(usize, IpAddr)> {
        s.write_all(msg.as_bytes()).ok()?;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).ok()?;
        let (b, peer, echoed) = parse(&buf[..n])?;
        (echoed == msg).then_some((b, peer))
    };
    let before: Vec<(usize, IpAddr)> = conns
        .iter_mut()
        .enumerate()
        .map(|(i, s)| exchange(s, &format!("before{i}")).expect("works through node 0"))
        .collect();
    lab.route_vips_via(1).unwrap();
    let mut kept = Vec::new();
    let mut after_backends = Vec::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let mut ok = true;
        for j in 0..5 {
            match exchange(s, &format!("after{i}.{j}")) {
                Some(got) if got == before[i] => {}
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        kept.push(ok);
        after_backends.push(before[i].0);
    }
    let moved_through = counter(&p1, "fwd_forward");
    (
        kept.clone(),
        serde_json::json!({"mode": mode, "connections": kept.len(), "survived": kept.iter().filter(|k| **k).count(), "node1_forwarded": moved_through, "backends": after_backends}),
    )
}

#[test]
fn privileged_dsr_connection_survives_a_move_to_another_lb_node() {
    if !privileged() {
        return;
    }
    let (kept, counts) = move_between_nodes("dsr");
    report("modes_move_dsr", counts.clone());
    assert!(kept.iter().all(|k| *k), "{counts}");
    assert!(
        counts["node1_forwarded"].as_u64().unwrap() > 0,
        "the flows did move: {counts}"
    );
}

#[test]
fn privileged_dnat_connection_survives_a_move_with_a_shared_return_path() {
    if !privileged() {
        return;
    }
    let (kept, counts) = move_between_nodes("dnat");
    report("modes_move_dnat", counts.clone());
    assert!(kept.iter().all(|k| *k), "{counts}");
    assert!(
        counts["node1_forwarded"].as_u64().unwrap() > 0,
        "the flows did move: {counts}"
    );
}

/// nat cannot: node 1 translates the client to its own address and port, so the
/// backend sees a 4-tuple it has no connection for and resets it.
#[test]
fn privileged_nat_connection_is_lost_on_a_move() {
    if !privileged() {
        return;
    }
    let (kept, counts) = move_between_nodes("nat");
    report("modes_move_nat", counts.clone());
    assert!(kept.iter().all(|k| !*k), "{counts}");
}

/// dnat to backends running on the LB node itself (pods behind veths of the node): the
/// replies are routed by the node and leave through its interface, where the TC
/// egress program translates them; XDP sees none of them.
#[test]
fn privileged_dnat_to_pods_on_the_lb_node_replies_through_tc_egress() {
    if !privileged() {
        return;
    }
    let lab = SegmentLab::new(1, 0).unwrap();
    let pods: Vec<_> = (0..2).map(|i| lab.pod_on_lb(0, i).unwrap()).collect();
    let life = Duration::from_secs(60);
    let any = SocketAddr::from(([0u16; 8], UDP_PORT));
    let _servers: Vec<_> = pods
        .iter()
        .enumerate()
        .flat_map(|(i, p)| serve(&p.ns, i, TCP_PORT, &[any], life))
        .collect();
    let (cfg, _c) = write_config(&xlb_tests::segment::config_for(
        &pods,
        [VIP4, VIP6],
        Mode::Dnat,
        TCP_PORT,
        UDP_PORT,
    ));
    let (p, _g) = pin();
    let agent = lb_agent(&lab, 0, &cfg, &p);
    let st = status_json(&p).unwrap();
    assert_eq!(st["attachments"][0]["tc_egress"], true, "{st:#}");
    let mut out = serde_json::Map::new();
    for vip in [VIP4, VIP6] {
        let vip: IpAddr = vip.parse().unwrap();
        let o = one_try_each(&lab.client, client_addr(&lab, vip), vip, 50, pods.len());
        assert!(
            o.lost == 0 && o.wrong_peer.is_empty(),
            "{vip}: lost {} (first {:?}), wrong peers {:?}\n{}\n{}",
            o.lost,
            o.first_err,
            o.wrong_peer,
            counters(&p),
            agent.logs()
        );
        assert!(o.per_backend.iter().all(|&c| c > 0), "{:?}", o.per_backend);
        out.insert(
            vip.to_string(),
            serde_json::json!({"exchanges": 100, "lost": 0, "per_backend": o.per_backend}),
        );
    }
    let egress = counter(&p, "event_egress_translated");
    assert!(egress >= 400, "replies translated at egress: {egress}");
    assert_eq!(counter(&p, "fwd_reverse"), 0, "no reply went through XDP");
    out.insert("egress_translated".into(), egress.into());
    report("modes_dnat_local_pods", serde_json::Value::Object(out));
}
