//! BPF_PROG_TEST_RUN fixtures for the NAT datapath, Katran-tester style: map state in,
//! packet in, then the verdict and the exact packet out (addresses, ports, MACs, TTL,
//! checksums recomputed from scratch). The cases of one packet (and one short sequence)
//! are rows (`privileged_nat_rows`); the rest stay functions: a reply addressed to the
//! SNAT port the flow got (known only from what came out), hundreds of flows compared
//! with each other, a table or a neighbour or a map entry changed between packets,
//! timeouts waited for.
//!
//! The runs happen inside a namespace with two veth pairs (client side and backend
//! side), static neighbours and forwarding on, so bpf_fib_lookup answers for real.

use std::net::{IpAddr, SocketAddr};

use aya::maps::{Map, MapData};
use lb_common::{
    ConnValue, FlowKey, ReverseNat, MAP_CONNTRACK, MAP_REVERSE_NAT, PROTO_TCP, PROTO_UDP,
};
use xlb::flows::FlowTable;
use xlb_tests::{
    cfg::{Cfg, Svc, Timeouts},
    natlab::*,
    packet::{decode, Frame, ACK},
    rows::{self, Packet, Row},
    testrun::{Fixture, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

/// New flow, established flow, and the reply, for one service; returns the NAT port.
fn new_flow_then_established_then_reply(
    f: &mut Fixture,
    lab: &Lab,
    frame: Frame,
    backends: &[&str],
    proto: u8,
) -> u16 {
    let want = predicted_backend(backends, &frame, proto);
    let snat = backend_side_addr(frame.src.is_ipv6());
    let res = f.run_on(&frame.build(), lab.client_if).unwrap();
    assert_eq!(
        res.verdict, XDP_REDIRECT,
        "client → VIP goes out on the backend side"
    );
    let out = decode(&res.data).expect("valid checksums after DNAT+SNAT");
    assert_eq!(
        (out.dst, out.dport),
        (want.ip(), want.port()),
        "Maglev's pick, as userspace predicts it"
    );
    assert_eq!(out.src, snat);
    assert!(
        (20000..=32767).contains(&out.sport),
        "SNAT port {} in range",
        out.sport
    );
    assert_eq!(out.ttl, frame.ttl - 1);
    assert_eq!(
        (out.src_mac, out.dst_mac),
        (lab.backend_side_mac, backend_mac(want.ip()))
    );
    assert_eq!(out.payload, frame.payload);

    // Established: same backend, same NAT port.
    let again = decode(
        &f.run_on(&frame.clone().flags(ACK).build(), lab.client_if)
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(
        (again.dst, again.dport, again.sport),
        (out.dst, out.dport, out.sport)
    );

    // The reply, backend → SNAT address:port, becomes VIP → client.
    let reply = backend_reply(lab, &frame.clone().flags(ACK), want, (snat, out.sport));
    let res = f.run_on(&reply.build(), lab.backend_if).unwrap();
    assert_eq!(
        res.verdict, XDP_REDIRECT,
        "reply goes out on the client side"
    );
    let back = decode(&res.data).expect("valid checksums after reverse NAT");
    assert_back_to_client(lab, &back, &frame);
    assert_eq!(back.ttl, reply.ttl - 1);
    out.sport
}

#[test]
fn privileged_ipv4_tcp_and_udp_new_established_reply() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4, &BACKENDS_V6)).unwrap();
        new_flow_then_established_then_reply(
            &mut f,
            lab,
            Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80),
            &BACKENDS_V4,
            PROTO_TCP,
        );
        new_flow_then_established_then_reply(
            &mut f,
            lab,
            Frame::udp("10.10.0.5", 40001, "192.0.2.10", 53),
            &BACKENDS_V4,
            PROTO_UDP,
        );
        assert_eq!(counter(&f, "fwd_forward"), 4);
        assert_eq!(counter(&f, "fwd_reverse"), 2);
        let svc = xlb::status::read_services(f.pin_path()).unwrap();
        let web = svc
            .iter()
            .find(|s| s.port == 80 && s.vip == "192.0.2.10")
            .unwrap();
        assert_eq!(
            (web.stats.packets, web.stats.new_flows),
            (3, 1),
            "web: 2 forward + 1 reply, 1 new flow"
        );
    });
}

#[test]
fn privileged_ipv6_tcp_and_udp_new_established_reply() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4, &BACKENDS_V6)).unwrap();
        new_flow_then_established_then_reply(
            &mut f,
            lab,
            Frame::tcp("fd10::5", 40000, "2001:db8::10", 80),
            &BACKENDS_V6,
            PROTO_TCP,
        );
        new_flow_then_established_then_reply(
            &mut f,
            lab,
            Frame::udp("fd10::5", 40001, "2001:db8::10", 53),
            &BACKENDS_V6,
            PROTO_UDP,
        );
        assert_eq!(counter(&f, "fwd_reverse"), 2);
    });
}

#[test]
fn privileged_many_flows_spread_as_predicted_and_ports_never_collide() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4, &BACKENDS_V6)).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut per_backend = std::collections::BTreeMap::new();
        for sport in 30000..30300u16 {
            let frame = Frame::tcp("10.10.0.5", sport, "192.0.2.10", 80);
            let out = decode(&f.run_on(&frame.build(), lab.client_if).unwrap().data).unwrap();
            assert_eq!(
                SocketAddr::new(out.dst, out.dport),
                predicted_backend(&BACKENDS_V4, &frame, PROTO_TCP)
            );
            assert!(
                seen.insert((out.dst, out.dport, out.sport)),
                "reply 5-tuple reused"
            );
            *per_backend.entry(out.dst).or_insert(0) += 1;
        }
        assert_eq!(per_backend.len(), 3, "all backends used: {per_backend:?}");
    });
}

