//! Builds the XDP program (lb-ebpf) for bpfel-unknown-none in release mode with nightly,
//! and leaves it in OUT_DIR for `include_bytes_aligned!`. This is the only eBPF build
//! path: `cargo xtask build-ebpf` runs this same build and copies the object out.
fn main() -> anyhow::Result<()> {
    let metadata_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: metadata_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    println!("cargo:rerun-if-changed=../lb-common/src");
    Ok(())
}
