//! BPF_PROG_TEST_RUN fixtures for fragmented datagrams: each case is a row (name, the
//! fragments in the order they arrive, the service's mode, and what must come out),
//! run through the real program in the NAT fixture namespace. What the program emits
//! is reassembled and decoded, so the transport checksum of the whole datagram is
//! checked after translation, and every IPv4 fragment's own header checksum.

use std::net::IpAddr;

use lb_common::{PROTO_TCP, PROTO_UDP};
use xlb::config::Config;
use xlb_tests::{
    fragment::{fragment, fragment_behind, reassemble},
    natlab::*,
    packet::{decode, Frame},
    testrun::{Fixture, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const DSR_UDP_V4: [&str; 3] = ["10.20.0.2:53", "10.20.0.3:53", "10.20.0.4:53"];
const DSR_UDP_V6: [&str; 3] = ["[fd20::2]:53", "[fd20::3]:53", "[fd20::4]:53"];

/// dns (UDP :53) and web (TCP :80) on both VIPs, in `mode`, with `udp`'s backends for
/// the UDP services.
fn config(mode: &str, udp4: &[&str], udp6: &[&str]) -> Config {
    let svc = |name: &str, vip: &str, port: u16, proto: &str, bs: &[&str]| {
        format!("  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    mode: {mode}\n    backends: [{}]\n", backend_list(bs))
    };
    let web4 = ["10.20.0.2:80", "10.20.0.3:80", "10.20.0.4:80"];
    let web6 = ["[fd20::2]:80", "[fd20::3]:80", "[fd20::4]:80"];
    let text = format!(
        "maglev_table_size: {M}\nsnat: {{ipv4: 10.20.0.1, ipv6: \"fd20::1\"}}\nservices:\n{}{}{}{}",
        svc("dns", "192.0.2.10", 53, "udp", udp4),
        svc("web", "192.0.2.10", 80, "tcp", &web4),
        svc("dns6", "2001:db8::10", 53, "udp", udp6),
        svc("web6", "2001:db8::10", 80, "tcp", &web6),
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("fixture config: {e:#}\n{text}"))
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn client(v6: bool) -> &'static str {
    if v6 {
        "fd10::5"
    } else {
        "10.10.0.5"
    }
}

fn vip(v6: bool) -> &'static str {
    if v6 {
        "2001:db8::10"
    } else {
        "192.0.2.10"
    }
}

fn snat(v6: bool) -> IpAddr {
    if v6 { "fd20::1" } else { "10.20.0.1" }.parse().unwrap()
}

/// A datagram of `len` payload bytes from the client to the VIP's port, in fragments of
/// `chunk` bytes.
fn datagram(
    v6: bool,
    proto: u8,
    sport: u16,
    len: usize,
    chunk: usize,
    id: u32,
) -> (Frame, Vec<Vec<u8>>) {
    let mut f = if proto == PROTO_UDP {
        Frame::udp(client(v6), sport, vip(v6), 53)
    } else {
        Frame::tcp(client(v6), sport, vip(v6), 80)
    };
    f.payload = payload(len);
    let frags = fragment(&f.build(), chunk, id);
    (f, frags)
}

fn run_all(f: &mut Fixture, frames: &[Vec<u8>], ifindex: u32) -> Vec<(u32, Vec<u8>)> {
    frames
        .iter()
        .map(|fr| {
            let r = f.run_on(fr, ifindex).unwrap();
            (r.verdict, r.data)
        })
        .collect()
}

/// nat, both families: a datagram in three fragments (first, middle, last) reaches the
/// backend Maglev picks, SNATed, whole; the backend's answer in three fragments comes
/// back from the VIP, whole.
#[test]
fn privileged_nat_fragments_both_ways() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config("nat", &BACKENDS_UDP_V4, &BACKENDS_UDP_V6))
            .unwrap();
        for (i, v6) in [false, true].into_iter().enumerate() {
            let backends: &[&str] = if v6 {
                &BACKENDS_UDP_V6
            } else {
                &BACKENDS_UDP_V4
            };
            let (frame, frags) = datagram(v6, PROTO_UDP, 41000, 3000, 1200, 0x1234 + i as u32);
            assert_eq!(frags.len(), 3, "first, middle, last");
            let out = run_all(&mut f, &frags, lab.client_if);
            for (k, (verdict, _)) in out.iter().enumerate() {
                assert_eq!(*verdict, XDP_REDIRECT, "v6={v6} fragment {k} forwarded");
            }
            let whole = reassemble(&out.into_iter().map(|(_, d)| d).collect::<Vec<_>>()).unwrap();
            let d = decode(&whole).expect("the reassembled datagram's checksums");
            let want = predicted_backend(backends, &frame, PROTO_UDP);
            assert_eq!((d.dst, d.dport), (want.ip(), want.port()), "v6={v6}");
            assert_eq!(d.src, snat(v6));
            assert_eq!(
                d.payload, frame.payload,
                "v6={v6}: the datagram arrives whole"
            );

            // The answer: backend → SNAT address:port, 5000 bytes in 1400-byte pieces.
            let mut reply = Frame::udp(
                &want.ip().to_string(),
                want.port(),
                &snat(v6).to_string(),
                d.sport,
            );
            reply.src_mac = backend_mac(want.ip());
            reply.dst_mac = lab.backend_side_mac;
            reply.payload = payload(5000);
            let rfrags = fragment(&reply.build(), 1400, 0x99 + i as u32);
            assert_eq!(rfrags.len(), 4);
            let back = run_all(&mut f, &rfrags, lab.backend_if);
            for (k, (verdict, _)) in back.iter().enumerate() {
                assert_eq!(
                    *verdict, XDP_REDIRECT,
                    "v6={v6} reply fragment {k} forwarded"
                );
            }
            let whole = reassemble(&back.into_iter().map(|(_, d)| d).collect::<Vec<_>>()).unwrap();
            let b = decode(&whole).expect("the reassembled answer's checksums");
            assert_eq!(
                (b.src, b.sport, b.dst, b.dport),
                (frame.dst, 53, frame.src, frame.sport),
                "v6={v6}: the answer comes from the VIP to the client"
            );
            assert_eq!(b.payload, reply.payload);
        }
        // Two datagrams each way, each with a first fragment recorded and the rest
        // followed.
        assert_eq!(counter(&f, "event_fragment_recorded"), 4);
        assert_eq!(counter(&f, "event_fragment_followed"), 2 * 2 + 2 * 3);
        assert_eq!(counter(&f, "pass_fragment"), 0);
    });
}

