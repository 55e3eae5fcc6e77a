//! Non-paged pool: tagged allocations with `ExAllocatePool2`.
//!
//! Kernel allocations can fail, and a failure must not bring the machine down, so every
//! allocation here is fallible and gives the value back when it fails. Everything allocated
//! here is non-paged, so it may be touched at `DISPATCH_LEVEL`.
//!
//! A driver that wants `alloc` collections can install [`PoolAllocator`] as its global
//! allocator (Windows builds only). With the simulator backend the simulator (`wfp-rs-sim`) is
//! the program's global allocator, and gives driver code the same rules (see [`PoolAllocator`]).

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::marker::PhantomData;
use core::mem::{self, ManuallyDrop};
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::irql::AtMostDispatch;
use crate::status::Status;
use crate::sys;

/// A pool tag: four characters that identify a driver's allocations in the debugger and in
/// poolmon.
///
/// ```
/// use wfp_rs::pool::PoolTag;
/// const TAG: PoolTag = PoolTag::new(b"Demo");
/// assert_eq!(TAG.to_string(), "Demo");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolTag(u32);

impl PoolTag {
    /// The tag the SDK uses for its own allocations.
    pub const SDK: PoolTag = PoolTag::new(b"WfpR");

    /// Makes a tag from four ASCII characters, in the order tools display them.
    ///
    /// (C drivers write the reversed multi-character literal `'omeD'` for "Demo"; this takes the
    /// readable order and produces the same value.)
    pub const fn new(chars: &[u8; 4]) -> PoolTag {
        PoolTag(u32::from_le_bytes(*chars))
    }

    /// The `ULONG` passed to `ExAllocatePool2`.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PoolTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0.to_le_bytes() {
            let c = if byte.is_ascii_graphic() || byte == b' ' {
                byte as char
            } else {
                '?'
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

impl fmt::Debug for PoolTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolTag(\"{self}\")")
    }
}

/// An allocation failed; the value that was to be stored is handed back.
pub struct AllocError<T> {
    value: T,
    bytes: usize,
}

impl<T> AllocError<T> {
    /// The value that could not be moved into the pool.
    pub fn into_inner(self) -> T {
        self.value
    }

    /// `STATUS_INSUFFICIENT_RESOURCES`, for drivers that report the failure as an `NTSTATUS`.
    pub fn status(&self) -> Status {
        Status::INSUFFICIENT_RESOURCES
    }
}

impl<T> fmt::Debug for AllocError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllocError")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for AllocError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "non-paged pool allocation of {} bytes failed",
            self.bytes
        )
    }
}

impl<T> core::error::Error for AllocError<T> {}

impl<T> From<AllocError<T>> for Status {
    fn from(_: AllocError<T>) -> Status {
        Status::INSUFFICIENT_RESOURCES
    }
}

/// The alignment `ExAllocatePool2` guarantees on x64.
pub const POOL_ALIGNMENT: usize = 16;

/// Allocates `layout` from non-paged pool; null on failure. Zero-sized layouts must not reach
/// here (a zero-byte request is a Driver Verifier violation).
fn allocate_raw(layout: Layout, tag: PoolTag) -> *mut u8 {
    debug_assert!(layout.size() != 0);
    if layout.align() > POOL_ALIGNMENT {
        return core::ptr::null_mut();
    }
    // SAFETY: non-paged allocation is allowed at IRQL <= DISPATCH_LEVEL, which every caller's
    // token (or, for the global allocator, the kernel's rules for Rust code) guarantees.
    unsafe { sys::ExAllocatePool2(sys::POOL_FLAG_NON_PAGED, layout.size(), tag.raw()).cast() }
}

