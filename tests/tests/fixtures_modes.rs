//! BPF_PROG_TEST_RUN fixtures for the `dnat` and `dsr` modes and `decap`, with exact
//! bytes: the client's address kept by dnat and its reply translated back; dsr's outer
//! header (every field, its checksum) around the unchanged packet; decapsulation; and
//! the ICMP too-big that dsr answers when the encapsulated packet would not fit.
//!
//! The lab is fixtures_nat's: a namespace with a client side (10.10.0.0/24, fd10::/64)
//! and a backend side (10.20.0.0/24, fd20::/64), static neighbours, forwarding on.

use std::net::IpAddr;

use lb_common::{PROTO_TCP, PROTO_UDP};
use xlb::config::Config;
use xlb_tests::{
    natlab::*,
    packet::{decode, Frame, ACK},
    testrun::{Fixture, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const DSR_V4: [&str; 3] = ["10.20.0.2:80", "10.20.0.3:80", "10.20.0.4:80"];
const DSR_V6: [&str; 3] = ["[fd20::2]:80", "[fd20::3]:80", "[fd20::4]:80"];
const DSR_UDP_V4: [&str; 3] = ["10.20.0.2:53", "10.20.0.3:53", "10.20.0.4:53"];
const DSR_UDP_V6: [&str; 3] = ["[fd20::2]:53", "[fd20::3]:53", "[fd20::4]:53"];

/// web/dns (IPv4) and web6/dns6 (IPv6) in `mode`, with these backends.
fn mode_config(mode: &str, extra: &str, b: [&[&str]; 4]) -> Config {
    let svc = |name: &str, vip: &str, port: u16, proto: &str, bs: &[&str]| {
        format!("  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    mode: {mode}\n    backends: [{}]\n", backend_list(bs))
    };
    let text = format!(
        "{extra}maglev_table_size: {M}\nsnat: {{ipv4: 10.20.0.1, ipv6: \"fd20::1\"}}\nservices:\n{}{}{}{}",
        svc("web", "192.0.2.10", 80, "tcp", b[0]),
        svc("dns", "192.0.2.10", 53, "udp", b[1]),
        svc("web6", "2001:db8::10", 80, "tcp", b[2]),
        svc("dns6", "2001:db8::10", 53, "udp", b[3]),
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("fixture config: {e:#}\n{text}"))
}

/// The Internet checksum of `b` (0 when `b` already holds a valid checksum).
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn v6_pseudo(src: &[u8], dst: &[u8], len: usize, next: u8) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    p
}

fn dnat_flow(f: &mut Fixture, lab: &Lab, frame: Frame, backends: &[&str], proto: u8) {
    let want = predicted_backend(backends, &frame, proto);
    let res = f.run_on(&frame.build(), lab.client_if).unwrap();
    assert_eq!(res.verdict, XDP_REDIRECT, "out on the backend side");
    let out = decode(&res.data).expect("valid checksums after DNAT");
    assert_eq!(
        (out.src, out.sport, out.dst, out.dport),
        (frame.src, frame.sport, want.ip(), want.port()),
        "only the destination rewritten: the backend sees the client"
    );
    assert_eq!(out.ttl, frame.ttl - 1);
    assert_eq!(out.payload, frame.payload);
    assert_eq!(
        (out.src_mac, out.dst_mac),
        (lab.backend_side_mac, backend_mac(want.ip()))
    );
    // Established: the same.
    let again = decode(
        &f.run_on(&frame.clone().flags(ACK).build(), lab.client_if)
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(
        (again.src, again.sport, again.dst),
        (out.src, out.sport, out.dst)
    );
    // The backend answers the client directly: backend → client becomes VIP → client.
    let mut reply = frame.clone().flags(ACK);
    reply.src = want.ip();
    reply.sport = want.port();
    reply.dst = frame.src;
    reply.dport = frame.sport;
    reply.src_mac = backend_mac(want.ip());
    reply.dst_mac = lab.backend_side_mac;
    // A backend on this host: its reply leaves through the TC egress program, which
    // translates it the same way (TTL and MACs are the kernel's business there).
    let res = f.run_egress(&reply.build()).unwrap();
    assert_eq!(res.verdict, 0, "TC_ACT_OK: egress never drops");
    let left = decode(&res.data).expect("valid checksums after egress translation");
    assert_eq!(
        (left.src, left.sport, left.dst, left.dport, left.ttl),
        (frame.dst, frame.dport, frame.src, frame.sport, reply.ttl)
    );
    assert_eq!(left.payload, reply.payload);
    let res = f.run_on(&reply.build(), lab.backend_if).unwrap();
    assert_eq!(res.verdict, XDP_REDIRECT, "reply out on the client side");
    let back = decode(&res.data).expect("valid checksums after reverse DNAT");
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (frame.dst, frame.dport, frame.src, frame.sport)
    );
    assert_eq!(
        (back.src_mac, back.dst_mac),
        (lab.client_side_mac, CLIENT_MAC)
    );
}

#[test]
fn privileged_dnat_keeps_the_client_address_and_translates_replies() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        let cfg = mode_config(
            "dnat",
            "",
            [&BACKENDS_V4, &BACKENDS_V4, &BACKENDS_V6, &BACKENDS_V6],
        );
        f.apply(&cfg).unwrap();
        let cases = [
            (
                Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80),
                &BACKENDS_V4,
                PROTO_TCP,
            ),
            (
                Frame::udp("10.10.0.5", 40001, "192.0.2.10", 53),
                &BACKENDS_V4,
                PROTO_UDP,
            ),
            (
                Frame::tcp("fd10::5", 40000, "2001:db8::10", 80),
                &BACKENDS_V6,
                PROTO_TCP,
            ),
            (
                Frame::udp("fd10::5", 40001, "2001:db8::10", 53),
                &BACKENDS_V6,
                PROTO_UDP,
            ),
        ];
        for (frame, backends, proto) in cases {
            dnat_flow(&mut f, lab, frame, backends, proto);
        }
        assert_eq!(counter(&f, "fwd_forward"), 8);
        assert_eq!(counter(&f, "fwd_reverse"), 4);
        assert_eq!(counter(&f, "event_egress_translated"), 4);
        // Anything else leaves untouched: a reply to another client port.
        let mut other = Frame::udp("10.20.0.2", 8080, "10.10.0.5", 1).flags(ACK);
        other.src_mac = backend_mac("10.20.0.2".parse().unwrap());
        let bytes = other.build();
        let res = f.run_egress(&bytes).unwrap();
        assert_eq!((res.verdict, res.data), (0, bytes));
        assert_eq!(counter(&f, "event_egress_translated"), 4);
        // dnat needs no SNAT port: the reply entries are keyed by the client's own.
        assert_eq!(counter(&f, "drop_port_alloc"), 0);
    });
}

