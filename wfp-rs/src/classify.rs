//! The result of a classification: what a callout may decide, given the rights it was handed.
//!
//! WFP passes a callout an `FWPS_CLASSIFY_OUT0` holding the decision so far and its *rights*. If
//! `FWPS_RIGHT_ACTION_WRITE` is set, the callout may decide (permit, block, or continue to the
//! next filter). If it is not set, a higher-priority filter made a hard decision: the callout may
//! not change it — except to **veto** a permit with a block. [`ClassifyOut`] enforces exactly
//! this, so a callout cannot silently override another firewall's hard decision, and a hard block
//! always clears the write right so lower-priority filters cannot undo it.

use core::fmt;

use crate::sys;

/// A filtering action, as WFP names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `FWP_ACTION_PERMIT`.
    Permit,
    /// `FWP_ACTION_BLOCK`.
    Block,
    /// `FWP_ACTION_CONTINUE`: no decision; the next filter in the sublayer decides.
    Continue,
    /// Any other `FWP_ACTION_TYPE` value (for example `FWP_ACTION_NONE`), kept as is.
    Other(u32),
}

impl Action {
    /// Interprets a raw `FWP_ACTION_TYPE`.
    pub const fn from_raw(raw: u32) -> Action {
        match raw {
            sys::FWP_ACTION_PERMIT => Action::Permit,
            sys::FWP_ACTION_BLOCK => Action::Block,
            sys::FWP_ACTION_CONTINUE => Action::Continue,
            other => Action::Other(other),
        }
    }

    /// The raw `FWP_ACTION_TYPE`.
    pub const fn raw(self) -> u32 {
        match self {
            Action::Permit => sys::FWP_ACTION_PERMIT,
            Action::Block => sys::FWP_ACTION_BLOCK,
            Action::Continue => sys::FWP_ACTION_CONTINUE,
            Action::Other(raw) => raw,
        }
    }
}

impl fmt::Display for Action {
    /// `permit`, `block`, `continue`, or the raw value in hex for any other action type.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Permit => f.write_str("permit"),
            Action::Block => f.write_str("block"),
            Action::Continue => f.write_str("continue"),
            Action::Other(raw) => write!(f, "action {raw:#x}"),
        }
    }
}

#[cfg(test)]
mod display_tests {
    use super::Action;

    #[test]
    fn actions_display_as_words_or_hex() {
        assert_eq!(alloc::format!("{}", Action::Permit), "permit");
        assert_eq!(alloc::format!("{}", Action::Block), "block");
        assert_eq!(alloc::format!("{}", Action::Continue), "continue");
        assert_eq!(
            alloc::format!("{}", Action::Other(0x1000_0000)),
            "action 0x10000000"
        );
    }
}

/// A decision the rights did not allow. The classification is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RightsError {
    /// The write right is absent: a higher-priority filter decided `current`, hard. Only a block
    /// may be applied, and only as a veto of a permit.
    #[error(
        "a higher-priority filter made a hard {current:?} decision; only a veto (block over permit) is allowed"
    )]
    NoWriteRight {
        /// The decision in force.
        current: Action,
    },
}

/// How a [`ClassifyOut::block`] took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOutcome {
    /// The callout had the write right; the block is now a hard block.
    Blocked,
    /// The callout had no write right and vetoed a hard permit.
    Vetoed,
    /// A hard block was already in force; nothing changed.
    AlreadyBlocked,
}

/// The decision a callout makes in `classifyFn`, with WFP's rights rules enforced.
///
/// A callout that calls nothing leaves the action as the filter engine passed it in, which is
/// what WFP expects of a callout with nothing to say.
pub struct ClassifyOut<'a> {
    raw: &'a mut sys::FWPS_CLASSIFY_OUT0,
}

impl<'a> ClassifyOut<'a> {
    /// Wraps the filter engine's structure for the duration of a classify call.
    pub(crate) fn new(raw: &'a mut sys::FWPS_CLASSIFY_OUT0) -> ClassifyOut<'a> {
        ClassifyOut { raw }
    }

    /// Whether this callout may set the action (`FWPS_RIGHT_ACTION_WRITE`).
    pub fn can_write(&self) -> bool {
        self.raw.rights & sys::FWPS_RIGHT_ACTION_WRITE != 0
    }

    /// The action currently in the structure.
    pub fn action(&self) -> Action {
        Action::from_raw(self.raw.actionType)
    }

    /// Permits, leaving the write right set so lower-priority sublayers may still block
    /// (a *soft* permit).
    pub fn permit(&mut self) -> Result<(), RightsError> {
        self.require_write()?;
        self.raw.actionType = sys::FWP_ACTION_PERMIT;
        Ok(())
    }

    /// Permits and clears the write right (a *hard* permit): only a callout veto in a lower
    /// sublayer can still block.
    pub fn permit_hard(&mut self) -> Result<(), RightsError> {
        self.require_write()?;
        self.raw.actionType = sys::FWP_ACTION_PERMIT;
        self.raw.rights &= !sys::FWPS_RIGHT_ACTION_WRITE;
        Ok(())
    }

    /// Blocks, as a hard block (the write right is cleared, so nothing lower can permit).
    /// Without the write right this is a veto of the hard permit in force, which WFP allows.
    pub fn block(&mut self) -> BlockOutcome {
        let outcome = if self.can_write() {
            BlockOutcome::Blocked
        } else if self.action() == Action::Block {
            return BlockOutcome::AlreadyBlocked;
        } else {
            BlockOutcome::Vetoed
        };
        self.raw.actionType = sys::FWP_ACTION_BLOCK;
        self.raw.rights &= !sys::FWPS_RIGHT_ACTION_WRITE;
        outcome
    }

    /// Makes no decision: the next filter in the sublayer decides (`FWP_ACTION_CONTINUE`).
    pub fn continue_to_next_filter(&mut self) -> Result<(), RightsError> {
        self.require_write()?;
        self.raw.actionType = sys::FWP_ACTION_CONTINUE;
        Ok(())
    }

    /// The raw structure, for the SDK's pend support.
    pub(crate) fn raw(&mut self) -> &mut sys::FWPS_CLASSIFY_OUT0 {
        self.raw
    }

    /// The decision WFP requires of a pended classification: BLOCK with
    /// `FWPS_CLASSIFY_OUT_FLAG_ABSORB`, write right cleared.
    pub(crate) fn mark_pended(&mut self) {
        self.raw.actionType = sys::FWP_ACTION_BLOCK;
        self.raw.flags |= sys::FWPS_CLASSIFY_OUT_FLAG_ABSORB;
        self.raw.rights &= !sys::FWPS_RIGHT_ACTION_WRITE;
    }

    fn require_write(&self) -> Result<(), RightsError> {
        if self.can_write() {
            Ok(())
        } else {
            Err(RightsError::NoWriteRight {
                current: self.action(),
            })
        }
    }
}

impl fmt::Debug for ClassifyOut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyOut")
            .field("action", &self.action())
            .field("can_write", &self.can_write())
            .field("flags", &format_args!("{:#x}", self.raw.flags))
            .finish()
    }
}
