//! Hostile packets through the real program (BPF_PROG_TEST_RUN), in the NAT fixtures'
//! namespace with live services, flows and replies:
//! - a corpus of malformed frames: truncated at every byte, bad lengths, every IHL,
//!   IPv6 extension-header chains, fragments (real ones, in and out of order, cut
//!   through the transport header; and mangled fragment fields), every TCP data offset, stacked VLAN tags,
//!   and frames shorter than Ethernet;
//! - seeded random mutations of valid frames (VIP traffic, replies, ICMP errors, other
//!   traffic), a bounded count.
//!
//! Invariants, for every packet:
//! - the verdict is PASS, DROP, TX or REDIRECT (never ABORTED or anything else);
//! - a packet that is neither for a VIP nor a reply nor an ICMP error leaves unmodified;
//! - a modified packet whose checksums were valid still has valid checksums;
//! - every packet is counted exactly once as seen and once with a reason;
//! - malformed packets, VLAN-tagged ones and fragments of no VIP's datagram create no
//!   map entries (a first fragment to a VIP is balanced like any packet).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::{ConnValue, ReverseNat, StatIndex, MAP_CONNTRACK, MAP_REVERSE_NAT};
use xlb::counters::read_global_counters;
use xlb::flows::FlowTable;
use xlb::model::Mode;
use xlb_tests::{
    natlab::*,
    packet::{decode, Frame, ACK},
    testrun::{Fixture, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

/// Seeded xorshift64*: reproducible, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const VIPS: [(&str, u16, u8); 4] = [
    ("192.0.2.10", 80, 6),
    ("192.0.2.10", 53, 17),
    ("2001:db8::10", 80, 6),
    ("2001:db8::10", 53, 17),
];

/// What the oracle (etherparse, no checksum checks) makes of a frame.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Class {
    /// Not parseable as Ethernet + IP within its length.
    Malformed,
    /// Fragments, VLAN tags: passed with no state.
    Stateless,
    Vip,
    Reply,
    Icmp,
    Other,
}

/// The interface a frame of `class` arrives on: a backend's reply on the backends'
/// side, anything else on the clients'.
fn ingress(class: Class, lab: &Lab) -> u32 {
    if class == Class::Reply {
        lab.backend_if
    } else {
        lab.client_if
    }
}

fn classify(frame: &[u8], backends: &BTreeSet<IpAddr>) -> Class {
    if frame.len() >= 14 && u16::from_be_bytes([frame[12], frame[13]]) == 0x86dd {
        return classify_v6(frame, backends);
    }
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return Class::Malformed;
    };
    if !p.link_exts.is_empty() {
        return Class::Stateless;
    }
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return Class::Other;
    };
    let h = ip.header();
    if h.is_fragmenting_payload() {
        return classify_v4_fragment(frame, backends);
    }
    let (src, dst) = (IpAddr::from(h.source()), IpAddr::from(h.destination()));
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => flow_class(src, dst, t.destination_port(), 6, backends),
        Some(TransportSlice::Udp(u)) => flow_class(src, dst, u.destination_port(), 17, backends),
        Some(TransportSlice::Icmpv4(_)) => Class::Icmp,
        _ => Class::Other,
    }
}

/// An IPv4 fragment, as xlb treats it: the first (offset 0) is parsed through to its
/// ports and balanced like any packet; a later one may follow a recorded datagram,
/// which only a datagram to a VIP or from a backend can be.
fn classify_v4_fragment(frame: &[u8], backends: &BTreeSet<IpAddr>) -> Class {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let end = 14 + u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let offset = u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff;
    let v4 = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&frame[o..o + 4]).unwrap());
    let (src, dst) = (v4(26), v4(30));
    let proto = frame[23];
    if offset != 0 {
        return later_fragment_class(src, dst, backends);
    }
    first_fragment_class(frame, 14 + ihl, end, src, dst, proto, backends)
}