/// The SNAT port is the client's own where the range has it (as MASQUERADE keeps it),
/// so a backend sees one client's successive connections on one 4-tuple; another
/// client on the same port to the same backend gets another port; a client port
/// outside the range gets one from the range.
#[test]
fn privileged_snat_keeps_the_client_port_when_it_is_free() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        // One backend, so both clients' flows go to it.
        f.apply(&config(&BACKENDS_V4[..1], &BACKENDS_V6[..1]))
            .unwrap();
        let out = |f: &mut Fixture, src: &str, sport: u16| {
            let frame = Frame::tcp(src, sport, "192.0.2.10", 80);
            decode(&f.run_on(&frame.build(), lab.client_if).unwrap().data).unwrap()
        };
        let first = out(&mut f, "10.10.0.5", 25000);
        assert_eq!(first.sport, 25000, "the client's port, inside 20000-32767");
        let other = out(&mut f, "10.10.0.6", 25000);
        assert_eq!(other.dst, first.dst);
        assert_ne!(other.sport, 25000, "taken: another port for another client");
        assert!((20000..=32767).contains(&other.sport));
        let outside = out(&mut f, "10.10.0.5", 40000);
        assert!(
            (20000..=32767).contains(&outside.sport),
            "a port from the range: {}",
            outside.sport
        );
    });
}

/// A flow whose backend is removed is rebalanced; flows on the survivors stay put.
#[test]
fn privileged_removed_backend_rebalances_only_its_flows() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4, &BACKENDS_V6)).unwrap();
        let mut before = Vec::new();
        for sport in 31000..31060u16 {
            for frame in [
                Frame::tcp("10.10.0.5", sport, "192.0.2.10", 80),
                Frame::udp("10.10.0.5", sport, "192.0.2.10", 53),
            ] {
                let out = decode(&f.run_on(&frame.build(), lab.client_if).unwrap().data).unwrap();
                before.push((frame, SocketAddr::new(out.dst, out.dport)));
            }
        }
        let removed: SocketAddr = BACKENDS_V4[1].parse().unwrap();
        let summary = f
            .apply(&config(&[BACKENDS_V4[0], BACKENDS_V4[2]], &BACKENDS_V6))
            .unwrap();
        // Backend ids are per service: it leaves both "web" and "dns".
        assert_eq!(summary.backends_removed, 2);
        let mut moved = 0;
        for (frame, was) in &before {
            let out = decode(
                &f.run_on(&frame.clone().flags(ACK).build(), lab.client_if)
                    .unwrap()
                    .data,
            )
            .unwrap();
            let now = SocketAddr::new(out.dst, out.dport);
            if *was == removed {
                assert_ne!(now, removed);
                moved += 1;
            } else {
                assert_eq!(now, *was, "a flow on a surviving backend moved");
            }
        }
        assert!(moved > 0, "some flows were on the removed backend");
    });
}

/// One's-complement sum of 16-bit words, folded: 0xffff over data that includes its own
/// correct checksum.
fn ones_sum(chunks: &[&[u8]]) -> u16 {
    let mut s: u64 = 0;
    for c in chunks {
        for w in c.chunks(2) {
            s += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u64;
        }
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Checks an ICMP error frame: outer addresses, outer and ICMP checksums, and the quoted
/// packet's addresses, ports and (IPv4) header checksum.
fn check_icmp(out: &[u8], outer: (IpAddr, IpAddr), quoted: (SocketAddr, SocketAddr)) {
    let v4 = outer.0.is_ipv4();
    let (ip_len, icmp_off) = if v4 { (20, 34) } else { (40, 54) };
    let ip = &out[14..14 + ip_len];
    let addr = |b: &[u8]| -> IpAddr {
        if v4 {
            IpAddr::from(<[u8; 4]>::try_from(b).unwrap())
        } else {
            IpAddr::from(<[u8; 16]>::try_from(b).unwrap())
        }
    };
    let (s_off, alen) = if v4 { (12, 4) } else { (8, 16) };
    assert_eq!(
        (
            addr(&ip[s_off..s_off + alen]),
            addr(&ip[s_off + alen..s_off + 2 * alen])
        ),
        outer,
        "outer addresses"
    );
    let icmp = &out[icmp_off..];
    if v4 {
        assert_eq!(ones_sum(&[ip]), 0xffff, "outer IPv4 header checksum");
        assert_eq!(ones_sum(&[icmp]), 0xffff, "ICMP checksum");
    } else {
        let len = (icmp.len() as u32).to_be_bytes();
        assert_eq!(
            ones_sum(&[&ip[8..40], &len, &[0, 0, 0, 58], icmp]),
            0xffff,
            "ICMPv6 checksum"
        );
    }
    let inner = &icmp[8..];
    let inner_ip = &inner[..ip_len];
    let ports = &inner[ip_len..ip_len + 4];
    let got = (
        SocketAddr::new(
            addr(&inner_ip[s_off..s_off + alen]),
            u16::from_be_bytes([ports[0], ports[1]]),
        ),
        SocketAddr::new(
            addr(&inner_ip[s_off + alen..s_off + 2 * alen]),
            u16::from_be_bytes([ports[2], ports[3]]),
        ),
    );
    assert_eq!(got, quoted, "quoted packet");
    if v4 {
        assert_eq!(ones_sum(&[inner_ip]), 0xffff, "quoted IPv4 header checksum");
    }
}

/// Path MTU discovery through xlb: a backend's "fragmentation needed" / "packet too
/// big" about a forwarded packet reaches the client about its own client → VIP packet;
/// a router's error about a reply reaches the backend about backend → SNAT.
fn icmp_errors_are_translated(
    client: &str,
    vip: &str,
    backends: &[&str],
    snat: &str,
    router: &str,
) {
    let (client, vip, snat, router): (IpAddr, IpAddr, IpAddr, IpAddr) = (
        client.parse().unwrap(),
        vip.parse().unwrap(),
        snat.parse().unwrap(),
        router.parse().unwrap(),
    );
    let backends: Vec<String> = backends.iter().map(|s| s.to_string()).collect();
    in_lab(move |lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4, &BACKENDS_V6)).unwrap();
        let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
        let frame = Frame::tcp(&client.to_string(), 41000, &vip.to_string(), 80);
        let backend = predicted_backend(&refs, &frame, PROTO_TCP);
        let fwd = f.run_on(&frame.build(), lab.client_if).unwrap();
        let ip_len = if client.is_ipv4() { 20 } else { 40 };
        let nat_port = u16::from_be_bytes([fwd.data[14 + ip_len], fwd.data[14 + ip_len + 1]]);

        // Backend → SNAT address, quoting the packet it received.
        let quoted = &fwd.data[14..14 + ip_len + 8];
        let err = icmp_frame(
            backend_mac(backend.ip()),
            lab.backend_side_mac,
            backend.ip(),
            snat,
            quoted,
        );
        let res = f.run_on(&err, lab.backend_if).unwrap();
        assert_eq!(res.verdict, XDP_REDIRECT, "error goes to the client side");
        assert_eq!(&res.data[0..6], &CLIENT_MAC);
        check_icmp(
            &res.data,
            (vip, client),
            (SocketAddr::new(client, 41000), SocketAddr::new(vip, 80)),
        );

        // A router on the client side → VIP, quoting our reply VIP:80 → client:41000.
        let mut reply = frame.clone().flags(ACK);
        reply.src = vip;
        reply.sport = 80;
        reply.dst = client;
        reply.dport = 41000;
        let reply_bytes = reply.build();
        let err = icmp_frame(
            CLIENT_MAC,
            lab.client_side_mac,
            router,
            vip,
            &reply_bytes[14..14 + ip_len + 8],
        );
        let res = f.run_on(&err, lab.client_if).unwrap();
        assert_eq!(res.verdict, XDP_REDIRECT, "error goes to the backend side");
        check_icmp(
            &res.data,
            (snat, backend.ip()),
            (backend, SocketAddr::new(snat, nat_port)),
        );
        assert_eq!(counter(&f, "icmp_translated"), 2);

        // An error about a flow xlb never saw is not ours.
        let mut stranger = reply_bytes.clone();
        stranger[14 + ip_len + 2] ^= 0x55;
        let err = icmp_frame(
            CLIENT_MAC,
            lab.client_side_mac,
            router,
            vip,
            &stranger[14..14 + ip_len + 8],
        );
        let res = f.run_on(&err, lab.client_if).unwrap();
        assert_eq!((res.verdict, &res.data), (XDP_PASS, &err));
        assert_eq!(counter(&f, "pass_icmp_not_related"), 1);
    });
}

