//! Active health checks: a backend whose health port stops answering leaves the Maglev
//! table (no new flows) while its established connection keeps working, shows as
//! unhealthy in `xlb status` and the metrics, and comes back when it recovers.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xlb_tests::{
    agent::Agent,
    cfg::{Cfg, CheckKind, HealthCheck, Svc},
    netns::Netns,
    privileged,
    topology::{LbLab, VIP4},
    traffic::connect,
};

/// A health endpoint that accepts (and closes) connections until stopped.
struct HealthPort {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthPort {
    fn start(ns: &Netns) -> Self {
        let listener = ns
            .run(|| TcpListener::bind("0.0.0.0:9000").unwrap())
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = listener.accept();
                std::thread::sleep(Duration::from_millis(5));
            }
            // The listener is dropped here: connections are refused from now on.
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for HealthPort {
    fn drop(&mut self) {
        self.stop();
    }
}

fn backend_healthy(agent: &Agent, addr: &str) -> bool {
    let st = agent.status().unwrap();
    let svc = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vip"] == VIP4 && s["port"] == 80)
        .unwrap();
    let b = svc["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .unwrap();
    b["healthy"].as_bool().unwrap()
}

#[test]
fn privileged_failing_backend_leaves_and_returns() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm(3).unwrap();
    let life = Duration::from_secs(60);
    let servers = lab.start_backends(life).unwrap();
    let mut health: Vec<HealthPort> = lab.backends.iter().map(HealthPort::start).collect();
    lab.write(
        &Cfg::new().snat4(lab.snat4).service(
            Svc::tcp("web", VIP4, 80)
                .backends((0..3).map(|i| lab.backend(i, false)))
                .health_check(HealthCheck {
                    kind: CheckKind::Tcp,
                    port: Some(9000),
                    path: None,
                    interval_ms: 200,
                    timeout_ms: 100,
                    rise: 2,
                    fall: 2,
                    keep_established: true,
                }),
        ),
    )
    .unwrap();
    let mut agent = lab.agent().xdp_mode("generic").start().unwrap();
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let b1 = lab.backend(1, false).to_string();

    // An established connection on b1.
    let mut on_b1 = (0..60)
        .map(|i| {
            let mut c = connect(&lab.client, vip);
            (c.exchange(&format!("find-{i}")).unwrap(), c)
        })
        .find(|(b, _)| *b == 1)
        .map(|(_, c)| c)
        .expect("some flow lands on b1");
    assert!(backend_healthy(&agent, &b1));

    health[1].stop();
    agent
        .wait_for_log("backend unhealthy", Duration::from_secs(10))
        .unwrap();
    agent
        .wait_for_log("health change applied", Duration::from_secs(10))
        .unwrap();
    assert!(!backend_healthy(&agent, &b1), "status shows b1 unhealthy");
    for i in 0..30 {
        assert_ne!(
            connect(&lab.client, vip)
                .exchange(&format!("new-{i}"))
                .unwrap(),
            1,
            "a new flow reached the unhealthy backend"
        );
    }
    assert_eq!(
        on_b1.exchange("still-here").unwrap(),
        1,
        "the established flow on b1 keeps working"
    );

    health[1] = HealthPort::start(&lab.backends[1]);
    agent
        .wait_for_log("backend healthy", Duration::from_secs(10))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !backend_healthy(&agent, &b1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        backend_healthy(&agent, &b1),
        "status shows b1 healthy again"
    );
    let back = (0..40).any(|i| {
        connect(&lab.client, vip)
            .exchange(&format!("back-{i}"))
            .unwrap()
            == 1
    });
    assert!(back, "new flows reach b1 again");
    drop(servers);
}