const BACKENDS_UDP_V4: [&str; 3] = ["10.20.0.2:5353", "10.20.0.3:5353", "10.20.0.4:5353"];
const BACKENDS_UDP_V6: [&str; 3] = ["[fd20::2]:5353", "[fd20::3]:5353", "[fd20::4]:5353"];

/// A row: its name, the frames in arrival order, and per frame the verdict and reason.
type Row = (&'static str, Vec<Vec<u8>>, Vec<(u32, &'static str)>);

/// The rows that pass or drop: each a name, fragments in arrival order, and per
/// fragment the verdict and the reason counted. A passed fragment comes out untouched.
#[test]
fn privileged_fragment_rows() {
    in_lab(|lab| {
        for v6 in [false, true] {
            // Later fragment before its first: passed (no record yet); once the first
            // has come, a later one follows it.
            let (_, frags) = datagram(v6, PROTO_UDP, 42000, 3000, 1200, 7);
            let rows: Vec<Row> = vec![
                (
                    "later before first",
                    vec![frags[1].clone(), frags[0].clone(), frags[2].clone()],
                    vec![
                        (XDP_PASS, "pass_fragment"),
                        (XDP_REDIRECT, "fwd_forward"),
                        (XDP_REDIRECT, "fwd_forward"),
                    ],
                ),
                {
                    // For no VIP: the first is not a VIP's, the rest have no record.
                    let mut g = Frame::udp(
                        client(v6),
                        42001,
                        if v6 { "2001:db8::99" } else { "192.0.2.99" },
                        53,
                    );
                    g.payload = payload(3000);
                    let fr = fragment(&g.build(), 1200, 8);
                    (
                        "no VIP",
                        fr,
                        vec![
                            (XDP_PASS, "pass_not_vip"),
                            (XDP_PASS, "pass_fragment"),
                            (XDP_PASS, "pass_fragment"),
                        ],
                    )
                },
                {
                    // TCP: a fragment at offset 8 overlaps the 20-byte header of the
                    // datagram it follows (RFC 1858): dropped. One at 24 is fine.
                    let (_, tf) = datagram(v6, PROTO_TCP, 42002, 200, 24, 9);
                    let (_, overlap) = datagram(v6, PROTO_TCP, 42002, 200, 8, 9);
                    (
                        "overlapping the TCP header",
                        vec![tf[0].clone(), overlap[1].clone(), tf[1].clone()],
                        vec![
                            (XDP_REDIRECT, "fwd_forward"),
                            (XDP_DROP, "drop_fragment_overlap"),
                            (XDP_REDIRECT, "fwd_forward"),
                        ],
                    )
                },
                {
                    // A first fragment too short to hold the TCP header: not parsed,
                    // no record, and the rest are not balanced either.
                    let (_, tiny) = datagram(v6, PROTO_TCP, 42003, 200, 8, 10);
                    (
                        "tiny first fragment",
                        vec![tiny[0].clone(), tiny[1].clone(), tiny[3].clone()],
                        vec![
                            (XDP_PASS, "pass_parse_error"),
                            (XDP_PASS, "pass_fragment"),
                            (XDP_PASS, "pass_fragment"),
                        ],
                    )
                },
            ];
            for (name, frames, want) in rows {
                let mut f = Fixture::new().unwrap();
                f.apply(&config("nat", &BACKENDS_UDP_V4, &BACKENDS_UDP_V6))
                    .unwrap();
                for (k, (frame, (verdict, reason))) in frames.iter().zip(&want).enumerate() {
                    let before = counter(&f, reason);
                    let r = f.run_on(frame, lab.client_if).unwrap();
                    assert_eq!(r.verdict, *verdict, "{name} v6={v6} #{k}");
                    assert_eq!(
                        counter(&f, reason),
                        before + 1,
                        "{name} v6={v6} #{k}: {reason}"
                    );
                    if *verdict == XDP_PASS {
                        assert_eq!(&r.data, frame, "{name} v6={v6} #{k}: passed untouched");
                    }
                }
            }
        }
    });
}

