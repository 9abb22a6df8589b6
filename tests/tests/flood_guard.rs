//! The flood guard through BPF_PROG_TEST_RUN, on one CPU (the window is per CPU):
//! with `flood_guard.new_flows_per_cpu: 100`, the first 100 new flows in a second get
//! conntrack entries; above that, nat flows are dropped (`drop_flood_nat`) and dsr and
//! dnat flows are forwarded by Maglev alone (`event_flood_stateless`) to the backend
//! Maglev names, with no entry. Established flows keep being forwarded with their own
//! translation throughout, and a second later new flows get entries again.

use std::{net::IpAddr, time::Duration};

use lb_common::PROTO_TCP;
use xlb::config::Config;
use xlb_tests::{
    cfg::{Cfg, Svc},
    natlab::*,
    packet::{decode, Frame, ACK},
    testrun::{Fixture, XDP_DROP, XDP_REDIRECT},
};

const LIMIT: usize = 100;
const FLOOD: usize = 300;
const ESTABLISHED: usize = 5;

fn config(mode: &str) -> Config {
    Cfg::new()
        .flood_guard(LIMIT as u32)
        .maglev_table_size(M)
        .snat4("10.20.0.1")
        .snat6("fd20::1")
        .service(
            Svc::tcp("web", "192.0.2.10", 80)
                .mode(xlb_tests::cfg::mode(mode))
                .backends(BACKENDS_V4.iter().map(|b| b.replace(":8080", ":80"))),
        )
        .config()
}

fn entries(f: &Fixture) -> usize {
    f.dp.conntrack().unwrap().entries().count()
}

/// Where a forwarded frame goes and as whom: (outer destination for dsr, else the
/// rewritten destination, and the source port the backend sees).
fn translation(mode: &str, out: &[u8]) -> (IpAddr, u16) {
    if mode == "dsr" {
        let d = IpAddr::from([out[30], out[31], out[32], out[33]]);
        // The inner packet is the client's, unchanged.
        (d, u16::from_be_bytes([out[34 + 20], out[35 + 20]]))
    } else {
        let d = decode(out).unwrap();
        (d.dst, d.sport)
    }
}

/// Pins this thread to the CPU it is on: the guard counts per CPU.
fn stay_on_this_cpu() {
    // SAFETY: sched_getcpu has no preconditions; the set is ours and fully initialised.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn privileged_flood_guard_makes_no_entries_above_the_rate() {
    in_lab(|lab| {
        stay_on_this_cpu();
        for mode in ["nat", "dsr", "dnat"] {
            let mut f = Fixture::new().unwrap();
            f.apply(&config(mode)).unwrap();
            let backends: Vec<String> = BACKENDS_V4
                .iter()
                .map(|b| b.replace(":8080", ":80"))
                .collect();
            let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
            // Established flows first (they count towards this second's new flows).
            let est: Vec<(Frame, (IpAddr, u16))> = (0..ESTABLISHED)
                .map(|i| {
                    let syn = Frame::tcp("10.10.0.5", 40000 + i as u16, "192.0.2.10", 80);
                    let r = f.run_on(&syn.build(), lab.client_if).unwrap();
                    assert_eq!(r.verdict, XDP_REDIRECT, "{mode}");
                    (syn.flags(ACK), translation(mode, &r.data))
                })
                .collect();
            let (mut forwarded, mut dropped) = (0, 0);
            for i in 0..FLOOD {
                // A new source address each: a flood from random sources.
                let src = format!("10.10.{}.{}", 1 + i / 250, 1 + i % 250);
                let syn = Frame::tcp(&src, 1024 + i as u16, "192.0.2.10", 80);
                let r = f.run_on(&syn.build(), lab.client_if).unwrap();
                match r.verdict {
                    XDP_REDIRECT => {
                        forwarded += 1;
                        let want = predicted_backend(&backends, &syn, PROTO_TCP);
                        assert_eq!(
                            translation(mode, &r.data).0,
                            want.ip(),
                            "{mode}: SYN {i} to the Maglev backend"
                        );
                    }
                    XDP_DROP => dropped += 1,
                    v => panic!("{mode}: SYN {i}: verdict {v}"),
                }
                // The established flows, in the middle of the flood: unchanged.
                if i % 50 == 0 {
                    for (ack, was) in &est {
                        let r = f.run_on(&ack.build(), lab.client_if).unwrap();
                        assert_eq!(r.verdict, XDP_REDIRECT, "{mode}: established, SYN {i}");
                        assert_eq!(
                            translation(mode, &r.data),
                            *was,
                            "{mode}: established flow moved"
                        );
                    }
                }
            }
            let above = FLOOD + ESTABLISHED - LIMIT;
            if mode == "nat" {
                assert_eq!((forwarded, dropped), (FLOOD - above, above), "nat");
                assert_eq!(counter(&f, "drop_flood_nat"), above as u64);
                assert_eq!(counter(&f, "event_flood_stateless"), 0);
            } else {
                assert_eq!((forwarded, dropped), (FLOOD, 0), "{mode}");
                assert_eq!(counter(&f, "event_flood_stateless"), above as u64);
                assert_eq!(counter(&f, "drop_flood_nat"), 0);
            }
            assert_eq!(entries(&f), LIMIT, "{mode}: entries only below the rate");

            // The next second: entries again.
            std::thread::sleep(Duration::from_millis(1100));
            let syn = Frame::tcp("10.10.9.9", 999, "192.0.2.10", 80);
            assert_eq!(
                f.run_on(&syn.build(), lab.client_if).unwrap().verdict,
                XDP_REDIRECT
            );
            assert_eq!(entries(&f), LIMIT + 1, "{mode}: the guard is off again");
        }
    });
}

#[test]
fn flood_guard_config_defaults_to_katrans_rate_and_zero_turns_it_off() {
    let c = Config::parse("services: []\n").unwrap();
    assert_eq!(c.flood_guard.new_flows_per_cpu, 125_000);
    let c = Config::parse("flood_guard: {new_flows_per_cpu: 0}\nservices: []\n").unwrap();
    assert_eq!(c.flood_guard.new_flows_per_cpu, 0);
    let e = Config::parse("flood_guard: {rate: 5}\nservices: []\n").unwrap_err();
    assert!(format!("{e:#}").contains("rate"), "{e:#}");
}
