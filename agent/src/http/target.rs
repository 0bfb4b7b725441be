//! The four forms of a request-target (RFC 9112 section 3.2), split into
//! what the OTel HTTP semantic conventions report: `url.path`, `url.query`,
//! and `server.address`/`server.port` when the target names the server.

/// A request-target split into its parts; all borrowed from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Target<'a> {
    /// `url.path`: absent for authority-form (`CONNECT h:443`).
    pub path: Option<&'a str>,
    pub query: Option<&'a str>,
    /// Host of an absolute-form or authority-form target (no brackets).
    pub host: Option<&'a str>,
    pub port: Option<u16>,
}

impl<'a> Target<'a> {
    /// Splits any target; never fails (odd targets keep their text as the path).
    pub fn parse(target: &'a str) -> Target<'a> {
        if target.starts_with('/') || target == "*" {
            return origin(target);
        }
        if let Some((scheme, rest)) = target.split_once("://") {
            if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                let (authority, tail) = rest.split_at(end);
                let (host, port) = host_port(authority);
                let mut t = if tail.starts_with('/') {
                    origin(tail)
                } else {
                    // `http://h?q` has an empty path, which means `/`.
                    Target {
                        path: Some("/"),
                        query: origin(tail).query,
                        ..Target::default()
                    }
                };
                t.host = host;
                t.port = port;
                return t;
            }
        }
        let (host, port) = host_port(target);
        match (host, port) {
            (Some(host), Some(port)) => Target {
                path: None,
                query: None,
                host: Some(host),
                port: Some(port),
            },
            _ => origin(target),
        }
    }
}

/// origin-form: path, then an optional `?query` (a `#fragment` is dropped).
fn origin(target: &str) -> Target<'_> {
    // One pass to the first `?` or `#` (every span parses its target).
    let bytes = target.as_bytes();
    let (path, query) = match memchr::memchr2(b'?', b'#', bytes) {
        Some(at) if bytes[at] == b'?' => {
            let rest = &target[at + 1..];
            let end = memchr::memchr(b'#', rest.as_bytes()).unwrap_or(rest.len());
            (&target[..at], Some(&rest[..end]))
        }
        Some(at) => (&target[..at], None),
        None => (target, None),
    };
    Target {
        path: Some(path),
        query,
        ..Target::default()
    }
}

/// `host[:port]` of an authority, without userinfo and IPv6 brackets.
fn host_port(authority: &str) -> (Option<&str>, Option<u16>) {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.is_empty() {
        return (None, None);
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return (None, None);
        };
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (Some(host), port);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => (Some(host), port.parse().ok()),
        Some(_) => (None, None),
        None => (Some(authority), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_gives_path_and_query() {
        let t = Target::parse("/a/b?x=1#frag");
        assert_eq!((t.path, t.query, t.host), (Some("/a/b"), Some("x=1"), None));
    }

    #[test]
    fn absolute_form_gives_path_and_the_server_it_names() {
        let t = Target::parse("http://example.com:8080/p?q=2");
        assert_eq!(t.path, Some("/p"));
        assert_eq!(t.query, Some("q=2"));
        assert_eq!((t.host, t.port), (Some("example.com"), Some(8080)));
    }

    #[test]
    fn absolute_form_without_path_means_slash() {
        let t = Target::parse("http://user:pw@[::1]");
        assert_eq!((t.path, t.host, t.port), (Some("/"), Some("::1"), None));
    }

    #[test]
    fn authority_form_gives_server_and_no_path() {
        let t = Target::parse("db.internal:443");
        assert_eq!((t.path, t.host, t.port), (None, Some("db.internal"), Some(443)));
        let t = Target::parse("[2001:db8::1]:8443");
        assert_eq!((t.path, t.host, t.port), (None, Some("2001:db8::1"), Some(8443)));
    }

    #[test]
    fn asterisk_form_and_odd_targets_stay_paths() {
        assert_eq!(Target::parse("*").path, Some("*"));
        assert_eq!(Target::parse("weird").path, Some("weird"));
        assert_eq!(Target::parse("").path, Some(""));
    }

    proptest::proptest! {
        /// The one-pass split agrees with its definition: drop the
        /// fragment, then split at the first `?`.
        #[test]
        fn origin_form_splits_as_defined(target in "/[a-z?#=&/]{0,24}") {
            let without_fragment = target.split('#').next().unwrap_or("");
            let want = match without_fragment.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (without_fragment, None),
            };
            let t = Target::parse(&target);
            proptest::prop_assert_eq!((t.path, t.query), (Some(want.0), want.1));
        }
    }
}
