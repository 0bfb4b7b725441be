//! Finding OpenSSL libraries: which files processes map, and where in
//! them the SSL functions start.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use crate::{
    elf_symbols::{self, Table},
    uprobe::{call_target, file_offset, past_endbr},
};
use meshless_common::TLS_UPROBES;

/// Where the probes go in one library file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (index into [`TLS_UPROBES`], file offset), return probes included.
    pub probes: Vec<(usize, u64)>,
    /// Every entry probe sits on an instruction the kernel emulates, so a
    /// call costs a breakpoint trap and no single step (docs/tls.md).
    pub cheap: bool,
}

impl Plan {
    /// True when at least one read and one write function are probed.
    pub fn usable(&self) -> bool {
        let has = |name: &str| self.probes.iter().any(|(i, _)| TLS_UPROBES[*i].1.starts_with(name));
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

/// Reads where to probe a library: the SSL functions' offsets from its
/// symbols (dynamic symbols first: a shared library exports them even
/// when stripped of `.symtab`), then [`plan`].
pub fn symbols(path: &Path) -> Result<Plan, LibraryError> {
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
    let object::File::Elf64(elf64) = &elf else {
        return Err(LibraryError::NotElf(path.to_owned()));
    };
    let read_error = |source| LibraryError::Open {
        path: path.to_owned(),
        source,
    };
    // Exports through the hash table (a shared library exports them even
    // when stripped of `.symtab`); `.symtab` only for what they lack (a
    // static OpenSSL an executable does not export), read in chunks: it
    // can be huge (node's, a Rust binary's). See elf_symbols.
    let mut found = match elf_symbols::exported(elf64, &FUNCTIONS) {
        Some(found) => found,
        None => elf_symbols::scan(&file, elf64, Table::Dynamic, &FUNCTIONS).map_err(read_error)?,
    };
    if found.iter().any(Option::is_none) {
        let statics = elf_symbols::scan(&file, elf64, Table::Static, &FUNCTIONS).map_err(read_error)?;
        for (slot, symbol) in found.iter_mut().zip(statics) {
            *slot = slot.or(symbol);
        }
    }
    let offsets = found.map(|s| s.and_then(|s| file_offset(&elf, s.address)));
    let code = code_of(&file, &elf, &offsets).map_err(|source| LibraryError::Open {
        path: path.to_owned(),
        source,
    })?;
    let found = plan(&code, offsets);
    if found.usable() {
        Ok(found)
    } else {
        Err(LibraryError::NoSymbols(path.to_owned()))
    }
}

/// The file's bytes up to the end of the sections holding `offsets`, read
/// with `pread`, not taken from the mapping: where another tracer (or an
/// earlier agent) has uprobes on the file, the kernel writes its `int3`s
/// into every executable-capable mapping of it, this agent's included, and
/// the probed `push` would read as `0xcc`. Bytes before the first such
/// section stay zero (untouched pages of a zeroed allocation cost nothing).
fn code_of(file: &File, elf: &object::File, offsets: &[Option<u64>]) -> std::io::Result<Vec<u8>> {
    use object::{Object, ObjectSection};
    use std::os::unix::fs::FileExt;
    let (mut start, mut end) = (u64::MAX, 0u64);
    for offset in offsets.iter().flatten() {
        let range = elf
            .sections()
            .filter_map(|s| s.file_range())
            .find(|(at, size)| (*at..at + size).contains(offset));
        if let Some((at, size)) = range {
            start = start.min(at);
            end = end.max(at + size);
        }
    }
    if start >= end {
        return Ok(Vec::new());
    }
    let len = |v: u64| usize::try_from(v).map_err(std::io::Error::other);
    // Zeroed and untouched, so not resident: only the windows [`plan`]
    // decodes are read into it (the functions, then the internal function
    // an `_ex` calls). Reading node's whole .text made a 34 MiB peak.
    let mut code = vec![0u8; len(end)?];
    let (start, end) = (len(start)?, len(end)?);
    let read = |code: &mut Vec<u8>, at: usize| -> std::io::Result<()> {
        let at = at.max(start);
        let to = at.saturating_add(CODE_WINDOW).min(end);
        if at < to {
            file.read_exact_at(&mut code[at..to], at as u64)?;
        }
        Ok(())
    };
    let at: Vec<usize> = offsets
        .iter()
        .flatten()
        .filter_map(|o| usize::try_from(*o).ok())
        .collect();
    for &o in &at {
        read(&mut code, o)?;
    }
    for &o in &at {
        if let Some(callee) = internal_callee(&code, o) {
            read(&mut code, callee)?;
        }
    }
    Ok(code)
}

/// Bytes read at each decoded place: more than [`internal_of_ex`] and
/// [`calls`] look at.
const CODE_WINDOW: usize = 512;

/// The function an `_ex` function at `ex_at` calls first, if it has the
/// shape [`internal_of_ex`] reads (its callee's bytes are not read yet).
fn internal_callee(code: &[u8], ex_at: usize) -> Option<usize> {
    let at = ex_at + past_endbr(code.get(ex_at..)?);
    let [0x48, 0x83, 0xec, _] = *code.get(at..at + 4)? else {
        return None;
    };
    call_target(code, at + 4)
}

/// The exported functions looked up: `SSL_read`, `SSL_read_ex`,
/// `SSL_write`, `SSL_write_ex` (plain variant first, then `_ex`).
const FUNCTIONS: [&str; 4] = ["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex"];

/// Where to probe, given the file's bytes and the offsets of
/// [`FUNCTIONS`].
///
/// Cheap when possible: OpenSSL >= 1.1.1 funnels `SSL_read` and
/// `SSL_read_ex` into one internal `ssl_read_internal(s, buf, num,
/// &readbytes)` (same for write), whose arguments are those of the `_ex`
/// variant, and which starts with `push` (emulated). The `_ex` programs
/// then go on that function alone: its entry probe and its return probe
/// (the return address is still on top of the stack there). Otherwise
/// every exported function gets an entry and a return probe at its first
/// instruction, which usually single-steps (`sub $n,%rsp`).
pub fn plan(code: &[u8], offsets: [Option<u64>; FUNCTIONS.len()]) -> Plan {
    let mut probes = Vec::new();
    let mut cheap = true;
    for (plain, ex) in [(0, 1), (2, 3)] {
        let at = |i: usize| offsets[i].and_then(|o| usize::try_from(o).ok());
        let found = at(ex).and_then(|ex_at| internal_of_ex(code, ex_at).map(|f| (ex_at, f)));
        match found {
            Some((ex_at, (entry, callee))) if at(plain).is_none_or(|p| calls(code, p, ex_at, callee)) => {
                probes.extend(program_pair(FUNCTIONS[ex], entry as u64));
            }
            _ => {
                for i in [plain, ex] {
                    let Some(o) = at(i) else { continue };
                    cheap &= code.get(o..).and_then(crate::uprobe::emulated).is_some();
                    probes.extend(program_pair(FUNCTIONS[i], o as u64));
                }
            }
        }
    }
    Plan { probes, cheap }
}

/// The entry and return programs of `function`'s family at `offset`.
fn program_pair(function: &str, offset: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
    TLS_UPROBES
        .iter()
        .enumerate()
        .filter(move |(_, (_, sym, _))| *sym == function)
        .map(move |(i, _)| (i, offset))
}

/// For an `_ex` function shaped `[endbr64] sub $n,%rsp; call f`: where
/// to probe `f` (past its `endbr64`, on an emulated `push`) and where `f`
/// starts. None for any other shape.
fn internal_of_ex(code: &[u8], ex_at: usize) -> Option<(usize, usize)> {
    // [endbr64] sub $imm8,%rsp; call f
    let callee = internal_callee(code, ex_at)?;
    let entry = callee + past_endbr(&code[callee..]);
    let body = code.get(entry..)?;
    matches!(body, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..]).then_some((entry, callee))
}

/// Bytes of a plain `SSL_read`/`SSL_write` searched for its call.
const PLAIN_WINDOW: usize = 96;

/// True when the function at `at` calls `callee` within its first bytes
/// (a byte `e8` whose 32-bit displacement lands exactly on `callee`),
/// not looking into the `_ex` function at `ex_at` when that follows.
fn calls(code: &[u8], at: usize, ex_at: usize, callee: usize) -> bool {
    let mut end = at.saturating_add(PLAIN_WINDOW);
    if ex_at > at {
        end = end.min(ex_at);
    }
    (at..end).any(|i| code.get(i) == Some(&0xe8) && call_target(code, i) == Some(callee))
}

/// True for a file name of OpenSSL's libssl (`libssl.so`, `libssl.so.3`,
/// `libssl.so.1.1`).
pub fn is_libssl(name: &str) -> bool {
    name.starts_with("libssl.so")
}

/// libssl files mapped by a process, from `/proc/<pid>/maps` text: the
/// address range of one mapping of each (names the file in
/// `/proc/<pid>/map_files/`) and the path as printed.
pub fn mapped_libssl(maps: &str) -> Vec<(&str, &str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(range), Some(path)) = (fields.next(), fields.nth(4)) else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        if path.starts_with('/') && is_libssl(name) && !out.iter().any(|(_, p)| *p == path) {
            out.push((range, path));
        }
    }
    out
}

