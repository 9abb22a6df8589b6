//! BPF_PROG_TEST_RUN fixtures for the parse stage: every class of packet is passed
//! untouched (byte for byte) and lands in exactly the right counters.

use std::collections::BTreeMap;

use xlb::status::{read_global_counters, CounterView};
use xlb_tests::{
    packet::{Frame, CLIENT_MAC, LB_MAC},
    privileged,
    testrun::{Fixture, XDP_PASS},
};

fn counters(f: &Fixture) -> BTreeMap<&'static str, CounterView> {
    read_global_counters(f.pin_path()).expect("read counters")
}

/// Runs `frame`, asserts XDP_PASS with the frame unchanged, and asserts that exactly
/// the counters in `expect` moved, by one packet and the frame's length each.
fn assert_passed_and_counted(frame: &[u8], expect: &[&str]) {
    let mut f = Fixture::new().expect("load program");
    let before = counters(&f);
    let res = f.run(frame).expect("test run");
    assert_eq!(res.verdict, XDP_PASS, "verdict for {expect:?}");
    assert_eq!(res.data, frame, "frame must come out untouched");
    let after = counters(&f);
    for (name, c) in &after {
        let delta = c.packets - before[name].packets;
        let bytes = c.bytes - before[name].bytes;
        if expect.contains(name) {
            assert_eq!((delta, bytes), (1, frame.len() as u64), "counter {name}");
        } else {
            assert_eq!(delta, 0, "counter {name} moved but only {expect:?} should");
        }
    }
}

#[test]
fn privileged_tcp_ipv4_not_for_a_vip_passes_and_counts() {
    if !privileged() {
        return;
    }
    let frame = Frame::tcp("10.0.0.1", 40000, "10.0.0.2", 80).build();
    assert_passed_and_counted(&frame, &["seen_ipv4_tcp", "pass_not_vip"]);
}

#[test]
fn privileged_udp_ipv4_not_for_a_vip_passes_and_counts() {
    if !privileged() {
        return;
    }
    let frame = Frame::udp("10.0.0.1", 40000, "10.0.0.2", 53).build();
    assert_passed_and_counted(&frame, &["seen_ipv4_udp", "pass_not_vip"]);
}

#[test]
fn privileged_tcp_and_udp_ipv6_pass_and_count() {
    if !privileged() {
        return;
    }
    let tcp = Frame::tcp("fd00::1", 40000, "fd00::2", 443).build();
    assert_passed_and_counted(&tcp, &["seen_ipv6_tcp", "pass_not_vip"]);
    let udp = Frame::udp("fd00::1", 40000, "fd00::2", 53).build();
    assert_passed_and_counted(&udp, &["seen_ipv6_udp", "pass_not_vip"]);
}

fn eth(ethertype: u16, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&LB_MAC);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(rest);
    v
}

#[test]
fn privileged_non_ip_and_vlan_frames_pass() {
    if !privileged() {
        return;
    }
    // ARP request.
    assert_passed_and_counted(&eth(0x0806, &[0u8; 28]), &["seen_non_ip", "pass_not_ip"]);
    // 802.1Q-tagged IPv4.
    let mut tagged = vec![0x00, 0x0a, 0x08, 0x00];
    tagged.extend_from_slice(&Frame::udp("10.0.0.1", 1, "10.0.0.2", 2).build()[14..]);
    assert_passed_and_counted(&eth(0x8100, &tagged), &["seen_non_ip", "pass_vlan"]);
}

