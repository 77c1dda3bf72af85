fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    // A vendored protoc, so that a fresh machine needs no system package.
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Payloads as `Bytes`: the edge hands frames to NATS without copying them again.
    config.bytes(["."]);
    tonic_prost_build::configure()
        // AuthRequest carries an AccessToken: its Debug is written by hand, redacted.
        .skip_debug(["tcpc.v1.AuthRequest"])
        .compile_with_config(config, &["proto/tcpc/v1/tcpc.proto"], &["proto"])?;
    Ok(())
}
