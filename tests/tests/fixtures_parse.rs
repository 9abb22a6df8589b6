//! BPF_PROG_TEST_RUN fixtures for the parse stage, as rows (one frame each, no config):
//! every class of packet is passed untouched (byte for byte) and lands in exactly the
//! right counters.

use xlb_tests::{
    packet::{Frame, CLIENT_MAC, LB_MAC},
    privileged,
    rows::{self, Packet, Row},
    testrun::XDP_PASS,
};

/// A row: `frame` is passed with the frame unchanged, and exactly the counters in
/// `counted` move, by one packet and the frame's length each.
fn passed(name: &str, frame: Vec<u8>, counted: &[&'static str]) -> Row<'static> {
    Row::new(name).packet(
        Packet::new(frame)
            .verdict(XDP_PASS)
            .unchanged()
            .moves_only(counted),
    )
}

fn eth(ethertype: u16, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&LB_MAC);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(rest);
    v
}

/// Recomputes the IPv4 header checksum of a frame (any IHL).
fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = frame[14..14 + ihl]
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// IPv4 with 8 bytes of options (IHL 7, NOPs and EOL) around `tcp`'s first
/// `tcp_bytes` bytes of TCP, its total length saying so.
fn ipv4_with_options(tcp: &[u8], tcp_bytes: usize) -> Vec<u8> {
    let mut f = tcp[..14].to_vec();
    let mut ip = tcp[14..34].to_vec();
    ip[0] = 0x47;
    ip[2..4].copy_from_slice(&((28 + tcp_bytes) as u16).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[1, 1, 1, 1, 1, 1, 1, 0]);
    f.extend_from_slice(&tcp[34..34 + tcp_bytes]);
    fix_ipv4_checksum(&mut f);
    f
}

/// IPv6 UDP with these extension headers (8 bytes each) after the fixed header, the
/// first one's type `first`.
fn ipv6_with(udp: &[u8], exts: &[[u8; 8]], first: u8) -> Vec<u8> {
    let mut f = udp[..14].to_vec();
    let mut ip = udp[14..54].to_vec();
    ip[6] = first;
    let plen = u16::from_be_bytes([ip[4], ip[5]]) + 8 * exts.len() as u16;
    ip[4..6].copy_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&ip);
    for e in exts {
        f.extend_from_slice(e);
    }
    f.extend_from_slice(&udp[54..]);
    f
}

/// `frame` with `bytes` written at `at`.
fn with(frame: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[at..at + bytes.len()].copy_from_slice(bytes);
    f
}

