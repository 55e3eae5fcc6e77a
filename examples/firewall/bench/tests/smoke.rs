//! The benchmarks' scenarios, once each and small, so `cargo test` keeps them working: every
//! classification hits the cache it is meant to hit, every connection gets the service's
//! verdict, and every machine unloads clean. (The measurements themselves: `cargo bench -p
//! firewall-bench`.)

#![cfg(any(not(windows), feature = "sim"))]

use std::time::Duration;

use firewall_bench::hit::{self, HitMachine, Variant};
use firewall_bench::load::{Design, Load, LoadConfig};
use wfp_rs::classify::Action;
use wfp_rs_sim::AleIrql;

#[test]
fn both_callouts_answer_from_their_cache_directly_and_through_the_engine() {
    for variant in [Variant::Sdk, Variant::Raw] {
        let m = HitMachine::start(variant);
        let before = m.hits();
        let mut direct = m.direct();
        m.machine().at_dispatch(|irql| {
            for _ in 0..100 {
                assert_eq!(direct.call(irql), Action::Permit, "{variant:?}");
            }
        });
        m.machine().at_passive(|irql| {
            assert_eq!(direct.call(irql), Action::Permit, "{variant:?} at passive");
        });
        drop(direct);
        let request = hit::request(3);
        for _ in 0..10 {
            assert_eq!(m.classify(&request), Action::Permit, "{variant:?}");
        }
        // Hits, not defaults (the default is deny) nor loopback.
        assert_eq!(
            m.hits() - before,
            111,
            "{variant:?}: every call hit the cache"
        );
        m.finish();
    }
}

#[test]
fn both_designs_decide_every_connection_of_a_wave() {
    for (design, ale_irql) in [
        (Design::Pended, AleIrql::Dispatch),
        (Design::Pended, AleIrql::Passive),
        (Design::Blocking, AleIrql::Passive),
    ] {
        let load = Load::start(LoadConfig {
            design,
            clients: 4,
            per_client: 3,
            ale_irql,
            workers: 2,
            service_threads: 2,
            service_latency: Duration::from_micros(50),
        });
        for _ in 0..2 {
            let wave = load.wave();
            assert_eq!(wave.latencies.len(), 12, "{design:?}");
            assert_eq!(wave.denied, 0, "{design:?}: the service allows everything");
        }
        assert_eq!(load.finish(), 24, "{design:?}: every connection asked once");
    }
}

#[test]
fn the_firewall_holds_64_bytes_of_pool_per_cached_verdict() {
    let measured = firewall_bench::firewall::pool_per_cached_verdict();
    assert_eq!(measured, firewall_driver::cache::BYTES_PER_VERDICT as f64);
    assert!(
        measured <= 64.0,
        "issue 11: at most 64 bytes per cached verdict"
    );
}

#[test]
fn the_summary_prints_this_invocations_lines_in_bench_order() {
    use firewall_bench::summary;
    let dir = std::env::temp_dir().join(format!("firewall-bench-summary-{}", std::process::id()));
    // A file of another invocation is skipped.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("round_trip.summary"),
        "invocation 0\nratio stale = 1\n",
    )
    .unwrap();
    summary::record(&dir, "throughput", &["ratio c = 2".to_owned()]).unwrap();
    summary::record(
        &dir,
        "classify",
        &["memory m = 64".to_owned(), "ratio a = 1.05".to_owned()],
    )
    .unwrap();
    assert_eq!(
        summary::collect(&dir),
        ["memory m = 64", "ratio a = 1.05", "ratio c = 2"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_summary_goes_under_the_target_directory() {
    let exe = std::path::Path::new("/work/target/release/deps/classify-0123");
    assert_eq!(
        firewall_bench::summary::dir(exe),
        std::path::Path::new("/work/target/firewall-bench")
    );
}
