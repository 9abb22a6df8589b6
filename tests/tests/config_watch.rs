//! The watched config file (read once a second) reads the way SIGHUP does: bounded by
//! --max-config-bytes, regular files only, and never blocking the control loop. A path
//! swapped for a device or a FIFO is rejected, logged once, and the agent keeps serving,
//! keeps answering signals, and keeps /healthz at 200. Issue 27, item 1.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::Agent,
    privileged,
    topology::{LbLab, Network, VIP4},
    traffic::connect,
};

/// `GET path` on the agent's default metrics address, from inside the LB namespace:
/// the status code and the body.
fn get(lab: &LbLab, path: &'static str) -> (u16, String) {
    lab.lb
        .run(move || {
            let addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut r = String::new();
            s.read_to_string(&mut r).unwrap();
            let code = r.split_whitespace().nth(1).unwrap().parse().unwrap();
            let body = r.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
            (code, body)
        })
        .unwrap()
}

/// The process's resident set, in kB, from /proc/PID/status.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A file of the test's own, removed on drop (even after a panic).
struct RemoveFileOnDrop(std::path::PathBuf);

impl Drop for RemoveFileOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn start(lab: &LbLab) -> Agent {
    lab.agent().xdp_mode("generic").start().unwrap()
}

fn backends_programmed(agent: &Agent) -> usize {
    xlb::status::read_services(&agent.pin_path)
        .unwrap()
        .iter()
        .filter(|s| s.vip == VIP4 && s.port == 80)
        .map(|s| s.backends.len())
        .sum()
}

#[test]
fn privileged_config_path_swapped_for_dev_zero_is_rejected_with_bounded_memory() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(60)).unwrap();
    let mut agent = start(&lab);
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut conn = connect(&lab.client, vip);
    assert_eq!(conn.exchange("before").unwrap(), 0);
    let rss_before = rss_kb(agent.pid());

    // Swapped in atomically (a symlink, renamed over the file): the watcher sees the
    // file, then /dev/zero, never a missing path.
    let tmp = lab.config_path.with_extension("zero");
    let _tmp = RemoveFileOnDrop(tmp.clone());
    std::os::unix::fs::symlink("/dev/zero", &tmp).unwrap();
    std::fs::rename(&tmp, &lab.config_path).unwrap();
    // 5 s of watching: the resident set stays bounded. Before the fix the watcher read
    // /dev/zero without end (10.7 GB in 20 s): stop it at once, not at drop.
    const LIMIT_KB: u64 = 200 * 1024;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut peak = rss_before;
    while Instant::now() < deadline {
        peak = peak.max(rss_kb(agent.pid()));
        if peak > LIMIT_KB {
            let _ = agent.stop_with(libc::SIGKILL);
            panic!(
                "the agent's RSS reached {peak} kB reading /dev/zero (started at {rss_before} kB)"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "RSS {rss_before} kB before, {peak} kB at most over 5 s of /dev/zero at the config path"
    );
    // Rejected, said once (not once a second), and the running state kept.
    agent
        .wait_for_log("config file rejected", Duration::from_secs(5))
        .unwrap();
    let logs = agent.logs();
    assert!(logs.contains("not a regular file"), "{logs}");
    assert_eq!(
        agent.count_log("config file rejected"),
        1,
        "logged once per problem:\n{logs}"
    );
    assert_eq!(conn.exchange("during").unwrap(), 0, "the flow is kept");
    assert_eq!(connect(&lab.client, vip).exchange("new").unwrap(), 0);
    let (code, body) = get(&lab, "/healthz");
    assert_eq!(code, 200, "{body}");
    // SIGHUP reads the same way: rejected too.
    assert!(agent.reload().is_err());
}

#[test]
fn privileged_a_fifo_at_the_config_path_does_not_block_the_control_loop() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(2).unwrap();
    lab.write_config(&[0]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(60)).unwrap();
    let mut agent = start(&lab);
    assert_eq!(backends_programmed(&agent), 1);

    let tmp = lab.config_path.with_extension("fifo");
    let _tmp = RemoveFileOnDrop(tmp.clone());
    nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::S_IRUSR).unwrap();
    std::fs::rename(&tmp, &lab.config_path).unwrap();
    // Longer than /healthz's limit (10 s): a loop blocked in open() would fail it.
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        let (code, body) = get(&lab, "/healthz");
        assert_eq!(code, 200, "with a FIFO at the config path: {body}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let logs = agent.logs();
    assert!(
        logs.contains("config file rejected") && logs.contains("not a regular file"),
        "{logs}"
    );
    assert_eq!(agent.count_log("config file rejected"), 1, "{logs}");

    // A good file back in place, and a SIGHUP: applied.
    lab.write_config(&[0, 1]).unwrap();
    agent.reload().unwrap();
    assert_eq!(backends_programmed(&agent), 2);
    let (code, body) = get(&lab, "/healthz");
    assert_eq!(code, 200, "{body}");
}

/// A config file emptied in place (truncated, as a failed write or `: > file` leaves
/// it) would parse as the defaults, which serve nothing: it is rejected, and the
/// services kept. A file that says it serves nothing (`services: []`) is applied, with
/// a warning that every service went.
#[test]
fn privileged_an_emptied_config_file_is_rejected_and_the_services_kept() {
    if !privileged() {
        return;
    }
    // As a user's network is: no static neighbours, `snat: auto`, default flags.
    let lab = LbLab::two_arm_on(1, Network::AsDeployed).unwrap();
    lab.write_config(&[0]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(60)).unwrap();
    let mut agent = lab.agent().start().unwrap();
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut conn = connect(&lab.client, vip);
    assert_eq!(conn.exchange("before").unwrap(), 0);
    let programmed = backends_programmed(&agent);
    assert_eq!(programmed, 1);

    for emptied in ["", "\n\n", "# nothing yet\n---\n"] {
        let before = agent.count_log("the file is empty");
        std::fs::write(&lab.config_path, emptied).unwrap();
        agent
            .wait_for_log_count("the file is empty", before + 1, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{emptied:?}: {e:#}\n{}", agent.logs()));
        assert_eq!(backends_programmed(&agent), programmed, "{emptied:?}: kept");
        assert_eq!(conn.exchange("during").unwrap(), 0, "{emptied:?}: the flow");
        assert_eq!(connect(&lab.client, vip).exchange("new").unwrap(), 0);
        // SIGHUP reads it the same way.
        assert!(agent.reload().is_err(), "{emptied:?}: SIGHUP");
        assert_eq!(backends_programmed(&agent), programmed);
    }
    assert!(
        agent.logs().contains("services: []"),
        "the error says how to serve nothing"
    );

    // Said on purpose: applied, and the removal is a warning.
    lab.replace_config("services: []\n").unwrap();
    agent.reload().unwrap();
    assert_eq!(backends_programmed(&agent), 0);
    assert!(
        agent.logs().contains("every service it had is removed"),
        "{}",
        agent.logs()
    );
}
