//! Metrics over real HTTP, checked against the traffic sent: per-service and
//! per-backend new flows, datapath reasons, conntrack occupancy, config applies,
//! /healthz and /readyz.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use xlb_tests::{
    privileged,
    topology::{LbLab, VIP4},
    traffic::connect,
};

const METRICS: &str = "127.0.0.1:9464";

/// GET `path` from the agent's metrics server, inside the LB namespace.
fn get(lab: &LbLab, path: &str) -> (u16, String) {
    let (code, _, body) = request(lab, path, "*/*");
    (code, body)
}

/// GET /metrics with `accept`; returns the content type and the body.
fn scrape(lab: &LbLab, accept: &str) -> (String, String) {
    let (_, ctype, body) = request(lab, "/metrics", accept);
    (ctype, body)
}

/// GET `path` with `accept`: the status code, the content type and the body.
fn request(lab: &LbLab, path: &str, accept: &str) -> (u16, String, String) {
    let (path, accept) = (path.to_owned(), accept.to_owned());
    lab.lb
        .run(move || {
            let mut s =
                TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(5))
                    .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).unwrap();
            let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
            let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
            let ctype = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-type: ")
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            (code, ctype, body.to_owned())
        })
        .unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn privileged_metrics_agree_with_the_traffic_sent() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(3).unwrap();
    lab.write_config(&[0, 1, 2]).unwrap();
    let life = Duration::from_secs(30);
    let servers = lab.start_backends(life).unwrap();
    let mut agent = lab
        .agent()
        .xdp_mode("generic")
        .metrics_addr(METRICS)
        .start()
        .unwrap();
    assert_eq!(get(&lab, "/healthz").0, 200);
    assert_eq!(get(&lab, "/readyz").0, 200);

    const FLOWS: usize = 25;
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut per_backend = [0u64; 3];
    for i in 0..FLOWS - 1 {
        let b = connect(&lab.client, vip)
            .exchange(&format!("m{i}"))
            .unwrap();
        per_backend[b] += 1;
    }
    // The watched file: a broken write is rejected (the running state stays), the
    // fixed file is applied, with no signal sent.
    let good = std::fs::read_to_string(&lab.config_path).unwrap();
    lab.replace_config("services: [").unwrap();
    agent
        .wait_for_log("config reload rejected", Duration::from_secs(10))
        .unwrap();
    // Still balancing with the state from before the bad file (the last of FLOWS flows).
    per_backend[connect(&lab.client, vip)
        .exchange("still")
        .expect("running state kept")] += 1;
    lab.replace_config(&good).unwrap();
    agent
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .unwrap();

    let (code, text) = get(&lab, "/metrics");
    assert_eq!(code, 200, "{text}");
    // Series carry the service's name as well as its address.
    let svc = format!("xlb_service_new_flows_total{{service=\"tcp-v4\",vip=\"{VIP4}\",port=\"80\",protocol=\"tcp\"}}");
    assert_eq!(value(&text, &svc), FLOWS as f64);
    for (i, n) in per_backend.iter().enumerate() {
        let series = format!(
            "xlb_backend_new_flows_total{{service=\"tcp-v4\",vip=\"{VIP4}\",port=\"80\",protocol=\"tcp\",backend=\"10.40.{i}.2:8080\"}}"
        );
        assert_eq!(value(&text, &series), *n as f64, "backend b{i}");
        let weight = format!(
            "xlb_backend_weight{{service=\"tcp-v4\",vip=\"{VIP4}\",port=\"80\",protocol=\"tcp\",backend=\"10.40.{i}.2:8080\"}}"
        );
        assert_eq!(value(&text, &weight), 1.0, "backend b{i}'s weight");
    }
    assert!(
        value(&text, "xlb_datapath_packets_total{reason=\"fwd_forward\"}") >= 3.0 * FLOWS as f64
    );
    assert!(
        value(&text, "xlb_datapath_packets_total{reason=\"fwd_reverse\"}") >= 2.0 * FLOWS as f64
    );
    assert!(value(&text, "xlb_conntrack_entries") >= FLOWS as f64);
    assert_eq!(value(&text, "xlb_config_applies_total{result=\"ok\"}"), 2.0);
    assert_eq!(
        value(&text, "xlb_config_applies_total{result=\"rejected\"}"),
        1.0
    );
    assert_eq!(value(&text, "xlb_map_update_seconds_count"), 2.0);
    assert!(text.contains("xlb_build_info{version="), "{text}");
    // eBPF logging is off unless the filter asks for it.
    assert_eq!(agent.count_log("xlb::ebpf"), 0, "{}", agent.logs());

    // Every series the Grafana dashboard queries exists.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana-dashboard.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("xlb_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    text.lines().any(|l| l.starts_with(&name)),
                    "dashboard queries {name}, which is not exported"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 9, "dashboard queries checked: {checked}");

    // Draining b0 (weight 0) shows in status and metrics, with its weight.
    let b0 = format!("{{address: \"{}\"}}", lab.backend(0, false));
    assert!(good.contains(&b0), "{good}");
    let drained = good.replacen(
        &b0,
        &format!("{{address: \"{}\", weight: 0}}", lab.backend(0, false)),
        1,
    );
    lab.replace_config(&drained).unwrap();
    agent
        .wait_for_log_count("config reloaded", 2, Duration::from_secs(10))
        .unwrap();
    let st = agent.status().unwrap();
    let svc = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "tcp-v4")
        .unwrap_or_else(|| panic!("service tcp-v4 by name in {st:#}"));
    let drains: Vec<(String, bool, u64)> = svc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["draining"].as_bool().unwrap(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        drains,
        (0..3)
            .map(|i| (format!("10.40.{i}.2:8080"), i == 0, (i != 0) as u64))
            .collect::<Vec<_>>()
    );
    let (_, text) = get(&lab, "/metrics");
    let w0 = format!(
        "xlb_backend_weight{{service=\"tcp-v4\",vip=\"{VIP4}\",port=\"80\",protocol=\"tcp\",backend=\"10.40.0.2:8080\"}}"
    );
    assert_eq!(value(&text, &w0), 0.0);
    drop(servers);
}

