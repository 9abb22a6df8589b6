//! VIPs announced over BGP through the host's routing daemon, end to end with BIRD 2:
//! two LB nodes on a segment behind a router, each running xlb (`--announce-routes-
//! table 200`, otherwise default flags) and BIRD with deploy/bgp/bird.conf as shipped
//! (addresses substituted); the router runs deploy/bgp/bird-router.conf and installs
//! one multipath route per VIP. The services are dsr, so a flow survives a change of
//! node. Nothing is resolved ahead, and no static route to the VIPs exists.
//!
//! Shown: the VIP in table 200 while the service has backends and not after; the
//! router's multipath route; flows over both nodes, each on the backend Maglev
//! predicts; `xlb drain` removing node A's path with no established flow broken; node
//! A detached, its flows moving to B and surviving.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_common::{flow_hash, FlowKey, PROTO_TCP};
use xlb::{
    codec::addr_to_words,
    maglev::{build, WeightedBackend, DEFAULT_TABLE_SIZE},
};
use xlb_tests::{
    agent::{status_json, xlb_cmd, Agent},
    bird::Bird,
    cfg::Mode,
    netns::Netns,
    peer::{parse, serve, TCP_PORT},
    privileged, report,
    segment::SegmentLab,
    topology::{VIP4, VIP6},
    unique_name, RemoveOnDrop,
};

const TABLE: &str = "200";

fn shipped(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/bgp")
            .join(name),
    )
    .unwrap()
}

/// deploy/bgp/bird.conf for LB node `k`: its own address as router id and source, the
/// router as its peer.
fn node_conf(lab: &SegmentLab, k: usize) -> String {
    shipped("bird.conf")
        .replace("10.0.0.11", "@SELF@")
        .replace("10.0.0.1", "10.61.0.1")
        .replace("2001:db8::1", "fd61::1")
        .replace("@SELF@", &lab.lbs[k].addr4.to_string())
}

fn router_conf(lab: &SegmentLab) -> String {
    shipped("bird-router.conf")
        .replace("10.0.0.11", &lab.lbs[0].addr4.to_string())
        .replace("10.0.0.12", &lab.lbs[1].addr4.to_string())
        .replace("2001:db8::11", &lab.lbs[0].addr6.to_string())
        .replace("2001:db8::12", &lab.lbs[1].addr6.to_string())
        .replace("10.0.0.1", "10.61.0.1")
}

/// One agent per LB node, each with its own dsr config file and pin path and
/// `--announce-routes-table 200`, otherwise default flags.
struct Nodes {
    cfgs: Vec<(PathBuf, RemoveOnDrop)>,
    pins: Vec<(PathBuf, RemoveOnDrop)>,
    agents: Vec<Agent>,
}

fn start_nodes(lab: &SegmentLab) -> Nodes {
    let n = lab.lbs.len();
    let cfgs: Vec<(PathBuf, RemoveOnDrop)> = (0..n)
        .map(|_| {
            let p = std::env::temp_dir().join(format!("{}.yaml", unique_name("xan")));
            lab.config(Mode::Dsr, TCP_PORT, 53).write(&p).unwrap();
            (p.clone(), RemoveOnDrop(p))
        })
        .collect();
    let pins: Vec<(PathBuf, RemoveOnDrop)> = (0..n)
        .map(|_| {
            let p = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xan")));
            (p.clone(), RemoveOnDrop(p))
        })
        .collect();
    let agents = (0..n)
        .map(|k| {
            let node = &lab.lbs[k];
            node.agent()
                .config(&cfgs[k].0)
                .args(&["--announce-routes-table", TABLE])
                .pin_path(&pins[k].0)
                .start()
                .unwrap()
        })
        .collect();
    Nodes { cfgs, pins, agents }
}

