//! The L2 sink, for networks without BGP: on the interfaces named by `--announce-l2`
//! (or `announce: {l2: {interfaces: [...]}}`), the XDP program answers ARP requests and
//! neighbour solicitations for the VIPs this node announces (the eBPF crate's l2.rs),
//! from XLB_L2_VIPS, which this sink keeps. When it takes a VIP over it sends a
//! gratuitous ARP and an unsolicited neighbour advertisement (twice, a second apart),
//! so neighbours that cached another node's MAC for it move to this one.
//!
//! One node answers per VIP. In static mode that is the operator's choice (keepalived
//! can move the `--announce-l2` role between nodes, see docs/announce.md).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, MapData};
use lb_common::{L2Key, L2Value, MAP_L2_VIPS};
use tracing::{info, warn};

use crate::{codec::addr_to_words, k8s::lease::VipLeases, model::Desired, sink::Sink};

pub struct L2Sink {
    /// (name, ifindex, MAC) of each interface answered on.
    ifaces: Vec<(String, u32, [u8; 6])>,
    /// XLB_L2_VIPS, taken from the loaded program: this sink is its only writer.
    map: HashMap<MapData, L2Key, L2Value>,
    /// In Kubernetes: the VIPs this node may answer for are the ones whose Lease it
    /// holds (one node per VIP on a segment).
    leases: Option<VipLeases>,
    answered: BTreeSet<IpAddr>,
    /// VIPs still to announce once more (the second gratuitous announcement).
    again: BTreeSet<IpAddr>,
}

impl L2Sink {
    /// Checks each interface (it must exist here and carry the XDP program) and reads its MAC.
    pub fn new(
        ifaces: &[String],
        attached: &[String],
        ebpf: &mut aya::Ebpf,
        leases: Option<VipLeases>,
    ) -> Result<Self> {
        let mut out = Vec::new();
        for name in ifaces {
            if !attached.contains(name) {
                bail!("--announce-l2 {name}: xlb is not attached there (add it to --iface): the answers come from the XDP program");
            }
            let cname = std::ffi::CString::new(name.as_str())?;
            // SAFETY: if_nametoindex reads a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            if ifindex == 0 {
                bail!("--announce-l2 {name}: no such interface in this network namespace");
            }
            out.push((name.clone(), ifindex, mac_of(name)?));
        }
        let map = ebpf.take_map(MAP_L2_VIPS).context("L2 map")?;
        Ok(Self {
            ifaces: out,
            map: HashMap::try_from(map)?,
            leases,
            answered: BTreeSet::new(),
            again: BTreeSet::new(),
        })
    }

    /// Makes the datapath answer for exactly `want`, and announces the VIPs it takes.
    /// Returns (taken, given up).
    fn answer(&mut self, want: &BTreeSet<IpAddr>) -> (Vec<IpAddr>, Vec<IpAddr>) {
        if let Err(e) = self.sync_map(want) {
            warn!("updating the L2 answers failed: {e:#}");
            return Default::default();
        }
        let taken: Vec<IpAddr> = want.difference(&self.answered).copied().collect();
        let given_up: Vec<IpAddr> = self.answered.difference(want).copied().collect();
        for vip in self.again.clone() {
            self.announce(vip);
        }
        self.again.clear();
        for vip in want.difference(&self.answered) {
            info!(%vip, ifaces = ?self.ifaces.iter().map(|i| &i.0).collect::<Vec<_>>(), "answering ARP/NDP for the VIP");
            self.announce(*vip);
            self.again.insert(*vip);
        }
        for vip in self.answered.difference(want) {
            info!(%vip, "no longer answering ARP/NDP for the VIP");
        }
        self.answered = want.clone();
        (taken, given_up)
    }

    fn sync_map(&mut self, want: &BTreeSet<IpAddr>) -> Result<()> {
        let map = &mut self.map;
        let mut desired = BTreeMap::new();
        for vip in want {
            let (addr, family) = addr_to_words(*vip);
            for (_, ifindex, mac) in &self.ifaces {
                desired.insert(
                    L2Key {
                        addr,
                        ifindex: *ifindex,
                        family: family as u32,
                    },
                    L2Value {
                        mac: *mac,
                        _pad: [0; 2],
                    },
                );
            }
        }
        let have: Vec<L2Key> = map.keys().filter_map(Result::ok).collect();
        for k in have {
            if !desired.contains_key(&k) {
                let _ = map.remove(&k);
            }
        }
        for (k, v) in desired {
            map.insert(k, v, 0)?;
        }
        Ok(())
    }

    fn announce(&self, vip: IpAddr) {
        for (name, ifindex, mac) in &self.ifaces {
            let frame = match vip {
                IpAddr::V4(a) => gratuitous_arp(*mac, a.octets()),
                IpAddr::V6(a) => unsolicited_na(*mac, a.octets()),
            };
            if let Err(e) = send_raw(*ifindex, &frame) {
                warn!(%vip, iface = %name, "sending the gratuitous announcement failed: {e:#}");
            }
        }
    }

    /// Withdraws every answer and releases the Leases (detach).
    pub async fn clear(&mut self) {
        let _ = self.answer(&BTreeSet::new());
        if let Some(leases) = self.leases.as_mut() {
            leases.release_all().await;
        }
    }
}

