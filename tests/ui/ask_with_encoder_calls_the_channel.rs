// A careless author asks a second question (or takes a lock, or waits) from inside the encoder
// of `ask_with`, which runs under the channel's spin lock: the encoder gets no token, and the
// caller's is borrowed by `ask_with` for the whole call, so it cannot be used inside.

use core::time::Duration;
use wfp_rs::ask::{AskChannel, QuestionHandler};
use wfp_rs::irql::DispatchLevel;

fn ask_twice<Q: QuestionHandler<Context = u32>>(
    irql: &mut DispatchLevel<'_>,
    channel: &AskChannel<Q>,
) {
    let _ = channel.ask_with(&mut *irql, 4, Duration::from_secs(5), 1, |body| {
        let _ = channel.ask(&mut *irql, b"again", Duration::from_secs(5), 2);
        body.copy_from_slice(b"pid ");
        true
    });
}

fn main() {}
