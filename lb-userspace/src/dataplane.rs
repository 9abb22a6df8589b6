//! Loading, attaching and pinning the XDP program, and access to its maps.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::PROGRAM_NAME;
use tracing::{info, warn};

use crate::cli::XdpModeArg;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The loaded program and its maps. Dropping it detaches the program from every
/// interface; the pinned maps stay for the next agent.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub pin_path: PathBuf,
    pub attached: Vec<(String, XdpMode)>,
}

impl Dataplane {
    /// Loads the program, reusing maps already pinned under `pin_path`.
    pub fn load(pin_path: &Path) -> Result<Self> {
        ensure_bpffs(pin_path)?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .load(crate::EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading the XDP program (maps pinned in {})",
                    pin_path.display()
                )
            })?;
        let mut dp = Self {
            ebpf,
            pin_path: pin_path.to_owned(),
            attached: Vec::new(),
        };
        dp.program()?
            .load()
            .context("the kernel rejected the XDP program")?;
        Ok(dp)
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .context("XDP program missing from the object")?
            .try_into()?)
    }

    /// Attaches to `iface`. In `auto` mode, native first, then generic with a log line.
    pub fn attach(&mut self, iface: &str, mode: XdpModeArg) -> Result<XdpMode> {
        let prog = self.program()?;
        let used = match mode {
            XdpModeArg::Native => {
                prog.attach(iface, XdpMode::Driver)
                    .with_context(|| format!("attaching to {iface} in native mode"))?;
                XdpMode::Driver
            }
            XdpModeArg::Generic => {
                prog.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching to {iface} in generic mode"))?;
                XdpMode::Skb
            }
            XdpModeArg::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(_) => XdpMode::Driver,
                Err(e) => {
                    warn!(iface, error = %e, "native XDP unavailable, falling back to generic mode");
                    prog.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching to {iface} in generic mode"))?;
                    XdpMode::Skb
                }
            },
        };
        info!(iface, mode = mode_name(used), "attached");
        self.attached.push((iface.to_owned(), used));
        Ok(used)
    }
}

pub fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

/// Makes sure `dir` exists on a bpffs, mounting one at `/sys/fs/bpf` if the machine
/// has none (containers and minimal hosts often don't).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).ok();
        mount_bpffs(root)?;
        info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpf filesystem; choose a --pin-path under a bpffs mount",
            dir.display()
        );
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; c is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    let fstype = CString::new("bpf")?;
    // SAFETY: all pointers are valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