/// The outer header of a dsr frame, checked field by field; returns the inner packet.
fn check_outer(out: &[u8], inner_family_v4: bool, src: IpAddr, dst: IpAddr) -> Vec<u8> {
    if inner_family_v4 {
        assert_eq!(&out[12..14], &[0x08, 0x00], "IPv4 ethertype");
        let h = &out[14..34];
        assert_eq!(h[0], 0x45, "IPv4, no options");
        assert_eq!(
            u16::from_be_bytes([h[2], h[3]]) as usize,
            out.len() - 14,
            "total length"
        );
        assert_eq!(
            u16::from_be_bytes([h[6], h[7]]),
            0x4000,
            "DF, not a fragment"
        );
        assert_eq!(h[8], 64, "outer TTL");
        assert_eq!(h[9], 4, "IP-in-IP");
        assert_eq!(csum(h), 0, "outer header checksum");
        assert_eq!(IpAddr::from(<[u8; 4]>::try_from(&h[12..16]).unwrap()), src);
        assert_eq!(IpAddr::from(<[u8; 4]>::try_from(&h[16..20]).unwrap()), dst);
        out[34..].to_vec()
    } else {
        assert_eq!(&out[12..14], &[0x86, 0xdd], "IPv6 ethertype");
        let h = &out[14..54];
        assert_eq!(h[0] >> 4, 6);
        assert_eq!(
            u16::from_be_bytes([h[4], h[5]]) as usize,
            out.len() - 54,
            "payload length"
        );
        assert_eq!(h[6], 41, "IPv6-in-IPv6");
        assert_eq!(h[7], 64, "outer hop limit");
        assert_eq!(IpAddr::from(<[u8; 16]>::try_from(&h[8..24]).unwrap()), src);
        assert_eq!(IpAddr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap()), dst);
        out[54..].to_vec()
    }
}

