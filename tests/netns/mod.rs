//! Hosts of their own on one machine, for tests and benchmarks of what crosses a network: network
//! namespaces joined by veth pairs to a bridge in a "switch" namespace, a link cut by setting its
//! switch port down. Needs root and iproute2.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hosts on one switch: host 0 at 10.77.NET.1, host i at 10.77.NET.(i+1). Removed on drop.
pub struct Network {
    switch: String,
    pub hosts: Vec<String>,
    net: u8,
}

impl Network {
    pub fn new(net: u8, hosts: usize) -> Self {
        let tag = format!("mp{}-{net}", std::process::id());
        let switch = format!("{tag}-sw");
        let me = Self {
            switch: switch.clone(),
            hosts: (0..hosts).map(|i| format!("{tag}-h{i}")).collect(),
            net,
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for (i, ns) in me.hosts.iter().enumerate() {
            ip(&["netns", "add", ns]);
            let port = format!("port{i}");
            ip(&[
                "link", "add", "name", &port, "netns", &switch, "type", "veth", "peer", "name",
                "eth0", "netns", ns,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", me.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        me
    }

    pub fn addr(&self, host: usize) -> String {
        format!("10.77.{}.{}", self.net, host + 1)
    }

    /// `multipos ARGS` on `host`.
    pub fn multipos(&self, host: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host]])
            .arg(env!("CARGO_BIN_EXE_multipos"));
        c
    }

    /// Cuts (`up = false`) or restores `host`'s only link.
    pub fn link(&self, host: usize, up: bool) {
        let port = format!("port{host}");
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.switch, "link", "set", &port, state]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A coordinator on host 0 and one worker per further host, started with `config` and `sets`.
pub struct Cluster {
    pub coordinator: Child,
    pub workers: Vec<Child>,
}

impl Cluster {
    /// Starts them; `model` is the workers' local copy (None: they fetch the coordinator's). Each
    /// process logs to `logs/NAME.log`.
    pub fn start(
        net: &Network,
        config: &Path,
        sets: &[String],
        model: Option<&Path>,
        logs: &Path,
        token: &str,
    ) -> Self {
        let mut c = net.multipos(0);
        c.arg("coordinator").arg("--config").arg(config);
        for s in sets
            .iter()
            .cloned()
            .chain([format!("cluster.bind=\"{}:0\"", net.addr(0))])
        {
            c.arg("--set").arg(s);
        }
        let mut coordinator = c
            .env("MULTIPOS_CLUSTER_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs.join("coordinator.log")).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(coordinator.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("the coordinator announces").unwrap();
            if let Some(a) = line.strip_prefix("MULTIPOS_COORDINATOR=") {
                break a.trim().to_string();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        let workers = (1..net.hosts.len())
            .map(|host| {
                let rank = host - 1;
                let mut w = net.multipos(host);
                w.args([
                    "worker",
                    "--coordinator",
                    &addr,
                    "--device",
                    "cpu",
                    "--threads",
                    "1",
                ])
                .args([
                    "--rank",
                    &rank.to_string(),
                    "--peer-host",
                    &net.addr(host),
                ]);
                if let Some(model) = model {
                    w.arg("--model").arg(model);
                }
                w.env("MULTIPOS_CLUSTER_TOKEN", token)
                    .env("RUST_LOG", "warn")
                    .stderr(std::fs::File::create(logs.join(format!("worker{rank}.log"))).unwrap())
                    .spawn()
                    .unwrap()
            })
            .collect();
        Self {
            coordinator,
            workers,
        }
    }

    /// Waits for every process (at most `limit` in all) and asserts each finished the run.
    pub fn finish(mut self, logs: &Path, limit: Duration) {
        let started = Instant::now();
        for (name, child) in std::iter::once(("coordinator", &mut self.coordinator))
            .chain(self.workers.iter_mut().map(|w| ("worker", w)))
        {
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                if started.elapsed() > limit {
                    let _ = child.kill();
                    panic!("the {name} did not finish: {}", dump(logs));
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(status.success(), "the {name} failed: {}", dump(logs));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in std::iter::once(&mut self.coordinator).chain(self.workers.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every log of `logs`, for a failure message.
pub fn dump(logs: &Path) -> String {
    let mut text = String::new();
    for e in std::fs::read_dir(logs).unwrap() {
        let p = e.unwrap().path();
        text += &format!(
            "\n--- {}\n{}",
            p.display(),
            std::fs::read_to_string(&p).unwrap()
        );
    }
    text
}

/// Fails with what to do unless this process is root and iproute2 is installed.
pub fn require_root_and_ip() {
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    assert!(
        root && ip,
        "network-namespace hosts need root and iproute2 (CI runs as root; `apt-get install iproute2`)"
    );
}
