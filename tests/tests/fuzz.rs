//! The fuzzer's short run in the normal suite (issue 5): a fixed seed, so that a regression
//! shows on every run, and a seed from the clock, so that successive runs cover new packets.
//! The long run is `cargo xtask fuzz`. Needs root (see `lb_tests::skip_unless_privileged`).

use std::io::Write as _;

use lb_tests::{fuzz, skip_unless_privileged};

/// Packets per seed: both runs together take a few seconds in a debug build.
const PACKETS: u64 = 20_000;
const FIXED_SEED: u64 = 1_830_946;

#[test]
fn fuzzed_packets_keep_the_datapath_properties() {
    if !skip_unless_privileged("fuzzed_packets_keep_the_datapath_properties") {
        return;
    }
    // LB_FUZZ_SEED replays a clock seed that failed.
    let clock_seed = match std::env::var("LB_FUZZ_SEED") {
        Ok(seed) => seed.parse().expect("LB_FUZZ_SEED is a decimal number"),
        Err(_) => fuzz::seed_from_clock(),
    };
    let failed: Vec<String> = [FIXED_SEED, clock_seed]
        .into_iter()
        .map(|seed| {
            // Straight to the stderr handle: the harness hides eprintln! output of passing
            // tests, and a clock seed is worth nothing unless it is seen.
            let line = format!("fuzz: seed {seed}, {PACKETS} packets (LB_FUZZ_SEED={seed})\n");
            std::io::stderr()
                .write_all(line.as_bytes())
                .expect("writing the seed to stderr");
            fuzz::run(seed, PACKETS)
        })
        .filter(|report| !report.passed())
        .map(|report| report.to_string())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
