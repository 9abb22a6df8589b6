//! BPF_PROG_TEST_RUN fixtures for fragmented datagrams: each case is a row (name, the
//! fragments in the order they arrive, the service's mode, and what must come out),
//! run through the real program in the NAT fixture namespace. One case stays a
//! function: nat both ways, whose answer is addressed to the SNAT port the datagram
//! got, known only from what came out. What the program emits
//! is reassembled and decoded, so the transport checksum of the whole datagram is
//! checked after translation, and every IPv4 fragment's own header checksum.

use std::net::IpAddr;

use lb_common::{PROTO_TCP, PROTO_UDP};
use xlb::config::Config;
use xlb_tests::{
    cfg::{Cfg, Mode, Svc},
    fragment::{fragment, fragment_behind, reassemble},
    natlab::*,
    packet::{decode, Frame},
    rows::{self, Packet, Row},
    testrun::{Fixture, RunResult, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const DSR_UDP_V4: [&str; 3] = ["10.20.0.2:53", "10.20.0.3:53", "10.20.0.4:53"];
const DSR_UDP_V6: [&str; 3] = ["[fd20::2]:53", "[fd20::3]:53", "[fd20::4]:53"];

/// dns (UDP :53) and web (TCP :80) on both VIPs, in `mode`, with `udp`'s backends for
/// the UDP services.
fn config(mode: Mode, udp4: &[&str], udp6: &[&str]) -> Config {
    let web4 = ["10.20.0.2:80", "10.20.0.3:80", "10.20.0.4:80"];
    let web6 = ["[fd20::2]:80", "[fd20::3]:80", "[fd20::4]:80"];
    Cfg::new()
        .maglev_table_size(M)
        .snat4("10.20.0.1")
        .snat6("fd20::1")
        .service(Svc::udp("dns", "192.0.2.10", 53).mode(mode).backends(udp4))
        .service(Svc::tcp("web", "192.0.2.10", 80).mode(mode).backends(web4))
        .service(
            Svc::udp("dns6", "2001:db8::10", 53)
                .mode(mode)
                .backends(udp6),
        )
        .service(
            Svc::tcp("web6", "2001:db8::10", 80)
                .mode(mode)
                .backends(web6),
        )
        .config()
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
        f.apply(&config(Mode::Nat, &BACKENDS_UDP_V4, &BACKENDS_UDP_V6))
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
            assert_eq!(d.src, backend_side_addr(v6));
            assert_eq!(
                d.payload, frame.payload,
                "v6={v6}: the datagram arrives whole"
            );

            // The answer: backend → SNAT address:port, 5000 bytes in 1400-byte pieces.
            let mut reply = Frame::udp(
                &want.ip().to_string(),
                want.port(),
                &backend_side_addr(v6).to_string(),
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

fn family(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// Each row: a name, the map state (the services' mode), the fragments in the order
/// they arrive, and per fragment the verdict, the reason counted and what comes out (a
/// passed fragment untouched); some rows then check the datagram reassembled from what
/// came out.
#[test]
fn privileged_fragment_rows() {
    in_lab(|lab| {
        let nat = || config(Mode::Nat, &BACKENDS_UDP_V4, &BACKENDS_UDP_V6);
        let on = |frame: &Vec<u8>| Packet::on(lab.client_if, frame.clone());
        // Each fragment: its verdict and the reason counted; passed ones untouched.
        let counted = |frame: &Vec<u8>, verdict: u32, reason: &'static str| {
            let p = on(frame).verdict(verdict).moves(&[reason]);
            if verdict == XDP_PASS {
                p.unchanged()
            } else {
                p
            }
        };
        let mut rows = Vec::new();
        for v6 in [false, true] {
            let fam = family(v6);
            // Later fragment before its first: passed (no record yet); once the first
            // has come, a later one follows it.
            let (_, frags) = datagram(v6, PROTO_UDP, 42000, 3000, 1200, 7);
            rows.push(
                Row::new(format!("later before first ({fam})"))
                    .config(nat())
                    .packet(counted(&frags[1], XDP_PASS, "pass_fragment"))
                    .packet(counted(&frags[0], XDP_REDIRECT, "fwd_forward"))
                    .packet(counted(&frags[2], XDP_REDIRECT, "fwd_forward")),
            );
            // For no VIP: the first is not a VIP's, the rest have no record.
            let mut g = Frame::udp(
                client(v6),
                42001,
                if v6 { "2001:db8::99" } else { "192.0.2.99" },
                53,
            );
            g.payload = payload(3000);
            let fr = fragment(&g.build(), 1200, 8);
            rows.push(
                Row::new(format!("no VIP ({fam})"))
                    .config(nat())
                    .packet(counted(&fr[0], XDP_PASS, "pass_not_vip"))
                    .packet(counted(&fr[1], XDP_PASS, "pass_fragment"))
                    .packet(counted(&fr[2], XDP_PASS, "pass_fragment")),
            );
            // TCP: a fragment at offset 8 overlaps the 20-byte header of the datagram
            // it follows (RFC 1858): dropped. One at 24 is fine.
            let (_, tf) = datagram(v6, PROTO_TCP, 42002, 200, 24, 9);
            let (_, overlap) = datagram(v6, PROTO_TCP, 42002, 200, 8, 9);
            rows.push(
                Row::new(format!("overlapping the TCP header ({fam})"))
                    .config(nat())
                    .packet(counted(&tf[0], XDP_REDIRECT, "fwd_forward"))
                    .packet(counted(&overlap[1], XDP_DROP, "drop_fragment_overlap"))
                    .packet(counted(&tf[1], XDP_REDIRECT, "fwd_forward")),
            );
            // A first fragment too short to hold the TCP header: not parsed, no record,
            // and the rest are not balanced either.
            let (_, tiny) = datagram(v6, PROTO_TCP, 42003, 200, 8, 10);
            rows.push(
                Row::new(format!("tiny first fragment ({fam})"))
                    .config(nat())
                    .packet(counted(&tiny[0], XDP_PASS, "pass_parse_error"))
                    .packet(counted(&tiny[1], XDP_PASS, "pass_fragment"))
                    .packet(counted(&tiny[3], XDP_PASS, "pass_fragment")),
            );

            // dnat: every fragment to the same backend, the client's address kept.
            let (frame, frags) = datagram(v6, PROTO_UDP, 44000, 4000, 1400, 5);
            let backends: &[&str] = if v6 {
                &BACKENDS_UDP_V6
            } else {
                &BACKENDS_UDP_V4
            };
            let want = predicted_backend(backends, &frame, PROTO_UDP);
            let mut row = Row::new(format!("dnat: the fragments follow the first ({fam})"))
                .config(config(Mode::Dnat, &BACKENDS_UDP_V4, &BACKENDS_UDP_V6));
            for fr in &frags {
                row = row.packet(on(fr).verdict(XDP_REDIRECT));
            }
            let sent = frame.clone();
            rows.push(row.check(move |_, out| {
                let d = decode(&reassemble_all(out)).unwrap();
                assert_eq!(
                    (d.src, d.sport),
                    (sent.src, sent.sport),
                    "dnat keeps the client"
                );
                assert_eq!((d.dst, d.dport), (want.ip(), want.port()));
                assert_eq!(d.payload, sent.payload);
            }));

            // dsr: every fragment encapsulated, unchanged, to the first fragment's
            // backend.
            let dsr_backends: &[&str] = if v6 { &DSR_UDP_V6 } else { &DSR_UDP_V4 };
            let want = predicted_backend(dsr_backends, &frame, PROTO_UDP).ip();
            let (outer, inner_at, dst_at) = if v6 { (40, 54, 38) } else { (20, 34, 30) };
            let mut row = Row::new(format!("dsr: the fragments follow the first ({fam})"))
                .config(config(Mode::Dsr, &DSR_UDP_V4, &DSR_UDP_V6));
            for fr in frags {
                let inner = fr[14..].to_vec();
                row = row.packet(on(&fr).verdict(XDP_REDIRECT).output_check(move |data| {
                    let dst: IpAddr = if v6 {
                        <[u8; 16]>::try_from(&data[dst_at..dst_at + 16])
                            .unwrap()
                            .into()
                    } else {
                        <[u8; 4]>::try_from(&data[dst_at..dst_at + 4])
                            .unwrap()
                            .into()
                    };
                    assert_eq!(dst, want, "to the first's backend");
                    assert_eq!(data.len(), inner.len() + 14 + outer, "one outer header");
                    assert_eq!(
                        &data[inner_at..],
                        &inner[..],
                        "the fragment unchanged inside"
                    );
                }));
            }
            rows.push(row);
        }

        // An IPv6 fragment header behind two destination-options headers: the walk
        // finds it, and the datagram is balanced and arrives whole.
        let mut frame = Frame::udp(client(true), 43000, vip(true), 53);
        frame.payload = payload(2500);
        let pad = [0, 0, 1, 4, 0, 0, 0, 0];
        let mut row = Row::new("IPv6 fragment header behind extension headers").config(nat());
        for fr in fragment_behind(&frame.build(), 1000, 77, &[pad, pad]) {
            row = row.packet(on(&fr).verdict(XDP_REDIRECT));
        }
        let want = predicted_backend(&BACKENDS_UDP_V6, &frame, PROTO_UDP).ip();
        rows.push(row.check(move |_, out| {
            let d = decode(&reassemble_all(out)).unwrap();
            assert_eq!(d.payload, frame.payload);
            assert_eq!(d.dst, want);
        }));

        // dsr: a fragment that no longer fits once encapsulated. IPv4 fragments carry
        // no DF: dropped and counted. IPv6 is answered with packet-too-big, as
        // unfragmented packets are.
        let dsr = || config(Mode::Dsr, &DSR_UDP_V4, &DSR_UDP_V6);
        let (_, v4) = datagram(false, PROTO_UDP, 45000, 4000, 1480, 3);
        rows.push(
            Row::new("dsr: fragment too big for the tunnel (IPv4)")
                .config(dsr())
                .packet(on(&v4[0]).verdict(XDP_DROP))
                .total("drop_fragment_too_big", 1),
        );
        let (_, v6) = datagram(true, PROTO_UDP, 45000, 4000, 1448, 3);
        rows.push(
            Row::new("dsr: fragment too big for the tunnel (IPv6)")
                .config(dsr())
                .packet(on(&v6[0]).verdict(XDP_TX))
                .total("icmp_too_big_sent", 1),
        );
        rows::run(rows);
    });
}

/// The datagram reassembled from the frames the program emitted.
fn reassemble_all(out: &[RunResult]) -> Vec<u8> {
    reassemble(&out.iter().map(|r| r.data.clone()).collect::<Vec<_>>()).unwrap()
}
