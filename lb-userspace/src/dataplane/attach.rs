//! Attaching the program to interfaces (XDP, and TC egress for dnat replies), and
//! detaching it.

use super::*;

/// How to attach: native, generic, or native where the driver supports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Auto,
    Native,
    Generic,
}

impl Dataplane {
    fn link_pin(&self, iface: &str) -> PathBuf {
        self.pin_path.join(format!("link_{iface}"))
    }

    /// Attaches to `iface` and pins the link. If an earlier agent left a pinned link
    /// there, the new program replaces the old one on that link atomically
    /// (bpf_link_update): there is no moment without a program, and the attach mode is
    /// the link's. Otherwise, in `auto` mode, native first, then generic with a log line.
    pub fn attach(&mut self, iface: &str, mode: XdpAttachMode) -> Result<()> {
        let pin = self.link_pin(iface);
        if pin.exists() {
            let fd_link: FdLink = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?
                .into();
            let link = XdpLink::try_from(fd_link).context("pinned link is not an XDP link")?;
            self.program()?
                .attach_to_link(link)
                .with_context(|| format!("replacing the program on {iface}'s existing link"))?;
            info!(
                iface,
                "adopted the existing attachment: program replaced in place"
            );
            self.attached.push((iface.to_owned(), true));
            self.watch_redirects(iface);
            self.attach_egress(iface)?;
            return Ok(());
        }
        let prog = self.program()?;
        let (id, used) = match mode {
            XdpAttachMode::Native => (
                prog.attach(iface, XdpMode::Driver)
                    .with_context(|| format!("attaching to {iface} in native mode"))?,
                XdpMode::Driver,
            ),
            XdpAttachMode::Generic => (
                prog.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching to {iface} in generic mode"))?,
                XdpMode::Skb,
            ),
            XdpAttachMode::Auto if driver_name(iface).as_deref() == Some("veth") => {
                // Native XDP on veth delivers a redirected frame only when the peer has
                // NAPI (GRO on, or an XDP program of its own) and loses the frame's
                // partial checksum when the sender offloads it: with the defaults of
                // kind, k3d or containerlab every forwarded frame is dropped. Generic
                // mode has neither limit.
                info!(
                    iface,
                    "veth: choosing generic XDP (native mode drops redirected frames unless the peer has GRO on and TX checksum offload off; --xdp-mode native to force it)"
                );
                (
                    prog.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching to {iface} in generic mode"))?,
                    XdpMode::Skb,
                )
            }
            XdpAttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, XdpMode::Driver),
                Err(e) => {
                    warn!(iface, error = %e, "native XDP unavailable, falling back to generic mode");
                    let id = prog
                        .attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching to {iface} in generic mode"))?;
                    (id, XdpMode::Skb)
                }
            },
        };
        let link = prog.take_link(id)?;
        let fd_link = FdLink::try_from(link)
            .context("the kernel attached without a bpf link; cannot pin it")?;
        let pinned = fd_link
            .pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        self.links.push(pinned);
        restrict_pins(&self.pin_path)?;
        info!(iface, mode = mode_name(used), "attached");
        self.attached.push((iface.to_owned(), false));
        self.watch_redirects(iface);
        self.attach_egress(iface)?;
        Ok(())
    }

    fn egress_pin(&self, iface: &str) -> PathBuf {
        self.pin_path.join(format!("tclink_{iface}"))
    }

    /// The TC egress program (dnat replies from backends on this host, see the eBPF
    /// crate's egress.rs) on `iface`, at TCX egress, pinned like the XDP link and
    /// replaced in place when an earlier agent left one.
    fn attach_egress(&mut self, iface: &str) -> Result<()> {
        let pin = self.egress_pin(iface);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(EGRESS_PROGRAM)
            .context("TC egress program missing from the object")?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()
                .context("the kernel rejected the TC egress program")?;
        }
        if pin.exists() {
            let fd_link: FdLink = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?
                .into();
            let link =
                SchedClassifierLink::try_from(fd_link).context("pinned link is not a TC link")?;
            prog.attach_to_link(link)
                .with_context(|| format!("replacing the egress program on {iface}"))?;
            return Ok(());
        }
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| format!("attaching the egress program to {iface} (TCX)"))?;
        let link = prog.take_link(id)?;
        let fd_link = FdLink::try_from(link).context("TCX attached without a bpf link")?;
        let pinned = fd_link
            .pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        self.links.push(pinned);
        restrict_pins(&self.pin_path)?;
        Ok(())
    }

    /// Counts the frames redirected from `iface` that the kernel then fails to send
    /// (`event_redirect_failed`), through two raw tracepoints loaded on first use. They
    /// are not pinned: they count while this agent runs. Failing here only warns, as
    /// forwarding does not depend on it.
    fn watch_redirects(&mut self, iface: &str) {
        if let Err(e) = self.try_watch_redirects(iface) {
            warn!(
                iface,
                error = format!("{e:#}"),
                "redirect failures will not be counted"
            );
        }
    }

    fn try_watch_redirects(&mut self, iface: &str) -> Result<()> {
        let name = CString::new(iface)?;
        // SAFETY: if_nametoindex reads a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "{iface} has no ifindex");
        if !self.watching_redirects {
            let off = crate::btf::kernel_member_offset;
            let layout = lb_common::NetdevLayout {
                ifindex: off("net_device", "ifindex")?,
                nd_net: off("net_device", "nd_net")?,
                net_inum: off("net", "ns")? + off("ns_common", "inum")?,
                _pad: 0,
            };
            let mut map: aya::maps::Array<_, lb_common::NetdevLayout> = aya::maps::Array::try_from(
                self.ebpf
                    .map_mut("XLB_NETDEV_LAYOUT")
                    .context("map XLB_NETDEV_LAYOUT missing")?,
            )?;
            map.set(0, layout, 0)?;
            for (prog, tracepoint) in [
                ("xlb_devmap_xmit", "xdp_devmap_xmit"),
                ("xlb_redirect_err", "xdp_redirect_err"),
            ] {
                let p: &mut aya::programs::RawTracePoint = self
                    .ebpf
                    .program_mut(prog)
                    .with_context(|| format!("program {prog} missing"))?
                    .try_into()?;
                p.load().with_context(|| format!("loading {prog}"))?;
                p.attach(tracepoint)
                    .with_context(|| format!("attaching to the {tracepoint} tracepoint"))?;
            }
            self.watching_redirects = true;
        }
        use std::os::unix::fs::MetadataExt;
        let netns = std::fs::metadata("/proc/self/ns/net")
            .context("reading this process's network namespace")?
            .ino() as u32;
        let mut watch: aya::maps::HashMap<_, u64, u8> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut("XLB_REDIRECT_WATCH")
                .context("map XLB_REDIRECT_WATCH missing")?,
        )?;
        watch.insert(lb_common::watch_key(netns, ifindex), 1, 0)?;
        Ok(())
    }

    /// Removes this agent's attachments (the pinned links). The maps stay pinned.
    pub fn detach(&mut self) -> Result<()> {
        for (iface, _) in std::mem::take(&mut self.attached) {
            remove_link(&self.link_pin(&iface))?;
            remove_link(&self.egress_pin(&iface))?;
        }
        self.links.clear();
        Ok(())
    }
}

pub(super) fn remove_link(pin: &Path) -> Result<()> {
    if pin.exists() {
        let fd_link = PinnedLink::from_pin(pin)
            .with_context(|| format!("opening pinned link {}", pin.display()))?
            .unpin()
            .with_context(|| format!("unpinning {}", pin.display()))?;
        // Closing the last reference to the link detaches the program.
        drop(fd_link);
    }
    Ok(())
}

/// The interface's driver as `ethtool -i` names it (SIOCETHTOOL, ETHTOOL_GDRVINFO).
pub fn driver_name(iface: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if iface.len() >= 16 {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket only used for this ioctl and closed at once; `req`
    // and the buffer it points at outlive the call and have the kernel's layout.
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req);
        libc::close(fd);
        rc == 0
    };
    if !ok {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

pub fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}
