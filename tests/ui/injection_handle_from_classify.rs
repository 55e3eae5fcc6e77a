// Creating an injection handle from classifyFn. FwpsInjectionHandleCreate0 requires
// PASSIVE_LEVEL and classifyFn may run at DISPATCH_LEVEL: create the handle in DriverEntry and
// keep it in the driver's state.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::inject::InjectionHandle;
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthRecvAcceptV4;

struct LazyInjector;

impl Callout<AleAuthRecvAcceptV4> for LazyInjector {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthRecvAcceptV4>) {
        let handle = InjectionHandle::create(irql, None);
        let _ = (handle, c);
    }
}

fn main() {}
