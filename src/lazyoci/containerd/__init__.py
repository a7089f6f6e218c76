"""lazyoci and containerd: the Snapshots gRPC service that makes lazyoci containerd's
remote snapshotter, and a pull that drives containerd (`lazyoci containerd pull`).

Nothing here is imported at start-up: grpc and the generated API modules
(`lazyoci.containerd.api`, built by `make deps` from containerd's .proto files) load
when the service serves containerd or a `containerd` command runs.
"""

__all__: list[str] = []
