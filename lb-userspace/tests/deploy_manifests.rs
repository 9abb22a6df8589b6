//! Every manifest under deploy/ parses into its k8s-openapi type, so none can rot; and
//! the DaemonSet and RBAC say what the docs promise (least privilege, the bpffs mount,
//! the node name from the downward API, flags the agent accepts).

use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde_json::Value;

fn manifests() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out = Vec::new();
    for dir in ["kubernetes", "examples"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            // The kustomize base is not a manifest: kustomize_* tests check it.
            let kustomization = p.file_name().is_some_and(|n| n == "kustomization.yaml");
            if p.extension().is_some_and(|x| x == "yaml") && !kustomization {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 4, "manifests found: {out:?}");
    out
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
}

fn typed<T: serde::de::DeserializeOwned>(path: &Path, doc: &Value) -> T {
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{}: {} {}: {e}",
            path.display(),
            doc["kind"],
            doc["metadata"]["name"]
        )
    })
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let mut kinds = Vec::new();
    for path in manifests() {
        for doc in docs(&path) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "Namespace" => drop(typed::<Namespace>(&path, &doc)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&path, &doc)),
                "ClusterRole" => drop(typed::<ClusterRole>(&path, &doc)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&path, &doc)),
                "Role" => drop(typed::<k8s_openapi::api::rbac::v1::Role>(&path, &doc)),
                "RoleBinding" => drop(typed::<k8s_openapi::api::rbac::v1::RoleBinding>(
                    &path, &doc,
                )),
                "ConfigMap" => drop(typed::<ConfigMap>(&path, &doc)),
                "DaemonSet" => drop(typed::<DaemonSet>(&path, &doc)),
                "Deployment" => drop(typed::<Deployment>(&path, &doc)),
                "Service" => {
                    let svc: Service = typed(&path, &doc);
                    let spec = svc.spec.unwrap();
                    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
                    assert_eq!(
                        spec.load_balancer_class.as_deref(),
                        Some(xlb::k8s::translate::DEFAULT_CLASS)
                    );
                }
                // A CRD of the Prometheus Operator: checked by hand, not by type.
                "PodMonitor" => {
                    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
                    assert_eq!(
                        doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
                        "xlb"
                    );
                    let ep = &doc["spec"]["podMetricsEndpoints"][0];
                    assert_eq!(
                        (ep["port"].as_str(), ep["path"].as_str()),
                        (Some("metrics"), Some("/metrics"))
                    );
                }
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
            kinds.push(kind);
        }
    }
    for k in ["DaemonSet", "ClusterRole", "ServiceAccount", "Service"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in deploy/");
    }
}

fn find(kind: &str) -> (PathBuf, Value) {
    manifests()
        .into_iter()
        .flat_map(|p| docs(&p).into_iter().map(move |d| (p.clone(), d)))
        .find(|(_, d)| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The Leases of L2 ownership, in the DaemonSet's own namespace only.
#[test]
fn the_lease_role_is_namespaced_and_minimal() {
    use k8s_openapi::api::rbac::v1::Role;
    let (path, doc) = find("Role");
    let role: Role = typed(&path, &doc);
    assert_eq!(role.metadata.namespace.as_deref(), Some("xlb-system"));
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].api_groups.as_deref(),
        Some(&["coordination.k8s.io".to_owned()][..])
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["leases".to_owned()][..])
    );
    let mut verbs = rules[0].verbs.clone();
    verbs.sort();
    assert_eq!(verbs, ["create", "delete", "get", "update"]);
}

#[test]
fn the_cluster_role_grants_only_what_xlb_uses() {
    let (path, doc) = find("ClusterRole");
    let role: ClusterRole = typed(&path, &doc);
    let mut grants: Vec<String> = role
        .rules
        .unwrap()
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            let verbs = r.verbs.clone();
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |res| {
                    let g = g.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |v| format!("{g}/{res}:{v}"))
                })
            })
        })
        .collect();
    grants.sort();
    assert_eq!(
        grants,
        [
            "/nodes:list",
            "/nodes:watch",
            "/services/status:patch",
            "/services:list",
            "/services:watch",
            "discovery.k8s.io/endpointslices:list",
            "discovery.k8s.io/endpointslices:watch",
            "events.k8s.io/events:create",
            "events.k8s.io/events:patch",
        ]
    );
}

