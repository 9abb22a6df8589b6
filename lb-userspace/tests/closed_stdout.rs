//! A command whose stdout is closed (`xlb ... | head -2`) ends its output quietly and
//! exits 0: no "failed printing to stdout" panic. Issue 27, item 11.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Output, Stdio},
};

/// Runs xlb with ARGS, its stdout a pipe whose reading end is already closed.
fn run_with_closed_stdout(args: &[&str]) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(args)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn maglev_into_a_closed_pipe_exits_0_quietly() {
    for json in [false, true] {
        let mut args = vec![
            "maglev",
            "--table-size",
            "251",
            "--backend",
            "10.0.0.1:80",
            "--backend",
            "10.0.0.2:80",
        ];
        if json {
            args.push("--json");
        }
        let out = run_with_closed_stdout(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "json={json}: {:?}\n{err}", out.status);
        assert!(
            err.is_empty(),
            "json={json}: nothing on stderr, got:\n{err}"
        );
    }
}