/// A first fragment's transport header, checked as xlb's parser does (a UDP length
/// past the fragment is the whole datagram's).
fn first_fragment_class(
    frame: &[u8],
    l4: usize,
    end: usize,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    backends: &BTreeSet<IpAddr>,
) -> Class {
    match proto {
        6 if l4 + 20 <= end => {
            let doff = (frame[l4 + 12] >> 4) as usize * 4;
            if doff < 20 || l4 + doff > end {
                return Class::Malformed;
            }
        }
        17 if l4 + 8 <= end => {
            if u16::from_be_bytes([frame[l4 + 4], frame[l4 + 5]]) < 8 {
                return Class::Malformed;
            }
        }
        6 | 17 => return Class::Malformed,
        _ => return Class::Stateless,
    }
    let dport = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
    flow_class(src, dst, dport, proto, backends)
}

/// A later fragment: translated only if it follows a recorded datagram, to a VIP or
/// from a backend; anything else is passed untouched.
fn later_fragment_class(src: IpAddr, dst: IpAddr, backends: &BTreeSet<IpAddr>) -> Class {
    if VIPS
        .iter()
        .any(|(v, ..)| dst == v.parse::<IpAddr>().unwrap())
    {
        return Class::Vip;
    }
    if backends.contains(&src) {
        return Class::Reply;
    }
    Class::Stateless
}

/// IPv6 by RFC 8200 (etherparse stops at a repeated extension header, which the kernel
/// accepts): Hop-by-Hop only first, any other extension header may repeat.
fn classify_v6(frame: &[u8], backends: &BTreeSet<IpAddr>) -> Class {
    if frame.len() < 54 || frame[14] >> 4 != 6 {
        return Class::Malformed;
    }
    let end = 54 + u16::from_be_bytes([frame[18], frame[19]]) as usize;
    if end > frame.len() {
        return Class::Malformed;
    }
    let addr = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&frame[o..o + 16]).unwrap());
    let (src, dst) = (addr(22), addr(38));
    let (mut next, mut off) = (frame[20], 54);
    for i in 0.. {
        match next {
            0 | 43 | 60 | 51 => {
                if next == 0 && i > 0 {
                    return Class::Malformed;
                }
                if off + 2 > end {
                    return Class::Malformed;
                }
                let len = if next == 51 {
                    (frame[off + 1] as usize + 2) * 4
                } else {
                    (frame[off + 1] as usize + 1) * 8
                };
                next = frame[off];
                off += len;
            }
            // xlb walks no header behind the fragment header.
            44 => {
                if off + 8 > end {
                    return Class::Malformed;
                }
                let word = u16::from_be_bytes([frame[off + 2], frame[off + 3]]);
                let inner = frame[off];
                if word >> 3 != 0 {
                    return later_fragment_class(src, dst, backends);
                }
                if word & 1 != 0 {
                    return first_fragment_class(frame, off + 8, end, src, dst, inner, backends);
                }
                next = inner;
                off += 8;
                break;
            }
            _ => break,
        }
    }
    match next {
        6 => {
            if off + 20 > end {
                return Class::Malformed;
            }
            let doff = (frame[off + 12] >> 4) as usize * 4;
            if doff < 20 || off + doff > end {
                return Class::Malformed;
            }
            flow_class(
                src,
                dst,
                u16::from_be_bytes([frame[off + 2], frame[off + 3]]),
                6,
                backends,
            )
        }
        17 => {
            if off + 8 > end {
                return Class::Malformed;
            }
            let len = u16::from_be_bytes([frame[off + 4], frame[off + 5]]) as usize;
            if len < 8 || off + len > end {
                return Class::Malformed;
            }
            flow_class(
                src,
                dst,
                u16::from_be_bytes([frame[off + 2], frame[off + 3]]),
                17,
                backends,
            )
        }
        58 => Class::Icmp,
        _ => Class::Other,
    }
}

