//! Real kernel TCP and UDP traffic: echo servers that answer with their own name, and
//! clients. Every loop is bounded by a count and a deadline.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// The reply an echo server sends: `"{name}|{request}"`.
pub fn reply(name: &str, request: &[u8]) -> Vec<u8> {
    let mut v = format!("{name}|").into_bytes();
    v.extend_from_slice(request);
    v
}

/// Splits a reply into (server name, echoed request).
pub fn parse_reply(reply: &[u8]) -> Option<(String, Vec<u8>)> {
    let bar = reply.iter().position(|&b| b == b'|')?;
    Some((
        String::from_utf8_lossy(&reply[..bar]).into_owned(),
        reply[bar + 1..].to_vec(),
    ))
}

/// A TCP echo server in `ns` on `addr`; it serves connections until `lifetime` passes
/// and returns how many it served. Binding happens before this returns.
pub fn tcp_echo(
    ns: &Netns,
    addr: SocketAddr,
    name: &str,
    lifetime: Duration,
) -> Result<JoinHandle<usize>> {
    let name = name.to_owned();
    let listener = ns.run(move || -> Result<TcpListener> {
        let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })??;
    Ok(std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        let mut served = 0;
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => {
                    let name = name.clone();
                    served += 1;
                    std::thread::spawn(move || serve_tcp(stream, &name));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        served
    }))
}

/// Echoes each chunk the client sends, prefixed with the server's name, until EOF or
/// a 30 s idle timeout. Long-lived connections send many chunks.
fn serve_tcp(mut stream: TcpStream, name: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 2048];
    for _ in 0..100_000 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&reply(name, &buf[..n])).is_err() {
                    break;
                }
            }
        }
    }
}

/// A UDP echo server in `ns`, answering until `lifetime` passes.
pub fn udp_echo(
    ns: &Netns,
    addr: SocketAddr,
    name: &str,
    lifetime: Duration,
) -> Result<JoinHandle<usize>> {
    let name = name.to_owned();
    udp_server(ns, addr, 2048, lifetime, move |req| reply(&name, req))
}

/// A UDP server in `ns` on `addr` that answers each datagram (read into a buffer of
/// `buf_len` bytes) with `answer(request)`, until `lifetime` passes; returns how many
/// it served. Binding happens before this returns.
fn udp_server(
    ns: &Netns,
    addr: SocketAddr,
    buf_len: usize,
    lifetime: Duration,
    answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static,
) -> Result<JoinHandle<usize>> {
    let sock = ns.run(move || -> Result<UdpSocket> {
        let s = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    })??;
    Ok(std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        let mut served = 0;
        let mut buf = vec![0u8; buf_len];
        while Instant::now() < deadline {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                served += 1;
                let _ = sock.send_to(&answer(&buf[..n]), peer);
            }
        }
        served
    }))
}

/// One TCP request: connect, send, half-close, read the whole reply.
pub fn tcp_request(ns: &Netns, to: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let payload = payload.to_vec();
    ns.run(move || -> Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .with_context(|| format!("connect {to}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&payload)?;
        s.shutdown(Shutdown::Write)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })?
}

/// One UDP request from a fresh socket; waits up to 2 s for the answer.
pub fn udp_request(ns: &Netns, to: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let payload = payload.to_vec();
    ns.run(move || -> Result<Vec<u8>> {
        let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(&payload, to)?;
        let mut buf = [0u8; 2048];
        let (n, from) = s
            .recv_from(&mut buf)
            .with_context(|| format!("no UDP answer from {to}"))?;
        if from != to {
            bail!("UDP answer came from {from}, not {to}");
        }
        Ok(buf[..n].to_vec())
    })?
}

/// The index of a backend from its echo-server name `b{i}`.
pub fn backend_index(name: &str) -> usize {
    name.strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("reply from {name:?}"))
}

/// A TCP connection opened from the client namespace, kept open.
pub struct Conn {
    pub stream: TcpStream,
    pub sport: u16,
}

pub fn connect(client: &Netns, vip: SocketAddr) -> Conn {
    let stream = client
        .run(move || TcpStream::connect_timeout(&vip, Duration::from_secs(5)))
        .unwrap()
        .unwrap_or_else(|e| panic!("connect {vip}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        stream.peer_addr().unwrap(),
        vip,
        "the client sees the VIP as its peer"
    );
    let sport = stream.local_addr().unwrap().port();
    Conn { stream, sport }
}

impl Conn {
    /// One request/response; returns the backend index that answered.
    pub fn exchange(&mut self, msg: &str) -> std::io::Result<usize> {
        self.stream.write_all(msg.as_bytes())?;
        let mut buf = [0u8; 256];
        let n = self.stream.read(&mut buf)?;
        let (name, echoed) = parse_reply(&buf[..n]).ok_or(std::io::ErrorKind::InvalidData)?;
        assert_eq!(echoed, msg.as_bytes(), "payload intact");
        Ok(backend_index(&name))
    }
}

/// The bytes of a large test datagram: a pattern that a lost, duplicated or misplaced
/// fragment shows up in.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add((i >> 8) as u8 ^ seed)
        })
        .collect()
}

