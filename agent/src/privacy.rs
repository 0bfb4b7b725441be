//! Which headers leave the node, and which values never do.

/// Header names whose values are never exported, whatever the allow-list says.
pub const ALWAYS_REDACTED: [&str; 4] = ["authorization", "proxy-authorization", "cookie", "set-cookie"];
/// What replaces a redacted value.
pub const REDACTED: &str = "REDACTED";

/// Allow-lists of captured headers and the redaction list (all lower case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderPolicy {
    request: Vec<String>,
    response: Vec<String>,
    redact: Vec<String>,
}

impl HeaderPolicy {
    pub fn new(request: &[String], response: &[String], redact: &[String]) -> Self {
        let norm = |v: &[String]| -> Vec<String> {
            let mut out: Vec<String> = v
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect();
            out.dedup();
            out
        };
        let mut redact = norm(redact);
        redact.extend(ALWAYS_REDACTED.iter().map(|s| s.to_string()));
        Self {
            request: norm(request),
            response: norm(response),
            redact,
        }
    }

    /// What HTTP/1 heads must keep for this policy: the fields the agent
    /// reads and the allow-listed ones.
    pub fn kept(&self) -> crate::http::KeptHeaders {
        crate::http::KeptHeaders::used_and(self.request.iter().chain(&self.response).cloned())
    }

    /// Captured request headers (name, value), values redacted where required.
    pub fn request(&self, headers: &crate::http::Headers) -> Vec<(String, String)> {
        self.select(&self.request, headers)
    }

    /// Captured response headers.
    pub fn response(&self, headers: &crate::http::Headers) -> Vec<(String, String)> {
        self.select(&self.response, headers)
    }

    fn select(&self, allow: &[String], headers: &crate::http::Headers) -> Vec<(String, String)> {
        if allow.is_empty() {
            return Vec::new();
        }
        headers
            .iter()
            .filter(|(name, _)| allow.iter().any(|a| a == *name))
            .map(|(name, value)| {
                let value = if self.redact.iter().any(|r| r == name) {
                    REDACTED
                } else {
                    value
                };
                (name.to_owned(), value.to_owned())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(pairs: &[(&str, &str)]) -> crate::http::Headers {
        pairs.iter().copied().collect()
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn credentials_are_redacted_even_when_allow_listed() {
        let allow = [
            "Authorization".into(),
            "cookie".into(),
            "x-tenant".into(),
            "x-secret".into(),
        ];
        let p = HeaderPolicy::new(&allow, &["set-cookie".into()], &["X-Secret".into()]);
        let got = p.request(&hs(&[
            ("authorization", "Bearer t0k3n"),
            ("cookie", "sid=1"),
            ("x-tenant", "acme"),
            ("x-secret", "s"),
            ("x-other", "o"),
        ]));
        assert_eq!(
            got,
            h(&[
                ("authorization", "REDACTED"),
                ("cookie", "REDACTED"),
                ("x-tenant", "acme"),
                ("x-secret", "REDACTED")
            ])
        );
        assert_eq!(
            p.response(&hs(&[("set-cookie", "sid=2")])),
            h(&[("set-cookie", "REDACTED")])
        );
    }

    #[test]
    fn nothing_is_captured_without_an_allow_list() {
        let p = HeaderPolicy::new(&[], &[], &[]);
        assert!(p.request(&hs(&[("x-a", "1")])).is_empty());
    }
}