#[test]
fn privileged_truncated_headers_are_parse_errors() {
    if !privileged() {
        return;
    }
    // Shorter than an Ethernet header: BPF_PROG_TEST_RUN itself refuses such input
    // (EINVAL), and real NICs never deliver it, so the program's check is only proven
    // by the verifier accepting it.
    assert!(Fixture::new().unwrap().run(&[0u8; 10]).is_err());
    // Ethernet header only.
    let v4 = Frame::tcp("10.0.0.1", 40000, "10.0.0.2", 80).build();
    assert_passed_and_counted(&v4[..14], &["seen_ipv4_other", "pass_parse_error"]);
    // IPv4 header cut short.
    assert_passed_and_counted(&v4[..14 + 12], &["seen_ipv4_other", "pass_parse_error"]);
    // TCP header cut short: the protocol is known, the ports are not.
    assert_passed_and_counted(&v4[..14 + 20 + 10], &["seen_ipv4_tcp", "pass_parse_error"]);
    let v6 = Frame::udp("fd00::1", 40000, "fd00::2", 53).build();
    assert_passed_and_counted(&v6[..14 + 30], &["seen_ipv6_other", "pass_parse_error"]);
    assert_passed_and_counted(&v6[..14 + 40 + 4], &["seen_ipv6_udp", "pass_parse_error"]);
    // IHL below 5 is malformed.
    let mut bad_ihl = v4.clone();
    bad_ihl[14] = 0x44;
    assert_passed_and_counted(&bad_ihl, &["seen_ipv4_other", "pass_parse_error"]);
}

/// Fragments of a datagram for no VIP: the first is parsed like any packet and passed
/// as not for a VIP; a later one, of a datagram xlb never recorded, is passed too.
/// Both untouched (fixtures_fragments.rs has the balanced cases).
#[test]
fn privileged_ipv4_fragments_pass() {
    if !privileged() {
        return;
    }
    let mut more_fragments = Frame::udp("10.0.0.1", 40000, "10.0.0.2", 53).build();
    more_fragments[14 + 6] = 0x20; // MF
    assert_passed_and_counted(&more_fragments, &["seen_ipv4_udp", "pass_not_vip"]);
    let mut later_fragment = Frame::udp("10.0.0.1", 40000, "10.0.0.2", 53).build();
    later_fragment[14 + 7] = 0x10; // offset 16*8
    assert_passed_and_counted(&later_fragment, &["seen_ipv4_udp", "pass_fragment"]);
}

/// IPv4 with 8 bytes of options (IHL 7): the TCP header is found after the options.
#[test]
fn privileged_ipv4_options_are_skipped() {
    if !privileged() {
        return;
    }
    let plain = Frame::tcp("10.0.0.1", 40000, "10.0.0.2", 80).build();
    let mut with_opts = plain[..14].to_vec();
    let mut ip = plain[14..34].to_vec();
    ip[0] = 0x47;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) + 8;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    with_opts.extend_from_slice(&ip);
    with_opts.extend_from_slice(&[1, 1, 1, 1, 1, 1, 1, 0]); // NOPs + EOL
                                                            // Cut the TCP header short, in the frame and in the IP length alike: if options
                                                            // were not skipped, the "TCP header" would be read from the options and would fit;
                                                            // skipped, it does not fit the packet.
    with_opts.extend_from_slice(&plain[34..34 + 12]);
    let cut = (with_opts.len() - 14) as u16;
    with_opts[16..18].copy_from_slice(&cut.to_be_bytes());
    fix_ipv4_checksum(&mut with_opts);
    assert_passed_and_counted(&with_opts, &["seen_ipv4_tcp", "pass_parse_error"]);
    with_opts.truncate(14 + 28);
    with_opts.extend_from_slice(&plain[34..]);
    with_opts[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut with_opts);
    assert_passed_and_counted(&with_opts, &["seen_ipv4_tcp", "pass_not_vip"]);
}

/// IPv6 with a hop-by-hop header then a fragment header, and with a destination
/// options header before UDP.
#[test]
fn privileged_ipv6_extension_headers_are_walked() {
    if !privileged() {
        return;
    }
    let udp = Frame::udp("fd00::1", 40000, "fd00::2", 53).build();
    let with_ext = |exts: &[[u8; 8]], first: u8| {
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
    };
    // Destination options (60) → UDP (17).
    let dst_opts = with_ext(&[[17, 0, 1, 4, 0, 0, 0, 0]], 60);
    assert_passed_and_counted(&dst_opts, &["seen_ipv6_udp", "pass_not_vip"]);
    // Hop-by-hop (0) → fragment (44) → UDP: an atomic fragment (offset 0, no more to
    // come) is a whole datagram (RFC 6946), parsed through to its ports.
    let frag = with_ext(&[[44, 0, 1, 4, 0, 0, 0, 0], [17, 0, 0, 0, 0, 0, 0, 7]], 0);
    assert_passed_and_counted(&frag, &["seen_ipv6_udp", "pass_not_vip"]);
    // The same as a later fragment (offset 8 bytes): no record, passed.
    let later = with_ext(&[[44, 0, 1, 4, 0, 0, 0, 0], [17, 0, 0, 8, 0, 0, 0, 7]], 0);
    assert_passed_and_counted(&later, &["seen_ipv6_udp", "pass_fragment"]);
}

