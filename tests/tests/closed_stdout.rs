//! `xlb uninstall ... | head -2`: a closed stdout ends the output quietly; the removal
//! still completes and the command exits 0 (it panicked with "failed printing to
//! stdout: Broken pipe", leaving the pins it had not reached). Issue 27, item 11.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Stdio},
};

use xlb_tests::{agent::xlb_bin, privileged, topology::LbLab};

#[test]
fn privileged_uninstall_into_a_closed_pipe_removes_everything_and_exits_0() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(1).unwrap();
    lab.write_config(&[0]).unwrap();
    let mut agent = lab.agent().xdp_mode("generic").start().unwrap();
    // SIGTERM leaves the datapath pinned: many pins, one output line each.
    agent.stop_with(libc::SIGTERM).unwrap();
    let pins = std::fs::read_dir(&agent.pin_path).unwrap().count();
    assert!(pins > 2, "{pins} pins");

    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = Command::new(xlb_bin().unwrap())
        .args(["uninstall", "--pin-path"])
        .arg(&agent.pin_path)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !agent.pin_path.exists(),
        "every pin removed, the directory too"
    );
}