/// With `xlb::ebpf=debug` in the filter, the XDP program's aya-log records reach the
/// agent's tracing output: one line per packet xlb handles, naming the flow and the
/// reason (by counter name), in both directions.
#[test]
fn privileged_ebpf_logs_reach_tracing_when_enabled() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(20)).unwrap();
    let mut agent = lab
        .agent()
        .xdp_mode("generic")
        .env("RUST_LOG", "info,xlb::ebpf=debug")
        .start()
        .unwrap();
    agent
        .wait_for_log("forwarding the XDP program's logs", Duration::from_secs(1))
        .unwrap();
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut conn = connect(&lab.client, vip);
    assert_eq!(conn.exchange("hello").unwrap(), 0);
    let forward = format!(
        "xdp {}:{} -> {VIP4}:80 proto=6 action=",
        lab.client4, conn.sport
    );
    agent
        .wait_for_log(&forward, Duration::from_secs(5))
        .unwrap();
    let logs = agent.logs();
    let line = logs.lines().find(|l| l.contains(&forward)).unwrap();
    assert!(line.contains("xlb::ebpf"), "{line}");
    assert!(line.ends_with("reason=fwd_forward"), "{line}");
    let backend = lab.backend(0, false);
    let reply = format!("xdp {backend} -> {}:", lab.snat4);
    agent.wait_for_log(&reply, Duration::from_secs(5)).unwrap();
    let logs = agent.logs();
    let line = logs.lines().find(|l| l.contains(&reply)).unwrap();
    assert!(line.ends_with("reason=fwd_reverse"), "{line}");
}

/// What Prometheus itself would make of the two bodies: the OpenMetrics one, served to a
/// scraper that asks for it, parses with Prometheus' reference parser (PyPI
/// prometheus-client); the text 0.0.4 one, served to the rest, lints clean with
/// promtool (Debian's prometheus), every counter with its type and help.
#[test]
fn privileged_metrics_negotiate_openmetrics_and_text_and_both_parse() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(3).unwrap();
    lab.write_config(&[0, 1, 2]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(30)).unwrap();
    let _agent = lab
        .agent()
        .xdp_mode("generic")
        .metrics_addr(METRICS)
        .start()
        .unwrap();
    // Some traffic, so that per-service and per-backend series exist.
    for i in 0..5 {
        let mut c = connect(&lab.client, SocketAddr::new(VIP4.parse().unwrap(), 80));
        c.exchange(&format!("m{i}")).unwrap();
    }
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (ctype, om) = scrape(&lab, prometheus_accept);
    assert!(
        ctype.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ctype}"
    );
    assert!(
        om.trim_end().ends_with("# EOF"),
        "an OpenMetrics body ends with # EOF"
    );
    let dir = std::env::temp_dir().join(xlb_tests::unique_name("xlbmet"));
    std::fs::create_dir_all(&dir).unwrap();
    let _rm = xlb_tests::RemoveOnDrop(dir.clone());
    std::fs::write(dir.join("om.txt"), &om).unwrap();
    let parsed = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; from prometheus_client.openmetrics.parser import text_string_to_metric_families as p; \
             fams = list(p(open(sys.argv[1]).read())); \
             counters = [f.name for f in fams if f.type == 'counter']; \
             print(len(fams), len(counters)); \
             assert all(f.documentation for f in fams)",
            dir.join("om.txt").to_str().unwrap(),
        ])
        .output()
        .expect("python3 (scripts/setup.sh installs prometheus-client)");
    assert!(
        parsed.status.success(),
        "the reference parser refused the OpenMetrics body: {}\n{om}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let counts: Vec<usize> = String::from_utf8_lossy(&parsed.stdout)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        counts[0] >= 10 && counts[1] >= 5,
        "families and counters parsed: {counts:?}"
    );

    let (ctype, text) = scrape(&lab, "text/plain");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"));
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup.sh installs Debian's prometheus)");
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "promtool: {problems}\n{text}"
    );
    // The same counter, by the name its samples carry, with its type.
    assert!(
        text.contains("# TYPE xlb_service_new_flows_total counter"),
        "{text}"
    );
}
