//! The namespace the BPF_PROG_TEST_RUN NAT fixtures run in: a client-side and a
//! backend-side veth, static neighbours, forwarding on, so bpf_fib_lookup answers for
//! real; and the fixtures' config (two VIPs, TCP :80 and UDP :53 each).

use std::net::{IpAddr, SocketAddr};

use lb_common::{flow_hash, FlowKey};
use xlb::{
    codec::addr_to_words,
    config::Config,
    counters::read_global_counters,
    maglev::{build, WeightedBackend},
    model::Mode,
};

use crate::{
    cfg::{Cfg, Svc},
    netns::Netns,
    packet::{Decoded, Frame},
    privileged,
    testrun::Fixture,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x05];
pub const BACKEND_MACS: [[u8; 6]; 3] = [
    [0x02, 0xbb, 0, 0, 0, 2],
    [0x02, 0xbb, 0, 0, 0, 3],
    [0x02, 0xbb, 0, 0, 0, 4],
];
pub const BACKENDS_V4: [&str; 3] = ["10.20.0.2:8080", "10.20.0.3:8080", "10.20.0.4:8080"];
pub const BACKENDS_V6: [&str; 3] = ["[fd20::2]:8080", "[fd20::3]:8080", "[fd20::4]:8080"];
pub const M: u32 = 251;

pub struct Lab {
    pub client_if: u32,
    pub backend_if: u32,
    pub client_side_mac: [u8; 6],
    pub backend_side_mac: [u8; 6],
}

/// The fixtures' services: web (TCP :80) and dns (UDP :53) on 192.0.2.10 with the
/// backends `b[0]` and `b[1]`, web6 and dns6 on 2001:db8::10 with `b[2]` and `b[3]`, in
/// `mode` if given; Maglev table size M, SNAT sources 10.20.0.1 and fd20::1.
pub fn lab_services(mode: Option<Mode>, b: [&[&str]; 4]) -> Cfg {
    let svc = |s: Svc, bs: &[&str]| {
        let s = s.backends(bs);
        match mode {
            Some(m) => s.mode(m),
            None => s,
        }
    };
    Cfg::new()
        .maglev_table_size(M)
        .snat4("10.20.0.1")
        .snat6("fd20::1")
        .service(svc(Svc::tcp("web", "192.0.2.10", 80), b[0]))
        .service(svc(Svc::udp("dns", "192.0.2.10", 53), b[1]))
        .service(svc(Svc::tcp("web6", "2001:db8::10", 80), b[2]))
        .service(svc(Svc::udp("dns6", "2001:db8::10", 53), b[3]))
}

/// [`lab_services`] in the default mode, the IPv4 services to `backends_v4`, the IPv6
/// ones to `backends_v6`.
pub fn services(backends_v4: &[&str], backends_v6: &[&str]) -> Cfg {
    lab_services(None, [backends_v4, backends_v4, backends_v6, backends_v6])
}

pub fn config(backends_v4: &[&str], backends_v6: &[&str]) -> Config {
    services(backends_v4, backends_v6).config()
}

/// One TCP service per mode in `modes`: service i is `s{i}` at 10.200.0.{i+1}:80 with
/// backends 172.16.{i}.1:80 and 172.16.{i}.2:80, so a backend's third octet names its
/// service.
pub fn config_with_modes(modes: &[Mode]) -> Config {
    let mut c = Cfg::new().snat4("10.30.0.1");
    for (i, mode) in modes.iter().enumerate() {
        c = c.service(
            Svc::tcp(format!("s{i}"), format!("10.200.0.{}", i + 1), 80)
                .mode(*mode)
                .backends([format!("172.16.{i}.1:80"), format!("172.16.{i}.2:80")]),
        );
    }
    c.config()
}

