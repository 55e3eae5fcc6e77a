// Cloning a packet for receive injection where the layer's packet cannot be injected into the
// receive path. In C, any `layerData` can be passed to FwpsAllocateCloneNetBufferList0 and the
// clone to FwpsInjectTransportReceiveAsync0: an outbound ALE_AUTH_CONNECT packet (data at the
// transport header, no IP header) injected as received is a malformed packet. Here receive
// clones exist only at INBOUND_TRANSPORT and ALE_AUTH_RECV_ACCEPT, send clones only at
// OUTBOUND_TRANSPORT.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthConnectV4;

struct Holder;

impl Callout<AleAuthConnectV4> for Holder {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
        let _ = c.clone_for_receive(irql);
    }
}

fn main() {}
