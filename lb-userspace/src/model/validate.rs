//! What the types cannot say about services: uniqueness, families, ports, ranges.
//! One set of checks for every source: the config file adds line numbers to the
//! message (`Invalid::place`), the Kubernetes side turns it into an Event.

use std::{collections::BTreeSet, net::IpAddr};

use super::{CheckKind, Mode, Service};

/// Where in a service a check failed, so that a source can say where that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Name,
    Vip,
    Port,
    Allow,
    HealthCheck,
    Conntrack,
    Backend(usize),
}

/// A service that cannot be served, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Its index in the list checked, and its name.
    pub service: usize,
    pub name: String,
    pub place: Place,
    /// "field vip: …", "backends[2].via: …".
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services[{}] ({}): {}",
            self.service, self.name, self.message
        )
    }
}

impl std::error::Error for Invalid {}

/// Checks `services` as one set served together, with these SNAT addresses.
pub fn services(services: &[Service], snat_addrs: &[IpAddr]) -> Result<(), Invalid> {
    let mut set = Set::new(snat_addrs);
    services.iter().try_for_each(|s| set.add(s))
}

/// Services checked one at a time as one set: a source can check each as it makes it,
/// without a second copy of all of them.
pub struct Set<'a> {
    snat_addrs: &'a [IpAddr],
    seen: BTreeSet<(IpAddr, u16, super::Protocol, bool)>,
    names: BTreeSet<String>,
}

impl<'a> Set<'a> {
    pub fn new(snat_addrs: &'a [IpAddr]) -> Self {
        Self {
            snat_addrs,
            seen: BTreeSet::new(),
            names: BTreeSet::new(),
        }
    }

    /// Adds a service already checked on its own (and unchanged since): only against
    /// those added before, for a name or a VIP, port and protocol twice.
    pub fn add_checked(&mut self, s: &Service) -> Result<(), Invalid> {
        self.unique(s)
    }

    fn unique(&mut self, s: &Service) -> Result<(), Invalid> {
        let fail = |place: Place, message: String| Invalid {
            service: self.names.len(),
            name: s.name.clone(),
            place,
            message,
        };
        if self.names.contains(&s.name) {
            return Err(fail(
                Place::Name,
                format!("field name: duplicate service name {:?}", s.name),
            ));
        }
        if self.seen.contains(&s.slot()) {
            return Err(fail(
                Place::Name,
                format!(
                    "duplicate service {}:{}/{}",
                    s.vip,
                    s.port,
                    s.protocol.name()
                ),
            ));
        }
        self.names.insert(s.name.clone());
        self.seen.insert(s.slot());
        Ok(())
    }

    /// Checks the next service, on its own and against those added before.
    pub fn add(&mut self, s: &Service) -> Result<(), Invalid> {
        // A name twice is said before what else is wrong with the second.
        if self.names.contains(&s.name) {
            return self.unique(s);
        }
        service(s, self.snat_addrs).map_err(|(place, message)| Invalid {
            service: self.names.len(),
            name: s.name.clone(),
            place,
            message,
        })?;
        self.unique(s)
    }
}