#[test]
fn the_daemonset_runs_with_capabilities_not_privilege() {
    let (path, doc) = find("DaemonSet");
    let ds: DaemonSet = typed(&path, &doc);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    // bpf(2) with CAP_BPF alone: runtimes' default profiles refuse it.
    assert_eq!(sc.seccomp_profile.clone().unwrap().type_, "Unconfined");
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    let mut add = caps.add.unwrap();
    add.sort();
    // Exactly what `xlb run` checks for at start (and names when one is missing).
    let mut needed: Vec<String> = xlb::privileges::REQUIRED
        .iter()
        .map(|c| c.name.trim_start_matches("CAP_").to_owned())
        .collect();
    needed.sort();
    assert_eq!(add, needed);
    // Metrics on the node's addresses (hostNetwork), not loopback only: a scraper
    // reaches them on the named port the PodMonitor uses.
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--metrics-addr=0.0.0.0:9464"),
        "{args:?}"
    );
    let ports = c.ports.clone().unwrap_or_default();
    assert!(ports
        .iter()
        .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9464));
    let mounts = c.volume_mounts.clone().unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mounted");
    let vol = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == bpffs.name)
        .unwrap();
    assert_eq!(vol.host_path.unwrap().path, "/sys/fs/bpf");
    let env = c.env.clone().unwrap();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node
        .value_from
        .clone()
        .unwrap()
        .field_ref
        .unwrap()
        .field_path;
    assert_eq!(field, "spec.nodeName");
    // Both families' SNAT sources come from each node's routes (`snat: auto`): no
    // single-family address is pinned in from the downward API.
    assert!(
        !env.iter().any(|e| e.name.starts_with("XLB_SNAT")),
        "SNAT is auto, not a node IP: {env:?}"
    );
    // Settings an operator changes come from the ConfigMap, not from editing args.
    let from_cm: Vec<(&str, String)> = env
        .iter()
        .filter_map(|e| {
            let r = e.value_from.as_ref()?.config_map_key_ref.as_ref()?;
            Some((e.name.as_str(), r.key.clone()))
        })
        .collect();
    for (var, key) in [
        ("XLB_IFACE", "iface"),
        ("XLB_IPAM_POOLS", "ipam-pools"),
        ("XLB_XDP_MODE", "xdp-mode"),
        ("XLB_CLUSTER_FORWARDING", "cluster-forwarding"),
        ("XLB_ANNOUNCE_ROUTES_TABLE", "announce-routes-table"),
        ("XLB_ANNOUNCE_L2", "announce-l2"),
    ] {
        assert!(
            from_cm.iter().any(|(v, k)| *v == var && *k == key),
            "{var} from the ConfigMap's {key}: {from_cm:?}"
        );
    }
    // Runs where it is asked to: a node selector, and no blanket toleration that
    // would put it on control-plane nodes too.
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("xlb.dev/load-balancer"))
            .map(String::as_str),
        Some("true")
    );
    assert!(
        !pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "no toleration of every taint"
    );

    // The agent accepts these arguments (env-provided values stand in as flags).
    let mut argv = vec!["xlb".to_owned()];
    argv.extend(c.args.clone().unwrap());
    argv.extend([
        "--iface".into(),
        "eth0".into(),
        "--node-name".into(),
        "n1".into(),
    ]);
    let cli = xlb::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let xlb::cli::Command::Run(run) = cli.command else {
        panic!("not `run`")
    };
    assert!(run.kubernetes);
    let metrics = run.metrics_addr.and_then(|m| m.0).expect("metrics address");
    // On every node address, for Prometheus (GET only; no secrets in the series).
    assert!(
        metrics.ip().is_unspecified() && metrics.port() == 9464,
        "metrics on the node's addresses: {metrics}"
    );

    // The shared config in the ConfigMap is a valid xlb config.
    let (path, doc) = find("ConfigMap");
    let cm: ConfigMap = typed(&path, &doc);
    let data = cm.data.unwrap();
    xlb::config::Config::parse(&data["config.yaml"]).expect("ConfigMap config.yaml");
    let pools: Vec<ipnet::IpNet> = data["ipam-pools"]
        .split(',')
        .map(|p| p.parse().unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect();
    assert!(
        pools.iter().any(|p| matches!(p, ipnet::IpNet::V4(_)))
            && pools.iter().any(|p| matches!(p, ipnet::IpNet::V6(_))),
        "a pool per family, for dual-stack Services: {pools:?}"
    );
    // Every ConfigMap value parses as the flag it feeds.
    let mut argv: Vec<String> = vec!["xlb".into(), "run".into(), "--kubernetes".into()];
    argv.extend(["--iface".into(), data["iface"].clone()]);
    argv.extend(["--xdp-mode".into(), data["xdp-mode"].clone()]);
    argv.extend(["--ipam-pool".into(), data["ipam-pools"].clone()]);
    xlb::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
}

