// Injecting a clone twice, or freeing it after injecting it. In C the NET_BUFFER_LIST pointer
// stays in the driver's hands after FwpsInjectTransportReceiveAsync0, and using it again (the
// completion routine frees it) is a use after free. Here injecting consumes the clone.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::inject::InjectionHandle;
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthRecvAcceptV4;

struct Reinjector {
    injection: InjectionHandle,
}

impl Callout<AleAuthRecvAcceptV4> for Reinjector {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthRecvAcceptV4>) {
        if let Ok(clone) = c.clone_for_receive(irql) {
            let _ = clone.inject(irql, &self.injection);
            let _ = clone.inject(irql, &self.injection);
        }
    }
}

fn main() {}
