//! Low-cardinality route templates for span names: path segments that look
//! like identifiers (numbers, UUIDs, hashes, long tokens) become `*`.

/// Templates a URL path, e.g. `/users/42/orders/9f8e…` → `/users/*/orders/*`.
pub fn template(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    if !path.starts_with('/') {
        // Absolute-form or `*` targets: keep only a bounded, id-free prefix.
        return if path == "*" { "*".to_owned() } else { "/*".to_owned() };
    }
    let mut out = String::with_capacity(path.len().min(128));
    for (i, seg) in path.split('/').enumerate().take(16) {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if is_identifier(seg) { "*" } else { seg });
    }
    if out.len() > 128 {
        let mut cut = 128;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

fn is_identifier(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    let hex = seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    digits == seg.len()
        || (hex && seg.len() >= 16)
        || (seg.len() >= 24 && digits > 0)
        || (digits > 0 && seg.len() >= 8 && digits * 2 >= seg.len())
}

#[cfg(test)]
mod tests {
    use super::template;

    #[test]
    fn replaces_ids_and_keeps_words() {
        assert_eq!(template("/users/42/orders"), "/users/*/orders");
        assert_eq!(template("/o/123e4567-e89b-12d3-a456-426614174000"), "/o/*");
        assert_eq!(template("/blob/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"), "/blob/*");
        assert_eq!(template("/index.html"), "/index.html");
        assert_eq!(template("/api/v2/items"), "/api/v2/items");
        assert_eq!(template(""), "/");
        assert_eq!(template("/"), "/");
    }
}
