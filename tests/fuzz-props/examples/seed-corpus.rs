//! Writes the seeds (valid messages made by the real encoders, `fuzz_props::seeds`) into
//! `fuzz/corpus/<target>/seed-<name>`, for `cargo fuzz cmin` to fold into the corpora. Run from
//! anywhere: `cargo run -p fuzz-props --example seed-corpus`.

#[cfg(any(not(windows), feature = "sim"))]
fn main() {
    use std::path::Path;

    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for seed in fuzz_props::seeds() {
        let dir = corpus.join(seed.target);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("expected to create {}: {e}", dir.display()));
        let file = dir.join(format!("seed-{}", seed.name));
        std::fs::write(&file, &seed.bytes)
            .unwrap_or_else(|e| panic!("expected to write {}: {e}", file.display()));
        println!("{} ({} bytes)", file.display(), seed.bytes.len());
    }
}

#[cfg(not(any(not(windows), feature = "sim")))]
fn main() {
    eprintln!("fuzz-props needs its `sim` feature on Windows: --features sim");
}
