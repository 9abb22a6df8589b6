//! A stateless UDP service (`conntrack: false`, issue 29) as deployed: the segment lab
//! (tests/src/segment.rs: untuned veths, no static neighbours, default sysctls apart
//! from forwarding), the real `xlb run` with its default flags, three backends. Clients
//! send datagrams from many source ports to the stateless service (IPv4 and IPv6) and
//! to a stateful UDP service beside it on the same VIP. Every datagram is answered,
//! from the VIP; the stateless service's answers come from every backend, each source
//! port's datagrams from one backend (Maglev alone keeps them there); the flow table
//! (read through its pin, as the agent maps it) holds no entry for the stateless
//! service's flows and one for each of the stateful service's.
//!
//! dnat (the backends route their replies through the LB, which translates them back
//! by the reply entries: those a stateless dnat service still makes) and dsr (the
//! backends decapsulate and answer the client directly: no entry at all).
//! `xlb check-config` refusing `conntrack: false` on nat is lb-userspace's
//! tests/check_config.rs.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{FlowKey, MAP_CONNTRACK, MAP_REVERSE_NAT, PROTO_UDP};
use xlb::{
    codec::addr_to_words,
    flows::{Conntrack, ReverseTable},
};
use xlb_tests::{
    agent::status_json,
    cfg::{Cfg, Mode, Svc},
    peer::{parse, serve, TCP_PORT},
    privileged, report,
    segment::SegmentLab,
    topology::{VIP4, VIP6},
    unique_name, RemoveOnDrop,
};

/// The stateless service's port, and the stateful one's beside it.
const STATELESS: u16 = 53;
const STATEFUL: u16 = 5353;
/// Source ports (one socket each) per service and family.
const SOURCES: usize = 60;
/// Datagrams per source port.
const PER_SOURCE: usize = 2;
const TRY: Duration = Duration::from_millis(900);

struct Sent {
    /// Per source port: (port, backend of each answer).
    answers: Vec<(u16, Vec<usize>)>,
    lost: usize,
    first_err: Option<String>,
}

/// `SOURCES` sockets in the client, each sending `PER_SOURCE` datagrams to `to`, one
/// try each; answers must come from `to`.
fn query(lab: &SegmentLab, to: SocketAddr) -> Sent {
    lab.client
        .run(move || {
            let mut out = Sent {
                answers: Vec::new(),
                lost: 0,
                first_err: None,
            };
            // Every socket stays open to the end: a closed one's port can be given to
            // the next bind, and two sources would then be one flow (CI saw 59
            // entries for 60 sources so).
            let mut open = Vec::new();
            for i in 0..SOURCES {
                if out.lost >= 5 {
                    break;
                }
                let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                    .parse()
                    .unwrap();
                let s = UdpSocket::bind(any).unwrap();
                s.set_read_timeout(Some(TRY)).unwrap();
                let port = s.local_addr().unwrap().port();
                let mut backends = Vec::new();
                for j in 0..PER_SOURCE {
                    let msg = format!("q{i}.{j}");
                    let r = (|| -> std::io::Result<usize> {
                        s.send_to(msg.as_bytes(), to)?;
                        let mut buf = [0u8; 512];
                        let (len, from) = s.recv_from(&mut buf)?;
                        if from != to {
                            return Err(std::io::Error::other(format!(
                                "answer from {from}, not the VIP"
                            )));
                        }
                        match parse(&buf[..len]) {
                            Some((b, _, echoed)) if echoed == msg => Ok(b),
                            other => Err(std::io::Error::other(format!("answer {other:?}"))),
                        }
                    })();
                    match r {
                        Ok(b) => backends.push(b),
                        Err(e) => {
                            out.lost += 1;
                            out.first_err
                                .get_or_insert(format!("{to} from port {port}, {msg}: {e}"));
                        }
                    }
                }
                out.answers.push((port, backends));
                open.push(s);
            }
            out
        })
        .unwrap()
}

