// A callout registered for one layer and added to the engine and filtered at another. In C,
// `FwpsCalloutRegister3` takes no layer and the callout entry and the filter meet the callout
// only through its GUID: this registers, and classify reads ALE_AUTH_CONNECT_V4's values at
// OUTBOUND_TRANSPORT_V4's indices. The key carries its layer, so neither the callout entry nor
// the filter action at another layer compiles.

use wfp_rs::callout::{Callout, CalloutKey, CalloutRegistration, Classify};
use wfp_rs::driver::Driver;
use wfp_rs::engine::{CalloutEntry, Engine};
use wfp_rs::filter::{Filter, FilterAction};
use wfp_rs::irql::{DispatchLevel, PassiveLevel};
use wfp_rs::layer::{AleAuthConnectV4, OutboundTransportV4};
use wfp_rs::{Status, guid};

const COUNT: CalloutKey<OutboundTransportV4> =
    CalloutKey::new(guid!("8d1c9f4e-2b7a-4e53-9c06-a1f2e3d4c5b6"));

struct Counter;

impl Callout<OutboundTransportV4> for Counter {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, OutboundTransportV4>) {
        let _ = c.out.permit();
    }
}

fn install(irql: &PassiveLevel<'_>, driver: &Driver<'_>, engine: &Engine) -> Result<(), Status> {
    let registration = CalloutRegistration::register(irql, driver, COUNT, Counter)?;
    engine.add_callout(irql, &CalloutEntry::<AleAuthConnectV4>::new(COUNT))?;
    let filter = Filter::<AleAuthConnectV4>::new(guid!("8d1c9f4e-2b7a-4e53-9c06-a1f2e3d4c5b7"))
        .action(FilterAction::CalloutTerminating(COUNT));
    engine.add_filter(irql, &filter)?;
    core::mem::forget(registration);
    Ok(())
}

fn main() {}
