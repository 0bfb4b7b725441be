//! Finding a few named symbols in an ELF file without making its symbol
//! tables resident: exported symbols through the file's hash table
//! (`.gnu.hash`, else `.hash`), the rest by reading a table in small
//! chunks with `pread`.
//!
//! Why: a walk over a mapped `.dynsym`/`.dynstr` faults every page of them
//! into the agent while the mapping lives (node's are 7 MiB), and so does a
//! walk over a Rust or Go executable's `.symtab`/`.strtab` (4-6 MiB for
//! oha or this agent). Those pages count in the agent's RSS and set its
//! peak. A hash lookup touches a few pages; a chunked read keeps at most
//! [`CHUNK`] bytes (the page cache holds the file either way).
use std::{fs::File, os::unix::fs::FileExt};

use object::{
    elf,
    read::elf::{ElfFile64, SectionHeader, Sym},
    Endian, Endianness,
};

/// An ELF64 file as `object` reads it from a mapping.
pub type Elf64<'data> = ElfFile64<'data, Endianness>;

/// A defined symbol: its virtual address and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symbol {
    pub address: u64,
    pub size: u64,
}

/// Which symbol table [`scan`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `.dynsym`: what the file exports.
    Dynamic,
    /// `.symtab`: every symbol, when not stripped.
    Static,
}

/// Bytes read at once by [`scan`].
pub const CHUNK: usize = 64 * 1024;

/// Size of an `Elf64_Sym`.
const SYM_SIZE: usize = 24;

/// The defined exported symbols called `names`, found through the file's
/// hash table; None when it has none (then [`scan`] `.dynsym`). With
/// symbol versions, the default version (what the dynamic linker binds).
pub fn exported<const N: usize>(elf: &Elf64, names: &[&str; N]) -> Option<[Option<Symbol>; N]> {
    let (endian, data) = (elf.endian(), elf.data());
    let sections = elf.elf_section_table();
    let symbols = elf.elf_dynamic_symbol_table();
    if symbols.is_empty() {
        return None;
    }
    let versions = sections.versions(endian, data).ok().flatten().unwrap_or_default();
    let defined = |found: Option<(object::SymbolIndex, &elf::Sym64<Endianness>)>| {
        let (_, sym) = found?;
        (sym.st_shndx(endian) != elf::SHN_UNDEF).then(|| Symbol {
            address: sym.st_value(endian),
            size: sym.st_size(endian),
        })
    };
    if let Ok(Some((table, _))) = sections.gnu_hash(endian, data) {
        return Some(names.map(|name| {
            let name = name.as_bytes();
            defined(table.find(endian, name, elf::gnu_hash(name), None, symbols, &versions))
        }));
    }
    if let Ok(Some((table, _))) = sections.hash(endian, data) {
        return Some(names.map(|name| {
            let name = name.as_bytes();
            defined(table.find(endian, name, elf::hash(name), None, symbols, &versions))
        }));
    }
    None
}

/// The first defined symbol called each of `names` in `table`, read from
/// `file` (the file `elf` was parsed from) [`CHUNK`] bytes at a time:
/// first the string table, for where each name's bytes end a string (the
/// linker may share a name's bytes with a longer name ending the same),
/// then the symbols whose name points there.
pub fn scan<const N: usize>(
    file: &File,
    elf: &Elf64,
    table: Table,
    names: &[&str; N],
) -> std::io::Result<[Option<Symbol>; N]> {
    scan_in_chunks(file, elf, table, names, CHUNK)
}