#[test]
fn privileged_parse_rows() {
    if !privileged() {
        return;
    }
    let tcp4 = Frame::tcp("10.0.0.1", 40000, "10.0.0.2", 80).build();
    let udp4 = Frame::udp("10.0.0.1", 40000, "10.0.0.2", 53).build();
    let udp6 = Frame::udp("fd00::1", 40000, "fd00::2", 53).build();
    let any4 = Frame::udp("10.0.0.1", 1, "10.0.0.2", 2).build();
    let any6 = Frame::udp("fd00::1", 1, "fd00::2", 2).build();
    let ulen = u16::from_be_bytes([udp4[38], udp4[39]]);
    let plen = u16::from_be_bytes([udp6[18], udp6[19]]);
    let mut tagged = vec![0x00, 0x0a, 0x08, 0x00];
    tagged.extend_from_slice(&any4[14..]);
    let hbh_late = {
        let mut f = udp6[..54].to_vec();
        f[20] = 60; // destination options, then hop-by-hop: not allowed
        f[18..20].copy_from_slice(&(plen + 16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 1, 4, 0, 0, 0, 0]);
        f.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
        f.extend_from_slice(&udp6[54..]);
        f
    };
    let not_vip = |seen| [seen, "pass_not_vip"];
    let parse_error = |seen| [seen, "pass_parse_error"];
    rows::run(vec![
        passed(
            "IPv4 TCP for no VIP",
            tcp4.clone(),
            &not_vip("seen_ipv4_tcp"),
        ),
        passed(
            "IPv4 UDP for no VIP",
            udp4.clone(),
            &not_vip("seen_ipv4_udp"),
        ),
        passed(
            "IPv6 TCP for no VIP",
            Frame::tcp("fd00::1", 40000, "fd00::2", 443).build(),
            &not_vip("seen_ipv6_tcp"),
        ),
        passed(
            "IPv6 UDP for no VIP",
            udp6.clone(),
            &not_vip("seen_ipv6_udp"),
        ),
        passed(
            "ARP request",
            eth(0x0806, &[0u8; 28]),
            &["seen_non_ip", "pass_not_ip"],
        ),
        passed(
            "802.1Q-tagged IPv4",
            eth(0x8100, &tagged),
            &["seen_non_ip", "pass_vlan"],
        ),
        // BPF_PROG_TEST_RUN itself refuses such input (EINVAL), and real NICs never
        // deliver it, so the program's check is only proven by the verifier accepting it.
        Row::new("shorter than an Ethernet header").packet(Packet::new(vec![0u8; 10]).refused()),
        passed(
            "Ethernet header only",
            tcp4[..14].to_vec(),
            &parse_error("seen_ipv4_other"),
        ),
        passed(
            "IPv4 header cut short",
            tcp4[..14 + 12].to_vec(),
            &parse_error("seen_ipv4_other"),
        ),
        // The protocol is known, the ports are not.
        passed(
            "TCP header cut short",
            tcp4[..14 + 20 + 10].to_vec(),
            &parse_error("seen_ipv4_tcp"),
        ),
        passed(
            "IPv6 header cut short",
            udp6[..14 + 30].to_vec(),
            &parse_error("seen_ipv6_other"),
        ),
        passed(
            "IPv6 UDP header cut short",
            udp6[..14 + 40 + 4].to_vec(),
            &parse_error("seen_ipv6_udp"),
        ),
        passed(
            "IPv4 IHL below 5",
            with(&tcp4, 14, &[0x44]),
            &parse_error("seen_ipv4_other"),
        ),
        // Fragments of a datagram for no VIP: the first is parsed like any packet and
        // passed as not for a VIP; a later one, of a datagram xlb never recorded, is
        // passed too (fixtures_fragments.rs has the balanced cases).
        passed(
            "IPv4 first fragment for no VIP",
            with(&udp4, 14 + 6, &[0x20]), // MF
            &not_vip("seen_ipv4_udp"),
        ),
        passed(
            "IPv4 later fragment never recorded",
            with(&udp4, 14 + 7, &[0x10]), // offset 16*8
            &["seen_ipv4_udp", "pass_fragment"],
        ),
        // The TCP header cut short, in the frame and in the IP length alike: if options
        // were not skipped, the "TCP header" would be read from the options and would
        // fit; skipped, it does not fit the packet.
        passed(
            "IPv4 options, then a TCP header cut short",
            ipv4_with_options(&tcp4, 12),
            &parse_error("seen_ipv4_tcp"),
        ),
        passed(
            "IPv4 options, then TCP",
            ipv4_with_options(&tcp4, tcp4.len() - 34),
            &not_vip("seen_ipv4_tcp"),
        ),
        passed(
            "IPv6 destination options, then UDP",
            ipv6_with(&udp6, &[[17, 0, 1, 4, 0, 0, 0, 0]], 60),
            &not_vip("seen_ipv6_udp"),
        ),
        // An atomic fragment (offset 0, no more to come) is a whole datagram (RFC 6946),
        // parsed through to its ports.
        passed(
            "IPv6 hop-by-hop, atomic fragment, UDP",
            ipv6_with(
                &udp6,
                &[[44, 0, 1, 4, 0, 0, 0, 0], [17, 0, 0, 0, 0, 0, 0, 7]],
                0,
            ),
            &not_vip("seen_ipv6_udp"),
        ),
        passed(
            "IPv6 hop-by-hop, later fragment never recorded",
            ipv6_with(
                &udp6,
                &[[44, 0, 1, 4, 0, 0, 0, 0], [17, 0, 0, 8, 0, 0, 0, 7]],
                0,
            ),
            &["seen_ipv6_udp", "pass_fragment"],
        ),
        passed(
            "ICMP",
            with(&any4, 14 + 9, &[1]),
            &["seen_ipv4_icmp", "pass_icmp_not_related"],
        ),
        passed(
            "GRE",
            with(&any4, 14 + 9, &[47]),
            &["seen_ipv4_other", "pass_unsupported_proto"],
        ),
        passed(
            "SCTP over IPv6",
            with(&any6, 14 + 6, &[132]),
            &["seen_ipv6_other", "pass_unsupported_proto"],
        ),
        // Lengths that disagree, as the kernel's own receive path would refuse them: no
        // state, passed for the kernel to drop, counted as parse errors.
        passed(
            "TCP data offset of 4 words",
            with(&tcp4, 14 + 20 + 12, &[0x40]),
            &parse_error("seen_ipv4_tcp"),
        ),
        passed(
            "TCP data offset past the segment",
            with(&tcp4, 14 + 20 + 12, &[0xf0]), // 60 bytes of header in a 28-byte segment
            &parse_error("seen_ipv4_tcp"),
        ),
        passed(
            "UDP length past the packet",
            with(&udp4, 38, &(ulen + 1).to_be_bytes()),
            &parse_error("seen_ipv4_udp"),
        ),
        passed(
            "UDP length below its header",
            with(&udp4, 38, &7u16.to_be_bytes()),
            &parse_error("seen_ipv4_udp"),
        ),
        passed(
            "IPv6 payload length past the frame",
            with(&udp6, 18, &(plen + 8).to_be_bytes()),
            &parse_error("seen_ipv6_udp"),
        ),
        passed(
            "IPv6 hop-by-hop after another header",
            hbh_late,
            &parse_error("seen_ipv6_other"),
        ),
    ]);
}