/// Where a library a process maps can be opened from the agent, best
/// first: `/proc/<pid>/map_files/<range>` (the mapped file itself, in any
/// mount namespace or chroot), then the printed path through the
/// process's root (a container's view), then the printed path as is (a
/// chroot: maps prints paths as the reader, the agent, sees them).
pub fn candidates(pid: u32, range: &str, path: &str) -> [PathBuf; 3] {
    [
        PathBuf::from(format!("/proc/{pid}/map_files/{range}")),
        PathBuf::from(format!("/proc/{pid}/root{path}")),
        PathBuf::from(path),
    ]
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

/// Executables that carry OpenSSL themselves (Node.js official builds),
/// attached at start like [`HOST_CANDIDATES`]: a short-lived process
/// would otherwise finish before the next scan sees it.
pub const HOST_EXECUTABLES: &[&str] = &["/usr/bin/node", "/usr/local/bin/node", "/usr/bin/nodejs"];

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
            vec![
                ("7f0000000000-7f0000001000", "/usr/lib/x86_64-linux-gnu/libssl.so.3"),
                ("7f0000007000-7f0000008000", "/opt/app/lib/libssl.so.1.1")
            ]
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
    fn the_host_libssl_is_probed_cheaply_on_its_internal_read_and_write_functions_when_installed() {
        let Some(path) = HOST_CANDIDATES.iter().map(Path::new).find(|p| p.exists()) else {
            return;
        };
        let found = symbols(path).expect("libssl symbols");
        assert!(found.usable(), "{found:?}");
        assert!(found.cheap, "{found:?}");
        assert_eq!(found.probes.len(), 4, "{found:?}");
    }

    #[test]
    fn a_node_executable_with_its_own_openssl_is_probed_cheaply_at_its_four_exported_functions_when_installed() {
        let node = Path::new("/usr/bin/node");
        let Ok(found) = symbols(node) else {
            // Debian's node links the system libssl, found by its name.
            return;
        };
        assert!(found.usable(), "{found:?}");
        assert!(found.cheap, "node's SSL_read/SSL_write start with push %rbp: {found:?}");
        assert_eq!(found.probes.len(), 8, "entry + return on each: {found:?}");
    }

    /// A library laid out like Debian's OpenSSL 3: SSL_read at 0x00
    /// (`sub; ...; call read_internal`), SSL_read_ex at 0x40 (`sub; call`),
    /// read_internal at 0x80 (`push %r13`), the same for write at +0x100.
    fn openssl3_like() -> Vec<u8> {
        let mut code = vec![0xcc; 0x200];
        for base in [0usize, 0x100] {
            let callee = base + 0x80;
            let call = |code: &mut Vec<u8>, at: usize| {
                let rel = (callee as i64 - (at as i64 + 5)) as i32;
                code[at] = 0xe8;
                code[at + 1..at + 5].copy_from_slice(&rel.to_le_bytes());
            };
            code[base..base + 4].copy_from_slice(&[0x48, 0x83, 0xec, 0x18]);
            call(&mut code, base + 0x1e);
            code[base + 0x40..base + 0x44].copy_from_slice(&[0x48, 0x83, 0xec, 0x08]);
            call(&mut code, base + 0x44);
            code[callee..callee + 2].copy_from_slice(&[0x41, 0x55]);
        }
        code
    }

    fn offsets() -> [Option<u64>; 4] {
        [Some(0), Some(0x40), Some(0x100), Some(0x140)]
    }

    #[test]
    fn openssl_3_is_probed_on_the_push_of_its_internal_functions_with_the_ex_programs() {
        let plan = plan(&openssl3_like(), offsets());
        assert!(plan.cheap);
        let names: Vec<(&str, u64)> = plan.probes.iter().map(|(i, at)| (TLS_UPROBES[*i].0, *at)).collect();
        assert_eq!(
            names,
            vec![
                ("meshless_ssl_read_ex", 0x80),
                ("meshless_ssl_read_ex_ret", 0x80),
                ("meshless_ssl_write_ex", 0x180),
                ("meshless_ssl_write_ex_ret", 0x180),
            ]
        );
    }

    #[test]
    fn a_plain_function_that_does_not_call_the_internal_one_keeps_probes_on_every_entry() {
        let mut code = openssl3_like();
        code[0x1e] = 0x90; // SSL_read no longer calls read_internal
        let plan = plan(&code, offsets());
        assert!(!plan.cheap, "SSL_read starts with sub: single-stepped");
        let at: Vec<u64> = plan.probes.iter().map(|(_, at)| *at).collect();
        assert_eq!(at, vec![0, 0, 0x40, 0x40, 0x180, 0x180]);
    }

    #[test]
    fn an_internal_function_not_starting_with_push_or_a_library_without_ex_functions_is_probed_at_the_entries() {
        let mut code = openssl3_like();
        code[0x80..0x84].copy_from_slice(&[0x48, 0x83, 0xec, 0x18]);
        let plan_a = plan(&code, offsets());
        assert!(!plan_a.cheap);
        assert_eq!(plan_a.probes.len(), 6);
        let plan_b = plan(&openssl3_like(), [Some(0), None, Some(0x100), None]);
        assert!(!plan_b.cheap);
        assert_eq!(plan_b.probes.len(), 4);
        assert!(plan_b.usable());
    }
}
