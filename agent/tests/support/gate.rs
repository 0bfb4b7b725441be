//! A TCP forwarder on loopback that a test can close and open again: the
//! agent talks to the API server through it, so the test can cut the agent
//! off (every connection reset, new ones refused) while it changes the
//! cluster, then let it back in.
#![allow(dead_code)]

use std::{
    io::copy,
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Gate {
    /// Forwards 127.0.0.1:<port> to 127.0.0.1:`to`.
    pub fn start(to: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind gate");
        let port = listener.local_addr().expect("gate addr").port();
        let gate = Gate {
            port,
            open: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
            stop: Arc::default(),
        };
        let (open, conns, stop) = (gate.open.clone(), gate.conns.clone(), gate.stop.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(inbound) = inbound else { continue };
                if !open.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let pipes = (inbound.try_clone(), outbound.try_clone());
                let (Ok(mut in2), Ok(mut out2)) = pipes else { continue };
                {
                    let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
                    c.extend(inbound.try_clone());
                    c.extend(outbound.try_clone());
                }
                let (mut inbound, mut outbound) = (inbound, outbound);
                std::thread::spawn(move || {
                    let _ = copy(&mut inbound, &mut outbound);
                    let _ = outbound.shutdown(Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = copy(&mut out2, &mut in2);
                    let _ = in2.shutdown(Shutdown::Write);
                });
            }
        });
        gate
    }

    /// Resets every forwarded connection and refuses new ones until [`Gate::open`].
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.close();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
