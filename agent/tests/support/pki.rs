//! Throwaway certificates made with the `openssl` command line.
use std::{path::Path, process::Command};

pub fn openssl(dir: &Path, args: &[&str]) {
    let mut c = Command::new("openssl");
    c.current_dir(dir).args(args);
    super::run(c);
}

/// A CA (`ca.key`, `ca.crt`) and a serving certificate it signed
/// (`server.key`, `server.crt`) for `subject_alt_names` (openssl's
/// `subjectAltName` syntax), in `dir`.
pub fn ca_and_server_cert(dir: &Path, subject_alt_names: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=meshless-test-ca",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n\
             subjectAltName={subject_alt_names}\n"
        ),
    )
    .expect("server.ext");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=meshless-test-server",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}
