//! Cache-hit classifications: benchmark (a).

use std::net::Ipv4Addr;
use std::time::Duration;

use firewall_protocol::CacheLifetime;
use wfp_rs::classify::Action;
use wfp_rs::irql::Irql;
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::layer::fields;
use wfp_rs::layer::value::{ConditionFlags, IpProtocol};
use wfp_rs_sim::{AleIrql, ClassifyRequest, DirectClassify, LoadedDriver, Machine};

use crate::{APP, PID, Service, Transport};

/// `ALE_AUTH_CONNECT_V4` for [`crate::connection`]`(local_port)`, as the network stack fills
/// it for a new connection (not pendable: a hit needs no pend).
pub fn request(local_port: u16) -> ClassifyRequest<AleAuthConnectV4> {
    let c = crate::connection(local_port);
    let ip = |addr: std::net::IpAddr| match addr {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    ClassifyRequest::new()
        .with::<fields::AleAppId>(APP)
        .with::<fields::IpProtocol>(IpProtocol::Tcp)
        .with::<fields::IpLocalAddress>(ip(c.local.ip()))
        .with::<fields::IpLocalPort>(c.local.port())
        .with::<fields::IpRemoteAddress>(ip(c.remote.ip()))
        .with::<fields::IpRemotePort>(c.remote.port())
        .with::<fields::Flags>(ConditionFlags::empty())
        .process(PID, APP)
}

/// Which callout answers the hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The firewall driver's outbound callout, through the SDK's `classify_trampoline`.
    Sdk,
    /// [`crate::raw_lookup`]: the same work in a C-style classifyFn.
    Raw,
}

/// A machine whose driver holds an `Allow` for [`crate::connection`]'s cache key.
pub struct HitMachine {
    variant: Variant,
    machine: Machine,
    driver: Option<LoadedDriver>,
    service: Option<Service>,
}

impl HitMachine {
    /// Boots the machine and loads the variant's driver. For [`Variant::Sdk`], a service
    /// answers the first connection with an `Allow` cached for an hour (the firewall's own
    /// path fills its cache); the raw baseline's driver fills its cache itself.
    pub fn start(variant: Variant) -> HitMachine {
        let machine = Machine::new();
        let (driver, service) = match variant {
            Variant::Sdk => {
                let driver = machine
                    .load_driver("firewall", crate::firewall::DriverEntry)
                    .expect("the firewall loads");
                let service = Service::start(
                    &machine,
                    Transport::Channel { outstanding: 1 },
                    1,
                    Duration::ZERO,
                    Some(CacheLifetime::from_secs(3600).expect("an hour is a valid lifetime")),
                );
                let first = machine.connect(&crate::connection(1), AleIrql::Dispatch);
                assert!(first.pended, "the first connection asks");
                assert_eq!(first.decision.action, Action::Permit);
                (driver, Some(service))
            }
            Variant::Raw => {
                let driver = machine
                    .load_driver("raw-lookup", crate::raw_lookup::DriverEntry)
                    .expect("the baseline loads");
                (driver, None)
            }
        };
        HitMachine {
            variant,
            machine,
            driver: Some(driver),
            service,
        }
    }

    /// The machine.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Cache hits counted by the variant's callout so far.
    pub fn hits(&self) -> u64 {
        match self.variant {
            Variant::Sdk => crate::firewall::STATS.snapshot().cache_hits,
            Variant::Raw => crate::raw_lookup::hits(),
        }
    }

    /// The prepared classification for [`DirectClassify::call`], to the variant's callout.
    pub fn direct(&self) -> DirectClassify<AleAuthConnectV4> {
        let callout = match self.variant {
            Variant::Sdk => firewall_driver::CALLOUT_CONNECT_V4,
            Variant::Raw => crate::raw_lookup::CALLOUT,
        };
        self.machine
            .direct_classify(callout, &request(2))
            .expect("a filter calls the callout")
    }

    /// One classification through the simulated filter engine, at `DISPATCH_LEVEL`.
    pub fn classify(&self, request: &ClassifyRequest<AleAuthConnectV4>) -> Action {
        self.machine.classify(Irql::DISPATCH, request).action
    }

    /// Unloads and checks that nothing is left. Drop every [`DirectClassify`] first.
    pub fn finish(mut self) {
        let driver = self.driver.take().expect("loaded");
        self.machine
            .unload_driver(driver)
            .expect("the driver unloads");
        if let Some(service) = self.service.take() {
            service.join();
        }
        assert_eq!(self.machine.pool_blocks(), [], "no pool left");
    }
}
