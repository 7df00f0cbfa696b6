//! A small socket client the tests run inside client pods (the e2e binary re-executes
//! itself as `<exe> __probe ...`), for what redis-cli and dig cannot show: the address
//! `getpeername()` returns, the source address of a reply to an unconnected `sendto()`,
//! and a socket held open across a backend removal.
//!
//! Output is one line per event, flushed at once: `peer <addr>`, `answer <value> from
//! <addr>`, `error <errno> <text>`.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_testbed::{Pod, Testbed};

pub const PROBE_ARG: &str = "__probe";

fn target(args: &[String]) -> SocketAddr {
    let ip: IpAddr = args[0].parse().expect("probe: address");
    let port: u16 = args[1].parse().expect("probe: port");
    SocketAddr::new(ip, port)
}

fn errno_line(err: &std::io::Error) -> String {
    format!("error {} {err}", err.raw_os_error().unwrap_or(0))
}

/// One unconnected query with `sendto()` and its answer with `recvfrom()`: the answer
/// and the address it came from.
fn dns_exchange(
    socket: &UdpSocket,
    addr: SocketAddr,
    id: u16,
    name: &str,
) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    socket.send_to(&dns_query(id, name), addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((buf[..n].to_vec(), from))
}

/// A DNS query for `name`, type A.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The first A record of a DNS response.
fn dns_answer(response: &[u8]) -> Option<String> {
    let skip_name = |mut pos: usize| -> Option<usize> {
        loop {
            let len = *response.get(pos)? as usize;
            if len == 0 {
                return Some(pos + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(pos + 2);
            }
            pos += len + 1;
        }
    };
    let answers = u16::from_be_bytes([*response.get(6)?, *response.get(7)?]);
    let mut pos = skip_name(12)? + 4;
    for _ in 0..answers {
        pos = skip_name(pos)?;
        let rtype = u16::from_be_bytes([*response.get(pos)?, *response.get(pos + 1)?]);
        let rdlen = u16::from_be_bytes([*response.get(pos + 8)?, *response.get(pos + 9)?]) as usize;
        let rdata = response.get(pos + 10..pos + 10 + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            return Some(IpAddr::from([rdata[0], rdata[1], rdata[2], rdata[3]]).to_string());
        }
        pos += 10 + rdlen;
    }
    None
}

fn unspecified_for(addr: &SocketAddr) -> &'static str {
    if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
}

/// Reads one redis reply line (or bulk string) from a stream.
fn redis_reply(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ECONNRESET));
    }
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    // "$7\r\nredis-1\r\n" or "+PONG\r\n"
    Ok(text
        .lines()
        .last()
        .unwrap_or("")
        .trim_start_matches('+')
        .to_string())
}

