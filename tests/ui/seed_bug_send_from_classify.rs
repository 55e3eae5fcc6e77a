// The seed bug, in Rust: a callout's classifyFn asks user mode for a verdict over the
// filter-manager port. classifyFn may run at DISPATCH_LEVEL; FltSendMessage requires
// IRQL <= APC_LEVEL. In C this compiles and bugchecks (INVALID_PROCESS_ATTACH_ATTEMPT); here the
// callback's `&mut DispatchLevel` is not accepted by `ServerPort::send`.

use core::time::Duration;

use wfp_rs::callout::{Callout, Classify};
use wfp_rs::irql::DispatchLevel;
use wfp_rs::layer::AleAuthConnectV4;
use wfp_rs::port::{Protocol, ServerPort};

struct AskUserMode<P: Protocol> {
    port: ServerPort<P>,
    question: P::Request,
}

impl<P: Protocol> Callout<AleAuthConnectV4> for AskUserMode<P>
where
    P::Request: Send + Sync,
{
    fn classify(&self, irql: &mut DispatchLevel<'_>, c: &mut Classify<'_, AleAuthConnectV4>) {
        if self.port.send(irql, &self.question, Duration::from_secs(1)).is_ok() {
            let _ = c.out.permit();
        }
    }
}

fn main() {}
