//! The committed C header `include/fedrec.h` is exactly what cbindgen generates from `src/ffi`; `FEDREC_BLESS=1` rewrites it.

use std::path::Path;

#[test]
fn the_committed_header_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml is valid");
    // Only the FFI module: the header describes the C ABI, nothing else in the crate.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src").join("ffi").join("mod.rs"))
        .generate()
        .expect("cbindgen parses src/ffi");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("cbindgen writes UTF-8");

    let path = root.join("include").join("fedrec.h");
    if std::env::var_os("FEDREC_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("include/fedrec.h is writable");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first_difference = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "include/fedrec.h is out of date with src/ffi (first difference at line {}).\n\
             Regenerate it with `FEDREC_BLESS=1 cargo test -p fedrec-client --test header` and commit it.",
            first_difference + 1
        );
    }
}
