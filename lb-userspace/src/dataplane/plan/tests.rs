//! The plan's rules, without root and without maps: what is written, in which order,
//! and that a change costs what it changes.

use super::*;
use crate::model::{Backend as ModelBackend, Mode, Protocol, Service};

const LIMITS: Limits = Limits {
    max_services: 4096,
    max_backends: 1 << 17,
};

fn service(n: u32, backends: u32) -> Service {
    Service {
        name: format!("s{n}"),
        vip: IpAddr::from([10, 200, (n >> 8) as u8, n as u8]),
        port: 80,
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        backends: (0..backends)
            .map(|b| {
                let a = 0xac10_0000u32 + n * 1000 + b;
                ModelBackend::new((std::net::Ipv4Addr::from(a), 8080).into(), 1, None)
            })
            .collect(),
        session_affinity: SessionAffinity::None,
        health_check: None,
        encapsulated: false,
        allow: Vec::new(),
        conntrack: true,
    }
}

/// A plan's writes, collected.
struct Planned {
    writes: Vec<Write>,
    applied: Applied,
    summary: ApplySummary,
}

fn plan_with(now: &Applied, d: &Desired, limits: Limits) -> Result<Planned> {
    let mut writes = Vec::new();
    let (applied, summary) = plan(now.clone(), d, limits, &mut |w| {
        writes.push(w);
        Ok(())
    })?;
    Ok(Planned {
        writes,
        applied,
        summary,
    })
}

fn plan_of(now: &Applied, d: &Desired) -> Result<Planned> {
    plan_with(now, d, LIMITS)
}

fn desired(services: Vec<Service>) -> Desired {
    let mut d = Desired {
        services,
        ..Default::default()
    };
    d.settings.maglev_table_size = 251;
    d
}

/// The index of the first write that matches.
fn at(writes: &[Write], f: impl Fn(&Write) -> bool) -> usize {
    writes.iter().position(f).expect("a write of that kind")
}

fn is_service(w: &Write) -> bool {
    matches!(w, Write::Service(..))
}

#[test]
fn a_new_service_is_written_backends_first_then_table_then_entry() {
    let d = desired(vec![service(1, 3)]);
    let p = plan_of(&Applied::default(), &d).unwrap();
    let w = &p.writes;
    let backends: Vec<usize> = (0..w.len())
        .filter(|i| matches!(w[*i], Write::Backend(..)))
        .collect();
    assert_eq!(backends.len(), 3);
    let table = at(w, |w| matches!(w, Write::Table { .. }));
    let entry = at(w, is_service);
    let first_filter = at(w, |w| matches!(w, Write::FilterWord(..)));
    assert!(
        first_filter < entry,
        "the filter's bit before the service entry"
    );
    assert!(
        backends.iter().all(|b| *b < table),
        "backends before the table"
    );
    assert!(table < entry, "the table before the entry that names it");
    assert!(
        matches!(w[at(w, |w| matches!(w, Write::Config(..)))], Write::Config(c) if c.dnat_in_use == 0)
    );
    assert_eq!(
        p.summary,
        ApplySummary {
            services_added: 1,
            tables_written: 1,
            backends_added: 3,
            ..Default::default()
        }
    );
    // The table names only the three backends written, by their ids.
    let Write::Table {
        slots, generation, ..
    } = &w[table]
    else {
        unreachable!()
    };
    assert_eq!(*generation, 0);
    assert_eq!(slots.len(), 251);
    let ids: BTreeSet<u32> = slots.iter().copied().collect();
    assert_eq!(ids, p.applied.backends.keys().copied().collect());
}

#[test]
fn the_same_state_again_writes_nothing() {
    let d = desired((0..50).map(|n| service(n, 10)).collect());
    let first = plan_of(&Applied::default(), &d).unwrap();
    let again = plan_of(&first.applied, &d).unwrap();
    assert_eq!(again.writes, Vec::new());
    assert_eq!(again.summary, ApplySummary::default());
    assert_eq!(again.applied, first.applied);
}

