//! The nightly-free fallback of the cargo-fuzz targets in `agent/fuzz`:
//! the same harnesses, fed the checked-in corpus and seeded random
//! mutations of it for a bounded time (`MESHLESS_FUZZ_SECS`, default 5 s
//! per target). A failing input is written under `target/fuzz-failures/`
//! so it can be replayed (`MESHLESS_FUZZ_REPLAY=<file>`) and added to the
//! corpus.
#[path = "../fuzz/harness.rs"]
mod harness;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng, SeedableRng};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    assert!(!seeds.is_empty(), "corpus {} is empty", dir.display());
    seeds.sort();
    seeds
}

/// One mutation in the style of libFuzzer's: flip, insert, erase, copy a
/// span, or splice with another seed.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    for _ in 0..rng.random_range(1..=4) {
        let len = input.len();
        match rng.random_range(0..6) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                input.insert(i, rng.random());
            }
            3 if len > 1 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(16));
                input.drain(i..i + n);
            }
            4 if len > 1 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                let chunk = input[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                input.splice(at..at, chunk);
            }
            _ => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let cut = rng.random_range(0..=input.len());
                let from = rng.random_range(0..=other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
        }
        input.truncate(16 * 1024);
    }
}

fn budget() -> Duration {
    let secs = std::env::var("MESHLESS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs)
}

/// Runs `harness` on every seed, then on mutations until the time is up;
/// returns the number of executions.
fn fuzz(target: &str, harness: impl Fn(&[u8]) + std::panic::RefUnwindSafe) -> u64 {
    // `MESHLESS_FUZZ_REPLAY=target/fuzz-failures/<target>-N.bin` replays one
    // saved input on its target.
    if let Ok(path) = std::env::var("MESHLESS_FUZZ_REPLAY") {
        if Path::new(&path)
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with(target))
        {
            harness(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")));
        }
        return 1;
    }
    let seeds = corpus(target);
    let mut rng = StdRng::seed_from_u64(0x6d65_7368_6c65_7373);
    let deadline = Instant::now() + budget();
    let mut execs = 0u64;
    let mut pool = seeds.clone();
    let mut i = 0;
    while i < seeds.len() || Instant::now() < deadline {
        let input = if i < seeds.len() {
            seeds[i].clone()
        } else {
            let mut m = pool[rng.random_range(0..pool.len())].clone();
            mutate(&mut rng, &mut m, &seeds);
            m
        };
        i += 1;
        if let Err(panic) = std::panic::catch_unwind(|| harness(&input)) {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{target}-{execs}.bin"));
            let _ = std::fs::write(&path, &input);
            std::panic::resume_unwind(Box::new(format!(
                "{target}: input {} broke an invariant: {:?}",
                path.display(),
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            )));
        }
        execs += 1;
        // Keep some mutants as new starting points (no coverage feedback
        // on stable: a bounded random pool instead).
        if execs.is_multiple_of(64) && pool.len() < 256 {
            pool.push(input);
        }
    }
    eprintln!("fuzz {target}: {execs} executions in {:?}", budget());
    execs
}

#[test]
fn the_http_parser_survives_arbitrary_bytes_split_anywhere() {
    let execs = fuzz("http_stream", harness::http_stream);
    assert!(execs > 0);
}

#[test]
fn the_http2_parser_survives_arbitrary_frames_split_anywhere() {
    let execs = fuzz("http2", harness::http2);
    assert!(execs > 0);
}

fn correlator_with(faults: harness::Faults) -> u64 {
    fuzz("correlator", move |data| {
        harness::correlator(data, faults);
    })
}

#[test]
fn the_correlator_never_mispairs_or_grows_under_reordering_splits_and_closes() {
    let faults = harness::Faults {
        lose: false,
        duplicate: false,
        ..harness::Faults::ALL
    };
    assert!(correlator_with(faults) > 0);
}
