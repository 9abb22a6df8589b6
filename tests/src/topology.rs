//! The load-balancer topologies used by the netns tests and the demo.
//!
//! Two-arm:
//! ```text
//!  client ns ──veth── LB ns (xlb) ──veth── backend ns b0
//!  10.30.0.2          10.30.0.1   ├─veth── backend ns b1     10.40.i.2 / fd40:i::2
//!  fd30::2            fd30::1     └─veth── backend ns b2     (default route via LB)
//! ```
//! One-arm: client, LB and backends on one bridge (in a "switch" namespace),
//! 10.60.0.0/24 and fd60::/64; the LB uses a single interface, so it answers with XDP_TX.
//!
//! VIPs 10.100.0.10 and fd00:100::10 are routed by the client to the LB and are not
//! configured anywhere: only xlb answers for them. The LB's client-side address is the
//! SNAT address.
//!
//! Two kinds of network (`Network`): the lab pins every neighbour entry, tunes the veths
//! for native XDP and names the SNAT address, so a test sees only what it tests; the
//! network as deployed has none of that (no static neighbours, default offloads, default
//! sysctls apart from forwarding, `snat: auto`), so what a user's network does to xlb
//! shows up in the tests too.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

use crate::{
    agent::Start,
    cfg::{Cfg, Protocol, Svc},
    netns::{veth_pair, veth_pair_untuned, Netns, VethEnd},
    traffic::{tcp_echo, udp_echo},
    unique_name,
};

pub const VIP4: &str = "10.100.0.10";
pub const VIP6: &str = "fd00:100::10";
pub const BACKEND_PORT: u16 = 8080;

/// What the topology resolves for the program (see the module's comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// Static neighbours, veths tuned for native XDP, SNAT addresses in the config.
    Lab,
    /// Nothing resolved ahead: as a user's network is.
    AsDeployed,
}

pub struct LbLab {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// The bridge of the one-arm topology, and the LB's port on it. In native mode a
    /// veth's XDP_TX needs an XDP program on the peer too (see docs/datapath.md).
    pub switch: Option<Netns>,
    pub lb_switch_port: Option<String>,
    /// The LB's interfaces (client side first), for `--iface`.
    pub lb_ifaces: Vec<String>,
    pub config_path: PathBuf,
    pub client4: IpAddr,
    pub client6: IpAddr,
    /// The LB's address towards the backends, used as the SNAT source.
    pub snat4: IpAddr,
    pub snat6: IpAddr,
    backends4: Vec<IpAddr>,
    backends6: Vec<IpAddr>,
    pub network: Network,
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
    /// Backend `i`'s service address, IPv4 or IPv6.
    pub fn backend(&self, i: usize, v6: bool) -> SocketAddr {
        SocketAddr::new(
            if v6 {
                self.backends6[i]
            } else {
                self.backends4[i]
            },
            BACKEND_PORT,
        )
    }