#[test]
fn one_backend_changed_touches_one_service() {
    let mut d = desired((0..200).map(|n| service(n, 20)).collect());
    let first = plan_of(&Applied::default(), &d).unwrap();
    let old_id = first.applied.services[&codec::model_service_key(&d.services[77])].id;
    d.services[77].backends[3].address = "172.31.0.1:8080".parse().unwrap();
    let p = plan_of(&first.applied, &d).unwrap();
    assert_eq!(
        p.summary,
        ApplySummary {
            tables_written: 1,
            backends_added: 1,
            backends_removed: 1,
            ..Default::default()
        }
    );
    // The new backend, the other generation of one table, the old one retired, the
    // entry pointing at the new one, the old backend cleared: nothing of the other 199.
    let kinds: Vec<&str> = p
        .writes
        .iter()
        .map(|w| match w {
            Write::Backend(..) => "backend",
            Write::Tunnel(..) => "tunnel",
            Write::Table { id, generation, .. } => {
                assert_eq!((*id, *generation), (old_id, 1));
                "table"
            }
            Write::Retire { id, generation, .. } => {
                assert_eq!((*id, *generation), (old_id, 0));
                "retire"
            }
            Write::Service(_, v) => {
                assert_eq!((v.id, v.generation), (old_id, 1));
                "service"
            }
            Write::ClearBackend(..) => "clear",
            other => panic!("unexpected write {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["backend", "tunnel", "table", "retire", "service", "clear"]
    );
}

#[test]
fn ids_stay_with_their_services_and_backends_whatever_the_order() {
    let d = desired((0..20).map(|n| service(n, 5)).collect());
    let first = plan_of(&Applied::default(), &d).unwrap();
    let mut reversed = d.clone();
    reversed.services.reverse();
    let p = plan_of(&first.applied, &reversed).unwrap();
    assert_eq!(p.applied.services, first.applied.services);
    assert_eq!(p.applied.backends, first.applied.backends);
    assert!(p
        .writes
        .iter()
        .all(|w| !matches!(w, Write::Service(..) | Write::Backend(..))));
}

#[test]
fn a_removed_service_goes_entry_first_then_its_table_then_its_backends() {
    let d = desired(vec![service(1, 2), service(2, 2)]);
    let first = plan_of(&Applied::default(), &d).unwrap();
    let p = plan_of(&first.applied, &desired(vec![service(1, 2)])).unwrap();
    let w = &p.writes;
    let entry = at(w, |w| matches!(w, Write::RemoveService(..)));
    let tables = at(w, |w| matches!(w, Write::RemoveTables(..)));
    let clear = at(w, |w| matches!(w, Write::ClearBackend(..)));
    assert!(entry < tables && tables < clear);
    assert_eq!(p.summary.services_removed, 1);
    assert_eq!(p.summary.backends_removed, 2);
    // The filter loses the removed service's bit only at the end.
    let last_filter = w
        .iter()
        .rposition(|w| matches!(w, Write::FilterWord(..)))
        .unwrap();
    assert!(last_filter > clear);
    assert_eq!(
        p.applied.filter.as_deref(),
        Some(&codec::vip_filter([codec::model_service_key(&service(1, 2))])[..])
    );
}

#[test]
fn source_ranges_come_before_the_flags_that_read_them_and_go_after() {
    let mut restricted = service(1, 2);
    restricted.allow = vec![
        "192.0.2.0/24".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    let first = plan_of(&Applied::default(), &desired(vec![restricted.clone()])).unwrap();
    let w = &first.writes;
    let add = at(w, |w| matches!(w, Write::AddRanges(r) if r.len() == 1));
    let backend = at(
        w,
        |w| matches!(w, Write::Backend(_, b) if b.flags & BACKEND_F_SVC_SOURCE_RANGES != 0),
    );
    let entry = at(
        w,
        |w| matches!(w, Write::Service(_, v) if v.flags & SVC_F_SOURCE_RANGES != 0),
    );
    assert!(
        add < backend && add < entry,
        "only the VIP's family's range, before the flags"
    );
    // No echo for a restricted VIP.
    assert!(w.iter().any(|w| matches!(w, Write::Vip(_, 0))));
    // Opened again: the flags go, then the range.
    let open = plan_of(&first.applied, &desired(vec![service(1, 2)])).unwrap();
    let w = &open.writes;
    let entry = at(
        w,
        |w| matches!(w, Write::Service(_, v) if v.flags & SVC_F_SOURCE_RANGES == 0),
    );
    let remove = at(w, |w| matches!(w, Write::RemoveRanges(..)));
    assert!(entry < remove);
    assert!(open.applied.ranges.is_empty());
    assert!(w.iter().any(|w| matches!(w, Write::Vip(_, VIP_F_ECHO))));
}

#[test]
fn the_mode_is_kept_on_the_backends_and_dnat_in_use_derives_from_it() {
    let mut dnat = service(1, 1);
    dnat.mode = Mode::Dnat;
    let mut dsr = service(2, 1);
    dsr.mode = Mode::Dsr;
    let p = plan_of(&Applied::default(), &desired(vec![dnat, dsr.clone()])).unwrap();
    let flags: Vec<u8> = p.applied.backends.values().map(|b| b.flags).collect();
    assert_eq!(
        flags,
        [lb_common::BACKEND_F_SVC_DNAT, lb_common::BACKEND_F_SVC_DSR]
    );
    assert_eq!(p.applied.config.unwrap().dnat_in_use, 1);
    assert!(codec::derived_dnat_in_use(p.applied.backends.values()));
    // A dsr service's backend on this node is reached by dnat.
    dsr.backends[0].local = true;
    let p = plan_of(&Applied::default(), &desired(vec![dsr])).unwrap();
    let b = p.applied.backends.values().next().unwrap();
    assert_eq!(b.mode(), lb_common::MODE_DNAT);
    assert_eq!(p.applied.config.unwrap().dnat_in_use, 1);
}

#[test]
fn resolved_facts_reach_the_backend_entries() {
    let mut s = service(1, 2);
    s.backends[0].healthy = false;
    s.backends[0].weight = 0;
    s.backends[1].snat = Some("10.9.0.1".parse().unwrap());
    let p = plan_of(&Applied::default(), &desired(vec![s.clone()])).unwrap();
    let entries: Vec<&Backend> = p.applied.backends.values().collect();
    assert_ne!(entries[0].flags & BACKEND_F_UNHEALTHY, 0);
    assert_eq!(
        entries[1].snat,
        addr_to_words("10.9.0.1".parse().unwrap()).0
    );
    // A configured SNAT address wins over the route's.
    let mut d = desired(vec![s]);
    d.settings.snat.ipv4 = Some("10.8.0.1".parse().unwrap());
    let p = plan_of(&Applied::default(), &d).unwrap();
    assert!(p
        .applied
        .backends
        .values()
        .all(|b| b.snat == addr_to_words("10.8.0.1".parse().unwrap()).0));
}

#[test]
fn a_settings_change_rebuilds_every_table() {
    let d = desired((0..5).map(|n| service(n, 3)).collect());
    let first = plan_of(&Applied::default(), &d).unwrap();
    let mut bigger = d.clone();
    bigger.settings.maglev_table_size = 509;
    let p = plan_of(&first.applied, &bigger).unwrap();
    assert_eq!(p.summary.tables_written, 5);
}

#[test]
fn more_than_the_maps_hold_is_refused_before_any_write() {
    let d = desired((0..5).map(|n| service(n, 3)).collect());
    let small = Limits {
        max_services: 4,
        max_backends: 100,
    };
    let e = plan_with(&Applied::default(), &d, small).err().unwrap();
    assert!(format!("{e:#}").contains("--max-services"), "{e:#}");
}

/// After a restart the maps are read back without tables, names or sources: the first
/// plan rewrites every table (alike), keeps every id, and then is as cheap as ever.
#[test]
fn adopted_maps_keep_their_ids() {
    let d = desired((0..10).map(|n| service(n, 4)).collect());
    let first = plan_of(&Applied::default(), &d).unwrap();
    let adopted = Applied {
        services: first.applied.services.clone(),
        backends: first.applied.backends.clone(),
        ranges: first.applied.ranges.clone(),
        vips: first.applied.vips.clone(),
        ..Default::default()
    };
    let p = plan_of(&adopted, &d).unwrap();
    assert_eq!(
        p.applied
            .services
            .values()
            .map(|v| v.id)
            .collect::<Vec<_>>(),
        first
            .applied
            .services
            .values()
            .map(|v| v.id)
            .collect::<Vec<_>>()
    );
    assert_eq!(p.applied.backends, first.applied.backends);
    assert_eq!(p.summary.services_added + p.summary.backends_added, 0);
    assert!(plan_of(&p.applied, &d).unwrap().writes.is_empty());
}

/// Maps this agent created hold zeros: a backend without `via` writes no tunnel, and a
/// removed backend's tunnel is zeroed, so that a missing entry still means zeros.
#[test]
fn a_created_tunnel_map_is_not_written_zeros() {
    let fresh = Applied {
        tunnels_zeroed: true,
        ..Default::default()
    };
    let mut via = service(2, 1);
    via.mode = Mode::Dsr;
    via.port = 8080;
    via.backends[0].via = Some("10.9.9.9".parse().unwrap());
    let d = desired(vec![service(1, 3), via.clone()]);
    let p = plan_of(&fresh, &d).unwrap();
    let tunnels: Vec<&Write> = p
        .writes
        .iter()
        .filter(|w| matches!(w, Write::Tunnel(..)))
        .collect();
    assert_eq!(tunnels.len(), 1, "only the dsr backend's: {tunnels:?}");
    let p = plan_of(&p.applied, &desired(vec![service(1, 3)])).unwrap();
    assert!(
        p.writes
            .iter()
            .any(|w| matches!(w, Write::Tunnel(_, t) if *t == [0; 4])),
        "the removed backend's tunnel zeroed"
    );
    assert!(p.applied.tunnels.is_empty());
}

/// A removed backend's id waits for a conntrack sweep before a new backend gets it:
/// the new one must not inherit the old one's flows.
#[test]
fn a_removed_backends_id_is_not_given_out_before_a_sweep() {
    let first = plan_of(&Applied::default(), &desired(vec![service(1, 2)])).unwrap();
    let mut changed = service(1, 2);
    changed.backends[1].address = "172.31.0.1:8080".parse().unwrap();
    let p = plan_of(&first.applied, &desired(vec![changed.clone()])).unwrap();
    let ids: Vec<u32> = p.applied.backends.keys().copied().collect();
    assert_eq!(ids, [0, 2], "id 1 waits");
    assert_eq!(p.applied.freed.keys().copied().collect::<Vec<_>>(), [1]);
    assert_eq!(backends_to_add(&p.applied, &desired(vec![changed])), 0);
    // Swept: given out again.
    let mut swept = p.applied.clone();
    swept.freed.clear();
    let mut again = service(1, 2);
    again.backends[1].address = "172.31.0.2:8080".parse().unwrap();
    let d = desired(vec![again]);
    assert_eq!(backends_to_add(&swept, &d), 1);
    let p = plan_of(&swept, &d).unwrap();
    assert!(p.applied.backends.contains_key(&1));
}

/// The same backend back before the sweep gets its id again (its flows and counters
/// with it), and the id leaves the waiting list.
#[test]
fn a_backend_back_before_the_sweep_gets_its_id_again() {
    let first = plan_of(&Applied::default(), &desired(vec![service(1, 3)])).unwrap();
    let mut fewer = service(1, 3);
    let gone = fewer.backends.remove(1);
    let p = plan_of(&first.applied, &desired(vec![fewer])).unwrap();
    assert_eq!(p.applied.freed.len(), 1);
    let p = plan_of(&p.applied, &desired(vec![service(1, 3)])).unwrap();
    assert!(p.applied.freed.is_empty());
    assert_eq!(
        p.applied.backends, first.applied.backends,
        "same ids, same entries"
    );
    assert_eq!(p.summary.backends_added, 1);
    assert!(p
        .writes
        .iter()
        .any(|w| matches!(w, Write::Backend(1, b) if backend_addr(b) == gone.address)));
}

/// A removed service's id goes to the next new service at once; the backend ids it
/// freed do not, even for the same address: they wait for a sweep.
#[test]
fn a_reused_service_id_does_not_take_the_old_services_backend_ids() {
    let first = plan_of(
        &Applied::default(),
        &desired(vec![service(1, 2), service(2, 1)]),
    )
    .unwrap();
    let gone = plan_of(&first.applied, &desired(vec![service(1, 2)])).unwrap();
    let freed: Vec<u32> = gone.applied.freed.keys().copied().collect();
    assert_eq!(freed.len(), 1);
    // Another service (another VIP) with the removed one's backend.
    let mut other = service(3, 0);
    other.backends = service(2, 1).backends;
    let p = plan_of(&gone.applied, &desired(vec![service(1, 2), other])).unwrap();
    let ids: Vec<u32> = p.applied.backends.keys().copied().collect();
    assert!(!ids.contains(&freed[0]), "{ids:?} took the freed {freed:?}");
}

/// `conntrack: false` sets the service entry's SVC_F_STATELESS, beside its other
/// flags; a service with conntrack has it clear.
#[test]
fn a_stateless_service_entry_carries_the_flag() {
    let mut dsr = service(1, 2);
    dsr.mode = Mode::Dsr;
    dsr.port = 8080;
    dsr.conntrack = false;
    dsr.session_affinity = SessionAffinity::ClientIp;
    let mut dnat = service(2, 2);
    dnat.mode = Mode::Dnat;
    dnat.conntrack = false;
    let stateful = service(3, 2);
    let d = desired(vec![dsr.clone(), dnat.clone(), stateful.clone()]);
    let p = plan_of(&Applied::default(), &d).unwrap();
    let flags = |s: &Service| p.applied.services[&codec::model_service_key(s)].flags;
    assert_eq!(flags(&dsr), SVC_F_STATELESS | SVC_F_CLIENT_AFFINITY);
    assert_eq!(flags(&dnat), SVC_F_STATELESS);
    assert_eq!(flags(&stateful), 0);
    // The entries written are the ones kept.
    let written: Vec<u8> = p
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Service(_, v) => Some(v.flags & SVC_F_STATELESS),
            _ => None,
        })
        .collect();
    assert_eq!(written.len(), 3);
    assert_eq!(
        written.iter().filter(|f| **f != 0).count(),
        2,
        "{written:?}"
    );
}

/// Flipping `conntrack` is part of the service's digest, so it applies, and it costs
/// one write: the service entry, with the same id, table generation and backends.
#[test]
fn flipping_conntrack_rewrites_the_service_entry_only() {
    let mut s = service(1, 3);
    s.mode = Mode::Dnat;
    let others: Vec<Service> = (2..10).map(|n| service(n, 3)).collect();
    let mut services = vec![s.clone()];
    services.extend(others.iter().cloned());
    let d = desired(services.clone());
    let first = plan_of(&Applied::default(), &d).unwrap();
    let key = codec::model_service_key(&s);
    let before = first.applied.services[&key];
    assert_eq!(before.flags & SVC_F_STATELESS, 0);

    let mut off = d.clone();
    off.services[0].conntrack = false;
    let p = plan_of(&first.applied, &off).unwrap();
    let after = p.applied.services[&key];
    // Besides the entry, the service's bit in the stateless filter: one word.
    let (word, mask) = lb_common::hash::vip_filter_slot(lb_common::hash::vip_filter_bit(
        &key.vip, key.port, key.proto,
    ));
    let (hints, writes): (Vec<Write>, Vec<Write>) = p
        .writes
        .iter()
        .cloned()
        .partition(|w| matches!(w, Write::StatelessWord(..)));
    assert_eq!(hints, vec![Write::StatelessWord(word, mask)]);
    assert_eq!(
        writes,
        vec![Write::Service(
            key,
            ServiceValue {
                flags: before.flags | SVC_F_STATELESS,
                ..before
            }
        )]
    );
    assert_eq!(after.flags, SVC_F_STATELESS);
    assert_eq!(p.summary, ApplySummary::default());
    assert_eq!(p.applied.backends, first.applied.backends);
    assert_eq!(p.applied.tables, first.applied.tables);
    // The digest moved with it: the same state again writes nothing.
    assert!(plan_of(&p.applied, &off).unwrap().writes.is_empty());

    // And back on: the flag goes, the entry alone is written again.
    let back = plan_of(&p.applied, &d).unwrap();
    assert_eq!(
        back.writes,
        vec![Write::Service(key, before), Write::StatelessWord(word, 0)]
    );
    assert_eq!(back.applied.services, first.applied.services);
}

/// The backends cleared are those a changed service no longer names and every one of a
/// removed service, found from the services' records of their last apply, and the
/// same as a walk of every backend finds (adopted maps, without records).
#[test]
fn cleared_backends_are_those_changed_and_removed_services_left() {
    let first = plan_of(
        &Applied::default(),
        &desired(vec![service(1, 3), service(2, 2), service(3, 4)]),
    )
    .unwrap();
    let mut changed = service(1, 3);
    changed.backends[2].address = "172.31.0.9:8080".parse().unwrap();
    let d = desired(vec![changed, service(3, 4)]);
    let cleared = |p: &Planned| -> BTreeSet<u32> {
        p.writes
            .iter()
            .filter_map(|w| match w {
                Write::ClearBackend(id, _) => Some(*id),
                _ => None,
            })
            .collect()
    };
    let by_id = |addr: &str, svc: &Applied| -> u32 {
        let a: std::net::SocketAddr = addr.parse().unwrap();
        *svc.backends
            .iter()
            .find(|(_, b)| backend_addr(b) == a)
            .unwrap()
            .0
    };
    let s1 = &service(1, 3).backends[2].address.to_string();
    let s2: Vec<String> = service(2, 2)
        .backends
        .iter()
        .map(|b| b.address.to_string())
        .collect();
    let expected: BTreeSet<u32> = [s1, &s2[0], &s2[1]]
        .into_iter()
        .map(|a| by_id(a, &first.applied))
        .collect();
    let recorded = plan_of(&first.applied, &d).unwrap();
    assert_eq!(cleared(&recorded), expected);
    assert_eq!(recorded.summary.backends_removed, 3);
    let mut adopted = first.applied.clone();
    adopted.sources.clear();
    let walked = plan_of(&adopted, &d).unwrap();
    assert_eq!(cleared(&walked), expected);
    assert_eq!(recorded.applied.backends, walked.applied.backends);
}

/// The digest that recognises an unchanged service tells apart what a change makes:
/// one backend's address, port or weight, two backends swapped, one more backend.
#[test]
fn the_digest_tells_a_changed_service_apart() {
    let base = service(1, 100);
    let d = |s: &Service| digest(&(s, 0u8));
    let mut seen = BTreeSet::from([d(&base)]);
    let mut variants = Vec::new();
    for i in [0usize, 50, 99] {
        let mut s = base.clone();
        s.backends[i].address.set_port(8081);
        variants.push(s);
        let mut s = base.clone();
        s.backends[i].weight = 2;
        variants.push(s);
        let mut s = base.clone();
        s.backends[i].snat = Some("10.0.0.1".parse().unwrap());
        variants.push(s);
    }
    let mut s = base.clone();
    s.backends.swap(3, 4);
    variants.push(s);
    variants.push(service(1, 101));
    let mut s = base.clone();
    s.name.push('x');
    variants.push(s);
    for v in &variants {
        assert!(seen.insert(d(v)), "a collision for {:?}", v.name);
    }
    assert_eq!(
        d(&base),
        d(&base.clone()),
        "the same service, the same digest"
    );
}
