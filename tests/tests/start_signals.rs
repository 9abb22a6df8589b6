//! A signal while `xlb run` starts: start-up waits up to 5 s for the backends'
//! neighbours to resolve, and a SIGTERM or SIGINT then must neither kill the agent
//! silently nor leave the maps it pinned. Maps an earlier agent pinned (a running
//! datapath it adopts) are left as they were.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::{capture_stderr, xlb_bin, Start},
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
    let mut child = ns
        .command(xlb_bin().unwrap().to_str().unwrap())
        .args(["run", "--iface", "s0", "--metrics-addr", "off", "--config"])
        .arg(cfg)
        .arg("--pin-path")
        .arg(pin)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = capture_stderr(&mut child).unwrap();
    let text = || log.lock().unwrap().join("\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text().contains("XDP program loaded") {
        assert!(Instant::now() < deadline, "never loaded:\n{}", text());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !text().contains("xlb running"),
        "start-up did not wait:\n{}",
        text()
    );
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(child.id() as i32, sig) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("xlb did not exit after the signal:\n{}", text());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100));
    (status, text())
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
