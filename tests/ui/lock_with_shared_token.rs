// Locking with the token the function was given by shared reference: raising the IRQL needs the
// token borrowed exclusively, which a `&PassiveLevel` cannot give.

use wfp_rs::irql::PassiveLevel;
use wfp_rs::pend::VerdictTable;
use wfp_rs::spin_lock::SpinLock;

fn count(irql: &PassiveLevel<'_>, hits: &SpinLock<u32>, verdicts: &VerdictTable<bool, 4>) -> usize {
    hits.lock(irql, |hits, _| *hits += 1);
    verdicts.len(irql)
}

fn main() {}
