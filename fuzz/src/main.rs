//! `cargo afl fuzz -i fuzz/corpus -o target/afl target/release/inference-core-fuzz`
//! (built with `cargo afl build --release --features afl`); see docs/hardening.md.

#[cfg(feature = "afl")]
fn main() {
    afl::fuzz!(|data: &[u8]| inference_core_fuzz::run(data));
}

#[cfg(not(feature = "afl"))]
fn main() {
    inference_core_fuzz::main_without_afl();
}