fn flow_class(
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    proto: u8,
    backends: &BTreeSet<IpAddr>,
) -> Class {
    if VIPS
        .iter()
        .any(|(v, port, pr)| dst == v.parse::<IpAddr>().unwrap() && dport == *port && proto == *pr)
    {
        return Class::Vip;
    }
    let snat: [IpAddr; 2] = ["10.20.0.1".parse().unwrap(), "fd20::1".parse().unwrap()];
    if backends.contains(&src) && snat.contains(&dst) {
        return Class::Reply;
    }
    Class::Other
}

fn entries(pin: &std::path::Path) -> usize {
    let ct = FlowTable::<ConnValue>::from_pin(&pin.join(MAP_CONNTRACK)).unwrap();
    let rv = FlowTable::<ReverseNat>::from_pin(&pin.join(MAP_REVERSE_NAT)).unwrap();
    ct.entries().count() + rv.entries().count()
}

/// Packets counted: every `Seen*`, every reason, and the reasons of the packets passed
/// (`pass_*`, the derived one among them).
fn totals(pin: &std::path::Path) -> (u64, u64, u64) {
    let c = read_global_counters(pin).unwrap();
    let sum = |pick: &dyn Fn(&StatIndex) -> bool| -> u64 {
        StatIndex::ALL
            .iter()
            .filter(|i| pick(i))
            .map(|i| c[i.name()].packets)
            .sum()
    };
    (
        sum(&|i| i.is_seen()),
        sum(&|i| i.is_reason()),
        sum(&|i| i.is_reason() && i.name().starts_with("pass_")),
    )
}

struct Harness<'a> {
    f: Fixture,
    lab: &'a Lab,
    backends: BTreeSet<IpAddr>,
    run: u64,
    refused: u64,
    modified: u64,
    by_verdict: [u64; 5],
}

impl Harness<'_> {
    /// Runs one frame and checks the per-packet invariants. Returns its class.
    fn check(&mut self, frame: &[u8], what: &str) -> Class {
        let class = classify(frame, &self.backends);
        let ifindex = ingress(class, self.lab);
        let res = match self.f.run_on(frame, ifindex) {
            Ok(r) => r,
            Err(e) => {
                // The kernel refuses test frames shorter than an Ethernet header before
                // the program runs (no NIC delivers those either).
                assert!(
                    frame.len() < 14,
                    "{what}: BPF_PROG_TEST_RUN failed on a {}-byte frame: {e:#}",
                    frame.len()
                );
                self.refused += 1;
                return class;
            }
        };
        self.run += 1;
        assert!(
            matches!(res.verdict, XDP_PASS | XDP_DROP | XDP_TX | XDP_REDIRECT),
            "{what}: verdict {} for {class:?} frame {frame:02x?}",
            res.verdict
        );
        self.by_verdict[res.verdict as usize] += 1;
        if res.data != frame {
            self.modified += 1;
            assert!(
                matches!(class, Class::Vip | Class::Reply | Class::Icmp),
                "{what}: a {class:?} frame was modified:\n in  {frame:02x?}\n out {:02x?}",
                res.data
            );
            if decode(frame).is_ok() {
                if let Err(e) = decode(&res.data) {
                    panic!("{what}: valid {class:?} frame out with bad checksums ({e:#}):\n in  {frame:02x?}\n out {:02x?}", res.data);
                }
            }
        }
        class
    }
}