/// Entry point when the e2e binary runs as a probe.
pub fn main(args: &[String]) -> ! {
    let out = |line: String| {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    };
    let command = args.first().map(String::as_str).unwrap_or("");
    let rest = &args[1.min(args.len())..];
    match command {
        // peer tcp|udp <ip> <port>: connect, then print getpeername().
        "peer" => {
            let addr = target(&rest[1..]);
            let peer = if rest[0] == "tcp" {
                TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .and_then(|s| s.peer_addr())
            } else {
                UdpSocket::bind(unspecified_for(&addr))
                    .and_then(|s| s.connect(addr).and_then(|()| s.peer_addr()))
            };
            match peer {
                Ok(peer) => out(format!("peer {peer}")),
                Err(err) => out(errno_line(&err)),
            }
        }
        // dns-sendto <ip> <port> <name>: unconnected sendto/recvfrom.
        "dns-sendto" => {
            let addr = target(rest);
            let socket = UdpSocket::bind(unspecified_for(&addr)).expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let result = dns_exchange(&socket, addr, 7, &rest[2]);
            match result {
                Ok((response, from)) => out(format!(
                    "answer {} from {from}",
                    dns_answer(&response).unwrap_or_else(|| "none".into())
                )),
                Err(err) => out(errno_line(&err)),
            }
        }
        // hold-udp <ip> <port> <name>: one connected UDP socket, a query every 100 ms,
        // until the socket errors (or 20 s).
        "hold-udp" => {
            let addr = target(rest);
            let socket = UdpSocket::bind(unspecified_for(&addr)).expect("bind");
            socket.connect(addr).expect("connect");
            socket
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let started = Instant::now();
            let mut id = 0u16;
            while started.elapsed() < Duration::from_secs(20) {
                id = id.wrapping_add(1);
                let result = socket.send(&dns_query(id, &rest[2])).and_then(|_| {
                    let mut buf = [0u8; 512];
                    socket.recv(&mut buf).map(|n| buf[..n].to_vec())
                });
                match result {
                    Ok(response) => {
                        let peer = socket
                            .peer_addr()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        out(format!(
                            "answer {} from {peer}",
                            dns_answer(&response).unwrap_or_default()
                        ))
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        out("timeout".into())
                    }
                    Err(err) => {
                        out(errno_line(&err));
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        // hold-tcp <ip> <port>: one redis connection: GET whoami, then PING every
        // 100 ms until the connection errors (or 20 s).
        "hold-tcp" => {
            let addr = target(rest);
            let result =
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"GET whoami\r\n")?;
                    let who = redis_reply(&mut s)?;
                    Ok((s, who))
                });
            match result {
                Ok((mut stream, who)) => {
                    out(format!(
                        "answer {who} from {}",
                        stream
                            .peer_addr()
                            .map(|p| p.to_string())
                            .unwrap_or_default()
                    ));
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_secs(20) {
                        let ping = stream
                            .write_all(b"PING\r\n")
                            .and_then(|()| redis_reply(&mut stream));
                        match ping {
                            Ok(_) => out("ok".into()),
                            Err(err) => {
                                out(errno_line(&err));
                                break;
                            }
                        }
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                Err(err) => out(errno_line(&err)),
            }
        }
        // load <ip> <port> <interval_ms>: a new redis connection (GET whoami) every
        // interval until killed; one line per connection: "ok <who>" or "fail <errno>".
        "load" => {
            let addr = target(rest);
            let interval = Duration::from_millis(rest[2].parse().expect("interval"));
            // 1 s per connection (a lost SYN fails it); stretched on an emulated CPU,
            // where the guest can stall longer than that (see `slow`).
            let limit = crate::support::slow(Duration::from_secs(1));
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(300) {
                let begun = Instant::now();
                let result = TcpStream::connect_timeout(&addr, limit).and_then(|mut s| {
                    s.set_read_timeout(Some(limit))?;
                    s.write_all(b"GET whoami\r\n")?;
                    redis_reply(&mut s)
                });
                match result {
                    Ok(who) => out(format!("ok {who}")),
                    Err(err) => out(format!("fail {}", errno_line(&err))),
                }
                thread::sleep(interval.saturating_sub(begun.elapsed()));
            }
        }
        // hold-many-tcp <ip> <port> <n> <seconds>: n redis connections, each announced
        // as "conn <i> <who> <peer>"; then every 100 ms a PING on each live one and its
        // getpeername(): "error <i> <errno>" when one fails, "peer <i> <addr>" when its
        // peer name differs from the first. Ends after <seconds>.
        "hold-many-tcp" => {
            let addr = target(rest);
            let n: usize = rest[2].parse().expect("count");
            let seconds: u64 = rest[3].parse().expect("seconds");
            let mut conns = Vec::new();
            for i in 0..n {
                let opened =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.write_all(b"GET whoami\r\n")?;
                        let who = redis_reply(&mut s)?;
                        let peer = s.peer_addr()?;
                        Ok((s, who, peer))
                    });
                match opened {
                    Ok((s, who, peer)) => {
                        out(format!("conn {i} {who} {peer}"));
                        conns.push(Some((s, peer)));
                    }
                    Err(err) => {
                        out(format!("error {i} {}", errno_line(&err)));
                        conns.push(None);
                    }
                }
            }
            out("opened".into());
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(seconds) {
                for (i, slot) in conns.iter_mut().enumerate() {
                    let Some((stream, first_peer)) = slot else {
                        continue;
                    };
                    let ping = stream
                        .write_all(b"PING\r\n")
                        .and_then(|()| redis_reply(stream));
                    if let Err(err) = ping {
                        out(format!("error {i} {}", errno_line(&err)));
                        *slot = None;
                        continue;
                    }
                    match stream.peer_addr() {
                        Ok(peer) if peer == *first_peer => {}
                        Ok(peer) => out(format!("peer {i} {peer}")),
                        Err(err) => out(format!("peer {i} {}", errno_line(&err))),
                    }
                }
                out("round".into());
                thread::sleep(Duration::from_millis(100));
            }
        }
        // hold-sendto <ip> <port> <name> <seconds>: one unconnected UDP socket, a query
        // every 100 ms, "answer <a> from <source>" per reply.
        "hold-sendto" => {
            let addr = target(rest);
            let seconds: u64 = rest[3].parse().expect("seconds");
            let socket = UdpSocket::bind(unspecified_for(&addr)).expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let started = Instant::now();
            let mut id = 0u16;
            while started.elapsed() < Duration::from_secs(seconds) {
                id = id.wrapping_add(1);
                let result = dns_exchange(&socket, addr, id, &rest[2]);
                match result {
                    Ok((response, from)) => out(format!(
                        "answer {} from {from}",
                        dns_answer(&response).unwrap_or_default()
                    )),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        out("timeout".into())
                    }
                    Err(err) => out(errno_line(&err)),
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        // churn-udp <ip> <port> <count>: count short-lived UDP sockets, alternately
        // connected (connect, send, close) and unconnected (sendto, close), like a
        // node's resolvers; "done <ms>" at the end.
        "churn-udp" => {
            let addr = target(rest);
            let count: usize = rest[2].parse().expect("count");
            let started = Instant::now();
            for i in 0..count {
                let socket = UdpSocket::bind(unspecified_for(&addr)).expect("bind");
                let sent = if i % 2 == 0 {
                    socket.connect(addr).and_then(|()| socket.send(b"x"))
                } else {
                    socket.send_to(b"x", addr)
                };
                if let Err(err) = sent {
                    out(errno_line(&err));
                    std::process::exit(1);
                }
            }
            out(format!("done {}", started.elapsed().as_millis()));
        }
        other => {
            eprintln!("unknown probe command {other:?}");
            std::process::exit(2);
        }
    }
    std::process::exit(0)
}

/// A probe running in a pod, its output lines collected with arrival times.
pub struct Probe {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Probe {
    /// Starts a probe in `pod`, inside the balanced cgroup.
    pub fn start(tb: &Testbed, pod: &Pod, args: &[&str]) -> Result<Self> {
        let exe = std::env::current_exe()?;
        Self::spawn(
            tb.command(pod, true, exe.to_str().context("exe path")?)?,
            args,
        )
    }

    /// Starts a probe in `pod` of a multi-node world, in `cgroup` if given.
    pub fn start_in(
        world: &lb_testbed::world::World,
        pod: &Pod,
        cgroup: Option<&std::path::Path>,
        args: &[&str],
    ) -> Result<Self> {
        let exe = std::env::current_exe()?;
        Self::spawn(
            world.command(pod, cgroup, exe.to_str().context("exe path")?)?,
            args,
        )
    }

    /// Runs the probe `args` through `cmd` (this binary, in some namespace).
    fn spawn(mut cmd: std::process::Command, args: &[&str]) -> Result<Self> {
        cmd.arg(PROBE_ARG)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting probe")?;
        let stdout = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Ok(Self { child, lines })
    }

    /// Runs a probe to completion and returns its first line.
    pub fn run(tb: &Testbed, pod: &Pod, args: &[&str]) -> Result<String> {
        let mut probe = Self::start(tb, pod, args)?;
        let line = probe.wait_for(|_| true, Duration::from_secs(5))?;
        let _ = probe.child.wait();
        Ok(line)
    }

    /// Waits for the first line (from the start) matching `pred`.
    pub fn wait_for(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, line)) = self.lines.lock().unwrap().iter().find(|(_, l)| pred(l)) {
                return Ok(line.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "probe printed no matching line within {timeout:?}: {:?}",
                    self.lines()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first line matching `pred` printed after `since`, with its arrival time.
    pub fn line_after(
        &self,
        since: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(Instant, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(t, l)| *t >= since && pred(l))
            .cloned()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
