//! The kernel functions the SDK calls, each declared once.
//!
//! [`kernel_functions!`] turns the one list below into what each backend needs:
//!
//! - `wfp_nt`: `raw-dylib` imports, one `extern "system"` block per kernel module, so `rustc`
//!   writes the import table itself with the exact module name (`ntoskrnl.exe`, not
//!   `ntoskrnl.exe.dll`) and a driver links with `rust-lld` on any host, without the WDK's import
//!   libraries. The routines wdm.h inlines on x64 (the IRQL ones, through CR8) are defined in
//!   `nt`; for them the list only checks that `nt`'s definition has the listed signature.
//! - `wfp_sim`: [`KernelFunctions`], a table with one function pointer per routine, which the
//!   simulator (the `wfp-rs-sim` crate) fills with its implementations and installs with
//!   [`install_kernel`]; and for every routine a function of the same name and signature that
//!   calls through the installed table. Without a table installed, calling one panics with a
//!   message that says how to get a simulator (see [`NOT_INSTALLED`]).
//!
//! So a signature is written once, and a simulator whose function does not match it does not
//! compile (the table's field has the listed type). A table also needs nothing from the
//! linker: no symbol that only the simulator defines, no order of archives on the link line.
//!
//! Prototypes follow WDK 10.0.22621 (`km/wdm.h`, `km/ntifs.h`, `km/fwpsk.h`, `km/fwpmk.h`,
//! `km/fltKernel.h`), and `bcrypt.h` as Microsoft documents it for `BCryptGenRandom`.

use super::flt::*;
use super::fwp::*;
use super::irp::*;
use super::ndis::*;
use super::types::*;

