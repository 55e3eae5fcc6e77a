//! Procedural macros for `wfp-rs`. Use them through the `wfp_rs` re-exports
//! (`wfp_rs::guid!`, `#[wfp_rs::driver_entry]`); the generated code refers to `::wfp_rs`.

use proc_macro::TokenStream;
use quote::quote;
use syn::spanned::Spanned;
use syn::{Error, FnArg, ItemFn, LitStr, ReturnType, Type, parse_macro_input};

/// A GUID literal, checked at compile time: `guid!("01234567-89ab-cdef-0123-456789abcdef")`.
///
/// Braces are accepted (`"{...}"`), as the registry and `uuidgen` print them. The expansion is a
/// constant expression of type `wfp_rs::Guid`. A malformed literal is a compile error that points
/// at the literal and says what is wrong:
///
/// ```compile_fail
/// const BAD: wfp_rs::Guid = wfp_rs::guid!("7a5d0e3c-1f2b-4c6d-8e9f-a0b1c2d3e4");
/// ```
#[proc_macro]
pub fn guid(input: TokenStream) -> TokenStream {
    let literal = parse_macro_input!(input as LitStr);
    match parse_guid(&literal.value()) {
        Ok((d1, d2, d3, d4)) => quote! {
            ::wfp_rs::__private::Guid::from_fields(#d1, #d2, #d3, [#(#d4),*])
        }
        .into(),
        Err(why) => Error::new(literal.span(), format!("malformed GUID: {why}"))
            .to_compile_error()
            .into(),
    }
}

type GuidFields = (u32, u16, u16, [u8; 8]);

fn parse_guid(text: &str) -> Result<GuidFields, String> {
    let inner = match (text.strip_prefix('{'), text.strip_suffix('}')) {
        (Some(_), Some(_)) => &text[1..text.len() - 1],
        (None, None) => text,
        _ => return Err(format!("unbalanced braces in \"{text}\"")),
    };
    let groups: Vec<&str> = inner.split('-').collect();
    let expected = [8, 4, 4, 4, 12];
    if groups.len() != 5 {
        return Err(format!(
            "expected 5 groups of 8-4-4-4-12 hexadecimal digits separated by '-', found {} group(s) in \"{text}\"",
            groups.len()
        ));
    }
    for (index, (group, want)) in groups.iter().zip(expected).enumerate() {
        if group.len() != want {
            return Err(format!(
                "group {} (\"{group}\") has {} digit(s), expected {want}",
                index + 1,
                group.len()
            ));
        }
        if let Some(bad) = group.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(format!(
                "'{bad}' in group {} is not a hexadecimal digit",
                index + 1
            ));
        }
    }
    let hex = |s: &str| u64::from_str_radix(s, 16).expect("checked hexadecimal");
    let d1 = hex(groups[0]) as u32;
    let d2 = hex(groups[1]) as u16;
    let d3 = hex(groups[2]) as u16;
    let tail = format!("{}{}", groups[3], groups[4]);
    let mut d4 = [0u8; 8];
    for (i, byte) in d4.iter_mut().enumerate() {
        *byte = hex(&tail[i * 2..i * 2 + 2]) as u8;
    }
    Ok((d1, d2, d3, d4))
}