fn set_u16(f: &mut [u8], off: usize, v: u16) {
    if off + 2 <= f.len() {
        f[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Frames that are valid: new flows and established ones to every VIP, replies to
/// them, ICMP errors about them, and traffic that is not xlb's.
fn seeds(fx: &mut Fixture, lab: &Lab) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, (vip, port, proto)) in VIPS.iter().enumerate() {
        let client = if vip.contains(':') {
            "fd10::5"
        } else {
            "10.10.0.5"
        };
        for sport in [40000 + i as u16, 41000 + i as u16] {
            let f = if *proto == 6 {
                Frame::tcp(client, sport, vip, *port)
            } else {
                Frame::udp(client, sport, vip, *port)
            };
            let syn = f.build();
            let res = fx.run_on(&syn, lab.client_if).unwrap();
            assert_eq!(res.verdict, XDP_REDIRECT);
            out.push(syn);
            out.push(f.clone().flags(ACK).build());
            // dsr's packet leaves encapsulated, and its replies do not come back here.
            let Ok(fwd) = decode(&res.data) else {
                continue;
            };
            // The reply: backend → SNAT address and port.
            let reply = Frame {
                src_mac: BACKEND_MACS[0],
                dst_mac: lab.backend_side_mac,
                src: fwd.dst,
                dst: fwd.src,
                sport: fwd.dport,
                dport: fwd.sport,
                ..f.clone().flags(ACK)
            };
            out.push(reply.build());
            // An ICMP error from the backend about our forwarded packet.
            out.push(icmp_frame(
                BACKEND_MACS[0],
                lab.backend_side_mac,
                fwd.dst,
                fwd.src,
                &res.data[14..],
            ));
        }
        // Not xlb's: another port, another address.
        let other = if *proto == 6 {
            Frame::tcp(client, 5555, vip, 8443)
        } else {
            Frame::udp(
                client,
                5555,
                if vip.contains(':') {
                    "fd10::1"
                } else {
                    "10.10.0.1"
                },
                53,
            )
        };
        out.push(other.build());
    }
    out
}

fn corpus(seeds: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (s, frame) in seeds.iter().enumerate() {
        let v4 = u16::from_be_bytes([frame[12], frame[13]]) == 0x0800;
        // Real fragments of it, as a sender's kernel cuts them, in order and last
        // first, at sizes that cut through the transport header.
        for chunk in [8, 16, 24, 64] {
            let frags = xlb_tests::fragment::fragment(frame, chunk, 100 + s as u32);
            for (k, f) in frags
                .iter()
                .enumerate()
                .chain(frags.iter().enumerate().rev())
            {
                out.push((
                    format!("seed {s} fragment {k} of {} at {chunk}", frags.len()),
                    f.clone(),
                ));
            }
        }
        // The last hop's TTL (hop limit): passed for the kernel's time-exceeded, on
        // every path (established, new, stateless) before any entry is made.
        let mut last_hop = frame.clone();
        if v4 {
            last_hop[14 + 8] = 1;
            let ihl = ((last_hop[14] & 0x0f) as usize) * 4;
            let sum = xlb_tests::fragment::ipv4_checksum(&last_hop[14..14 + ihl]);
            last_hop[24..26].copy_from_slice(&sum.to_be_bytes());
        } else {
            last_hop[14 + 7] = 1;
        }
        out.push((format!("seed {s} with TTL 1"), last_hop));
        // Truncated at every byte (frames shorter than 14 bytes included).
        for n in 0..frame.len() {
            out.push((format!("seed {s} truncated to {n}"), frame[..n].to_vec()));
        }
        if v4 {
            let ihl = ((frame[14] & 0x0f) as usize) * 4;
            for ihl_v in 0..16u8 {
                let mut f = frame.clone();
                f[14] = 0x40 | ihl_v;
                out.push((format!("seed {s} IHL {ihl_v}"), f));
            }
            for tot in [
                0u16,
                1,
                19,
                20,
                (frame.len() - 15) as u16,
                (frame.len() - 13) as u16,
                0xffff,
            ] {
                let mut f = frame.clone();
                set_u16(&mut f, 16, tot);
                out.push((format!("seed {s} total length {tot}"), f));
            }
            for frag in [0x2000u16, 0x0001, 0x1fff, 0x3fff, 0x4000] {
                let mut f = frame.clone();
                set_u16(&mut f, 20, frag);
                out.push((format!("seed {s} frag field {frag:#x}"), f));
            }
            let l4 = 14 + ihl;
            if frame[23] == 6 {
                for off in 0..16u8 {
                    let mut f = frame.clone();
                    f[l4 + 12] = (off << 4) | (f[l4 + 12] & 0x0f);
                    out.push((format!("seed {s} TCP data offset {off}"), f));
                }
            }
            if frame[23] == 17 {
                for len in [0u16, 7, 8, 9, 0xffff] {
                    let mut f = frame.clone();
                    set_u16(&mut f, l4 + 4, len);
                    out.push((format!("seed {s} UDP length {len}"), f));
                }
            }
        } else if u16::from_be_bytes([frame[12], frame[13]]) == 0x86dd {
            for plen in [0u16, 1, 7, (frame.len() - 54) as u16 + 1, 0xffff] {
                let mut f = frame.clone();
                set_u16(&mut f, 18, plen);
                out.push((format!("seed {s} payload length {plen}"), f));
            }
            // Extension-header chains: 1..6 headers of each kind, lengths 0..3 (×8 bytes),
            // the last one naming the original transport.
            let proto = frame[20];
            for kind in [0u8, 43, 60, 44, 51] {
                for count in 1..=6usize {
                    for hlen in [0u8, 1, 3] {
                        let mut ext = Vec::new();
                        for k in 0..count {
                            let next = if k + 1 == count { proto } else { kind };
                            let body = if kind == 44 {
                                8
                            } else if kind == 51 {
                                (hlen as usize + 2) * 4
                            } else {
                                (hlen as usize + 1) * 8
                            };
                            let mut h = vec![0u8; body];
                            h[0] = next;
                            h[1] = if kind == 44 { 0 } else { hlen };
                            ext.extend(h);
                        }
                        let mut f = frame[..54].to_vec();
                        f[20] = kind;
                        let plen = (frame.len() - 54 + ext.len()) as u16;
                        set_u16(&mut f, 18, plen);
                        f.extend(&ext);
                        f.extend(&frame[54..]);
                        out.push((
                            format!("seed {s} {count}× ext {kind} len {hlen}"),
                            f.clone(),
                        ));
                        // And the chain cut short.
                        let cut = 54 + ext.len() / 2;
                        out.push((
                            format!("seed {s} {count}× ext {kind} cut"),
                            f[..cut].to_vec(),
                        ));
                    }
                }
            }
        }
        // Stacked VLAN tags (802.1Q and 802.1ad), 1 to 3 deep.
        for depth in 1..=3 {
            let mut f = frame[..12].to_vec();
            for d in 0..depth {
                f.extend(if d == 0 { [0x88, 0xa8] } else { [0x81, 0x00] });
                f.extend([0x00, 0x0a]);
            }
            f.extend(&frame[12..]);
            out.push((format!("seed {s} {depth} VLAN tags"), f));
        }
    }
    out
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut f = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 | 1 => {
                // Flip a bit, mostly in the headers.
                let span = f.len().min(80);
                if span > 0 {
                    let i = rng.below(span);
                    f[i] ^= 1 << rng.below(8);
                }
            }
            2 => {
                if !f.is_empty() {
                    let i = rng.below(f.len());
                    f[i] = rng.next() as u8;
                }
            }
            3 => {
                let n = rng.below(f.len() + 1);
                f.truncate(n);
            }
            4 => {
                for _ in 0..rng.below(64) {
                    f.push(rng.next() as u8);
                }
            }
            5 => {
                // A plausible field set to an extreme: lengths, protocol, ethertype.
                let off = [12usize, 16, 20, 23, 18, 38, 46, 50][rng.below(8)];
                let v = [0u16, 1, 0xffff, 0x0800, 0x86dd, 0x8100, 6, 17, 58][rng.below(9)];
                set_u16(&mut f, off, v);
            }
            _ => {
                if f.len() > 20 {
                    let i = 14 + rng.below(f.len() - 14);
                    let n = rng.below(8).min(f.len() - i);
                    f.drain(i..i + n);
                }
            }
        }
    }
    f
}

