//! One shared network segment behind a router, as a small bare-metal rack is: the
//! shape for the `dnat` and `dsr` modes and for moving flows between LB nodes.
//!
//! ```text
//!  client ns ──veth── router ns ──br0── LB node k     10.61.0.(2+k)  fd61::(2+k)
//!  10.31.0.2          10.31.0.1   │                                  (xlb, one interface)
//!  fd31::2            fd31::1     └──── backend i     10.61.0.(10+i) fd61::(10+i)
//!                     10.61.0.1                       (default route via the router)
//!                     fd61::1
//! ```
//! The router sends the VIPs to one LB node (`route_vips_via`); moving that route is
//! what an ECMP rehash or a node failure does to a flow. As deployed: untuned veths,
//! no static neighbours, default sysctls apart from forwarding on the router and the
//! LB nodes.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;

use crate::{
    agent::{Agent, Start},
    cfg::{Cfg, Mode, Protocol, Svc},
    netns::{veth_pair_untuned, Netns},
    topology::{VIP4, VIP6},
};

/// Waits (bounded) until no IPv6 address in `ns` is still tentative: the link-local
/// addresses of fresh veths pass duplicate address detection a second or two after
/// the link comes up, and until then the kernel's own neighbour discovery (the return
/// path of a reply, which is not xlb's) waits a retransmission.
fn links_up(ns: &Netns) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = ns.ip(&["-6", "addr", "show", "tentative"])?;
        if out.stdout.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "IPv6 addresses still tentative in {}: {}",
                ns.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub struct Node {
    pub ns: Netns,
    /// Its one interface, on the router's bridge.
    pub iface: String,
    pub addr4: IpAddr,
    pub addr6: IpAddr,
}

impl Node {
    /// `xlb run` on the node's interface; the rest as [`Start`] says.
    pub fn agent(&self) -> Start<'_> {
        Start::new(&self.ns, &self.iface)
    }
}

pub struct SegmentLab {
    pub client: Netns,
    pub router: Netns,
    pub lbs: Vec<Node>,
    pub backends: Vec<Node>,
    pub client4: IpAddr,
    pub client6: IpAddr,
}

impl SegmentLab {
    /// `xlb run --iface IF --decap` on every backend, no config at all: the backends'
    /// side of dsr.
    pub fn decap_agents(&self) -> Vec<Agent> {
        self.backends
            .iter()
            .map(|b| b.agent().args(&["--decap"]).start().unwrap())
            .collect()
    }

