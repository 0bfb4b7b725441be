//! HTTPS in Go programs: uprobes on `crypto/tls.(*Conn).Read` and
//! `Write`, found by symbol in the executable (ebpf/src/probes/tls_go.rs
//! reads the plaintext and the socket).
//!
//! Where the probes go, all on instructions the kernel emulates (no single
//! step, docs/tls.md): `Write` and `Read` on the JBE of their stack check
//! (as the Go linking probes, [`crate::golang::past_stack_check`]), and the
//! one `CALL runtime.memmove` in `Read` (the inlined `bytes.(*Reader).Read`
//! that copies decrypted bytes into the caller's buffer), found by decoding
//! `Read`. Never a return probe: Go moves goroutine stacks.
//!
//! Executables without a symbol table (`-ldflags=-s`) cannot be placed:
//! logged once per file; their TLS bytes are not parsed as HTTP.
use std::{
    ffi::CString,
    fs::File,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::Path,
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::ProgramFd,
    Ebpf,
};
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
use meshless_common::{GO_TLS_CONN_TYPES_MAP, GO_TLS_UPROBES};
use object::{Object, ObjectSection};
use tracing::{debug, info, warn};

use super::TlsError;
use crate::{
    golang::{go_version, past_stack_check},
    uprobe::{emulated, file_offset, load_program, Pmu},
};

/// Go executables with probes attached at most.
const MAX_EXECUTABLES: usize = 256;

const READ: &str = "crypto/tls.(*Conn).Read";
const WRITE: &str = "crypto/tls.(*Conn).Write";
const MEMMOVE: &str = "runtime.memmove";
/// The itab of `*net.TCPConn` as a `net.Conn`: its type hash tells the
/// kernel that a `tls.Conn` runs over a TCP socket.
const TCP_CONN_ITAB: &str = "go:itab.*net.TCPConn,net.Conn";
/// Offset of the type hash in an itab (after `inter` and `_type`).
const ITAB_HASH: u64 = 16;

/// Where the probes go in one Go executable (file offsets, in
/// [`GO_TLS_UPROBES`] order), and the `*net.TCPConn` itab hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub offsets: [u64; 3],
    pub tcp_conn_hash: u32,
    pub version: String,
}

/// Why an executable's HTTPS cannot be traced.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GoTlsError {
    #[error("not a Go executable")]
    NotGo,
    #[error("no crypto/tls in this Go executable")]
    NoTls,
    #[error("Go executable without a symbol table (built with -ldflags=-s?): its HTTPS (crypto/tls) is not traced, and its encrypted bytes are not parsed as HTTP")]
    Stripped,
    #[error("Go crypto/tls not traced: {0}")]
    Layout(&'static str),
}

