// Completing a pended redirection while its connect request is still acquired. The
// documentation applies the modified request (FwpsApplyModifiedLayerData0) before it completes
// the classification (FwpsCompleteClassify0); the request borrows the pend, so the pend cannot
// be completed while the request is alive.

use wfp_rs::irql::PassiveLevel;
use wfp_rs::pend::FinalAction;
use wfp_rs::redirect::PendedRedirect;

fn finish(passive: &mut PassiveLevel<'_>, mut pended: PendedRedirect) {
    let Ok(request) = pended.connect_request(passive) else {
        return;
    };
    pended.complete(passive, FinalAction::Permit);
    request.apply(passive);
}

fn main() {}