#[test]
fn privileged_icmpv4_frag_needed_is_translated_both_ways() {
    icmp_errors_are_translated(
        "10.10.0.5",
        "192.0.2.10",
        &BACKENDS_V4,
        "10.20.0.1",
        "10.10.0.9",
    );
}

#[test]
fn privileged_icmpv6_packet_too_big_is_translated_both_ways() {
    icmp_errors_are_translated(
        "fd10::5",
        "2001:db8::10",
        &BACKENDS_V6,
        "fd20::1",
        "fd10::9",
    );
}

/// A backend whose neighbour entry is unknown. The datapath asks the agent to resolve
/// the next hop (a request on XLB_NEIGH_REQ), and:
/// - IPv4: drops the packet (drop_neighbour_unknown). Its source is now the LB's own
///   SNAT address, which the kernel drops as a martian without resolving anything:
///   handing it over (the old behaviour) lost every new flow on a cold neighbour;
/// - IPv6: passes the rewritten packet, which the kernel resolves and forwards.
#[test]
fn privileged_unknown_neighbour_is_requested_and_never_handed_over_as_a_martian() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&["10.20.0.99:8080"], &["[fd20::99]:8080"]))
            .unwrap();
        let v4 = Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80);
        let res = f.run_on(&v4.build(), lab.client_if).unwrap();
        assert_eq!(res.verdict, XDP_DROP);
        assert_eq!(counter(&f, "drop_neighbour_unknown"), 1);
        assert_eq!(counter(&f, "pass_neighbour_unknown"), 0);
        let v6 = Frame::tcp("fd10::5", 40000, "2001:db8::10", 80);
        let res = f.run_on(&v6.build(), lab.client_if).unwrap();
        assert_eq!(res.verdict, XDP_PASS);
        let out = decode(&res.data).expect("rewritten with valid checksums");
        assert_eq!(
            (out.dst, out.dport),
            ("fd20::99".parse::<IpAddr>().unwrap(), 8080)
        );
        assert_eq!(counter(&f, "pass_neighbour_unknown"), 1);
        // Both next hops were asked for, on the backends' interface.
        let map =
            f.dp.ebpf
                .take_map(lb_common::MAP_NEIGHBOUR_REQUESTS)
                .unwrap();
        let mut ring = aya::maps::RingBuf::try_from(map).unwrap();
        let mut asked = Vec::new();
        while let Some(item) = ring.next() {
            // SAFETY: one NeighbourRequest per record, read without alignment.
            let r: lb_common::NeighbourRequest =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            assert_ne!(r.ifindex, 0);
            asked.push(xlb::codec::words_to_addr(&r.addr, r.family));
        }
        assert_eq!(
            asked,
            vec![
                "10.20.0.99".parse::<IpAddr>().unwrap(),
                "fd20::99".parse().unwrap()
            ]
        );
    });
}

