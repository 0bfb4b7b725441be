//! The gRPC exporter's TCP connection, with writes gathered into large
//! ones.
//!
//! HTTP/2 (h2) writes each DATA frame with its own `writev` and flushes
//! after each one, and a collector's frames are 16 KiB (the default
//! `SETTINGS_MAX_FRAME_SIZE`, which only the receiver can raise): a 250 KB
//! export request took 16 system calls, each also paying the receiving
//! side of the loopback or NIC path and a wakeup of the collector.
//!
//! Here writes go into a buffer of [`GATHER_BYTES`], and a flush while
//! anything is buffered only wakes the task (once): the frames written
//! until the task is polled again are gathered, and its next read writes
//! them out together, before reading. Only h2's connection task touches
//! the socket once connected (requests and bodies queue frames and wake
//! it), and each of its polls either reaches a read or waits for the
//! socket to drain a write it started; a TLS handshake reads for the
//! answer to each flight it flushes, and its last flight goes out at the
//! connection task's first read. So nothing waits in the buffer beyond one
//! poll of that task; a full buffer or a shutdown (GOAWAY, close_notify)
//! writes out too. The wake happens once per put-off flush: waking on
//! every flush would spin while the socket is full.
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf},
    net::TcpStream,
};
use tonic::codegen::http::Uri;

/// Largest write the exporter's connection makes.
pub const GATHER_BYTES: usize = 256 * 1024;

/// A connection whose writes are gathered until flushed.
pub type Gathered = TokioIo<Gather>;

/// A TCP stream whose writes are buffered, and whose flushes are put off
/// to the next read, in the next poll of its task (see the module's text).
pub struct Gather {
    inner: BufWriter<TcpStream>,
    /// A flush was put off and the task woken: the next read writes out.
    deferred: bool,
}

impl AsyncRead for Gather {
    /// Writes out a put-off flush first: whoever waits for an answer has
    /// sent its question (a TLS handshake flushes once and then reads).
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.deferred {
            match Pin::new(&mut me.inner).poll_flush(cx) {
                Poll::Ready(Ok(())) => me.deferred = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The socket's writability wakes the task; read meanwhile.
                Poll::Pending => {}
            }
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gather {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Put off while anything is buffered: the task is woken (once) and
    /// its next read writes the buffer out.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.inner.buffer().is_empty() {
            if !me.deferred {
                me.deferred = true;
                cx.waker().wake_by_ref();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // BufWriter writes out what it holds before shutting down.
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Connects as tonic's own connector does (TCP_NODELAY, any address the
/// host resolves to), then gathers the connection's writes.
#[derive(Clone)]
pub struct GatheringConnector {
    http: HttpConnector,
}

impl GatheringConnector {
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        // tonic's connector takes https URIs too (TLS goes on top).
        http.enforce_http(false);
        http.set_nodelay(true);
        Self { http }
    }
}

impl tower_service::Service<Uri> for GatheringConnector {
    type Response = Gathered;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Gathered, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(std::io::Error::other)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let tcp = connecting.await.map_err(std::io::Error::other)?.into_inner();
            Ok(TokioIo::new(Gather {
                inner: BufWriter::with_capacity(GATHER_BYTES, tcp),
                deferred: false,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::Wake,
        time::Duration,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower_service::Service;

    use super::*;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn nothing_arrives(peer: &mut TcpStream) -> bool {
        let mut probe = [0u8; 1];
        tokio::time::timeout(Duration::from_millis(100), peer.read(&mut probe))
            .await
            .is_err()
    }

    /// Writes stay in the buffer through flushes, which wake the task
    /// once; the next read sends them whole before reading. Shutting down
    /// sends what is buffered.
    #[tokio::test]
    async fn flushes_wake_the_task_and_the_next_read_sends_what_was_gathered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let uri: Uri = format!("http://{addr}").parse().expect("uri");
        let mut connector = GatheringConnector::new();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .expect("ready");
        let (io, accepted) = tokio::join!(connector.call(uri), listener.accept());
        let mut gather = io.expect("connect").into_inner();
        let (mut peer, _) = accepted.expect("accept");

        let wakes = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..16 {
            gather.write_all(&[7; 1000]).await.expect("write");
            let flushed = Pin::new(&mut gather).poll_flush(&mut cx);
            assert!(matches!(flushed, Poll::Ready(Ok(()))));
        }
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the first put-off flush wakes the task"
        );
        assert!(nothing_arrives(&mut peer).await, "flushes are put off");

        // The peer answers once it has everything: the read must send first.
        let answer = tokio::spawn(async move {
            let mut got = vec![0u8; 16_000];
            peer.read_exact(&mut got).await.expect("read");
            assert!(got.iter().all(|&b| b == 7));
            peer.write_all(b"pong").await.expect("answer");
            peer
        });
        let mut pong = [0u8; 4];
        gather.read_exact(&mut pong).await.expect("read answer");
        assert_eq!(&pong, b"pong");
        let mut peer = answer.await.expect("peer");

        gather.write_all(b"bye").await.expect("write");
        gather.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.expect("read to end");
        assert_eq!(rest, b"bye");
    }
}
