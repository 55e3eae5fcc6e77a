// Changing the local endpoint at a layer with no bind request. In C, a callout at
// ALE_CONNECT_REDIRECT can acquire the writable layer data and cast it to an
// FWPS_BIND_REQUEST0; only ALE_BIND_REDIRECT has one (and the local address cannot be changed
// at the connect redirect layer). Here the writable bind request exists only at the bind
// redirect layers.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleConnectRedirectV4;

struct LateRebinder;

impl Callout<AleConnectRedirectV4> for LateRebinder {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleConnectRedirectV4>) {
        if let Ok(request) = c.bind_request(irql) {
            request.apply(irql);
        }
    }
}

fn main() {}
