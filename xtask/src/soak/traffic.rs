//! Soak traffic on loopback: a small HTTP server, steady keep-alive
//! clients, connection churn (one request per connection, so fds are
//! reused constantly), short-lived client processes, and connections that
//! send a request and never get an answer. Every loop stops at `stop`.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

/// Requests sent so far, by kind.
#[derive(Debug, Default)]
pub struct Counts {
    pub keepalive: AtomicU64,
    pub churn: AtomicU64,
    pub processes: AtomicU64,
    pub unanswered: AtomicU64,
}

pub struct Traffic {
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// Starts the server and all clients.
    pub fn start() -> Result<Traffic> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the soak server")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let mut threads = Vec::new();
        let s = stop.clone();
        threads.push(std::thread::spawn(move || serve(listener, &s)));
        for _ in 0..4 {
            let (s, c) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || keepalive(port, &s, &c)));
        }
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || churn(port, &s, &c)));
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || processes(port, &s, &c)));
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || unanswered(port, &s, &c)));
        Ok(Traffic { counts, stop, threads })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, stop: &Arc<AtomicBool>) {
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let s = stop.clone();
                std::thread::spawn(move || answer(conn, &s));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Answers every request on a connection, except `/hang` ones.
fn answer(conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = conn.set_nodelay(true);
    // Read and write through the same fd, as servers do (a dup'd fd is a
    // different connection key to the agent).
    let mut out = &conn;
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        let hang = line.contains("/hang");
        // Skip the rest of the head.
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(n) if n > 2 => continue,
                _ => break,
            }
        }
        if !hang
            && out
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .is_err()
        {
            return;
        }
    }
}

fn request(conn: &mut TcpStream, path: &str) -> bool {
    if write!(conn, "GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 40 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    true
}

/// Steady keep-alive traffic, ~200 requests/s per client.
fn keepalive(port: u16, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = conn.set_nodelay(true);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        for i in 0..1000 {
            if stop.load(Ordering::Relaxed) || !request(&mut conn, &format!("/steady/{i}")) {
                break;
            }
            counts.keepalive.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One request per connection, ~100 connections/s: fds are reused.
fn churn(port: u16, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            if request(&mut conn, "/churn") {
                counts.churn.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A new short-lived client process every 200 ms.
fn processes(port: u16, stop: &AtomicBool, counts: &Counts) {
    let url = format!("http://127.0.0.1:{port}/process");
    while !stop.load(Ordering::Relaxed) {
        let ok = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-m", "2", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            counts.processes.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Connections that send requests the server never answers, dropped after
/// a second: state the agent must expire, not keep.
fn unanswered(port: u16, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        let mut open = Vec::new();
        for _ in 0..20 {
            if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) {
                for _ in 0..5 {
                    let _ = conn.write_all(b"GET /hang HTTP/1.1\r\nHost: soak\r\n\r\n");
                    counts.unanswered.fetch_add(1, Ordering::Relaxed);
                }
                open.push(conn);
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
