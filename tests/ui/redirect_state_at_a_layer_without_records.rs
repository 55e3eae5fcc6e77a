// Querying the redirect state at ALE_AUTH_CONNECT. FwpsQueryConnectionRedirectState0 takes the
// redirect records that ALE_CONNECT_REDIRECT hands its callouts in the metadata; elsewhere
// there are none to query.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::redirect::RedirectHandle;

struct LateAsker {
    handle: RedirectHandle,
}

impl Callout<AleAuthConnectV4> for LateAsker {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
        let _ = c.redirect_state(irql, &self.handle);
    }
}

fn main() {}
