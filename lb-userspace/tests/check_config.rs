//! `xlb check-config`: the real binary's message for each class of error, and success.

use std::process::Command;

const GOOD: &str = "snat:
  ipv4: 10.0.0.1
  ipv6: \"fd00::1\"
services:
  - name: web
    vip: 192.0.2.10
    port: 80
    protocol: tcp
    backends:
      - address: 198.51.100.2:8080
        weight: 2
      - address: 198.51.100.3:8080
";

/// Runs check-config on `text`; returns (success, combined output).
fn check(text: &str) -> (bool, String) {
    check_with(text, &[])
}

fn check_with(text: &str, args: &[&str]) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("xlb-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{:x}.yaml",
        text.len() * 31 + text.bytes().map(|b| b as usize).sum::<usize>()
    ));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xlb"))
        .arg("check-config")
        .args(args)
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    // Fails while another test of this process still has a file there; the last one
    // out removes it.
    let _ = std::fs::remove_dir(&dir);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains(path.to_str().unwrap()) || out.status.success(),
        "error names the file: {all}"
    );
    (out.status.success(), all)
}

fn rejects(text: &str, needles: &[&str]) {
    let (ok, msg) = check(text);
    assert!(!ok, "accepted a bad file:\n{text}");
    for n in needles {
        assert!(msg.contains(n), "message lacks {n:?}:\n{msg}");
    }
}

#[test]
fn accepts_a_good_file() {
    let (ok, msg) = check(GOOD);
    assert!(ok && msg.contains("ok (1 services, 2 backends)"), "{msg}");
}

#[test]
fn each_class_of_error_gets_a_specific_message() {
    // Syntax and types: line and column from the YAML parser.
    rejects(&GOOD.replace("port: 80", "port: [80"), &["line"]);
    rejects(
        &GOOD.replace("protocol: tcp", "protocol: sctp"),
        &["line 8", "sctp"],
    );
    rejects(
        &GOOD.replace("    port: 80", "    port: 80\n    mode: dsr"),
        &["line", "dsr"],
    );
    rejects(
        &GOOD.replace("198.51.100.3:8080", "198.51.100.3"),
        &["line 12"],
    );
    rejects(&GOOD.replace("weight: 2", "weight: two"), &["line 11"]);
    rejects(
        &GOOD.replace("    port: 80", "    port: 80\n    colour: blue"),
        &["colour"],
    );
    // Semantics: the field path.
    rejects(
        &GOOD.replace("port: 80", "port: 0"),
        &["line 7: services[0] (web)", "field port", "port 0"],
    );
    rejects(
        &GOOD.replace("198.51.100.3:8080", "198.51.100.3:0"),
        &["backends[1].address", "port 0"],
    );
    rejects(
        &GOOD.replace("198.51.100.3:8080", "\"[2001:db8::3]:8080\""),
        &["line 12:", "backends[1].address", "IPv6", "IPv4"],
    );
    rejects(
        &GOOD.replace("198.51.100.3:8080", "198.51.100.2:8080"),
        &["line 12:", "backends[1].address", "duplicate backend"],
    );
    let twice = format!(
        "{GOOD}{}",
        &GOOD[GOOD.find("  - name").unwrap()..].replace("name: web", "name: web2")
    );
    rejects(
        &twice,
        &[
            "line 13: services[1] (web2)",
            "duplicate service 192.0.2.10:80/tcp",
        ],
    );
    rejects(
        &format!("maglev_table_size: 16383\n{GOOD}"),
        &["maglev_table_size", "16383 is not prime"],
    );
    rejects(
        &format!("maglev_table_size: 131071\n{GOOD}"),
        &["line 1", "maglev_table_size", "between 251 and 65537"],
    );
    // Leaving the SNAT address out is `snat: auto`; a multicast one is nonsense.
    rejects(
        &GOOD.replace("ipv4: 10.0.0.1", "ipv4: 224.0.0.1"),
        &["field snat", "multicast"],
    );
    let hc = |h: &str| {
        GOOD.replace(
            "    protocol: tcp\n",
            &format!("    protocol: tcp\n    health_check: {h}\n"),
        )
    };
    assert!(check(&hc("{type: http, path: /healthz}")).0);
    rejects(&hc("{type: icmp}"), &["line", "icmp"]);
    rejects(
        &hc("{type: tcp, interval_ms: 100, timeout_ms: 500}"),
        &["health_check", "timeout_ms"],
    );
    rejects(
        &hc("{type: tcp, fall: 0}"),
        &["health_check", "rise and fall"],
    );
    rejects(
        &hc("{type: http, path: healthz}"),
        &["health_check.path", "must start with /"],
    );
    let mut many = String::from("snat: {ipv4: 10.0.0.1}\nservices:\n");
    for i in 0..300 {
        many.push_str(&format!(
            "  - {{name: s{i}, vip: 192.0.2.1, port: {}, protocol: tcp}}\n",
            i + 1
        ));
    }
    rejects(
        &many,
        &["field services", "300 services, the maps hold 256"],
    );
    // The same file fits maps sized for it.
    let (ok, out) = check_with(&many, &["--max-services", "512"]);
    assert!(ok, "{out}");
    assert!(out.contains("ok (300 services"), "{out}");
}

/// `conntrack: false`: accepted on dsr and dnat, refused on nat with why, at the line of
/// `conntrack:`.
#[test]
fn conntrack_false_is_refused_on_nat_only() {
    let with = |mode: &str| {
        GOOD.replace(
            "    protocol: tcp\n",
            &format!("    protocol: udp\n    mode: {mode}\n    conntrack: false\n"),
        )
        .replace(":8080", ":80")
    };
    for mode in ["dsr", "dnat"] {
        let (ok, msg) = check(&with(mode));
        assert!(
            ok && msg.contains("ok (1 services, 2 backends)"),
            "{mode}: {msg}"
        );
    }
    rejects(
        &with("nat"),
        &[
            "line 10: services[0] (web)",
            "field conntrack: false is refused for mode nat",
            "SNAT port",
            "use mode dsr or dnat",
        ],
    );
}
