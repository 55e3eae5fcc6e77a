// Reading the packet after pending. Once `pend` returns, the operation may be completed on another
// processor (a worker, a DPC, the service's answer) while this classifyFn still runs; a C callout
// that kept its `NET_BUFFER_LIST *` past `FwpsPendOperation0` reads a packet the stack may be
// done with. Here the packet view borrows the classification, and pending needs it mutably.

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthRecvAcceptV4;

struct Inspector;

impl Callout<AleAuthRecvAcceptV4> for Inspector {
    fn classify(&self, _irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthRecvAcceptV4>) {
        let packet = c.packet();
        let pended = c.pend();
        let first = packet.and_then(|list| list.first()).map(|nb| nb.read_array::<8>(0));
        drop((pended, first));
    }
}

fn main() {}
