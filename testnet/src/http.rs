//! The baseline iCBD runs today: one central HTTP server sends every receiver its bytes.
//!
//! A real HTTP/1.0 server and real clients on loopback, in threads of this process. The server's
//! upload and each client's download are capped by token buckets at the scenario's link rates, so
//! the result is the time a central server with those links needs; loopback itself is far faster
//! than any of them. Owns nothing but its sockets, threads and buckets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

const CHUNK: usize = 64 * 1024;

/// A blocking token bucket shared by threads (a fraction of a second of burst).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Arc<Self> {
        Arc::new(Self {
            rate: rate as f64,
            state: Mutex::new((0.0, Instant::now())),
        })
    }

    fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let burst = (self.rate / 20.0).max(CHUNK as f64);
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(burst);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        std::thread::sleep(wait);
    }
}

/// Seconds for `downloads.len()` clients to each fetch `bytes` from one server whose upload is
/// capped at `upload` (None: uncapped) and each client's download at its rate.
pub fn baseline_seconds(
    bytes: u64,
    upload: Option<u64>,
    downloads: &[Option<u64>],
) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server_bucket = upload.map(Bucket::new);
    let clients = downloads.len();
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut handlers = Vec::new();
        for _ in 0..clients {
            let (stream, _) = listener.accept()?;
            let bucket = server_bucket.clone();
            handlers.push(std::thread::spawn(move || serve(stream, bytes, bucket)));
        }
        for h in handlers {
            let _ = h.join();
        }
        Ok(())
    });
    let start = Instant::now();
    let handles: Vec<_> = downloads
        .iter()
        .map(|rate| {
            let bucket = rate.map(Bucket::new);
            std::thread::spawn(move || fetch(addr, bytes, bucket))
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("an HTTP client panicked"))??;
    }
    let seconds = start.elapsed().as_secs_f64();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the HTTP server panicked"))??;
    Ok(seconds)
}

fn serve(stream: TcpStream, bytes: u64, bucket: Option<Arc<Bucket>>) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    // Request line and headers, up to the blank line.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let mut out = stream;
    write!(
        out,
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {bytes}\r\n\r\n"
    )?;
    let chunk = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        if let Some(b) = &bucket {
            b.take(n);
        }
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn fetch(
    addr: std::net::SocketAddr,
    bytes: u64,
    bucket: Option<Arc<Bucket>>,
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    write!(stream, "GET /image HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            length = v.trim().parse::<u64>().ok();
        }
    }
    anyhow::ensure!(length == Some(bytes), "unexpected HTTP answer");
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        let n = reader.read(&mut buf).context("reading the HTTP body")?;
        anyhow::ensure!(n > 0, "the HTTP body ended early");
        if let Some(b) = &bucket {
            b.take(n);
        }
        got += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_server_takes_about_n_times_f_over_u() {
        // 4 clients x 1 MiB through a 8 MiB/s server: about 0.5 s.
        let s = baseline_seconds(1 << 20, Some(8 << 20), &[None; 4]).unwrap();
        assert!(s > 0.3, "{s}");
        let fast = baseline_seconds(1 << 20, None, &[None; 2]).unwrap();
        assert!(fast < s, "{fast} vs {s}");
    }
}
