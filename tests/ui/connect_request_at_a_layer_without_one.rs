// Redirecting a connection at a layer with no connect request. In C, a callout at
// ALE_AUTH_CONNECT can call FwpsAcquireWritableLayerDataPointer0 and cast the result to an
// FWPS_CONNECT_REQUEST0; only ALE_CONNECT_REDIRECT has one. Here the writable request exists
// only at the connect redirect layers.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthConnectV4;

struct LateRedirector;

impl Callout<AleAuthConnectV4> for LateRedirector {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
        if let Ok(request) = c.connect_request(irql) {
            request.apply(irql);
        }
    }
}

fn main() {}
