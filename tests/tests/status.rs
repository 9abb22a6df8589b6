//! `xlb status` as an operator reads it: the XDP mode of each attachment, named where
//! it can be told and explained where it cannot, and announcements with a time and age.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use xlb_tests::{
    agent::xlb_bin,
    netns::Netns,
    privileged,
    topology::{LbLab, VIP4},
    traffic::connect,
    unique_name, RemoveOnDrop,
};

/// `xlb status ARGS --pin-path PIN`, in `ns` (only its network namespace joined) or in
/// the test's own.
fn status(ns: Option<&Netns>, pin: &std::path::Path, json: bool) -> String {
    let bin = xlb_bin().unwrap();
    let mut cmd = match ns {
        Some(ns) => ns.command(bin.to_str().unwrap()),
        None => std::process::Command::new(&bin),
    };
    cmd.arg("status").arg("--pin-path").arg(pin);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "xlb status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn privileged_status_names_the_xdp_mode_and_when_announced() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbst")));
    let _c = RemoveOnDrop(pin.clone());
    let iface = lab.iface_arg();
    let ifaces: Vec<&str> = iface.split(',').collect();
    let mut agent = lab
        .agent()
        .xdp_mode("generic")
        .args(&["--announce-routes-table", "200"])
        .pin_path(&pin)
        .start()
        .unwrap();

    // In the agent's namespace: generic, in the text and in JSON.
    let text = status(Some(&lab.lb), &pin, false);
    for i in &ifaces {
        assert!(
            text.contains(&format!("attached to {i} (generic XDP")),
            "{i}:\n{text}"
        );
    }
    assert!(!text.contains("unknown"), "{text}");
    let st: serde_json::Value = serde_json::from_str(&status(Some(&lab.lb), &pin, true)).unwrap();
    let att = st["attachments"].as_array().unwrap();
    assert_eq!(att.len(), ifaces.len(), "{st:#}");
    for a in att {
        assert_eq!(a["xdp_mode"], "generic", "{st:#}");
        assert!(a["xdp_mode_unknown"].is_null(), "{st:#}");
    }
    // The conntrack table's flows, read through its mapping: none yet, then the one
    // a connection makes.
    assert_eq!(st["flows"]["entries"], 0, "{st:#}");
    assert_eq!(st["flows"]["max"], st["conntrack_max"], "{st:#}");
    let _servers = lab.start_backends(Duration::from_secs(30)).unwrap();
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    connect(&lab.client, vip).exchange("counted").unwrap();
    let after: serde_json::Value =
        serde_json::from_str(&status(Some(&lab.lb), &pin, true)).unwrap();
    assert!(
        after["flows"]["entries"].as_u64().unwrap() >= 1,
        "{:#}",
        after["flows"]
    );
    let flows_line = status(Some(&lab.lb), &pin, false);
    assert!(
        flows_line.contains(&format!(
            "flows in the conntrack table: {} of {}",
            after["flows"]["entries"], after["flows"]["max"]
        )),
        "{flows_line}"
    );
    // The kernel agrees (ip -d link says xdpgeneric).
    for i in &ifaces {
        let l = String::from_utf8(lab.lb.ip(&["link", "show", i]).unwrap().stdout).unwrap();
        assert!(l.contains("xdpgeneric"), "{l}");
    }

    // Announced: a UTC time (as date(1) writes it) and an age, not epoch seconds.
    let announced = st["announced"].as_array().unwrap();
    assert!(!announced.is_empty(), "the VIP is announced: {st:#}");
    for a in announced {
        let since = a["since"].as_u64().unwrap();
        let by_date = std::process::Command::new("date")
            .args(["-u", "-d", &format!("@{since}"), "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .unwrap();
        let by_date = String::from_utf8(by_date.stdout).unwrap();
        assert_eq!(a["since_utc"], by_date.trim(), "{st:#}");
        assert!(a["age_s"].as_u64().unwrap() < 120, "{st:#}");
        let line = format!(
            "announced {} (route in table 200, since {}, ",
            a["vip"].as_str().unwrap(),
            by_date.trim()
        );
        assert!(
            text.contains(&line) && text.contains(" s ago)"),
            "{line}\n{text}"
        );
    }
    assert!(!text.contains("after the epoch"), "{text}");

    // From the test's own namespace the mode cannot be told: said why, and where to ask.
    let pid = agent.pid();
    let text = status(None, &pin, false);
    for i in &ifaces {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("attached to {i} ")))
            .unwrap_or_else(|| panic!("{i}:\n{text}"));
        assert!(
            line.contains("XDP mode unknown")
                && line.contains(&format!(
                    "the agent (pid {pid}) runs in another network namespace"
                ))
                && line.contains(&format!("nsenter --net=/proc/{pid}/ns/net xlb status")),
            "{line}"
        );
    }
    let st: serde_json::Value = serde_json::from_str(&status(None, &pin, true)).unwrap();
    for a in st["attachments"].as_array().unwrap() {
        assert_eq!(a["xdp_mode"], "unknown", "{st:#}");
        assert!(
            a["xdp_mode_unknown"]
                .as_str()
                .is_some_and(|w| w.contains("another network namespace")),
            "{st:#}"
        );
    }
    agent.stop_with(libc::SIGINT).unwrap();
}