/// The L2 sink: ARP and NDP answers for the VIPs to announce (those whose Lease this
/// node holds, in Kubernetes).
impl Sink for L2Sink {
    /// (taken, given up).
    type Changes = (Vec<IpAddr>, Vec<IpAddr>);

    async fn apply(&mut self, desired: &Desired) -> Result<Self::Changes> {
        let owned = match self.leases.as_mut() {
            Some(leases) => leases.pass(&desired.announce).await,
            None => desired.announce.clone(),
        };
        Ok(self.answer(&owned))
    }
}

/// The interface's MAC, by SIOCGIFHWADDR (sysfs may be another namespace's).
fn mac_of(name: &str) -> Result<[u8; 6]> {
    // SAFETY: a plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if rc < 0 {
        bail!("reading {name}'s MAC address: {err}");
    }
    // SAFETY: the union field SIOCGIFHWADDR wrote.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for i in 0..6 {
        mac[i] = data[i] as u8;
    }
    Ok(mac)
}

/// ARP request from the VIP for the VIP, broadcast: neighbours that cache the VIP
/// update it to `mac`.
pub fn gratuitous_arp(mac: [u8; 6], vip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip);
    f
}

/// Unsolicited neighbour advertisement (override) from the VIP to all nodes.
pub fn unsolicited_na(mac: [u8; 6], vip: [u8; 16]) -> Vec<u8> {
    let all_nodes: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&vip);
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let mut sum: u32 = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&vip);
    pseudo.extend_from_slice(&all_nodes);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    for c in pseudo.chunks(2).chain(icmp.chunks(2)) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&vip);
    f.extend_from_slice(&all_nodes);
    f.extend_from_slice(&icmp);
    f
}

fn send_raw(ifindex: u32, frame: &[u8]) -> Result<()> {
    // SAFETY: a plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("packet socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: frame and addr are valid for the lengths given.
    let rc = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if rc < 0 {
        bail!("sendto: {err}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_well_formed() {
        let mac = [2, 0, 0, 0, 0, 7];
        let arp = gratuitous_arp(mac, [10, 0, 0, 9]);
        assert_eq!(arp.len(), 42);
        assert_eq!(&arp[28..32], &[10, 0, 0, 9], "sender address");
        assert_eq!(&arp[38..42], &[10, 0, 0, 9], "target address");
        let vip: std::net::Ipv6Addr = "fd00::9".parse().unwrap();
        let na = unsolicited_na(mac, vip.octets());
        assert_eq!(na.len(), 14 + 40 + 32);
        assert_eq!((na[20], na[21]), (58, 255), "ICMPv6, hop limit 255");
        // The checksum: the one's-complement sum over the pseudo-header and the
        // message, checksum included, is all ones.
        let mut words = na[22..54].to_vec();
        words.extend_from_slice(&32u32.to_be_bytes());
        words.extend_from_slice(&[0, 0, 0, 58]);
        words.extend_from_slice(&na[54..]);
        let mut sum: u32 = words
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(na[54], 136, "neighbour advertisement");
        assert_eq!(&na[54 + 8..54 + 24], &vip.octets(), "target");
        assert_eq!(&na[54 + 26..54 + 32], &mac, "target link-layer address");
    }
}