/// `Box::new` that hands the value back when the allocation fails, instead of calling
/// `handle_alloc_error` (`Box::try_new` is not stable): for a `Box<dyn Trait>`, which a
/// [`PoolBox`] cannot become. The block comes from the global allocator — non-paged pool with
/// [`PoolAllocator`], the simulator's pool accounting in tests — so the IRQL rule of the pool
/// applies.
pub(crate) fn try_box<T>(value: T) -> Result<alloc::boxed::Box<T>, AllocError<T>> {
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        // A zero-sized box allocates nothing.
        return Ok(alloc::boxed::Box::new(value));
    }
    // SAFETY: the layout's size is not zero, as `GlobalAlloc::alloc` requires.
    let raw = unsafe { alloc::alloc::alloc(layout) }.cast::<T>();
    if raw.is_null() {
        return Err(AllocError {
            value,
            bytes: layout.size(),
        });
    }
    // SAFETY: a fresh block with the layout of `T`: valid and aligned for one write of `T`.
    unsafe { raw.write(value) };
    // SAFETY: the global allocator made the block for `Layout::new::<T>()`, as `Box<T>` requires,
    // and it holds an initialised `T`; nothing else owns it.
    Ok(unsafe { alloc::boxed::Box::from_raw(raw) })
}

/// A `Box` in non-paged pool, with a tag and a fallible constructor.
///
/// ```
/// use wfp_rs::pool::{PoolBox, PoolTag};
/// # wfp_rs_sim::Machine::new().at_passive(|irql| {
/// let mut counters = PoolBox::try_new([0u64; 4], PoolTag::new(b"Demo"), irql)?;
/// counters[2] += 1;
/// assert_eq!(*counters, [0, 0, 1, 0]);
/// # Ok::<(), wfp_rs::Status>(())
/// # }).unwrap();
/// ```
pub struct PoolBox<T> {
    ptr: NonNull<T>,
    tag: PoolTag,
    _owns: PhantomData<T>,
}

// SAFETY: a PoolBox owns its `T` exactly like `Box<T>` does.
unsafe impl<T: Send> Send for PoolBox<T> {}
// SAFETY: as for `Box<T>`: shared access to the box is shared access to `T`.
unsafe impl<T: Sync> Sync for PoolBox<T> {}

impl<T> PoolBox<T> {
    /// Moves `value` into a new non-paged allocation tagged `tag`. Wraps `ExAllocatePool2`
    /// with `POOL_FLAG_NON_PAGED`. On failure the value is returned inside the error.
    pub fn try_new(
        value: T,
        tag: PoolTag,
        irql: &impl AtMostDispatch,
    ) -> Result<PoolBox<T>, AllocError<T>> {
        crate::irql::verify(irql);
        const {
            assert!(
                mem::align_of::<T>() <= POOL_ALIGNMENT,
                "pool memory is 16-byte aligned"
            )
        };
        let layout = Layout::new::<T>();
        let ptr = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            match NonNull::new(allocate_raw(layout, tag).cast::<T>()) {
                Some(ptr) => ptr,
                None => {
                    return Err(AllocError {
                        value,
                        bytes: layout.size(),
                    });
                }
            }
        };
        // SAFETY: `ptr` is valid for writes of `T` and suitably aligned (pool alignment was
        // checked above; a dangling pointer is aligned for zero-sized `T`).
        unsafe { ptr.as_ptr().write(value) };
        Ok(PoolBox {
            ptr,
            tag,
            _owns: PhantomData,
        })
    }

    /// A new non-paged allocation tagged `tag`, initialised in place by `init`, for values too
    /// large to build on a kernel stack and move. `None` if there is no pool.
    ///
    /// # Safety
    ///
    /// `init` must leave the value at the pointer it is given (valid for writes and aligned for
    /// `T`) fully initialised, without reading it first.
    pub(crate) unsafe fn try_new_in_place(
        tag: PoolTag,
        irql: &impl AtMostDispatch,
        init: impl FnOnce(NonNull<T>),
    ) -> Option<PoolBox<T>> {
        crate::irql::verify(irql);
        const {
            assert!(
                mem::align_of::<T>() <= POOL_ALIGNMENT,
                "pool memory is 16-byte aligned"
            )
        };
        let layout = Layout::new::<T>();
        let ptr = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            NonNull::new(allocate_raw(layout, tag).cast::<T>())?
        };
        init(ptr);
        Some(PoolBox {
            ptr,
            tag,
            _owns: PhantomData,
        })
    }

    /// The tag of this allocation.
    pub fn tag(this: &Self) -> PoolTag {
        this.tag
    }

    /// Moves the value out and frees the allocation.
    pub fn into_inner(this: Self) -> T {
        let this = ManuallyDrop::new(this);
        // SAFETY: the value is initialised and is read exactly once; `free` does not drop it.
        let value = unsafe { this.ptr.as_ptr().read() };
        // SAFETY: the allocation came from `try_new` with this tag and is freed exactly once.
        unsafe { free::<T>(this.ptr, this.tag) };
        value
    }

    /// Gives up ownership; the pointer must come back through [`from_raw`](Self::from_raw).
    pub fn into_raw(this: Self) -> NonNull<T> {
        let this = ManuallyDrop::new(this);
        this.ptr
    }

    /// Takes back ownership of a pointer from [`into_raw`](Self::into_raw).
    ///
    /// # Safety
    ///
    /// `ptr` must come from `PoolBox::<T>::into_raw` of a box tagged `tag`, and ownership must
    /// be taken back only once.
    pub unsafe fn from_raw(ptr: NonNull<T>, tag: PoolTag) -> PoolBox<T> {
        PoolBox {
            ptr,
            tag,
            _owns: PhantomData,
        }
    }
}