/// Reads where to probe `crypto/tls` in the executable at `path`.
pub fn plan(path: &Path) -> Result<Plan, GoTlsError> {
    let file = File::open(path).map_err(|_| GoTlsError::NotGo)?;
    // SAFETY: a read-only private mapping (see propagation::memmap_file).
    let map = unsafe { crate::propagation::memmap_file(&file) }.map_err(|_| GoTlsError::NotGo)?;
    let elf = object::File::parse(&*map).map_err(|_| GoTlsError::NotGo)?;
    let info = elf.section_by_name(".go.buildinfo").ok_or(GoTlsError::NotGo)?;
    if elf.architecture() != object::Architecture::X86_64 {
        return Err(GoTlsError::Layout("not amd64 (register ABI offsets are for amd64)"));
    }
    let version = info.data().ok().and_then(go_version).ok_or(GoTlsError::Layout(
        "built by Go older than 1.18 (no register ABI guarantee)",
    ))?;
    let object::File::Elf64(elf64) = &elf else {
        return Err(GoTlsError::NotGo);
    };
    if elf.section_by_name(".symtab").is_none() {
        return Err(GoTlsError::Stripped);
    }
    // Read in chunks, not walked in the mapping: a Go `.symtab` and its
    // strings are megabytes the walk would make resident (elf_symbols).
    let names = [READ, WRITE, MEMMOVE, TCP_CONN_ITAB];
    let found = crate::elf_symbols::scan(&file, elf64, crate::elf_symbols::Table::Static, &names)
        .map_err(|_| GoTlsError::Layout("unreadable symbol table"))?
        .map(|s| s.map(|s| (s.address, s.size)));
    let [Some(read), Some(write), Some(memmove), Some(itab)] = found else {
        return match found {
            [None, None, ..] => Err(GoTlsError::NoTls),
            _ => Err(GoTlsError::Layout(
                "crypto/tls, runtime.memmove or the *net.TCPConn itab missing",
            )),
        };
    };
    let at = |addr: u64| file_offset(&elf, addr).ok_or(GoTlsError::Layout("symbol outside the file"));
    let (read_at, write_at) = (at(read.0)?, at(write.0)?);
    // Code bytes come from the file, not the mapping: another tracer's
    // uprobes show as int3 in any mapping of the file, this one included.
    let code = |at: u64, len: u64| original_bytes(&file, at, len).ok_or(GoTlsError::Layout("code outside the file"));
    let read_jbe = read_at + stack_check_jump(&code(read_at, PROLOGUE)?)?;
    let write_jbe = write_at + stack_check_jump(&code(write_at, PROLOGUE)?)?;
    let copy = read_at + memmove_call(&code(read_at, read.1)?, read.0, memmove.0)?;
    let hash_at = usize::try_from(at(itab.0)? + ITAB_HASH).map_err(|_| GoTlsError::Layout("itab"))?;
    let hash = map
        .get(hash_at..hash_at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .filter(|h| *h != 0)
        .ok_or(GoTlsError::Layout("the *net.TCPConn itab has no type hash"))?;
    let offsets = [write_jbe, read_jbe, copy];
    // A JBE and a CALL by construction; checked against the bytes anyway.
    let mut cheap = true;
    for at in offsets {
        cheap &= emulated(&code(at, 6)?).is_some();
    }
    if !cheap {
        return Err(GoTlsError::Layout("a probe would single-step"));
    }
    Ok(Plan {
        offsets,
        tcp_conn_hash: hash,
        version,
    })
}

/// Bytes of a Go prologue up to and including its stack-check jump.
const PROLOGUE: u64 = 18;
/// Longest function decoded.
const MAX_FUNCTION: u64 = 64 * 1024;

/// `len` bytes at file offset `at`, read from the file (pread).
fn original_bytes(file: &File, at: u64, len: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; usize::try_from(len.min(MAX_FUNCTION)).ok()?];
    file.read_exact_at(&mut buf, at).ok()?;
    Some(buf)
}

/// Offset (from the function start, `code`) of the JBE of a Go stack
/// check: the kernel program reads EFLAGS there to skip the run that
/// grows the stack.
fn stack_check_jump(code: &[u8]) -> Result<u64, GoTlsError> {
    match past_stack_check(code, 0) {
        0 => Err(GoTlsError::Layout("unknown prologue (no stack-check jump to probe)")),
        jump => Ok(jump),
    }
}

/// Offset within `code` (a function at virtual address `start`) of its one
/// direct `CALL runtime.memmove`, decoding instruction by instruction (a
/// probe inside an instruction would corrupt the program).
pub fn memmove_call(code: &[u8], start: u64, memmove: u64) -> Result<u64, GoTlsError> {
    let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
    let mut calls = Vec::new();
    for instruction in &mut decoder {
        if instruction.is_invalid() {
            return Err(GoTlsError::Layout("(*Conn).Read does not decode"));
        }
        if instruction.mnemonic() == Mnemonic::Call
            && instruction.op0_kind() == OpKind::NearBranch64
            && instruction.near_branch_target() == memmove
        {
            calls.push(instruction.ip() - start);
        }
    }
    match calls[..] {
        [one] => Ok(one),
        _ => Err(GoTlsError::Layout(
            "(*Conn).Read has no single runtime.memmove call (Go version not supported)",
        )),
    }
}

