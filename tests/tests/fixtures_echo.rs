//! ICMP echo to a VIP, through the real program: answered from the VIP while one of
//! its services can take new flows, with exact bytes (addresses and MACs swapped, the
//! type changed, every checksum valid); not answered for a VIP whose services have no
//! backend, nor with `icmp_echo: false`, nor for an address that is not a VIP.

use etherparse::PacketBuilder;
use xlb::config::Config;
use xlb_tests::{
    natlab::*,
    packet::{CLIENT_MAC, LB_MAC},
    testrun::{Fixture, XDP_PASS, XDP_TX},
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

fn with(extra: &str, backends: bool) -> Config {
    if backends {
        config_with(extra, &BACKENDS_V4, &BACKENDS_V6)
    } else {
        config_with(extra, &[], &[])
    }
}

#[test]
fn privileged_echo_to_a_vip_is_answered_from_it() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&with("", true)).unwrap();
        for (src, vip) in [("10.10.0.5", "192.0.2.10"), ("fd10::5", "2001:db8::10")] {
            let req = echo_request(src, vip);
            let r = f.run_on(&req, lab.client_if).unwrap();
            assert_eq!(r.verdict, XDP_TX, "{vip}");
            check_reply(&req, &r.data);
            // Not a VIP: the host's own business.
            let other = echo_request(
                src,
                if vip.contains(':') {
                    "2001:db8::99"
                } else {
                    "192.0.2.99"
                },
            );
            let r = f.run_on(&other, lab.client_if).unwrap();
            assert_eq!((r.verdict, &r.data), (XDP_PASS, &other));
        }
        assert_eq!(counter(&f, "icmp_echo_answered"), 2);

        // No backend can take a new flow: the VIP no longer answers.
        f.apply(&with("", false)).unwrap();
        for (src, vip) in [("10.10.0.5", "192.0.2.10"), ("fd10::5", "2001:db8::10")] {
            let req = echo_request(src, vip);
            let r = f.run_on(&req, lab.client_if).unwrap();
            assert_eq!(
                (r.verdict, &r.data),
                (XDP_PASS, &req),
                "{vip} without backends"
            );
        }
        // Every service of the VIP restricts its clients: no answer, to anyone.
        let restricted = "services:\n  - {name: a, vip: 192.0.2.10, port: 80, protocol: tcp, allow: [10.10.0.0/24], backends: [{address: \"10.20.0.2:8080\"}]}\n  - {name: b, vip: 192.0.2.10, port: 53, protocol: udp, allow: [10.10.0.0/24], backends: [{address: \"10.20.0.2:8080\"}]}\n";
        f.apply(&Config::parse(&format!("snat: {{ipv4: 10.20.0.1}}\n{restricted}")).unwrap())
            .unwrap();
        let req = echo_request("10.10.0.5", "192.0.2.10");
        assert_eq!(
            f.run_on(&req, lab.client_if).unwrap().verdict,
            XDP_PASS,
            "a VIP of restricted services only"
        );
        // Turned off.
        f.apply(&with("icmp_echo: false\n", true)).unwrap();
        let req = echo_request("10.10.0.5", "192.0.2.10");
        assert_eq!(
            f.run_on(&req, lab.client_if).unwrap().verdict,
            XDP_PASS,
            "icmp_echo: false"
        );
        f.apply(&with("", true)).unwrap();
        assert_eq!(
            f.run_on(&req, lab.client_if).unwrap().verdict,
            XDP_TX,
            "on again"
        );
        assert_eq!(counter(&f, "icmp_echo_answered"), 3);
    });
}