/// Declares the kernel functions, grouped by the module that exports them (see the module
/// docs). An `inline` group lists routines the nt backend defines itself (`safe fn` for those
/// that are safe to call there).
macro_rules! kernel_functions {
    (
        $(
            module $module:literal {
                $(
                    $(#[$meta:meta])*
                    fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;
                )*
            }
        )*
        inline {
            $(
                $(#[$inline_meta:meta])*
                $safety:ident fn $inline_name:ident($($inline_arg:ident: $inline_ty:ty),* $(,)?)
                    $(-> $inline_ret:ty)?;
            )*
        }
    ) => {
        #[cfg(wfp_nt)]
        mod imports {
            use super::*;
            $(
                #[link(name = $module, kind = "raw-dylib", modifiers = "+verbatim")]
                unsafe extern "system" {
                    $(
                        $(#[$meta])*
                        pub fn $name($($arg: $ty),*) $(-> $ret)?;
                    )*
                }
            )*
            $(
                kernel_functions!(@check_inline $safety $inline_name($($inline_ty),*) $(-> $inline_ret)?);
            )*
        }
        #[cfg(wfp_nt)]
        pub use imports::*;

        /// The simulator's interface (not API): one pointer per kernel function, with the
        /// signature the nt backend imports it with. The `wfp-rs-sim` crate fills one with its
        /// implementations and passes it to [`install_kernel`].
        #[cfg(wfp_sim)]
        #[doc(hidden)]
        #[derive(Clone, Copy, Debug)]
        pub struct KernelFunctions {
            $($(
                pub $name: unsafe extern "system" fn($($ty),*) $(-> $ret)?,
            )*)*
            $(
                pub $inline_name: unsafe extern "system" fn($($inline_ty),*) $(-> $inline_ret)?,
            )*
        }

        $($(
            $(#[$meta])*
            ///
            #[doc = concat!("The kernel's `", stringify!($name), "`; in a host build, the simulated \
                kernel's (the `wfp-rs-sim` crate), through the table it installs.")]
            ///
            /// # Safety
            ///
            #[doc = concat!("The contract the WDK documents for `", stringify!($name), "`.")]
            #[cfg(wfp_sim)]
            #[inline]
            #[allow(clippy::too_many_arguments, reason = "the kernel's argument list")]
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the simulator's function has this signature (the table's field type)
                // and the contract the caller upholds for the kernel's.
                unsafe { (installed_kernel().$name)($($arg),*) }
            }
        )*)*
        $(
            kernel_functions!(@sim_inline $safety $(#[$inline_meta])* $inline_name($($inline_arg: $inline_ty),*) $(-> $inline_ret)?);
        )*
    };

    (@check_inline safe $name:ident($($ty:ty),*) $(-> $ret:ty)?) => {
        const _: fn($($ty),*) $(-> $ret)? = super::super::nt::$name;
    };
    (@check_inline unsafe $name:ident($($ty:ty),*) $(-> $ret:ty)?) => {
        const _: unsafe fn($($ty),*) $(-> $ret)? = super::super::nt::$name;
    };

    (@sim_inline safe $(#[$meta:meta])* $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$meta])*
        #[cfg(wfp_sim)]
        #[inline]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: the routine is safe to call on Windows (the nt backend's definition is a
            // safe function), and the simulator's implements it with the same contract.
            unsafe { (installed_kernel().$name)($($arg),*) }
        }
    };
    (@sim_inline unsafe $(#[$meta:meta])* $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$meta])*
        #[cfg(wfp_sim)]
        #[inline]
        pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: as for the imported functions: same signature, the caller's contract.
            unsafe { (installed_kernel().$name)($($arg),*) }
        }
    };
}

kernel_functions! {
    module "ntoskrnl.exe" {
        fn KeAcquireSpinLockRaiseToDpc(SpinLock: *mut KSPIN_LOCK) -> KIRQL;
        fn KeReleaseSpinLock(SpinLock: *mut KSPIN_LOCK, NewIrql: KIRQL);

        fn ExAllocatePool2(Flags: POOL_FLAGS, NumberOfBytes: SIZE_T, Tag: ULONG) -> PVOID;
        fn ExFreePoolWithTag(P: PVOID, Tag: ULONG);

        fn KeBugCheckEx(
            BugCheckCode: ULONG,
            BugCheckParameter1: ULONG_PTR,
            BugCheckParameter2: ULONG_PTR,
            BugCheckParameter3: ULONG_PTR,
            BugCheckParameter4: ULONG_PTR,
        ) -> !;

        fn IoCreateDevice(
            DriverObject: *mut DRIVER_OBJECT,
            DeviceExtensionSize: ULONG,
            DeviceName: *const UNICODE_STRING,
            DeviceType: DEVICE_TYPE,
            DeviceCharacteristics: ULONG,
            Exclusive: BOOLEAN,
            DeviceObject: *mut *mut DEVICE_OBJECT,
        ) -> NTSTATUS;
        fn IoDeleteDevice(DeviceObject: *mut DEVICE_OBJECT);
        fn IoAllocateDriverObjectExtension(
            DriverObject: *mut DRIVER_OBJECT,
            ClientIdentificationAddress: PVOID,
            DriverObjectExtensionSize: ULONG,
            DriverObjectExtension: *mut PVOID,
        ) -> NTSTATUS;
        fn IoGetDriverObjectExtension(
            DriverObject: *mut DRIVER_OBJECT,
            ClientIdentificationAddress: PVOID,
        ) -> PVOID;

        fn IoAllocateWorkItem(DeviceObject: *mut DEVICE_OBJECT) -> *mut IO_WORKITEM;
        fn IoQueueWorkItem(
            IoWorkItem: *mut IO_WORKITEM,
            WorkerRoutine: PIO_WORKITEM_ROUTINE,
            QueueType: WORK_QUEUE_TYPE,
            Context: PVOID,
        );
        fn IoFreeWorkItem(IoWorkItem: *mut IO_WORKITEM);

        fn KeInitializeEvent(Event: *mut KEVENT, Type: EVENT_TYPE, State: BOOLEAN);
        fn KeSetEvent(Event: *mut KEVENT, Increment: KPRIORITY, Wait: BOOLEAN) -> LONG;
        fn KeClearEvent(Event: *mut KEVENT);

        // Timers and DPCs. IRQL: KeInitializeTimerEx and KeInitializeDpc any level (for
        // non-paged objects); KeSetTimerEx, KeCancelTimer, KeInsertQueueDpc and
        // KeRemoveQueueDpc at most DISPATCH_LEVEL; KeFlushQueuedDpcs PASSIVE_LEVEL.
        // `DueTime` is a LARGE_INTEGER passed by value: negative = relative, in 100 ns.
        fn KeInitializeTimerEx(Timer: *mut KTIMER, Type: TIMER_TYPE);
        fn KeSetTimerEx(Timer: *mut KTIMER, DueTime: LARGE_INTEGER, Period: LONG, Dpc: *mut KDPC)
            -> BOOLEAN;
        fn KeCancelTimer(Timer: *mut KTIMER) -> BOOLEAN;
        fn KeInitializeDpc(Dpc: *mut KDPC, DeferredRoutine: PKDEFERRED_ROUTINE, DeferredContext: PVOID);
        fn KeFlushQueuedDpcs();

        /// Exported since Windows 8.1; callable at any IRQL.
        fn KeQueryInterruptTimePrecise(QpcTimeStamp: *mut ULONG64) -> ULONG64;
        fn KeWaitForSingleObject(
            Object: PVOID,
            WaitReason: i32,
            WaitMode: KPROCESSOR_MODE,
            Alertable: BOOLEAN,
            Timeout: *const LARGE_INTEGER,
        ) -> NTSTATUS;

        /// C-variadic in wdm.h (`ULONG DbgPrintEx(ULONG, ULONG, PCSTR, ...)`), declared with the
        /// one argument list the SDK passes: the format `"%.*s"`, then its length (an `int`) and
        /// its text (`crate::debug` is the only caller). That is ABI-correct on x64 Windows: the
        /// Microsoft x64 convention passes the arguments of a variadic call exactly as those of
        /// a fixed prototype with the same types (the first four in RCX, RDX, R8, R9, the rest
        /// on the stack, with the same home space); only floating-point variadic arguments are
        /// treated differently (copied to the integer register too), and none is passed here.
        /// A fixed list is also what a function-pointer table can hold.
        fn DbgPrintEx(
            ComponentId: ULONG,
            Level: ULONG,
            Format: PCSTR,
            Length: i32,
            Text: *const u8,
        ) -> ULONG;
        /// Whether `DbgPrintEx` would send a message of `ComponentId` at `Level` (wdm.h):
        /// `TRUE` or `FALSE`, as an NTSTATUS. INFERRED (undocumented beyond the prototype):
        /// callable wherever `DbgPrintEx` is, which consults the same filter masks.
        fn DbgQueryDebugFilterState(ComponentId: ULONG, Level: ULONG) -> NTSTATUS;

        // I/O requests, cancel-safe queues, symbolic links and object security (wdm.h,
        // ntifs.h). IofCompleteRequest is FASTCALL in the header, which on x64 is the one
        // calling convention ("system"). IRQL: IofCompleteRequest, the IoCsq routines and
        // IoAcquireCancelSpinLock at most DISPATCH_LEVEL (IoCsqInitializeEx any level);
        // IoReleaseCancelSpinLock exactly DISPATCH_LEVEL; ObOpenObjectByPointer at most
        // APC_LEVEL; IoCreateSymbolicLink, IoDeleteSymbolicLink, ZwSetSecurityObject and ZwClose
        // PASSIVE_LEVEL. IoCreateDeviceSecure is not among them: it lives in the static library
        // wdmsec.lib, which a raw-dylib build cannot link, so named devices get their DACL
        // through ObOpenObjectByPointer + ZwSetSecurityObject instead (see `crate::inverted`).
        fn IofCompleteRequest(Irp: *mut IRP, PriorityBoost: i8);
        fn IoAcquireCancelSpinLock(Irql: *mut KIRQL);
        fn IoReleaseCancelSpinLock(Irql: KIRQL);
        fn IoCsqInitializeEx(
            Csq: *mut IO_CSQ,
            CsqInsertIrp: PIO_CSQ_INSERT_IRP_EX,
            CsqRemoveIrp: PIO_CSQ_REMOVE_IRP,
            CsqPeekNextIrp: PIO_CSQ_PEEK_NEXT_IRP,
            CsqAcquireLock: PIO_CSQ_ACQUIRE_LOCK,
            CsqReleaseLock: PIO_CSQ_RELEASE_LOCK,
            CsqCompleteCanceledIrp: PIO_CSQ_COMPLETE_CANCELED_IRP,
        ) -> NTSTATUS;
        fn IoCsqInsertIrpEx(
            Csq: *mut IO_CSQ,
            Irp: *mut IRP,
            Context: *mut IO_CSQ_IRP_CONTEXT,
            InsertContext: PVOID,
        ) -> NTSTATUS;
        fn IoCsqRemoveNextIrp(Csq: *mut IO_CSQ, PeekContext: PVOID) -> *mut IRP;
        fn IoCreateSymbolicLink(
            SymbolicLinkName: *const UNICODE_STRING,
            DeviceName: *const UNICODE_STRING,
        ) -> NTSTATUS;
        fn IoDeleteSymbolicLink(SymbolicLinkName: *const UNICODE_STRING) -> NTSTATUS;
        /// `DesiredAccess` is an `ACCESS_MASK`; `PassedAccessState` a `PACCESS_STATE`;
        /// `ObjectType` a `POBJECT_TYPE`, which may be null for `KernelMode`.
        fn ObOpenObjectByPointer(
            Object: PVOID,
            HandleAttributes: ULONG,
            PassedAccessState: PVOID,
            DesiredAccess: u32,
            ObjectType: PVOID,
            AccessMode: KPROCESSOR_MODE,
            Handle: *mut HANDLE,
        ) -> NTSTATUS;
        /// `SecurityInformation` is a `SECURITY_INFORMATION`; `SecurityDescriptor` a
        /// `PSECURITY_DESCRIPTOR` in absolute or self-relative form.
        fn ZwSetSecurityObject(
            Handle: HANDLE,
            SecurityInformation: u32,
            SecurityDescriptor: PVOID,
        ) -> NTSTATUS;
        fn ZwClose(Handle: HANDLE) -> NTSTATUS;

        // Who is calling (wdm.h, ntddk.h, ntifs.h). `PsGetCurrentProcess` is a macro for
        // IoGetCurrentProcess (wdm.h). IRQL: IoGetCurrentProcess at most DISPATCH_LEVEL,
        // PsGetCurrentProcessId any; PsReferencePrimaryToken, SeQueryInformationToken and
        // SeLocateProcessImageName PASSIVE_LEVEL; PsDereferencePrimaryToken below
        // DISPATCH_LEVEL; ExFreePool at most
        // DISPATCH_LEVEL (for paged pool, which the two queries return: APC_LEVEL);
        // RtlEqualUnicodeString PASSIVE_LEVEL (it may touch paged strings).
        fn IoGetCurrentProcess() -> PEPROCESS;
        fn PsGetCurrentProcessId() -> HANDLE;
        fn PsReferencePrimaryToken(Process: PEPROCESS) -> PACCESS_TOKEN;
        fn PsDereferencePrimaryToken(PrimaryToken: PACCESS_TOKEN);
        /// Allocates the answer in paged pool; the caller frees it with `ExFreePool`.
        fn SeQueryInformationToken(
            Token: PACCESS_TOKEN,
            TokenInformationClass: TOKEN_INFORMATION_CLASS,
            TokenInformation: *mut PVOID,
        ) -> NTSTATUS;
        /// Allocates the `UNICODE_STRING` and its text in one block; the caller frees it with
        /// `ExFreePool`.
        fn SeLocateProcessImageName(
            Process: PEPROCESS,
            pImageFileName: *mut *mut UNICODE_STRING,
        ) -> NTSTATUS;
        fn ExFreePool(P: PVOID);
        // The driver's configuration (wdm.h): PASSIVE_LEVEL.
        fn ZwOpenKey(
            KeyHandle: *mut HANDLE,
            DesiredAccess: ACCESS_MASK,
            ObjectAttributes: *const OBJECT_ATTRIBUTES,
        ) -> NTSTATUS;
        fn ZwQueryValueKey(
            KeyHandle: HANDLE,
            ValueName: *const UNICODE_STRING,
            KeyValueInformationClass: KEY_VALUE_INFORMATION_CLASS,
            KeyValueInformation: PVOID,
            Length: ULONG,
            ResultLength: *mut ULONG,
        ) -> NTSTATUS;
        fn RtlEqualUnicodeString(
            String1: *const UNICODE_STRING,
            String2: *const UNICODE_STRING,
            CaseInSensitive: BOOLEAN,
        ) -> BOOLEAN;
    }

    // The WFP kernel client (fwpsk.h, fwpmk.h). Every management routine (`Fwpm*`) requires
    // PASSIVE_LEVEL; FwpsCalloutRegister3/UnregisterById0 too. Pending, flow contexts and
    // classify handles at IRQL <= DISPATCH_LEVEL.
    module "fwpkclnt.sys" {
        fn FwpsCalloutRegister3(
            deviceObject: *mut core::ffi::c_void,
            callout: *const FWPS_CALLOUT3,
            calloutId: *mut u32,
        ) -> NTSTATUS;
        fn FwpsCalloutUnregisterById0(calloutId: u32) -> NTSTATUS;

        fn FwpmEngineOpen0(
            serverName: *const u16,
            authnService: u32,
            authIdentity: *mut core::ffi::c_void,
            session: *const FWPM_SESSION0,
            engineHandle: *mut HANDLE,
        ) -> NTSTATUS;
        fn FwpmEngineClose0(engineHandle: HANDLE) -> NTSTATUS;
        fn FwpmTransactionBegin0(engineHandle: HANDLE, flags: u32) -> NTSTATUS;
        fn FwpmTransactionCommit0(engineHandle: HANDLE) -> NTSTATUS;
        fn FwpmTransactionAbort0(engineHandle: HANDLE) -> NTSTATUS;
        fn FwpmProviderAdd0(
            engineHandle: HANDLE,
            provider: *const FWPM_PROVIDER0,
            sd: *mut core::ffi::c_void,
        ) -> NTSTATUS;
        fn FwpmProviderDeleteByKey0(engineHandle: HANDLE, key: *const GUID) -> NTSTATUS;
        fn FwpmSubLayerAdd0(
            engineHandle: HANDLE,
            subLayer: *const FWPM_SUBLAYER0,
            sd: *mut core::ffi::c_void,
        ) -> NTSTATUS;
        fn FwpmSubLayerDeleteByKey0(engineHandle: HANDLE, key: *const GUID) -> NTSTATUS;
        fn FwpmCalloutAdd0(
            engineHandle: HANDLE,
            callout: *const FWPM_CALLOUT0,
            sd: *mut core::ffi::c_void,
            id: *mut u32,
        ) -> NTSTATUS;
        fn FwpmCalloutDeleteByKey0(engineHandle: HANDLE, key: *const GUID) -> NTSTATUS;
        fn FwpmFilterAdd0(
            engineHandle: HANDLE,
            filter: *const FWPM_FILTER0,
            sd: *mut core::ffi::c_void,
            id: *mut u64,
        ) -> NTSTATUS;
        fn FwpmFilterDeleteById0(engineHandle: HANDLE, id: u64) -> NTSTATUS;
        fn FwpmFilterDeleteByKey0(engineHandle: HANDLE, key: *const GUID) -> NTSTATUS;

        fn FwpsPendOperation0(completionHandle: HANDLE, completionContext: *mut HANDLE)
            -> NTSTATUS;
        fn FwpsCompleteOperation0(completionContext: HANDLE, netBufferList: PVOID);

        fn FwpsFlowAssociateContext0(
            flowId: u64,
            layerId: u16,
            calloutId: u32,
            flowContext: u64,
        ) -> NTSTATUS;
        fn FwpsFlowRemoveContext0(flowId: u64, layerId: u16, calloutId: u32) -> NTSTATUS;

        // Pending by classify handle, for layers without a completion handle
        // (ALE_CONNECT_REDIRECT, ALE_BIND_REDIRECT, ALE_ENDPOINT_CLOSURE).
        fn FwpsAcquireClassifyHandle0(
            classifyContext: *mut core::ffi::c_void,
            reserved: u32,
            classifyHandle: *mut u64,
        ) -> NTSTATUS;
        fn FwpsReleaseClassifyHandle0(classifyHandle: u64);
        fn FwpsPendClassify0(
            classifyHandle: u64,
            filterId: u64,
            flags: u32,
            classifyOut: *mut FWPS_CLASSIFY_OUT0,
        ) -> NTSTATUS;
        fn FwpsCompleteClassify0(
            classifyHandle: u64,
            flags: u32,
            classifyOut: *const FWPS_CLASSIFY_OUT0,
        );
        // The redirect layers' writable request (FWPS_CONNECT_REQUEST0, FWPS_BIND_REQUEST0):
        // acquired in classifyFn with a classify handle, applied once per acquire.
        fn FwpsAcquireWritableLayerDataPointer0(
            classifyHandle: u64,
            filterId: u64,
            flags: u32,
            writableLayerData: *mut PVOID,
            classifyOut: *mut FWPS_CLASSIFY_OUT0,
        ) -> NTSTATUS;
        fn FwpsApplyModifiedLayerData0(classifyHandle: u64, modifiedLayerData: PVOID, flags: u32);
        // Redirect handles (Windows 8 and later): create and destroy at PASSIVE_LEVEL; the
        // query at IRQL <= DISPATCH_LEVEL.
        fn FwpsRedirectHandleCreate0(
            providerGuid: *const GUID,
            flags: u32,
            redirectHandle: *mut HANDLE,
        ) -> NTSTATUS;
        fn FwpsRedirectHandleDestroy0(redirectHandle: HANDLE);
        fn FwpsQueryConnectionRedirectState0(
            redirectRecords: HANDLE,
            redirectHandle: HANDLE,
            redirectContext: *mut *mut core::ffi::c_void,
        ) -> FWPS_CONNECTION_REDIRECT_STATE;
    }

    // Packet injection (fwpsk.h). FwpsInjectionHandleCreate0 and FwpsInjectionHandleDestroy0
    // at PASSIVE_LEVEL (destroy returns when the handle's pending injections have completed);
    // the clone, free, inject and query routines at IRQL <= DISPATCH_LEVEL.
    module "fwpkclnt.sys" {
        fn FwpsInjectionHandleCreate0(
            addressFamily: ADDRESS_FAMILY,
            flags: u32,
            injectionHandle: *mut HANDLE,
        ) -> NTSTATUS;
        fn FwpsInjectionHandleDestroy0(injectionHandle: HANDLE) -> NTSTATUS;
        fn FwpsAllocateCloneNetBufferList0(
            originalNetBufferList: *mut NET_BUFFER_LIST,
            netBufferListPoolHandle: HANDLE,
            netBufferPoolHandle: HANDLE,
            allocateCloneFlags: u32,
            netBufferList: *mut *mut NET_BUFFER_LIST,
        ) -> NTSTATUS;
        fn FwpsFreeCloneNetBufferList0(netBufferList: *mut NET_BUFFER_LIST, freeCloneFlags: u32);
        /// `reserved` and `flags` must be zero; `netBufferList` must start at the IP header.
        fn FwpsInjectTransportReceiveAsync0(
            injectionHandle: HANDLE,
            injectionContext: HANDLE,
            reserved: PVOID,
            flags: u32,
            addressFamily: ADDRESS_FAMILY,
            compartmentId: u32,
            interfaceIndex: u32,
            subInterfaceIndex: u32,
            netBufferList: *mut NET_BUFFER_LIST,
            completionFn: FWPS_INJECT_COMPLETE0,
            completionContext: HANDLE,
        ) -> NTSTATUS;
        /// `netBufferList` starts at the transport header.
        fn FwpsInjectTransportSendAsync0(
            injectionHandle: HANDLE,
            injectionContext: HANDLE,
            endpointHandle: u64,
            flags: u32,
            sendArgs: *mut FWPS_TRANSPORT_SEND_PARAMS0,
            addressFamily: ADDRESS_FAMILY,
            compartmentId: u32,
            netBufferList: *mut NET_BUFFER_LIST,
            completionFn: FWPS_INJECT_COMPLETE0,
            completionContext: HANDLE,
        ) -> NTSTATUS;
        /// `flags` must be zero; `netBufferList` must start at the IP header. The handle must
        /// be a network one (`FWPS_INJECTION_TYPE_NETWORK`) of the packet's address family.
        fn FwpsInjectNetworkSendAsync0(
            injectionHandle: HANDLE,
            injectionContext: HANDLE,
            flags: u32,
            compartmentId: u32,
            netBufferList: *mut NET_BUFFER_LIST,
            completionFn: FWPS_INJECT_COMPLETE0,
            completionContext: HANDLE,
        ) -> NTSTATUS;
        /// As `FwpsInjectNetworkSendAsync0`, into the receive path of an interface.
        fn FwpsInjectNetworkReceiveAsync0(
            injectionHandle: HANDLE,
            injectionContext: HANDLE,
            flags: u32,
            compartmentId: u32,
            interfaceIndex: u32,
            subInterfaceIndex: u32,
            netBufferList: *mut NET_BUFFER_LIST,
            completionFn: FWPS_INJECT_COMPLETE0,
            completionContext: HANDLE,
        ) -> NTSTATUS;
        /// `flags` must be zero; `netBufferList` must start at the IP header; `interfaceIndex`
        /// is the destination interface. Forward-injected packets are not classified again.
        fn FwpsInjectForwardAsync0(
            injectionHandle: HANDLE,
            injectionContext: HANDLE,
            flags: u32,
            addressFamily: ADDRESS_FAMILY,
            compartmentId: u32,
            interfaceIndex: u32,
            netBufferList: *mut NET_BUFFER_LIST,
            completionFn: FWPS_INJECT_COMPLETE0,
            completionContext: HANDLE,
        ) -> NTSTATUS;
        fn FwpsQueryPacketInjectionState0(
            injectionHandle: HANDLE,
            netBufferList: *const NET_BUFFER_LIST,
            injectionContext: *mut HANDLE,
        ) -> FWPS_PACKET_INJECTION_STATE;
    }

    // NDIS (nblapi.h): moving a net buffer's data start. IRQL <= DISPATCH_LEVEL. A callout that
    // moves the start of a packet the engine indicated moves it back before classifyFn returns
    // (Microsoft's "Packet Indication Format").
    module "ndis.sys" {
        fn NdisRetreatNetBufferDataStart(
            NetBuffer: *mut NET_BUFFER,
            DataOffsetDelta: u32,
            DataBackFill: u32,
            AllocateMdlHandler: NET_BUFFER_ALLOCATE_MDL,
        ) -> NDIS_STATUS;
        fn NdisAdvanceNetBufferDataStart(
            NetBuffer: *mut NET_BUFFER,
            DataOffsetDelta: u32,
            FreeMdl: BOOLEAN,
            FreeMdlHandler: NET_BUFFER_FREE_MDL,
        );
    }

    // The filter manager (fltKernel.h): a filter registration and communication ports.
    // FltSendMessage is at most APC_LEVEL (it waits, and it attaches to the client's process to
    // copy the message); FltRegisterFilter, FltStartFiltering, FltUnregisterFilter and the
    // security descriptor routines at most APC_LEVEL; the port routines PASSIVE_LEVEL.
    module "fltmgr.sys" {
        fn FltRegisterFilter(
            Driver: *mut DRIVER_OBJECT,
            Registration: *const FLT_REGISTRATION,
            RetFilter: *mut PFLT_FILTER,
        ) -> NTSTATUS;
        fn FltStartFiltering(Filter: PFLT_FILTER) -> NTSTATUS;
        fn FltUnregisterFilter(Filter: PFLT_FILTER);
        fn FltBuildDefaultSecurityDescriptor(
            SecurityDescriptor: *mut PSECURITY_DESCRIPTOR,
            DesiredAccess: ACCESS_MASK,
        ) -> NTSTATUS;
        fn FltFreeSecurityDescriptor(SecurityDescriptor: PSECURITY_DESCRIPTOR);
        fn FltCreateCommunicationPort(
            Filter: PFLT_FILTER,
            ServerPort: *mut PFLT_PORT,
            ObjectAttributes: *const OBJECT_ATTRIBUTES,
            ServerPortCookie: PVOID,
            ConnectNotifyCallback: PFLT_CONNECT_NOTIFY,
            DisconnectNotifyCallback: PFLT_DISCONNECT_NOTIFY,
            MessageNotifyCallback: PFLT_MESSAGE_NOTIFY,
            MaxConnections: LONG,
        ) -> NTSTATUS;
        fn FltCloseCommunicationPort(ServerPort: PFLT_PORT);
        fn FltCloseClientPort(Filter: PFLT_FILTER, ClientPort: *mut PFLT_PORT);
        fn FltSendMessage(
            Filter: PFLT_FILTER,
            ClientPort: *mut PFLT_PORT,
            SenderBuffer: PVOID,
            SenderBufferLength: ULONG,
            ReplyBuffer: PVOID,
            ReplyLength: *mut ULONG,
            Timeout: *const LARGE_INTEGER,
        ) -> NTSTATUS;
    }

    // The kernel's CNG (bcrypt.h). Microsoft's documentation says to link kernel callers with
    // Cng.lib, the import library of cng.sys (INFERRED: the module name is that of the library;
    // the documentation names only the library).
    module "cng.sys" {
        /// With `BCRYPT_USE_SYSTEM_PREFERRED_RNG` and a null handle: `PASSIVE_LEVEL` only.
        fn BCryptGenRandom(
            hAlgorithm: BCRYPT_ALG_HANDLE,
            pbBuffer: *mut u8,
            cbBuffer: ULONG,
            dwFlags: ULONG,
        ) -> NTSTATUS;
    }
    // What wdm.h inlines on x64: the IRQL is the task-priority register, CR8.
    inline {
        /// `KeGetCurrentIrql`: the IRQL of the calling processor.
        safe fn KeGetCurrentIrql() -> KIRQL;
        /// `KfRaiseIrql`: raises to `NewIrql`, returns the previous level.
        ///
        /// # Safety
        ///
        /// `NewIrql` must be at least the current IRQL and at most `DISPATCH_LEVEL`; the caller
        /// lowers the IRQL again with the returned value.
        unsafe fn KfRaiseIrql(NewIrql: KIRQL) -> KIRQL;
        /// `KeLowerIrql`.
        ///
        /// # Safety
        ///
        /// `NewIrql` must be at most the current IRQL and be the level saved when it was raised.
        unsafe fn KeLowerIrql(NewIrql: KIRQL);
    }
}

/// What calling a kernel function in a host build without a simulated kernel says.
#[cfg(wfp_sim)]
#[doc(hidden)]
pub const NOT_INSTALLED: &str = "wfp-rs: this is a host build (the simulator backend) and no \
    simulated kernel is running, so there is no kernel function to call. Add `wfp-rs-sim` to \
    [dev-dependencies] and run the driver code inside a simulated machine: \
    `wfp_rs_sim::Machine::new().at_passive(|irql| ...)`, or load the driver with \
    `Machine::load_driver`. (Kernel images are built for x86_64-pc-windows-msvc, where wfp-rs \
    calls the real kernel.)";

#[cfg(wfp_sim)]
static INSTALLED: core::sync::atomic::AtomicPtr<KernelFunctions> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Makes `functions` the kernel every function of [`crate::sys`] calls, for the rest of the
/// process (the simulator's interface, not API: `wfp_rs_sim::Machine::new` calls it). The first
/// table installed stays; installing again is a no-op, so every machine may call it.
#[cfg(wfp_sim)]
#[doc(hidden)]
pub fn install_kernel(functions: &'static KernelFunctions) {
    let _ = INSTALLED.compare_exchange(
        core::ptr::null_mut(),
        core::ptr::from_ref(functions).cast_mut(),
        core::sync::atomic::Ordering::AcqRel,
        core::sync::atomic::Ordering::Acquire,
    );
}

/// The installed table; panics with [`NOT_INSTALLED`] if there is none.
#[cfg(wfp_sim)]
#[inline]
fn installed_kernel() -> &'static KernelFunctions {
    let table = INSTALLED.load(core::sync::atomic::Ordering::Acquire);
    if table.is_null() {
        not_installed()
    }
    // SAFETY: a non-null pointer was stored only by `install_kernel`, from a `&'static`.
    unsafe { &*table }
}

#[cfg(wfp_sim)]
#[cold]
#[inline(never)]
fn not_installed() -> ! {
    panic!("{NOT_INSTALLED}")
}
