# Multi-stage image for the DaemonSet. The build stage uses the toolchain the README's commands
# set up on Debian 12: Debian's Rust 1.96 with rust-src, LLVM 22 and bpf-linker. Without rustup,
# aya-build builds the kernel programs with that same toolchain. The runtime stage carries the
# binary, iproute2 (`tc`, for clsact clean-up), and nftables and iptables (`--trace-drop-rules`
# runs `nft monitor trace`, and `iptables -S` for the comments of iptables-nft's rules).
# `cargo xtask image` builds it with podman and runs it as the DaemonSet does against the lab.
FROM debian:bookworm AS build
# rustc-web 1.96 and llvm-22 come from the image's bookworm-security source.
RUN apt-get update && apt-get install -y --no-install-recommends \
        ca-certificates build-essential pkg-config \
        rustc-web cargo-web rust-web-src llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev libffi-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/root/.cargo/bin:$PATH
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release -p observer

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 nftables iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/observer /usr/local/bin/observer
ENTRYPOINT ["/usr/local/bin/observer"]
CMD ["agent"]