/// Idle timeouts are enforced by the datapath: within the timeout a flow keeps its
/// backend even though the table changed; after it, the flow follows the new table.
/// A TCP flow that saw FIN uses the (shorter) closing timeout.
#[test]
fn privileged_idle_and_closing_timeouts_expire_entries() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        let timeouts = Timeouts {
            tcp_idle: 3600,
            tcp_closing: 1,
            udp_idle: 1,
            ..Default::default()
        };
        let two = [BACKENDS_V4[0], BACKENDS_V4[1]];
        f.apply(&services(&two, &BACKENDS_V6).timeouts(timeouts).config())
            .unwrap();
        // Flows whose Maglev pick changes when the third backend is added.
        let mut udp = None;
        let mut tcp = None;
        for sport in 32000..33000u16 {
            let u = Frame::udp("10.10.0.5", sport, "192.0.2.10", 53);
            if udp.is_none()
                && predicted_backend(&two, &u, PROTO_UDP)
                    != predicted_backend(&BACKENDS_V4, &u, PROTO_UDP)
            {
                udp = Some(u);
            }
            let t = Frame::tcp("10.10.0.5", sport, "192.0.2.10", 80);
            if tcp.is_none()
                && predicted_backend(&two, &t, PROTO_TCP)
                    != predicted_backend(&BACKENDS_V4, &t, PROTO_TCP)
            {
                tcp = Some(t);
            }
        }
        let (udp, tcp) = (
            udp.expect("a UDP flow that moves"),
            tcp.expect("a TCP flow that moves"),
        );
        let dst = |f: &mut Fixture, frame: &Frame| {
            let out = decode(&f.run_on(&frame.build(), lab.client_if).unwrap().data).unwrap();
            SocketAddr::new(out.dst, out.dport)
        };
        let udp_first = dst(&mut f, &udp);
        let tcp_first = dst(&mut f, &tcp);
        // The TCP flow closes: FIN.
        let fin = tcp.clone().flags(xlb_tests::packet::TcpFlags {
            fin: true,
            ack: true,
            ..Default::default()
        });
        assert_eq!(dst(&mut f, &fin), tcp_first);
        f.apply(
            &services(&BACKENDS_V4, &BACKENDS_V6)
                .timeouts(timeouts)
                .config(),
        )
        .unwrap();
        assert_eq!(
            dst(&mut f, &udp),
            udp_first,
            "within the idle timeout the UDP flow keeps its backend"
        );
        std::thread::sleep(std::time::Duration::from_millis(2200));
        assert_eq!(
            dst(&mut f, &udp),
            predicted_backend(&BACKENDS_V4, &udp, PROTO_UDP),
            "expired UDP flow re-balanced"
        );
        assert_eq!(
            dst(&mut f, &tcp),
            predicted_backend(&BACKENDS_V4, &tcp, PROTO_TCP),
            "closed TCP flow re-balanced"
        );
    });
}

/// A TCP flow whose handshake never completed (only SYNs from the client) takes the
/// short SYN timeout; one whose client sent an ACK takes the idle timeout. Before the
/// SYN timeout existed a half-open entry held its slot for tcp_idle (an hour).
#[test]
fn privileged_half_open_flows_expire_after_the_syn_timeout() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        let timeouts = Timeouts {
            tcp_idle: 3600,
            tcp_closing: 10,
            udp_idle: 60,
            tcp_syn: 1,
            ..Default::default()
        };
        let two = [BACKENDS_V4[0], BACKENDS_V4[1]];
        f.apply(&services(&two, &BACKENDS_V6).timeouts(timeouts).config())
            .unwrap();
        // Two flows whose Maglev pick changes when the third backend is added.
        let moving: Vec<Frame> = (40000..42000u16)
            .map(|sport| Frame::tcp("10.10.0.6", sport, "192.0.2.10", 80))
            .filter(|t| {
                predicted_backend(&two, t, PROTO_TCP)
                    != predicted_backend(&BACKENDS_V4, t, PROTO_TCP)
            })
            .take(2)
            .collect();
        let (half_open, established) = (&moving[0], &moving[1]);
        let dst = |f: &mut Fixture, frame: &Frame| {
            let out = decode(&f.run_on(&frame.build(), lab.client_if).unwrap().data).unwrap();
            SocketAddr::new(out.dst, out.dport)
        };
        let half_first = dst(&mut f, half_open);
        let est_first = dst(&mut f, established);
        let ack = established.clone().flags(xlb_tests::packet::TcpFlags {
            ack: true,
            ..Default::default()
        });
        assert_eq!(dst(&mut f, &ack), est_first);
        f.apply(
            &services(&BACKENDS_V4, &BACKENDS_V6)
                .timeouts(timeouts)
                .config(),
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2200));
        assert_ne!(
            dst(&mut f, half_open),
            half_first,
            "the half-open entry expired after tcp_syn (1 s): its retransmitted SYN follows the new table"
        );
        assert_eq!(
            dst(&mut f, &ack),
            est_first,
            "the established flow keeps its backend (tcp_idle, 3600 s)"
        );
    });
}

/// The next-hop cache: a neighbour change applies within its one-second lifetime, and
/// a packet longer than any the FIB accepted is checked by the FIB again (its MTU check
/// is never skipped).
#[test]
fn privileged_next_hop_cache_expires_and_never_skips_the_mtu_check() {
    in_lab(|lab| {
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4[..1], &BACKENDS_V6)).unwrap();
        let flow = Frame::tcp("10.10.0.5", 40100, "192.0.2.10", 80);
        let first = f.run_on(&flow.build(), lab.client_if).unwrap();
        assert_eq!(first.verdict, XDP_REDIRECT);
        assert_eq!(decode(&first.data).unwrap().dst_mac, BACKEND_MACS[0]);
        // The backend's MAC changes. Within the cache's lifetime the old one is used...
        ip(&[
            "neigh",
            "replace",
            "10.20.0.2",
            "lladdr",
            "02:bb:00:00:00:99",
            "dev",
            "bside",
            "nud",
            "permanent",
        ]);
        let est = flow.clone().flags(ACK);
        let cached = f.run_on(&est.build(), lab.client_if).unwrap();
        assert_eq!(
            decode(&cached.data).unwrap().dst_mac,
            BACKEND_MACS[0],
            "served from the cache"
        );
        // ...and after it, the new one.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let fresh = f.run_on(&est.build(), lab.client_if).unwrap();
        assert_eq!(
            decode(&fresh.data).unwrap().dst_mac,
            [0x02, 0xbb, 0, 0, 0, 0x99],
            "looked up again after a second"
        );

        // The path's MTU drops to 1000: a cached hop for short packets must not carry a
        // 1200-byte one past the FIB's check.
        ip(&["link", "set", "bside", "mtu", "1000"]);
        let short = f.run_on(&est.build(), lab.client_if).unwrap();
        assert_eq!(short.verdict, XDP_REDIRECT);
        let mut big = est.clone();
        big.payload = vec![0x5a; 1200];
        let res = f.run_on(&big.build(), lab.client_if).unwrap();
        assert_ne!(
            res.verdict, XDP_REDIRECT,
            "a packet over the egress MTU went out"
        );
        assert_eq!(counter(&f, "drop_too_big"), 1);
        assert_eq!(counter(&f, "drop_fib_failure"), 0);
    });
}

