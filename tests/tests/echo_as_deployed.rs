//! `ping VIP`, the first thing an operator tries, on a network as deployed (untuned
//! veths, no static neighbours, default sysctls apart from forwarding, `xlb run` with
//! its default flags): 3 of 3 replies per family while the VIP's services have
//! backends, none once the last backend goes.

use std::time::Duration;

use xlb_tests::{
    privileged, report,
    topology::{LbLab, Network, VIP4, VIP6},
};

/// Replies `ping -c 3` got from `vip` in the client namespace.
fn ping(lab: &LbLab, vip: &str) -> usize {
    let fam = if vip.contains(':') { "-6" } else { "-4" };
    // ping exits non-zero when replies are missing: its summary is read either way.
    let out = lab
        .client
        .command("ping")
        .args([fam, "-c", "3", "-i", "0.2", "-W", "1", vip])
        .output()
        .expect("ping (iputils-ping; scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .or_else(|| {
            text.split(", ")
                .find_map(|p| p.strip_suffix(" packets received"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ping summary in: {text}"))
}

#[test]
fn privileged_ping_a_vip_as_deployed() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
    lab.write_config(&[0, 1, 2]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(60)).unwrap();
    let mut agent = lab.agent().start().unwrap();
    let (v4, v6) = (ping(&lab, VIP4), ping(&lab, VIP6));
    assert_eq!(
        (v4, v6),
        (3, 3),
        "replies while the VIPs have backends\n{}",
        agent.logs()
    );
    let answered = agent.status().unwrap()["counters"]["icmp_echo_answered"]["packets"]
        .as_u64()
        .unwrap();
    assert_eq!(answered, 6, "answered by xlb, not by the host");
    // The last backend goes: the VIPs stop answering.
    lab.write_config(&[]).unwrap();
    agent.reload().unwrap();
    let (g4, g6) = (ping(&lab, VIP4), ping(&lab, VIP6));
    assert_eq!(
        (g4, g6),
        (0, 0),
        "no replies once no backend can take a flow"
    );
    report(
        "echo_as_deployed",
        serde_json::json!({"replies_v4": v4, "replies_v6": v6, "after_last_backend_v4": g4, "after_last_backend_v6": g6, "of": 3}),
    );
}
