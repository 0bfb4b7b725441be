//! A request method: the standard ones as static strings, any other token
//! owned (a client controls it, so it is never a label as is).

/// The methods of RFC 9110 and RFC 5789 (PATCH) plus QUERY: the only ones
/// used as-is in span names and metric labels (OTel HTTP semconv).
pub const KNOWN_METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
];

/// A request's method. A known method costs no allocation per request.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// One of [`KNOWN_METHODS`].
    Known(&'static str),
    /// Any other token, as sent (empty when unknown, e.g. an HTTP/2 head
    /// whose `:method` was not decoded).
    Other(Box<str>),
}

impl Method {
    /// The method named by `token` (case-sensitive, as RFC 9110 says).
    pub fn new(token: &str) -> Self {
        match KNOWN_METHODS.iter().find(|&&m| m == token) {
            Some(known) => Method::Known(known),
            None => Method::Other(token.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Known(m) => m,
            Method::Other(m) => m,
        }
    }

    /// The method is one of [`KNOWN_METHODS`].
    pub fn is_known(&self) -> bool {
        matches!(self, Method::Known(_))
    }

    pub fn is_empty(&self) -> bool {
        self.as_str().is_empty()
    }

    /// Heap bytes held (only an unknown token owns any).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Method::Known(_) => 0,
            Method::Other(m) => m.len(),
        }
    }
}

impl Default for Method {
    /// The unknown method (empty).
    fn default() -> Self {
        Method::Other(Box::default())
    }
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Method {
    fn from(token: &str) -> Self {
        Method::new(token)
    }
}

impl PartialEq<str> for Method {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Method {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_are_known_and_others_kept_as_sent() {
        assert!(Method::new("GET").is_known());
        assert_eq!(Method::new("PATCH"), "PATCH");
        let odd = Method::new("get");
        assert!(!odd.is_known());
        assert_eq!(odd.as_str(), "get");
        assert!(Method::default().is_empty() && !Method::default().is_known());
    }
}