/// The one entry of a pinned flow table (the test opens one flow).
fn only_entry<V: Copy>(f: &Fixture, map: &str) -> (FlowKey, V) {
    let table = FlowTable::<V>::from_pin(&f.pin_path().join(map)).unwrap();
    let all: Vec<_> = table.entries().map(|e| (e.key, e.value)).collect();
    assert_eq!(all.len(), 1, "{map}: one flow");
    all[0]
}

fn write_entry<V: Copy>(f: &Fixture, map: &str, key: &FlowKey, value: &V) {
    let table = FlowTable::<V>::from_pin(&f.pin_path().join(map)).unwrap();
    assert!(table.insert(key, value), "{map}: written");
}

/// Each flow keeps its next hop in its own entries, both ways, so its packets need no
/// lookup beyond conntrack: the copy is what the packet goes out with while it is
/// valid, and an expired copy or one from another ingress interface is looked up again.
#[test]
fn privileged_flow_entries_carry_their_next_hop() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4[..1], &BACKENDS_V6)).unwrap();
        let flow = Frame::tcp("10.10.0.5", 40200, "192.0.2.10", 80);
        let opened = decode(&f.run_on(&flow.build(), lab.client_if).unwrap().data).unwrap();
        let est = flow.clone().flags(ACK);
        f.run_on(&est.build(), lab.client_if).unwrap();

        let (key, ct) = only_entry::<ConnValue>(&f, MAP_CONNTRACK);
        assert_eq!(ct.hop.dmac, BACKEND_MACS[0]);
        assert_eq!(ct.hop.smac, lab.backend_side_mac);
        assert_eq!(ct.hop.ingress, lab.client_if);
        assert!(ct.hop.expires_ns > ct.last_seen_ns, "{:?}", ct.hop);

        // The flow's copy is what its packets use: a planted one shows it.
        let planted = [0x02, 0xee, 0, 0, 0, 0x01];
        let mut ct2 = ct;
        ct2.hop.dmac = planted;
        write_entry(&f, MAP_CONNTRACK, &key, &ct2);
        let out = decode(&f.run_on(&est.build(), lab.client_if).unwrap().data).unwrap();
        assert_eq!(out.dst_mac, planted, "served from the flow's entry");
        // Expired, it is refreshed from the shared cache / FIB.
        ct2.hop.expires_ns = 0;
        write_entry(&f, MAP_CONNTRACK, &key, &ct2);
        let out = decode(&f.run_on(&est.build(), lab.client_if).unwrap().data).unwrap();
        assert_eq!(out.dst_mac, BACKEND_MACS[0]);
        assert_eq!(only_entry::<ConnValue>(&f, MAP_CONNTRACK).1.hop, ct.hop);
        // From another ingress interface, it is not used.
        ct2.hop = ct.hop;
        ct2.hop.dmac = planted;
        ct2.hop.ingress = lab.client_if + 1000;
        write_entry(&f, MAP_CONNTRACK, &key, &ct2);
        let out = decode(&f.run_on(&est.build(), lab.client_if).unwrap().data).unwrap();
        assert_eq!(
            out.dst_mac, BACKEND_MACS[0],
            "a copy from elsewhere is ignored"
        );

        // The reply direction: the reverse-NAT entry carries the hop to the client.
        let mut reply = Frame::tcp(
            &opened.dst.to_string(),
            opened.dport,
            &opened.src.to_string(),
            opened.sport,
        )
        .flags(ACK);
        reply.src_mac = BACKEND_MACS[0];
        let back = f.run_on(&reply.build(), lab.backend_if).unwrap();
        assert_eq!(back.verdict, XDP_REDIRECT);
        let (_, rev) = only_entry::<ReverseNat>(&f, MAP_REVERSE_NAT);
        assert_eq!(rev.hop.dmac, CLIENT_MAC);
        assert_eq!(rev.hop.smac, lab.client_side_mac);
        assert_eq!(rev.hop.ingress, lab.backend_if);
    });
}

/// The VIP filter's words as the program reads them.
fn vip_filter_words(f: &Fixture) -> Vec<lb_common::VipFilterWord> {
    let data = MapData::from_pin(f.pin_path().join(lb_common::MAP_VIP_FILTER)).unwrap();
    let map: aya::maps::Array<MapData, lb_common::VipFilterWord> =
        aya::maps::Array::try_from(Map::Array(data)).unwrap();
    (0..lb_common::VIP_FILTER_WORDS)
        .map(|i| map.get(&i, 0).unwrap())
        .collect()
}

fn filter_bit(vip: &str, port: u16, proto: u8) -> u32 {
    let (addr, _) = xlb::codec::addr_to_words(vip.parse().unwrap());
    lb_common::hash::vip_filter_bit(&addr, port.to_be(), proto)
}

fn bits_set(words: &[lb_common::VipFilterWord]) -> Vec<u32> {
    (0..words.len() as u32 * lb_common::VIP_FILTER_WORD_BITS)
        .filter(|&b| {
            let (word, mask) = lb_common::hash::vip_filter_slot(b);
            words[word as usize] & mask != 0
        })
        .collect()
}

