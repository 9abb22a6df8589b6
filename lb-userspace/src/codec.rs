//! The codecs between the model and the map types: addresses as words, service keys,
//! names, the VIP filter, the datapath settings.

use std::net::{IpAddr, SocketAddr};

use lb_common::{
    Addr, Backend, DatapathConfig, ServiceKey, ServiceName, VipFilterWord, BACKEND_F_DNAT,
    BACKEND_F_SVC_DNAT, BACKEND_F_SVC_DSR, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
};

use crate::model::{Desired, Mode, Protocol};

pub fn addr_to_words(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

pub fn words_to_addr(words: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

pub fn service_key(vip: IpAddr, port: u16, proto: Protocol) -> ServiceKey {
    let (vip, family) = addr_to_words(vip);
    ServiceKey {
        vip,
        port: port.to_be(),
        proto: match proto {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        family,
    }
}

/// A service's key: `encapsulated` services have their own keys.
pub fn model_service_key(svc: &crate::model::Service) -> ServiceKey {
    let mut key = service_key(svc.vip, svc.port, svc.protocol);
    if svc.encapsulated {
        key.family |= lb_common::SVC_KEY_ENCAPSULATED;
    }
    key
}

pub fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(words_to_addr(&b.addr, b.family), u16::from_be(b.port))
}

/// The datapath's settings for `desired`. `dnat_in_use` is derived from the modes, as
/// `derived_dnat_in_use` derives it from the backend entries of adopted maps.
pub fn datapath_config(desired: &Desired) -> DatapathConfig {
    let s = &desired.settings;
    let words = |a: Option<IpAddr>| a.map(|a| addr_to_words(a).0).unwrap_or_default();
    DatapathConfig {
        snat_v4: words(s.snat.ipv4.map(Into::into)),
        snat_v6: words(s.snat.ipv6.map(Into::into)),
        snat_port_min: s.snat.port_min,
        snat_port_max: s.snat.port_max,
        tcp_idle_timeout_s: s.timeouts.tcp_idle,
        udp_idle_timeout_s: s.timeouts.udp_idle,
        tcp_closing_timeout_s: s.timeouts.tcp_closing,
        tcp_syn_timeout_s: s.timeouts.tcp_syn,
        decap: (s.decap || desired.services.iter().any(|s| s.encapsulated)) as u32,
        new_flow_limit: s.flood_guard.new_flows_per_cpu,
        dnat_in_use: desired.services.iter().any(|s| {
            s.backends
                .iter()
                .any(|b| backend_mode_flags(s.mode, b.local) & DNAT_FLAGS != 0)
        }) as u32,
        vip_filter: 1,
        // The flow tables' geometry is the dataplane's (Dataplane::with_geometry).
        conntrack_buckets: 0,
        reverse_buckets: 0,
    }
}

/// The flags of a backend entry that say how the datapath treats its flows: the one
/// place a service's mode is kept (the packet reads it on the backend, for new and
/// established flows alike). A backend on this node is reached by dnat whatever the
/// service's mode.
pub fn backend_mode_flags(mode: Mode, local: bool) -> u8 {
    let local = if local { BACKEND_F_DNAT } else { 0 };
    local
        | match mode {
            Mode::Nat => 0,
            Mode::Dnat => BACKEND_F_SVC_DNAT,
            Mode::Dsr => BACKEND_F_SVC_DSR,
        }
}

const DNAT_FLAGS: u8 = BACKEND_F_DNAT | BACKEND_F_SVC_DNAT;

/// Whether backends of these entries need the datapath's dnat reply path.
pub fn derived_dnat_in_use<'a>(backends: impl IntoIterator<Item = &'a Backend>) -> bool {
    backends.into_iter().any(|b| b.flags & DNAT_FLAGS != 0)
}

/// The VIP filter's words with the bit of each of `keys` set.
pub fn vip_filter(keys: impl IntoIterator<Item = ServiceKey>) -> Vec<VipFilterWord> {
    let mut words = vec![0; lb_common::VIP_FILTER_WORDS as usize];
    for key in keys {
        let (word, mask) = lb_common::hash::vip_filter_slot(lb_common::hash::vip_filter_bit(
            &key.vip, key.port, key.proto,
        ));
        words[word as usize] |= mask;
    }
    words
}

/// A name as the XLB_SERVICE_NAMES value: cut at a character boundary to fit.
pub fn service_name(name: &str) -> ServiceName {
    let mut end = name.len().min(lb_common::SERVICE_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut bytes = [0u8; lb_common::SERVICE_NAME_MAX];
    bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
    ServiceName { bytes }
}

/// The name stored in an XLB_SERVICE_NAMES value.
pub fn service_name_str(n: &ServiceName) -> String {
    let end = n
        .bytes
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(n.bytes.len());
    String::from_utf8_lossy(&n.bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn vip_filter_sets_each_keys_bit_and_spreads_ports() {
        let keys: Vec<ServiceKey> = (1000..2000u16)
            .map(|p| service_key("192.0.2.10".parse().unwrap(), p, Protocol::Tcp))
            .collect();
        let words = vip_filter(keys.iter().copied());
        let mut bits = BTreeSet::new();
        for k in &keys {
            let bit = lb_common::hash::vip_filter_bit(&k.vip, k.port, k.proto);
            let (word, mask) = lb_common::hash::vip_filter_slot(bit);
            assert!(word < lb_common::VIP_FILTER_WORDS);
            assert_ne!(words[word as usize] & mask, 0);
            bits.insert(bit);
        }
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set as usize, bits.len(), "no bit beyond the keys'");
        // 1,000 keys in 65,536 bits share about 8 by chance; many more is a poor hash.
        assert!(bits.len() >= 980, "{} distinct bits", bits.len());
        assert!(vip_filter([]).iter().all(|w| *w == 0));
    }

    /// The sets services come in share fewer bits than random keys would: n random
    /// keys in 65,536 bits take 65,536 × (1 − e^(−n/65,536)) distinct bits (9,274 of
    /// 10,000), and each shared bit sends packets for no service on to the lookup.
    #[test]
    fn vip_filter_spreads_the_key_sets_services_come_in() {
        let distinct = |keys: Vec<ServiceKey>| -> usize {
            keys.iter()
                .map(|k| lb_common::hash::vip_filter_bit(&k.vip, k.port, k.proto))
                .collect::<BTreeSet<_>>()
                .len()
        };
        let v4 = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let v6 = |hi: u128, lo: u128| {
            IpAddr::from(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | hi << 64 | lo,
            ))
        };
        let random_keys = 9_274;
        let sets: [(&str, Vec<ServiceKey>); 5] = [
            (
                "10,000 consecutive IPv4 VIPs, one port",
                (0..10_000)
                    .map(|i| service_key(v4(i), 80, Protocol::Tcp))
                    .collect(),
            ),
            (
                "5,000 IPv4 VIPs, ports 80 and 443",
                (0..5_000)
                    .flat_map(|i| [80, 443].map(|p| service_key(v4(i), p, Protocol::Tcp)))
                    .collect(),
            ),
            (
                "one VIP, 5,000 ports, TCP and UDP",
                (1..=5_000)
                    .flat_map(|p| {
                        [Protocol::Tcp, Protocol::Udp].map(|pr| service_key(v4(1), p, pr))
                    })
                    .collect(),
            ),
            (
                "10,000 consecutive IPv6 VIPs",
                (0..10_000)
                    .map(|i| service_key(v6(0, i), 443, Protocol::Tcp))
                    .collect(),
            ),
            (
                "10,000 IPv6 /64 prefixes, ::1 in each",
                (0..10_000)
                    .map(|i| service_key(v6(i, 1), 443, Protocol::Tcp))
                    .collect(),
            ),
        ];
        for (name, keys) in sets {
            let n = distinct(keys);
            assert!(n >= random_keys, "{name}: {n} distinct bits of 10,000 keys");
        }
    }
}
