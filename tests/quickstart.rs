//! The quick start on the crate page of `wfp_rs` (wfp-rs/src/lib.rs): its driver and its simulator
//! test, run. The crate page cannot run the test itself (a doctest is not a test binary), so
//! `the_crate_page_shows_this_code` checks that both copies say the same.

#![cfg(any(not(windows), feature = "sim"))]

mod my_driver {

    use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
    use wfp_rs::driver::{Driver, DriverState};
    use wfp_rs::engine::{Engine, SessionOptions};
    use wfp_rs::filter::{Filter, FilterAction, Match};
    use wfp_rs::irql::{DispatchLevel, PassiveLevel};
    use wfp_rs::layer::{AleAuthConnectV4, fields, value::IpProtocol};
    use wfp_rs::{Status, guid};

    // The kernel image allocates from the pool (the management API allocates too).
    #[cfg(all(windows, not(feature = "sim")))]
    #[global_allocator]
    static ALLOCATOR: wfp_rs::pool::PoolAllocator =
        wfp_rs::pool::PoolAllocator::new(wfp_rs::pool::PoolTag::new(b"MyDr"));

    // Your own keys (`uuidgen`): they name your objects in the filter engine of every machine.
    pub const CALLOUT: CalloutKey<AleAuthConnectV4> =
        CalloutKey::new(guid!("7d1c5e0a-9f0b-4e8a-a1f2-3b6c8d9e0f11"));
    pub const FILTER: wfp_rs::Guid = guid!("2a4f6b8c-0d1e-4f3a-b5c7-d9e1f3a5b7c9");

    pub struct BlockPort1234;

    impl Callout<AleAuthConnectV4> for BlockPort1234 {
        fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
            if c.values.get::<fields::IpRemotePort>() == Ok(1234) {
                c.out.block();
            } else {
                // Without the write right a heavier filter has decided; permit changes nothing.
                let _ = c.out.permit();
            }
        }
    }

    pub struct MyDriver {
        engine: Engine,
        callout: CalloutRegistration<AleAuthConnectV4, BlockPort1234>,
    }

    impl DriverState for MyDriver {
        fn unload(self, irql: &mut PassiveLevel<'_>) {
            // The filter goes first: a terminating filter without its callout blocks everything.
            let _ = self.engine.close(irql);
            let _ = self.callout.unregister(irql);
        }
    }

    #[wfp_rs::driver_entry]
    fn entry(irql: &mut PassiveLevel<'_>, driver: &mut Driver<'_>) -> Result<MyDriver, Status> {
        let callout = CalloutRegistration::register(irql, driver, CALLOUT, BlockPort1234)?;
        let engine = Engine::open(irql, SessionOptions::new().dynamic())?;
        engine.add_callout(irql, &wfp_rs::engine::CalloutEntry::new(CALLOUT))?;
        engine.add_filter(
            irql,
            &Filter::<AleAuthConnectV4>::new(FILTER)
                .action(FilterAction::CalloutTerminating(CALLOUT))
                .condition::<fields::IpProtocol>(Match::Equal(IpProtocol::Tcp)),
        )?;
        Ok(MyDriver { engine, callout })
    }
}
use wfp_rs::classify::Action;
use wfp_rs::irql::Irql;
use wfp_rs::layer::{AleAuthConnectV4, fields, value::IpProtocol};
use wfp_rs_sim::{ClassifyRequest, Machine};

#[test]
fn blocks_port_1234() {
    let machine = Machine::new();
    let driver = machine
        .load_driver("my-driver", my_driver::DriverEntry)
        .expect("loads");
    let connect = |port: u16| {
        ClassifyRequest::<AleAuthConnectV4>::new()
            .with::<fields::IpProtocol>(IpProtocol::Tcp)
            .with::<fields::IpRemotePort>(port)
    };
    assert_eq!(
        machine.classify(Irql::DISPATCH, &connect(1234)).action,
        Action::Block
    );
    assert_eq!(
        machine.classify(Irql::DISPATCH, &connect(443)).action,
        Action::Permit
    );
    machine
        .unload_driver(driver)
        .expect("unloads without leaks");
}

/// The code blocks of the crate page (`//! ` lines between fences), with every whitespace
/// character removed, so that line breaks and rustfmt's layout do not count as differences.
fn crate_page_blocks() -> Vec<String> {
    let page = include_str!("../wfp-rs/src/lib.rs");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines().filter_map(|line| line.strip_prefix("//!")) {
        let line = line.strip_prefix(' ').unwrap_or(line);
        if line.starts_with("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some(String::new()),
            }
        } else if let Some(block) = &mut current {
            // Lines hidden from the page (`# fn main() {}`) and the crate attributes a doctest
            // needs are not part of what this file repeats.
            if !line.starts_with("# ") && line != "#![no_std]" && line != "extern crate alloc;" {
                block.extend(line.chars().filter(|c| !c.is_whitespace()));
            }
        }
    }
    blocks
}

#[test]
fn the_crate_page_shows_this_code() {
    let this: String = include_str!("quickstart.rs")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let blocks = crate_page_blocks();
    let driver = blocks
        .iter()
        .find(|block| block.contains("#[wfp_rs::driver_entry]"))
        .expect("the crate page shows a driver");
    let test = blocks
        .iter()
        .find(|block| block.contains("fnblocks_port_1234()"))
        .expect("the crate page shows a simulator test");
    assert!(
        this.contains(driver.as_str()),
        "the driver on the crate page (wfp-rs/src/lib.rs) differs from `my_driver` here"
    );
    assert!(
        this.contains(test.as_str()),
        "the test on the crate page (wfp-rs/src/lib.rs) differs from `blocks_port_1234` here"
    );
}

/// The crate page's manifest: the first `toml` block of wfp-rs/src/lib.rs.
fn crate_page_manifest() -> toml::Table {
    let page = include_str!("../wfp-rs/src/lib.rs");
    let mut lines = page.lines().filter_map(|line| line.strip_prefix("//!"));
    lines
        .by_ref()
        .find(|line| line.trim() == "```toml")
        .expect("the crate page shows a manifest");
    let manifest: String = lines
        .take_while(|line| line.trim() != "```")
        .map(|line| format!("{}\n", line.strip_prefix(' ').unwrap_or(line)))
        .collect();
    manifest.parse().expect("the crate page's manifest is TOML")
}

/// A user copies the manifest as it is, so its `sim` feature must switch the simulator crate
/// on too: on a Windows host `wfp-rs-sim` is empty without its own `sim` feature, and the test
/// would fail with unresolved imports. The examples' manifests are built and tested that way.
#[test]
fn the_crate_page_manifest_is_the_examples() {
    let page = crate_page_manifest();
    let starter: toml::Table = include_str!("../examples/starter/Cargo.toml")
        .parse()
        .expect("the starter's manifest is TOML");
    let sim = |manifest: &toml::Table| manifest["features"]["sim"].clone();
    assert_eq!(
        sim(&page),
        sim(&starter),
        "the `sim` feature on the crate page (wfp-rs/src/lib.rs) differs from examples/starter's"
    );
    for (table, key) in [
        ("lib", "crate-type"),
        ("build-dependencies", "wfp-rs-build"),
        ("dev-dependencies", "wfp-rs-sim"),
    ] {
        assert!(
            page[table].get(key).is_some(),
            "the crate page's manifest has no {table}.{key}"
        );
    }
    for profile in ["dev", "release"] {
        assert_eq!(
            page["profile"][profile]["panic"].as_str(),
            Some("abort"),
            "the crate page's manifest does not abort on panic in the {profile} profile"
        );
    }
}
