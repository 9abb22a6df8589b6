//! The cargo-fuzz targets' bodies (`xlb::fuzzing`), run on seeded mutations in every
//! CI run: a short fuzz run that needs neither nightly nor cargo-fuzz. Longer runs:
//! `cd fuzz && cargo +nightly fuzz run config_parse` (see docs/robustness.md).

use serde_json::{json, Value};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const CONFIG_MUTATIONS: usize = 20_000;
const K8S_MUTATIONS: usize = 5_000;

#[test]
fn config_parser_survives_mutated_files() {
    let example = include_str!("../../deploy/xlb.example.yaml");
    let seeds = [example, "services: []\n", "snat: {ipv4: 10.0.0.1}\nservices:\n  - {name: a, vip: 10.0.0.9, port: 80, protocol: tcp, backends: [{address: \"10.0.1.1:80\", weight: 2}]}\n"];
    let tokens: [&[u8]; 12] = [
        b":",
        b"-",
        b"{",
        b"}",
        b"[",
        b"]",
        b"\n  ",
        b"&a",
        b"*a",
        b"!!str",
        b"0x",
        b"99999999999",
    ];
    let mut rng = Rng(0x5eed_c0f1);
    let mut rejected = 0;
    for _ in 0..CONFIG_MUTATIONS {
        let mut b = seeds[rng.below(seeds.len())].as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            match rng.below(4) {
                0 if !b.is_empty() => {
                    let i = rng.below(b.len());
                    b[i] = (rng.next() % 95 + 32) as u8;
                }
                1 => {
                    let n = rng.below(b.len() + 1);
                    b.truncate(n);
                }
                2 => {
                    let i = rng.below(b.len() + 1);
                    let t = tokens[rng.below(tokens.len())];
                    b.splice(i..i, t.iter().copied());
                }
                _ => {
                    let i = rng.below(b.len() + 1);
                    let j = (i + rng.below(40)).min(b.len());
                    let dup = b[i..j].to_vec();
                    b.splice(j..j, dup);
                }
            }
        }
        if let Ok(t) = std::str::from_utf8(&b) {
            if xlb::config::Config::parse(t).is_err() {
                rejected += 1;
            }
        }
        xlb::fuzzing::config_parse(&b);
    }
    println!("config fuzz: {CONFIG_MUTATIONS} files, {rejected} rejected, failures: 0");
    report(
        json!({"test": "config_fuzz", "counts": {"files": CONFIG_MUTATIONS, "rejected": rejected, "failures": 0}}),
    );
    assert!(
        rejected > CONFIG_MUTATIONS / 4,
        "the mutations mostly stay valid: {rejected}"
    );
}

fn random_value(rng: &mut Rng) -> Value {
    match rng.below(9) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(0),
        3 => json!(65536),
        4 => json!(i64::MAX),
        5 => json!("not-an-ip"),
        6 => json!(""),
        7 => json!([]),
        _ => json!({}),
    }
}

/// Replaces one random leaf or member of `v` with a random value.
fn mutate(v: &mut Value, rng: &mut Rng) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.below(4) != 0 => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            mutate(m.get_mut(&k).unwrap(), rng);
        }
        Value::Array(a) if !a.is_empty() && rng.below(4) != 0 => {
            let i = rng.below(a.len());
            mutate(&mut a[i], rng);
        }
        _ => *v = random_value(rng),
    }
}

#[test]
fn k8s_translation_survives_mutated_objects() {
    let seed = json!([
        {"metadata": {"name": "web", "namespace": "default", "uid": "u1", "creationTimestamp": "2026-01-01T00:00:00Z",
                      "annotations": {"xlb.dev/allow-shared-ip": "k"}},
         "spec": {"type": "LoadBalancer", "loadBalancerClass": "xlb.dev/xdp", "ipFamilies": ["IPv4", "IPv6"],
                  "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000, "sessionAffinity": "ClientIP",
                  "externalIPs": ["192.0.2.7"], "loadBalancerIP": "192.0.2.8",
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]},
         "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}, {"hostname": "x.example"}]}}},
        {"metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
         "endpoints": [{"addresses": ["10.1.0.1"], "nodeName": "n1", "conditions": {"ready": true}},
                       {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}]},
        {"metadata": {"name": "web-2", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv6",
         "ports": [{"name": "http", "port": 8080}],
         "endpoints": [{"addresses": ["fd00::1"], "nodeName": "n1"}]}
    ]);
    let mut rng = Rng(0xc0ff_ee11);
    for _ in 0..K8S_MUTATIONS {
        let mut v = seed.clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut v, &mut rng);
        }
        xlb::fuzzing::k8s_objects(&serde_json::to_vec(&v).unwrap());
    }
    println!("k8s object fuzz: {K8S_MUTATIONS} object sets, failures: 0");
    report(
        json!({"test": "k8s_object_fuzz", "counts": {"object_sets": K8S_MUTATIONS, "failures": 0}}),
    );
}

/// A line for scripts/test.sh's reliability summary (as xlb_tests::report writes).
fn report(line: Value) {
    use std::io::Write;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reliability.jsonl");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all((line.to_string() + "\n").as_bytes());
    }
}