/// Packets for no service skip the service lookup when their bit in the VIP filter is
/// clear; a packet that shares a service's bit still goes to the lookup and is passed;
/// a removed service's bit goes, an added service's first packet is balanced.
#[test]
fn privileged_vip_filter_holds_exactly_the_services_and_only_skips_the_rest() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4, &BACKENDS_V6)).unwrap();
        let services = [
            ("192.0.2.10", 80, PROTO_TCP),
            ("192.0.2.10", 53, PROTO_UDP),
            ("2001:db8::10", 80, PROTO_TCP),
            ("2001:db8::10", 53, PROTO_UDP),
        ];
        let mut want: Vec<u32> = services
            .iter()
            .map(|(v, p, proto)| filter_bit(v, *p, *proto))
            .collect();
        want.sort();
        want.dedup();
        assert_eq!(bits_set(&vip_filter_words(&f)), want);

        let passed_not_vip = |f: &mut Fixture, frame: Frame| {
            let before = counter(f, "pass_not_vip");
            let res = f.run_on(&frame.build(), lab.client_if).unwrap();
            assert_eq!(res.verdict, XDP_PASS, "{frame:?}");
            assert_eq!(counter(f, "pass_not_vip"), before + 1, "{frame:?}");
        };
        // Clear bit: for no service.
        let web = filter_bit("192.0.2.10", 80, PROTO_TCP);
        let clear = (1..u16::MAX)
            .find(|p| !want.contains(&filter_bit("192.0.2.10", *p, PROTO_TCP)))
            .unwrap();
        passed_not_vip(&mut f, Frame::tcp("10.10.0.5", 40000, "192.0.2.10", clear));
        // Web's bit, another key: found by trying addresses and ports.
        let (addr, port) = (1..=254u8)
            .flat_map(|a| (1..u16::MAX).map(move |p| (format!("192.0.2.{a}"), p)))
            .find(|(a, p)| {
                (a.as_str(), *p) != ("192.0.2.10", 80) && filter_bit(a, *p, PROTO_TCP) == web
            })
            .expect("a key sharing web's bit");
        passed_not_vip(&mut f, Frame::tcp("10.10.0.5", 40000, &addr, port));
        let res = f
            .run_on(
                &Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80).build(),
                lab.client_if,
            )
            .unwrap();
        assert_eq!(res.verdict, XDP_REDIRECT, "web is balanced");

        // dns removed, web on 8443 added.
        let one_backend = |s: Svc| s.backends(&BACKENDS_V4[..1]);
        let cfg = Cfg::new()
            .maglev_table_size(M)
            .snat4("10.20.0.1")
            .service(one_backend(Svc::tcp("web", "192.0.2.10", 80)))
            .service(one_backend(Svc::tcp("web-tls", "192.0.2.10", 8443)));
        f.apply(&cfg.config()).unwrap();
        let mut want = vec![web, filter_bit("192.0.2.10", 8443, PROTO_TCP)];
        want.sort();
        want.dedup();
        assert_eq!(bits_set(&vip_filter_words(&f)), want);
        let res = f
            .run_on(
                &Frame::tcp("10.10.0.5", 40001, "192.0.2.10", 8443).build(),
                lab.client_if,
            )
            .unwrap();
        assert_eq!(
            res.verdict, XDP_REDIRECT,
            "the added service's first packet"
        );
        passed_not_vip(&mut f, Frame::udp("10.10.0.5", 40000, "192.0.2.10", 53));
    });
}

/// Single packets, and one short sequence: each row a name, its config, the frame (on
/// the client side unless said), and the verdict and output expected.
#[test]
fn privileged_nat_rows() {
    in_lab(|lab| {
        let all = || config(&BACKENDS_V4, &BACKENDS_V6);
        let client = |frame: Vec<u8>| Packet::on(lab.client_if, frame);
        let web = Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80);
        let mut rows = vec![
            Row::new("a service without backends drops and counts")
                .config(config(&[], &BACKENDS_V6))
                .packet(client(web.build()).verdict(XDP_DROP))
                .total("drop_no_backend", 1),
            Row::new("TTL 1 passes untouched")
                .config(all())
                .packet(
                    client(web.clone().ttl(1).build())
                        .verdict(XDP_PASS)
                        .unchanged(),
                )
                .total("pass_ttl_exceeded", 1)
                .total("pass_not_vip", 0),
            // Same VIP, a port with no service; and a VIP-less address.
            Row::new("a VIP's port with no service passes untouched")
                .config(all())
                .packet(
                    client(Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 81).build())
                        .verdict(XDP_PASS)
                        .unchanged(),
                )
                .total("pass_not_vip", 1),
            Row::new("an address with no VIP passes untouched")
                .config(all())
                .packet(
                    client(Frame::udp("10.10.0.5", 40000, "10.20.0.1", 53).build())
                        .verdict(XDP_PASS)
                        .unchanged(),
                )
                .total("pass_not_vip", 1),
        ];

        // An IPv4 UDP checksum of 0 ("none") stays 0 through NAT.
        let mut zero = Frame::udp("10.10.0.5", 40002, "192.0.2.10", 53).build();
        zero[14 + 20 + 6] = 0;
        zero[14 + 20 + 7] = 0;
        rows.push(
            Row::new("an IPv4 UDP checksum of 0 stays 0")
                .config(all())
                .packet(client(zero).verdict(XDP_REDIRECT).output_check(|out| {
                    assert_eq!(&out[40..42], &[0, 0]);
                    decode(out).expect("IPv4 header checksum still valid");
                })),
        );

        // One-arm: client and backends behind the same interface → XDP_TX.
        let one_arm = Frame::tcp("10.10.0.5", 40003, "192.0.2.10", 80).build();
        rows.push(
            Row::new("one-arm uses XDP_TX").config(all()).packet(
                Packet::on(lab.backend_if, one_arm)
                    .verdict(XDP_TX)
                    .output_check(|out| {
                        assert_eq!(decode(out).unwrap().src_mac, lab.backend_side_mac)
                    }),
            ),
        );

        // IPv4 with options (IHL 7) through NAT: the transport header is found after
        // the options, rewritten, and every checksum is still right.
        let frame = Frame::tcp("10.10.0.5", 40100, "192.0.2.10", 80);
        let plain = frame.build();
        let mut ip = plain[14..34].to_vec();
        ip[0] = 0x47;
        let tot = u16::from_be_bytes([ip[2], ip[3]]) + 8;
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let mut opts_hdr = ip.clone();
        opts_hdr.extend_from_slice(&[1, 1, 1, 1, 1, 1, 1, 0]);
        let check = !ones_sum(&[&opts_hdr]);
        opts_hdr[10..12].copy_from_slice(&check.to_be_bytes());
        let mut with_opts = plain[..14].to_vec();
        with_opts.extend_from_slice(&opts_hdr);
        with_opts.extend_from_slice(&plain[34..]);
        let want = predicted_backend(&BACKENDS_V4, &frame, PROTO_TCP);
        rows.push(
            Row::new("IPv4 with options is translated")
                .config(all())
                .packet(
                    client(with_opts)
                        .verdict(XDP_REDIRECT)
                        .output_check(move |out| {
                            let out = decode(out).expect("checksums valid after NAT with options");
                            assert_eq!((out.dst, out.dport), (want.ip(), want.port()));
                            assert_eq!(out.payload, frame.payload);
                        }),
                ),
        );

        // An established flow finds its backend through its conntrack entry, without
        // the service (the service is looked up only on a miss): once its service is
        // removed, its next packet is passed untouched all the same, although its entry
        // is still in the map (only the agent's sweep removes it), and it counts as for
        // no VIP. web (TCP 80) removed; dns (UDP 53) stays, with the same backends.
        let ack = web.clone().flags(ACK);
        let dns_only = Cfg::new()
            .maglev_table_size(M)
            .snat4("10.20.0.1")
            .service(Svc::udp("dns", "192.0.2.10", 53).backends(BACKENDS_V4));
        rows.push(
            Row::new("an established flow ends with its service")
                .config(all())
                .packet(client(web.build()).verdict(XDP_REDIRECT).note("balanced"))
                .packet(client(ack.build()).verdict(XDP_REDIRECT).note("balanced"))
                .apply(dns_only.config())
                .check(|f, _| {
                    let ct = f.dp.conntrack().unwrap();
                    assert_eq!(ct.entries().count(), 1, "the flow's entry is still there");
                })
                .packet(
                    client(ack.build())
                        .verdict(XDP_PASS)
                        .unchanged()
                        .note("passed untouched")
                        .moves(&["pass_not_vip"]),
                ),
        );
        rows::run(rows);
    });
}

