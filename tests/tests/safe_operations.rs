//! Operations that must never hurt what is already there: `xlb detach` on the wrong
//! path, a second agent on the same pins, a start that fails, `status --json` with no
//! agent. Each of these did harm, or said something untrue, before it was fixed.

use std::path::PathBuf;

use xlb_tests::{
    agent::xlb_cmd, netns::Netns, privileged, topology::LbLab, unique_name, RemoveOnDrop,
};

#[test]
fn privileged_detach_removes_only_xlbs_pins_on_a_bpffs() {
    if !privileged() {
        return;
    }
    // A plain directory with someone's data: refused, nothing removed.
    let plain = std::env::temp_dir().join(unique_name("xlbplain"));
    std::fs::create_dir_all(&plain).unwrap();
    let _c1 = RemoveOnDrop(plain.clone());
    std::fs::write(plain.join("data.db"), b"precious").unwrap();
    let out = xlb_cmd(&["detach", "--pin-path", plain.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not on a bpf filesystem"), "{err}");
    assert_eq!(std::fs::read(plain.join("data.db")).unwrap(), b"precious");

    // A bpffs directory that holds something else besides: refused, all kept.
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbs")));
    let _c2 = RemoveOnDrop(pin.clone());
    let mut agent = lab.agent().pin_path(&pin).start().unwrap();
    agent.stop_with(libc::SIGTERM).unwrap();
    std::fs::create_dir(pin.join("someone-elses")).unwrap();
    let out = xlb_cmd(&["detach", "--pin-path", pin.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("someone-elses") && err.contains("refusing"),
        "{err}"
    );
    assert!(pin.join("XLB_SERVICES").exists(), "nothing was removed");
    // Once only xlb's pins are left, detach removes them and the directory.
    std::fs::remove_dir(pin.join("someone-elses")).unwrap();
    let out = xlb_cmd(&["detach", "--pin-path", pin.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pin.exists());
    let links = String::from_utf8(lab.lb.ip(&["link", "show"]).unwrap().stdout).unwrap();
    assert!(!links.contains("xdp"), "the program is detached:\n{links}");
}

#[test]
fn privileged_a_second_agent_on_the_same_pins_is_refused_by_name() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbk")));
    let _c = RemoveOnDrop(pin.clone());
    let first = lab.agent().pin_path(&pin).start().unwrap();
    let second = lab.agent().pin_path(&pin).start();
    let err = format!(
        "{:#}",
        second.err().expect("the second agent must not start")
    );
    assert!(
        err.contains("another xlb agent runs on") && err.contains(&format!("pid {}", first.pid())),
        "{err}"
    );
    // The first agent still owns the datapath: a reload applies.
    let mut first = first;
    lab.write_config(&[0]).unwrap();
    first.reload().unwrap();
}

#[test]
fn privileged_a_failed_start_leaves_nothing_behind_and_says_why() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("xf").unwrap();
    let cfg = std::env::temp_dir().join(format!("{}.yaml", unique_name("xlbf")));
    std::fs::write(&cfg, "services: []\n").unwrap();
    let cfg_s = cfg.to_str().unwrap().to_owned();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--iface", "nope0", "--config", &cfg_s],
            "no such interface in this network namespace",
        ),
        (&["--iface", "", "--config", &cfg_s], "empty interface name"),
        (&["--iface", "lo"], "--config <CONFIG>|--kubernetes"),
        (
            &["--iface", "lo", "--kubernetes"],
            "connecting to Kubernetes",
        ),
    ];
    for (args, want) in cases {
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbf")));
        let _c = RemoveOnDrop(pin.clone());
        let out = ns
            .command(xlb_tests::agent::xlb_bin().unwrap().to_str().unwrap())
            .arg("run")
            .arg("--pin-path")
            .arg(&pin)
            .args(args)
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!pin.exists(), "{args:?} left {} behind", pin.display());
    }
    std::fs::remove_file(&cfg).ok();
}

#[test]
fn status_json_without_an_agent_is_json() {
    let out = xlb_cmd(&[
        "status",
        "--json",
        "--pin-path",
        "/sys/fs/bpf/xlb-none-here",
    ])
    .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(
        v["error"].as_str().unwrap().contains("xlb-none-here"),
        "{v}"
    );
}

