use super::*;
use crate::model::{Mode, Snat};

const GOOD: &str = "
snat:
  ipv4: 10.0.0.1
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

#[test]
fn parses_the_documented_shape() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.services[0].backends[0].weight, 2);
    assert_eq!(c.services[0].backends[1].weight, 1);
    assert_eq!(c.services[0].mode, Mode::Nat);
    assert_eq!(c.maglev_table_size, 16381);
}

#[test]
fn the_example_in_deploy_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/xlb.example.yaml");
    let c = Config::load(Path::new(path)).unwrap();
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.services[0].backends[2].weight, 0);
}

fn err(text: &str) -> String {
    format!("{:#}", Config::parse(text).unwrap_err())
}

#[test]
fn errors_are_specific() {
    let e = err(&GOOD.replace("protocol: tcp", "protocol: sctp"));
    assert!(e.contains("sctp") && e.contains("line"), "{e}");
    let e = err(&GOOD.replace("198.51.100.3:8080", "198.51.100.3"));
    assert!(e.contains("line"), "{e}");
    let e = err(&GOOD.replace("198.51.100.3:8080", "\"[2001:db8::1]:80\""));
    assert!(
        e.contains("backends[1].address") && e.contains("IPv6"),
        "{e}"
    );
    let e = err(&GOOD.replace("port: 80", "port: 0"));
    assert!(e.contains("field port"), "{e}");
    let e = err(&format!("maglev_table_size: 1000\n{GOOD}"));
    assert!(
        e.contains("maglev_table_size") && e.contains("not prime"),
        "{e}"
    );
    let e = err(&GOOD.replace("198.51.100.3:8080", "198.51.100.2:8080"));
    assert!(e.contains("duplicate backend"), "{e}");
    let e = err(&GOOD.replace("ipv4: 10.0.0.1", "ipv4: 10.0.0.x"));
    assert!(e.contains("neither `auto` nor an address"), "{e}");
}

/// Each accepted-before piece of nonsense now gets a specific message with a line.
#[test]
fn nonsense_is_rejected_with_field_and_line() {
    let cases: &[(&str, &str, &str)] = &[
        ("vip: 192.0.2.10", "vip: 0.0.0.0", "unspecified"),
        ("vip: 192.0.2.10", "vip: 224.0.0.5", "multicast"),
        ("vip: 192.0.2.10", "vip: 255.255.255.255", "broadcast"),
        ("vip: 192.0.2.10", "vip: 10.0.0.1", "also the SNAT address"),
        ("ipv4: 10.0.0.1", "ipv4: 239.1.1.1", "multicast"),
        ("ipv4: 10.0.0.1", "ipv4: 0.0.0.0", "unspecified"),
        ("name: web", "name: \"\"", "field name: empty"),
        ("port: 80", "port: 70000", "port 70000 is out of range"),
        (
            "    backends:",
            "    health_check: {type: tcp, path: /healthz}\n    backends:",
            "given for a tcp check",
        ),
    ];
    for (from, to, want) in cases {
        let e = err(&GOOD.replacen(from, to, 1));
        assert!(e.contains(want), "{to}: {e}");
        assert!(e.contains("line "), "{to}: no line in {e}");
        assert!(!e.contains("error: "), "{to}: {e}");
    }
    let e = err(&format!("maglev_table_size: 131071\n{GOOD}"));
    assert!(
        e.contains("line 1") && e.contains("maglev_table_size"),
        "{e}"
    );
    let e = err(&format!(
        "timeouts: {{tcp_idle: 1, tcp_closing: 1, udp_idle: 1, gc_interval: 0}}\n{GOOD}"
    ));
    assert!(e.contains("line 1") && e.contains("gc_interval"), "{e}");
}

#[test]
fn snat_auto_is_the_default_and_can_be_said() {
    let plain = GOOD.replace("snat:\n  ipv4: 10.0.0.1\n", "");
    assert_eq!(Config::parse(&plain).unwrap().snat, Snat::default());
    let said = GOOD.replace("snat:\n  ipv4: 10.0.0.1\n", "snat: auto\n");
    assert_eq!(Config::parse(&said).unwrap().snat, Snat::default());
    let v4 = GOOD.replace("ipv4: 10.0.0.1", "ipv4: auto");
    assert_eq!(Config::parse(&v4).unwrap().snat.ipv4, None);
    let e = err(&GOOD.replace("snat:\n  ipv4: 10.0.0.1\n", "snat: masquerade\n"));
    assert!(e.contains("neither `auto` nor a table"), "{e}");
}

