//! A signal while `xlb run` starts: start-up waits up to 5 s for the backends'
//! neighbours to resolve, and a SIGTERM or SIGINT then must neither kill the agent
//! silently nor leave the maps it pinned. Maps an earlier agent pinned (a running
//! datapath it adopts) are left as they were.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::{capture_stderr, log_time, xlb_bin, Start},
    netns::Netns,
    privileged, unique_name, RemoveOnDrop,
};

/// A namespace with one interface and a config whose backend, on that interface's
/// subnet, never answers ARP: start-up waits for it.
fn setup() -> (Netns, std::path::PathBuf, RemoveOnDrop) {
    let ns = Netns::new("sg").unwrap();
    ns.ip(&["link", "add", "s0", "type", "veth", "peer", "name", "s1"])
        .unwrap();
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "s0"])
        .unwrap();
    ns.ip(&["link", "set", "s0", "up"]).unwrap();
    ns.ip(&["link", "set", "s1", "up"]).unwrap();
    let cfg = std::env::temp_dir().join(format!("{}.yaml", unique_name("xsg")));
    std::fs::write(
        &cfg,
        "services:\n  - {name: web, vip: 192.0.2.10, port: 80, protocol: tcp, backends: [{address: \"10.77.0.9:80\"}]}\n",
    )
    .unwrap();
    let guard = RemoveOnDrop(cfg.clone());
    (ns, cfg, guard)
}

/// Starts `xlb run`, sends `sig` once the program is loaded (start-up is then waiting
/// for the neighbour), and returns the exit status and the log.
fn signal_during_start(
    ns: &Netns,
    cfg: &std::path::Path,
    pin: &std::path::Path,
    sig: i32,
) -> (std::process::ExitStatus, String) {
    let (status, log, _) = signal_at(ns, (cfg, pin), sig, ("XDP program loaded", true));
    (status, log)
}

