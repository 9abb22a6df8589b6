//! The load-balancer topology used by the netns tests and the demo:
//!
//! ```text
//!  client ns ──veth── LB ns (xlb) ──veth── backend ns b0
//!  10.30.0.2          10.30.0.1   ├─veth── backend ns b1     10.40.i.2 / fd40:i::2
//!  fd30::2            fd30::1     └─veth── backend ns b2     (default route via LB)
//! ```
//! VIPs 10.100.0.10 and fd00:100::10 are routed by the client to the LB and are not
//! configured anywhere: only xlb answers for them. The LB's client-side address is the
//! SNAT address. Neighbour entries are pinned so that bpf_fib_lookup always resolves.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;

use crate::{
    netns::{veth_pair, Netns, VethEnd},
    unique_name,
};

pub const VIP4: &str = "10.100.0.10";
pub const VIP6: &str = "fd00:100::10";
pub const CLIENT4: &str = "10.30.0.2";
pub const CLIENT6: &str = "fd30::2";
pub const SNAT4: &str = "10.30.0.1";
pub const SNAT6: &str = "fd30::1";
pub const BACKEND_PORT: u16 = 8080;

pub struct LbLab {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// The LB's interfaces (client side first), for `--iface`.
    pub lb_ifaces: Vec<String>,
    pub config_path: PathBuf,
}

pub fn backend_v4(i: usize) -> SocketAddr {
    format!("10.40.{i}.2:{BACKEND_PORT}").parse().unwrap()
}

pub fn backend_v6(i: usize) -> SocketAddr {
    format!("[fd40:{i}::2]:{BACKEND_PORT}").parse().unwrap()
}

fn pin_neighbour(
    ns: &Netns,
    on: &VethEnd,
    addr: &str,
    peer_ns: &Netns,
    peer: &VethEnd,
) -> Result<()> {
    let mac = peer_ns.mac(&peer.name)?;
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ns.ip(&[
        "neigh",
        "replace",
        addr,
        "lladdr",
        &mac,
        "dev",
        &on.name,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

impl LbLab {
    pub fn two_arm(n_backends: usize) -> Result<Self> {
        let client = Netns::new("lc")?;
        let lb = Netns::new("ll")?;
        let (c_end, l_end) = veth_pair(
            &client,
            &["10.30.0.2/24", "fd30::2/64"],
            &lb,
            &["10.30.0.1/24", "fd30::1/64"],
        )?;
        client.ip(&["route", "add", "default", "via", SNAT4])?;
        client.ip(&["-6", "route", "add", "default", "via", SNAT6])?;
        pin_neighbour(&lb, &l_end, CLIENT4, &client, &c_end)?;
        pin_neighbour(&lb, &l_end, CLIENT6, &client, &c_end)?;
        pin_neighbour(&client, &c_end, SNAT4, &lb, &l_end)?;
        pin_neighbour(&client, &c_end, SNAT6, &lb, &l_end)?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let mut lb_ifaces = vec![l_end.name.clone()];
        let mut backends = Vec::new();
        for i in 0..n_backends {
            let b = Netns::new("lb")?;
            let (lb_side, b_side) = veth_pair(
                &lb,
                &[&format!("10.40.{i}.1/24"), &format!("fd40:{i}::1/64")],
                &b,
                &[&format!("10.40.{i}.2/24"), &format!("fd40:{i}::2/64")],
            )?;
            b.ip(&["route", "add", "default", "via", &format!("10.40.{i}.1")])?;
            b.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd40:{i}::1"),
            ])?;
            pin_neighbour(&lb, &lb_side, &format!("10.40.{i}.2"), &b, &b_side)?;
            pin_neighbour(&lb, &lb_side, &format!("fd40:{i}::2"), &b, &b_side)?;
            pin_neighbour(&b, &b_side, &format!("10.40.{i}.1"), &lb, &lb_side)?;
            pin_neighbour(&b, &b_side, &format!("fd40:{i}::1"), &lb, &lb_side)?;
            lb_ifaces.push(lb_side.name);
            backends.push(b);
        }
        let config_path = std::env::temp_dir().join(format!("{}.yaml", unique_name("xlbcfg")));
        Ok(Self {
            client,
            lb,
            backends,
            lb_ifaces,
            config_path,
        })
    }

    /// Writes the config: TCP :80 and UDP :53 on both VIPs, to the given backends.
    pub fn write_config(&self, backends: &[usize]) -> Result<()> {
        let list = |v6: bool| {
            backends
                .iter()
                .map(|&i| {
                    format!(
                        "{{address: \"{}\"}}",
                        if v6 { backend_v6(i) } else { backend_v4(i) }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = format!("snat: {{ipv4: {SNAT4}, ipv6: \"{SNAT6}\"}}\nservices:\n");
        for (name, vip, v6) in [("v4", VIP4, false), ("v6", VIP6, true)] {
            for (proto, port) in [("tcp", 80), ("udp", 53)] {
                text.push_str(&format!(
                    "  - name: {proto}-{name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    backends: [{}]\n",
                    list(v6)
                ));
            }
        }
        std::fs::write(&self.config_path, text)?;
        Ok(())
    }

    pub fn iface_arg(&self) -> String {
        self.lb_ifaces.join(",")
    }
}

impl Drop for LbLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}