#[test]
fn a_backend_at_its_own_services_vip_and_port_is_rejected() {
    let e = err(&GOOD.replace("198.51.100.2:8080", "192.0.2.10:80"));
    assert!(
        e.contains("backends[0].address")
            && e.contains("192.0.2.10:80")
            && e.contains("own VIP and port"),
        "{e}"
    );
    let line = GOOD
        .lines()
        .position(|l| l.contains("198.51.100.2:8080"))
        .unwrap()
        + 1;
    assert!(e.contains(&format!("line {line}:")), "{e}");
    // The VIP on another port is a backend like any other.
    Config::parse(&GOOD.replace("198.51.100.2:8080", "192.0.2.10:8080")).unwrap();
}

#[test]
fn a_fifo_is_rejected_without_blocking() {
    let fifo = std::env::temp_dir().join(format!("xlb-fifo-{}.yaml", std::process::id()));
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // No writer ever comes: a blocking open would never return.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(format!("{:#}", Config::load(&path).unwrap_err()));
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(5));
    std::fs::remove_file(&fifo).ok();
    let e = got.expect("reading a FIFO blocked");
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn config_reads_are_bounded_and_regular_files_only() {
    let e = format!("{:#}", Config::load(Path::new("/dev/zero")).unwrap_err());
    assert!(e.contains("not a regular file"), "{e}");
    let dir = std::env::temp_dir().join(format!("xlb-big-{}.yaml", std::process::id()));
    std::fs::write(&dir, GOOD).unwrap();
    let e = format!("{:#}", Config::load_limited(&dir, 10).unwrap_err());
    std::fs::remove_file(&dir).ok();
    assert!(
        e.contains("more than the limit of 10") && e.contains("--max-config-bytes"),
        "{e}"
    );
}

#[test]
fn allow_is_validated_with_its_line_and_field() {
    let base = "services:\n  - name: web\n    vip: 192.0.2.10\n    port: 80\n    protocol: tcp\n";
    let ok = Config::parse(&format!(
        "{base}    allow: [10.0.0.0/8, \"2001:db8::/32\", 192.0.2.7]\n"
    ))
    .unwrap();
    let nets: Vec<String> = ok.services[0]
        .allow
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]);
    assert_eq!(
        ok.services[0].to_model().source_ranges().unwrap().len(),
        2,
        "only IPv4 ranges for an IPv4 VIP"
    );
    let e = format!(
        "{:#}",
        Config::parse(&format!("{base}    allow: [10.0.0.0/33]\n")).unwrap_err()
    );
    assert!(
        e.contains("allow[0]") && e.contains("10.0.0.0/33") && e.contains("line 6"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        Config::parse(&format!("{base}    allow: [\"2001:db8::/32\"]\n")).unwrap_err()
    );
    assert!(
        e.contains("field allow") && e.contains("no IPv4 range"),
        "{e}"
    );
    let open = Config::parse(&format!("{base}    allow: []\n")).unwrap();
    assert!(
        open.services[0].to_model().source_ranges().is_none(),
        "an empty list admits everyone"
    );
}

/// The caret's column in a rendered snippet, under the shown line's text, as the
/// column of that text in the source line (the shown line may be cropped with "…").
fn caret_under(e: &str, line: usize) -> String {
    let lines: Vec<&str> = e.lines().collect();
    let shown = lines
        .iter()
        .position(|l| l.starts_with(&format!("{line} | ")))
        .unwrap_or_else(|| panic!("no line {line} shown in {e}"));
    let text: Vec<char> = lines[shown].chars().collect();
    let caret: Vec<char> = lines[shown + 1].chars().collect();
    let at = caret
        .iter()
        .position(|&c| c == '^')
        .unwrap_or_else(|| panic!("no caret in {e}"));
    let len = caret[at..].iter().take_while(|&&c| c == '^').count();
    text[at..at + len].iter().collect()
}

