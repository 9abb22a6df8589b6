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
    cfg::Mode,
    natlab::*,
    packet::{decode, Frame, ACK},
    rows::{self, Packet, Row},
    testrun::{XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const DSR_V4: [&str; 3] = ["10.20.0.2:80", "10.20.0.3:80", "10.20.0.4:80"];
const DSR_V6: [&str; 3] = ["[fd20::2]:80", "[fd20::3]:80", "[fd20::4]:80"];
const DSR_UDP_V4: [&str; 3] = ["10.20.0.2:53", "10.20.0.3:53", "10.20.0.4:53"];
const DSR_UDP_V6: [&str; 3] = ["[fd20::2]:53", "[fd20::3]:53", "[fd20::4]:53"];

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

/// A dnat flow as a row: the client's packet, the established one, the backend's reply
/// leaving through TC egress (a backend on this host) and arriving through XDP (a
/// backend elsewhere).
fn dnat_flow<'a>(
    lab: &'a Lab,
    cfg: &Config,
    name: &str,
    frame: Frame,
    backends: &[&str],
    proto: u8,
) -> Row<'a> {
    let want = predicted_backend(backends, &frame, proto);
    let sent = frame.clone();
    let forward = move |out: &[u8]| {
        let out = decode(out).expect("valid checksums after DNAT");
        assert_eq!(
            (out.src, out.sport, out.dst, out.dport),
            (sent.src, sent.sport, want.ip(), want.port()),
            "only the destination rewritten: the backend sees the client"
        );
        assert_eq!(out.ttl, sent.ttl - 1);
        assert_eq!(out.payload, sent.payload);
        assert_eq!(
            (out.src_mac, out.dst_mac),
            (lab.backend_side_mac, backend_mac(want.ip()))
        );
    };
    // Established: the same.
    let sent = frame.clone();
    let established = move |out: &[u8]| {
        let again = decode(out).unwrap();
        assert_eq!(
            (again.src, again.sport, again.dst),
            (sent.src, sent.sport, want.ip())
        );
    };
    // The backend answers the client directly: backend → client becomes VIP → client.
    let reply = backend_reply(
        lab,
        &frame.clone().flags(ACK),
        want,
        (frame.src, frame.sport),
    );
    // A backend on this host: its reply leaves through the TC egress program, which
    // translates it the same way (TTL and MACs are the kernel's business there).
    let (sent, replied) = (frame.clone(), reply.clone());
    let egress = move |out: &[u8]| {
        let left = decode(out).expect("valid checksums after egress translation");
        assert_eq!(
            (left.src, left.sport, left.dst, left.dport, left.ttl),
            (sent.dst, sent.dport, sent.src, sent.sport, replied.ttl)
        );
        assert_eq!(left.payload, replied.payload);
    };
    let sent = frame.clone();
    let back = move |out: &[u8]| {
        let back = decode(out).expect("valid checksums after reverse DNAT");
        assert_back_to_client(lab, &back, &sent);
    };
    Row::new(format!("dnat {name}"))
        .config(cfg.clone())
        .packet(
            Packet::on(lab.client_if, frame.build())
                .verdict(XDP_REDIRECT)
                .note("out on the backend side")
                .output_check(forward),
        )
        .packet(
            Packet::on(lab.client_if, frame.clone().flags(ACK).build()).output_check(established),
        )
        .packet(
            Packet::egress(reply.build())
                .verdict(0)
                .note("TC_ACT_OK: egress never drops")
                .output_check(egress),
        )
        .packet(
            Packet::on(lab.backend_if, reply.build())
                .verdict(XDP_REDIRECT)
                .note("reply out on the client side")
                .output_check(back),
        )
        .total("fwd_forward", 2)
        .total("fwd_reverse", 1)
        .total("event_egress_translated", 1)
        // dnat needs no SNAT port: the reply entries are keyed by the client's own.
        .total("drop_port_alloc", 0)
}