fn key(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
    let (s, family) = addr_to_words(src);
    let (d, _) = addr_to_words(dst);
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_UDP,
        family,
        _pad: [0; 2],
    }
}

/// The nonzero datapath counters at a pin path, for failure messages.
fn counters(pin: &Path) -> String {
    let st = status_json(pin).unwrap_or_default();
    st["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v["packets"].as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k}={}", v["packets"]))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn stateless_udp_service(mode: Mode) -> serde_json::Value {
    let lab = SegmentLab::new(1, 3).unwrap();
    let vips: [IpAddr; 2] = [VIP4.parse().unwrap(), VIP6.parse().unwrap()];
    // dsr: the VIPs on the backends' loopback and the servers bound to them (a UDP
    // server answers from the address it is bound to); dnat: the replies go back
    // through the LB.
    let binds: Vec<SocketAddr> = if mode == Mode::Dsr {
        lab.vips_on_backends().unwrap();
        vips.iter()
            .flat_map(|&v| [SocketAddr::new(v, STATELESS), SocketAddr::new(v, STATEFUL)])
            .collect()
    } else {
        lab.backends_return_via(0).unwrap();
        [STATELESS, STATEFUL]
            .map(|p| SocketAddr::from(([0u16; 8], p)))
            .to_vec()
    };
    let life = Duration::from_secs(90);
    let _servers: Vec<_> = (0..3)
        .flat_map(|i| serve(&lab.backends[i].ns, i, TCP_PORT, &binds, life))
        .collect();
    let _decap = if mode == Mode::Dsr {
        lab.decap_agents()
    } else {
        Vec::new()
    };
    let backends = |v6: bool, port: u16| -> Vec<SocketAddr> {
        lab.backends
            .iter()
            .map(|b| SocketAddr::new(if v6 { b.addr6 } else { b.addr4 }, port))
            .collect()
    };
    let cfg = Cfg::new()
        .service(
            Svc::udp("dns-v4", VIP4, STATELESS)
                .mode(mode)
                .conntrack(false)
                .backends(backends(false, STATELESS)),
        )
        .service(
            Svc::udp("dns-v6", VIP6, STATELESS)
                .mode(mode)
                .conntrack(false)
                .backends(backends(true, STATELESS)),
        )
        .service(
            Svc::udp("stateful-v4", VIP4, STATEFUL)
                .mode(mode)
                .backends(backends(false, STATEFUL)),
        );
    let cfg_path = std::env::temp_dir().join(format!("{}.yaml", unique_name("xsd")));
    let _c = RemoveOnDrop(cfg_path.clone());
    cfg.write(&cfg_path).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbs")));
    let _p = RemoveOnDrop(pin.clone());
    // Default flags: only the interface, the config and a pin path of the test's own.
    let agent = lab.lbs[0]
        .agent()
        .config(&cfg_path)
        .pin_path(&pin)
        .start()
        .unwrap();

    let name = mode.name();
    let mut out = serde_json::Map::new();
    let mut stateless_sent = Vec::new();
    for vip in vips {
        let to = SocketAddr::new(vip, STATELESS);
        let sent = query(&lab, to);
        assert_eq!(
            sent.lost,
            0,
            "{name} stateless {to}: datagrams unanswered (first: {:?})\ncounters: {}\n{}",
            sent.first_err,
            counters(&pin),
            agent.logs()
        );
        let mut per_backend = [0usize; 3];
        for (port, bs) in &sent.answers {
            assert!(
                bs.windows(2).all(|w| w[0] == w[1]),
                "{name} stateless {to}: source port {port} answered by {bs:?}: Maglev keeps \
                 one source port on one backend"
            );
            for &b in bs {
                per_backend[b] += 1;
            }
        }
        assert!(
            per_backend.iter().all(|&n| n > 0),
            "{name} stateless {to}: answers from every backend: {per_backend:?}"
        );
        out.insert(
            format!("stateless_{vip}"),
            serde_json::json!({"sources": sent.answers.len(), "datagrams": SOURCES * PER_SOURCE, "lost": 0, "per_backend": per_backend}),
        );
        stateless_sent.push((vip, sent));
    }
    let stateful_to = SocketAddr::new(vips[0], STATEFUL);
    let stateful = query(&lab, stateful_to);
    assert_eq!(
        stateful.lost,
        0,
        "{name} stateful {stateful_to}: datagrams unanswered (first: {:?})\ncounters: {}",
        stateful.first_err,
        counters(&pin)
    );

    // The flow tables, mapped from the agent's pins.
    let ct = Conntrack::from_pin(&pin.join(MAP_CONNTRACK)).unwrap();
    let rev = ReverseTable::from_pin(&pin.join(MAP_REVERSE_NAT)).unwrap();
    let entries: Vec<FlowKey> = ct.entries().map(|e| e.key).collect();
    let client = |v: IpAddr| {
        if v.is_ipv4() {
            lab.client4
        } else {
            lab.client6
        }
    };
    let of_port = |port: u16| {
        entries
            .iter()
            .filter(|k| k.dport == port.to_be() && k.proto == PROTO_UDP)
            .count()
    };
    assert_eq!(
        of_port(STATELESS),
        0,
        "{name}: the stateless service's flows have no conntrack entry"
    );
    for (vip, sent) in &stateless_sent {
        for (port, _) in &sent.answers {
            let k = key(client(*vip), *port, *vip, STATELESS);
            assert!(!entries.contains(&k), "{name}: an entry for {k:?}");
        }
    }
    for (port, _) in &stateful.answers {
        let k = key(lab.client4, *port, vips[0], STATEFUL);
        assert!(
            entries.contains(&k),
            "{name}: the stateful service's flow from port {port} has its entry"
        );
    }
    assert_eq!(
        of_port(STATEFUL),
        stateful.answers.len(),
        "{name}: one entry per stateful flow"
    );
    // Reply entries: dsr makes none; a stateless dnat service still claims its
    // replies' 5-tuples (the backend answers through the LB, which must translate
    // them back), one per source port.
    let reply_entries = |port: u16| {
        rev.entries()
            .filter(|e| e.key.sport == port.to_be())
            .count()
    };
    let (rev_stateless, rev_stateful) = (reply_entries(STATELESS), reply_entries(STATEFUL));
    if mode == Mode::Dsr {
        assert_eq!(
            (rev_stateless, rev_stateful),
            (0, 0),
            "dsr: no reply entries"
        );
    } else {
        assert_eq!(
            rev_stateless,
            2 * SOURCES,
            "dnat: one reply entry per stateless source port (both families)"
        );
    }
    assert_eq!(
        xlb::counters::read_global_counters(&pin).unwrap()["event_flood_stateless"].packets,
        0,
        "a stateless service is not the flood guard's"
    );
    out.insert(
        "stateful".into(),
        serde_json::json!({"sources": stateful.answers.len(), "lost": 0, "conntrack_entries": of_port(STATEFUL)}),
    );
    out.insert(
        "conntrack_entries_stateless".into(),
        of_port(STATELESS).into(),
    );
    out.insert("reply_entries_stateless".into(), rev_stateless.into());
    println!("{name}: {}", serde_json::Value::Object(out.clone()));
    serde_json::Value::Object(out)
}

#[test]
fn privileged_stateless_udp_dnat_service_as_deployed() {
    if !privileged() {
        return;
    }
    report(
        "stateless_as_deployed_dnat",
        stateless_udp_service(Mode::Dnat),
    );
}

#[test]
fn privileged_stateless_udp_dsr_service_as_deployed() {
    if !privileged() {
        return;
    }
    report(
        "stateless_as_deployed_dsr",
        stateless_udp_service(Mode::Dsr),
    );
}
