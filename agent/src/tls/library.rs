//! Finding OpenSSL libraries: which files processes map, and where in
//! them the SSL functions start.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use meshless_common::TLS_UPROBES;
use object::{Object, ObjectSymbol};

/// Where the probed SSL functions start in one library file (file
/// offsets, in [`TLS_UPROBES`] order; `None`: the library lacks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbols {
    pub offsets: [Option<u64>; TLS_UPROBES.len()],
}

impl Symbols {
    /// True when at least one read and one write function were found.
    pub fn usable(&self) -> bool {
        let has = |name: &str| {
            TLS_UPROBES
                .iter()
                .zip(&self.offsets)
                .any(|((_, sym, _), at)| sym.starts_with(name) && at.is_some())
        };
        has("SSL_read") && has("SSL_write")
    }
}

/// Why a library cannot be probed.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not an ELF file this agent can read")]
    NotElf(PathBuf),
    #[error("{0} exports no SSL_read/SSL_write symbols (stripped, or not OpenSSL); its TLS traffic is not traced")]
    NoSymbols(PathBuf),
}

/// Reads the SSL function offsets of a library (dynamic symbols first:
/// a shared library exports them even when stripped of `.symtab`).
pub fn symbols(path: &Path) -> Result<Symbols, LibraryError> {
    let file = File::open(path).map_err(|source| LibraryError::Open {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: a read-only private mapping (see propagation::memmap_file).
    let map = unsafe { crate::propagation::memmap_file(&file) }.map_err(|source| LibraryError::Open {
        path: path.to_owned(),
        source,
    })?;
    let elf = object::File::parse(&*map).map_err(|_| LibraryError::NotElf(path.to_owned()))?;
    let mut offsets = [None; TLS_UPROBES.len()];
    for symbol in elf.dynamic_symbols().chain(elf.symbols()) {
        if !symbol.is_definition() {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        for (i, (_, sym, _)) in TLS_UPROBES.iter().enumerate() {
            if *sym == name && offsets[i].is_none() {
                offsets[i] = crate::golang::file_offset(&elf, symbol.address());
            }
        }
    }
    let found = Symbols { offsets };
    if found.usable() {
        Ok(found)
    } else {
        Err(LibraryError::NoSymbols(path.to_owned()))
    }
}

/// True for a file name of OpenSSL's libssl (`libssl.so`, `libssl.so.3`,
/// `libssl.so.1.1`).
pub fn is_libssl(name: &str) -> bool {
    name.starts_with("libssl.so")
}

/// Paths of libssl files mapped by a process, from `/proc/<pid>/maps`
/// text (as the process sees them: in its own mount namespace).
pub fn mapped_libssl(maps: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        if path.starts_with('/') && is_libssl(name) && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// Where a library a process maps can be opened from the agent: through
/// the process's root, which also reaches files in other mount namespaces
/// (containers).
pub fn via_root(pid: u32, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

/// libssl files of the host that processes started later will likely map.
pub const HOST_CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/usr/lib64/libssl.so.1.1",
    "/usr/lib/libssl.so.3",
    "/lib/libssl.so.3",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_libssl_a_process_maps_once() {
        let maps = "\
7f0000000000-7f0000001000 r--p 00000000 fe:01 123 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000001000-7f0000002000 r-xp 00001000 fe:01 123 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f0000003000-7f0000004000 r-xp 00001000 fe:01 124 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f0000005000-7f0000006000 rw-p 00000000 00:00 0
7f0000007000-7f0000008000 r-xp 00000000 fe:01 125 /opt/app/lib/libssl.so.1.1 (deleted)
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]";
        assert_eq!(
            mapped_libssl(maps),
            vec!["/usr/lib/x86_64-linux-gnu/libssl.so.3", "/opt/app/lib/libssl.so.1.1"]
        );
    }

    #[test]
    fn a_file_without_ssl_symbols_is_refused_with_its_name() {
        let exe = std::env::current_exe().expect("exe");
        match symbols(&exe) {
            Err(LibraryError::NoSymbols(p)) => assert_eq!(p, exe),
            other => panic!("expected NoSymbols, got {other:?}"),
        }
    }

    #[test]
    fn the_host_libssl_has_read_and_write_symbols_when_installed() {
        let Some(path) = HOST_CANDIDATES.iter().map(Path::new).find(|p| p.exists()) else {
            return;
        };
        let found = symbols(path).expect("libssl symbols");
        assert!(found.usable(), "{found:?}");
    }
}
