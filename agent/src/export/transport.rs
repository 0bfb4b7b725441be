//! Sending encoded OTLP trace requests: gRPC (`TraceService/Export`, the
//! protobuf bytes passed through a codec that does not re-encode them) or
//! HTTP/protobuf (POST). Retries follow the OTLP specification as the
//! OpenTelemetry exporters do: gRPC UNAVAILABLE, CANCELLED,
//! DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, DATA_LOSS and HTTP 429, 502,
//! 503, 504 (honouring Retry-After) and connection failures are retried
//! with exponential backoff and jitter; all attempts of one request stay
//! within the export timeout.
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
    Status,
};

use super::gather::GatheringConnector;
use crate::config::otel::{OtlpTarget, Protocol};

const TRACE_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const MAX_RETRIES: u32 = 8;
const INITIAL_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);
const MAX_JITTER_MS: u64 = 200;
/// Longest wait a collector's Retry-After can ask for.
const MAX_THROTTLE: Duration = Duration::from_secs(30);

/// Why a request was not accepted (after any retries).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("gRPC status {code:?}: {message}")]
    Grpc { code: tonic::Code, message: String },
    #[error("HTTP {0}")]
    Http(u16),
    #[error("{0}")]
    Network(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// How a failed attempt may be retried.
enum Retry {
    No,
    Yes,
    After(Duration),
}

/// A connection to one collector.
pub struct SpanExporter {
    transport: Transport,
    timeout: Duration,
}

enum Transport {
    Grpc {
        endpoint: Box<tonic::transport::Endpoint>,
        /// Made on the first export, so that the channel's tasks (its
        /// buffer and the HTTP/2 connection) run on the runtime that
        /// exports: the exporter's own low-priority thread, not the
        /// capture and correlation workers of the runtime that built it.
        client: Option<tonic::client::Grpc<Channel>>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
    },
}

impl SpanExporter {
    /// Prepares the transport (gRPC connects lazily, on the first export).
    pub fn new(t: &OtlpTarget) -> Result<SpanExporter, String> {
        let transport = match t.protocol {
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(t.endpoint.clone())
                    .map_err(|e| format!("invalid endpoint: {e}"))?
                    .timeout(t.timeout);
                if let Some(tls) = super::otlp::tls(t)? {
                    endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
                } else if t.endpoint.starts_with("https://") && !t.insecure {
                    endpoint = endpoint
                        .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                        .map_err(|e| format!("TLS: {e}"))?;
                }
                Transport::Grpc {
                    endpoint: Box::new(endpoint),
                    client: None,
                    metadata: super::otlp::metadata(&t.headers)?,
                }
            }
            Protocol::HttpProtobuf => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &t.headers {
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("header name `{k}` is not valid HTTP"))?;
                    let value = reqwest::header::HeaderValue::from_str(v)
                        .map_err(|_| format!("header `{k}` has a value HTTP cannot carry"))?;
                    headers.insert(name, value);
                }
                headers.insert(
                    reqwest::header::CONTENT_TYPE,
                    reqwest::header::HeaderValue::from_static("application/x-protobuf"),
                );
                // As with the SDK exporter before: plain HTTP (this build
                // of reqwest has no TLS; HTTPS collectors take gRPC).
                let client = reqwest::Client::builder().timeout(t.timeout);
                Transport::Http {
                    client: client.build().map_err(|e| format!("HTTP client: {e}"))?,
                    url: t.endpoint.clone(),
                    headers,
                }
            }
        };
        Ok(SpanExporter {
            transport,
            timeout: t.timeout,
        })
    }

    /// Sends one encoded `ExportTraceServiceRequest`, retrying what the
    /// specification says is worth retrying, within the export timeout.
    pub async fn export(&mut self, body: Bytes) -> Result<(), SendError> {
        let start = Instant::now();
        let mut delay = INITIAL_DELAY;
        let mut cap = MAX_DELAY;
        let mut attempt = 0;
        loop {
            let (error, retry) = match tokio::time::timeout(self.timeout, self.attempt(body.clone())).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failed)) => failed,
                Err(_) => (SendError::Timeout(self.timeout), Retry::Yes),
            };
            let wait = match retry {
                Retry::No => return Err(error),
                _ if attempt >= MAX_RETRIES => return Err(error),
                Retry::Yes => delay,
                Retry::After(server) => {
                    let server = server.min(MAX_THROTTLE);
                    if server > cap {
                        cap = MAX_THROTTLE;
                    }
                    delay = delay.max(server);
                    delay
                }
            };
            attempt += 1;
            let wait = (wait + Duration::from_millis(rand::random_range(0..=MAX_JITTER_MS))).min(cap);
            if wait >= self.timeout.saturating_sub(start.elapsed()) {
                return Err(error);
            }
            tokio::time::sleep(wait).await;
            delay = delay.saturating_mul(2).min(cap);
        }
    }

    async fn attempt(&mut self, body: Bytes) -> Result<(), (SendError, Retry)> {
        match &mut self.transport {
            Transport::Grpc {
                endpoint,
                client,
                metadata,
            } => {
                let client = client.get_or_insert_with(|| {
                    tonic::client::Grpc::new(endpoint.connect_with_connector_lazy(GatheringConnector::new()))
                });
                client
                    .ready()
                    .await
                    .map_err(|e| (SendError::Network(e.to_string()), Retry::Yes))?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(TRACE_EXPORT_PATH);
                match client.unary::<Bytes, (), _>(request, path, Raw).await {
                    Ok(_) => Ok(()),
                    Err(status) => Err(grpc_failure(&status)),
                }
            }
            Transport::Http { client, url, headers } => {
                let sent = client
                    .post(url.as_str())
                    .headers(headers.clone())
                    .body(body)
                    .send()
                    .await;
                let response = sent.map_err(|e| (SendError::Network(e.to_string()), Retry::Yes))?;
                let code = response.status().as_u16();
                if response.status().is_success() {
                    return Ok(());
                }
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let retry = match (code, after) {
                    (429 | 503, Some(after)) => Retry::After(after),
                    (429 | 502 | 503 | 504, _) => Retry::Yes,
                    _ => Retry::No,
                };
                Err((SendError::Http(code), retry))
            }
        }
    }
}

fn grpc_failure(status: &Status) -> (SendError, Retry) {
    use tonic::Code;
    let retry = match status.code() {
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::DataLoss => Retry::Yes,
        // RESOURCE_EXHAUSTED is retryable only with a RetryInfo delay,
        // which is not read here: like other codes, it is final.
        _ => Retry::No,
    };
    let error = SendError::Grpc {
        code: status.code(),
        message: status.message().to_owned(),
    };
    (error, retry)
}

/// Passes already-encoded protobuf bytes through; ignores the response
/// body (an `ExportTraceServiceResponse`, whose partial-success counts
/// the agent does not use).
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