/// The router's next hops for `vip`, as the kernel has them.
fn router_paths(lab: &SegmentLab, vip: &str) -> Vec<IpAddr> {
    let fam = if vip.contains(':') { "-6" } else { "-4" };
    let out = lab.router.ip(&[fam, "route", "show", vip]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut hops: Vec<IpAddr> = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    hops.sort();
    hops
}

/// Waits (bounded) until the router's paths to both VIPs are `want`; returns how long.
fn wait_paths(lab: &SegmentLab, want: &[IpAddr], want6: &[IpAddr], what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (p4, p6) = (router_paths(lab, VIP4), router_paths(lab, VIP6));
        if p4 == want && p6 == want6 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: router paths {p4:?} / {p6:?}, want {want:?} / {want6:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn table_200(ns: &Netns) -> String {
    let mut s = String::new();
    for fam in ["-4", "-6"] {
        let out = ns
            .ip(&[fam, "route", "show", "table", TABLE, "proto", "248"])
            .unwrap();
        s.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    s
}

/// The backend Maglev puts a flow on, as every node computes it.
fn predicted(lab: &SegmentLab, client: IpAddr, sport: u16, vip: IpAddr) -> usize {
    let bs: Vec<WeightedBackend> = lab
        .backends
        .iter()
        .map(|b| WeightedBackend {
            addr: SocketAddr::new(if vip.is_ipv4() { b.addr4 } else { b.addr6 }, TCP_PORT),
            weight: 1,
        })
        .collect();
    let table = build(&bs, DEFAULT_TABLE_SIZE).unwrap();
    let (src, family) = addr_to_words(client);
    let key = FlowKey {
        src,
        dst: addr_to_words(vip).0,
        sport: sport.to_be(),
        dport: TCP_PORT.to_be(),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    };
    table[(flow_hash(&key, false) % DEFAULT_TABLE_SIZE) as usize] as usize
}

fn counter(pin: &Path, name: &str) -> u64 {
    status_json(pin).unwrap()["counters"][name]["packets"]
        .as_u64()
        .unwrap_or(0)
}

struct Conn {
    s: TcpStream,
    backend: usize,
}

fn open(lab: &SegmentLab, vip: IpAddr) -> (TcpStream, u16) {
    let s = lab
        .client
        .run(move || {
            TcpStream::connect_timeout(&SocketAddr::new(vip, TCP_PORT), Duration::from_secs(3))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("connect {vip}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let sport = s.local_addr().unwrap().port();
    (s, sport)
}

fn exchange(c: &mut TcpStream, msg: &str) -> Option<usize> {
    c.write_all(msg.as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    let n = c.read(&mut buf).ok()?;
    let (b, _, echoed) = parse(&buf[..n])?;
    (echoed == msg).then_some(b)
}

#[test]
fn privileged_bgp_through_bird_ecmp_drain_and_node_failure() {
    if !privileged() {
        return;
    }
    let lab = SegmentLab::new(2, 3).unwrap();
    // Only BGP routes the VIPs: no static route.
    lab.router
        .ip(&["route", "del", &format!("{VIP4}/32")])
        .unwrap();
    lab.router
        .ip(&["-6", "route", "del", &format!("{VIP6}/128")])
        .unwrap();
    // An L4 hash, so the router spreads one client's flows over the nodes.
    lab.router
        .sysctl("net.ipv4.fib_multipath_hash_policy", "1")
        .unwrap();
    lab.router
        .sysctl("net.ipv6.fib_multipath_hash_policy", "1")
        .unwrap();
    lab.vips_on_backends().unwrap();
    let life = Duration::from_secs(90);
    let _servers: Vec<_> = (0..3)
        .flat_map(|i| serve(&lab.backends[i].ns, i, TCP_PORT, &[], life))
        .collect();
    let _decap = lab.decap_agents();
    let Nodes {
        cfgs: cfg_paths,
        pins,
        mut agents,
    } = start_nodes(&lab);
    // Table 200 holds both VIPs, marked as xlb's.
    for k in 0..2 {
        let t = table_200(&lab.lbs[k].ns);
        assert!(
            t.contains(VIP4) && t.contains(VIP6),
            "node {k} table 200:\n{t}"
        );
    }
    let st = status_json(&pins[0].0).unwrap();
    assert_eq!(st["announced"].as_array().unwrap().len(), 2, "{st:#}");
    assert_eq!(st["drained"], false);

    let router = Bird::start(&lab.router, &router_conf(&lab)).unwrap();
    let birds: Vec<Bird> = (0..2)
        .map(|k| Bird::start(&lab.lbs[k].ns, &node_conf(&lab, k)).unwrap())
        .collect();
    router.wait_established(4, Duration::from_secs(30)).unwrap();
    let (a4, b4, a6, b6) = (
        lab.lbs[0].addr4,
        lab.lbs[1].addr4,
        lab.lbs[0].addr6,
        lab.lbs[1].addr6,
    );
    let converged = wait_paths(&lab, &[a4, b4], &[a6, b6], "multipath");

    // Flows spread over both nodes, each on the backend Maglev predicts.
    let mut conns = Vec::new();
    for i in 0..24 {
        let vip: IpAddr = if i % 2 == 0 { VIP4 } else { VIP6 }.parse().unwrap();
        let me = if vip.is_ipv4() {
            lab.client4
        } else {
            lab.client6
        };
        let (mut s, sport) = open(&lab, vip);
        let b = exchange(&mut s, &format!("hello{i}")).expect("first exchange");
        assert_eq!(
            b,
            predicted(&lab, me, sport, vip),
            "flow {i} on the predicted backend"
        );
        conns.push(Conn { s, backend: b });
    }
    let (fa, fb) = (
        counter(&pins[0].0, "fwd_forward"),
        counter(&pins[1].0, "fwd_forward"),
    );
    assert!(fa > 0 && fb > 0, "flows over both nodes: A {fa}, B {fb}");

    // Drain A: its paths leave the router; no established flow breaks.
    let out = xlb_cmd(&["drain", "--pin-path", pins[0].0.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drained_in = wait_paths(&lab, &[b4], &[b6], "after drain");
    assert!(table_200(&lab.lbs[0].ns).is_empty());
    assert_eq!(status_json(&pins[0].0).unwrap()["drained"], true);
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(
            exchange(&mut c.s, &format!("drained{i}")),
            Some(c.backend),
            "flow {i} after the drain"
        );
    }
    let out = xlb_cmd(&["undrain", "--pin-path", pins[0].0.to_str().unwrap()]).unwrap();
    assert!(out.status.success());
    let undrained_in = wait_paths(&lab, &[a4, b4], &[a6, b6], "after undrain");

    // A service left without backends is withdrawn; back with them, announced again.
    let no_backends =
        xlb_tests::segment::config_for(&[], [VIP4, VIP6], Mode::Dsr, TCP_PORT, 53).yaml();
    std::fs::write(&cfg_paths[1].0, &no_backends).unwrap();
    let emptied_in = wait_paths(&lab, &[a4], &[a6], "node B without backends");
    assert!(table_200(&lab.lbs[1].ns).is_empty(), "{no_backends}");
    lab.config(Mode::Dsr, TCP_PORT, 53)
        .write(&cfg_paths[1].0)
        .unwrap();
    wait_paths(&lab, &[a4, b4], &[a6, b6], "node B with backends again");

    // Node A fails: its agent stops and detaches. Its paths go, its flows move to B and
    // keep their backends (dsr, identical tables).
    agents[0].stop_with(libc::SIGINT).unwrap();
    let failed_in = wait_paths(&lab, &[b4], &[b6], "after node A detached");
    let before_b = counter(&pins[1].0, "fwd_forward");
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(
            exchange(&mut c.s, &format!("moved{i}")),
            Some(c.backend),
            "flow {i} after node A failed"
        );
    }
    assert!(counter(&pins[1].0, "fwd_forward") >= before_b + conns.len() as u64);
    report(
        "announce_bgp_bird",
        serde_json::json!({
            "bgp_sessions": 4,
            "multipath_converged_ms": converged.as_millis() as u64,
            "flows": conns.len(), "node_a_packets": fa, "node_b_packets": fb,
            "drain_to_router_ms": drained_in.as_millis() as u64,
            "undrain_to_router_ms": undrained_in.as_millis() as u64,
            "no_backends_to_router_ms": emptied_in.as_millis() as u64,
            "node_failure_to_router_ms": failed_in.as_millis() as u64,
            "flows_broken": 0,
        }),
    );
    drop(birds);
    drop(router);
}

/// For networks without BGP: a client on the segment, with no route to the VIPs (they
/// are in the segment's own subnet) and no static neighbour, reaches them through
/// xlb's answers to its ARP requests and neighbour solicitations. Then node A stops
/// (detached) and node B takes the VIPs over, as keepalived would move the role: B's
/// gratuitous ARP and unsolicited neighbour advertisement move the client's entries to
/// B's MAC, and new connections work.
#[test]
fn privileged_l2_answers_arp_and_ndp_and_a_takeover_moves_the_clients_entry() {
    if !privileged() {
        return;
    }
    const L2_VIP4: &str = "10.61.0.100";
    const L2_VIP6: &str = "fd61::100";
    let lab = SegmentLab::new(2, 3).unwrap();
    let client = lab.client_on_segment().unwrap();
    let life = Duration::from_secs(60);
    let _servers: Vec<_> = (0..3)
        .flat_map(|i| serve(&lab.backends[i].ns, i, TCP_PORT, &[], life))
        .collect();
    let cfg = std::env::temp_dir().join(format!("{}.yaml", unique_name("xl2")));
    xlb_tests::segment::config_for(&lab.backends, [L2_VIP4, L2_VIP6], Mode::Nat, TCP_PORT, 53)
        .write(&cfg)
        .unwrap();
    let _cfg = RemoveOnDrop(cfg.clone());
    let start = |k: usize, pin: &Path| {
        let n = &lab.lbs[k];
        n.agent()
            .config(&cfg)
            .args(&["--announce-l2", &n.iface])
            .pin_path(pin)
            .start()
            .unwrap()
    };
    let pins: Vec<(PathBuf, RemoveOnDrop)> = (0..2)
        .map(|_| {
            let p = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xl2")));
            (p.clone(), RemoveOnDrop(p))
        })
        .collect();
    let mut a = start(0, &pins[0].0);
    let connect_all = |round: &str| {
        for vip in [L2_VIP4, L2_VIP6] {
            let vip: IpAddr = vip.parse().unwrap();
            for i in 0..10 {
                let (mut s, _) = {
                    let s = client
                        .ns
                        .run(move || {
                            TcpStream::connect_timeout(
                                &SocketAddr::new(vip, TCP_PORT),
                                Duration::from_secs(3),
                            )
                        })
                        .unwrap()
                        .unwrap_or_else(|e| panic!("{round}: connect {vip}: {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    (s, 0)
                };
                assert!(
                    exchange(&mut s, &format!("{round}{i}")).is_some(),
                    "{round}: exchange with {vip}"
                );
            }
        }
    };
    connect_all("via-a");
    let mac_a = lab.lbs[0].ns.mac_string(&lab.lbs[0].iface).unwrap();
    let mac_b = lab.lbs[1].ns.mac_string(&lab.lbs[1].iface).unwrap();
    for vip in [L2_VIP4, L2_VIP6] {
        assert_eq!(
            client.ns.neighbour_mac(vip).as_deref(),
            Some(mac_a.as_str()),
            "the client resolved {vip} to node A"
        );
    }
    let answered = counter(&pins[0].0, "l2_answered");
    assert!(answered >= 2, "ARP and NDP answered by XDP: {answered}");

    // Node A stops and detaches; node B takes over.
    a.stop_with(libc::SIGINT).unwrap();
    let t0 = Instant::now();
    let _b = start(1, &pins[1].0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Vec<Option<String>> = [L2_VIP4, L2_VIP6]
            .iter()
            .map(|v| client.ns.neighbour_mac(v))
            .collect();
        if now.iter().all(|m| m.as_deref() == Some(mac_b.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client's entries did not move to node B ({mac_b}): {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved = t0.elapsed();
    connect_all("via-b");
    report(
        "announce_l2",
        serde_json::json!({"arp_ndp_answered_by_a": answered, "takeover_ms_from_b_start": moved.as_millis() as u64, "exchanges": 40}),
    );
}

/// deploy/bgp/frr.conf for LB node `k`, as shipped, addresses substituted.
fn frr_conf(lab: &SegmentLab, k: usize) -> String {
    shipped("frr.conf")
        .replace("10.0.0.11", &lab.lbs[k].addr4.to_string())
        .replace("10.0.0.1 ", "10.61.0.1 ")
        .replace("2001:db8::1 ", "fd61::1 ")
}

/// The router's IPv4 paths to VIP4 become `want`; returns how long it took.
fn wait_paths4(lab: &SegmentLab, want: &[IpAddr], what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let p4 = router_paths(lab, VIP4);
        if p4 == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: router paths {p4:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The shipped deploy/bgp/frr.conf, run as users run it: xlb and FRR (zebra and bgpd,
/// `ip import-table 200`, `redistribute table 200`) on each of two LB nodes, and a
/// BIRD router. The router learns the IPv4 VIP from both nodes, loses a node's path
/// within seconds of `xlb drain` there, and loses a node that goes. IPv4 only: FRR 8.4
/// (Debian's) has no `ipv6 import-table` (docs/announce.md).
#[test]
fn privileged_bgp_through_frr_as_shipped() {
    if !privileged() {
        return;
    }
    let lab = SegmentLab::new(2, 1).unwrap();
    lab.router
        .ip(&["route", "del", &format!("{VIP4}/32")])
        .unwrap();
    let Nodes {
        cfgs: _cfgs,
        pins,
        mut agents,
    } = start_nodes(&lab);
    let router = Bird::start(&lab.router, &router_conf(&lab)).unwrap();
    let frrs: Vec<xlb_tests::frr::Frr> = (0..2)
        .map(|k| xlb_tests::frr::Frr::start(&lab.lbs[k].ns, &frr_conf(&lab, k)).unwrap())
        .collect();
    if let Err(e) = router.wait_established(2, Duration::from_secs(30)) {
        panic!("{e:#}\nFRR node A:\n{}", frrs[0].log());
    }
    let (a4, b4) = (lab.lbs[0].addr4, lab.lbs[1].addr4);
    let learnt = wait_paths4(&lab, &[a4, b4], "both nodes through FRR");
    let out = xlb_cmd(&["drain", "--pin-path", pins[0].0.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drained = wait_paths4(&lab, &[b4], "after xlb drain on node A");
    assert!(drained < Duration::from_secs(5), "withdrawn in {drained:?}");
    let out = xlb_cmd(&["undrain", "--pin-path", pins[0].0.to_str().unwrap()]).unwrap();
    assert!(out.status.success());
    wait_paths4(&lab, &[a4, b4], "after undrain");
    // Node B goes: its agent stops and detaches, its routes leave table 200.
    agents[1].stop_with(libc::SIGINT).unwrap();
    let gone = wait_paths4(&lab, &[a4], "after node B went");
    report(
        "announce_bgp_frr",
        serde_json::json!({"bgp_sessions_ipv4": 2, "learnt_ms": learnt.as_millis() as u64,
                           "drain_to_router_ms": drained.as_millis() as u64,
                           "node_gone_to_router_ms": gone.as_millis() as u64}),
    );
    drop(frrs);
}
