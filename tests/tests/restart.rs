//! Hitless restart: the agent stops (SIGTERM leaves the datapath pinned and running),
//! traffic keeps flowing with no agent at all, and a new agent adopts the pinned maps
//! and links. The new agent's config adds a backend, so Maglev alone would move some
//! flows: that none moves proves the conntrack entries survived the restart.

use std::{
    ffi::CString,
    net::{SocketAddr, UdpSocket},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::MapInfo;
use lb_common::{
    ConnValue, ConntrackBucket, FlowKey, ReverseBucket, ServiceKey, ServiceValue, MAP_CONNTRACK,
    MAP_REVERSE_NAT, MAP_SERVICES,
};
use xlb::dataplane::Dataplane;
use xlb_tests::natlab::{BACKENDS_V4, BACKENDS_V6};

use xlb_tests::{
    cfg::{Cfg, Mode, Svc},
    privileged,
    testrun::apply,
    topology::{LbLab, VIP4},
    traffic::{backend_index, connect, parse_reply, Conn},
    unique_name,
};

enum Flow {
    Tcp(Conn),
    Udp(UdpSocket),
}

fn exchange(flow: &mut Flow, udp_vip: SocketAddr, msg: &str) -> Result<usize, String> {
    match flow {
        Flow::Tcp(c) => c
            .exchange(msg)
            .map_err(|e| format!("TCP :{}: {e}", c.sport)),
        Flow::Udp(s) => {
            s.send_to(msg.as_bytes(), udp_vip)
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 256];
            let (n, _) = s.recv_from(&mut buf).map_err(|e| format!("UDP: {e}"))?;
            let (name, _) = parse_reply(&buf[..n]).ok_or("bad reply")?;
            Ok(backend_index(&name))
        }
    }
}

fn restart_keeps_every_flow(mode: &str) {
    let lab = LbLab::two_arm(3).unwrap();
    let life = Duration::from_secs(60);
    let servers = lab.start_backends(life).unwrap();
    let (pin, _cleanup) = own_pin_path();
    // Both agents on the same pins, with the same arguments.
    let agent = || lab.agent().xdp_mode(mode).pin_path(&pin);

    lab.write_config(&[0, 2]).unwrap();
    let mut first = agent().start().unwrap();
    let tcp_vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let udp_vip: SocketAddr = format!("{VIP4}:53").parse().unwrap();
    let mut flows = Vec::new();
    for _ in 0..16 {
        flows.push(Flow::Tcp(connect(&lab.client, tcp_vip)));
        let s = lab
            .client
            .run(|| UdpSocket::bind("0.0.0.0:0").unwrap())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        flows.push(Flow::Udp(s));
    }
    let backends: Vec<usize> = flows
        .iter_mut()
        .map(|f| exchange(f, udp_vip, "before").unwrap())
        .collect();
    assert!(!backends.contains(&1), "b1 is not configured yet");

    // SIGTERM: the agent exits, the datapath stays.
    let st = first.stop_with(libc::SIGTERM).unwrap();
    assert!(st.success(), "{}", first.logs());
    for (f, b) in flows.iter_mut().zip(&backends) {
        assert_eq!(
            exchange(f, udp_vip, "no-agent").unwrap(),
            *b,
            "with no agent running"
        );
    }

    // The new agent (with b1 added) starts while the flows keep talking.
    lab.write_config(&[0, 1, 2]).unwrap();
    let mut second = std::thread::scope(|scope| {
        let starter = scope.spawn(|| agent().start());
        let mut rounds = 0;
        while !starter.is_finished() && rounds < 500 {
            for (f, b) in flows.iter_mut().zip(&backends) {
                assert_eq!(
                    exchange(f, udp_vip, "during").unwrap(),
                    *b,
                    "during the restart"
                );
            }
            rounds += 1;
        }
        // Loading and verifying the program takes far longer than one round.
        assert!(
            rounds > 0,
            "no traffic was exchanged while the new agent started"
        );
        eprintln!(
            "{rounds} rounds of {} flows during the restart",
            flows.len()
        );
        starter.join().unwrap().unwrap()
    });
    assert!(
        second.logs().contains("adopted the existing attachment"),
        "{}",
        second.logs()
    );
    for (f, b) in flows.iter_mut().zip(&backends) {
        assert_eq!(
            exchange(f, udp_vip, "after").unwrap(),
            *b,
            "a flow moved across the restart"
        );
    }
    // New flows do use the new backend, so the new table is live.
    let mut saw_b1 = false;
    for _ in 0..30 {
        saw_b1 |= connect(&lab.client, tcp_vip).exchange("new").unwrap() == 1;
    }
    assert!(saw_b1, "new flows reach the added backend");
    let st = second.stop_with(libc::SIGINT).unwrap();
    assert!(st.success());
    drop(servers);
}

