//! Crafting test frames (etherparse computes the checksums) and checking the frames
//! the program emits, checksums recomputed from scratch.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp { flags: TcpFlags },
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: TcpFlags = TcpFlags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const ACK: TcpFlags = TcpFlags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};

/// One frame: Ethernet + IPv4/IPv6 + TCP/UDP, with valid checksums.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, sport, dst, dport, L4::Tcp { flags: SYN })
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::new(src, sport, dst, dport, L4::Udp)
    }

    fn new(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src: src.parse().expect("src address"),
            dst: dst.parse().expect("dst address"),
            sport,
            dport,
            ttl: 64,
            l4,
            payload: b"xlb-test".to_vec(),
        }
    }

    /// Sets the TCP flags; a UDP frame is left as it is.
    pub fn flags(mut self, flags: TcpFlags) -> Self {
        if let L4::Tcp { .. } = self.l4 {
            self.l4 = L4::Tcp { flags };
        }
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), self.ttl),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            _ => panic!("mixed address families in a test frame"),
        };
        let mut buf = Vec::new();
        match self.l4 {
            L4::Udp => ip
                .udp(self.sport, self.dport)
                .write(&mut buf, &self.payload)
                .expect("udp frame"),
            L4::Tcp { flags } => {
                let mut b = ip.tcp(self.sport, self.dport, 1000, 64240);
                if flags.syn {
                    b = b.syn();
                }
                if flags.ack {
                    b = b.ack(1);
                }
                if flags.fin {
                    b = b.fin();
                }
                if flags.rst {
                    b = b.rst();
                }
                b.write(&mut buf, &self.payload).expect("tcp frame")
            }
        }
        buf
    }
}

/// What a frame says, after checking every checksum in it.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub payload: Vec<u8>,
}

/// Parses a frame and verifies the IPv4 header checksum and the TCP/UDP checksum
/// (a UDP checksum of 0 over IPv4 is accepted as "none").
pub fn decode(frame: &[u8]) -> Result<Decoded> {
    let p = SlicedPacket::from_ethernet(frame).context("parsing frame")?;
    let eth = match p.link {
        Some(etherparse::LinkSlice::Ethernet2(e)) => e,
        _ => bail!("no Ethernet header"),
    };
    let (src, dst, ttl) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            if h.calc_header_checksum() != h.header_checksum {
                bail!(
                    "bad IPv4 header checksum {:#06x}, want {:#06x}",
                    h.header_checksum,
                    h.calc_header_checksum()
                );
            }
            (
                IpAddr::from(h.source),
                IpAddr::from(h.destination),
                h.time_to_live,
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                IpAddr::from(h.source_addr()),
                IpAddr::from(h.destination_addr()),
                h.hop_limit(),
            )
        }
        _ => bail!("no IP header"),
    };
    let (sport, dport, payload) = match (&p.transport, &p.net) {
        (Some(TransportSlice::Tcp(t)), Some(net)) => {
            let h = t.to_header();
            let want = match net {
                NetSlice::Ipv4(ip) => {
                    h.calc_checksum_ipv4(&ip.header().to_header(), t.payload())?
                }
                NetSlice::Ipv6(ip) => {
                    h.calc_checksum_ipv6(&ip.header().to_header(), t.payload())?
                }
                _ => unreachable!(),
            };
            if want != h.checksum {
                bail!("bad TCP checksum {:#06x}, want {want:#06x}", h.checksum);
            }
            (h.source_port, h.destination_port, t.payload().to_vec())
        }
        (Some(TransportSlice::Udp(u)), Some(net)) => {
            let h = u.to_header();
            let want = match net {
                NetSlice::Ipv4(_) if h.checksum == 0 => 0,
                NetSlice::Ipv4(ip) => {
                    h.calc_checksum_ipv4(&ip.header().to_header(), u.payload())?
                }
                NetSlice::Ipv6(ip) => {
                    h.calc_checksum_ipv6(&ip.header().to_header(), u.payload())?
                }
                _ => unreachable!(),
            };
            if want != h.checksum {
                bail!("bad UDP checksum {:#06x}, want {want:#06x}", h.checksum);
            }
            (h.source_port, h.destination_port, u.payload().to_vec())
        }
        _ => bail!("no TCP/UDP header"),
    };
    Ok(Decoded {
        src_mac: eth.source(),
        dst_mac: eth.destination(),
        src,
        dst,
        sport,
        dport,
        ttl,
        payload,
    })
}
