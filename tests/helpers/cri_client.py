"""A small CRI client (the calls a kubelet makes) for containerd's CRI socket.

The messages are tests/helpers/cri_api.proto (a subset of CRI runtime.v1 with CRI's field
numbers), compiled when first used by grpcio-tools into a temporary directory (removed once imported).
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import grpc

HERE = Path(__file__).resolve().parent


@functools.cache
def cri_modules() -> tuple[ModuleType, ModuleType]:
    """(messages, services) of cri_api.proto."""
    import grpc_tools
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="lazyoci-cri-"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{HERE}", f"-I{well_known}", f"--python_out={out}",
                      f"--grpc_python_out={out}", str(HERE / "cri_api.proto")])
    if rc != 0:
        raise RuntimeError("protoc could not compile cri_api.proto")
    sys.path.insert(0, str(out))
    try:
        import cri_api_pb2
        import cri_api_pb2_grpc
    finally:
        sys.path.remove(str(out))
        shutil.rmtree(out, ignore_errors=True)     # imported: the files are not needed any more
    return cri_api_pb2, cri_api_pb2_grpc


class CriClient:
    """RuntimeService and ImageService of the CRI socket at `address`."""

    def __init__(self, address: str) -> None:
        self.pb, services = cri_modules()
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.runtime = services.RuntimeServiceStub(self.channel)
        self.images = services.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def pull_image(self, ref: str, timeout: float = 600) -> str:
        return self.images.PullImage(self.pb.PullImageRequest(image=self.pb.ImageSpec(image=ref)),
                                     timeout=timeout).image_ref

    def host_network_pod(self, name: str, log_directory: str):
        """A pod sandbox config on the node's network (like hostNetwork: true)."""
        pb = self.pb
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
            log_directory=log_directory,
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD))))

    def run_pod(self, config, timeout: float = 600) -> str:
        return self.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config), timeout=timeout).pod_sandbox_id

    def create_container(self, pod_id: str, pod_config, name: str, image: str, command: list[str],
                         log_path: str, timeout: float = 600) -> str:
        pb = self.pb
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
                                    command=command, log_path=log_path)
        return self.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config), timeout=timeout).container_id

    def start_container(self, container_id: str, timeout: float = 120) -> None:
        self.runtime.StartContainer(self.pb.StartContainerRequest(container_id=container_id), timeout=timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)

    def remove_image(self, ref: str) -> None:
        self.images.RemoveImage(self.pb.RemoveImageRequest(image=self.pb.ImageSpec(image=ref)), timeout=120)
