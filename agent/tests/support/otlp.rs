//! An in-test OTLP receiver (gRPC and HTTP/protobuf) built on the official
//! protobuf definitions (`opentelemetry-proto`). It records what it decodes
//! and the raw request bytes, and can be stopped and started again on the
//! same port to play a collector that goes away.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, routing::post, Router};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            metrics_service_server::{MetricsService, MetricsServiceServer},
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        },
        trace::v1::{
            trace_service_server::{TraceService, TraceServiceServer},
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        },
    },
    common::v1::{any_value::Value, AnyValue, KeyValue},
    trace::v1::Span,
};
use prost::Message;

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct Received {
    pub resource: HashMap<String, String>,
    pub span: Span,
}

impl Received {
    pub fn attr(&self, key: &str) -> Option<String> {
        attrs(&self.span.attributes).remove(key)
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value_string(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| value_string(&Some(v.clone())))
            .collect::<Vec<_>>()
            .join(","),
        _ => String::new(),
    }
}

pub fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), value_string(&kv.value))).collect()
}

#[derive(Default)]
struct Store {
    spans: Vec<Received>,
    metric_requests: Vec<ExportMetricsServiceRequest>,
    raw: Vec<Vec<u8>>,
    /// Trace export requests still to refuse as temporarily unavailable.
    refuse: usize,
    /// Trace export requests refused so far.
    refused: usize,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Store>>);

impl Shared {
    /// True when this trace request is to be refused (and counts it).
    fn refuse(&self) -> bool {
        let mut store = self.0.lock().expect("store lock");
        if store.refuse == 0 {
            return false;
        }
        store.refuse -= 1;
        store.refused += 1;
        true
    }

    fn traces(&self, req: ExportTraceServiceRequest, raw: Vec<u8>) {
        let mut store = self.0.lock().expect("store lock");
        store.raw.push(raw);
        for rs in req.resource_spans {
            let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    store.spans.push(Received {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
    }
    fn metrics(&self, req: ExportMetricsServiceRequest, raw: Vec<u8>) {
        let mut store = self.0.lock().expect("store lock");
        store.raw.push(raw);
        store.metric_requests.push(req);
    }
}

#[tonic::async_trait]
impl TraceService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.refuse() {
            return Err(tonic::Status::unavailable("test collector: try again"));
        }
        let req = request.into_inner();
        let raw = req.encode_to_vec();
        self.traces(req, raw);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Shared {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let req = request.into_inner();
        let raw = req.encode_to_vec();
        self.metrics(req, raw);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_traces(State(shared): State<Shared>, body: Bytes) -> axum::http::StatusCode {
    if shared.refuse() {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(req) => {
            shared.traces(req, body.to_vec());
            axum::http::StatusCode::OK
        }
        Err(_) => axum::http::StatusCode::BAD_REQUEST,
    }
}

async fn http_metrics(State(shared): State<Shared>, body: Bytes) -> axum::http::StatusCode {
    match ExportMetricsServiceRequest::decode(body.as_ref()) {
        Ok(req) => {
            shared.metrics(req, body.to_vec());
            axum::http::StatusCode::OK
        }
        Err(_) => axum::http::StatusCode::BAD_REQUEST,
    }
}

/// Which OTLP transport the receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

pub struct Receiver {
    pub addr: SocketAddr,
    transport: Transport,
    /// Certificate and key (PEM) a gRPC receiver serves TLS with.
    tls: Option<(Vec<u8>, Vec<u8>)>,
    shared: Shared,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    pub fn start(transport: Transport) -> Receiver {
        Self::start_with_tls(transport, None)
    }

    /// A gRPC receiver that serves TLS with this certificate and key (PEM),
    /// named `localhost` in [`Self::endpoint`].
    pub fn start_tls(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Receiver {
        Self::start_with_tls(Transport::Grpc, Some((cert_pem, key_pem)))
    }

    fn start_with_tls(transport: Transport, tls: Option<(Vec<u8>, Vec<u8>)>) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let addr = runtime.block_on(async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind")
                .local_addr()
                .expect("addr")
        });
        let mut r = Receiver {
            addr,
            transport,
            tls,
            shared: Shared::default(),
            runtime,
            stop: None,
        };
        r.resume();
        r
    }

    /// The endpoint URL the agent should export to.
    pub fn endpoint(&self) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// Stops listening (the port refuses connections) and keeps what was received.
    pub fn pause(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Listens again on the same port.
    pub fn resume(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        let shared = self.shared.clone();
        let addr = self.addr;
        let listener = super::rebind(&self.runtime, addr);
        match self.transport {
            Transport::Grpc => {
                let incoming = tokio_stream_from(listener);
                let mut server = tonic::transport::Server::builder();
                if let Some((cert, key)) = &self.tls {
                    let identity = tonic::transport::Identity::from_pem(cert, key);
                    server = server
                        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                        .expect("receiver TLS");
                }
                self.runtime.spawn(async move {
                    let _ = server
                        .add_service(TraceServiceServer::new(shared.clone()))
                        .add_service(MetricsServiceServer::new(shared))
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = rx.await;
                        })
                        .await;
                });
            }
            Transport::Http => {
                let app = Router::new()
                    .route("/v1/traces", post(http_traces))
                    .route("/v1/metrics", post(http_metrics))
                    .with_state(shared);
                self.runtime.spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
            }
        }
    }

    /// Refuses the next `n` trace export requests as temporarily
    /// unavailable (gRPC UNAVAILABLE, HTTP 503), as a collector under load does.
    pub fn refuse_next(&self, n: usize) {
        self.shared.0.lock().expect("store lock").refuse = n;
    }

    /// Trace export requests refused so far.
    pub fn refused(&self) -> usize {
        self.shared.0.lock().expect("store lock").refused
    }

    pub fn spans(&self) -> Vec<Received> {
        self.shared.0.lock().expect("store lock").spans.clone()
    }

    pub fn metric_requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.shared.0.lock().expect("store lock").metric_requests.clone()
    }

    /// Every request body received, as raw protobuf bytes.
    pub fn raw(&self) -> Vec<Vec<u8>> {
        self.shared.0.lock().expect("store lock").raw.clone()
    }

    /// Waits until `n` spans matching `filter` arrived (then a little more).
    pub fn wait_spans(&self, filter: impl Fn(&Received) -> bool, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<Received> = self.spans().into_iter().filter(|s| filter(s)).collect();
            if got.len() >= n || Instant::now() > deadline {
                if got.len() >= n {
                    std::thread::sleep(Duration::from_millis(700));
                    return self.spans().into_iter().filter(|s| filter(s)).collect();
                }
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Accepted connections of a listener as the stream tonic serves.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures_core::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