#[test]
fn privileged_restart_native_keeps_every_flow() {
    if !privileged() {
        return;
    }
    restart_keeps_every_flow("native");
}

#[test]
fn privileged_restart_generic_keeps_every_flow() {
    if !privileged() {
        return;
    }
    restart_keeps_every_flow("generic");
}

/// A pin directory of the test's own, removed when the guard drops.
fn own_pin_path() -> (PathBuf, xlb_tests::RemoveOnDrop) {
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbt")));
    (pin.clone(), xlb_tests::RemoveOnDrop(pin))
}

/// The bpf(2) syscall with `attr` as its attribute.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> libc::c_long {
    // SAFETY: `attr` is a valid, fully initialised attribute of the size given; what it
    // points to (a path) outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    }
}

/// Pins a map of the given type and sizes at `path`, as another xlb version would have
/// left it (created with the raw syscall: aya creates maps only from an object).
fn pin_raw_map(path: &Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    let create = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    let fd = bpf(BPF_MAP_CREATE, &create);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let pin = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    let rc = bpf(BPF_OBJ_PIN, &pin);
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// Upgrading across a change of map layout: pinned maps an older xlb left with another
/// type or value size are replaced (the program could not load against them), while
/// the compatible ones are adopted as they are. The flow tables: conntrack as the LRU
/// hash map xlb kept before its own table, reverse NAT as an array of buckets of
/// another size (another number of ways).
#[test]
fn privileged_pinned_maps_of_another_layout_are_replaced() {
    if !privileged() {
        return;
    }
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    let (pin, _cleanup) = own_pin_path();
    xlb::dataplane::ensure_bpffs(&pin).unwrap();
    let key = std::mem::size_of::<FlowKey>() as u32;
    // The conntrack layout before xlb's own flow table: an LRU hash map of flows.
    let value = std::mem::size_of::<ConnValue>() as u32;
    pin_raw_map(
        &pin.join(MAP_CONNTRACK),
        BPF_MAP_TYPE_LRU_HASH,
        key,
        value,
        64,
    );
    // A flow table of two-way buckets: a header line and two 128-byte ways.
    pin_raw_map(
        &pin.join(MAP_REVERSE_NAT),
        BPF_MAP_TYPE_ARRAY,
        4,
        64 + 2 * 128,
        64,
    );
    pin_raw_map(
        &pin.join(MAP_SERVICES),
        BPF_MAP_TYPE_HASH,
        std::mem::size_of::<ServiceKey>() as u32,
        std::mem::size_of::<ServiceValue>() as u32,
        64,
    );
    let services_id = MapInfo::from_pin(pin.join(MAP_SERVICES)).unwrap().id();

    let mut dp = Dataplane::load(&pin, &Default::default())
        .expect("loads over pinned maps of an older layout");
    for (map, bucket) in [
        (MAP_CONNTRACK, std::mem::size_of::<ConntrackBucket>()),
        (MAP_REVERSE_NAT, std::mem::size_of::<ReverseBucket>()),
    ] {
        let info = MapInfo::from_pin(pin.join(map)).unwrap();
        assert_eq!(
            info.map_type().unwrap(),
            aya::maps::MapType::Array,
            "{map} replaced"
        );
        assert_eq!(info.value_size() as usize, bucket, "{map} replaced");
    }
    // Replaced at the size asked for (the default), and mapped by the agent.
    let flows = (lb_common::buckets_for(lb_common::CONNTRACK_MAX) as usize) * lb_common::FLOW_WAYS;
    assert_eq!(dp.conntrack().unwrap().capacity(), flows);
    assert_eq!(dp.reverse_nat().unwrap().capacity(), flows);
    assert_eq!(dp.conntrack().unwrap().occupied(), 0);
    assert_eq!(
        MapInfo::from_pin(pin.join(MAP_SERVICES)).unwrap().id(),
        services_id,
        "the compatible map is adopted, not replaced"
    );
    // And the datapath works on them: a service can be applied.
    apply(
        &mut dp,
        &xlb_tests::natlab::config(&BACKENDS_V4, &BACKENDS_V6),
    )
    .unwrap();
    assert!(xlb::dataplane::drop_incompatible_pins(&pin)
        .unwrap()
        .is_empty());
}

/// Upgrading across a change of the VIP filter (its word size and hash changed, so the
/// pinned map is replaced and starts empty): the upgraded agent's load rebuilds it from
/// the pinned services before anything is attached, so packets for the VIPs are not
/// passed to the kernel until its first apply.
#[test]
fn privileged_an_upgrade_rebuilds_a_replaced_vip_filter_from_the_services() {
    if !privileged() {
        return;
    }
    use lb_common::{VipFilterWord, MAP_VIP_FILTER};
    let (pin, _cleanup) = own_pin_path();
    let filter = |dp: &mut Dataplane| -> Vec<VipFilterWord> {
        let m: aya::maps::Array<_, VipFilterWord> =
            aya::maps::Array::try_from(dp.ebpf.map(MAP_VIP_FILTER).unwrap()).unwrap();
        m.iter().map(Result::unwrap).collect()
    };
    let keys = {
        let mut dp = Dataplane::load(&pin, &Default::default()).unwrap();
        apply(
            &mut dp,
            &xlb_tests::natlab::config(&BACKENDS_V4, &BACKENDS_V6),
        )
        .unwrap();
        let services: aya::maps::HashMap<_, ServiceKey, ServiceValue> =
            aya::maps::HashMap::try_from(dp.ebpf.map(MAP_SERVICES).unwrap()).unwrap();
        let keys: Vec<ServiceKey> = services.keys().map(Result::unwrap).collect();
        assert!(keys.len() >= 2, "the lab's services are in the map");
        assert_eq!(filter(&mut dp), xlb::codec::vip_filter(keys.clone()));
        keys
    };
    // What an upgrade across a filter change does before the new program loads.
    std::fs::remove_file(pin.join(MAP_VIP_FILTER)).unwrap();
    let mut dp = Dataplane::load(&pin, &Default::default()).unwrap();
    let words = filter(&mut dp);
    for k in &keys {
        let (word, mask) = lb_common::hash::vip_filter_slot(lb_common::hash::vip_filter_bit(
            &k.vip, k.port, k.proto,
        ));
        assert_ne!(words[word as usize] & mask, 0, "{k:?}'s bit is set again");
    }
    assert_eq!(words, xlb::codec::vip_filter(keys), "and no other bit");
    assert_eq!(
        dp.restore_derived_state().unwrap(),
        Default::default(),
        "a second pass changes nothing"
    );
}

/// Upgrading across a change of the datapath's settings (XLB_CONFIG replaced, so
/// empty): zeroed settings would time every flow out and give new flows SNAT port 0.
/// An agent that waits for its first Kubernetes sync writes them from its config file
/// first, with what depends on the services (dnat in use) read from the pinned maps.
#[test]
fn privileged_an_upgrade_that_emptied_the_settings_gets_them_before_the_first_sync() {
    if !privileged() {
        return;
    }
    use lb_common::{DatapathConfig, MAP_CONFIG};
    let (pin, _cleanup) = own_pin_path();
    let settings = |dp: &mut Dataplane| -> DatapathConfig {
        let m: aya::maps::Array<_, DatapathConfig> =
            aya::maps::Array::try_from(dp.ebpf.map(MAP_CONFIG).unwrap()).unwrap();
        m.get(&0, 0).unwrap()
    };
    let cfg = Cfg::new()
        .snat4("10.30.0.1")
        .snat_ports(40000, 50000)
        .service(Svc::tcp("n", "10.200.0.1", 80).backends(["172.16.0.1:80"]))
        .service(
            Svc::tcp("d", "10.200.0.2", 80)
                .mode(Mode::Dnat)
                .backends(["172.16.1.1:80"]),
        )
        .config();
    let want = {
        let mut dp = Dataplane::load(&pin, &Default::default()).unwrap();
        apply(&mut dp, &cfg).unwrap();
        settings(&mut dp)
    };
    assert_eq!(want.dnat_in_use, 1);
    assert_eq!(want.snat_port_min, 40000);
    assert_ne!(want.tcp_idle_timeout_s, 0);
    std::fs::remove_file(pin.join(MAP_CONFIG)).unwrap();
    let mut dp = Dataplane::load(&pin, &Default::default()).unwrap();
    assert_eq!(
        settings(&mut dp),
        DatapathConfig::default(),
        "replaced: empty"
    );
    // The file's part of the config: the services come from Kubernetes.
    let mut base = cfg.clone();
    base.services.clear();
    assert!(dp.seed_config(&base.settings()).unwrap());
    assert_eq!(settings(&mut dp), want, "as the last apply wrote them");
    assert!(
        !dp.seed_config(&base.settings()).unwrap(),
        "settings already there are left alone"
    );
}

/// Upgrading across new counters: the global statistics array an older xlb pinned has
/// fewer entries, with the same layout otherwise. Adopted as it is, the new counters
/// would never count (the program's lookups past its end fail) and reading them would
/// fail. A fixed-size map of another size is replaced like one of another layout.
#[test]
fn privileged_a_pinned_statistics_map_with_fewer_counters_is_replaced() {
    if !privileged() {
        return;
    }
    use lb_common::{Counter, MAP_GLOBAL_STATS, STAT_COUNT};
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let (pin, _cleanup) = own_pin_path();
    xlb::dataplane::ensure_bpffs(&pin).unwrap();
    pin_raw_map(
        &pin.join(MAP_GLOBAL_STATS),
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        std::mem::size_of::<Counter>() as u32,
        STAT_COUNT - 3,
    );
    let _dp = Dataplane::load(&pin, &Default::default()).unwrap();
    let info = MapInfo::from_pin(pin.join(MAP_GLOBAL_STATS)).unwrap();
    assert_eq!(info.max_entries(), STAT_COUNT, "a counter for every index");
    let counters = xlb::counters::read_global_counters(&pin).expect("every counter reads");
    assert_eq!(counters.len(), STAT_COUNT as usize);
}

/// Operator-sized maps far below the defaults: 1024 flows, 8 services, 64 backends.
fn small_maps() -> xlb::dataplane::LoadOptions {
    xlb::dataplane::LoadOptions {
        conntrack_max: 1024,
        max_services: 8,
        max_backends: 64,
        ..Default::default()
    }
}

/// The maps the operator sizes (`--conntrack-max`, `--max-services`, `--max-backends`)
/// keep the size they were created with when the next agent asks for another: they are
/// adopted with their contents, not taken for maps of another version.
#[test]
fn privileged_maps_sized_by_the_operator_are_adopted_at_any_size() {
    if !privileged() {
        return;
    }
    let (pin, _cleanup) = own_pin_path();
    let small = small_maps();
    let ids = |pin: &Path| -> Vec<u32> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(pin).unwrap() {
            let path = entry.unwrap().path();
            if let Ok(info) = MapInfo::from_pin(&path) {
                ids.push(info.id());
            }
        }
        ids.sort();
        ids
    };
    let before = {
        let mut dp = Dataplane::load(&pin, &small).unwrap();
        apply(
            &mut dp,
            &xlb_tests::natlab::config(&BACKENDS_V4, &BACKENDS_V6),
        )
        .unwrap();
        ids(&pin)
    };
    assert!(before.len() >= 10, "the maps are pinned: {before:?}");
    let dp = Dataplane::load(&pin, &Default::default()).unwrap();
    assert_eq!(ids(&pin), before, "every pinned map adopted, none replaced");
    assert_eq!(
        (dp.conntrack_max, dp.max_services, dp.max_backends),
        (1024, 8, 64)
    );
}

