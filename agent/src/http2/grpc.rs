//! gRPC facts of an HTTP/2 exchange (gRPC over HTTP/2 protocol spec):
//! `:path` is `/package.Service/Method`, `content-type` starts with
//! `application/grpc`, the status is `grpc-status` in the trailers (or in
//! the only header block of a trailers-only response). A stream reset
//! before any status gets the status gRPC libraries give such a call.
use super::hpack::Block;
use crate::{http::Head, span::Rpc};

/// An RST_STREAM that ended a stream: its HTTP/2 error code and how long
/// after the request's HEADERS it came.
#[derive(Debug, Clone, Copy)]
pub struct Reset {
    pub code: u32,
    pub elapsed_ns: u64,
}

/// The RPC facts, when the request was a gRPC call.
pub fn rpc(
    request: &Head,
    response: Option<&Block>,
    trailers: Option<&Block>,
    reset: Option<Reset>,
) -> Option<Box<Rpc>> {
    let content_type = request.header("content-type")?;
    if !content_type.starts_with("application/grpc") {
        return None;
    }
    let (service, method) = request.target().and_then(split_path).unwrap_or_default();
    // Trailers win; a trailers-only response carries it in its one block.
    let grpc_status = [trailers, response]
        .into_iter()
        .flatten()
        .find_map(|b| b.get("grpc-status").flatten())
        .and_then(|s| s.trim().parse::<u32>().ok())
        // Codes 0-16 are defined; others would only add label values.
        .filter(|&c| c <= 16)
        .or_else(|| reset.map(|r| reset_status(request, r)));
    Some(Box::new(Rpc {
        service,
        method,
        grpc_status,
    }))
}

/// The status of a call whose stream was reset before it got one, as the
/// gRPC HTTP/2 protocol maps RST_STREAM codes. A CANCEL at or past the
/// request's `grpc-timeout` is the deadline expiring: the caller's library
/// reports DEADLINE_EXCEEDED and the server's deadline (the same timeout)
/// has passed too, so both sides' spans say 4 (not CANCELLED).
fn reset_status(request: &Head, reset: Reset) -> u32 {
    const CANCEL: u32 = 0x8;
    match reset.code {
        CANCEL => {
            let deadline = request.header("grpc-timeout").and_then(timeout_ns);
            match deadline {
                Some(t) if reset.elapsed_ns + deadline_slack_ns(t) >= t => DEADLINE_EXCEEDED,
                _ => CANCELLED,
            }
        }
        // REFUSED_STREAM: not processed, safe to retry.
        0x7 => UNAVAILABLE,
        // ENHANCE_YOUR_CALM
        0xb => RESOURCE_EXHAUSTED,
        // INADEQUATE_SECURITY
        0xc => PERMISSION_DENIED,
        _ => INTERNAL,
    }
}

const CANCELLED: u32 = 1;
const DEADLINE_EXCEEDED: u32 = 4;
const PERMISSION_DENIED: u32 = 7;
const RESOURCE_EXHAUSTED: u32 = 8;
const INTERNAL: u32 = 13;
const UNAVAILABLE: u32 = 14;

/// How early a CANCEL may come and still be the deadline: a client encodes
/// the time left before it writes the HEADERS, so its timer fires a little
/// less than `grpc-timeout` after them (a tenth, at most 20 ms).
fn deadline_slack_ns(timeout_ns: u64) -> u64 {
    (timeout_ns / 10).min(20_000_000)
}

/// `grpc-timeout` (at most 8 digits and a unit: H M S m u n) in ns.
fn timeout_ns(value: &str) -> Option<u64> {
    let value = value.trim();
    let digits = value.get(..value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let unit: u64 = match value.as_bytes().last()? {
        b'H' => 3_600_000_000_000,
        b'M' => 60_000_000_000,
        b'S' => 1_000_000_000,
        b'm' => 1_000_000,
        b'u' => 1_000,
        b'n' => 1,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// `/package.Service/Method` → (`package.Service`, `Method`).
fn split_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some((service.to_owned(), method.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_grpc_path_into_service_and_method() {
        assert_eq!(
            split_path("/helloworld.Greeter/SayHello"),
            Some(("helloworld.Greeter".to_owned(), "SayHello".to_owned()))
        );
        assert_eq!(split_path("/nomethod"), None);
        assert_eq!(split_path("/a/b/c"), None);
        assert_eq!(split_path(""), None);
    }

    #[test]
    fn reads_grpc_timeout_in_every_unit_and_rejects_malformed_values() {
        assert_eq!(timeout_ns("300m"), Some(300_000_000));
        assert_eq!(timeout_ns("299875u"), Some(299_875_000));
        assert_eq!(timeout_ns("1H"), Some(3_600_000_000_000));
        assert_eq!(timeout_ns("5S"), Some(5_000_000_000));
        assert_eq!(timeout_ns("2M"), Some(120_000_000_000));
        assert_eq!(timeout_ns("7n"), Some(7));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S", "é"] {
            assert_eq!(timeout_ns(bad), None, "{bad:?}");
        }
    }

    fn head_with_timeout(timeout: Option<&str>) -> Head {
        let mut headers = vec![("content-type", "application/grpc")];
        headers.extend(timeout.map(|t| ("grpc-timeout", t)));
        Head {
            kind: crate::http::HeadKind::Request { method: "POST".into() },
            version: 2,
            headers: crate::http::Headers::request("/pkg.Svc/M", headers),
            headers_dropped: 0,
            truncated: false,
            start_ktime_ns: 0,
            at_segment_start: false,
            in_one_segment: false,
        }
    }

    #[test]
    fn a_cancel_at_the_grpc_timeout_is_deadline_exceeded_and_before_it_cancelled() {
        let head = head_with_timeout(Some("299875u"));
        let at = |ms: u64| {
            reset_status(
                &head,
                Reset {
                    code: 8,
                    elapsed_ns: ms * 1_000_000,
                },
            )
        };
        assert_eq!(at(300), DEADLINE_EXCEEDED);
        assert_eq!(
            at(295),
            DEADLINE_EXCEEDED,
            "the client's timer runs from before the write"
        );
        assert_eq!(at(100), CANCELLED);
        let untimed = head_with_timeout(None);
        assert_eq!(
            reset_status(
                &untimed,
                Reset {
                    code: 8,
                    elapsed_ns: u64::MAX
                }
            ),
            CANCELLED
        );
    }

    #[test]
    fn resets_map_to_grpc_statuses_as_the_protocol_says() {
        let head = head_with_timeout(None);
        let status = |code| reset_status(&head, Reset { code, elapsed_ns: 0 });
        assert_eq!(status(0x7), UNAVAILABLE);
        assert_eq!(status(0xb), RESOURCE_EXHAUSTED);
        assert_eq!(status(0xc), PERMISSION_DENIED);
        assert_eq!(status(0x0), INTERNAL);
        assert_eq!(status(0x2), INTERNAL);
    }

    #[test]
    fn a_status_sent_before_the_reset_wins() {
        let head = head_with_timeout(Some("1m"));
        let trailers = Block {
            fields: vec![super::super::hpack::Field::Known(
                "grpc-status".to_owned(),
                "0".to_owned(),
            )],
            limited: false,
        };
        let reset = Some(Reset {
            code: 8,
            elapsed_ns: 10_000_000,
        });
        let rpc = rpc(&head, None, Some(&trailers), reset).expect("grpc");
        assert_eq!(rpc.grpc_status, Some(0));
    }
}
