//! Network namespaces and veth pairs that tear themselves down on drop, even when the
//! test panics. Commands run through `ip netns exec`; Rust code runs inside a namespace
//! on a thread that has joined it with setns(2), so tests use real kernel sockets.

use std::{
    fs::File,
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::unique_name;

/// Runs `cmd args...` and fails with its stderr if it exits non-zero.
pub fn sh(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawning {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Any command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// A `Command` that will run inside the namespace (for long-running processes).
    ///
    /// Unlike `ip netns exec`, only the network namespace is joined: the process keeps
    /// the host's mounts, so the maps it pins under /sys/fs/bpf are visible to the test.
    pub fn command(&self, cmd: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let path = format!("/var/run/netns/{}", self.name);
        // Opened here, before the fork: the child may only make async-signal-safe calls.
        let ns_file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        let mut c = Command::new(cmd);
        // SAFETY: the closure only calls setns(2) on an fd that is already open.
        unsafe {
            c.pre_exec(move || {
                setns(&ns_file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        c
    }

    /// Runs `f` on a fresh thread that has entered this namespace, so sockets it opens
    /// live there. The calling thread's namespace is untouched.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        run_in(&self.name, f)
    }

    /// Like `run`, but `f` may borrow from the caller (a scoped thread).
    pub fn run_scoped<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// The interface's index inside this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{ifname}/ifindex")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let out = self.exec("cat", &[&format!("/sys/class/net/{ifname}/address")])?;
        let s = String::from_utf8_lossy(&out.stdout);
        let mut mac = [0u8; 6];
        for (i, part) in s.trim().split(':').enumerate().take(6) {
            mac[i] = u8::from_str_radix(part, 16)?;
        }
        Ok(mac)
    }

    /// This namespace's neighbour entry for `addr`: its MAC as `ip neigh` prints it
    /// (`aa:bb:...`), if it has one.
    pub fn neighbour_mac(&self, addr: &str) -> Option<String> {
        let fam = if addr.contains(':') { "-6" } else { "-4" };
        let out = self.ip(&[fam, "neigh", "show", addr]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "lladdr")
            .map(|w| w[1].to_owned())
    }

    /// An interface's MAC as `ip neigh` prints it.
    pub fn mac_string(&self, ifname: &str) -> Result<String> {
        Ok(self
            .mac(ifname)?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys every veth end inside it, and with it the peer.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One end of a veth pair as seen from its namespace.
#[derive(Clone, Debug)]
pub struct VethEnd {
    pub ns: String,
    pub name: String,
}

/// Creates a veth pair between two namespaces, addresses both ends and brings them up,
/// tuned for native XDP.
///
/// For native XDP on veth (see docs/datapath.md): GRO is turned on at both ends so that the
/// receiving side has NAPI for redirected frames, and TX checksum offload is turned off
/// so packets that XDP redirects carry real checksums.
pub fn veth_pair(
    a: &Netns,
    a_addrs: &[&str],
    b: &Netns,
    b_addrs: &[&str],
) -> Result<(VethEnd, VethEnd)> {
    let (ea, eb) = veth_pair_untuned(a, a_addrs, b, b_addrs)?;
    for e in [&ea, &eb] {
        let ns = if e.ns == a.name { a } else { b };
        ns.exec("ethtool", &["-K", &e.name, "tx", "off", "gro", "on"])?;
    }
    Ok((ea, eb))
}

/// A veth pair as `ip link add` makes it: offloads at their defaults (TX checksum
/// offload on, GRO off), as in kind, k3d and containerlab clusters.
pub fn veth_pair_untuned(
    a: &Netns,
    a_addrs: &[&str],
    b: &Netns,
    b_addrs: &[&str],
) -> Result<(VethEnd, VethEnd)> {
    let an = unique_name("va");
    let bn = unique_name("vb");
    sh(
        "ip",
        &[
            "link", "add", &an, "netns", &a.name, "type", "veth", "peer", "name", &bn, "netns",
            &b.name,
        ],
    )?;
    for (ns, name, addrs) in [(a, &an, a_addrs), (b, &bn, b_addrs)] {
        for addr in addrs {
            // nodad: IPv6 addresses are usable at once, without duplicate detection.
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", name, "nodad"])?;
            } else {
                ns.ip(&["addr", "add", addr, "dev", name])?;
            }
        }
        ns.ip(&["link", "set", name, "up"])?;
    }
    Ok((
        VethEnd {
            ns: a.name.clone(),
            name: an,
        },
        VethEnd {
            ns: b.name.clone(),
            name: bn,
        },
    ))
}

/// Runs `f` on a thread inside the named namespace (network namespace only: the mount
/// namespace, and with it bpffs, stays the caller's).
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || -> Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}