/// A UDP server for datagrams of any size up to 65,535 bytes, in `ns` on `addr`. A
/// request `Q<size>` is answered with `b{i}|` and `pattern(size, 7)`; anything else
/// is echoed as `b{i}|{request}`. Serves until `lifetime` passes.
pub fn udp_big_echo(
    ns: &Netns,
    addr: SocketAddr,
    name: &str,
    lifetime: Duration,
) -> Result<JoinHandle<usize>> {
    let name = name.to_owned();
    udp_server(ns, addr, 65_535, lifetime, move |req| {
        let size = req
            .strip_prefix(b"Q")
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<usize>().ok());
        match size {
            Some(size) => reply(&name, &pattern(size, 7)),
            None => reply(&name, req),
        }
    })
}

/// One datagram to `to` from a fresh socket in `ns`, and its answer (up to 2 s): the
/// answering server's name and the rest of the answer.
pub fn udp_big_request(ns: &Netns, to: SocketAddr, payload: Vec<u8>) -> Result<(String, Vec<u8>)> {
    ns.run(move || -> Result<(String, Vec<u8>)> {
        let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(&payload, to)?;
        let mut buf = vec![0u8; 65_535];
        let (n, from) = s.recv_from(&mut buf).context("no answer")?;
        if from != to {
            bail!("answer came from {from}, not {to}");
        }
        parse_reply(&buf[..n]).context("an answer without a server name")
    })?
}

/// What `burst` got back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Burst {
    pub tcp_answered: usize,
    pub udp_answered: usize,
}

/// `n` TCP request/replies and `n` UDP queries to `vip` from the source address `src`
/// (one of the client namespace's own), all at once, each on a fresh socket, waiting
/// at most `wait` for all of them: a refused client costs one wait, not one per try.
/// Answers must come from the VIP and echo the request.
pub fn burst(
    ns: &Netns,
    src: std::net::IpAddr,
    vip: std::net::IpAddr,
    (tcp_port, udp_port): (u16, u16),
    n: usize,
    wait: Duration,
) -> Result<Burst> {
    ns.run(move || -> Result<Burst> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let deadline = Instant::now() + wait;
        let bind = SocketAddr::new(src, 0);
        // UDP: every query sent first, the answers collected after.
        let mut udp = Vec::new();
        for i in 0..n {
            let s = UdpSocket::bind(bind)?;
            s.set_nonblocking(true)?;
            s.send_to(format!("u{i}").as_bytes(), SocketAddr::new(vip, udp_port))?;
            udp.push(s);
        }
        // TCP: non-blocking connects from `src`, all in flight together.
        let mut pending: Vec<(usize, OwnedFd)> = Vec::new();
        for i in 0..n {
            let fam = if vip.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            // SAFETY: plain socket calls; the descriptor is owned at once.
            let fd = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd is a new descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let (sa, len) = sockaddr(bind);
            // SAFETY: sa is a valid sockaddr of len bytes.
            if unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_storage).cast(),
                    len,
                )
            } != 0
            {
                bail!("bind {bind}: {}", std::io::Error::last_os_error());
            }
            let (sa, len) = sockaddr(SocketAddr::new(vip, tcp_port));
            // SAFETY: as above; EINPROGRESS is the expected answer.
            unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            pending.push((i, fd));
        }
        let mut out = Burst::default();
        let mut connected = Vec::new();
        let mut buf = [0u8; 2048];
        for _ in 0..10_000 {
            if Instant::now() > deadline || (pending.is_empty() && udp.is_empty()) {
                break;
            }
            udp.retain(|s| match s.recv_from(&mut buf) {
                Ok((len, from)) => {
                    if from.ip() == vip && parse_reply(&buf[..len]).is_some() {
                        out.udp_answered += 1;
                    }
                    false
                }
                Err(_) => true,
            });
            let mut still = Vec::new();
            for (i, fd) in pending {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no wait.
                unsafe { libc::poll(&mut p, 1, 0) };
                if p.revents & libc::POLLOUT != 0 {
                    let mut err: libc::c_int = 0;
                    let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    // SAFETY: err and l are valid out-parameters.
                    unsafe {
                        libc::getsockopt(
                            fd.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_ERROR,
                            (&mut err as *mut libc::c_int).cast(),
                            &mut l,
                        )
                    };
                    if err == 0 {
                        connected.push((i, TcpStream::from(fd)));
                    }
                } else {
                    still.push((i, fd));
                }
            }
            pending = still;
            std::thread::sleep(Duration::from_millis(5));
        }
        for (i, mut s) in connected {
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let msg = format!("t{i}");
            let ok =
                s.write_all(msg.as_bytes()).is_ok() && s.shutdown(Shutdown::Write).is_ok() && {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).is_ok()
                        && parse_reply(&got).is_some_and(|(_, echoed)| echoed == msg.as_bytes())
                };
            out.tcp_answered += ok as usize;
        }
        Ok(out)
    })?
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}
