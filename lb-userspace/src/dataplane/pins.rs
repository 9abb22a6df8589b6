//! The pin directory: a bpffs, locked while an agent runs; xlb's pins in it, and
//! removing them.

use super::*;

/// A map a running agent pinned, for the commands that read it (`xlb status`, the
/// announcement's drain flag): a missing pin says which path was looked at.
pub fn open_pinned(pin_path: &Path, name: &str) -> Result<MapData> {
    let path = pin_path.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is `xlb run` running with --pin-path {}?)",
            path.display(),
            pin_path.display()
        )
    })
}

/// Whether `name` is one xlb pins: a map of its object (`maps`), a map of another
/// version (`XLB_` prefix), or `link_<iface>` / `tclink_<iface>`.
fn is_xlb_pin(name: &str, maps: &BTreeSet<String>) -> bool {
    if let Some(iface) = name
        .strip_prefix("link_")
        .or_else(|| name.strip_prefix("tclink_"))
    {
        return !iface.is_empty() && iface.len() < 16;
    }
    maps.contains(name) || name.starts_with("XLB_")
}

/// `xlb detach`: removes everything xlb pinned under `pin_path`: the links (which
/// detaches the program from every interface), then the maps, then the directory.
/// Only on a bpffs, and only when the directory holds nothing but xlb's pins: a
/// mistyped path must never lose someone else's files.
pub fn detach_all(pin_path: &Path) -> Result<Vec<String>> {
    if !pin_path.is_dir() {
        bail!(
            "{}: no such directory (nothing is pinned there)",
            pin_path.display()
        );
    }
    if !is_bpffs(pin_path) {
        bail!(
            "{} is not on a bpf filesystem: it cannot hold xlb's pins, and nothing was removed",
            pin_path.display()
        );
    }
    let mut removed = Vec::new();
    let entries =
        std::fs::read_dir(pin_path).with_context(|| format!("reading {}", pin_path.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let maps: BTreeSet<String> = aya_obj::Object::parse(crate::EBPF_OBJECT)
        .context("parsing the eBPF object")?
        .maps
        .into_keys()
        .collect();
    let foreign: Vec<String> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !is_xlb_pin(n, &maps))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "{} holds pins that are not xlb's ({}): refusing to remove anything; is this the right --pin-path?",
            pin_path.display(),
            foreign.join(", ")
        );
    }
    let (links, maps): (Vec<_>, Vec<_>) = paths.into_iter().partition(|p| {
        p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with("link_") || n.starts_with("tclink_")
        })
    });
    for p in links.iter().chain(&maps) {
        if links.contains(p) {
            remove_link(p)?;
        } else {
            std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        }
        removed.push(
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    // remove_dir fails on a directory that is not empty (something appeared meanwhile).
    std::fs::remove_dir(pin_path).with_context(|| format!("removing {}", pin_path.display()))?;
    Ok(removed)
}

/// Root only: the pin directory 0700 and every pin in it 0600. The maps hold the
/// flows of every client; anyone who can open them can read or rewrite the datapath.
pub(super) fn restrict_pins(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

/// Unpins the maps under `pin_path` that this program cannot use: created by another
/// xlb version with another layout (map type, key or value size). aya would adopt them
/// as they are, and the verifier would then reject the program, or a value of the same
/// size but another layout would be read wrong. A fresh map replaces each; what it held
/// (flows, for conntrack and reverse NAT) is lost, and said so. Returns their names.
pub fn drop_incompatible_pins(pin_path: &Path) -> Result<Vec<String>> {
    let obj = aya_obj::Object::parse(crate::EBPF_OBJECT).context("parsing the eBPF object")?;
    let operator_sized = LoadOptions::default().map_sizes().map(|(name, _)| name);
    let mut dropped = Vec::new();
    for (name, def) in &obj.maps {
        let pin = pin_path.join(name);
        if !pin.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&pin)
            .with_context(|| format!("reading the pinned map {}", pin.display()))?;
        // Maps sized by the operator keep the size they were created with (load warns
        // of it); any other map of another size was left by a version with another
        // fixed size, e.g. fewer counters, whose new entries would not exist.
        let sized_here = !operator_sized.contains(&name.as_str());
        // The flags too: the flow tables are mmapable arrays (BPF_F_MMAPABLE), which
        // the agent maps; an array without it could not be.
        let pinned = (
            info.map_type().map(|t| t as u32).ok(),
            info.key_size(),
            info.value_size(),
            sized_here.then(|| info.max_entries()),
            info.map_flags(),
        );
        let wanted = (
            Some(def.map_type()),
            def.key_size(),
            def.value_size(),
            sized_here.then(|| def.max_entries()),
            def.map_flags(),
        );
        let flow_table =
            [lb_common::MAP_CONNTRACK, lb_common::MAP_REVERSE_NAT].contains(&name.as_str());
        if pinned == wanted && flow_table && super::carry::earlier_hash(&pin, &info)? {
            info!(
                map = %name,
                "pinned flow table is bucketed by an earlier version's flow hash: replacing it, its flows are carried over"
            );
            std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
            dropped.push(name.clone());
        } else if pinned != wanted {
            warn!(
                map = %name,
                ?pinned,
                ?wanted,
                "pinned map has another layout (type, key size, value size, fixed size, flags): replacing it, its contents are lost"
            );
            std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
            dropped.push(name.clone());
        }
    }
    Ok(dropped)
}

/// Makes sure `dir` exists on a bpffs, mounting one at `/sys/fs/bpf` if the machine
/// has none (containers and minimal hosts often don't).
///
/// Returns whether the pins will vanish with this process: the bpffs was mounted here,
/// in a mount namespace of this process's own (`ip netns exec` gives every command a
/// private one, with a fresh /sys), so nothing outside it can keep the pins alive.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    let root = Path::new("/sys/fs/bpf");
    let mut private = false;
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).ok();
        mount_bpffs(root)?;
        private = private_mount_namespace();
        if private {
            warn!(
                "mounted a bpffs at /sys/fs/bpf in a mount namespace of this process's own (as `ip netns exec` makes, \
                 with a fresh /sys that hides the host's bpffs whether or not one is mounted there): the pins, and with \
                 them the datapath, end when xlb exits. To run xlb in a network namespace and keep its pins, join only \
                 the network namespace: `nsenter --net=/run/netns/NAME xlb run ...`"
            );
        } else {
            info!("mounted bpffs at /sys/fs/bpf");
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpf filesystem; choose a --pin-path under a bpffs mount",
            dir.display()
        );
    }
    Ok(private)
}

