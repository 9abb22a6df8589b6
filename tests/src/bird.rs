//! BIRD 2, the routing daemon bare-metal networks run, started by a test in one of its
//! namespaces: its config and control socket in a directory of the test's own, the
//! process ended (by its PID) and the directory removed on drop.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns::Netns, unique_name};

pub struct Bird {
    child: Child,
    dir: PathBuf,
    ns: String,
    pub socket: PathBuf,
}

impl Bird {
    /// Starts `bird -f` in `ns` with `config`.
    pub fn start(ns: &Netns, config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("xbird"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config)?;
        let socket = dir.join("bird.ctl");
        let log = std::fs::File::create(dir.join("bird.log"))?;
        let child = ns
            .command("bird")
            .args(["-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting bird (Debian package bird2)")?;
        let mut bird = Bird {
            child,
            dir,
            ns: ns.name.clone(),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !bird.socket.exists() {
            if let Some(st) = bird.child.try_wait()? {
                bail!("bird exited with {st}: {}", bird.log());
            }
            if Instant::now() > deadline {
                bail!("bird opened no control socket: {}", bird.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(bird)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// `birdc show ...`.
    pub fn show(&self, what: &[&str]) -> String {
        let out = std::process::Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .arg("show")
            .args(what)
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("birdc: {e}"),
        }
    }

    /// Waits (bounded) until every BGP session is Established.
    pub fn wait_established(&self, sessions: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let protos = self.show(&["protocols"]);
            let up = protos
                .lines()
                .filter(|l| l.contains("BGP") && l.contains("Established"))
                .count();
            if up >= sessions {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{up} of {sessions} BGP sessions established in {}:\n{protos}\n{}",
                    self.ns,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
