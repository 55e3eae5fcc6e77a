// A network clone (an IP packet from INBOUND_IPPACKET) injected with a transport injection
// handle. In C, any handle can be passed to FwpsInjectNetworkReceiveAsync0, and a handle not
// created with FWPS_INJECTION_TYPE_NETWORK fails at run time. Here the handle's kind is in its
// type: a network clone takes an `InjectionHandle<Network>`.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::inject::InjectionHandle;
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::InboundIpPacketV4;

struct Holder {
    transport: InjectionHandle,
}

impl Callout<InboundIpPacketV4> for Holder {
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, InboundIpPacketV4>) {
        if let Ok(clone) = c.clone_for_network_receive(irql) {
            let _ = clone.inject(irql, &self.transport);
        }
    }
}

fn main() {}