#[test]
fn privileged_dsr_encapsulates_the_unchanged_packet() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        let cfg = mode_config("dsr", "", [&DSR_V4, &DSR_UDP_V4, &DSR_V6, &DSR_UDP_V6]);
        f.apply(&cfg).unwrap();
        let cases = [
            (
                Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80),
                &DSR_V4,
                PROTO_TCP,
                "10.20.0.1",
            ),
            (
                Frame::udp("10.10.0.5", 40001, "192.0.2.10", 53),
                &DSR_UDP_V4,
                PROTO_UDP,
                "10.20.0.1",
            ),
            (
                Frame::tcp("fd10::5", 40000, "2001:db8::10", 80),
                &DSR_V6,
                PROTO_TCP,
                "fd20::1",
            ),
            (
                Frame::udp("fd10::5", 40001, "2001:db8::10", 53),
                &DSR_UDP_V6,
                PROTO_UDP,
                "fd20::1",
            ),
        ];
        let mut sent = 0;
        for (frame, backends, proto, outer_src) in cases {
            let want = predicted_backend(backends, &frame, proto);
            for (i, f2) in [frame.clone(), frame.clone().flags(ACK)]
                .into_iter()
                .enumerate()
            {
                let bytes = f2.build();
                let res = f.run_on(&bytes, lab.client_if).unwrap();
                sent += 1;
                assert_eq!(
                    res.verdict, XDP_REDIRECT,
                    "packet {i} out on the backend side"
                );
                let out = &res.data;
                assert_eq!(
                    (&out[6..12], &out[..6]),
                    (&lab.backend_side_mac[..], &backend_mac(want.ip())[..])
                );
                let inner = check_outer(
                    out,
                    frame.src.is_ipv4(),
                    outer_src.parse().unwrap(),
                    want.ip(),
                );
                assert_eq!(
                    inner,
                    bytes[14..],
                    "the client's packet, byte for byte (TTL too)"
                );
            }
        }
        assert_eq!(counter(&f, "fwd_forward"), sent);
        // No reply entries: replies never come back through the LB.
        let rev = aya::maps::HashMap::<_, lb_common::FlowKey, lb_common::ReverseNat>::try_from(
            aya::maps::Map::LruHashMap(
                aya::maps::MapData::from_pin(f.pin_path().join(lb_common::MAP_REVERSE_NAT))
                    .unwrap(),
            ),
        )
        .unwrap();
        assert_eq!(rev.keys().count(), 0);
    });
}

#[test]
fn dsr_check_config_requires_the_service_port() {
    let text = "services:\n  - name: web\n    vip: 192.0.2.10\n    port: 80\n    protocol: tcp\n    mode: dsr\n    backends: [{address: \"10.20.0.2:8080\"}]\n";
    let err = format!(
        "{:#}",
        Config::parse(text).and_then(|c| c.validate()).unwrap_err()
    );
    assert!(
        err.contains("8080") && err.contains("service's port 80"),
        "{err}"
    );
}

