//! The benchmarked service: `helloworld.Greeter/SayHello`, the unary call
//! every gRPC tutorial starts with. Written out by hand as what
//! `tonic-build` would generate, so the bench needs no `protoc`; on the wire
//! it is plain tonic (hyper + h2), like any tonic service.
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{
    body::Body,
    codegen::{http, Service},
    server::{Grpc, NamedService, UnaryService},
    Request, Response, Status,
};
use tonic_prost::ProstCodec;

/// gRPC service name (package.Service).
pub const SERVICE: &str = "helloworld.Greeter";
/// Full method path the client calls.
pub const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";

/// `message HelloRequest { string name = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `message HelloReply { string message = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The server side: answers every SayHello at once.
#[derive(Debug, Clone, Default)]
pub struct Greeter;

impl NamedService for Greeter {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

struct SayHello;

impl UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFuture<Response<HelloReply>, Status>;

    fn call(&mut self, request: Request<HelloRequest>) -> Self::Future {
        let message = format!("hello, {}", request.into_inner().name);
        Box::pin(async move { Ok(Response::new(HelloReply { message })) })
    }
}

impl<B> Service<http::Request<B>> for Greeter
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == SAY_HELLO {
            return Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
                Ok(grpc.unary(SayHello, req).await)
            });
        }
        Box::pin(async move { Ok(Status::unimplemented("only SayHello is served").into_http()) })
    }
}