    pub fn one_arm(n_backends: usize) -> Result<Self> {
        let switch = Netns::new("ls")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let attach = |host: &Netns, a4: &str, a6: &str| -> Result<(VethEnd, VethEnd)> {
            let (h, s) = veth_pair(
                host,
                &[&format!("{a4}/24"), &format!("{a6}/64")],
                &switch,
                &[],
            )?;
            switch.ip(&["link", "set", &s.name, "master", "br0"])?;
            Ok((h, s))
        };
        let client = Netns::new("lc")?;
        let lb = Netns::new("ll")?;
        let (c_end, _) = attach(&client, "10.60.0.2", "fd60::2")?;
        let (l_end, l_port) = attach(&lb, "10.60.0.1", "fd60::1")?;
        client.ip(&["route", "add", &format!("{VIP4}/32"), "via", "10.60.0.1"])?;
        client.ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            "fd60::1",
        ])?;
        for a in ["10.60.0.2", "fd60::2"] {
            pin_neighbour(&lb, &l_end, a, &client, &c_end)?;
        }
        for a in ["10.60.0.1", "fd60::1"] {
            pin_neighbour(&client, &c_end, a, &lb, &l_end)?;
        }
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let (mut backends, mut backends4, mut backends6) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n_backends {
            let b = Netns::new("lb")?;
            let (a4, a6) = (format!("10.60.0.{}", 10 + i), format!("fd60::{}", 10 + i));
            let (b_end, _) = attach(&b, &a4, &a6)?;
            for a in [&a4, &a6] {
                pin_neighbour(&lb, &l_end, a, &b, &b_end)?;
            }
            for a in ["10.60.0.1", "fd60::1"] {
                pin_neighbour(&b, &b_end, a, &lb, &l_end)?;
            }
            backends4.push(a4.parse()?);
            backends6.push(a6.parse()?);
            backends.push(b);
        }
        let config_path = std::env::temp_dir().join(format!("{}.yaml", unique_name("xlbcfg")));
        Ok(Self {
            client,
            lb,
            backends,
            switch: Some(switch),
            lb_switch_port: Some(l_port.name),
            lb_ifaces: vec![l_end.name],
            config_path,
            client4: "10.60.0.2".parse()?,
            client6: "fd60::2".parse()?,
            snat4: "10.60.0.1".parse()?,
            snat6: "fd60::1".parse()?,
            backends4,
            backends6,
            network: Network::Lab,
        })
    }

    pub fn two_arm(n_backends: usize) -> Result<Self> {
        Self::two_arm_on(n_backends, Network::Lab)
    }

    pub fn two_arm_on(n_backends: usize, network: Network) -> Result<Self> {
        let lab = network == Network::Lab;
        let pin_neighbour =
            |ns: &Netns, on: &VethEnd, addr: &str, peer_ns: &Netns, peer: &VethEnd| {
                if lab {
                    pin_neighbour(ns, on, addr, peer_ns, peer)
                } else {
                    Ok(())
                }
            };
        let veth_pair = if lab { veth_pair } else { veth_pair_untuned };
        let client = Netns::new("lc")?;
        let lb = Netns::new("ll")?;
        let (c_end, l_end) = veth_pair(
            &client,
            &["10.30.0.2/24", "fd30::2/64"],
            &lb,
            &["10.30.0.1/24", "fd30::1/64"],
        )?;
        client.ip(&["route", "add", "default", "via", "10.30.0.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "fd30::1"])?;
        pin_neighbour(&lb, &l_end, "10.30.0.2", &client, &c_end)?;
        pin_neighbour(&lb, &l_end, "fd30::2", &client, &c_end)?;
        pin_neighbour(&client, &c_end, "10.30.0.1", &lb, &l_end)?;
        pin_neighbour(&client, &c_end, "fd30::1", &lb, &l_end)?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let mut lb_ifaces = vec![l_end.name.clone()];
        let (mut backends, mut backends4, mut backends6) = (Vec::new(), Vec::new(), Vec::new());
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
            backends4.push(format!("10.40.{i}.2").parse()?);
            backends6.push(format!("fd40:{i}::2").parse()?);
            backends.push(b);
        }
        let config_path = std::env::temp_dir().join(format!("{}.yaml", unique_name("xlbcfg")));
        Ok(Self {
            client,
            lb,
            backends,
            switch: None,
            lb_switch_port: None,
            lb_ifaces,
            config_path,
            client4: "10.30.0.2".parse()?,
            client6: "fd30::2".parse()?,
            snat4: "10.30.0.1".parse()?,
            snat6: "fd30::1".parse()?,
            backends4,
            backends6,
            network,
        })
    }

    /// The lab's services: TCP :80 and UDP :53 on both VIPs, to the given backends. In
    /// the lab the SNAT sources are the LB's addresses; as deployed, `snat: auto`.
    pub fn services(&self, backends: &[usize]) -> Cfg {
        let mut c = Cfg::new();
        if self.network == Network::Lab {
            c = c.snat4(self.snat4).snat6(self.snat6);
        }
        for (fam, vip, v6) in [("v4", VIP4, false), ("v6", VIP6, true)] {
            for (proto, port) in [(Protocol::Tcp, 80), (Protocol::Udp, 53)] {
                c = c.service(
                    Svc::new(format!("{}-{fam}", proto.name()), vip, port, proto)
                        .backends(backends.iter().map(|&i| self.backend(i, v6))),
                );
            }
        }
        c
    }

    /// Writes the config: [`LbLab::services`] to the given backends.
    pub fn write_config(&self, backends: &[usize]) -> Result<()> {
        self.write(&self.services(backends))
    }

    /// Replaces the config file with `cfg` (see [`LbLab::replace_config`]).
    pub fn write(&self, cfg: &Cfg) -> Result<()> {
        self.replace_config(&cfg.yaml())
    }

    /// Replaces the config file atomically (write, then rename), as config management
    /// does: the agent's watcher never sees a half-written file.
    pub fn replace_config(&self, text: &str) -> Result<()> {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    /// TCP and UDP echo servers on every backend, answering as `b{i}` on
    /// [::]:BACKEND_PORT for `lifetime`.
    pub fn start_backends(&self, lifetime: Duration) -> Result<Vec<JoinHandle<usize>>> {
        let mut servers = Vec::new();
        for (i, b) in self.backends.iter().enumerate() {
            let addr = SocketAddr::from(([0u16; 8], BACKEND_PORT));
            servers.push(tcp_echo(b, addr, &format!("b{i}"), lifetime)?);
            servers.push(udp_echo(b, addr, &format!("b{i}"), lifetime)?);
        }
        Ok(servers)
    }

    /// A second client on the client's own link: `addrs` added to its interface (a
    /// source of its own, as another host there would have).
    pub fn add_client_addresses(&self, addrs: &[&str]) -> Result<()> {
        let out = self
            .client
            .ip(&["-o", "-4", "addr", "show", "to", &self.client4.to_string()])?;
        let iface = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no interface holds {}", self.client4))?;
        for a in addrs {
            let mut args = vec!["addr", "add", a, "dev", &iface];
            if a.contains(':') {
                args.push("nodad");
            }
            self.client.ip(&args)?;
        }
        Ok(())
    }

    pub fn iface_arg(&self) -> String {
        self.lb_ifaces.join(",")
    }

    /// `xlb run` on the LB, on the lab's interfaces with the lab's config file; the
    /// rest as [`Start`] says.
    pub fn agent(&self) -> Start<'_> {
        Start::new(&self.lb, &self.iface_arg()).config(&self.config_path)
    }
}

impl Drop for LbLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}
