//! Servers that answer with the peer address they see, and a client that checks it:
//! how the tests show that a backend sees the client's own address (dnat, dsr).

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
const TRY: Duration = Duration::from_millis(900);

/// Servers on backend `i`: TCP on [::]:`tcp_port` and UDP on each of `udp_binds`,
/// answering every chunk with `b{i} {peer address} {chunk}`.
pub fn serve(
    ns: &Netns,
    i: usize,
    tcp_port: u16,
    udp_binds: &[SocketAddr],
    life: Duration,
) -> Vec<JoinHandle<()>> {
    let mut out = Vec::new();
    let tcp = ns
        .run(move || {
            let l = TcpListener::bind(("::", tcp_port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .unwrap();
    out.push(std::thread::spawn(move || {
        let deadline = Instant::now() + life;
        while Instant::now() < deadline {
            match tcp.accept() {
                Ok((mut s, peer)) => {
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        let peer = peer.ip().to_canonical();
                        let mut buf = [0u8; 512];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                            if s.write_all(format!("b{i} {peer} {msg}").as_bytes())
                                .is_err()
                            {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }));
    for &bind in udp_binds {
        let sock = ns
            .run(move || {
                let s = UdpSocket::bind(bind).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                s
            })
            .unwrap();
        out.push(std::thread::spawn(move || {
            let deadline = Instant::now() + life;
            let mut buf = [0u8; 512];
            while Instant::now() < deadline {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let peer_ip = peer.ip().to_canonical();
                    let _ = sock.send_to(format!("b{i} {peer_ip} {msg}").as_bytes(), peer);
                }
            }
        }));
    }
    out
}

/// (backend index, the peer address it saw, the echoed message).
pub fn parse(reply: &[u8]) -> Option<(usize, IpAddr, String)> {
    let s = std::str::from_utf8(reply).ok()?;
    let mut it = s.splitn(3, ' ');
    let b = it.next()?.strip_prefix('b')?.parse().ok()?;
    let peer = it.next()?.parse().ok()?;
    Some((b, peer, it.next()?.to_owned()))
}

pub struct Outcome {
    pub lost: usize,
    pub per_backend: Vec<usize>,
    pub wrong_peer: Vec<String>,
    pub first_err: Option<String>,
}

/// `n` TCP request/replies to `vip`:80 and `n` UDP queries to `vip`:53 from `me` in
/// `client`, one try each (900 ms, below TCP's first retransmission).
pub fn one_try_each(
    client: &Netns,
    me: IpAddr,
    vip: IpAddr,
    n: usize,
    n_backends: usize,
) -> Outcome {
    client
        .run(move || {
            let mut o = Outcome {
                lost: 0,
                per_backend: vec![0; n_backends],
                wrong_peer: Vec::new(),
                first_err: None,
            };
            for i in 0..n {
                if o.lost >= 5 {
                    break;
                }
                let msg = format!("m{i}");
                let tcp = (|| -> std::io::Result<Vec<u8>> {
                    let mut s = TcpStream::connect_timeout(&SocketAddr::new(vip, TCP_PORT), TRY)?;
                    s.set_read_timeout(Some(TRY))?;
                    s.write_all(msg.as_bytes())?;
                    s.shutdown(Shutdown::Write)?;
                    let mut out = Vec::new();
                    s.read_to_end(&mut out)?;
                    Ok(out)
                })();
                let udp = (|| -> std::io::Result<Vec<u8>> {
                    let any: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                        .parse()
                        .unwrap();
                    let s = UdpSocket::bind(any)?;
                    s.set_read_timeout(Some(TRY))?;
                    let to = SocketAddr::new(vip, UDP_PORT);
                    s.send_to(msg.as_bytes(), to)?;
                    let mut buf = [0u8; 512];
                    let (len, from) = s.recv_from(&mut buf)?;
                    if from != to {
                        return Err(std::io::Error::other(format!(
                            "answer from {from}, not the VIP"
                        )));
                    }
                    Ok(buf[..len].to_vec())
                })();
                for (what, r) in [("tcp", tcp), ("udp", udp)] {
                    match r.map(|b| parse(&b)) {
                        Ok(Some((b, peer, echoed))) if echoed == msg => {
                            o.per_backend[b] += 1;
                            if peer != me {
                                o.wrong_peer.push(format!("{what} #{i}: b{b} saw {peer}"));
                            }
                        }
                        Ok(other) => {
                            o.lost += 1;
                            o.first_err
                                .get_or_insert(format!("{what} #{i}: reply {other:?}"));
                        }
                        Err(e) => {
                            o.lost += 1;
                            o.first_err
                                .get_or_insert(format!("{what} #{i} to {vip}: {e}"));
                        }
                    }
                }
            }
            o
        })
        .unwrap()
}
