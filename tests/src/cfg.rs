//! The tests' configs, built from typed values and rendered as the YAML the agent reads
//! (`Cfg::yaml`, for a config file) or parsed by the agent's own parser
//! (`Cfg::config`, for a fixture's `Dataplane`). Only what a test sets is written:
//! the rest is the agent's default, as in a hand-written file.
//!
//! ```ignore
//! let cfg = Cfg::new()
//!     .snat4("10.20.0.1")
//!     .service(Svc::tcp("web", "192.0.2.10", 80).mode(Mode::Dsr).backends(&["10.20.0.2:80"]));
//! ```

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    str::FromStr,
};

use ipnet::IpNet;
use xlb::config::Config;
pub use xlb::model::{CheckKind, HealthCheck, Mode, Protocol, Timeouts};

/// A value given as itself or as text, parsed here: a literal of a test's own that
/// does not parse is a bug in the test, and panics.
pub trait Typed<T> {
    fn typed(self) -> T;
}

fn parse<T: FromStr>(text: &str) -> T
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} in a test's config: {e}"))
}

macro_rules! typed_from_text {
    ($($t:ty),*) => {$(
        impl Typed<$t> for &str {
            fn typed(self) -> $t {
                parse(self)
            }
        }
        impl Typed<$t> for &&str {
            fn typed(self) -> $t {
                parse(self)
            }
        }
        impl Typed<$t> for String {
            fn typed(self) -> $t {
                parse(&self)
            }
        }
        impl Typed<$t> for &String {
            fn typed(self) -> $t {
                parse(self)
            }
        }
    )*};
}
typed_from_text!(IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, IpNet);

macro_rules! typed_as_itself {
    ($($t:ty => $into:ty),*) => {$(
        impl Typed<$into> for $t {
            fn typed(self) -> $into {
                self.into()
            }
        }
        impl Typed<$into> for &$t {
            fn typed(self) -> $into {
                (*self).into()
            }
        }
    )*};
}
typed_as_itself!(
    IpAddr => IpAddr,
    Ipv4Addr => IpAddr,
    Ipv6Addr => IpAddr,
    Ipv4Addr => Ipv4Addr,
    Ipv6Addr => Ipv6Addr,
    SocketAddr => SocketAddr,
    IpNet => IpNet
);

/// An address of one family given as an `IpAddr`.
impl Typed<Ipv4Addr> for IpAddr {
    fn typed(self) -> Ipv4Addr {
        match self {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => panic!("{a}: an IPv6 address where a test's config wants IPv4"),
        }
    }
}

impl Typed<Ipv6Addr> for IpAddr {
    fn typed(self) -> Ipv6Addr {
        match self {
            IpAddr::V6(a) => a,
            IpAddr::V4(a) => panic!("{a}: an IPv4 address where a test's config wants IPv6"),
        }
    }
}

/// A config: services and the settings a test changes.
#[derive(Clone, Debug, Default)]
pub struct Cfg {
    services: Vec<Svc>,
    snat4: Option<Ipv4Addr>,
    snat6: Option<Ipv6Addr>,
    snat_ports: Option<(u16, u16)>,
    maglev_table_size: Option<u32>,
    timeouts: Option<Timeouts>,
    flood_guard: Option<u32>,
    icmp_echo: Option<bool>,
}

/// One service.
#[derive(Clone, Debug)]
pub struct Svc {
    name: String,
    vip: IpAddr,
    port: u16,
    protocol: Protocol,
    mode: Option<Mode>,
    backends: Vec<(SocketAddr, Option<u32>)>,
    allow: Vec<IpNet>,
    health_check: Option<HealthCheck>,
    conntrack: Option<bool>,
}

impl Cfg {
    /// No services, every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn service(mut self, s: Svc) -> Self {
        self.services.push(s);
        self
    }

    pub fn services(mut self, s: impl IntoIterator<Item = Svc>) -> Self {
        self.services.extend(s);
        self
    }

    /// The IPv4 SNAT source (else `auto`).
    pub fn snat4(mut self, a: impl Typed<Ipv4Addr>) -> Self {
        self.snat4 = Some(a.typed());
        self
    }

    /// The IPv6 SNAT source (else `auto`).
    pub fn snat6(mut self, a: impl Typed<Ipv6Addr>) -> Self {
        self.snat6 = Some(a.typed());
        self
    }

    /// The SNAT port range.
    pub fn snat_ports(mut self, min: u16, max: u16) -> Self {
        self.snat_ports = Some((min, max));
        self
    }

    pub fn maglev_table_size(mut self, m: u32) -> Self {
        self.maglev_table_size = Some(m);
        self
    }

    pub fn timeouts(mut self, t: Timeouts) -> Self {
        self.timeouts = Some(t);
        self
    }

    /// `flood_guard: {new_flows_per_cpu: N}`.
    pub fn flood_guard(mut self, new_flows_per_cpu: u32) -> Self {
        self.flood_guard = Some(new_flows_per_cpu);
        self
    }

    pub fn icmp_echo(mut self, on: bool) -> Self {
        self.icmp_echo = Some(on);
        self
    }

    /// The config file's text.
    pub fn yaml(&self) -> String {
        let mut t = String::new();
        if let Some(n) = self.flood_guard {
            writeln!(t, "flood_guard: {{new_flows_per_cpu: {n}}}").unwrap();
        }
        if let Some(on) = self.icmp_echo {
            writeln!(t, "icmp_echo: {on}").unwrap();
        }
        if let Some(m) = self.maglev_table_size {
            writeln!(t, "maglev_table_size: {m}").unwrap();
        }
        let mut snat = Vec::new();
        if let Some(a) = self.snat4 {
            snat.push(format!("ipv4: {a}"));
        }
        if let Some(a) = self.snat6 {
            snat.push(format!("ipv6: \"{a}\""));
        }
        if let Some((min, max)) = self.snat_ports {
            snat.push(format!("port_min: {min}, port_max: {max}"));
        }
        if !snat.is_empty() {
            writeln!(t, "snat: {{{}}}", snat.join(", ")).unwrap();
        }
        if let Some(o) = self.timeouts {
            writeln!(
                t,
                "timeouts: {{tcp_idle: {}, tcp_closing: {}, udp_idle: {}, tcp_syn: {}, gc_interval: {}}}",
                o.tcp_idle, o.tcp_closing, o.udp_idle, o.tcp_syn, o.gc_interval
            )
            .unwrap();
        }
        if self.services.is_empty() {
            t.push_str("services: []\n");
        } else {
            t.push_str("services:\n");
            for s in &self.services {
                s.write(&mut t);
            }
        }
        t
    }

    /// The config as the agent's parser reads it (and validates it: a test's config
    /// that the agent refuses panics, with its text).
    pub fn config(&self) -> Config {
        let text = self.yaml();
        Config::parse(&text).unwrap_or_else(|e| panic!("a test's config: {e:#}\n{text}"))
    }

    /// Writes the config file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.yaml())
    }
}