/// A map made beside adopted ones of its group (its pin removed by hand, or replaced
/// for its layout) takes the adopted ones' size, not the flags': the two flow tables
/// stay one size, and a service map's companions the services map's.
#[test]
fn privileged_a_lost_pin_is_made_again_at_its_groups_adopted_size() {
    if !privileged() {
        return;
    }
    let (pin, _cleanup) = own_pin_path();
    let small = small_maps();
    drop(Dataplane::load(&pin, &small).unwrap());
    let size = |name: &str| MapInfo::from_pin(pin.join(name)).unwrap().max_entries();
    // Each flow table in turn, with a service companion and a backend one.
    for (lost, companions) in [
        (
            lb_common::MAP_REVERSE_NAT,
            [lb_common::MAP_SERVICE_STATS, lb_common::MAP_BACKEND_STATS],
        ),
        (
            lb_common::MAP_CONNTRACK,
            [lb_common::MAP_SERVICE_NAMES, lb_common::MAP_BACKEND_TUNNELS],
        ),
        // The groups' first maps themselves (replaced for their layout by an upgrade,
        // say): sized by their adopted companions.
        (
            lb_common::MAP_REVERSE_NAT,
            [MAP_SERVICES, lb_common::MAP_BACKENDS],
        ),
    ] {
        for name in [lost].iter().chain(&companions) {
            std::fs::remove_file(pin.join(name)).unwrap();
        }
        let dp = Dataplane::load(&pin, &Default::default()).unwrap();
        assert_eq!(
            (dp.conntrack_max, dp.max_services, dp.max_backends),
            (1024, 8, 64)
        );
        assert_eq!(
            size(lb_common::MAP_CONNTRACK),
            size(lb_common::MAP_REVERSE_NAT),
            "{lost} made again at the other table's size"
        );
        assert_eq!(dp.conntrack_buckets, dp.reverse_buckets);
        assert_eq!(size(companions[0]), 8, "{}", companions[0]);
        assert_eq!(size(companions[1]), 64, "{}", companions[1]);
        drop(dp);
    }
}