/// The Go TLS programs and the executables they are attached to.
pub struct GoTls {
    /// Program fds in [`GO_TLS_UPROBES`] order.
    programs: Vec<ProgramFd>,
    pmu: Pmu,
    conn_types: BpfHashMap<MapData, u32, u32>,
    /// (device, inode) → perf event fds (closed on drop), or None.
    executables: foldhash::HashMap<(u64, u64), Option<Vec<OwnedFd>>>,
}

impl GoTls {
    /// Loads (verifies) the programs; attaching happens per executable.
    pub fn load(ebpf: &mut Ebpf, pmu: Pmu) -> Result<GoTls, TlsError> {
        let mut programs = Vec::new();
        for (name, _) in GO_TLS_UPROBES {
            programs.push(load_program(ebpf, name)?);
        }
        let conn_types = ebpf
            .take_map(GO_TLS_CONN_TYPES_MAP)
            .and_then(|m| BpfHashMap::try_from(m).ok())
            .ok_or(TlsError::Map(GO_TLS_CONN_TYPES_MAP))?;
        Ok(GoTls {
            programs,
            pmu,
            conn_types,
            executables: foldhash::HashMap::default(),
        })
    }

    /// Attaches the probes to the executable of process `pid` if it is a
    /// Go program with `crypto/tls` (once per file).
    pub fn process(&mut self, pid: u32) {
        let exe = format!("/proc/{pid}/exe");
        let Ok(meta) = std::fs::metadata(&exe) else {
            return;
        };
        let id = (meta.dev(), meta.ino());
        if self.executables.contains_key(&id) || self.executables.len() >= MAX_EXECUTABLES {
            return;
        }
        let attached = match plan(Path::new(&exe)) {
            Ok(plan) => match self.attach(&exe, &plan) {
                Ok(fds) => {
                    info!(pid, version = %plan.version, uprobes = fds.len(), "Go executable: tracing HTTPS (crypto/tls)");
                    Some(fds)
                }
                Err(error) => {
                    warn!(pid, %error, "Go crypto/tls not traced: attaching uprobes failed");
                    None
                }
            },
            Err(GoTlsError::NotGo) => None,
            Err(GoTlsError::NoTls) => {
                debug!(pid, "Go executable without crypto/tls");
                None
            }
            Err(error @ GoTlsError::Stripped) => {
                info!(pid, "{error}");
                None
            }
            Err(error) => {
                warn!(pid, %error, "Go executable's HTTPS not traced");
                None
            }
        };
        self.executables.insert(id, attached);
    }

    fn attach(&mut self, exe: &str, plan: &Plan) -> std::io::Result<Vec<OwnedFd>> {
        self.conn_types
            .insert(plan.tcp_conn_hash, 1, 0)
            .map_err(std::io::Error::other)?;
        let path = CString::new(exe).map_err(std::io::Error::other)?;
        let mut fds = Vec::new();
        for (program, offset) in self.programs.iter().zip(plan.offsets) {
            fds.push(self.pmu.attach(&path, offset, false, program)?);
        }
        Ok(fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_one_memmove_call_by_decoding_not_by_byte_search() {
        // MOVQ $0xe8, AX (an e8 byte inside an instruction); CALL memmove; RET
        let start = 0x1000u64;
        let mut code = vec![0x48, 0xc7, 0xc0, 0xe8, 0x00, 0x00, 0x00];
        let call_at = code.len() as u64;
        let memmove = 0x2000u64;
        let rel = (memmove as i64 - (start + call_at + 5) as i64) as i32;
        code.push(0xe8);
        code.extend(rel.to_le_bytes());
        code.push(0xc3);
        assert_eq!(memmove_call(&code, start, memmove), Ok(call_at));
        assert!(memmove_call(&code, start, memmove + 1).is_err(), "no call to it");
        let mut twice = code[..code.len() - 1].to_vec();
        let rel2 = (memmove as i64 - (start + twice.len() as u64 + 5) as i64) as i32;
        twice.push(0xe8);
        twice.extend(rel2.to_le_bytes());
        assert!(memmove_call(&twice, start, memmove).is_err(), "two calls: ambiguous");
    }

    #[test]
    fn this_test_binary_is_not_go() {
        let exe = std::env::current_exe().expect("exe");
        assert_eq!(plan(&exe), Err(GoTlsError::NotGo));
    }
}