/// The fixtures' dns service alone (UDP 192.0.2.10:53, admitting 10.10.0.0/24) on
/// `backends`, or `other` in its place.
fn counted_services(backends: &[&str], other: bool) -> xlb::config::Config {
    let svc = if other {
        Svc::udp("ntp", "192.0.2.10", 123).backends(backends.iter().copied())
    } else {
        Svc::udp("dns", "192.0.2.10", 53)
            .backends(backends.iter().copied())
            .allow(["10.10.0.0/24"])
    };
    Cfg::new()
        .maglev_table_size(M)
        .snat4("10.20.0.1")
        .snat6("fd20::1")
        .service(svc)
        .config()
}

fn service_view(f: &Fixture, name: &str) -> xlb::status::ServiceView {
    xlb::status::read_services(f.pin_path())
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// (packets, new flows, denied) of a service, as `xlb status` shows them.
fn totals(f: &Fixture, name: &str) -> (u64, u64, u64) {
    let s = service_view(f, name).stats;
    (s.packets, s.new_flows, s.denied)
}

/// `n` new one-datagram UDP flows to dns from `client`, from source port `first` on.
fn dns_flows(f: &mut Fixture, lab: &Lab, client: &str, first: u16, n: u16) -> Vec<Frame> {
    let admitted = client.starts_with("10.10.0.");
    (first..first + n)
        .map(|port| {
            let frame = Frame::udp(client, port, "192.0.2.10", 53);
            let verdict = f.run_on(&frame.build(), lab.client_if).unwrap().verdict;
            let want = if admitted { XDP_REDIRECT } else { XDP_DROP };
            assert_eq!(verdict, want, "{client}:{port} → dns");
            frame
        })
        .collect()
}

/// The datapath counts a balanced packet on its backend alone; a service's totals are
/// its backends' and those of the backends it had. A backend removed keeps its packets
/// in its service's totals (and comes back from zero), a restarted agent reads the
/// same totals, and a new service given a removed one's id starts from zero, `denied`
/// too.
#[test]
fn privileged_service_totals_outlive_backends_restarts_and_their_id() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&counted_services(&BACKENDS_V4, false)).unwrap();
        let sent = dns_flows(&mut f, lab, "10.10.0.5", 40000, 30);
        dns_flows(&mut f, lab, "10.99.0.5", 40000, 3);
        assert_eq!(totals(&f, "dns"), (30, 30, 3));
        // The backend to remove, and how many of the flows Maglev gave it.
        let gone = BACKENDS_V4[2];
        let on_gone = sent
            .iter()
            .filter(|fr| predicted_backend(&BACKENDS_V4, fr, PROTO_UDP).to_string() == gone)
            .count() as u64;
        assert!(on_gone > 0, "none of 30 flows went to {gone}");
        let per_backend = |f: &Fixture, addr: &str| {
            service_view(f, "dns")
                .backends
                .iter()
                .find(|b| b.address == addr)
                .map(|b| (b.stats.packets, b.stats.new_flows))
        };
        assert_eq!(per_backend(&f, gone), Some((on_gone, on_gone)));

        f.apply(&counted_services(&BACKENDS_V4[..2], false))
            .unwrap();
        assert_eq!(
            totals(&f, "dns"),
            (30, 30, 3),
            "a removed backend's packets stay in its service's totals"
        );
        let left: u64 = service_view(&f, "dns")
            .backends
            .iter()
            .map(|b| b.stats.packets)
            .sum();
        assert_eq!(left, 30 - on_gone);
        dns_flows(&mut f, lab, "10.10.0.6", 40000, 10);
        assert_eq!(totals(&f, "dns"), (40, 40, 3));

        // A restart on the same pins reads the same totals.
        let pin = f.keep_pins();
        let mut f = Fixture::on_pins(pin, &Default::default()).unwrap();
        f.apply(&counted_services(&BACKENDS_V4[..2], false))
            .unwrap();
        assert_eq!(totals(&f, "dns"), (40, 40, 3), "after a restart");

        // The backend back: from zero, and the service's totals go on from theirs.
        f.apply(&counted_services(&BACKENDS_V4, false)).unwrap();
        assert_eq!(per_backend(&f, gone), Some((0, 0)));
        assert_eq!(totals(&f, "dns"), (40, 40, 3));
        dns_flows(&mut f, lab, "10.10.0.7", 40000, 5);
        assert_eq!(totals(&f, "dns"), (45, 45, 3));

        // The service goes, and the next new one is given its id: from zero.
        let id = service_view(&f, "dns").id;
        f.apply(&counted_services(&BACKENDS_V4, true)).unwrap();
        f.apply(&counted_services(&BACKENDS_V4, false)).unwrap();
        let dns = service_view(&f, "dns");
        assert_eq!(
            dns.id, id,
            "dns was not given its old id back: nothing tested"
        );
        assert_eq!(totals(&f, "dns"), (0, 0, 0));
        for b in &dns.backends {
            assert_eq!(
                (b.stats.packets, b.stats.new_flows),
                (0, 0),
                "{}",
                b.address
            );
        }
    });
}