#[test]
fn privileged_dsr_too_big_for_the_path_gets_icmp_with_the_mtu_left() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        let cfg = mode_config("dsr", "", [&DSR_V4, &DSR_UDP_V4, &DSR_V6, &DSR_UDP_V6]);
        f.apply(&cfg).unwrap();
        let ns_ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ns_ip(&["link", "set", "bside", "mtu", "1400"]);
        for (src, dst) in [("10.10.0.5", "192.0.2.10"), ("fd10::5", "2001:db8::10")] {
            let v4 = src.contains('.');
            let overhead = if v4 { 20 } else { 40 };
            // Fits once encapsulated: sent.
            let mut fits = Frame::tcp(src, 40010, dst, 80).flags(ACK);
            let ip_hdr = if v4 { 20 } else { 40 };
            fits.payload = vec![0x5a; 1400 - overhead - ip_hdr - 20];
            let res = f.run_on(&fits.build(), lab.client_if).unwrap();
            assert_eq!(
                res.verdict, XDP_REDIRECT,
                "{src}: exactly the MTU once encapsulated"
            );
            // One byte more: ICMP back to the client, from the VIP.
            let mut big = fits.clone();
            big.payload.push(0);
            let bytes = big.build();
            let res = f.run_on(&bytes, lab.client_if).unwrap();
            assert_eq!(
                res.verdict, XDP_TX,
                "{src}: answered on the interface it came from"
            );
            let out = &res.data;
            assert_eq!(
                (&out[..6], &out[6..12]),
                (&big.src_mac[..], &big.dst_mac[..]),
            );
            if v4 {
                let h = &out[14..34];
                assert_eq!(csum(h), 0, "IPv4 header checksum");
                assert_eq!(h[9], 1, "ICMP");
                assert_eq!(&h[12..16], &[192, 0, 2, 10], "from the VIP");
                assert_eq!(&h[16..20], &[10, 10, 0, 5], "to the client");
                assert_eq!(out.len(), 14 + 20 + 8 + 28);
                let icmp = &out[34..];
                assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
                assert_eq!(csum(icmp), 0, "ICMP checksum");
                assert_eq!(
                    u16::from_be_bytes([icmp[6], icmp[7]]),
                    1400 - 20,
                    "the MTU left"
                );
                assert_eq!(
                    &icmp[8..],
                    &bytes[14..14 + 28],
                    "quotes the header and 8 bytes"
                );
            } else {
                let h = &out[14..54];
                assert_eq!(h[6], 58, "ICMPv6");
                assert_eq!(
                    h[8..24],
                    "2001:db8::10"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets()
                );
                assert_eq!(
                    h[24..40],
                    "fd10::5".parse::<std::net::Ipv6Addr>().unwrap().octets()
                );
                assert_eq!(out.len(), 14 + 40 + 8 + 48);
                let icmp = &out[54..];
                assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
                let mut sum = v6_pseudo(&h[8..24], &h[24..40], icmp.len(), 58);
                sum.extend_from_slice(icmp);
                assert_eq!(csum(&sum), 0, "ICMPv6 checksum with the pseudo-header");
                assert_eq!(
                    u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
                    1400 - 40
                );
                assert_eq!(&icmp[8..], &bytes[14..14 + 48]);
            }
        }
        assert_eq!(counter(&f, "icmp_too_big_sent"), 2);
        assert_eq!(counter(&f, "drop_too_big"), 0);
    });
}

#[test]
fn privileged_decap_strips_the_outer_header_of_packets_for_this_host() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        let cfg = Config {
            decap: true,
            ..Default::default()
        };
        f.apply(&cfg).unwrap();
        // As the LB sends them: from its address to this host's (10.20.0.1 / fd20::1
        // are local here), around the client's packet.
        let cases: [(Frame, [u8; 2], Vec<u8>); 2] = [
            (
                Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80),
                [0x08, 0x00],
                {
                    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 4, 0, 0];
                    h.extend_from_slice(&[10, 20, 0, 9, 10, 20, 0, 1]);
                    h
                },
            ),
            (
                Frame::udp("fd10::5", 40000, "2001:db8::10", 53),
                [0x86, 0xdd],
                {
                    let mut h = vec![0x60, 0, 0, 0, 0, 0, 41, 64];
                    h.extend_from_slice(&"fd20::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
                    h.extend_from_slice(&"fd20::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
                    h
                },
            ),
        ];
        for (frame, eth_type, mut outer) in cases {
            let inner = frame.build();
            let inner_ip = &inner[14..];
            if outer.len() == 20 {
                let tot = ((inner_ip.len() + 20) as u16).to_be_bytes();
                outer[2..4].copy_from_slice(&tot);
                let c = csum(&outer).to_be_bytes();
                outer[10..12].copy_from_slice(&c);
            } else {
                outer[4..6].copy_from_slice(&(inner_ip.len() as u16).to_be_bytes());
            }
            let mut wire = inner[..12].to_vec();
            wire.extend_from_slice(&eth_type);
            wire.extend_from_slice(&outer);
            wire.extend_from_slice(inner_ip);
            let res = f.run_on(&wire, lab.backend_if).unwrap();
            assert_eq!(res.verdict, XDP_PASS);
            assert_eq!(res.data, inner, "exactly the client's frame");

            // Not for this host (10.20.0.7 / fd20::7 are not local): left alone.
            let mut transit = wire.clone();
            if outer.len() == 20 {
                transit[14 + 19] = 7;
                let mut h = transit[14..34].to_vec();
                h[10] = 0;
                h[11] = 0;
                let c = csum(&h).to_be_bytes();
                transit[24..26].copy_from_slice(&c);
            } else {
                transit[14 + 39] = 7;
            }
            let res = f.run_on(&transit, lab.backend_if).unwrap();
            assert_eq!(
                res.data, transit,
                "a tunnel packet passing through is not touched"
            );
        }
        assert_eq!(counter(&f, "pass_decapsulated"), 2);
    });
}