fn scan_in_chunks<const N: usize>(
    file: &File,
    elf: &Elf64,
    table: Table,
    names: &[&str; N],
    chunk: usize,
) -> std::io::Result<[Option<Symbol>; N]> {
    let mut found = [None; N];
    let endian = elf.endian();
    let kind = match table {
        Table::Dynamic => elf::SHT_DYNSYM,
        Table::Static => elf::SHT_SYMTAB,
    };
    let sections = elf.elf_section_table();
    let Some(symtab) = sections.iter().find(|s| s.sh_type(endian) == kind) else {
        return Ok(found);
    };
    let Ok(strtab) = sections.section(object::SectionIndex(symtab.sh_link(endian) as usize)) else {
        return Ok(found);
    };
    let (Some(symbols), Some(strings)) = (symtab.file_range(endian), strtab.file_range(endian)) else {
        return Ok(found);
    };
    let at = name_offsets(file, strings, names, chunk)?;
    if at.iter().all(Vec::is_empty) {
        return Ok(found);
    }
    let little = elf.endian().is_little_endian();
    let u16_at = |b: &[u8], at: usize| {
        let v = [b[at], b[at + 1]];
        if little {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        }
    };
    let u32_at = |b: &[u8], at: usize| {
        let v = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if little {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let u64_at = |b: &[u8], at: usize| (u64::from(u32_at(b, at)), u64::from(u32_at(b, at + 4)));
    let u64_of = |b: &[u8], at: usize| {
        let (a, b) = u64_at(b, at);
        if little {
            a | b << 32
        } else {
            a << 32 | b
        }
    };
    let mut buf = vec![0u8; chunk.max(SYM_SIZE) / SYM_SIZE * SYM_SIZE];
    let (mut offset, end) = (symbols.0, symbols.0.saturating_add(symbols.1));
    while offset < end && found.iter().any(Option::is_none) {
        let len = (buf.len() as u64).min(end - offset) as usize / SYM_SIZE * SYM_SIZE;
        if len == 0 {
            break;
        }
        file.read_exact_at(&mut buf[..len], offset)?;
        // Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16,
        // st_value u64, st_size u64.
        for entry in buf[..len].chunks_exact(SYM_SIZE) {
            let shndx = u16_at(entry, 6);
            if shndx == elf::SHN_UNDEF || (shndx >= elf::SHN_LORESERVE && shndx != elf::SHN_XINDEX) {
                continue;
            }
            let name = u64::from(u32_at(entry, 0));
            for (i, offsets) in at.iter().enumerate() {
                if found[i].is_none() && offsets.contains(&name) {
                    found[i] = Some(Symbol {
                        address: u64_of(entry, 8),
                        size: u64_of(entry, 16),
                    });
                }
            }
        }
        offset += len as u64;
    }
    Ok(found)
}

/// For each name: the offsets in the string table `(offset, size)` where a
/// string equal to it starts (its bytes followed by NUL, anywhere: a
/// shared suffix of a longer string counts).
fn name_offsets<const N: usize>(
    file: &File,
    (start, size): (u64, u64),
    names: &[&str; N],
    chunk: usize,
) -> std::io::Result<[Vec<u64>; N]> {
    let mut at: [Vec<u64>; N] = std::array::from_fn(|_| Vec::new());
    let longest = names.iter().map(|n| n.len()).max().unwrap_or(0);
    let end = start.saturating_add(size);
    // The last `longest` bytes before the chunk (a name may straddle it),
    // then the chunk.
    let mut buf = vec![0u8; longest + chunk.max(1)];
    let mut carried = 0usize;
    let mut offset = start;
    while offset < end {
        let len = (chunk.max(1) as u64).min(end - offset) as usize;
        file.read_exact_at(&mut buf[carried..carried + len], offset)?;
        let filled = carried + len;
        // Absolute file offset of buf[0].
        let base = offset - carried as u64;
        for (nul, _) in buf[..filled].iter().enumerate().filter(|(_, b)| **b == 0) {
            for (i, name) in names.iter().enumerate() {
                let name = name.as_bytes();
                if nul >= name.len() && &buf[nul - name.len()..nul] == name {
                    at[i].push(base + (nul - name.len()) as u64 - start);
                }
            }
        }
        // Keep the tail that may begin a name ending in the next chunk;
        // the NULs in it were handled here, so the next pass skips them
        // by starting its NUL search past the carried bytes.
        let keep = longest.min(filled);
        buf.copy_within(filled - keep..filled, 0);
        // Blank the carried NULs: they were matched in this pass.
        for b in &mut buf[..keep] {
            if *b == 0 {
                *b = 1;
            }
        }
        carried = keep;
        offset += len as u64;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object, ObjectSymbol};
    use std::path::Path;

    /// The first definition of each name by walking the whole mapped table.
    fn walk<const N: usize>(elf: &Elf64, table: Table, names: &[&str; N]) -> [Option<Symbol>; N] {
        let mut found = [None; N];
        let symbols: Vec<_> = match table {
            Table::Dynamic => elf.dynamic_symbols().collect(),
            Table::Static => elf.symbols().collect(),
        };
        for symbol in symbols {
            let Ok(name) = symbol.name() else { continue };
            if let Some(i) = names.iter().position(|n| *n == name) {
                if found[i].is_none() && symbol.section_index().is_some() {
                    found[i] = Some(Symbol {
                        address: symbol.address(),
                        size: symbol.size(),
                    });
                }
            }
        }
        found
    }

    fn with_elf(path: &Path, check: impl FnOnce(&File, &Elf64)) {
        let file = File::open(path).expect("open");
        // SAFETY: a read-only mapping of a file no test changes.
        let map = unsafe { crate::propagation::memmap_file(&file) }.expect("map");
        let elf = Elf64::parse(&*map).expect("ELF64");
        check(&file, &elf);
    }

    const SSL: [&str; 5] = [
        "SSL_read",
        "SSL_read_ex",
        "SSL_write",
        "SSL_write_ex",
        "no_such_symbol_here",
    ];

    fn installed(paths: &[&str]) -> Vec<&'static Path> {
        paths
            .iter()
            .map(|p| Path::new(*p))
            .filter(|p| p.exists())
            .map(|p| Box::leak(p.to_path_buf().into_boxed_path()) as &Path)
            .collect()
    }

    #[test]
    fn the_hash_lookup_finds_what_a_full_walk_of_the_exports_finds_in_node_and_libssl() {
        let mut files = installed(crate::tls::library::HOST_CANDIDATES);
        files.extend(installed(crate::tls::library::HOST_EXECUTABLES));
        for path in files {
            with_elf(path, |file, elf| {
                let walked = walk(elf, Table::Dynamic, &SSL);
                assert!(walked[0].is_some(), "{}: SSL_read exported", path.display());
                let hashed = exported(elf, &SSL).expect("a hash table");
                assert_eq!(hashed, walked, "{}", path.display());
                let scanned = scan(file, elf, Table::Dynamic, &SSL).expect("scan");
                assert_eq!(scanned, walked, "{}", path.display());
            });
        }
    }

    #[test]
    fn a_chunked_scan_of_the_symbol_table_finds_what_a_full_walk_finds_even_with_tiny_chunks() {
        let exe = std::env::current_exe().expect("exe");
        with_elf(&exe, |file, elf| {
            // Names that are defined here: a few spread over the table.
            let all: Vec<String> = elf
                .symbols()
                .filter(|s| s.section_index().is_some())
                .filter_map(|s| s.name().ok().map(str::to_owned))
                .filter(|n| !n.is_empty())
                .collect();
            assert!(all.len() > 100, "the test binary has a symbol table");
            let pick = |i: usize| all[i * (all.len() - 1) / 3].as_str();
            let names = [pick(0), pick(1), pick(2), pick(3), "main", "no_such_symbol_here"];
            let walked = walk(elf, Table::Static, &names);
            assert!(walked[..5].iter().all(Option::is_some), "{names:?} {walked:?}");
            assert_eq!(walked[5], None);
            for chunk in [7, 100, 4096, CHUNK] {
                let scanned = scan_in_chunks(file, elf, Table::Static, &names, chunk).expect("scan");
                assert_eq!(scanned, walked, "chunk {chunk}");
            }
        });
    }

    #[test]
    fn a_name_that_is_the_tail_of_a_longer_name_is_found_at_the_shared_bytes() {
        let dir = std::env::temp_dir().join(format!("meshless-strtab-{}", std::process::id()));
        std::fs::write(&dir, b"\0xSSL_read\0SSL_write\0SSL_rea").expect("write");
        let file = File::open(&dir).expect("open");
        for chunk in [1, 3, 64] {
            let at = name_offsets(&file, (0, 28), &["SSL_read", "SSL_write", "read"], chunk).expect("read");
            assert_eq!(at, [vec![2], vec![11], vec![6]], "chunk {chunk}");
        }
        std::fs::remove_file(&dir).ok();
    }
}