/// Marks a driver's entry function and generates the `DriverEntry` the kernel calls.
///
/// The function takes `&mut PassiveLevel` and `&mut Driver` and returns
/// `Result<State, Status>`, where `State: DriverState` is kept until unload:
///
/// ```text
/// #[wfp_rs::driver_entry]
/// fn entry(irql: &mut PassiveLevel, driver: &mut Driver) -> Result<MyState, Status> { ... }
/// ```
///
/// On Windows the generated `DriverEntry` is the image's exported entry point; in the simulator
/// it is a plain `pub` function to pass to `Machine::load_driver`. Unload is wired automatically.
/// `DriverEntry` calls the function directly, not through a function pointer, so the stack check
/// (wfp-rs-stack, which `cargo wfp build` runs) follows the whole load path and counts it against
/// the budget.
///
/// The attribute also defines the image's `#[panic_handler]` (`wfp_rs::panic_handler!()`: print
/// the panic to the kernel debugger, then bug check with `KMODE_EXCEPTION_NOT_HANDLED`; nothing
/// in the simulator). A driver that defines its own handler opts out:
///
/// ```text
/// #[wfp_rs::driver_entry(no_panic_handler)]
/// fn entry(irql: &mut PassiveLevel, driver: &mut Driver) -> Result<MyState, Status> { ... }
/// ```
#[proc_macro_attribute]
pub fn driver_entry(args: TokenStream, item: TokenStream) -> TokenStream {
    let function = parse_macro_input!(item as ItemFn);
    let panic_handler = match parse_entry_args(args) {
        Ok(panic_handler) => panic_handler,
        Err(error) => {
            // Keep the function, so the only error is ours (as below).
            let error = error.to_compile_error();
            return quote! { #function #error }.into();
        }
    };
    if let Err(error) = check_entry(&function) {
        // Keep the function, so the only error is ours (no "unused import", no "cannot find").
        let error = error.to_compile_error();
        return quote! { #function #error }.into();
    }
    let name = &function.sig.ident;
    let panic_handler = panic_handler.then(|| quote! { ::wfp_rs::panic_handler!(); });
    quote! {
        #function
        ::wfp_rs::__export_driver_entry!(#name);
        #panic_handler
    }
    .into()
}

/// Whether to define the panic handler: `#[driver_entry]` does, `#[driver_entry(no_panic_handler)]`
/// does not; anything else is an error.
fn parse_entry_args(args: TokenStream) -> Result<bool, Error> {
    if args.is_empty() {
        return Ok(true);
    }
    let args = proc_macro2::TokenStream::from(args);
    match syn::parse2::<syn::Ident>(args.clone()) {
        Ok(ident) if ident == "no_panic_handler" => Ok(false),
        _ => Err(Error::new_spanned(
            args,
            "#[driver_entry] takes no arguments, or `no_panic_handler` to leave the panic handler to the driver",
        )),
    }
}

fn check_entry(function: &ItemFn) -> Result<(), Error> {
    const SHAPE: &str =
        "expected `fn(irql: &mut PassiveLevel, driver: &mut Driver) -> Result<State, Status>`";
    let sig = &function.sig;
    if let Some(asyncness) = sig.asyncness {
        return Err(Error::new(
            asyncness.span(),
            format!("a driver entry cannot be async; {SHAPE}"),
        ));
    }
    if let Some(unsafety) = sig.unsafety {
        return Err(Error::new(
            unsafety.span(),
            format!("a driver entry is a safe function; {SHAPE}"),
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(Error::new(
            sig.generics.span(),
            format!("a driver entry cannot be generic; {SHAPE}"),
        ));
    }
    if sig.inputs.len() != 2 || sig.inputs.iter().any(|a| matches!(a, FnArg::Receiver(_))) {
        return Err(Error::new(
            sig.inputs.span(),
            format!("wrong parameters; {SHAPE}"),
        ));
    }
    if let Some(FnArg::Typed(first)) = sig.inputs.first() {
        let is_mut_passive = match &*first.ty {
            Type::Reference(reference) => {
                reference.mutability.is_some()
                    && matches!(&*reference.elem, Type::Path(path)
                        if path.path.segments.last().is_some_and(|s| s.ident == "PassiveLevel"))
            }
            _ => false,
        };
        if !is_mut_passive {
            return Err(Error::new_spanned(
                &first.ty,
                format!(
                    "the first parameter must be `&mut PassiveLevel`: DriverEntry runs at PASSIVE_LEVEL; {SHAPE}"
                ),
            ));
        }
    }
    if matches!(sig.output, ReturnType::Default) {
        return Err(Error::new(
            sig.ident.span(),
            format!("missing return type; {SHAPE}"),
        ));
    }
    if sig.ident == "DriverEntry" {
        return Err(Error::new(
            sig.ident.span(),
            "name the function something else: `DriverEntry` is the name of the generated entry point",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_guid;

    #[test]
    fn parses_plain_and_braced_guids() {
        let expected = (
            0x7a5d0e3c,
            0x1f2b,
            0x4c6d,
            [0x8e, 0x9f, 0xa0, 0xb1, 0xc2, 0xd3, 0xe4, 0xf5],
        );
        assert_eq!(
            parse_guid("7a5d0e3c-1f2b-4c6d-8e9f-a0b1c2d3e4f5"),
            Ok(expected)
        );
        assert_eq!(
            parse_guid("{7A5D0E3C-1F2B-4C6D-8E9F-A0B1C2D3E4F5}"),
            Ok(expected)
        );
    }

    #[test]
    fn rejects_malformed_guids_with_a_reason() {
        assert_eq!(
            parse_guid("7a5d0e3c-1f2b-4c6d-8e9f-a0b1c2d3e4").unwrap_err(),
            "group 5 (\"a0b1c2d3e4\") has 10 digit(s), expected 12"
        );
        assert_eq!(
            parse_guid("7a5d0e3c-1f2b-4c6d-8e9g-a0b1c2d3e4f5").unwrap_err(),
            "'g' in group 4 is not a hexadecimal digit"
        );
        assert!(
            parse_guid("{7a5d0e3c-1f2b-4c6d-8e9f-a0b1c2d3e4f5")
                .unwrap_err()
                .contains("unbalanced")
        );
        assert!(
            parse_guid("7a5d0e3c1f2b4c6d8e9fa0b1c2d3e4f5")
                .unwrap_err()
                .contains("found 1 group")
        );
    }
}