/// Frees the memory of a `PoolBox<T>` without dropping the value.
///
/// # Safety
///
/// `ptr` must be a live allocation made by `PoolBox::<T>::try_new` with `tag`.
unsafe fn free<T>(ptr: NonNull<T>, tag: PoolTag) {
    if mem::size_of::<T>() != 0 {
        // SAFETY: per the contract, `ptr` was returned by ExAllocatePool2 with `tag`.
        unsafe { sys::ExFreePoolWithTag(ptr.as_ptr().cast(), tag.raw()) }
    }
}

impl<T> Deref for PoolBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialised `T` for its whole life.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for PoolBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for PoolBox<T> {
    fn drop(&mut self) {
        // SAFETY: the value is initialised and dropped exactly once.
        unsafe { self.ptr.as_ptr().drop_in_place() };
        // SAFETY: the memory came from `try_new` with this tag and is freed exactly once.
        unsafe { free::<T>(self.ptr, self.tag) };
    }
}

/// Bytes in non-paged pool, of a length known only at run time, with a tag and a fallible
/// constructor: a message sized to what it holds rather than to the longest it could be (a
/// request with a 40-unit image path is 154 bytes, not its protocol's 64 KiB maximum).
///
/// ```
/// use wfp_rs::pool::{PoolBytes, PoolTag};
/// # wfp_rs_sim::Machine::new().at_dispatch(|irql| {
/// let mut message = PoolBytes::try_zeroed(6, PoolTag::new(b"Demo"), irql)?;
/// message[..4].copy_from_slice(b"FWRQ");
/// assert_eq!(&message[..], b"FWRQ\0\0");
/// # Ok::<(), wfp_rs::pool::AllocError<()>>(())
/// # }).unwrap();
/// ```
pub struct PoolBytes {
    ptr: NonNull<u8>,
    len: usize,
    tag: PoolTag,
}

// SAFETY: a PoolBytes owns its bytes exactly like `Box<[u8]>` does.
unsafe impl Send for PoolBytes {}
// SAFETY: as for `Box<[u8]>`: shared access to the value is shared access to the bytes.
unsafe impl Sync for PoolBytes {}

impl PoolBytes {
    /// `len` zeroed bytes in a new non-paged allocation tagged `tag` (no allocation for 0).
    /// Wraps `ExAllocatePool2` with `POOL_FLAG_NON_PAGED`, which zeroes the block.
    pub fn try_zeroed(
        len: usize,
        tag: PoolTag,
        irql: &impl AtMostDispatch,
    ) -> Result<PoolBytes, AllocError<()>> {
        crate::irql::verify(irql);
        let failed = || AllocError {
            value: (),
            bytes: len,
        };
        let ptr = if len == 0 {
            NonNull::dangling()
        } else {
            let layout = Layout::array::<u8>(len).map_err(|_| failed())?;
            NonNull::new(allocate_raw(layout, tag)).ok_or_else(failed)?
        };
        Ok(PoolBytes { ptr, len, tag })
    }

    /// Copies `bytes` into a new allocation tagged `tag`; `None` if the pool has no room.
    pub(crate) fn try_copy(
        bytes: &[u8],
        tag: PoolTag,
        irql: &impl AtMostDispatch,
    ) -> Option<PoolBytes> {
        let mut copy = PoolBytes::try_zeroed(bytes.len(), tag, irql).ok()?;
        copy.copy_from_slice(bytes);
        Some(copy)
    }

