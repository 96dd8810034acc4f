//! Manifest building vs plain multi-threaded BLAKE3 over the same bytes, on this machine.
//!
//! `cargo bench -p imiswarm-benches --bench manifest` runs criterion on both, then measures them
//! again interleaved (median of several rounds each) and prints the ratio that the README quotes:
//! building a manifest must stay near the machine's hashing speed.
//! `IMISWARM_BENCH_MIB` sets the image size (default 1024 MiB).

use std::hint::black_box;
use std::io::Write;

use criterion::{Criterion, Throughput};
use imiswarm_benches::{mb_per_sec, median_time, random_bytes};
use imiswarm_protocol::limits::DEFAULT_PIECE_SIZE;
use imiswarm_protocol::manifest::{ManifestBuilder, ReadAt};

fn image_len() -> usize {
    std::env::var("IMISWARM_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1024)
        << 20
}

fn plain_blake3(data: &[u8]) -> blake3::Hash {
    blake3::Hasher::new().update_rayon(data).finalize()
}

fn build_manifest<R: ReadAt + ?Sized>(source: &R, len: usize) {
    let mut builder = ManifestBuilder::new("bench", 1, DEFAULT_PIECE_SIZE).unwrap();
    builder
        .add_file_at("disk.img", 0o644, len as u64, source, &mut |_| {})
        .unwrap();
    black_box(builder.finish().unwrap());
}

/// The same file access `imiswarm manifest build` uses.
struct PreadFile(std::fs::File);

impl ReadAt for PreadFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
}

fn main() {
    let len = image_len();
    let data = random_bytes(len, 1);

    let mut criterion = Criterion::default().sample_size(10).configure_from_args();
    let mut group = criterion.benchmark_group("hash_1GiB");
    group.throughput(Throughput::Bytes(len as u64));
    group.bench_function("blake3_update_rayon", |b| {
        b.iter(|| black_box(plain_blake3(&data)))
    });
    group.bench_function("manifest_build_64KiB", |b| {
        b.iter(|| build_manifest(&data[..], len))
    });
    group.finish();
    criterion.final_summary();

    // The ratio, measured interleaved in this one run so both see the same machine state.
    let tmp = std::env::temp_dir().join(format!("imiswarm-bench-{}.img", std::process::id()));
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&data))
        .expect("write the benchmark file");
    let rounds = 5;
    let (mut plain, mut memory, mut file) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(median_time(1, || {
            black_box(plain_blake3(&data));
        }));
        memory.push(median_time(1, || build_manifest(&data[..], len)));
        file.push(median_time(1, || {
            build_manifest(&PreadFile(std::fs::File::open(&tmp).unwrap()), len)
        }));
    }
    let _ = std::fs::remove_file(&tmp);
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (plain, memory, file) = (median(&mut plain), median(&mut memory), median(&mut file));
    let threads = rayon::current_num_threads();
    println!();
    println!(
        "manifest build vs plain BLAKE3, {} MiB, {threads} threads, median of {rounds}:",
        len >> 20
    );
    println!(
        "  plain BLAKE3 (update_rayon)        {:8.0} MB/s",
        mb_per_sec(len, plain)
    );
    println!(
        "  manifest build, from memory        {:8.0} MB/s  ratio {:.2}",
        mb_per_sec(len, memory),
        plain.as_secs_f64() / memory.as_secs_f64()
    );
    println!(
        "  manifest build, from a cached file {:8.0} MB/s  ratio {:.2}",
        mb_per_sec(len, file),
        plain.as_secs_f64() / file.as_secs_f64()
    );
}
