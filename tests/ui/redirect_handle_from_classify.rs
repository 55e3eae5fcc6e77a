// Creating a redirect handle from classifyFn. FwpsRedirectHandleCreate0 requires PASSIVE_LEVEL
// and classifyFn may run at DISPATCH_LEVEL: create the handle once in DriverEntry and keep it
// in the driver's state, as the documentation advises.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleConnectRedirectV4;
use wfp_rs::redirect::RedirectHandle;
use wfp_rs::{Guid, guid};

const PROVIDER: Guid = guid!("53000000-0000-0000-0000-0000000000aa");

struct LazyProxy;

impl Callout<AleConnectRedirectV4> for LazyProxy {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleConnectRedirectV4>) {
        let handle = RedirectHandle::create(irql, PROVIDER);
        let _ = (handle, c);
    }
}

fn main() {}