impl Svc {
    pub fn new(
        name: impl Into<String>,
        vip: impl Typed<IpAddr>,
        port: u16,
        protocol: Protocol,
    ) -> Self {
        Self {
            name: name.into(),
            vip: vip.typed(),
            port,
            protocol,
            mode: None,
            backends: Vec::new(),
            allow: Vec::new(),
            health_check: None,
            conntrack: None,
        }
    }

    pub fn tcp(name: impl Into<String>, vip: impl Typed<IpAddr>, port: u16) -> Self {
        Self::new(name, vip, port, Protocol::Tcp)
    }

    pub fn udp(name: impl Into<String>, vip: impl Typed<IpAddr>, port: u16) -> Self {
        Self::new(name, vip, port, Protocol::Udp)
    }

    pub fn mode(mut self, m: Mode) -> Self {
        self.mode = Some(m);
        self
    }

    /// Backends at the default weight.
    pub fn backends<B: Typed<SocketAddr>>(mut self, bs: impl IntoIterator<Item = B>) -> Self {
        self.backends
            .extend(bs.into_iter().map(|b| (b.typed(), None)));
        self
    }

    /// One backend of this weight.
    pub fn weighted(mut self, b: impl Typed<SocketAddr>, weight: u32) -> Self {
        self.backends.push((b.typed(), Some(weight)));
        self
    }

    /// Source ranges (`allow:`).
    pub fn allow<N: Typed<IpNet>>(mut self, ranges: impl IntoIterator<Item = N>) -> Self {
        self.allow.extend(ranges.into_iter().map(Typed::typed));
        self
    }

    pub fn health_check(mut self, h: HealthCheck) -> Self {
        self.health_check = Some(h);
        self
    }

    /// `conntrack: false`: a stateless service (dsr and dnat only).
    pub fn conntrack(mut self, on: bool) -> Self {
        self.conntrack = Some(on);
        self
    }

    fn write(&self, t: &mut String) {
        writeln!(t, "  - name: {}", self.name).unwrap();
        writeln!(t, "    vip: \"{}\"", self.vip).unwrap();
        writeln!(t, "    port: {}", self.port).unwrap();
        writeln!(t, "    protocol: {}", self.protocol.name()).unwrap();
        if let Some(m) = self.mode {
            writeln!(t, "    mode: {}", m.name()).unwrap();
        }
        if let Some(on) = self.conntrack {
            writeln!(t, "    conntrack: {on}").unwrap();
        }
        if !self.allow.is_empty() {
            let ranges: Vec<String> = self.allow.iter().map(|n| format!("\"{n}\"")).collect();
            writeln!(t, "    allow: [{}]", ranges.join(", ")).unwrap();
        }
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(a, w)| match w {
                Some(w) => format!("{{address: \"{a}\", weight: {w}}}"),
                None => format!("{{address: \"{a}\"}}"),
            })
            .collect();
        writeln!(t, "    backends: [{}]", backends.join(", ")).unwrap();
        if let Some(h) = &self.health_check {
            let kind = match h.kind {
                CheckKind::Tcp => "tcp",
                CheckKind::Http => "http",
            };
            let mut fields = vec![format!("type: {kind}")];
            if let Some(p) = h.port {
                fields.push(format!("port: {p}"));
            }
            if let Some(p) = &h.path {
                fields.push(format!("path: \"{p}\""));
            }
            fields.push(format!(
                "interval_ms: {}, timeout_ms: {}, rise: {}, fall: {}, keep_established: {}",
                h.interval_ms, h.timeout_ms, h.rise, h.fall, h.keep_established
            ));
            writeln!(t, "    health_check: {{{}}}", fields.join(", ")).unwrap();
        }
    }
}

/// A mode by its name in the config (`nat`, `dnat`, `dsr`).
pub fn mode(name: &str) -> Mode {
    [Mode::Nat, Mode::Dnat, Mode::Dsr]
        .into_iter()
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("no mode {name:?}"))
}
