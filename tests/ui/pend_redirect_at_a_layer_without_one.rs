// Pending a redirection at ALE_AUTH_CONNECT. Only ALE_CONNECT_REDIRECT has a connect request to
// acquire from a pended classification; at ALE_AUTH_CONNECT a callout pends with a completion
// handle (`Classify::pend`) and answers the reauthorization.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthConnectV4;

struct LatePender;

impl Callout<AleAuthConnectV4> for LatePender {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
        let _ = c.pend_redirect();
    }
}

fn main() {}