#[test]
fn parse_errors_name_the_file_and_the_field_at_the_value() {
    let flow = "services:\n  - {name: web, vip: 192.0.2.10, port: 80, protocol: tcp, backends: [{address: \"198.51.100.2:8080\", weight: -1}]}\n";
    let col = flow.lines().nth(1).unwrap().find("-1").unwrap() + 1;
    let block = GOOD.replace("weight: 2", "weight: -1");
    let bline = block
        .lines()
        .position(|l| l.contains("weight: -1"))
        .unwrap()
        + 1;
    let bcol = block.lines().nth(bline - 1).unwrap().find("-1").unwrap() + 1;
    for (text, line, col) in [(flow.to_owned(), 2, col), (block, bline, bcol)] {
        let path =
            std::env::temp_dir().join(format!("xlb-weight-{}-{line}.yaml", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        let e = format!("{:#}", Config::load(&path).unwrap_err());
        std::fs::remove_file(&path).ok();
        // One location, said the same way in the message and in the snippet's header.
        assert!(
            e.contains(&format!("line {line} column {col}: ")),
            "{col}: {e}"
        );
        assert!(
            e.contains(&format!("--> {}:{line}:{col}\n", path.display())),
            "{e}"
        );
        assert!(!e.contains("<input>"), "{e}");
        assert!(
            e.contains("services[0].backends[0].weight: -1 is not a weight (0 to 4294967295"),
            "{e}"
        );
        assert_eq!(caret_under(&e, line), "-1", "{e}");
    }
    // Other values that are not weights, at the value too.
    for (bad, shown) in [
        ("abc", "\"abc\""),
        ("1.5", "1.5"),
        ("4294967296", "4294967296"),
    ] {
        let e = err(&GOOD.replace("weight: 2", &format!("weight: {bad}")));
        assert!(
            e.contains(&format!(
                "services[0].backends[0].weight: {shown} is not a weight"
            )),
            "{e}"
        );
        assert_eq!(caret_under(&e, 11), bad, "{e}");
        assert!(e.contains("--> (config text):11:17"), "{e}");
    }
    // Other fields are named where the value is the error's location.
    let e = err(&GOOD.replace("port: 80", "port: 70000"));
    assert!(
        e.contains("services[0].port: port 70000 is out of range"),
        "{e}"
    );
    assert_eq!(caret_under(&e, 7), "70000", "{e}");
    // A weight that is one is still one.
    let ok = Config::parse(&GOOD.replace("weight: 2", "weight: 4294967295")).unwrap();
    assert_eq!(ok.services[0].backends[0].weight, u32::MAX);
}

#[test]
fn parse_error_snippets_are_clean_and_cropped() {
    // A long flow line: the window around the column, with the caret still under
    // the value; control characters from the file never reach the terminal.
    let pad = "x".repeat(300);
    let text = format!(
            "services:\n  - {{name: \"{pad}\", vip: 192.0.2.10, port: 80, protocol: tcp, backends: [{{address: \"198.51.100.2:8080\", weight: -7}}], comment: \"{pad}\"}}\n"
        );
    let e = err(&text);
    assert!(e.contains("weight: -7 is not a weight"), "{e}");
    assert_eq!(caret_under(&e, 2), "-7", "{e}");
    let shown = e.lines().find(|l| l.starts_with("2 | ")).unwrap();
    assert!(
        shown.starts_with("2 | …") && shown.ends_with('…'),
        "{shown}"
    );
    assert!(shown.chars().count() < 120, "{shown}");
    let e = err("services: [\u{7}\n");
    assert!(e.contains("1 | services: [\u{fffd}"), "{e:?}");
    assert!(!e.chars().any(|c| c.is_control() && c != '\n'), "{e:?}");
}

/// `conntrack: false`: on by default, accepted on dsr and dnat (the model and the
/// plan see it), refused on nat with why and where.
#[test]
fn conntrack_false_is_for_dsr_and_dnat_and_refused_on_nat_with_its_line() {
    let c = Config::parse(GOOD).unwrap();
    assert!(c.services[0].conntrack, "on unless said");
    assert!(c.services[0].to_model().conntrack);
    assert!(c.desired().services[0].conntrack);
    let with = |mode: &str, conntrack: &str| {
        GOOD.replace(
            "    protocol: tcp\n",
            &format!("    protocol: tcp\n    mode: {mode}\n    conntrack: {conntrack}\n"),
        )
        // dsr sends the packet unchanged: the backends listen on the service's port.
        .replace(":8080", ":80")
    };
    for mode in ["dsr", "dnat"] {
        let c = Config::parse(&with(mode, "false")).unwrap();
        assert!(!c.services[0].conntrack, "{mode}");
        assert!(!c.desired().services[0].conntrack, "{mode}");
        let c = Config::parse(&with(mode, "true")).unwrap();
        assert!(c.desired().services[0].conntrack, "{mode}");
    }
    // nat, said or by default: refused, with the reason and the line of `conntrack:`.
    Config::parse(&with("nat", "true")).unwrap();
    let text = with("nat", "false");
    let line = text
        .lines()
        .position(|l| l.contains("conntrack: false"))
        .unwrap()
        + 1;
    let no_mode = text.replace("    mode: nat\n", "");
    for text in [text, no_mode.clone()] {
        let e = err(&text);
        assert!(
            e.contains("services[0] (web): field conntrack: false is refused for mode nat")
                && e.contains("SNAT port")
                && e.contains("use mode dsr or dnat"),
            "{e}"
        );
        let line = text
            .lines()
            .position(|l| l.contains("conntrack: false"))
            .unwrap()
            + 1;
        assert!(e.starts_with(&format!("line {line}: ")), "{e}");
    }
    assert_eq!(line, 10);
    // Not a bool: the parser's error, at the field.
    let e = err(&with("dsr", "maybe"));
    assert!(e.contains("services[0].conntrack"), "{e}");
}

/// An empty file would parse as the defaults and serve nothing: refused, with the way
/// to say so on purpose. A file of settings alone is a config.
#[test]
fn an_empty_file_is_refused_and_says_how_to_serve_nothing() {
    for text in ["", "\n  \n", "# a comment\n", "---\n...\n"] {
        let e = format!("{:#}", Config::parse(text).unwrap_err());
        assert!(e.contains("the file is empty"), "{text:?}: {e}");
        assert!(e.contains("services: []"), "{text:?}: {e}");
    }
    assert!(Config::parse("services: []\n").unwrap().services.is_empty());
    assert!(Config::parse("decap: true\n").unwrap().decap);
}

/// A key given twice says so, without the parser's advice to its own caller.
#[test]
fn a_duplicate_key_is_named_plainly() {
    let e = format!(
        "{:#}",
        Config::parse("services:\n  - name: a\n    vip: 192.0.2.1\n    port: 80\n    port: 81\n    protocol: tcp\n    backends: []\n")
            .unwrap_err()
    );
    assert!(e.contains("duplicate"), "{e}");
    assert!(!e.contains("DuplicateKeyPolicy"), "{e}");
    assert!(e.contains("a key may be given once"), "{e}");
}

/// A boolean is `true` or `false` unquoted (YAML 1.1's unquoted yes/no too); a quoted
/// value, a number or null is refused with the field's name, not read as a boolean.
#[test]
fn booleans_are_booleans_not_strings() {
    let dnat = GOOD
        .replace("protocol: tcp", "protocol: tcp\n    mode: dnat")
        .replace(":8080", ":80");
    for (v, want) in [
        ("false", false),
        ("true", true),
        ("no", false),
        ("False", false),
    ] {
        let c = Config::parse(&dnat.replace(
            "protocol: tcp",
            &format!("protocol: tcp\n    conntrack: {v}"),
        ))
        .unwrap();
        assert_eq!(c.services[0].conntrack, want, "conntrack: {v}");
    }
    for v in [
        "\"no\"",
        "\"false\"",
        "'off'",
        "\"No \"",
        "0",
        "1",
        "null",
        "~",
        "[]",
        "{}",
    ] {
        let e = err(&dnat.replace(
            "protocol: tcp",
            &format!("protocol: tcp\n    conntrack: {v}"),
        ));
        // Named in the message's first line, not only in the quoted source line.
        let head = e.lines().next().unwrap_or_default();
        assert!(
            head.contains("conntrack") && head.contains("line"),
            "conntrack: {v}: {e}"
        );
    }
    for field in ["decap", "icmp_echo"] {
        let e = err(&format!("{field}: \"yes\"\n{GOOD}"));
        assert!(
            e.contains(field) && e.contains("not a boolean"),
            "{field}: {e}"
        );
    }
}

/// A missing or unknown key is not blamed on the key of the line the parser stopped at.
#[test]
fn a_missing_key_names_no_other_field() {
    let e = err(&GOOD.replace("    protocol: tcp\n", ""));
    let head = e.lines().next().unwrap_or_default();
    assert!(head.contains("protocol"), "{e}");
    assert!(!head.contains("backends:"), "{e}");
    let e = err(&GOOD.replace(
        "      - address: 198.51.100.3:8080\n",
        "      - weight: 3\n",
    ));
    let head = e.lines().next().unwrap_or_default();
    assert!(head.contains("address") && !head.contains("weight:"), "{e}");
}
