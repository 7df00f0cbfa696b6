//! The load generator. `cargo xtask bench` runs it inside the client namespace (and, for
//! the `lb` mode, inside the balanced cgroup) by re-executing itself with
//! `__bench-client`, and reads one JSON summary from its stdout.
//!
//! `crr`: connect, one request ("PING") and its response ("+PONG"), close, like netperf
//! TCP_CRR; each connection's latency is recorded. `rr`: one connection per thread,
//! many request/response round trips, like TCP_RR.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub const CLIENT_ARG: &str = "__bench-client";

const REQUEST: &[u8] = b"PING\r\n";
const RESPONSE: &[u8] = b"+PONG\r\n";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub samples: usize,
    pub errors: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Connections (crr) or round trips (rr) per second over the whole run.
    pub per_s: f64,
    /// Raw latencies (ns), kept so rounds can be merged before percentiles.
    pub latencies_ns: Vec<u64>,
    pub wall_s: f64,
    /// The first few errors, with when they happened (paced runs only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
}

pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

impl Summary {
    pub fn from_latencies(mut latencies_ns: Vec<u64>, errors: usize, wall: Duration) -> Self {
        latencies_ns.sort_unstable();
        Self {
            samples: latencies_ns.len(),
            errors,
            p50_us: percentile(&latencies_ns, 50.0),
            p90_us: percentile(&latencies_ns, 90.0),
            p99_us: percentile(&latencies_ns, 99.0),
            per_s: latencies_ns.len() as f64 / wall.as_secs_f64(),
            latencies_ns,
            wall_s: wall.as_secs_f64(),
            error_samples: Vec::new(),
        }
    }

    /// Merges rounds measured apart: percentiles over all samples, rate over all time.
    pub fn merge(parts: &[Summary]) -> Self {
        let latencies = parts
            .iter()
            .flat_map(|p| p.latencies_ns.iter().copied())
            .collect();
        let errors = parts.iter().map(|p| p.errors).sum();
        let wall = Duration::from_secs_f64(parts.iter().map(|p| p.wall_s).sum());
        Self::from_latencies(latencies, errors, wall)
    }
}

fn exchange(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(REQUEST)?;
    let mut buf = [0u8; RESPONSE.len()];
    stream.read_exact(&mut buf)?;
    if buf != RESPONSE {
        return Err(std::io::Error::other("unexpected response"));
    }
    Ok(())
}

fn crr_once(target: SocketAddr) -> std::io::Result<Duration> {
    let started = Instant::now();
    // A lost SYN would otherwise block for minutes of retransmissions.
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    exchange(&mut stream)?;
    drop(stream);
    Ok(started.elapsed())
}

/// `crr-paced`: one connection every `interval_ms`, `count` of them, for a run that
/// must span a period of time (restarts under load).
fn crr_paced(target: SocketAddr, count: usize, interval: Duration) -> Summary {
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0;
    let mut samples = Vec::new();
    for n in 0..count {
        let at = started.elapsed();
        match crr_once(target) {
            Ok(d) => latencies.push(d.as_nanos() as u64),
            Err(err) => {
                errors += 1;
                if samples.len() < 10 {
                    samples.push(format!("at {:.3} s: {err}", at.as_secs_f64()));
                }
            }
        }
        let due = interval * (n as u32 + 1);
        std::thread::sleep(due.saturating_sub(started.elapsed()));
    }
    let mut summary = Summary::from_latencies(latencies, errors, started.elapsed());
    summary.error_samples = samples;
    summary
}

/// Runs in the client namespace: `__bench-client crr|rr <targets,...> <count>
/// <concurrency>`, or `crr-paced <target> <count> 1 <interval_ms>`.
pub fn main(args: &[String]) -> Result<()> {
    if let [mode, target, count, _, interval] = args
        && mode == "crr-paced"
    {
        let summary = crr_paced(
            target.parse().context("target")?,
            count.parse()?,
            Duration::from_millis(interval.parse()?),
        );
        serde_json::to_writer(std::io::stdout().lock(), &summary)?;
        return Ok(());
    }
    let [mode, targets, count, concurrency] = args else {
        bail!("usage: {CLIENT_ARG} crr|rr <ip:port,...> <count> <concurrency>");
    };
    let targets: Vec<SocketAddr> = targets
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("targets")?;
    let count: usize = count.parse()?;
    let concurrency: usize = concurrency.parse::<usize>()?.max(1);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<(Vec<u64>, usize)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency)
            .map(|worker| {
                let next = &next;
                let targets = &targets;
                let mode = mode.as_str();
                scope.spawn(move || {
                    let mut latencies = Vec::with_capacity(count / concurrency + 1);
                    let mut errors = 0;
                    if mode == "rr" {
                        let target = targets[worker % targets.len()];
                        let Ok(mut stream) =
                            TcpStream::connect_timeout(&target, Duration::from_secs(1))
                        else {
                            return (latencies, count / concurrency);
                        };
                        let _ = stream.set_nodelay(true);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                        while next.fetch_add(1, Ordering::Relaxed) < count {
                            let t = Instant::now();
                            match exchange(&mut stream) {
                                Ok(()) => latencies.push(t.elapsed().as_nanos() as u64),
                                Err(_) => errors += 1,
                            }
                        }
                    } else {
                        // Several targets (direct mode): pick one at random per connection,
                        // the way the balancers under test do, so queueing at the servers
                        // is alike in every mode.
                        let mut seed = 0x9e37_79b9_7f4a_7c15u64
                            ^ (worker as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
                        loop {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            if n >= count {
                                break;
                            }
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            match crr_once(targets[(seed % targets.len() as u64) as usize]) {
                                Ok(d) => latencies.push(d.as_nanos() as u64),
                                Err(_) => errors += 1,
                            }
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let wall = started.elapsed();
    let errors = results.iter().map(|(_, e)| e).sum();
    let latencies = results.into_iter().flat_map(|(l, _)| l).collect();
    let summary = Summary::from_latencies(latencies, errors, wall);
    serde_json::to_writer(std::io::stdout().lock(), &summary)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_merging() {
        let a = Summary::from_latencies(
            (1..=100).map(|v| v * 1000).collect(),
            0,
            Duration::from_secs(1),
        );
        assert_eq!(a.p50_us, 51.0);
        assert_eq!(a.p99_us, 99.0);
        assert_eq!(a.per_s, 100.0);
        let b = Summary::from_latencies(
            (101..=200).map(|v| v * 1000).collect(),
            2,
            Duration::from_secs(1),
        );
        let merged = Summary::merge(&[a, b]);
        assert_eq!(merged.samples, 200);
        assert_eq!(merged.errors, 2);
        assert_eq!(merged.per_s, 100.0);
        assert_eq!(merged.p50_us, 101.0);
    }

    /// A real loopback server and the real client code path.
    #[test]
    fn crr_against_a_local_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(5) {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; REQUEST.len()];
                stream.read_exact(&mut buf).unwrap();
                stream.write_all(RESPONSE).unwrap();
            }
        });
        for _ in 0..5 {
            assert!(crr_once(addr).unwrap() < Duration::from_secs(1));
        }
    }
}