/// Builds the namespace, then runs `body` on a thread inside it.
pub fn in_lab(body: impl FnOnce(&Lab) + Send + 'static) {
    if !privileged() {
        return;
    }
    let ns = Netns::new("xf").unwrap();
    for (a, b, addrs) in [
        ("cside", "cpeer", ["10.10.0.1/24", "fd10::1/64"]),
        ("bside", "bpeer", ["10.20.0.1/24", "fd20::1/64"]),
    ] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
            .unwrap();
        for addr in addrs {
            ns.ip(&["addr", "add", addr, "dev", a, "nodad"]).unwrap();
        }
        ns.ip(&["link", "set", a, "up"]).unwrap();
        ns.ip(&["link", "set", b, "up"]).unwrap();
    }
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for client in ["10.10.0.5", "fd10::5"] {
        ns.ip(&[
            "neigh",
            "replace",
            client,
            "lladdr",
            &mac(CLIENT_MAC),
            "dev",
            "cside",
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    for (i, m) in BACKEND_MACS.iter().enumerate() {
        for b in [format!("10.20.0.{}", i + 2), format!("fd20::{}", i + 2)] {
            ns.ip(&[
                "neigh",
                "replace",
                &b,
                "lladdr",
                &mac(*m),
                "dev",
                "bside",
                "nud",
                "permanent",
            ])
            .unwrap();
        }
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    let lab = Lab {
        client_if: ns.ifindex("cside").unwrap(),
        backend_if: ns.ifindex("bside").unwrap(),
        client_side_mac: ns.mac("cside").unwrap(),
        backend_side_mac: ns.mac("bside").unwrap(),
    };
    ns.run(move || body(&lab)).unwrap();
}

/// Which backend Maglev (as userspace computes it, with the shared flow hash) picks.
pub fn predicted_backend(backends: &[&str], frame: &Frame, proto: u8) -> SocketAddr {
    let bs: Vec<WeightedBackend> = backends
        .iter()
        .map(|b| WeightedBackend {
            addr: b.parse().unwrap(),
            weight: 1,
        })
        .collect();
    let table = build(&bs, M).unwrap();
    let (src, family) = addr_to_words(frame.src);
    let (dst, _) = addr_to_words(frame.dst);
    let key = FlowKey {
        src,
        dst,
        sport: frame.sport.to_be(),
        dport: frame.dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    };
    bs[table[(flow_hash(&key, false) % M) as usize] as usize].addr
}

/// The LB's address on the backend side (10.20.0.1, fd20::1): the SNAT source, and
/// the outer source of dsr's tunnel.
pub fn backend_side_addr(v6: bool) -> IpAddr {
    if v6 { "fd20::1" } else { "10.20.0.1" }.parse().unwrap()
}

/// Checks a reply translated back for the client, as it leaves on the client side:
/// from where the client sent `sent`, to the client, between the client side's MACs.
pub fn assert_back_to_client(lab: &Lab, back: &Decoded, sent: &Frame) {
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (sent.dst, sent.dport, sent.src, sent.sport)
    );
    assert_eq!(
        (back.src_mac, back.dst_mac),
        (lab.client_side_mac, CLIENT_MAC)
    );
}

/// `frame` (its flags and payload) as backend `from` sends it back to `to` (the SNAT
/// address and port, or the client), from the backend's MAC to the backend side's.
pub fn backend_reply(lab: &Lab, frame: &Frame, from: SocketAddr, to: (IpAddr, u16)) -> Frame {
    let mut reply = frame.clone();
    reply.src = from.ip();
    reply.sport = from.port();
    (reply.dst, reply.dport) = to;
    reply.src_mac = backend_mac(from.ip());
    reply.dst_mac = lab.backend_side_mac;
    reply
}

pub fn backend_mac(addr: IpAddr) -> [u8; 6] {
    let last = match addr {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    BACKEND_MACS[(last - 2) as usize]
}

pub fn counter(f: &Fixture, name: &str) -> u64 {
    read_global_counters(f.pin_path()).unwrap()[name].packets
}

/// An ICMP error (IPv4 fragmentation needed, ICMPv6 packet too big) quoting `quoted`.
pub fn icmp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    quoted: &[u8],
) -> Vec<u8> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, Icmpv6Type, PacketBuilder};
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let mut buf = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut buf, quoted)
            .unwrap(),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut buf, quoted)
            .unwrap(),
        _ => unreachable!(),
    }
    buf
}
