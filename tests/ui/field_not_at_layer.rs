// Reading a field the layer does not have: a bind (ALE_RESOURCE_ASSIGNMENT) has no remote
// endpoint, so IP_REMOTE_PORT is not one of its fields. In C this is a wrong index into
// `inFixedValues->incomingValue`; here it does not compile.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::{AleResourceAssignmentV4, fields};

struct Binds;

impl Callout<AleResourceAssignmentV4> for Binds {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleResourceAssignmentV4>) {
        let _port = c.values.get::<fields::IpRemotePort>();
    }
}

fn main() {}
