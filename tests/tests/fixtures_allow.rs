//! BPF_PROG_TEST_RUN fixtures for source ranges (`allow:`): rows of (ranges, client,
//! expected verdict), through the real program in the NAT fixture namespace, for every
//! mode; an established flow cut when the ranges change; and ICMP errors about a flow
//! of a refused client.

use xlb::config::Config;
use xlb_tests::{
    natlab::*,
    packet::{Frame, ACK},
    testrun::{Fixture, XDP_DROP, XDP_REDIRECT},
};

/// One UDP service per family on :53, in `mode`, admitting `allow4` / `allow6`
/// (None: no `allow:` at all).
fn config(mode: &str, allow4: Option<&str>, allow6: Option<&str>) -> Config {
    let port = if mode == "dsr" { 53 } else { 8080 };
    let b4: Vec<String> = (2..5).map(|i| format!("10.20.0.{i}:{port}")).collect();
    let b6: Vec<String> = (2..5).map(|i| format!("[fd20::{i}]:{port}")).collect();
    let list = |v: &[String]| backend_list(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let allow = |a: Option<&str>| a.map(|a| format!("    allow: [{a}]\n")).unwrap_or_default();
    let text = format!(
        "maglev_table_size: {M}\nsnat: {{ipv4: 10.20.0.1, ipv6: \"fd20::1\"}}\nservices:\n\
         - name: dns\n    vip: 192.0.2.10\n    port: 53\n    protocol: udp\n    mode: {mode}\n    backends: [{}]\n{}\
         - name: dns6\n    vip: \"2001:db8::10\"\n    port: 53\n    protocol: udp\n    mode: {mode}\n    backends: [{}]\n{}",
        list(&b4),
        allow(allow4),
        list(&b6),
        allow(allow6),
    )
    .replace("\n- name", "\n  - name");
    Config::parse(&text).unwrap_or_else(|e| panic!("fixture config: {e:#}\n{text}"))
}

fn conntrack_entries(f: &Fixture) -> usize {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(f.pin_path().join(lb_common::MAP_CONNTRACK)).unwrap();
    let map =
        HashMap::<_, lb_common::FlowKey, lb_common::ConnValue>::try_from(Map::LruHashMap(data))
            .unwrap();
    map.keys().filter(|k| k.is_ok()).count()
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
type Row = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
    bool,
);

#[test]
fn privileged_source_range_rows() {
    in_lab(|lab| {
        let rows: &[Row] = &[
            ("no ranges", None, None, "10.10.0.5", true),
            ("no ranges v6", None, None, "fd10::5", true),
            ("inside", Some("10.10.0.0/24"), None, "10.10.0.5", true),
            (
                "first of the range",
                Some("10.10.0.0/30"),
                None,
                "10.10.0.0",
                true,
            ),
            (
                "last of the range",
                Some("10.10.0.0/30"),
                None,
                "10.10.0.3",
                true,
            ),
            (
                "just past the range",
                Some("10.10.0.0/30"),
                None,
                "10.10.0.4",
                false,
            ),
            (
                "just before the range",
                Some("10.10.0.4/30"),
                None,
                "10.10.0.3",
                false,
            ),
            (
                "one of several",
                Some("192.168.0.0/16, 10.10.0.5/32"),
                None,
                "10.10.0.5",
                true,
            ),
            (
                "/0 admits everyone",
                Some("0.0.0.0/0"),
                None,
                "203.0.113.9",
                true,
            ),
            ("v6 inside", None, Some("fd10::/64"), "fd10::5", true),
            ("v6 edge", None, Some("fd10::4/127"), "fd10::5", true),
            (
                "v6 past the edge",
                None,
                Some("fd10::4/127"),
                "fd10::6",
                false,
            ),
            ("::/0", None, Some("::/0"), "fd10::5", true),
            // An IPv4-mapped IPv6 source is an IPv6 address: an IPv4 range says
            // nothing about it, an IPv6 range of the mapped space does.
            (
                "v4-mapped, v6 service, v4-mapped range",
                None,
                Some("\"::ffff:10.10.0.0/120\""),
                "::ffff:10.10.0.5",
                true,
            ),
            (
                "v4-mapped, v6 service, other v6 range",
                None,
                Some("fd10::/64"),
                "::ffff:10.10.0.5",
                false,
            ),
        ];
        for &(name, a4, a6, client, admitted) in rows {
            for mode in ["nat", "dnat", "dsr"] {
                let mut f = Fixture::new().unwrap();
                f.apply(&config(mode, a4, a6)).unwrap();
                let vip = if client.contains(':') {
                    "2001:db8::10"
                } else {
                    "192.0.2.10"
                };
                let svc = if client.contains(':') { "dns6" } else { "dns" };
                let frame = Frame::udp(client, 40000, vip, 53).build();
                let r = f.run_on(&frame, lab.client_if).unwrap();
                let want = if admitted { XDP_REDIRECT } else { XDP_DROP };
                assert_eq!(r.verdict, want, "{name} ({mode})");
                assert_eq!(
                    (counter(&f, "drop_source_denied"), denied(&f, svc)),
                    if admitted { (0, 0) } else { (1, 1) },
                    "{name} ({mode}): counted as denied, for its service"
                );
                // A refused client leaves no state behind.
                if !admitted {
                    assert_eq!(conntrack_entries(&f), 0, "{name} ({mode}): no entry made");
                    assert_eq!(
                        xlb::status::read_services(f.pin_path())
                            .unwrap()
                            .iter()
                            .map(|s| s.stats.new_flows)
                            .sum::<u64>(),
                        0,
                        "{name} ({mode}): no flow made"
                    );
                }
            }
        }
    });
}

/// A flow established while its client was inside the ranges is cut on its next packet
/// once the ranges no longer hold it, and goes on again when they do.
#[test]
fn privileged_established_flow_cut_when_the_ranges_change() {
    in_lab(|lab| {
        for mode in ["nat", "dnat", "dsr"] {
            let mut f = Fixture::new().unwrap();
            f.apply(&config(mode, Some("10.10.0.0/24"), None)).unwrap();
            let flow = Frame::udp("10.10.0.5", 40000, "192.0.2.10", 53);
            assert_eq!(
                f.run_on(&flow.build(), lab.client_if).unwrap().verdict,
                XDP_REDIRECT
            );
            assert_eq!(
                f.run_on(&flow.clone().flags(ACK).build(), lab.client_if)
                    .unwrap()
                    .verdict,
                XDP_REDIRECT
            );
            f.apply(&config(mode, Some("10.99.0.0/16"), None)).unwrap();
            assert_eq!(
                f.run_on(&flow.build(), lab.client_if).unwrap().verdict,
                XDP_DROP,
                "{mode}: the established flow is cut"
            );
            assert_eq!(
                conntrack_entries(&f),
                0,
                "{mode}: its conntrack entry is gone"
            );
            // Ranges removed: everyone again, the flow starts afresh.
            f.apply(&config(mode, None, None)).unwrap();
            assert_eq!(
                f.run_on(&flow.build(), lab.client_if).unwrap().verdict,
                XDP_REDIRECT,
                "{mode}"
            );
        }
    });
}
