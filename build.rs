//! Compiles the etcd API protos with protox (pure Rust), so building needs no system protoc.

fn main() {
    let protos = ["proto/rpc.proto", "proto/kv.proto", "proto/auth.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("etcd protos must compile");
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(fds)
        .expect("prost code generation");
}