    /// The tag of this allocation.
    pub fn tag(this: &Self) -> PoolTag {
        this.tag
    }
}

impl Deref for PoolBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by this value (none for a dangling pointer).
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for PoolBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for PoolBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBytes")
            .field("len", &self.len)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl Drop for PoolBytes {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: allocated by `try_zeroed` with this tag, freed exactly once.
            unsafe { sys::ExFreePoolWithTag(self.ptr.as_ptr().cast(), self.tag.raw()) }
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for PoolBox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A shared value in non-paged pool, counted like `Arc`, with a tag and a fallible
/// constructor: `Arc::new` cannot report an allocation failure (in a driver it ends in a bug
/// check), `PoolArc::try_new` hands the value back instead.
///
/// Clones may be dropped on any thread at IRQL <= `DISPATCH_LEVEL`; the last one drops the value
/// and frees the memory there.
///
/// ```
/// use wfp_rs::pool::{PoolArc, PoolTag};
/// # wfp_rs_sim::Machine::new().at_passive(|irql| {
/// let shared = PoolArc::try_new(core::sync::atomic::AtomicU32::new(0), PoolTag::new(b"Demo"), irql)?;
/// let for_a_work_item = PoolArc::clone(&shared);
/// for_a_work_item.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
/// assert_eq!(shared.load(core::sync::atomic::Ordering::Relaxed), 1);
/// assert_eq!(PoolArc::strong_count(&shared), 2);
/// # Ok::<(), wfp_rs::Status>(())
/// # }).unwrap();
/// ```
pub struct PoolArc<T> {
    ptr: NonNull<ArcInner<T>>,
    tag: PoolTag,
    _owns: PhantomData<ArcInner<T>>,
}

struct ArcInner<T> {
    count: AtomicUsize,
    value: T,
}

/// Beyond this many clones the count could overflow; as `Arc` does, stop instead.
const MAX_REFCOUNT: usize = isize::MAX as usize;

// SAFETY: as for `Arc<T>`: clones on several threads share `T` (so `Sync`) and the last one,
// on any thread, drops it (so `Send`).
unsafe impl<T: Send + Sync> Send for PoolArc<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for PoolArc<T> {}

impl<T> PoolArc<T> {
    /// Moves `value` into a new non-paged allocation tagged `tag`, with one reference. On
    /// failure the value is returned inside the error.
    pub fn try_new(
        value: T,
        tag: PoolTag,
        irql: &impl AtMostDispatch,
    ) -> Result<PoolArc<T>, AllocError<T>> {
        let inner = ArcInner {
            count: AtomicUsize::new(1),
            value,
        };
        match PoolBox::try_new(inner, tag, irql) {
            Ok(boxed) => Ok(PoolArc {
                ptr: PoolBox::into_raw(boxed),
                tag,
                _owns: PhantomData,
            }),
            Err(error) => Err(AllocError {
                bytes: error.bytes,
                value: error.value.value,
            }),
        }
    }

    fn inner(&self) -> &ArcInner<T> {
        // SAFETY: the allocation lives while any clone (this one included) does.
        unsafe { self.ptr.as_ref() }
    }

    /// How many clones exist now (others may be made or dropped concurrently).
    pub fn strong_count(this: &Self) -> usize {
        this.inner().count.load(Ordering::Acquire)
    }

    /// Whether both point to the same allocation.
    pub fn ptr_eq(this: &Self, other: &Self) -> bool {
        this.ptr == other.ptr
    }

    /// The value, if this is the only clone; otherwise this clone comes back.
    pub fn try_unwrap(this: Self) -> Result<T, PoolArc<T>> {
        if this
            .inner()
            .count
            .compare_exchange(1, 0, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(this);
        }
        let this = ManuallyDrop::new(this);
        // SAFETY: the count went from 1 to 0, so no other clone exists; the pointer came from
        // `PoolBox::into_raw` with this tag and is taken back once.
        let boxed = unsafe { PoolBox::from_raw(this.ptr, this.tag) };
        Ok(PoolBox::into_inner(boxed).value)
    }
}

impl<T> Clone for PoolArc<T> {
    fn clone(&self) -> Self {
        // Relaxed suffices to take a reference from one that exists, as in `Arc`.
        let old = self.inner().count.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFCOUNT {
            crate::bugcheck::bug_check(
                crate::bugcheck::BugCheckCode::KMODE_EXCEPTION_NOT_HANDLED,
                0xC000_0095, // STATUS_INTEGER_OVERFLOW
                0,
                0,
                0,
            );
        }
        PoolArc {
            ptr: self.ptr,
            tag: self.tag,
            _owns: PhantomData,
        }
    }
}

impl<T> Deref for PoolArc<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner().value
    }
}