/// Pins left by an earlier datapath, which counted every packet per service as well
/// and had no XLB_SERVICE_RETIRED: the agent that adopts them converts the counters, so
/// a service's totals carry on (the traffic of backends it no longer has included),
/// and a backend id's stale counters are zeroed before another backend gets the id.
#[test]
fn privileged_service_totals_carry_over_from_pins_that_counted_per_service() {
    use aya::maps::{PerCpuArray, PerCpuValues};
    use lb_common::{TrafficStats, MAP_BACKEND_STATS, MAP_SERVICE_RETIRED, MAP_SERVICE_STATS};
    use xlb::dataplane::traffic::summed;
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&counted_services(&BACKENDS_V4, false)).unwrap();
        dns_flows(&mut f, lab, "10.10.0.5", 40000, 20);
        let id = service_view(&f, "dns").id;
        let pin = f.keep_pins();
        // As the earlier datapath left them: the service counted its 20 packets and 7
        // of a backend it no longer has, whose id (the last) kept them.
        std::fs::remove_file(pin.join(MAP_SERVICE_RETIRED)).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        let one_cpu = |t: TrafficStats| {
            let mut v = vec![TrafficStats::default(); cpus];
            v[0] = t;
            PerCpuValues::try_from(v).unwrap()
        };
        let open = |name: &str| {
            PerCpuArray::<MapData, TrafficStats>::try_from(Map::PerCpuArray(
                xlb::dataplane::open_pinned(&pin, name).unwrap(),
            ))
            .unwrap()
        };
        let (mut svc_stats, mut be_stats) = (open(MAP_SERVICE_STATS), open(MAP_BACKEND_STATS));
        let counted = summed(&svc_stats, id).unwrap();
        assert_eq!(
            (counted.packets, counted.denied),
            (0, 0),
            "this datapath counts no traffic per service"
        );
        let earlier = TrafficStats {
            packets: 27,
            bytes: 27 * 60,
            new_flows: 27,
            denied: 2,
        };
        svc_stats.set(id, one_cpu(earlier), 0).unwrap();
        let stale = be_stats.len() - 1;
        let seven = TrafficStats {
            packets: 7,
            bytes: 7 * 60,
            new_flows: 7,
            denied: 0,
        };
        be_stats.set(stale, one_cpu(seven), 0).unwrap();
        drop((svc_stats, be_stats));

        // With --max-services smaller than the adopted services map: the new map of
        // retired traffic takes the adopted map's size, or service ids past its end
        // could not be read.
        let smaller = xlb::dataplane::LoadOptions {
            max_services: 1,
            ..Default::default()
        };
        let mut f = Fixture::on_pins(pin.clone(), &smaller).unwrap();
        f.apply(&counted_services(&BACKENDS_V4, false)).unwrap();
        assert_eq!(
            totals(&f, "dns"),
            (27, 27, 2),
            "the earlier totals carry on"
        );
        let left = summed(&open(MAP_SERVICE_STATS), id).unwrap();
        assert_eq!(
            left,
            TrafficStats {
                denied: 2,
                ..Default::default()
            },
            "the earlier traffic is converted once (denied kept)"
        );
        let stale_now = summed(&open(MAP_BACKEND_STATS), stale).unwrap();
        assert_eq!(
            stale_now,
            TrafficStats::default(),
            "backend id {stale} kept stale counters"
        );
        dns_flows(&mut f, lab, "10.10.0.6", 40000, 5);
        assert_eq!(totals(&f, "dns"), (32, 32, 2));
        // Converted once: a restart reads the same.
        let pin = f.keep_pins();
        let f = Fixture::on_pins(pin, &Default::default()).unwrap();
        assert_eq!(totals(&f, "dns"), (32, 32, 2), "after a second restart");
    });
}

/// A removed backend's reply entries outlive it until the conntrack sweep, and its
/// replies are counted on its cleared id meanwhile: the sweep moves them to its
/// service, so the next backend given the id starts from zero and no service's total
/// jumps with another's packets.
#[test]
fn privileged_a_removed_backends_late_replies_stay_in_its_service() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&counted_services(&BACKENDS_V4, false)).unwrap();
        let frame = Frame::udp("10.10.0.5", 40000, "192.0.2.10", 53);
        let gone = predicted_backend(&BACKENDS_V4, &frame, PROTO_UDP);
        let res = f.run_on(&frame.build(), lab.client_if).unwrap();
        assert_eq!(res.verdict, XDP_REDIRECT);
        let out = decode(&res.data).unwrap();
        let id_of = |f: &Fixture, addr: &str| {
            service_view(f, "dns")
                .backends
                .iter()
                .find(|b| b.address == addr)
                .map(|b| (b.id, b.stats.packets))
        };
        let (gone_id, _) = id_of(&f, &gone.to_string()).unwrap();
        let rest: Vec<&str> = BACKENDS_V4
            .iter()
            .copied()
            .filter(|b| *b != gone.to_string())
            .collect();
        f.apply(&counted_services(&rest, false)).unwrap();

        // The removed backend answers, through its reply entry.
        let reply = backend_reply(lab, &frame, gone, (out.src, out.sport));
        let res = f.run_on(&reply.build(), lab.backend_if).unwrap();
        assert_eq!(res.verdict, XDP_REDIRECT, "the reply is still translated");
        assert_eq!(totals(&f, "dns"), (1, 1, 0), "before the sweep");

        xlb::conntrack::sweep(&mut f.dp, &Default::default()).unwrap();
        assert_eq!(
            totals(&f, "dns"),
            (2, 1, 0),
            "the late reply, in its service's totals"
        );
        let new_backend = "10.20.0.9:8080";
        let with_new: Vec<&str> = rest.iter().copied().chain([new_backend]).collect();
        f.apply(&counted_services(&with_new, false)).unwrap();
        assert_eq!(
            id_of(&f, new_backend),
            Some((gone_id, 0)),
            "the next backend is given the removed one's id ({gone_id}), from zero"
        );
        assert_eq!(totals(&f, "dns"), (2, 1, 0));
    });
}