/// The checks of one service on its own.
fn service(s: &Service, snat_addrs: &[IpAddr]) -> Result<(), (Place, String)> {
    use Place::*;
    if s.name.trim().is_empty() {
        return Err((
            Name,
            "field name: empty; every service needs a name (it labels its metrics)".into(),
        ));
    }
    if let Some(why) = not_unicast(s.vip) {
        return Err((
            Vip,
            format!(
                "field vip: {} is {why}, not an address clients can send to",
                s.vip
            ),
        ));
    }
    if snat_addrs.contains(&s.vip) {
        return Err((Vip, format!("field vip: {} is also the SNAT address: replies to the LB itself would be taken for the service", s.vip)));
    }
    if s.encapsulated && s.mode == Mode::Dsr {
        return Err((
            Name,
            "encapsulated: true serves packets already decapsulated here; give it mode nat or dnat"
                .into(),
        ));
    }
    if s.port == 0 {
        return Err((Port, "field port: port 0 is not a service port".into()));
    }
    if !s.conntrack && s.mode == Mode::Nat {
        return Err((
            Conntrack,
            "field conntrack: false is refused for mode nat: a nat flow cannot be stateless, because the backend's replies come back to a SNAT port that only the flow's conntrack entry maps back to the client; use mode dsr or dnat for a stateless service, or keep conntrack on"
                .into(),
        ));
    }
    if s.source_ranges().is_some_and(|r| r.is_empty()) {
        let fam = family(s.vip);
        let all = if s.vip.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
        return Err((
            Allow,
            format!(
                "field allow: no {fam} range for the {fam} VIP {}, so no client could reach it; add one ({all} admits every {fam} client)",
                s.vip
            ),
        ));
    }
    let mut addrs = BTreeSet::new();
    for (j, b) in s.backends.iter().enumerate() {
        let at = Backend(j);
        if let Some(via) = b.via {
            if s.mode != Mode::Dsr {
                return Err((
                    at,
                    format!(
                        "backends[{j}].via: only mode dsr encapsulates; mode {} sends to the backend itself",
                        s.mode.name()
                    ),
                ));
            }
            if via.is_ipv4() != s.vip.is_ipv4() {
                return Err((
                    at,
                    format!(
                        "backends[{j}].via: {via} is {} but the VIP {} is {}",
                        family(via),
                        s.vip,
                        family(s.vip)
                    ),
                ));
            }
            if let Some(why) = not_unicast(via) {
                return Err((at, format!("backends[{j}].via: {via} is {why}")));
            }
        }
        if s.mode == Mode::Dsr && b.via.is_none() && !b.local && b.address.port() != s.port {
            return Err((
                at,
                format!(
                    "backends[{j}].address: port {} differs from the service's port {}; mode dsr sends the client's packet unchanged, so the backend must listen on the service's port",
                    b.address.port(),
                    s.port
                ),
            ));
        }
        if b.address.is_ipv4() != s.vip.is_ipv4() {
            return Err((
                at,
                format!(
                    "backends[{j}].address: {} is {} but the VIP {} is {}",
                    b.address,
                    family(b.address.ip()),
                    s.vip,
                    family(s.vip)
                ),
            ));
        }
        if b.address.port() == 0 {
            return Err((
                at,
                format!("backends[{j}].address: port 0 is not a backend port"),
            ));
        }
        if b.address.ip() == s.vip && b.address.port() == s.port {
            return Err((at, format!("backends[{j}].address: {} is the service's own VIP and port: its packets would come back to the service", b.address)));
        }
        if !addrs.insert(b.address) {
            return Err((
                at,
                format!("backends[{j}].address: duplicate backend {}", b.address),
            ));
        }
    }
    if let Some(hc) = &s.health_check {
        let fail = |m: String| Err((HealthCheck, m));
        if hc.interval_ms < 100 || hc.timeout_ms == 0 || hc.timeout_ms > hc.interval_ms {
            return fail(
                "field health_check: need interval_ms ≥ 100 and 0 < timeout_ms ≤ interval_ms"
                    .into(),
            );
        }
        if hc.rise == 0 || hc.fall == 0 {
            return fail("field health_check: rise and fall must be at least 1".into());
        }
        if hc.port == Some(0) {
            return fail("field health_check.port: port 0 cannot be probed".into());
        }
        match (&hc.path, hc.kind) {
            (Some(p), CheckKind::Http) if !p.starts_with('/') => {
                return fail(format!("field health_check.path: {p:?} must start with /"))
            }
            (Some(p), CheckKind::Tcp) => return fail(format!(
                "field health_check.path: {p:?} given for a tcp check, which sends no request (type: http for an HTTP check)"
            )),
            _ => {}
        }
    }
    Ok(())
}

/// Why an address cannot be a VIP or a source, if it cannot.
pub fn not_unicast(a: IpAddr) -> Option<&'static str> {
    if a.is_unspecified() {
        return Some("the unspecified address");
    }
    if a.is_multicast() {
        return Some("a multicast address");
    }
    if a.is_loopback() {
        return Some("a loopback address");
    }
    match a {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        _ => None,
    }
}

pub(crate) fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}
