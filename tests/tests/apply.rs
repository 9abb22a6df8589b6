//! `Dataplane::apply` against real maps: a sequence of incremental updates must leave
//! exactly what one apply of the final config into empty maps leaves (the agent keeps
//! a userspace mirror of the maps and skips unchanged Maglev tables, so this is what
//! could drift), and the map sizes chosen at load are enforced before anything is
//! written.

use std::collections::BTreeMap;

use lb_common::{maglev_chunks, Backend, MaglevChunk, MaglevKey, MAP_BACKENDS, MAP_MAGLEV};
use xlb::{config::Config, dataplane::LoadOptions};
use xlb_tests::{
    cfg::{Cfg, Mode, Svc},
    privileged,
    testrun::Fixture,
};

/// Services by number, each with its backends as (number, weight).
type Services = Vec<(usize, Vec<(usize, u32)>)>;

fn config(services: &[(usize, Vec<(usize, u32)>)]) -> Config {
    let mut c = Cfg::new().maglev_table_size(2039).snat4("10.30.0.1");
    for (s, backends) in services {
        let vip = std::net::Ipv4Addr::from(0x0ac8_0001u32 + *s as u32);
        let mut svc = Svc::tcp(format!("s{s}"), vip, 80);
        for (b, w) in backends {
            svc = svc.weighted(format!("172.16.{}.{}:8080", b / 250, b % 250 + 1), *w);
        }
        c = c.service(svc);
    }
    c.config()
}

fn backends_in_map(f: &mut Fixture) -> usize {
    // Read from the map itself, not through the dataplane's mirror of it.
    let m: aya::maps::Array<_, Backend> =
        aya::maps::Array::try_from(f.dp.ebpf.map(MAP_BACKENDS).unwrap()).unwrap();
    xlb::dataplane::live_backends(&m).unwrap().len()
}

/// Chunks of Maglev tables in the map, all generations.
fn maglev_chunks_in_map(f: &mut Fixture) -> usize {
    let m: aya::maps::HashMap<_, MaglevKey, MaglevChunk> =
        aya::maps::HashMap::try_from(f.dp.ebpf.map(MAP_MAGLEV).unwrap()).unwrap();
    m.keys().count()
}

fn tables(f: &Fixture) -> BTreeMap<String, Vec<String>> {
    xlb::status::read_tables(f.pin_path()).unwrap()
}

#[test]
fn privileged_incremental_applies_end_where_a_fresh_apply_does() {
    if !privileged() {
        return;
    }
    // 20 services of 5 backends each, then a run of changes of every kind.
    let mut svcs: Services = (0..20)
        .map(|s| (s, (0..5).map(|b| (s * 5 + b, 1)).collect()))
        .collect();
    let mut steps = vec![svcs.clone()];
    svcs[3].1[0].0 = 900; // one backend replaced
    steps.push(svcs.clone());
    svcs.remove(5); // a service removed
    steps.push(svcs.clone());
    svcs.push((40, vec![(901, 1), (902, 1)])); // a service added
    steps.push(svcs.clone());
    svcs[0].1[1].1 = 3; // a weight changed
    steps.push(svcs.clone());
    let saved = svcs[6].1.clone();
    svcs[6].1.clear(); // all backends gone...
    steps.push(svcs.clone());
    svcs[6].1 = saved; // ...and back
    steps.push(svcs.clone());
    svcs[7].1.pop(); // a backend removed, then the same address back (its id again,
                     // no conntrack sweep having come between)
    steps.push(svcs.clone());
    svcs[7].1.push((39, 1));
    steps.push(svcs.clone());
    steps.push(svcs.clone()); // nothing changes

    let mut live = Fixture::new().unwrap();
    // Each service's backends when its table was last built: backends that go and
    // come back before a sweep get their ids again, and their table is still there.
    let mut built: std::collections::BTreeMap<_, _> = Default::default();
    for (i, step) in steps.iter().enumerate() {
        let cfg = config(step);
        let summary = live.apply(&cfg).unwrap();
        let mut fresh = Fixture::new().unwrap();
        fresh.apply(&cfg).unwrap();
        assert_eq!(
            tables(&live),
            tables(&fresh),
            "step {i}: tables differ from a fresh apply"
        );
        let want: usize = step.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(
            backends_in_map(&mut live),
            want,
            "step {i}: backend entries"
        );
        // Only the tables whose inputs changed are written.
        let changed = step
            .iter()
            .filter(|s| !s.1.is_empty() && built.get(&s.0) != Some(&s.1))
            .count();
        assert_eq!(summary.tables_written, changed, "step {i}: {summary:?}");
        for (svc, backends) in step.iter().filter(|s| !s.1.is_empty()) {
            built.insert(*svc, backends.clone());
        }
        // Once the replaced generations are collected, each service has one table
        // (kept while it has no backends, for when they come back).
        live.dp.collect_retired().unwrap();
        assert_eq!(
            maglev_chunks_in_map(&mut live),
            step.len() * maglev_chunks(2039) as usize,
            "step {i}: Maglev chunks left behind"
        );
    }
}

