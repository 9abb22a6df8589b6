//! BPF_PROG_TEST_RUN fixtures for source ranges (`allow:`), as rows: (ranges, client,
//! expected verdict), through the real program in the NAT fixture namespace, for every
//! mode; and an established flow cut when the ranges change (a row of several steps:
//! the flow, a config change, its next packet). The ICMP errors about a flow of a
//! refused client are in fixtures_nat.

use xlb::config::Config;
use xlb_tests::{
    cfg::{Cfg, Mode, Svc},
    natlab::*,
    packet::{Frame, ACK},
    rows::{self, Packet, Row},
    testrun::{Fixture, XDP_DROP, XDP_REDIRECT},
};

const MODES: [Mode; 3] = [Mode::Nat, Mode::Dnat, Mode::Dsr];

/// One UDP service per family on :53, in `mode`, admitting `allow4` / `allow6`
/// (None: no `allow:` at all).
fn config(mode: Mode, allow4: Option<&[&str]>, allow6: Option<&[&str]>) -> Config {
    let port = if mode == Mode::Dsr { 53 } else { 8080 };
    let svc = |s: Svc, backends: Vec<String>, allow: Option<&[&str]>| {
        let s = s.mode(mode).backends(backends);
        match allow {
            Some(ranges) => s.allow(ranges),
            None => s,
        }
    };
    Cfg::new()
        .maglev_table_size(M)
        .snat4("10.20.0.1")
        .snat6("fd20::1")
        .service(svc(
            Svc::udp("dns", "192.0.2.10", 53),
            (2..5).map(|i| format!("10.20.0.{i}:{port}")).collect(),
            allow4,
        ))
        .service(svc(
            Svc::udp("dns6", "2001:db8::10", 53),
            (2..5).map(|i| format!("[fd20::{i}]:{port}")).collect(),
            allow6,
        ))
        .config()
}
fn conntrack_entries(f: &Fixture) -> usize {
    f.dp.conntrack().unwrap().entries().count()
}

fn denied(f: &Fixture, name: &str) -> u64 {
    xlb::status::read_services(f.pin_path())
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
        .stats
        .denied
}

/// (name, allow for IPv4, allow for IPv6, client, admitted)
type Case = (
    &'static str,
    Option<&'static [&'static str]>,
    Option<&'static [&'static str]>,
    &'static str,
    bool,
);

#[test]
fn privileged_source_range_rows() {
    in_lab(|lab| {
        let cases: &[Case] = &[
            ("no ranges", None, None, "10.10.0.5", true),
            ("no ranges v6", None, None, "fd10::5", true),
            ("inside", Some(&["10.10.0.0/24"]), None, "10.10.0.5", true),
            (
                "first of the range",
                Some(&["10.10.0.0/30"]),
                None,
                "10.10.0.0",
                true,
            ),
            (
                "last of the range",
                Some(&["10.10.0.0/30"]),
                None,
                "10.10.0.3",
                true,
            ),
            (
                "just past the range",
                Some(&["10.10.0.0/30"]),
                None,
                "10.10.0.4",
                false,
            ),
            (
                "just before the range",
                Some(&["10.10.0.4/30"]),
                None,
                "10.10.0.3",
                false,
            ),
            (
                "one of several",
                Some(&["192.168.0.0/16", "10.10.0.5/32"]),
                None,
                "10.10.0.5",
                true,
            ),
            (
                "/0 admits everyone",
                Some(&["0.0.0.0/0"]),
                None,
                "203.0.113.9",
                true,
            ),
            ("v6 inside", None, Some(&["fd10::/64"]), "fd10::5", true),
            ("v6 edge", None, Some(&["fd10::4/127"]), "fd10::5", true),
            (
                "v6 past the edge",
                None,
                Some(&["fd10::4/127"]),
                "fd10::6",
                false,
            ),
            ("::/0", None, Some(&["::/0"]), "fd10::5", true),
            // An IPv4-mapped IPv6 source is an IPv6 address: an IPv4 range says
            // nothing about it, an IPv6 range of the mapped space does.
            (
                "v4-mapped, v6 service, v4-mapped range",
                None,
                Some(&["::ffff:10.10.0.0/120"]),
                "::ffff:10.10.0.5",
                true,
            ),
            (
                "v4-mapped, v6 service, other v6 range",
                None,
                Some(&["fd10::/64"]),
                "::ffff:10.10.0.5",
                false,
            ),
        ];
        let mut rows = Vec::new();
        for &(name, a4, a6, client, admitted) in cases {
            for mode in MODES {
                let (vip, svc) = if client.contains(':') {
                    ("2001:db8::10", "dns6")
                } else {
                    ("192.0.2.10", "dns")
                };
                let frame = Frame::udp(client, 40000, vip, 53).build();
                let want = if admitted { XDP_REDIRECT } else { XDP_DROP };
                rows.push(
                    Row::new(format!("{name} ({})", mode.name()))
                        .config(config(mode, a4, a6))
                        .packet(Packet::on(lab.client_if, frame).verdict(want))
                        .check(move |f, _| {
                            assert_eq!(
                                (counter(f, "drop_source_denied"), denied(f, svc)),
                                if admitted { (0, 0) } else { (1, 1) },
                                "counted as denied, for its service"
                            );
                            // A refused client leaves no state behind.
                            if !admitted {
                                assert_eq!(conntrack_entries(f), 0, "no entry made");
                                assert_eq!(
                                    xlb::status::read_services(f.pin_path())
                                        .unwrap()
                                        .iter()
                                        .map(|s| s.stats.new_flows)
                                        .sum::<u64>(),
                                    0,
                                    "no flow made"
                                );
                            }
                        }),
                );
            }
        }
        rows::run(rows);
    });
}

/// A flow established while its client was inside the ranges is cut on its next packet
/// once the ranges no longer hold it, and goes on again when they do: a row per mode.
#[test]
fn privileged_established_flow_cut_when_the_ranges_change() {
    in_lab(|lab| {
        let flow = Frame::udp("10.10.0.5", 40000, "192.0.2.10", 53);
        let on = |frame: &Frame| Packet::on(lab.client_if, frame.build());
        let rows = MODES
            .into_iter()
            .map(|mode| {
                Row::new(mode.name())
                    .config(config(mode, Some(&["10.10.0.0/24"]), None))
                    .packet(on(&flow).verdict(XDP_REDIRECT))
                    .packet(on(&flow.clone().flags(ACK)).verdict(XDP_REDIRECT))
                    .apply(config(mode, Some(&["10.99.0.0/16"]), None))
                    .packet(
                        on(&flow)
                            .verdict(XDP_DROP)
                            .note("the established flow is cut"),
                    )
                    .check(|f, _| {
                        assert_eq!(conntrack_entries(f), 0, "its conntrack entry is gone")
                    })
                    // Ranges removed: everyone again, the flow starts afresh.
                    .apply(config(mode, None, None))
                    .packet(on(&flow).verdict(XDP_REDIRECT))
            })
            .collect();
        rows::run(rows);
    });
}