#[test]
fn privileged_sizes_of_adopted_maps_are_kept_warned_and_shown() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbz")));
    let _c = RemoveOnDrop(pin.clone());
    let agent = |ct: &str| {
        lab.agent()
            .args(&["--conntrack-max", ct])
            .pin_path(&pin)
            .start()
    };
    let mut first = agent("1000").unwrap();
    first.stop_with(libc::SIGTERM).unwrap();
    let mut second = agent("2000").unwrap();
    assert!(
        second.logs().contains("--conntrack-max is ignored"),
        "{}",
        second.logs()
    );
    // The first agent's table, in flows: 1000 rounded up to whole buckets (a power of
    // two of them, lb_common::buckets_for), which 2000 is not.
    let first_size = lb_common::buckets_for(1000) * lb_common::FLOW_WAYS as u32;
    assert_ne!(
        first_size,
        lb_common::buckets_for(2000) * lb_common::FLOW_WAYS as u32
    );
    assert_eq!(second.status().unwrap()["conntrack_max"], first_size);
    // Not given, the default is no request: nothing is said to be ignored (a table that
    // fell back to a smaller size would otherwise be warned about at every restart).
    second.stop_with(libc::SIGTERM).unwrap();
    let third = lab.agent().pin_path(&pin).start().unwrap();
    assert!(!third.logs().contains("is ignored"), "{}", third.logs());
    assert_eq!(third.status().unwrap()["conntrack_max"], first_size);
}

/// `ip netns exec` runs the agent in a mount namespace of its own, with a fresh /sys:
/// the bpffs it mounts there ends with it. It says so, and never promises on SIGTERM
/// that the datapath stays.
#[test]
fn privileged_a_private_bpffs_is_detected_and_no_false_promise_is_made() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let ns = lab.lb.name.clone();
    let mut agent = lab
        .agent()
        .wrapper(&["ip", "netns", "exec", &ns])
        .start()
        .unwrap();
    assert!(
        agent
            .logs()
            .contains("mount namespace of this process's own"),
        "{}",
        agent.logs()
    );
    agent.stop_with(libc::SIGTERM).unwrap();
    let logs = agent.logs();
    assert!(logs.contains("the datapath ends with it"), "{logs}");
    assert!(!logs.contains("stays attached and pinned"), "{logs}");
}

#[test]
fn privileged_detach_of_a_running_agents_pins_is_refused_by_name_unless_forced() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbd")));
    let _c = RemoveOnDrop(pin.clone());
    let mut agent = lab.agent().pin_path(&pin).start().unwrap();
    let pin_s = pin.to_str().unwrap();
    let pins = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&pin)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let before = pins();
    assert!(
        before.contains(&"XLB_SERVICES".to_owned())
            && before.iter().any(|p| p.starts_with("link_")),
        "{before:?}"
    );
    // Both commands that remove the pins refuse, name the agent, and remove nothing.
    for cmd in [
        &["detach", "--pin-path", pin_s][..],
        &["uninstall", "--pin-path", pin_s][..],
    ] {
        let out = xlb_cmd(cmd).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} succeeded: {err}");
        assert!(
            err.contains("an xlb agent runs on") && err.contains(&format!("pid {} ", agent.pid())),
            "{cmd:?}: {err}"
        );
        assert!(err.contains("--force"), "{cmd:?}: {err}");
        assert_eq!(pins(), before, "{cmd:?} removed something");
    }
    // The agent still owns the datapath: status reads it and a reload applies.
    agent.status().unwrap();
    lab.write_config(&[0]).unwrap();
    agent.reload().unwrap();
    // --force removes the pins anyway.
    let out = xlb_cmd(&["detach", "--force", "--pin-path", pin_s]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pin.exists(), "--force removed the pins: {:?}", pins());
    // The agent's own descriptors keep its links until it exits; then nothing is left.
    agent.stop_with(libc::SIGTERM).unwrap();
    let links = String::from_utf8(lab.lb.ip(&["link", "show"]).unwrap().stdout).unwrap();
    assert!(
        !links.contains("xdp"),
        "detached once the agent exited:\n{links}"
    );
}

/// `ip netns exec` gives xlb a private mount namespace with a fresh /sys: its pins
/// cannot outlive it, and the warning says how to run it instead (join only the
/// network namespace with nsenter), not to mount a bpffs on the host, which `ip netns
/// exec` would hide all the same.
#[test]
fn privileged_ip_netns_exec_warns_with_advice_that_works() {
    if !xlb_tests::privileged() {
        return;
    }
    let ns = xlb_tests::netns::Netns::new("nx").unwrap();
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .unwrap();
    ns.ip(&["link", "set", "d0", "up"]).unwrap();
    ns.ip(&["link", "set", "d1", "up"]).unwrap();
    // The host has a bpffs at /sys/fs/bpf (the tests pin there): ip netns exec hides it.
    let agent = xlb_tests::agent::Start::new(&ns, "d0")
        .args(&["--decap"])
        .wrapper(&["ip", "netns", "exec", &ns.name])
        .start()
        .unwrap();
    let logs = agent.logs();
    assert!(
        logs.contains("nsenter --net=/run/netns/NAME"),
        "the warning names the way that keeps the pins:\n{logs}"
    );
    assert!(
        !logs.contains("in the host's namespace before `ip netns exec`"),
        "the old advice, which does not work, is gone:\n{logs}"
    );
    assert!(
        !agent.pin_path.exists(),
        "the pins are in a private bpffs, invisible to the host"
    );
}