/// `kubectl kustomize` of `dir`, with the kubectl on PATH (this machine kind ships one
/// with kustomize; Debian's kubernetes-client conflicts with it).
fn kustomize(dir: &Path) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl on PATH (with kustomize)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubernetes-validate --strict` (PyPI; scripts/setup.sh installs it) of `yaml`
/// against Kubernetes `version`.
fn validate_strict(yaml: &str, version: &str) {
    let dir = std::env::temp_dir().join(format!("xlb-kustomize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("rendered-{version}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", version])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (scripts/setup.sh installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict -k {version}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The base renders, and validates strictly against a current Kubernetes.
#[test]
fn kustomize_base_renders_and_validates() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let yaml = kustomize(&base);
    let docs = serde_saphyr::from_multiple::<Value>(&yaml).unwrap();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "DaemonSet",
        "ConfigMap",
    ] {
        assert!(docs.iter().any(|d| d["kind"] == kind), "no {kind} rendered");
    }
    validate_strict(&yaml, "1.33.0");
}

/// An overlay sets the namespace, the image and the node selector, as operators do:
/// every namespaced object and the bindings' subjects follow the namespace.
#[test]
fn kustomize_overlay_sets_namespace_image_and_nodes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join(format!("target/kustomize-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        "resources: [../../deploy/kubernetes]\nnamespace: lb\nimages: [{name: localhost/xlb, newName: registry.example/xlb, newTag: \"1.2\"}]\npatches:\n  - target: {kind: DaemonSet, name: xlb}\n    patch: |\n      - op: replace\n        path: /spec/template/spec/nodeSelector\n        value: {node-role.kubernetes.io/lb: \"\"}\n",
    )
    .unwrap();
    let yaml = kustomize(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let docs = serde_saphyr::from_multiple::<Value>(&yaml).unwrap();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    assert_eq!(ds["metadata"]["namespace"], "lb");
    let ns = docs.iter().find(|d| d["kind"] == "Namespace").unwrap();
    assert_eq!(
        ns["metadata"]["name"], "lb",
        "the Namespace object itself follows"
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], "registry.example/xlb:1.2");
    assert_eq!(
        pod["nodeSelector"],
        serde_json::json!({"node-role.kubernetes.io/lb": ""})
    );
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding")
    {
        assert_eq!(d["subjects"][0]["namespace"], "lb", "{d}");
    }
    for d in docs
        .iter()
        .filter(|d| d["metadata"]["namespace"].is_string())
    {
        assert_eq!(d["metadata"]["namespace"], "lb", "{d}");
    }
    validate_strict(&yaml, "1.33.0");
}
