//! The filter-engine objects both C-style callouts of the benchmarks need: a provider, a
//! sublayer of the firewall's weight, the callout entry at `ALE_AUTH_CONNECT_V4`, and one
//! terminating filter for TCP and UDP — the firewall driver's own outbound setup.

use wfp_rs::callout::CalloutKey;
use wfp_rs::engine::{CalloutEntry, Engine, Provider, SessionOptions, Sublayer};
use wfp_rs::filter::{Filter as WfpFilter, FilterAction, Match};
use wfp_rs::irql::PassiveLevel;
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::layer::fields;
use wfp_rs::layer::value::IpProtocol;
use wfp_rs::{Guid, Status};

/// The keys of one callout's engine objects.
pub(crate) struct Keys {
    /// The name every object gets.
    pub name: &'static str,
    pub provider: Guid,
    pub sublayer: Guid,
    pub callout: CalloutKey<AleAuthConnectV4>,
    pub filter: Guid,
}

/// Opens a dynamic session and adds `keys`' objects in one transaction; closing the returned
/// session deletes them.
pub(crate) fn add(irql: &PassiveLevel<'_>, keys: &Keys) -> Result<Engine, Status> {
    let engine = Engine::open(irql, SessionOptions::new().dynamic().name(keys.name))?;
    let txn = engine.transaction(irql)?;
    txn.add_provider(irql, &Provider::new(keys.provider).name(keys.name))?;
    txn.add_sublayer(
        irql,
        &Sublayer::new(keys.sublayer)
            .name(keys.name)
            .provider(keys.provider)
            .weight(firewall_driver::SUBLAYER_WEIGHT),
    )?;
    txn.add_callout(
        irql,
        &CalloutEntry::new(keys.callout)
            .name(keys.name)
            .provider(keys.provider),
    )?;
    let mut filter = WfpFilter::<AleAuthConnectV4>::new(keys.filter)
        .name(keys.name)
        .provider(keys.provider)
        .sublayer(keys.sublayer)
        .action(FilterAction::CalloutTerminating(keys.callout));
    for protocol in [IpProtocol::Tcp, IpProtocol::Udp] {
        filter = filter.condition::<fields::IpProtocol>(Match::Equal(protocol));
    }
    txn.add_filter(irql, &filter)?;
    txn.commit(irql)?;
    Ok(engine)
}