#[test]
fn privileged_map_sizes_are_chosen_at_load_and_enforced_before_writing() {
    if !privileged() {
        return;
    }
    let opts = LoadOptions {
        max_services: 8,
        max_backends: 20,
        ..Default::default()
    };
    let mut f = Fixture::with_options(&opts).unwrap();
    assert_eq!((f.dp.max_services, f.dp.max_backends), (8, 20));
    let fits: Vec<_> = (0..8)
        .map(|s| (s, vec![(s * 2, 1), (s * 2 + 1, 1)]))
        .collect();
    f.apply(&config(&fits)).unwrap();
    let before = tables(&f);

    let too_many: Vec<_> = (0..9).map(|s| (s, vec![(s, 1)])).collect();
    let e = format!("{:#}", f.apply(&config(&too_many)).unwrap_err());
    assert!(
        e.contains("9 services, the maps hold 8 (--max-services)"),
        "{e}"
    );
    let too_many_backends: Vec<_> = (0..7)
        .map(|s| (s, vec![(s * 3, 1), (s * 3 + 1, 1), (s * 3 + 2, 1)]))
        .collect();
    let e = format!("{:#}", f.apply(&config(&too_many_backends)).unwrap_err());
    assert!(
        e.contains("21 backends in all, the maps hold 20 (--max-backends)"),
        "{e}"
    );
    assert_eq!(tables(&f), before, "a rejected config changed the maps");

    // Beyond the default of 256 when asked for.
    let opts = LoadOptions {
        max_services: 300,
        ..Default::default()
    };
    let mut big = Fixture::with_options(&opts).unwrap();
    let many: Vec<_> = (0..300).map(|s| (s, vec![(s, 1)])).collect();
    let cfg = config(&many);
    big.apply(&cfg).unwrap();
    assert_eq!(tables(&big).len(), 300);
}

/// Each backend entry carries its service's mode (an established flow reaches its
/// backend through its conntrack entry, without the service), and a mode change
/// rewrites the entries in place, under the same ids.
#[test]
fn privileged_backends_carry_their_service_mode_through_a_change() {
    if !privileged() {
        return;
    }
    let config = |modes: [Mode; 3]| xlb_tests::natlab::config_with_modes(&modes);
    let modes_in_map = |f: &mut Fixture| -> BTreeMap<u32, (u32, u8)> {
        let m: aya::maps::Array<_, Backend> =
            aya::maps::Array::try_from(f.dp.ebpf.map(MAP_BACKENDS).unwrap()).unwrap();
        xlb::dataplane::live_backends(&m)
            .unwrap()
            .into_iter()
            .map(|(id, b)| (id, (b.addr[0], b.mode())))
            .collect()
    };
    let by_service = |m: &BTreeMap<u32, (u32, u8)>| -> Vec<u8> {
        // Backends 172.16.i.x: the third octet is the service's number.
        let mut out = vec![u8::MAX; 3];
        for (addr, mode) in m.values() {
            let s = addr.to_ne_bytes()[2] as usize;
            assert!(out[s] == u8::MAX || out[s] == *mode, "one mode per service");
            out[s] = *mode;
        }
        out
    };
    use lb_common::{MODE_DNAT, MODE_DSR, MODE_NAT};
    let mut f = Fixture::new().unwrap();
    f.apply(&config([Mode::Nat, Mode::Dnat, Mode::Dsr]))
        .unwrap();
    let before = modes_in_map(&mut f);
    assert_eq!(before.len(), 6);
    assert_eq!(by_service(&before), [MODE_NAT, MODE_DNAT, MODE_DSR]);
    f.apply(&config([Mode::Dsr, Mode::Nat, Mode::Dnat]))
        .unwrap();
    let after = modes_in_map(&mut f);
    assert_eq!(by_service(&after), [MODE_DSR, MODE_NAT, MODE_DNAT]);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same backend ids, rewritten in place"
    );
}

/// `conntrack: false` reaches the real service entries (SVC_F_STATELESS, read back by
/// `xlb status`'s reader), and flipping it rewrites the entries in place: same ids, no
/// table or backend written.
#[test]
fn privileged_conntrack_false_marks_the_service_entry_and_a_flip_rewrites_it_alone() {
    if !privileged() {
        return;
    }
    let config = |stateless: bool| {
        Cfg::new()
            .maglev_table_size(2039)
            .service(
                Svc::udp("dns", "10.200.0.1", 53)
                    .mode(Mode::Dsr)
                    .conntrack(!stateless)
                    .backends(["172.16.0.1:53", "172.16.0.2:53"]),
            )
            .service(
                Svc::udp("dns-dnat", "10.200.0.2", 53)
                    .mode(Mode::Dnat)
                    .conntrack(!stateless)
                    .backends(["172.16.1.1:5353"]),
            )
            .service(Svc::tcp("web", "10.200.0.3", 80).backends(["172.16.2.1:8080"]))
            .config()
    };
    let shown = |f: &Fixture| -> BTreeMap<String, (u32, bool)> {
        xlb::status::read_services(f.pin_path())
            .unwrap()
            .into_iter()
            .map(|s| (s.name, (s.id, s.stateless)))
            .collect()
    };
    let mut f = Fixture::new().unwrap();
    f.apply(&config(true)).unwrap();
    let on = shown(&f);
    let flags: Vec<bool> = on.values().map(|(_, s)| *s).collect();
    assert_eq!(flags, [true, true, false], "dns, dns-dnat, web: {on:?}");
    let chunks = maglev_chunks_in_map(&mut f);

    let summary = f.apply(&config(false)).unwrap();
    let off = shown(&f);
    assert!(off.values().all(|(_, s)| !s), "{off:?}");
    assert_eq!(
        off.values().map(|(id, _)| *id).collect::<Vec<_>>(),
        on.values().map(|(id, _)| *id).collect::<Vec<_>>(),
        "the same service ids"
    );
    assert_eq!(summary.tables_written, 0, "{summary:?}");
    assert_eq!(summary.backends_added + summary.backends_removed, 0);
    assert_eq!(maglev_chunks_in_map(&mut f), chunks);
    // And back.
    f.apply(&config(true)).unwrap();
    assert_eq!(shown(&f), on);
}
