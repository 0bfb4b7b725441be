//! Low-cardinality route templates for span names: path segments that look
//! like identifiers (numbers, UUIDs, hashes, long tokens) become `*`.

/// Longest template kept (bytes).
const MAX_TEMPLATE: usize = 128;

/// Templates a URL path, e.g. `/users/42/orders/9f8e…` → `/users/*/orders/*`.
pub fn template(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(MAX_TEMPLATE));
    let _ = write_template(path, &mut out);
    out
}

/// [`template`] written into `out` (the OTLP encoder writes span names
/// straight into its buffer).
pub fn write_template(path: &str, out: &mut impl std::fmt::Write) -> std::fmt::Result {
    if path.is_empty() {
        return out.write_str("/");
    }
    if !path.starts_with('/') {
        // Absolute-form or `*` targets: keep only a bounded, id-free prefix.
        return out.write_str(if path == "*" { "*" } else { "/*" });
    }
    let mut room = MAX_TEMPLATE;
    // Segments found by byte ('/' is ASCII, so every cut is a char
    // boundary): `str::split`'s char searcher cost more than the rest.
    let mut rest = path;
    for i in 0..16 {
        let (seg, next) = match rest.bytes().position(|b| b == b'/') {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        for piece in [if i > 0 { "/" } else { "" }, if is_identifier(seg) { "*" } else { seg }] {
            if piece.len() > room {
                return out.write_str(crate::http::cut(piece, room));
            }
            out.write_str(piece)?;
            room -= piece.len();
        }
        match next {
            Some(next) => rest = next,
            None => break,
        }
    }
    Ok(())
}

fn is_identifier(seg: &str) -> bool {
    let (len, digits, hex) = seg.bytes().fold((0, 0, true), |(len, digits, hex), b| {
        (
            len + 1,
            digits + usize::from(b.is_ascii_digit()),
            hex && (b.is_ascii_hexdigit() || b == b'-'),
        )
    });
    len > 0
        && (digits == len
            || (hex && len >= 16)
            || (len >= 24 && digits > 0)
            || (digits > 0 && len >= 8 && digits * 2 >= len))
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

    #[test]
    fn cuts_long_templates_at_128_bytes_on_a_char_boundary() {
        let long = format!("/{}", "é".repeat(100));
        let t = template(&long);
        assert_eq!(t.len(), 127);
        assert!(long.starts_with(&t));
        assert_eq!(template(&format!("/{}", "x".repeat(300))).len(), 128);
    }

    proptest::proptest! {
        #[test]
        fn segments_are_those_split_on_slashes(path in "/[a-z0-9/é-]{0,200}") {
            // The model: split on '/', the first 16 segments, ids as `*`.
            let mut model = String::new();
            for (i, seg) in path.split('/').enumerate().take(16) {
                if i > 0 {
                    model.push('/');
                }
                model.push_str(if super::is_identifier(seg) { "*" } else { seg });
            }
            let t = template(&path);
            proptest::prop_assert!(model.starts_with(&t), "{t:?} vs {model:?}");
            proptest::prop_assert_eq!(t.len(), crate::http::cut(&model, super::MAX_TEMPLATE).len());
        }
    }
}