/// The fixtures' four services (TCP :80 and UDP :53 on each VIP) as (name, client
/// frame, backends, protocol), with these backends for TCP and UDP in each family.
fn cases<'b>(
    tcp4: &'b [&'b str],
    udp4: &'b [&'b str],
    tcp6: &'b [&'b str],
    udp6: &'b [&'b str],
) -> [(&'static str, Frame, &'b [&'b str], u8); 4] {
    [
        (
            "TCP IPv4",
            Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80),
            tcp4,
            PROTO_TCP,
        ),
        (
            "UDP IPv4",
            Frame::udp("10.10.0.5", 40001, "192.0.2.10", 53),
            udp4,
            PROTO_UDP,
        ),
        (
            "TCP IPv6",
            Frame::tcp("fd10::5", 40000, "2001:db8::10", 80),
            tcp6,
            PROTO_TCP,
        ),
        (
            "UDP IPv6",
            Frame::udp("fd10::5", 40001, "2001:db8::10", 53),
            udp6,
            PROTO_UDP,
        ),
    ]
}

#[test]
fn privileged_dnat_keeps_the_client_address_and_translates_replies() {
    in_lab(|lab| {
        let cfg = lab_services(
            Some(Mode::Dnat),
            [&BACKENDS_V4, &BACKENDS_V4, &BACKENDS_V6, &BACKENDS_V6],
        )
        .config();
        let cases = cases(&BACKENDS_V4, &BACKENDS_V4, &BACKENDS_V6, &BACKENDS_V6);
        let mut rows: Vec<Row> = cases
            .iter()
            .map(|(name, frame, backends, proto)| {
                dnat_flow(lab, &cfg, name, frame.clone(), backends, *proto)
            })
            .collect();
        // Anything else leaves untouched: a reply to another client port, with the four
        // flows open.
        let mut other = Frame::udp("10.20.0.2", 8080, "10.10.0.5", 1).flags(ACK);
        other.src_mac = backend_mac("10.20.0.2".parse().unwrap());
        let mut row = Row::new("dnat: egress, a reply to another client port").config(cfg.clone());
        for (_, frame, _, _) in &cases {
            row = row.packet(Packet::on(lab.client_if, frame.build()).verdict(XDP_REDIRECT));
        }
        rows.push(
            row.packet(Packet::egress(other.build()).verdict(0).unchanged())
                .total("event_egress_translated", 0)
                .total("drop_port_alloc", 0),
        );
        rows::run(rows);
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
        let cfg = lab_services(
            Some(Mode::Dsr),
            [&DSR_V4, &DSR_UDP_V4, &DSR_V6, &DSR_UDP_V6],
        )
        .config();
        let mut rows = Vec::new();
        for (name, frame, backends, proto) in cases(&DSR_V4, &DSR_UDP_V4, &DSR_V6, &DSR_UDP_V6) {
            let want = predicted_backend(backends, &frame, proto);
            let outer_src = backend_side_addr(frame.src.is_ipv6());
            let mut row = Row::new(format!("dsr {name}")).config(cfg.clone());
            for f2 in [frame.clone(), frame.clone().flags(ACK)] {
                let bytes = f2.build();
                let v4 = f2.src.is_ipv4();
                let sent = bytes.clone();
                let check = move |out: &[u8]| {
                    assert_eq!(
                        (&out[6..12], &out[..6]),
                        (&lab.backend_side_mac[..], &backend_mac(want.ip())[..])
                    );
                    let inner = check_outer(out, v4, outer_src, want.ip());
                    assert_eq!(
                        inner,
                        sent[14..],
                        "the client's packet, byte for byte (TTL too)"
                    );
                };
                row = row.packet(
                    Packet::on(lab.client_if, bytes)
                        .verdict(XDP_REDIRECT)
                        .note("out on the backend side")
                        .output_check(check),
                );
            }
            rows.push(
                row.total("fwd_forward", 2)
                    // No reply entries: replies never come back through the LB.
                    .check(|f, _| {
                        let rev = f.dp.reverse_nat().unwrap();
                        assert_eq!(rev.entries().count(), 0);
                    }),
            );
        }
        rows::run(rows);
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

/// The ICMP error dsr answers a packet too big for the path with, checked field by
/// field against the packet sent (`sent`, the bytes of `big`).
fn check_too_big(out: &[u8], sent: &[u8], big: &Frame) {
    assert_eq!(
        (&out[..6], &out[6..12]),
        (&big.src_mac[..], &big.dst_mac[..]),
    );
    if big.src.is_ipv4() {
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
            &sent[14..14 + 28],
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
        assert_eq!(&icmp[8..], &sent[14..14 + 48]);
    }
}

/// Rows on a path of MTU 1400 (the backend side's): a packet that fits once
/// encapsulated is sent, one byte more is answered with ICMP from the VIP.
#[test]
fn privileged_dsr_too_big_for_the_path_gets_icmp_with_the_mtu_left() {
    in_lab(|lab| {
        let cfg = lab_services(
            Some(Mode::Dsr),
            [&DSR_V4, &DSR_UDP_V4, &DSR_V6, &DSR_UDP_V6],
        )
        .config();
        let st = std::process::Command::new("ip")
            .args(["link", "set", "bside", "mtu", "1400"])
            .status()
            .unwrap();
        assert!(st.success(), "ip link set bside mtu 1400");
        let mut rows = Vec::new();
        for (fam, src, dst) in [
            ("IPv4", "10.10.0.5", "192.0.2.10"),
            ("IPv6", "fd10::5", "2001:db8::10"),
        ] {
            let v4 = src.contains('.');
            let overhead = if v4 { 20 } else { 40 };
            let mut fits = Frame::tcp(src, 40010, dst, 80).flags(ACK);
            let ip_hdr = if v4 { 20 } else { 40 };
            fits.payload = vec![0x5a; 1400 - overhead - ip_hdr - 20];
            rows.push(
                Row::new(format!("fits once encapsulated ({fam})"))
                    .config(cfg.clone())
                    .packet(
                        Packet::on(lab.client_if, fits.build())
                            .verdict(XDP_REDIRECT)
                            .note("exactly the MTU once encapsulated"),
                    )
                    .total("icmp_too_big_sent", 0)
                    .total("drop_too_big", 0),
            );
            // One byte more: ICMP back to the client, from the VIP.
            let mut big = fits.clone();
            big.payload.push(0);
            let bytes = big.build();
            let sent = bytes.clone();
            rows.push(
                Row::new(format!("one byte more ({fam})"))
                    .config(cfg.clone())
                    .packet(
                        Packet::on(lab.client_if, bytes)
                            .verdict(XDP_TX)
                            .note("answered on the interface it came from")
                            .output_check(move |out| check_too_big(out, &sent, &big)),
                    )
                    .total("icmp_too_big_sent", 1)
                    .total("drop_too_big", 0),
            );
        }
        rows::run(rows);
    });
}

#[test]
fn privileged_decap_strips_the_outer_header_of_packets_for_this_host() {
    in_lab(|lab| {
        let cfg = Config {
            decap: true,
            ..Default::default()
        };
        // As the LB sends them: from its address to this host's (10.20.0.1 / fd20::1
        // are local here), around the client's packet.
        let cases: [(&str, Frame, [u8; 2], Vec<u8>); 2] = [
            (
                "IPv4",
                Frame::tcp("10.10.0.5", 40000, "192.0.2.10", 80),
                [0x08, 0x00],
                {
                    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 4, 0, 0];
                    h.extend_from_slice(&[10, 20, 0, 9, 10, 20, 0, 1]);
                    h
                },
            ),
            (
                "IPv6",
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
        let mut rows = Vec::new();
        for (fam, frame, eth_type, mut outer) in cases {
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
            rows.push(
                Row::new(format!("{fam} tunnel packet for this host"))
                    .config(cfg.clone())
                    .packet(
                        Packet::on(lab.backend_if, wire)
                            .verdict(XDP_PASS)
                            .output(inner)
                            .note("exactly the client's frame"),
                    )
                    .total("pass_decapsulated", 1),
            );
            rows.push(
                Row::new(format!("{fam} tunnel packet passing through"))
                    .config(cfg.clone())
                    .packet(
                        Packet::on(lab.backend_if, transit)
                            .unchanged()
                            .note("a tunnel packet passing through is not touched"),
                    )
                    .total("pass_decapsulated", 0),
            );
        }
        rows::run(rows);
    });
}