#[test]
fn privileged_hostile_packets_never_break_the_invariants() {
    let mutations: usize = std::env::var("XLB_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        // About 7% of mutations cut a frame below the 14 bytes the kernel runs at all:
        // 1.1M mutations run over 1,000,000 packets through the program (about 10 s).
        .unwrap_or(1_100_000);
    let seed: u64 = std::env::var("XLB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x786c_6266_757a_7a31);
    in_lab(move |lab| {
        let mut f = Fixture::new().unwrap();
        f.apply(&config(&BACKENDS_V4, &BACKENDS_V6)).unwrap();
        let backends: BTreeSet<IpAddr> = BACKENDS_V4
            .iter()
            .chain(&BACKENDS_V6)
            .map(|b| b.parse::<SocketAddr>().unwrap().ip())
            .collect();
        let pin = f.pin_path().to_owned();
        let mut h = Harness {
            f,
            lab,
            backends,
            run: 0,
            refused: 0,
            modified: 0,
            by_verdict: [0; 5],
        };
        let seeds = seeds(&mut h.f, lab);
        let (seen0, reasons0, passed0) = totals(&pin);
        let (run0, pass0) = (h.run, h.by_verdict[XDP_PASS as usize]);

        // 1. The corpus. Malformed and stateless frames first, with the map entries
        //    counted around them: none may appear.
        let corpus = corpus(&seeds);
        let before = entries(&pin);
        let mut stateful = Vec::new();
        let mut stateless = 0;
        for (what, frame) in &corpus {
            let class = classify(frame, &h.backends);
            if matches!(class, Class::Malformed | Class::Stateless) {
                h.check(frame, what);
                stateless += 1;
            } else {
                stateful.push((what, frame));
            }
        }
        assert_eq!(
            entries(&pin),
            before,
            "malformed or stateless frames created map entries"
        );
        for (what, frame) in stateful {
            h.check(frame, what);
        }

        // 2. Random mutations of the valid frames, seeded. Checked in batches for map
        //    entries: a batch without a well-formed VIP frame creates none.
        let mut rng = Rng(seed);
        let mut batch_entries = entries(&pin);
        let mut batch_vip = 0;
        for i in 0..mutations {
            let base = &seeds[rng.below(seeds.len())];
            let frame = mutate(&mut rng, base);
            let class = h.check(&frame, &format!("mutation {i} (seed {seed:#x})"));
            if class == Class::Vip {
                batch_vip += 1;
            }
            if i % 2000 == 1999 {
                let now = entries(&pin);
                assert!(
                    batch_vip > 0 || now <= batch_entries,
                    "entries grew {batch_entries} → {now} in a batch without a VIP frame (mutations ..{i})"
                );
                batch_entries = now;
                batch_vip = 0;
            }
        }

        // 3. Every packet counted exactly once as seen and once with a reason. The one
        //    reason userspace derives (pass_not_vip) makes the second equality hold by
        //    construction; the passed packets' reasons, it among them, must still add
        //    up to the packets passed: a packet sent or dropped without its reason
        //    counted would be taken for the host's own and break this.
        let (seen, reasons, passed) = totals(&pin);
        let ran = h.run - run0;
        assert_eq!(seen - seen0, ran, "seen counters vs packets run");
        assert_eq!(reasons - reasons0, ran, "reason counters vs packets run");
        assert_eq!(
            passed - passed0,
            h.by_verdict[XDP_PASS as usize] - pass0,
            "pass_* reasons vs packets passed"
        );
        println!(
            "fuzz: {} packets run ({} corpus, {stateless} of them malformed or stateless; {mutations} mutations, seed {seed:#x}), {} refused by the kernel (< 14 bytes), {} modified; verdicts: pass {}, drop {}, tx {}, redirect {}; failures: 0",
            h.run, corpus.len(), h.refused, h.modified,
            h.by_verdict[XDP_PASS as usize], h.by_verdict[XDP_DROP as usize], h.by_verdict[XDP_TX as usize], h.by_verdict[XDP_REDIRECT as usize]
        );
        xlb_tests::report(
            "fuzz_packets",
            serde_json::json!({"packets_run": h.run, "corpus": corpus.len(), "mutations": mutations,
                               "seed": seed, "refused_by_kernel": h.refused, "modified": h.modified, "failures": 0}),
        );
    });
}

/// The entry's fast path (an established flow's packet, a reply, the host's own
/// traffic, a new flow's first packet up to its own calls, when it is a whole TCP or
/// UDP packet: parse::common_v4 and common_v6) and
/// the pipeline (everything else, and every packet while the debug log is on) must
/// agree. The same frames go through two programs with maps of their own, one with
/// the log on, in each mode, with source ranges on the web services and (dnat, dsr)
/// stateless dns services, one of them with ranges too: valid frames (and each with
/// TTL 1), the corpus, then seeded mutations, half of them after
/// the ranges narrow to leave the clients out (their flows are cut). Packet by
/// packet, the same verdict and the same bytes out; at the end, the same counters
/// (global, per service, per backend) and the same flows, field by field (clocks
/// aside).
#[test]
fn privileged_the_fast_path_and_the_pipeline_agree_on_every_packet() {
    let mutations: usize = std::env::var("XLB_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(100_000, |n| n / 10);
    let seed: u64 = 0x6661_7374_7061_7468;
    in_lab(move |lab| {
        let backends: BTreeSet<IpAddr> = BACKENDS_V4
            .iter()
            .chain(&BACKENDS_V6)
            .map(|b| b.parse::<SocketAddr>().unwrap().ip())
            .collect();
        let logged = xlb::dataplane::LoadOptions {
            log_level: xlb::ebpf_log::LEVEL_DEBUG,
            ..Default::default()
        };
        for mode in [None, Some(Mode::Dnat), Some(Mode::Dsr)] {
            let cfg = differential_config(mode, ["10.10.0.0/24", "fd10::/64"]);
            // Later: the clients (10.10.0.5, fd10::5) outside the web services' ranges.
            let narrowed = differential_config(mode, ["10.10.0.128/25", "fd10::8000/113"]);
            let mut fast = Fixture::new().unwrap();
            let mut full = Fixture::with_options(&logged).unwrap();
            fast.apply(&cfg).unwrap();
            full.apply(&cfg).unwrap();
            let seeds = seeds(&mut fast, lab);
            assert_eq!(
                seeds,
                self::seeds(&mut full, lab),
                "{mode:?}: the flows opened differ"
            );
            let mut rng = Rng(seed);
            let frames: Vec<Vec<u8>> = corpus(&seeds)
                .into_iter()
                .map(|(_, f)| f)
                .chain(seeds.iter().cloned())
                .chain((0..mutations).map(|_| {
                    let base = rng.below(seeds.len());
                    mutate(&mut rng, &seeds[base])
                }))
                .collect();
            let narrow_at = frames.len() - mutations / 2;
            let mut compared = 0;
            for (i, frame) in frames.iter().enumerate() {
                if i == narrow_at {
                    fast.apply(&narrowed).unwrap();
                    full.apply(&narrowed).unwrap();
                    // Every seed again: each established flow's next packet is cut.
                    for s in &seeds {
                        let ifindex = ingress(classify(s, &backends), lab);
                        let (a, b) = (fast.run_on(s, ifindex), full.run_on(s, ifindex));
                        let (a, b) = (a.unwrap(), b.unwrap());
                        assert_eq!(
                            (a.verdict, a.data),
                            (b.verdict, b.data),
                            "{mode:?}: narrowed, {s:02x?}"
                        );
                    }
                }
                let ifindex = ingress(classify(frame, &backends), lab);
                let (a, b) = (fast.run_on(frame, ifindex), full.run_on(frame, ifindex));
                let (Ok(a), Ok(b)) = (a, b) else {
                    assert!(frame.len() < 14, "{mode:?}, frame {i}: a run failed");
                    continue;
                };
                assert_eq!(
                    (a.verdict, &a.data),
                    (b.verdict, &b.data),
                    "{mode:?}, frame {i}: fast path (left) and pipeline (right) differ on {frame:02x?}"
                );
                compared += 1;
            }
            let counters = |f: &Fixture| read_global_counters(f.pin_path()).unwrap();
            assert_eq!(
                counters(&fast),
                counters(&full),
                "{mode:?}: counters differ"
            );
            let (sa, sb) = (per_service(fast.pin_path()), per_service(full.pin_path()));
            assert!(
                sa.iter().any(|s| s.1.denied > 0),
                "{mode:?}: no packet was refused: {sa:?}"
            );
            assert_eq!(
                sa, sb,
                "{mode:?}: per-service or per-backend counters differ"
            );
            let (fa, fb) = (flows(fast.pin_path()), flows(full.pin_path()));
            assert!(!fa.is_empty(), "{mode:?}: no flows");
            assert_eq!(fa, fb, "{mode:?}: flows differ");
            assert!(
                compared > mutations / 2,
                "{mode:?}: only {compared} frames compared"
            );
            println!(
                "{mode:?}: {compared} frames, the same verdicts, bytes, counters and {} flows",
                fa.len()
            );
        }
    });
}

/// The fixtures' services in `mode`, the web services admitting `ranges` only, and in
/// dnat and dsr the dns services stateless.
fn differential_config(mode: Option<Mode>, ranges: [&str; 2]) -> xlb::config::Config {
    // dsr leaves the port as it is: its backends listen on the service's.
    let at = |list: &[&str], port: u16| -> Vec<String> {
        list.iter()
            .map(|b| {
                let a: SocketAddr = b.parse().unwrap();
                let p = if mode == Some(Mode::Dsr) {
                    port
                } else {
                    a.port()
                };
                SocketAddr::new(a.ip(), p).to_string()
            })
            .collect()
    };
    let lists = [
        at(&BACKENDS_V4, 80),
        at(&BACKENDS_V4, 53),
        at(&BACKENDS_V6, 80),
        at(&BACKENDS_V6, 53),
    ];
    let refs: Vec<Vec<&str>> = lists
        .iter()
        .map(|l| l.iter().map(String::as_str).collect())
        .collect();
    let mut cfg = lab_services(mode, [&refs[0][..], &refs[1], &refs[2], &refs[3]]).config();
    for svc in &mut cfg.services {
        if svc.name.starts_with("web") {
            svc.allow = ranges.iter().map(|r| r.parse().unwrap()).collect();
        } else if mode.is_some() {
            svc.conntrack = false;
            // One stateless service restricted too: its packets are refused on the
            // fast path once the ranges narrow.
            if svc.name == "dns6" {
                svc.allow = ranges.iter().map(|r| r.parse().unwrap()).collect();
            }
        }
    }
    cfg.validate().unwrap();
    cfg
}

/// Each service's counters and its backends', by name and address.
type Counts = (
    String,
    xlb::status::TrafficView,
    Vec<(String, xlb::status::TrafficView)>,
);

fn per_service(pin: &std::path::Path) -> Vec<Counts> {
    xlb::status::read_services(pin)
        .unwrap()
        .into_iter()
        .map(|s| {
            let backends = s
                .backends
                .into_iter()
                .map(|b| (b.address, b.stats))
                .collect();
            (s.name, s.stats, backends)
        })
        .collect()
}

/// Every flow of both tables, clocks cleared (the two programs ran at other times).
fn flows(pin: &std::path::Path) -> Vec<String> {
    let ct = FlowTable::<ConnValue>::from_pin(&pin.join(MAP_CONNTRACK)).unwrap();
    let rv = FlowTable::<ReverseNat>::from_pin(&pin.join(MAP_REVERSE_NAT)).unwrap();
    let mut out: Vec<String> = ct
        .entries()
        .map(|e| {
            let mut v = e.value;
            v.last_seen_ns = 0;
            v.hop.expires_ns = 0;
            format!("{:?} {v:?} {}/{}", e.key, e.bucket, e.way)
        })
        .chain(rv.entries().map(|e| {
            let mut v = e.value;
            v.last_seen_ns = 0;
            v.hop.expires_ns = 0;
            format!("{:?} {v:?} {}/{}", e.key, e.bucket, e.way)
        }))
        .collect();
    out.sort();
    out
}