/// Whether this process runs in another mount namespace than PID 1's.
fn private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(me), Ok(init)) => me != init,
        // `ip netns exec` leaves PID 1's namespace unreadable from inside: not ours.
        (Ok(_), Err(_)) => true,
        _ => false,
    }
}

/// Takes an exclusive lock on the pin directory for this agent's lifetime: a second
/// agent on the same pins would take the links over and the first one's reloads would
/// silently apply to nothing. The error names the agent holding it.
pub(super) fn lock_pin_path(dir: &Path) -> Result<std::fs::File> {
    match try_lock_pin_path(dir)? {
        Ok(f) => Ok(f),
        Err(who) => bail!(
            "another xlb agent runs on {}: {who}. One agent per pin path: stop it, or give this one another --pin-path",
            dir.display()
        ),
    }
}

/// The pin directory's lock, if no one holds it; otherwise who does ("pid N (cmdline)").
pub fn try_lock_pin_path(dir: &Path) -> Result<std::result::Result<std::fs::File, String>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Ok(f));
    }
    Ok(Err(match pin_lock_holder(dir) {
        Some(pid) => {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default();
            format!("pid {pid} ({cmd})")
        }
        None => "another process (in another PID namespace?)".to_owned(),
    }))
}

/// The process holding the pin directory's lock (the agent running on it), read from
/// /proc/locks without taking the lock. None: no one, or one in another PID namespace.
pub fn pin_lock_holder(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).ok()?;
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    std::fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|l| {
            // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
                .then(|| f.get(4)?.parse().ok())?
        })
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
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EPERM) {
            bail!(
                "{} is not a BPF filesystem, and mounting one there needs CAP_SYS_ADMIN: mount the host's (in Kubernetes a hostPath volume of /sys/fs/bpf, as the DaemonSet has; with podman -v /sys/fs/bpf:/sys/fs/bpf)",
                path.display()
            );
        }
        bail!("mounting bpffs at {}: {err}", path.display());
    }
    Ok(())
}
