# sluice's container image: one static binary (scripts/build-static.sh), a CA bundle for
# https git servers, nothing else. Needs no base image to pull: `FROM scratch`.
#
# Build (scripts/image.sh does these steps):
#   bin=$(scripts/build-static.sh)                 # target/x86_64-unknown-linux-musl/release/sluice
#   mkdir -p target/image && cp "$bin" target/image/sluice
#   cp /etc/ssl/certs/ca-certificates.crt target/image/    # Debian's ca-certificates
#   renderers/build.sh target/image/renderers       # Kustomize and Helm as WebAssembly
#   "$bin" renderers compile --dir target/image/renderers   # precompiled: agents never compile
#   docker build -f Dockerfile -t registry.example.com/sluice:0.5.0 target/image
#
# Runs as uid/gid 65532 (non-root); `sluice generate` sets runAsNonRoot, a read-only root
# filesystem and emptyDir volumes for /tmp and the cache (/var/cache/sluice).
FROM scratch
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY sluice /sluice
# Found beside the binary (`/renderers`); loaded only when a project renders.
COPY renderers /renderers
USER 65532:65532
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 8080
ENTRYPOINT ["/sluice"]
CMD ["--help"]