    pub fn new(n_lbs: usize, n_backends: usize) -> Result<Self> {
        let client = Netns::new("sc")?;
        let router = Netns::new("sr")?;
        veth_pair_untuned(
            &client,
            &["10.31.0.2/24", "fd31::2/64"],
            &router,
            &["10.31.0.1/24", "fd31::1/64"],
        )?;
        client.ip(&["route", "add", "default", "via", "10.31.0.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "fd31::1"])?;
        router.ip(&["link", "add", "br0", "type", "bridge"])?;
        router.ip(&["addr", "add", "10.61.0.1/24", "dev", "br0"])?;
        router.ip(&["addr", "add", "fd61::1/64", "dev", "br0", "nodad"])?;
        router.ip(&["link", "set", "br0", "up"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let attach = |prefix: &str, host_part: usize| -> Result<Node> {
            let ns = Netns::new(prefix)?;
            let (a4, a6) = (
                format!("10.61.0.{host_part}"),
                format!("fd61::{host_part:x}"),
            );
            let (end, port) = veth_pair_untuned(
                &ns,
                &[&format!("{a4}/24"), &format!("{a6}/64")],
                &router,
                &[],
            )?;
            router.ip(&["link", "set", &port.name, "master", "br0"])?;
            ns.ip(&["route", "add", "default", "via", "10.61.0.1"])?;
            ns.ip(&["-6", "route", "add", "default", "via", "fd61::1"])?;
            Ok(Node {
                ns,
                iface: end.name,
                addr4: a4.parse()?,
                addr6: a6.parse()?,
            })
        };
        let mut lbs = Vec::new();
        for k in 0..n_lbs {
            let node = attach("sl", 2 + k)?;
            node.ns.sysctl("net.ipv4.ip_forward", "1")?;
            node.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            lbs.push(node);
        }
        let mut backends = Vec::new();
        for i in 0..n_backends {
            backends.push(attach("sb", 10 + i)?);
        }
        let lab = Self {
            client,
            router,
            lbs,
            backends,
            client4: "10.31.0.2".parse()?,
            client6: "fd31::2".parse()?,
        };
        lab.route_vips_via(0)?;
        for ns in [&lab.client, &lab.router]
            .into_iter()
            .chain(lab.lbs.iter().map(|n| &n.ns))
            .chain(lab.backends.iter().map(|n| &n.ns))
        {
            links_up(ns)?;
        }
        Ok(lab)
    }

    /// The router sends both VIPs to LB node `k`.
    pub fn route_vips_via(&self, k: usize) -> Result<()> {
        let lb = &self.lbs[k];
        self.router.ip(&[
            "route",
            "replace",
            &format!("{VIP4}/32"),
            "via",
            &lb.addr4.to_string(),
        ])?;
        self.router.ip(&[
            "-6",
            "route",
            "replace",
            &format!("{VIP6}/128"),
            "via",
            &lb.addr6.to_string(),
        ])?;
        Ok(())
    }

    /// A client on the segment itself (10.61.0.50, fd61::50), with no route but the
    /// connected ones and no static neighbour: for VIPs in the segment's own subnet,
    /// which only answers to ARP and neighbour solicitations make reachable.
    pub fn client_on_segment(&self) -> Result<Node> {
        let ns = Netns::new("sn")?;
        let (end, port) =
            veth_pair_untuned(&ns, &["10.61.0.50/24", "fd61::50/64"], &self.router, &[])?;
        self.router
            .ip(&["link", "set", &port.name, "master", "br0"])?;
        links_up(&ns)?;
        Ok(Node {
            ns,
            iface: end.name,
            addr4: "10.61.0.50".parse()?,
            addr6: "fd61::50".parse()?,
        })
    }

    /// dsr's backend side: the VIPs on the backends' loopback, so the kernel takes the
    /// decapsulated packets as its own and answers from the VIP.
    pub fn vips_on_backends(&self) -> Result<()> {
        for b in &self.backends {
            b.ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            b.ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
        }
        Ok(())
    }

    /// dnat's return path: the backends reach the client through LB node `k`, which
    /// translates their replies back.
    pub fn backends_return_via(&self, k: usize) -> Result<()> {
        let lb = &self.lbs[k];
        for b in &self.backends {
            b.ns.ip(&["route", "replace", "default", "via", &lb.addr4.to_string()])?;
            b.ns.ip(&[
                "-6",
                "route",
                "replace",
                "default",
                "via",
                &lb.addr6.to_string(),
            ])?;
        }
        Ok(())
    }

    /// A "pod" on LB node `k`: a namespace behind a veth of the node's own, reached by
    /// the node's connected route, as a CNI's bridge or veth would. Its addresses are
    /// 10.62.{slot}.2 and fd62:{slot}::2, with its default route via the node.
    pub fn pod_on_lb(&self, k: usize, slot: usize) -> Result<Node> {
        let node = &self.lbs[k].ns;
        let pod = Netns::new("sp")?;
        let (a4, a6) = (format!("10.62.{slot}.2"), format!("fd62:{slot}::2"));
        let (end, _) = veth_pair_untuned(
            &pod,
            &[&format!("{a4}/24"), &format!("{a6}/64")],
            node,
            &[&format!("10.62.{slot}.1/24"), &format!("fd62:{slot}::1/64")],
        )?;
        pod.ip(&["route", "add", "default", "via", &format!("10.62.{slot}.1")])?;
        links_up(&pod)?;
        links_up(node)?;
        pod.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd62:{slot}::1"),
        ])?;
        Ok(Node {
            ns: pod,
            iface: end.name,
            addr4: a4.parse()?,
            addr6: a6.parse()?,
        })
    }

    /// A config with TCP and UDP on both VIPs, in `mode`, to every backend on `port`
    /// (TCP) and `port + 1` (UDP) (dsr needs the service's own ports).
    pub fn config(&self, mode: Mode, tcp_port: u16, udp_port: u16) -> Cfg {
        config_for(&self.backends, [VIP4, VIP6], mode, tcp_port, udp_port)
    }
}

/// The same config for any set of backend nodes, on these VIPs (IPv4, IPv6).
pub fn config_for(
    backends: &[Node],
    vips: [&str; 2],
    mode: Mode,
    tcp_port: u16,
    udp_port: u16,
) -> Cfg {
    let mut c = Cfg::new();
    for (fam, vip, v6) in [("v4", vips[0], false), ("v6", vips[1], true)] {
        for (proto, port) in [(Protocol::Tcp, tcp_port), (Protocol::Udp, udp_port)] {
            let addrs = backends
                .iter()
                .map(|b| SocketAddr::new(if v6 { b.addr6 } else { b.addr4 }, port));
            c = c.service(
                Svc::new(format!("{}-{fam}", proto.name()), vip, port, proto)
                    .mode(mode)
                    .backends(addrs),
            );
        }
    }
    c
}
