//! Compiles the etcd API protos with protox (pure Rust), so building needs no system protoc.

fn main() {
    let protos = [
        "proto/rpc.proto",
        "proto/kv.proto",
        "proto/auth.proto",
        "proto/v3lock.proto",
        "proto/v3election.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("etcd protos must compile");
    // The descriptors also ship in the binary: the JSON gateway maps JSON to messages through them.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(
        out.join("etcd_descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("write descriptors");
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(fds)
        .expect("prost code generation");
}
