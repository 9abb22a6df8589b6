//! FRR (Debian's frr), the other routing daemon bare-metal networks run: zebra and
//! bgpd started by a test in one of its namespaces, each with its own `-f`, `-z`, `-i`
//! and `--vty_socket` paths in a directory of the test's own that the frr user can
//! write; ended (by their PIDs) and the directory removed on drop.

use std::{
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns::Netns, unique_name};

const DAEMONS: &str = "/usr/lib/frr";

pub struct Frr {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Frr {
    /// Starts zebra, then bgpd, in `ns`, both reading `config` (an integrated frr.conf).
    pub fn start(ns: &Netns, config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("xfrr"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("frr.conf");
        std::fs::write(&conf, config)?;
        // The daemons drop to the frr user: it must write its sockets and pid files here.
        for p in [&dir, &conf] {
            std::process::Command::new("chown")
                .args(["frr:frr"])
                .arg(p)
                .status()
                .context("chown frr:frr (Debian package frr)")?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775))?;
        let zsock = dir.join("zserv.api");
        let mut frr = Frr {
            children: Vec::new(),
            dir: dir.clone(),
        };
        for daemon in ["zebra", "bgpd"] {
            let log = std::fs::File::create(dir.join(format!("{daemon}.log")))?;
            let child = ns
                .command(&format!("{DAEMONS}/{daemon}"))
                .arg("-f")
                .arg(&conf)
                .arg("-z")
                .arg(&zsock)
                .arg("-i")
                .arg(dir.join(format!("{daemon}.pid")))
                .arg("--vty_socket")
                .arg(&dir)
                .args(["-u", "frr", "-g", "frr", "--log", "stdout"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {daemon} (Debian package frr)"))?;
            frr.children.push(child);
            // bgpd talks to zebra through its socket: wait for it.
            if daemon == "zebra" {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !zsock.exists() {
                    if let Some(st) = frr.children[0].try_wait()? {
                        bail!("zebra exited with {st}: {}", frr.log());
                    }
                    if Instant::now() > deadline {
                        bail!("zebra opened no socket: {}", frr.log());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for (i, c) in frr.children.iter_mut().enumerate() {
            if let Some(st) = c.try_wait()? {
                bail!("FRR daemon {i} exited with {st}: {}", frr.log());
            }
        }
        Ok(frr)
    }

    pub fn log(&self) -> String {
        ["zebra", "bgpd"]
            .iter()
            .map(|d| std::fs::read_to_string(self.dir.join(format!("{d}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