/// `xlb run` in `ns`, once its log says `at`: the process and its log so far and to come.
fn spawn_until(
    ns: &Netns,
    (cfg, pin): (&std::path::Path, &std::path::Path),
    at: &str,
) -> (
    std::process::Child,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut child = ns
        .command(xlb_bin().unwrap().to_str().unwrap())
        .args(["run", "--iface", "s0", "--metrics-addr", "off", "--config"])
        .arg(cfg)
        .arg("--pin-path")
        .arg(pin)
        .env("RUST_LOG", "info,xlb::dataplane=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = capture_stderr(&mut child).unwrap();
    let text = || log.lock().unwrap().join("\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text().contains(at) {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("never said {at:?}:\n{}", text());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, log)
}

/// Sends `sig` to `child` and waits for it to exit, 15 s at most (then it is killed
/// and the test fails with the log).
fn signal_and_wait(
    child: &mut std::process::Child,
    sig: i32,
    text: &dyn Fn() -> String,
) -> std::process::ExitStatus {
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(child.id() as i32, sig) };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("xlb did not exit after signal {sig}:\n{}", text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `xlb run` and sends `sig` once its log says `at` (then, if `waiting`, half a
/// second later, when start-up must still be waiting for the neighbour); the exit
/// status, the log, and the time from the signal to the exit.
fn signal_at(
    ns: &Netns,
    (cfg, pin): (&std::path::Path, &std::path::Path),
    sig: i32,
    (at, waiting): (&str, bool),
) -> (std::process::ExitStatus, String, Duration) {
    let (mut child, log) = spawn_until(ns, (cfg, pin), at);
    let text = || log.lock().unwrap().join("\n");
    if waiting {
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !text().contains("xlb running"),
            "start-up did not wait:\n{}",
            text()
        );
    }
    let signalled = Instant::now();
    let status = signal_and_wait(&mut child, sig, &text);
    let took = signalled.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    (status, text(), took)
}

fn pinned_maps(pin: &std::path::Path) -> usize {
    std::fs::read_dir(pin)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("XLB_"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn privileged_a_signal_during_start_up_removes_what_the_start_pinned() {
    if !privileged() {
        return;
    }
    let (ns, cfg, _cfg_guard) = setup();
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xsg")));
        let _guard = RemoveOnDrop(pin.clone());
        let (status, log) = signal_during_start(&ns, &cfg, &pin, sig);
        assert!(status.success(), "{name}: exit {status}:\n{log}");
        assert!(
            log.contains("stopped during start-up") && log.contains(name),
            "{name}: the log says what happened:\n{log}"
        );
        assert_eq!(pinned_maps(&pin), 0, "{name}: no map left pinned:\n{log}");
    }
}

#[test]
fn privileged_a_signal_during_start_up_leaves_an_adopted_datapath() {
    if !privileged() {
        return;
    }
    let (ns, cfg, _cfg_guard) = setup();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xsg")));
    let _guard = RemoveOnDrop(pin.clone());
    // An earlier agent with no backend to wait for, stopped by SIGTERM: its datapath
    // stays pinned and attached.
    let empty = std::env::temp_dir().join(format!("{}.yaml", unique_name("xsg")));
    let _empty_guard = RemoveOnDrop(empty.clone());
    std::fs::write(&empty, "services: []\n").unwrap();
    let mut first = Start::new(&ns, "s0")
        .metrics_addr("off")
        .config(&empty)
        .pin_path(&pin)
        .start()
        .unwrap();
    assert!(first.stop_with(libc::SIGTERM).unwrap().success());
    let before = pinned_maps(&pin);
    assert!(before > 0 && pin.join("link_s0").exists());
    let (status, log) = signal_during_start(&ns, &cfg, &pin, libc::SIGTERM);
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("left as it was"), "{log}");
    assert_eq!(pinned_maps(&pin), before, "the adopted maps stay");
    assert!(
        pin.join("link_s0").exists(),
        "the earlier agent's attachment stays"
    );
}

/// A signal while the verifier checks the program: the verifier gives up a load when a
/// signal is pending on its thread, and the loader then tried again with the
/// verifier's log on (about 4 s a try here): the stop came 12 s late. The load now runs
/// on a thread that does not take the stop signals, so it completes as usual and the
/// start stops right after it.
#[test]
fn privileged_a_signal_during_the_programs_load_stops_the_start_when_it_loads() {
    if !privileged() {
        return;
    }
    let (ns, cfg, _cfg_guard) = setup();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xsg")));
    let _guard = RemoveOnDrop(pin.clone());
    let (status, log, took) = signal_at(
        &ns,
        (&cfg, &pin),
        libc::SIGTERM,
        ("loading the XDP program", false),
    );
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("stopped during start-up"), "{log}");
    assert_eq!(pinned_maps(&pin), 0, "no map left pinned:\n{log}");
    // The log's own times: from the line before the load to the program loaded.
    let load = between(&log, "loading the XDP program", "XDP program loaded");
    println!("signal to exit {took:?}; the load itself {load:?}");
    // And the start stopped at the load's end, not after the neighbour wait (5 s).
    assert!(
        took < load + Duration::from_secs(2),
        "stopped {took:?} after the signal, the load took {load:?}:\n{log}"
    );
    // The load was not started over with the verifier's log: it took no longer than
    // one more plain load would (a verbose retry alone takes seconds), measured against
    // this machine's own load in the same test.
    let (_, calm, _) = signal_at(
        &ns,
        (&cfg, &pin),
        libc::SIGTERM,
        ("XDP program loaded", true),
    );
    let plain = between(&calm, "loading the XDP program", "XDP program loaded");
    assert!(
        load < plain * 2 + Duration::from_millis(500),
        "a load interrupted by a signal took {load:?}, a plain one {plain:?}:\n{log}"
    );
    assert_eq!(pinned_maps(&pin), 0);
}

/// The time between the first log lines holding `from` and `to`, by their timestamps.
fn between(log: &str, from: &str, to: &str) -> Duration {
    let at = |needle: &str| {
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"));
        log_time(line).unwrap_or_else(|| panic!("no timestamp in {line:?}"))
    };
    Duration::from_secs_f64(at(to) - at(from))
}

/// A SIGHUP during start-up (a reload racing a restart) neither ends the agent by its
/// default action nor stops the start: the agent comes up and reads the file again.
#[test]
fn privileged_a_sighup_during_start_up_is_a_reload_once_running() {
    if !privileged() {
        return;
    }
    let (ns, cfg, _cfg_guard) = setup();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xsg")));
    let _guard = RemoveOnDrop(pin.clone());
    let (mut child, log) = spawn_until(&ns, (&cfg, &pin), "loading the XDP program");
    let text = || log.lock().unwrap().join("\n");
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text().contains("config reloaded") {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("xlb ended ({st}) on a SIGHUP during start-up:\n{}", text());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the SIGHUP was never taken as a reload:\n{}", text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(text().contains("xlb running"), "{}", text());
    let status = signal_and_wait(&mut child, libc::SIGINT, &text);
    assert!(status.success(), "{status}:\n{}", text());
    assert_eq!(pinned_maps(&pin), 0, "SIGINT removes the pins");
}
