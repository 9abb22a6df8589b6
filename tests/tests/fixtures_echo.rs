//! ICMP echo to a VIP, through the real program, as rows: answered from the VIP while
//! one of its services can take new flows, with exact bytes (addresses and MACs
//! swapped, the type changed, every checksum valid); not answered for a VIP whose
//! services have no backend or all restrict their clients, nor with `icmp_echo: false`,
//! nor for an address that is not a VIP. Each row that turns the answer off starts from
//! a VIP that answers, and changes the config.

use etherparse::PacketBuilder;
use xlb_tests::{
    cfg::{Cfg, Svc},
    natlab::*,
    packet::{CLIENT_MAC, LB_MAC},
    rows::{self, Packet, Row},
    testrun::{XDP_PASS, XDP_TX},
};

fn echo_request(src: &str, dst: &str) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    let mut buf = Vec::new();
    match (src.parse().unwrap(), dst.parse().unwrap()) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 61)
            .icmpv4_echo_request(0x1234, 7)
            .write(&mut buf, b"ping payload")
            .unwrap(),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 61)
            .icmpv6_echo_request(0x1234, 7)
            .write(&mut buf, b"ping payload")
            .unwrap(),
        _ => unreachable!(),
    }
    buf
}

/// The one's-complement sum of `b` as big-endian 16-bit words, folded.
fn sum(b: &[u8]) -> u32 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// Checks the reply to `req` byte by byte.
fn check_reply(req: &[u8], out: &[u8]) {
    assert_eq!(out.len(), req.len());
    assert_eq!(
        (&out[..6], &out[6..12]),
        (&req[6..12], &req[..6]),
        "MACs swapped"
    );
    if req[12..14] == [0x08, 0x00] {
        let (ih, oh) = (&req[14..34], &out[14..34]);
        assert_eq!(
            (&oh[12..16], &oh[16..20]),
            (&ih[16..20], &ih[12..16]),
            "addresses swapped"
        );
        assert_eq!(oh[8], 64, "TTL");
        assert_eq!(sum(oh), 0xffff, "IPv4 header checksum");
        assert_eq!(out[34], 0, "echo reply");
        assert_eq!(
            &out[35..],
            &req[35..35 + 1]
                .iter()
                .chain(&out[36..])
                .copied()
                .collect::<Vec<_>>()[..],
            "code kept"
        );
        assert_eq!(
            &out[38..],
            &req[38..],
            "identifier, sequence and payload kept"
        );
        assert_eq!(sum(&out[34..]), 0xffff, "ICMP checksum");
    } else {
        let (ih, oh) = (&req[14..54], &out[14..54]);
        assert_eq!(
            (&oh[8..24], &oh[24..40]),
            (&ih[24..40], &ih[8..24]),
            "addresses swapped"
        );
        assert_eq!(oh[7], 64, "hop limit");
        assert_eq!(out[54], 129, "echo reply");
        assert_eq!(
            &out[58..],
            &req[58..],
            "identifier, sequence and payload kept"
        );
        let len = out.len() - 54;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&oh[8..40]);
        pseudo.extend_from_slice(&(len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&out[54..]);
        assert_eq!(sum(&pseudo), 0xffff, "ICMPv6 checksum");
    }
}

/// The fixtures' services, with or without backends.
fn with(backends: bool) -> Cfg {
    if backends {
        services(&BACKENDS_V4, &BACKENDS_V6)
    } else {
        services(&[], &[])
    }
}

#[test]
fn privileged_echo_rows() {
    in_lab(|lab| {
        let echo = |src: &str, dst: &str| Packet::on(lab.client_if, echo_request(src, dst));
        let answered = |src: &str, vip: &str| {
            let req = echo_request(src, vip);
            echo(src, vip)
                .verdict(XDP_TX)
                .output_check(move |out| check_reply(&req, out))
        };
        let mut rows = Vec::new();
        for (fam, src, vip, not_vip) in [
            ("IPv4", "10.10.0.5", "192.0.2.10", "192.0.2.99"),
            ("IPv6", "fd10::5", "2001:db8::10", "2001:db8::99"),
        ] {
            rows.push(
                Row::new(format!("{fam}: a VIP answers"))
                    .config(with(true).config())
                    .packet(answered(src, vip))
                    .total("icmp_echo_answered", 1),
            );
            // Not a VIP: the host's own business.
            rows.push(
                Row::new(format!("{fam}: not a VIP"))
                    .config(with(true).config())
                    .packet(echo(src, not_vip).verdict(XDP_PASS).unchanged())
                    .total("icmp_echo_answered", 0),
            );
            // No backend can take a new flow: the VIP no longer answers.
            rows.push(
                Row::new(format!("{fam}: a VIP whose backends are gone"))
                    .config(with(true).config())
                    .apply(with(false).config())
                    .packet(
                        echo(src, vip)
                            .verdict(XDP_PASS)
                            .unchanged()
                            .note("without backends"),
                    )
                    .total("icmp_echo_answered", 0),
            );
        }
        // Every service of the VIP restricts its clients: no answer, to anyone.
        let restricted = |s: Svc| s.allow(["10.10.0.0/24"]).backends(["10.20.0.2:8080"]);
        let restricted = Cfg::new()
            .snat4("10.20.0.1")
            .service(restricted(Svc::tcp("a", "192.0.2.10", 80)))
            .service(restricted(Svc::udp("b", "192.0.2.10", 53)));
        rows.push(
            Row::new("a VIP of restricted services only")
                .config(with(true).config())
                .apply(restricted.config())
                .packet(
                    echo("10.10.0.5", "192.0.2.10")
                        .verdict(XDP_PASS)
                        .note("a VIP of restricted services only"),
                )
                .total("icmp_echo_answered", 0),
        );
        rows.push(
            Row::new("turned off, then on again")
                .config(with(true).config())
                .apply(with(true).icmp_echo(false).config())
                .packet(
                    echo("10.10.0.5", "192.0.2.10")
                        .verdict(XDP_PASS)
                        .note("icmp_echo: false"),
                )
                .apply(with(true).config())
                .packet(
                    echo("10.10.0.5", "192.0.2.10")
                        .verdict(XDP_TX)
                        .note("on again"),
                )
                .total("icmp_echo_answered", 1),
        );
        rows::run(rows);
    });
}