impl<T> Drop for PoolArc<T> {
    fn drop(&mut self) {
        if self.inner().count.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Every other clone's use of the value happens before it is dropped here.
        core::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: this was the last clone; the pointer came from `PoolBox::into_raw` with this
        // tag and is taken back once.
        drop(unsafe { PoolBox::from_raw(self.ptr, self.tag) });
    }
}

impl<T: fmt::Debug> fmt::Debug for PoolArc<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A `GlobalAlloc` over non-paged pool, for driver crates that use `alloc` collections.
///
/// ```
/// use wfp_rs::pool::{PoolAllocator, PoolTag};
///
/// // In a driver crate built for Windows:
/// // #[global_allocator]
/// static ALLOCATOR: PoolAllocator = PoolAllocator::new(PoolTag::new(b"Demo"));
/// ```
///
/// Allocation failures are reported to `alloc` as null. Fallible methods (`try_reserve` and
/// friends) return the error; infallible ones (`Box::new`, `Arc::new`, `Vec::push`) call
/// `handle_alloc_error`, which in a `no_std` driver panics, and the driver's panic handler bug
/// checks with `KMODE_EXCEPTION_NOT_HANDLED`. Use the fallible methods, or [`PoolBox`] and
/// [`PoolArc`], on paths that must survive low memory. Alignments above
/// [`POOL_ALIGNMENT`] (16 bytes) are refused with null before the pool is asked, so an
/// `Arc::new` of a `#[repr(align(64))]` type always fails. Blocks are allocated with
/// `POOL_FLAG_NON_PAGED` (zeroed), so allocating and freeing is allowed at IRQL <=
/// `DISPATCH_LEVEL`; `realloc` is `GlobalAlloc`'s default (allocate, copy, free).
///
/// In the simulator a driver does not install it: the simulator (`wfp-rs-sim`) is the global
/// allocator of every program that links it, and gives driver code these same rules — pool
/// charged to the driver (a block still allocated at unload stops the machine with Driver
/// Verifier's pool-leak code), failures injected by `Machine::fail_allocations`, the 16-byte
/// alignment limit, the IRQL rule, and the bug check of an unhandled failure — while the test
/// harness and the simulator itself allocate from the host. `docs/simulator.md` has the details.
#[derive(Debug)]
pub struct PoolAllocator {
    tag: PoolTag,
}

impl PoolAllocator {
    /// An allocator whose blocks carry `tag`.
    pub const fn new(tag: PoolTag) -> PoolAllocator {
        PoolAllocator { tag }
    }
}

// SAFETY: blocks come from ExAllocatePool2 with the layout's size, which returns memory aligned
// to 16 bytes (larger alignments are refused with null) and frees them with the same tag.
unsafe impl GlobalAlloc for PoolAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        allocate_raw(layout, self.tag)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this tag (GlobalAlloc contract).
        unsafe { sys::ExFreePoolWithTag(ptr.cast(), self.tag.raw()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn try_box_moves_the_value_in() {
        let boxed = try_box([7u64; 3]).unwrap();
        assert_eq!(*boxed, [7; 3]);
        let unit: alloc::boxed::Box<dyn Fn() -> u8> = try_box(|| 5).unwrap();
        assert_eq!(unit(), 5);
    }

    #[test]
    fn tags_read_in_display_order_and_match_c_literals() {
        // The C literal 'omeD' (reversed) has this value on little-endian x64.
        assert_eq!(PoolTag::new(b"Demo").raw(), 0x6F6D_6544);
        assert_eq!(PoolTag::new(b"Demo").to_string(), "Demo");
        assert_eq!(PoolTag::new(&[b'a', 0, b'b', 0x7f]).to_string(), "a?b?");
    }
}
