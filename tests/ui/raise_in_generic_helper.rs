// Generic helpers written with the bounds docs/irql.md recommends for calls that do not raise
// the IRQL (`&impl AtMostApc`) cannot lock with them: a shared reference (or `&mut` of a copy of
// one) is not an exclusive borrow of a token. A helper that locks takes `&mut impl Token`, and
// `&mut &PassiveLevel` does not fit it either.

use wfp_rs::event::Event;
use wfp_rs::irql::{AtMostApc, PassiveLevel, Token};
use wfp_rs::spin_lock::SpinLock;

fn helper(irql: &impl AtMostApc, hits: &SpinLock<u32>, reply: &Event) {
    let mut copy = irql;
    hits.lock(&mut copy, |hits, _| {
        *hits += 1;
        reply.wait(irql);
    });
}

fn bump(irql: &mut impl Token, hits: &SpinLock<u32>) {
    hits.lock(irql, |hits, _| *hits += 1);
}

fn caller(irql: &PassiveLevel<'_>, hits: &SpinLock<u32>, reply: &Event) {
    let mut copy = irql;
    bump(&mut copy, hits);
    reply.wait(irql);
}

fn main() {}