#[test]
fn privileged_icmp_and_other_protocols_pass() {
    if !privileged() {
        return;
    }
    let mut icmp = Frame::udp("10.0.0.1", 1, "10.0.0.2", 2).build();
    icmp[14 + 9] = 1;
    assert_passed_and_counted(&icmp, &["seen_ipv4_icmp", "pass_icmp_not_related"]);
    let mut gre = Frame::udp("10.0.0.1", 1, "10.0.0.2", 2).build();
    gre[14 + 9] = 47;
    assert_passed_and_counted(&gre, &["seen_ipv4_other", "pass_unsupported_proto"]);
    let mut sctp6 = Frame::udp("fd00::1", 1, "fd00::2", 2).build();
    sctp6[14 + 6] = 132;
    assert_passed_and_counted(&sctp6, &["seen_ipv6_other", "pass_unsupported_proto"]);
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

/// Lengths that disagree, as the kernel's own receive path would refuse them: no state,
/// passed for the kernel to drop, counted as parse errors.
#[test]
fn privileged_inconsistent_lengths_are_parse_errors() {
    if !privileged() {
        return;
    }
    let tcp = Frame::tcp("10.0.0.1", 40000, "10.0.0.2", 80).build();
    let mut short_doff = tcp.clone();
    short_doff[14 + 20 + 12] = 0x40; // data offset 4 words
    assert_passed_and_counted(&short_doff, &["seen_ipv4_tcp", "pass_parse_error"]);
    let mut long_doff = tcp.clone();
    long_doff[14 + 20 + 12] = 0xf0; // 60 bytes of header in a 28-byte segment
    assert_passed_and_counted(&long_doff, &["seen_ipv4_tcp", "pass_parse_error"]);
    let udp = Frame::udp("10.0.0.1", 40000, "10.0.0.2", 53).build();
    let mut long_udp = udp.clone();
    let ulen = u16::from_be_bytes([udp[38], udp[39]]) + 1;
    long_udp[38..40].copy_from_slice(&ulen.to_be_bytes());
    assert_passed_and_counted(&long_udp, &["seen_ipv4_udp", "pass_parse_error"]);
    let mut tiny_udp = udp.clone();
    tiny_udp[38..40].copy_from_slice(&7u16.to_be_bytes());
    assert_passed_and_counted(&tiny_udp, &["seen_ipv4_udp", "pass_parse_error"]);
    // IPv6: payload length past the frame; Hop-by-Hop after another header.
    let v6 = Frame::udp("fd00::1", 40000, "fd00::2", 53).build();
    let mut long_v6 = v6.clone();
    let plen = u16::from_be_bytes([v6[18], v6[19]]) + 8;
    long_v6[18..20].copy_from_slice(&plen.to_be_bytes());
    assert_passed_and_counted(&long_v6, &["seen_ipv6_udp", "pass_parse_error"]);
    let mut hbh_late = v6[..54].to_vec();
    hbh_late[20] = 60; // destination options, then hop-by-hop: not allowed
    let plen = u16::from_be_bytes([v6[18], v6[19]]) + 16;
    hbh_late[18..20].copy_from_slice(&plen.to_be_bytes());
    hbh_late.extend_from_slice(&[0, 0, 1, 4, 0, 0, 0, 0]);
    hbh_late.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    hbh_late.extend_from_slice(&v6[54..]);
    assert_passed_and_counted(&hbh_late, &["seen_ipv6_other", "pass_parse_error"]);
}
