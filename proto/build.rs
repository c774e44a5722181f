//! Generates the NRI ttrpc bindings from `nri/api.proto`, only when the `nri` feature is on so
//! that `fleet-cni` (which depends on this crate without it) builds no protobuf code.

fn main() {
    println!("cargo:rerun-if-changed=nri/api.proto");
    println!("cargo:rerun-if-changed=build.rs");
    generate();
}

#[cfg(not(feature = "nri"))]
fn generate() {}

#[cfg(feature = "nri")]
fn generate() {
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("nri");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/nri");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .input("nri/api.proto")
        .include("nri")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("generate NRI ttrpc code from proto/nri/api.proto");
    // `include!` rejects inner attributes and inner doc comments; src/nri.rs sets the lints on
    // the wrapping modules instead.
    for file in ["api.rs", "api_ttrpc.rs"] {
        let path = out.join(file);
        let text = std::fs::read_to_string(&path).expect("read generated NRI code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("write generated NRI code");
    }
}