/// An IPv6 fragment header behind two destination-options headers: the walk finds it,
/// and the datagram is balanced and arrives whole.
#[test]
fn privileged_ipv6_fragment_header_behind_extension_headers() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config("nat", &BACKENDS_UDP_V4, &BACKENDS_UDP_V6))
            .unwrap();
        let mut frame = Frame::udp(client(true), 43000, vip(true), 53);
        frame.payload = payload(2500);
        let pad = [0, 0, 1, 4, 0, 0, 0, 0];
        let frags = fragment_behind(&frame.build(), 1000, 77, &[pad, pad]);
        let out = run_all(&mut f, &frags, lab.client_if);
        assert!(
            out.iter().all(|(v, _)| *v == XDP_REDIRECT),
            "{:?}",
            out.iter().map(|o| o.0).collect::<Vec<_>>()
        );
        let d = decode(&reassemble(&out.into_iter().map(|(_, d)| d).collect::<Vec<_>>()).unwrap())
            .unwrap();
        assert_eq!(d.payload, frame.payload);
        assert_eq!(
            d.dst,
            predicted_backend(&BACKENDS_UDP_V6, &frame, PROTO_UDP).ip()
        );
    });
}

/// dnat: every fragment to the same backend, the client's address kept. dsr: every
/// fragment encapsulated, unchanged, to the first fragment's backend.
#[test]
fn privileged_dnat_and_dsr_fragments_follow_the_first() {
    in_lab(|lab| {
        for v6 in [false, true] {
            let mut f = Fixture::new().unwrap();
            f.apply(&config("dnat", &BACKENDS_UDP_V4, &BACKENDS_UDP_V6))
                .unwrap();
            let backends: &[&str] = if v6 {
                &BACKENDS_UDP_V6
            } else {
                &BACKENDS_UDP_V4
            };
            let (frame, frags) = datagram(v6, PROTO_UDP, 44000, 4000, 1400, 5);
            let out = run_all(&mut f, &frags, lab.client_if);
            assert!(out.iter().all(|(v, _)| *v == XDP_REDIRECT));
            let d =
                decode(&reassemble(&out.into_iter().map(|(_, d)| d).collect::<Vec<_>>()).unwrap())
                    .unwrap();
            let want = predicted_backend(backends, &frame, PROTO_UDP);
            assert_eq!(
                (d.src, d.sport),
                (frame.src, frame.sport),
                "dnat keeps the client"
            );
            assert_eq!((d.dst, d.dport), (want.ip(), want.port()));
            assert_eq!(d.payload, frame.payload);

            let mut f = Fixture::new().unwrap();
            f.apply(&config("dsr", &DSR_UDP_V4, &DSR_UDP_V6)).unwrap();
            let dsr_backends: &[&str] = if v6 { &DSR_UDP_V6 } else { &DSR_UDP_V4 };
            let want = predicted_backend(dsr_backends, &frame, PROTO_UDP);
            let (outer, inner_at, dst_at) = if v6 { (40, 54, 38) } else { (20, 34, 30) };
            let out = run_all(&mut f, &frags, lab.client_if);
            for (k, (v, data)) in out.iter().enumerate() {
                assert_eq!(*v, XDP_REDIRECT, "dsr v6={v6} #{k}");
                let dst: IpAddr = if v6 {
                    <[u8; 16]>::try_from(&data[dst_at..dst_at + 16])
                        .unwrap()
                        .into()
                } else {
                    <[u8; 4]>::try_from(&data[dst_at..dst_at + 4])
                        .unwrap()
                        .into()
                };
                assert_eq!(dst, want.ip(), "dsr v6={v6} #{k}: to the first's backend");
                assert_eq!(data.len(), frags[k].len() + outer, "one outer header");
                assert_eq!(
                    &data[inner_at..],
                    &frags[k][14..],
                    "the fragment unchanged inside"
                );
            }
        }
    });
}

/// dsr: a fragment that no longer fits once encapsulated. IPv4 fragments carry no DF:
/// dropped and counted. IPv6 is answered with packet-too-big, as unfragmented packets are.
#[test]
fn privileged_dsr_fragment_too_big_for_the_tunnel() {
    in_lab(|lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config("dsr", &DSR_UDP_V4, &DSR_UDP_V6)).unwrap();
        let (_, v4) = datagram(false, PROTO_UDP, 45000, 4000, 1480, 3);
        let r = f.run_on(&v4[0], lab.client_if).unwrap();
        assert_eq!(r.verdict, XDP_DROP);
        assert_eq!(counter(&f, "drop_fragment_too_big"), 1);
        let (_, v6) = datagram(true, PROTO_UDP, 45000, 4000, 1448, 3);
        let r = f.run_on(&v6[0], lab.client_if).unwrap();
        assert_eq!(r.verdict, XDP_TX);
        assert_eq!(counter(&f, "icmp_too_big_sent"), 1);
    });
}
