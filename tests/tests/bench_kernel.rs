//! The kernel-level benchmark keeps what its report says: here, that the tables it calls
//! roomy evict nothing. Enough new flows for that to matter (more than half the default flow
//! table, which the kernel splits between the CPUs' LRU lists), in fewer seconds than the full
//! run. Needs root; without it the test prints SKIPPED (or fails under LB_REQUIRE_PRIVILEGED=1).

use lb_tests::{bench_kernel, skip_unless_privileged};

#[test]
fn the_kernel_benchmark_times_new_flows_without_evicting_any() {
    if !skip_unless_privileged("the_kernel_benchmark_times_new_flows_without_evicting_any") {
        return;
    }
    let options = bench_kernel::KernelOptions {
        trials: 5,
        loop_packets: 200,
        wrapper_repeat: 30_000,
        new_flow_repeat: 30_000,
        flow_table_fills: &[1],
        full_table: 4_096,
    };
    let report = bench_kernel::run(options).expect("the benchmark runs and evicts nothing");
    assert_eq!(report.cases.len(), 7);
}
