//! gRPC facts of an HTTP/2 exchange (gRPC over HTTP/2 protocol spec):
//! `:path` is `/package.Service/Method`, `content-type` starts with
//! `application/grpc`, the status is `grpc-status` in the trailers (or in
//! the only header block of a trailers-only response).
use super::hpack::Block;
use crate::{http::Head, span::Rpc};

/// The RPC facts, when the request was a gRPC call.
pub fn rpc(request: &Head, response: Option<&Block>, trailers: Option<&Block>) -> Option<Rpc> {
    let content_type = request.header("content-type")?;
    if !content_type.starts_with("application/grpc") {
        return None;
    }
    let (service, method) = match &request.kind {
        crate::http::HeadKind::Request { target, .. } => split_path(target).unwrap_or_default(),
        crate::http::HeadKind::Response { .. } => Default::default(),
    };
    // Trailers win; a trailers-only response carries it in its one block.
    let grpc_status = [trailers, response]
        .into_iter()
        .flatten()
        .find_map(|b| b.get("grpc-status").flatten())
        .and_then(|s| s.trim().parse::<u32>().ok())
        // Codes 0-16 are defined; others would only add label values.
        .filter(|&c| c <= 16);
    Some(Rpc {
        service,
        method,
        grpc_status,
    })
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
}
